"""Building the training set from a processed CodeContests split: the earlier full scan against ours.

    python -m benchmarks data [--workdir DIR] [--lines N] [--n-samples N] [--repeats N]
                                    [--tokenizer PATH] [--max-seq-len N] [--batch-size N] [--seed N]

It measures the wall time and the peak resident memory (RSS) of four ways to get `--n-samples`
correct solutions of `train.jsonl`, tokenized with the Alpaca template and filtered to
`--max-seq-len` tokens:

  1. `earlier approach (full scan)`: what the project did before: `json.load` the whole metadata
     file, draw the line numbers with `random.Random(seed).sample` over the correct lines, scan the
     whole JSONL and `json.loads` the drawn lines, tokenize every drawn sample eagerly
     (`ref_tuning.data.tokenize_sample`) and keep those that fit, as a list of dicts. It tokenizes
     as the code does today, with its per-problem cache of prompt tokens, so it is faster than the
     earlier code was: the comparison errs in its favour.
  2. `ours, first run`: `ref_tuning.data.codecontests_dataset(..., cache_dir=WORKDIR/cache)` with the
     cache directory deleted first (and any sidecar file that our code left beside the data).
  3. `ours, cached`: the same call again, with the cache of (2) in place.
  4. `ours, packed, cached`: the same with `packed=True`.

Before every run the data files and the cache are written back (`os.sync()`) and evicted from the
page cache (`posix_fadvise(POSIX_FADV_DONTNEED)`), so that every method reads from the disk cold.
Each run is its own child process (see `benchmarks`); each prints the number of samples (or
packs) it built, listed above the table. The earlier approach and ours draw with different random
generators, so their counts of kept samples differ a little.

The data are synthetic, written once into WORKDIR/data and reused while their parameters match
(`synthetic.json` beside them): `train.jsonl` and a v2 `train_metadata.json` (indent=2) in the
layout of shared/docs/DATA_FORMAT.md, about 13,328 problems per 3.7M lines, 47% correct. The text is
made of words that are single tokens of the LLaMA-2 tokenizer, so the lengths are set in tokens:
a problem description of lognormal length (median 545 tokens) shared by all of the problem's
solutions, and solutions of lognormal length with a per-problem shift, those over 2048 tokens
dropped as when the real files were made (median 575 tokens). With the template, BOS and EOS, the
mean sample has ~1,450 tokens and ~19% have more than 2048; on the samples that fit in 2048, packing
in file order fills ~74% of the token slots and padding to the batch maximum ~71% (batches of 4,
shuffled), as measured on the real data. At full size (3.7M lines) the files take 18.6 GB and
about a minute to write.

Reading the table: `median wall s` is the median over the successful runs (`runs`) of the time from
start to exit of the child, Python start-up and imports included; `peak RSS GB` is the largest peak
over those runs (GB = 10^9 bytes); `x earlier approach (full scan)` is the method's median divided by
the earlier approach's, so 0.1 means ten times faster.

The packing report after it reads the lengths of the samples that `codecontests_dataset` kept (full
templated token counts, in the dataset's order) and gives the share of real tokens among all token
slots for three layouts of the same samples: padding each batch of `--batch-size` to its longest
sample, in a seeded random order as a shuffling sampler gives; greedy packing in order into rows of
`--max-seq-len` (a row is closed when the next sample does not fit); and ours, best-fit packing.
Its last row is a bound no packer that keeps samples whole can beat: every sample longer than half a
row needs a row of its own, and no row holds more than `--max-seq-len` tokens.
"""

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

from benchmarks import (
    add_subcommand,
    GB,
    PROJECT_ROOT,
    Method,
    check_disk,
    launcher_rss_kib,
    machine_lines,
    measure,
    positive,
    remove,
    table,
)

DEFAULT_WORKDIR = PROJECT_ROOT / "storage" / "bench" / "data"
# The real LLaMA-2 tokenizer lies beside the checkout (as in tests/conftest.py).
DEFAULT_TOKENIZER = PROJECT_ROOT.parent / "shared" / "assets" / "llama2-tokenizer.model"
TOKENIZER_ENV = "REF_TUNING_LLAMA_TOKENIZER"

