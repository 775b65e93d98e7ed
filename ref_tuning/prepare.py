"""Raw CodeContests to the processed layout users already have (shared/docs/DATA_FORMAT.md):

    python -m ref_tuning.prepare RAW_DIR OUT_DIR --tokenizer tokenizer.model [--splits train valid test]
        [--languages 1 3] [--max-seq-len 2048] [--workers N] [--overwrite]

RAW_DIR holds the public parquet files (`train-000NN-of-000MM.parquet`, `valid-...`, `test-...`,
also under `RAW_DIR/data/`) or the same rows as JSONL (`train.jsonl` or `train-*.jsonl`, one problem
per line). For each split it writes `{split}.jsonl` (one solution per line, correct and incorrect,
marked) and `{split}_metadata.json` in the newer form (`problem_id` per entry, `problem_index_map`),
and caches the split's index and token lengths for the tokenizer, so that the first training run
reads no more than any later one.

Python solutions only by default (language ids 1 = Python 2, 3 = Python 3). A solution is dropped
when its whole templated sample (BOS, Alpaca prompt, solution, EOS) is longer than `--max-seq-len`
tokens; every dropped or skipped solution is counted in the summary. Input is streamed (parquet row
group by row group, JSONL line by line) and tokenized by `--workers` processes; outputs appear under
their final names only once complete.
"""

import argparse
import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from ref_tuning.config import positive_int
from ref_tuning.data import tokenize_sample
from ref_tuning.index import CACHE_FOLDER, DataError, SplitIndex, TokenLengths
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
        ok = (isinstance(value, dict) and isinstance(value.get("language"), list) and isinstance(value.get("solution"), list)
              and len(value["language"]) == len(value["solution"])
              and all(type(x) is int for x in value["language"]) and all(isinstance(x, str) for x in value["solution"]))  # fmt: skip
        if not ok:
            raise PrepareError(
                f"{where}: field '{name}' must be {{'language': [int, ...], 'solution': [str, ...]}} of equal lengths"
            )
    return row


# ---------------------------------------------------------------------------------------------
# Reading raw rows


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
        except ImportError as e:
            raise PrepareError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or give JSONL rows") from e
        columns = ["name", "description", "difficulty", "public_tests", "solutions", "incorrect_solutions"]
        parquet = pq.ParquetFile(path)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise PrepareError(f"{path}: not a CodeContests file: no column(s) {missing}")
        row = 0
        for batch in parquet.iter_batches(batch_size=64, columns=columns):
            for r in batch.to_pylist():
                yield f"{path}: row {row}", r
                row += 1
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
    return None


# ---------------------------------------------------------------------------------------------
# Tokenizing, in worker processes

_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _tokenizer
    from ref_tuning.models import sheared_llama_tokenizer

    torch.set_num_threads(1)
    _tokenizer = sheared_llama_tokenizer(tokenizer_path)


def _encode(records: List[Dict[str, Any]], max_seq_len: int) -> Tuple[int, List[Tuple[bytes, bool, int, int]]]:
    """(dropped as too long, [(JSON line, is_correct, tokens, prompt tokens)]) of one problem's records."""
    kept, too_long = [], 0
    for record in records:
        tokens, labels = tokenize_sample(_tokenizer, record)
        if len(tokens) > max_seq_len:
            too_long += 1
            continue
        line = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
        kept.append((line, record["is_correct"], len(tokens), labels.count(-100)))
    return too_long, kept


def _encode_task(task: Tuple[List[Dict[str, Any]], int]):
    return _encode(*task)


# ---------------------------------------------------------------------------------------------
# Writing one split


@dataclass
class SplitStats:
    problems: int = 0
    solutions: int = 0
    other_languages: int = 0
    too_long: int = 0
    correct: int = 0
    incorrect: int = 0
    by_problem: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def line(self, split: str, max_seq_len: int) -> str:
        return (
            f"{split}: {self.problems} problems, {self.solutions} solutions; kept {self.correct} correct and "
            f"{self.incorrect} incorrect; skipped {self.other_languages} in other languages and {self.too_long} "
            f"longer than {max_seq_len} tokens"
        )


