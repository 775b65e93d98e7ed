"""Raw CodeContests to the processed layout users already have (docs/data.md).

RAW_DIR (or RAW_DIR/data) holds the public parquet files (`train-000NN-of-000MM.parquet`, ...) or JSONL rows
(`train.jsonl`, `train-*.jsonl`). Per split: `{split}.jsonl` (one solution a line, correct and incorrect),
`{split}_metadata.json` (v2) and the cached index and token lengths. Python solutions only by default; a solution
whose templated sample exceeds `--max-seq-len` tokens is dropped and counted. Outputs appear only once complete."""

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import sys
from array import array
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from ref_tuning.atomic import commit, remove, temporary
from ref_tuning.config import positive_int
from ref_tuning.data import token_counts
from ref_tuning.line_index import CACHE_FOLDER, DataError, SplitIndex, TokenLengths
from ref_tuning.models import sheared_llama_tokenizer
from ref_tuning.paths import check_separate

# CodeContests language ids: 1 = Python 2, 3 = Python 3.
PYTHON_LANGUAGES = (1, 3)
SPLITS = ("train", "valid", "test")
# The public copy names the validation split `valid`; some mirrors say `validation`.
RAW_SPLIT_NAMES = {"valid": ("valid", "validation")}
_ROW_FIELDS = {"name": str, "description": str, "difficulty": int}


class PrepareError(DataError):
    """Raw input that cannot be prepared; the message names the file and row."""


def problem_records(problem: Dict[str, Any], languages: Sequence[int] = PYTHON_LANGUAGES) -> Iterator[Dict[str, Any]]:
    """One processed sample per solution of the problem in `languages`, correct ones first; the
    `task_id` numbers a solution by its place among all of the problem's solutions of its kind."""
    has_tests = bool((problem.get("public_tests") or {}).get("input"))
    for kind, field_name in (("correct", "solutions"), ("incorrect", "incorrect_solutions")):
        solutions = problem.get(field_name) or {"language": [], "solution": []}
        for i, (language, source) in enumerate(zip(solutions["language"], solutions["solution"])):
            if language not in languages:
                continue
            yield {
                "instruction": problem["description"],
                "input": "",
                "output": source,
                "task_id": f"{problem['name']}_{kind}_{i}",
                "is_correct": kind == "correct",
                "metadata": {"source": "code_contests", "difficulty": problem["difficulty"], "has_tests": has_tests},
            }


def check_row(row: Any, where: str) -> Dict[str, Any]:
    """A raw CodeContests row with the fields preparation needs, typed; else an error naming it."""
    if not isinstance(row, dict):
        raise PrepareError(f"{where}: expected an object (one problem), found {type(row).__name__}")
    for name, kind in _ROW_FIELDS.items():
        if not isinstance(row.get(name), kind) or isinstance(row.get(name), bool):
            raise PrepareError(f"{where}: field '{name}' must be a {kind.__name__}, found {row.get(name)!r:.80}")
    for name in ("solutions", "incorrect_solutions"):
        if name not in row:  # a null field is a problem without such solutions; a missing one, a broken row
            raise PrepareError(f"{where}: field '{name}' is missing (null if the problem has none)")
        value = row[name]
        if value is None:
            continue
        languages, solutions = (value.get("language"), value.get("solution")) if isinstance(value, dict) else (0, 0)
        ok = isinstance(languages, list) and all(type(x) is int for x in languages)
        ok = ok and isinstance(solutions, list) and all(isinstance(x, str) for x in solutions)
        if not ok or len(languages) != len(solutions):
            raise PrepareError(
                f"{where}: field '{name}' must be {{'language': [int, ...], 'solution': [str, ...]}} of equal lengths"
            )
    return row


def raw_files(raw_dir: Path, split: str) -> List[Path]:
    """The raw files of `split` in `raw_dir` (or `raw_dir/data`), parquet or JSONL, in name order."""
    found = []
    for folder in (raw_dir, raw_dir / "data"):
        for name in RAW_SPLIT_NAMES.get(split, (split,)):
            for pattern in (f"{name}.parquet", f"{name}-*.parquet", f"{name}.jsonl", f"{name}-*.jsonl"):
                found += sorted(folder.glob(pattern))
    return list(dict.fromkeys(found))


def read_rows(path: Path) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(where, row) of every problem in a raw file, streamed."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:  # the ImportError stays attached as the context
            raise PrepareError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or give JSONL rows")
        columns = ["name", "description", "difficulty", "public_tests", "solutions", "incorrect_solutions"]
        parquet = pq.ParquetFile(path)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise PrepareError(f"{path}: not a CodeContests file: no column(s) {missing}")
        batches = parquet.iter_batches(batch_size=64, columns=columns)
        for i, row in enumerate(row for batch in batches for row in batch.to_pylist()):
            yield f"{path}: row {i}", row
        return
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            where = f"{path}:{i + 1}"
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise PrepareError(f"{where}: not a valid JSON line ({e})") from e