JSONL, METADATA, PARAMS = "train.jsonl", "train_metadata.json", "synthetic.json"
GENERATOR_VERSION = 2  # bump whenever the generator's output changes: older splits are then rewritten
GENERATOR_SEED = 0

# The shape of the synthetic split. Calibrated on the plan (see `make_plan`) so that, like the real
# data: mean templated length ~1,500 tokens, ~20% over 2048; on the samples of <= 2048 tokens,
# in-order greedy packing at 2048 fills ~73%, padding to the batch maximum ~70% (batch 4 to 8).
REAL_LINES, REAL_PROBLEMS = 3_700_000, 13_328
MIN_PROBLEMS = 50  # small splits (tests) still get a spread of problems
PROBLEM_LINES_SIGMA = 1.0  # lognormal spread of the lines per problem: some problems have thousands
CORRECT_BETA = (2.4, 2.7)  # per-problem share of correct solutions: 47% on average
# Statements run from a few lines to pages, solutions from one line to hundreds: wide spreads. The
# issue's three facts (mean ~1,500 with a long tail, in-order packing ~73%, padding ~70%) leave the
# spreads open, and the best fill any packer can reach depends on them (see the packing report).
PROMPT_LOGNORMAL = (6.3, 0.75)  # tokens of a problem description: median e^6.3 = 545
PROMPT_MAX = 4096
SOLUTION_LOGNORMAL = (6.5, 0.95)  # tokens of a solution: median e^6.5 = 665 before the cut, 575 after
SOLUTION_PROBLEM_SIGMA = 0.3  # per-problem shift of the log length: harder problems, longer code
SOLUTION_MAX = 2048  # the real files were made by dropping longer solutions (DATA_FORMAT.md)
# BOS, EOS and the Alpaca template's own tokens, measured with the LLaMA-2 tokenizer on this text
# (37 to 39: the first word after a newline has no leading space and may take two tokens).
TEMPLATE_TOKENS = 38
# Difficulty per problem: mostly Codeforces A to F (7-12), some CodeChef (1-5), unknown (0), external (6).
DIFFICULTY_WEIGHTS = [4, 3, 3, 2, 1, 0.5, 3, 14, 14, 12, 10, 8, 6, 4, 2.5, 1.5, 1, 0.6, 0.4, 0.3, 0.2] + [0.1] * 8
HAS_TESTS_SHARE = 0.98

# The text: random runs of short words that are single LLaMA-2 tokens, ~3.2 bytes per token with
# the space, about the density of real Python code (so the JSONL has the real file's size).
WORD_LETTERS = {1: 0.15, 2: 0.5, 3: 0.35}
WORD_BUFFER = 1 << 21  # words pre-generated once; every text is a slice of them
CHUNK_LINES = 4096  # lines joined per write
# Per line: JSON keys, task_id and metadata; per metadata entry at indent=2 (for the disk estimate).
LINE_OVERHEAD, METADATA_PER_LINE = 220, 170


# ---------------------------------------------------------------------------------------------
# The synthetic split (runs in a child process: it imports numpy and sentencepiece)


class Plan(NamedTuple):
    """Every number of the split; problem p holds lines starts[p]:starts[p + 1], correct ones first."""

    difficulty: Any  # per problem, numpy arrays from here on
    has_tests: Any
    prompt: Any  # tokens of the problem description
    starts: Any  # len n_problems + 1
    n_correct: Any
    line_problem: Any  # per line
    is_correct: Any
    solution: Any  # tokens of the solution

    def templated(self):
        """Tokens of every sample with BOS, template and EOS, as `tokenize_sample` counts them."""
        return self.prompt[self.line_problem] + self.solution + TEMPLATE_TOKENS


def _lognormal_below(rng, mu, sigma: float, n: int, cap: int):
    """`n` lognormal draws, redrawn until none is over `cap` (dropped, not clipped, as in the data)."""
    import numpy as np

    mu = np.broadcast_to(np.asarray(mu, dtype=float), (n,))
    x = rng.lognormal(mu, sigma)
    while (over := x > cap).any():
        x[over] = rng.lognormal(mu[over], sigma)
    return np.maximum(np.rint(x), 1).astype(np.int64)