@contextlib.contextmanager
def _encoder(workers: int, tokenizer_path: Path):
    """A function mapping an iterator of tasks to `_encode`'s results in order, in `workers` processes
    (in this one for a single worker: no start-up cost). The output never depends on `workers`."""
    if workers <= 1:
        _init_worker(str(tokenizer_path))
        yield lambda tasks: map(_encode_task, tasks)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_path),)) as pool:

        def encode(tasks):
            # Two batches in flight at most: Pool.imap would read the whole input ahead into memory.
            tasks, pending = iter(tasks), None
            while True:
                batch = list(itertools.islice(tasks, 16 * workers))
                ahead = pool.map_async(_encode_task, batch) if batch else None
                if pending is not None:
                    yield from pending.get()
                if ahead is None:
                    return
                pending = ahead

        yield encode


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def prepare_split(
    files: List[Path], out_dir: Path, split: str, tokenizer_path: Path, languages: Sequence[int] = PYTHON_LANGUAGES,
    max_seq_len: int = 2048, workers: int = 1, progress: bool = True,
) -> SplitStats:  # fmt: skip
    """Write `{split}.jsonl`, `{split}_metadata.json` (v2) and the split's caches into `out_dir`."""
    jsonl, metadata = out_dir / f"{split}.jsonl", out_dir / f"{split}_metadata.json"
    stats = SplitStats()
    offsets, is_correct, difficulty, problem = array("q", [0]), array("b"), array("h"), array("i")
    total, prompt = array("i"), array("i")
    problem_ids: Dict[str, int] = {}

    def problems() -> Iterator[Tuple[Dict[str, Any], int, List[Dict[str, Any]]]]:
        """(row, solutions in other languages, records) of every problem, in input order."""
        for path in files:
            for where, row in read_rows(path):
                row = check_row(row, where)
                records = list(problem_records(row, languages))
                n_all = sum(len((row.get(k) or {}).get("language", [])) for k in ("solutions", "incorrect_solutions"))
                yield row, n_all - len(records), records

    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # removed again if this fails
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_jsonl, tmp_meta = _tmp(jsonl), _tmp(metadata)
    try:
        with open(tmp_jsonl, "wb") as out, open(tmp_meta, "w", encoding="utf-8") as meta, \
                _encoder(workers, tokenizer_path) as encode:  # fmt: skip
            meta.write('{\n  "metadata": [')
            bar = tqdm(total=_count_rows(files), unit=" problems", desc=f"preparing {split}", disable=not progress)
            rows = collections.deque()  # the rows whose records are out being tokenized, in input order

            def records():
                for row, other, recs in problems():
                    rows.append((row, other))
                    yield recs, max_seq_len

            for too_long, kept in encode(records()):
                row, other = rows.popleft()
                stats.problems += 1
                stats.other_languages += other
                stats.too_long += too_long
                stats.solutions += other + too_long + len(kept)
                pid = row["name"]
                slot = stats.by_problem.setdefault(pid, {"difficulty": row["difficulty"], "correct_indices": [],
                    "incorrect_indices": [], "correct_token_lengths": [], "incorrect_token_lengths": []})  # fmt: skip
                for line, correct, n_tokens, n_prompt in kept:
                    kind = "correct" if correct else "incorrect"
                    slot[f"{kind}_indices"].append(len(is_correct))
                    slot[f"{kind}_token_lengths"].append(n_tokens - n_prompt - 1)  # the solution alone, as before
                    entry = {"is_correct": correct, "difficulty": row["difficulty"], "problem_id": pid}
                    meta.write(("\n    " if not len(is_correct) else ",\n    ") + json.dumps(entry, ensure_ascii=False))
                    out.write(line)
                    offsets.append(offsets[-1] + len(line))
                    is_correct.append(correct)
                    difficulty.append(row["difficulty"])
                    problem.append(problem_ids.setdefault(pid, len(problem_ids)))
                    total.append(n_tokens)
                    prompt.append(n_prompt)
                    stats.correct += correct
                    stats.incorrect += not correct
                bar.update(1)
            bar.close()
            if not len(is_correct):
                raise PrepareError(
                    f"{split}: no solution kept of {stats.solutions} in {stats.problems} problems ({stats.other_languages} "
                    f"in other languages than {list(languages)}, {stats.too_long} longer than --max-seq-len="
                    f"{max_seq_len}); nothing written"
                )
            meta.write("\n  ],\n")
            stats_json = {"total": len(is_correct), "correct": stats.correct, "incorrect": stats.incorrect,
                          "n_problems": stats.problems, "skipped_other_languages": stats.other_languages,
                          "dropped_longer_than_max_seq_len": stats.too_long, "max_seq_len": max_seq_len}  # fmt: skip
            tail = {"problem_index_map": stats.by_problem, "stats": stats_json, "source_file": jsonl.name}
            meta.write(json.dumps(tail, indent=2, ensure_ascii=False)[2:])  # the rest of the top-level object
        os.replace(tmp_jsonl, jsonl)
        os.replace(tmp_meta, metadata)
        created = []
    finally:
        for tmp in (tmp_jsonl, tmp_meta):
            if tmp.exists():
                tmp.unlink()
        for d in created:  # deepest first
            d.rmdir()

    cache = out_dir / CACHE_FOLDER
    index = SplitIndex.write(
        jsonl, metadata, cache, torch.frombuffer(offsets, dtype=torch.int64).clone(),
        torch.frombuffer(is_correct, dtype=torch.int8).bool() if len(is_correct) else torch.zeros(0, dtype=torch.bool),
        torch.frombuffer(difficulty, dtype=torch.int16).clone() if len(difficulty) else torch.zeros(0, dtype=torch.int16),
        torch.frombuffer(problem, dtype=torch.int32).clone() if len(problem) else torch.zeros(0, dtype=torch.int32),
        list(problem_ids),
    )  # fmt: skip
    from ref_tuning.models import sheared_llama_tokenizer

    lengths = TokenLengths(index, cache, sheared_llama_tokenizer(str(tokenizer_path)))
    lengths.total = torch.tensor(total, dtype=torch.int32)
    lengths.prompt = torch.tensor(prompt, dtype=torch.int32)
    lengths.save()
    return stats


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ref_tuning.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("raw_dir", type=Path, help="folder with the raw parquet or JSONL files")
    parser.add_argument("out_dir", type=Path, help="where the processed files go")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.model (the LLaMA-2 one)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="default: all three")
    parser.add_argument("--languages", nargs="+", type=int, default=list(PYTHON_LANGUAGES),
                        help="CodeContests language ids to keep (default 1 3: Python 2 and 3)")  # fmt: skip
    parser.add_argument("--max-seq-len", type=positive_int, default=2048, help="longest templated sample kept, in tokens")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, help="tokenizing processes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing processed files")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if not args.tokenizer.is_file():
            raise PrepareError(f"{args.tokenizer}: tokenizer not found")
        plan = {split: raw_files(args.raw_dir, split) for split in args.splits}
        for split, files in plan.items():
            if not files:
                raise PrepareError(
                    f"{args.raw_dir}: no raw files for split '{split}' (looked for {split}-*.parquet, {split}.jsonl, "
                    f"{split}-*.jsonl, also under data/)"
                )
            outputs = (args.out_dir / f"{split}.jsonl", args.out_dir / f"{split}_metadata.json")
            try:
                check_separate([args.raw_dir, args.tokenizer], outputs)
            except ValueError as e:
                raise PrepareError(str(e)) from None
            for out in outputs:
                if out.exists() and not args.overwrite:
                    raise PrepareError(f"{out}: already exists; pass --overwrite to replace it")
        for split, files in plan.items():
            stats = prepare_split(files, args.out_dir, split, args.tokenizer, args.languages, args.max_seq_len,
                                  max(1, args.workers), progress=not args.no_progress)  # fmt: skip
            print(stats.line(split, args.max_seq_len), flush=True)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def write_split(problems: Iterable[Dict[str, Any]], out_dir: Path, split: str) -> Tuple[Path, Path]:
    """In-memory rows to `{split}.jsonl` and a v2 metadata file, with no tokenizer and no length
    filter (the demo's shipped problems, all short); `prepare_split` is the real path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl, meta_path = out_dir / f"{split}.jsonl", out_dir / f"{split}_metadata.json"
    entries, index_map = [], {}
    with open(jsonl, "w", encoding="utf-8") as f:
        for problem in problems:
            pid = problem["name"]
            slot = index_map.setdefault(pid, {"difficulty": problem["difficulty"], "correct_indices": [],
                                              "incorrect_indices": []})  # fmt: skip
            for record in problem_records(problem):
                slot["correct_indices" if record["is_correct"] else "incorrect_indices"].append(len(entries))
                entries.append({"is_correct": record["is_correct"], "difficulty": problem["difficulty"], "problem_id": pid})
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    n_correct = sum(e["is_correct"] for e in entries)
    stats = {"total": len(entries), "correct": n_correct, "incorrect": len(entries) - n_correct, "n_problems": len(index_map)}
    meta = {"metadata": entries, "problem_index_map": index_map, "stats": stats, "source_file": jsonl.name}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return jsonl, meta_path


if __name__ == "__main__":
    sys.exit(main())