def _count_rows(files: List[Path]) -> Optional[int]:
    if all(f.suffix == ".parquet" for f in files):
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _tokenizer
    try:
        _tokenizer = sheared_llama_tokenizer(tokenizer_path)
    except Exception as e:  # raised by the first task: a Pool starts a worker whose initializer fails again, forever
        _tokenizer = e


def _count_tokens(records: List[Dict[str, Any]]) -> List[Tuple[int, int]]:
    """(tokens, prompt tokens) of each of one problem's records."""
    if isinstance(_tokenizer, Exception):
        raise _tokenizer
    return token_counts(_tokenizer, records, [r["task_id"] for r in records])


@contextlib.contextmanager
def _counter(workers: int, tokenizer_path: Path):
    """`_count_tokens` mapped over record lists in order, in `workers` processes (1: this one, no start-up cost)."""
    if workers <= 1:
        _init_worker(str(tokenizer_path))
        yield lambda tasks: map(_count_tokens, tasks)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_path),)) as pool:

        def count(tasks):
            # One batch counted while the next is read: Pool.imap would read the whole input ahead into memory.
            tasks = iter(tasks)
            batches = iter(lambda: list(itertools.islice(tasks, 16 * workers)), [])
            pending = pool.map_async(_count_tokens, next(batches, []))
            for batch in batches:
                ahead = pool.map_async(_count_tokens, batch)
                yield from pending.get()
                pending = ahead
            yield from pending.get()

        yield count


class SplitWriter:
    """The one writer of a split's `{split}.jsonl` and v2 metadata, which appear only if its `with` block ends without
    an error (else nothing is left, not even its folders). `stats`: extra metadata stats; after the block, all."""

    def __init__(self, out_dir: Path, split: str):
        self.jsonl, self.metadata = Path(out_dir) / f"{split}.jsonl", Path(out_dir) / f"{split}_metadata.json"
        self.stats: Dict[str, Any] = {}
        self._problems: Dict[str, Dict[str, Any]] = {}  # the problem_index_map
        self._problem_ids: Dict[str, int] = {}
        # The index's columns (see `SplitIndex`), for `write_index`.
        self._offsets, self._is_correct = array("q", [0]), array("b")
        self._difficulty, self._problem = array("h"), array("i")

    def __len__(self) -> int:
        return len(self._is_correct)

    def __enter__(self) -> "SplitWriter":
        out_dir = self.jsonl.parent
        self._created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # deepest first
        out_dir.mkdir(parents=True, exist_ok=True)
        self._tmp = [temporary(self.jsonl), temporary(self.metadata)]
        self._out, self._meta = open(self._tmp[0], "wb"), open(self._tmp[1], "w", encoding="utf-8")
        self._meta.write('{\n  "metadata": [')  # streamed: the train split has millions of entries
        return self

    def add(self, record: Dict[str, Any], problem_id: str, solution_tokens: Optional[int] = None) -> None:
        """One line; `solution_tokens` (the solution's own), where known, go into its problem's `*_token_lengths`."""
        correct, difficulty, line = record["is_correct"], record["metadata"]["difficulty"], len(self)
        kind = "correct" if correct else "incorrect"
        slot = self._problems.get(problem_id)
        if slot is None:
            slot = self._problems[problem_id] = {"difficulty": difficulty}
            lists = ("indices", "token_lengths") if solution_tokens is not None else ("indices",)
            slot.update((f"{k}_{what}", []) for what in lists for k in ("correct", "incorrect"))
            self._problem_ids[problem_id] = len(self._problem_ids)
        slot[f"{kind}_indices"].append(line)
        if solution_tokens is not None:
            slot[f"{kind}_token_lengths"].append(solution_tokens)
        entry = {"is_correct": correct, "difficulty": difficulty, "problem_id": problem_id}
        self._meta.write((",\n    " if line else "\n    ") + json.dumps(entry, ensure_ascii=False))
        data = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
        self._out.write(data)
        self._offsets.append(self._offsets[-1] + len(data))
        self._is_correct.append(correct)
        self._difficulty.append(difficulty)
        self._problem.append(self._problem_ids[problem_id])

    def __exit__(self, error, *_) -> None:
        try:
            with self._out, self._meta:
                if error is None:
                    n, correct = len(self), sum(self._is_correct)
                    counts = dict(total=n, correct=correct, incorrect=n - correct, n_problems=len(self._problems))
                    self.stats = {**counts, **self.stats}
                    tail = {"problem_index_map": self._problems, "stats": self.stats, "source_file": self.jsonl.name}
                    self._meta.write("\n  ],\n" + json.dumps(tail, indent=2, ensure_ascii=False)[2:])
            if error is None:
                commit(self._tmp[0], self.jsonl)
                commit(self._tmp[1], self.metadata)
                self._created = []
        finally:
            for tmp in self._tmp:
                remove(tmp)
            for d in self._created:
                d.rmdir()

    def write_index(self, cache: Path) -> SplitIndex:
        """Cache the index of the (non-empty) split written, as `SplitIndex.open` would build it."""
        columns = (self._offsets, self._is_correct, self._difficulty, self._problem)
        dtypes = (torch.int64, torch.bool, torch.int16, torch.int32)
        tensors = [torch.frombuffer(values, dtype=dtype).clone() for values, dtype in zip(columns, dtypes)]
        return SplitIndex.write(self.jsonl, self.metadata, cache, *tensors, list(self._problem_ids))