def make_plan(lines: int, seed: int = GENERATOR_SEED) -> Plan:
    import numpy as np

    rng = np.random.default_rng(seed)
    n_problems = min(lines, max(round(REAL_PROBLEMS * lines / REAL_LINES), MIN_PROBLEMS))
    weights = rng.lognormal(0.0, PROBLEM_LINES_SIGMA, n_problems)
    counts = 1 + rng.multinomial(lines - n_problems, weights / weights.sum())
    starts = np.concatenate([[0], np.cumsum(counts)])
    p = np.array(DIFFICULTY_WEIGHTS) / sum(DIFFICULTY_WEIGHTS)
    difficulty = rng.choice(len(p), n_problems, p=p)
    has_tests = rng.random(n_problems) < HAS_TESTS_SHARE
    n_correct = rng.binomial(counts, rng.beta(*CORRECT_BETA, n_problems))
    prompt = _lognormal_below(rng, PROMPT_LOGNORMAL[0], PROMPT_LOGNORMAL[1], n_problems, PROMPT_MAX)
    line_problem = np.repeat(np.arange(n_problems), counts)
    rank = np.arange(lines) - starts[line_problem]
    shift = rng.normal(0.0, SOLUTION_PROBLEM_SIGMA, n_problems)
    mu = SOLUTION_LOGNORMAL[0] + shift[line_problem]
    solution = _lognormal_below(rng, mu, SOLUTION_LOGNORMAL[1], lines, SOLUTION_MAX)
    is_correct = rank < n_correct[line_problem]
    return Plan(difficulty, has_tests, prompt, starts, n_correct, line_problem, is_correct, solution)


def single_token_words(tokenizer: Path) -> Dict[int, List[str]]:
    """Lowercase words that the tokenizer encodes as one piece `▁word`, by number of letters."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    pattern = re.compile(r"\u2581([a-z]+)")
    words: Dict[int, List[str]] = {n: [] for n in WORD_LETTERS}
    for i in range(sp.get_piece_size()):
        m = pattern.fullmatch(sp.id_to_piece(i))
        if m and len(m[1]) in words and sp.encode(m[1]) == [i]:
            words[len(m[1])].append(m[1])
    if any(len(found) < 10 for found in words.values()):
        raise SystemExit(f"{tokenizer}: too few single-token lowercase words {words}; is it the LLaMA-2 tokenizer?")
    return words


class WordText:
    """Runs of words cut from one pre-generated buffer: `k` words are `k` tokens after a space."""

    def __init__(self, words: Dict[int, List[str]], rng, size: int = WORD_BUFFER):
        import numpy as np

        letters = rng.choice(list(WORD_LETTERS), size, p=list(WORD_LETTERS.values())).tolist()
        chosen = [words[n][int(x * len(words[n]))] for n, x in zip(letters, rng.random(size).tolist())]
        self.buffer = " ".join(chosen).encode("ascii")
        # offsets[i]: the first byte of word i; offsets[size] as if one more word followed the last
        self.offsets = np.concatenate([[0], np.cumsum([len(w) + 1 for w in chosen])])
        self.size, self.rng = size, rng

    def ranges(self, n_words) -> Tuple[Any, Any]:
        """Byte ranges of runs of `n_words[i]` words at random places in the buffer."""
        first = (self.rng.random(len(n_words)) * (self.size - n_words + 1)).astype(int)
        return self.offsets[first], self.offsets[first + n_words] - 1

    def check(self, tokenizer: Path, n_words: int = 20_000) -> None:
        """Fail unless a long run of the buffer encodes to exactly one token per word."""
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
        n_tokens = len(sp.encode(self.buffer[: self.offsets[n_words] - 1].decode()))
        if n_tokens != n_words:
            raise SystemExit(f"{tokenizer}: {n_words} synthetic words encode to {n_tokens} tokens, not one each")


def _problem_names(plan: Plan, words: Dict[int, List[str]], rng) -> List[str]:
    """Names like the real `1041_E. Tree Reconstruction`: a contest, a letter, two title words."""
    long = words[3]
    names = []
    for p, d in enumerate(plan.difficulty.tolist()):
        letter = chr(ord("A") + d - 7) if d >= 7 else "ABCDE"[p % 5]
        title = " ".join(long[int(x * len(long))].capitalize() for x in rng.random(2).tolist())
        names.append(f"{1000 + p}_{letter}. {title}")
    return names


def write_jsonl(path: Path, plan: Plan, names: List[str], text: WordText) -> None:
    """One Alpaca record per line, as `json.dumps` writes it; written in big joined chunks."""
    instr_start, instr_end = text.ranges(plan.prompt)
    sol_start, sol_end = text.ranges(plan.solution)
    buf = memoryview(text.buffer)
    heads, ids, tails = [], ({}, {}), ({}, {})
    for p, name in enumerate(names):
        instruction = bytes(buf[instr_start[p] : instr_end[p]]).decode()
        heads.append(f'{{"instruction": {json.dumps(instruction)}, "input": "", "output": "'.encode())
        meta = {"source": "code_contests", "difficulty": int(plan.difficulty[p]), "has_tests": bool(plan.has_tests[p])}
        for correct in (False, True):
            kind = "correct" if correct else "incorrect"
            ids[correct][p] = f'", "task_id": {json.dumps(name)[:-1]}_{kind}_'.encode()
            tails[correct][p] = f'", "is_correct": {json.dumps(correct)}, "metadata": {json.dumps(meta)}}}\n'.encode()
    starts, n_correct = plan.starts.tolist(), plan.n_correct.tolist()
    lines = zip(plan.line_problem.tolist(), plan.is_correct.tolist(), sol_start.tolist(), sol_end.tolist())
    parts: List[bytes] = []
    with open(path, "wb") as f:
        for line, (p, correct, a, b) in enumerate(lines):
            # solutions are numbered within their kind: correct ones first, then incorrect
            i = line - starts[p] - (0 if correct else n_correct[p])
            parts += (heads[p], buf[a:b], ids[correct][p], b"%d" % i, tails[correct][p])
            if len(parts) >= 5 * CHUNK_LINES:
                f.write(b"".join(parts))
                parts.clear()
        f.write(b"".join(parts))


def _int_list(values: Sequence[int]) -> bytes:
    """A list of ints as json.dumps(indent=2) writes it three levels deep."""
    if not values:
        return b"[]"
    return b"[\n" + b",\n".join(b"        %d" % v for v in values) + b"\n      ]"


def write_metadata(path: Path, plan: Plan, names: List[str]) -> Dict[str, Any]:
    """The v2 metadata file, byte for byte what `json.dump(..., indent=2)` writes, without building it.

    Returns its `stats`.
    """
    entries = [{}, {}]
    for p, name in enumerate(names):
        for correct in (False, True):
            entries[correct][p] = (
                f'    {{\n      "is_correct": {json.dumps(correct)},\n      "difficulty": {int(plan.difficulty[p])},\n'
                f'      "problem_id": {json.dumps(name)}\n    }}'
            ).encode()
    lines = len(plan.line_problem)
    difficulty = plan.difficulty[plan.line_problem]
    stats = {
        "total": lines,
        "correct": int(plan.is_correct.sum()),
        "incorrect": lines - int(plan.is_correct.sum()),
        "n_problems": len(names),
        "difficulty_dist": {str(d): int((difficulty == d).sum()) for d in sorted(set(difficulty.tolist()))},
    }
    starts, n_correct, solution = plan.starts.tolist(), plan.n_correct.tolist(), plan.solution.tolist()
    pairs = list(zip(plan.line_problem.tolist(), plan.is_correct.tolist()))
    with open(path, "wb") as f:
        f.write(b'{\n  "metadata": [\n')
        for at in range(0, lines, 1 << 20):
            f.write((b",\n" if at else b"") + b",\n".join(entries[c][p] for p, c in pairs[at : at + (1 << 20)]))
        f.write(b'\n  ],\n  "problem_index_map": {\n')
        for p, name in enumerate(names):
            start, mid, stop = starts[p], starts[p] + n_correct[p], starts[p + 1]
            f.write(b"" if p == 0 else b",\n")
            f.write(
                f'    {json.dumps(name)}: {{\n      "difficulty": {int(plan.difficulty[p])},\n'.encode()
                + b'      "correct_indices": '
                + _int_list(range(start, mid))
                + b",\n"
                + b'      "incorrect_indices": '
                + _int_list(range(mid, stop))
                + b",\n"
                + b'      "correct_token_lengths": '
                + _int_list(solution[start:mid])
                + b",\n"
                + b'      "incorrect_token_lengths": '
                + _int_list(solution[mid:stop])
                + b"\n    }"
            )
        f.write(b'\n  },\n  "stats": ' + json.dumps(stats, indent=2).replace("\n", "\n  ").encode() + b"\n}")
    return stats


def split_params(lines: int, tokenizer: Path) -> Dict[str, Any]:
    """What the synthetic split is a function of; the split is rewritten when any of it changes."""
    digest = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    return {"generator": GENERATOR_VERSION, "seed": GENERATOR_SEED, "lines": lines, "tokenizer_sha256": digest}


def read_split_info(data_dir: Path) -> Dict[str, Any]:
    """The split's `synthetic.json`, or {} if absent, unreadable or its files changed size since."""
    try:
        info = json.loads((data_dir / PARAMS).read_text())
        sizes = {name: (data_dir / name).stat().st_size for name in (JSONL, METADATA)}
    except (OSError, ValueError):
        return {}
    return info if info.get("bytes") == sizes else {}