def prepare_split(
    files: List[Path],
    out_dir: Path,
    split: str,
    tokenizer_path: Path,
    languages: Sequence[int] = PYTHON_LANGUAGES,
    max_seq_len: int = 2048,
    workers: int = 1,
    progress: bool = True,
) -> Dict[str, int]:
    """Write `{split}.jsonl`, `{split}_metadata.json` (v2) and the split's caches into `out_dir`; its stats."""
    stats = {"n_problems": 0, "skipped_other_languages": 0, "dropped_longer_than_max_seq_len": 0}
    lengths = array("i"), array("i")  # tokens and prompt tokens of each line written

    def problems() -> Iterator[Tuple[str, List[Dict[str, Any]]]]:
        for path in files:
            for where, row in read_rows(path):
                records = list(problem_records(check_row(row, where), languages))
                every = sum(len((row[k] or {}).get("language", [])) for k in ("solutions", "incorrect_solutions"))
                stats["n_problems"] += 1
                stats["skipped_other_languages"] += every - len(records)
                yield row["name"], records

    rows, tasks = itertools.tee(problems())  # tee holds the problems out being counted
    with (
        SplitWriter(out_dir, split) as writer,
        _counter(workers, tokenizer_path) as count,
        tqdm(total=_count_rows(files), unit=" problems", desc=f"preparing {split}", disable=not progress) as bar,
    ):
        for (problem_id, records), counts in zip(rows, count(records for _, records in tasks)):
            for record, (n_tokens, n_prompt) in zip(records, counts):
                if n_tokens > max_seq_len:
                    stats["dropped_longer_than_max_seq_len"] += 1
                    continue
                writer.add(record, problem_id, n_tokens - n_prompt - 1)  # the solution alone, as the earlier pipeline
                lengths[0].append(n_tokens)
                lengths[1].append(n_prompt)
            bar.update(1)
        if not len(writer):
            raise PrepareError(
                f"{split}: no solution kept of {_solutions(stats)} in {stats['n_problems']} problems "
                f"({stats['skipped_other_languages']} in other languages than {list(languages)}, "
                f"{stats['dropped_longer_than_max_seq_len']} longer than --max-seq-len={max_seq_len}); nothing written"
            )
        writer.stats.update(stats, max_seq_len=max_seq_len)
    cache = out_dir / CACHE_FOLDER
    token_lengths = TokenLengths(writer.write_index(cache), cache, sheared_llama_tokenizer(str(tokenizer_path)))
    token_lengths.total, token_lengths.prompt = (torch.frombuffer(a, dtype=torch.int32).clone() for a in lengths)
    token_lengths.save()
    return writer.stats


def _solutions(stats: Dict[str, int]) -> int:
    return stats.get("total", 0) + stats["skipped_other_languages"] + stats["dropped_longer_than_max_seq_len"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ref_tuning.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("raw_dir", type=Path, help="folder with the raw parquet or JSONL files")
    parser.add_argument("out_dir", type=Path, help="where the processed files go")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.model (the LLaMA-2 one)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="default: all three")
    languages = "CodeContests language ids to keep (default 1 3: Python 2 and 3)"
    parser.add_argument("--languages", nargs="+", type=int, default=list(PYTHON_LANGUAGES), help=languages)
    parser.add_argument("--max-seq-len", type=positive_int, default=2048, help="longest templated sample kept (tokens)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, help="tokenizing processes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing processed files")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    try:
        if not args.tokenizer.is_file():
            raise PrepareError(f"{args.tokenizer}: tokenizer not found")
        sheared_llama_tokenizer(str(args.tokenizer))  # here, once, before any worker starts
        plan = {split: raw_files(args.raw_dir, split) for split in args.splits}
        for split, files in plan.items():
            if not files:
                raise PrepareError(
                    f"{args.raw_dir}: no raw files for split '{split}' (looked for {split}-*.parquet, {split}.jsonl, "
                    f"{split}-*.jsonl, also under data/)"
                )
            outputs = (args.out_dir / f"{split}.jsonl", args.out_dir / f"{split}_metadata.json")
            check_separate([args.raw_dir, args.tokenizer], outputs)
            for out in outputs:
                if out.exists() and not args.overwrite:
                    raise PrepareError(f"{out}: already exists; pass --overwrite to replace it")
        options = (args.languages, args.max_seq_len, args.workers, args.progress)
        for split, files in plan.items():
            s = prepare_split(files, args.out_dir, split, args.tokenizer, *options)
            print(
                f"{split}: {s['n_problems']} problems, {_solutions(s)} solutions; kept {s['correct']} correct and "
                f"{s['incorrect']} incorrect; skipped {s['skipped_other_languages']} in other languages and "
                f"{s['dropped_longer_than_max_seq_len']} longer than {s['max_seq_len']} tokens",
                flush=True,
            )
    except (DataError, ValueError) as e:  # ValueError: from check_separate
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