def _atomic_write(path: Path, write) -> Any:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    result = write(tmp)
    os.replace(tmp, path)
    return result


def ensure_split(data_dir: Path, lines: int, tokenizer: Path, spare_bytes: int = 0) -> Dict[str, Any]:
    """Write the synthetic split into `data_dir` unless one with these parameters is there; its info.

    `spare_bytes`: what the benchmark will write beside it, counted in the disk check.
    """
    import numpy as np

    params = split_params(lines, tokenizer)
    info = read_split_info(data_dir)
    if info.get("params") == params:
        print(f"[bench] reusing {data_dir}", file=sys.stderr, flush=True)
        return info
    for name in (PARAMS, JSONL, METADATA):  # the info first: a half-written split is never reused
        remove(data_dir / name)
    data_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plan = make_plan(lines)
    words = single_token_words(tokenizer)
    rng = np.random.default_rng(GENERATOR_SEED + 1)
    text = WordText(words, rng)
    text.check(tokenizer)
    bytes_per_word = len(text.buffer) / text.size
    tokens = int(plan.solution.sum() + plan.prompt[plan.line_problem].sum())
    estimate = int(tokens * bytes_per_word) + lines * (LINE_OVERHEAD + METADATA_PER_LINE)
    check_disk(data_dir, estimate + spare_bytes)
    print(
        f"[bench] writing a synthetic split of {lines:,} lines (~{estimate / GB:.1f} GB) to {data_dir}",
        file=sys.stderr,
        flush=True,
    )
    names = _problem_names(plan, words, rng)
    _atomic_write(data_dir / JSONL, lambda tmp: write_jsonl(tmp, plan, names, text))
    stats = _atomic_write(data_dir / METADATA, lambda tmp: write_metadata(tmp, plan, names))
    info = {
        "params": params,
        "lines": lines,
        "correct": stats["correct"],
        "problems": stats["n_problems"],
        "bytes": {name: (data_dir / name).stat().st_size for name in (JSONL, METADATA)},
        "seconds": round(time.perf_counter() - start, 1),
    }
    (data_dir / PARAMS).write_text(json.dumps(info, indent=2) + "\n")
    print(f"[bench]   written in {info['seconds']:.0f} s", file=sys.stderr, flush=True)
    return info


def make_split(data_dir: Path, lines: int, tokenizer: Path, spare_bytes: int) -> Dict[str, Any]:
    code = "import sys; from pathlib import Path; from benchmarks.data import ensure_split; "
    code += "ensure_split(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))"
    cmd = [sys.executable, "-c", code, str(data_dir), str(lines), str(tokenizer), str(spare_bytes)]
    subprocess.run(cmd, cwd=PROJECT_ROOT, check=True)
    return read_split_info(data_dir)


# ---------------------------------------------------------------------------------------------
# The methods (each runs in a child process: they import torch)


def earlier_approach(data_dir: str, tokenizer: str, n_samples: int, seed: int, max_seq_len: int) -> List[dict]:
    """The samples as the project built them before: whole metadata, whole scan, eager tokenization."""
    from ref_tuning.data import tokenize_sample
    from ref_tuning.models import sheared_llama_tokenizer

    tok = sheared_llama_tokenizer(tokenizer)
    with open(Path(data_dir) / METADATA) as f:
        metadata = json.load(f)["metadata"]
    correct = [i for i, entry in enumerate(metadata) if entry["is_correct"]]
    wanted = set(random.Random(seed).sample(correct, n_samples))
    records = []
    with open(Path(data_dir) / JSONL) as f:
        for i, line in enumerate(f):
            if i in wanted:
                records.append(json.loads(line))
    samples = []
    for record in records:
        tokens, labels = tokenize_sample(tok, record)
        if len(tokens) <= max_seq_len:
            samples.append({"tokens": tokens, "labels": labels})
    return samples


def ours(data_dir: str, cache_dir: str, tokenizer: str, n_samples: int, seed: int, max_seq_len: int, packed: bool):
    from ref_tuning.data import codecontests_dataset
    from ref_tuning.models import sheared_llama_tokenizer

    return codecontests_dataset(
        sheared_llama_tokenizer(tokenizer),
        data_dir=data_dir,
        split="train",
        n_samples=n_samples,
        correct_ratio=1.0,
        seed=seed,
        max_seq_len=max_seq_len,
        cache_dir=cache_dir,
        packed=packed,
    )


def run_earlier(data_dir: str, tokenizer: str, n_samples: str, seed: str, max_seq_len: str) -> None:
    print("samples", len(earlier_approach(data_dir, tokenizer, int(n_samples), int(seed), int(max_seq_len))))


def run_ours(
    data_dir: str, cache_dir: str, tokenizer: str, n_samples: str, seed: str, max_seq_len: str, layout: str
) -> None:
    packed = layout == "packed"
    ds = ours(data_dir, cache_dir, tokenizer, int(n_samples), int(seed), int(max_seq_len), packed)
    print("packs" if packed else "samples", len(ds))


def _child(func: str, *args: Any) -> List[str]:
    code = f"import sys; from benchmarks.data import {func}; {func}(*sys.argv[1:])"
    return [sys.executable, "-c", code, *map(str, args)]


def evict(*dirs: Path) -> None:
    """Write back, then drop from the page cache, every file under `dirs`: the next read is cold."""
    os.sync()  # POSIX_FADV_DONTNEED drops clean pages only
    for d in dirs:
        for p in d.rglob("*") if d.is_dir() else []:
            if p.is_file() and not p.is_symlink():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def drop_our_files(data_dir: Path, cache_dir: Path) -> None:
    """The cache, and any sidecar our dataset code wrote beside the data: what a first run lacks."""
    remove(cache_dir)
    for p in data_dir.iterdir():
        if p.name not in (JSONL, METADATA, PARAMS):
            remove(p)


def data_methods(workdir: Path, tokenizer: Path, n_samples: int, seed: int, max_seq_len: int) -> List[Method]:
    data_dir, cache_dir = workdir / "data", workdir / "cache"
    common = (n_samples, seed, max_seq_len)
    # Nothing but the cache is written: `out` only names each method's log.
    out = {key: workdir / f"out-{key}" for key in ("earlier", "first", "cached", "packed")}

    def cold() -> None:
        evict(data_dir, cache_dir)

    def first() -> None:
        drop_our_files(data_dir, cache_dir)
        evict(data_dir, cache_dir)

    earlier_cmd = _child("run_earlier", data_dir, tokenizer, *common)
    ours_cmd = ("run_ours", data_dir, cache_dir, tokenizer, *common)
    return [
        Method("earlier approach (full scan)", out["earlier"], earlier_cmd, cold),
        Method("ours, first run", out["first"], _child(*ours_cmd, "unpacked"), first),
        Method("ours, cached", out["cached"], _child(*ours_cmd, "unpacked"), cold),
        Method("ours, packed, cached", out["packed"], _child(*ours_cmd, "packed"), cold),
    ]


def child_count(log: Path) -> str:
    """The last `samples N` or `packs N` line of a method's log, or `-`."""
    found = re.findall(r"^(?:samples|packs) \d+$", log.read_text(errors="replace") if log.is_file() else "", re.M)
    return found[-1] if found else "-"


# ---------------------------------------------------------------------------------------------
# Packing fill


def pad_layout(lengths: Sequence[int], batch_size: int, seed: int) -> Tuple[int, int]:
    """Rows and token slots of batches padded to their longest sample, in a seeded random order."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    slots = 0
    for at in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[at : at + batch_size]]
        slots += len(batch) * max(batch)
    return len(order), slots


def _checked(packs: List[List[int]], lengths: Sequence[int], max_len: int, name: str) -> List[List[int]]:
    """`packs`, unless some sample is missing or doubled or a pack is over `max_len`: the fill would lie."""
    if sorted(i for pack in packs for i in pack) != list(range(len(lengths))):
        raise SystemExit(f"{name}: the packs do not hold every sample exactly once")
    if any(sum(lengths[i] for i in pack) > max_len for pack in packs):
        raise SystemExit(f"{name}: a pack holds more than {max_len} tokens")
    return packs


def fill_report(
    data_dir: str, cache_dir: str, tokenizer: str, n_samples: str, seed: str, max_seq_len: str, batch_size: str
) -> None:
    """Print a Markdown table of the real-token share of three layouts of the kept samples."""
    from ref_tuning.packing import fill_ratio, pack_best_fit, pack_in_order

    seed, max_len, batch = int(seed), int(max_seq_len), int(batch_size)
    ds = ours(data_dir, cache_dir, tokenizer, int(n_samples), seed, max_len, packed=False)
    lengths = ds.lengths.tolist()
    total = sum(lengths)
    rows, slots = pad_layout(lengths, batch, seed)
    lines = [
        "| layout | rows | token slots | real tokens | fill |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| padded to the batch maximum (batch {batch}, shuffled) | {rows:,} | {slots:,} | {total:,} "
        f"| {total / slots:.3f} |",
    ]
    for label, pack in (("greedy packing in order", pack_in_order), ("ours: best-fit packing", pack_best_fit)):
        packs = _checked(pack(lengths, max_len), lengths, max_len, pack.__name__)
        fill = fill_ratio(lengths, packs, max_len)
        lines.append(f"| {label} at {max_len} | {len(packs):,} | {len(packs) * max_len:,} | {total:,} | {fill:.3f} |")
    rows = max(sum(n > max_len // 2 for n in lengths), -(-total // max_len))
    lines.append(
        f"| bound: the fewest rows any packing needs | {rows:,} | {rows * max_len:,} | {total:,} "
        f"| {total / (rows * max_len):.3f} |"
    )
    print("\n".join(lines))


def run_fill_report(workdir: Path, tokenizer: Path, args: argparse.Namespace) -> Tuple[str, int]:
    """The fill table from a child (it imports torch), and its exit code; its stderr goes to a log."""
    cmd = _child(
        "fill_report",
        workdir / "data",
        workdir / "cache",
        tokenizer,
        args.n_samples,
        args.seed,
        args.max_seq_len,
        args.batch_size,
    )
    log = workdir / "logs" / "fill.log"
    with open(log, "w") as err:
        proc = subprocess.run(
            cmd, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        return f"FAILED (exit {proc.returncode}); last lines of {log}:\n{tail}", proc.returncode
    return proc.stdout.strip(), 0


# ---------------------------------------------------------------------------------------------
# The subcommand


def default_tokenizer() -> Path:
    return Path(os.environ.get(TOKENIZER_ENV, DEFAULT_TOKENIZER))


def cache_estimate(lines: int, n_samples: int) -> int:
    """Room for the cache: the split's index and the drawn samples' lengths, tens of bytes each (x2 spare)."""
    return 64 * lines + 64 * n_samples


def bench_data(args: argparse.Namespace) -> int:
    workdir = args.workdir.resolve()
    tokenizer = (args.tokenizer or default_tokenizer()).resolve()
    if not tokenizer.is_file():
        raise SystemExit(
            f"{tokenizer}: the LLaMA-2 tokenizer is not there; pass --tokenizer PATH or set {TOKENIZER_ENV}"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_lines(workdir)  # free disk before anything is written
    spare = cache_estimate(args.lines, args.n_samples)
    info = make_split(workdir / "data", args.lines, tokenizer, spare)
    if args.n_samples > info["correct"]:
        raise SystemExit(
            f"--n-samples {args.n_samples}: the split has only {info['correct']} correct lines; "
            "lower it or raise --lines"
        )
    remove(workdir / "cache")
    check_disk(workdir, spare)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    methods = data_methods(workdir, tokenizer, args.n_samples, args.seed, args.max_seq_len)
    results = measure(methods, args.repeats, False, logs)
    fills, fill_rc = run_fill_report(workdir, tokenizer, args)
    sizes = info["bytes"]
    print("## data benchmark\n")
    print("\n".join(machine))
    print(
        f"- data: {workdir / 'data'}, synthetic: {JSONL} {sizes[JSONL] / GB:.2f} GB with {info['lines']:,} "
        f"lines ({info['correct']:,} correct, {info['problems']:,} problems), "
        f"{METADATA} {sizes[METADATA] / GB:.3f} GB"
    )
    print(f"- drawn: {args.n_samples:,} correct samples (seed {args.seed}), kept if <= {args.max_seq_len} tokens")
    print(f"- launcher RSS (counted in every child's peak): {launcher_rss_kib() * 1024 / GB:.3f} GB")
    print(
        f"- {args.repeats} repeats, methods interleaved; the data and the cache dropped from the page cache "
        "before every run"
    )
    print("- built (last run): " + "; ".join(f"{m.label}: {child_count(logs / f'{m.out.name}.log')}" for m in methods))
    print()
    print(table(results))
    print(f"\n### packing: real tokens among all token slots, over the samples kept by `ours`\n\n{fills}")
    return 0 if all(res.walls for res in results) and fill_rc == 0 else 1


def add_parser(sub) -> None:
    p = add_subcommand(
        sub,
        "data",
        "dataset building and packing vs the earlier full scan",
        __doc__,
        DEFAULT_WORKDIR,
        "synthetic split, cache and logs; ~5 KB a line plus the cache (default {default})",
    )
    p.add_argument(
        "--lines", type=positive, default=REAL_LINES, help=f"synthetic lines (default {REAL_LINES}: ~18.5 GB)"
    )
    p.add_argument("--n-samples", type=positive, default=200_000, help="correct samples drawn (default 200000)")
    p.add_argument("--repeats", type=positive, default=3, help="runs of each method (default 3)")
    p.add_argument(
        "--tokenizer",
        type=Path,
        help=f"the LLaMA-2 tokenizer.model (default ${TOKENIZER_ENV} or "
        f"{DEFAULT_TOKENIZER.relative_to(PROJECT_ROOT.parent)} beside the checkout)",
    )
    p.add_argument("--max-seq-len", type=positive, default=2048, help="longest sample kept, in tokens (default 2048)")
    p.add_argument(
        "--batch-size", type=positive, default=4, help="batch of the padded layout in the packing report (default 4)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the draw and of the shuffled batches (default 0)")
    p.set_defaults(func=bench_data)
