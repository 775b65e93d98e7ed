"""Building the training set from a processed CodeContests split: HF `datasets` (what torchtune's dataset builders
read files with) against ours; then how full the rows of each layout are.

    python -m benchmarks data [--workdir DIR] [--lines N] [--n-samples N] [--repeats N] [--methods KEYS]

Each method draws `--n-samples` correct solutions of a synthetic split the size of the real one
(benchmarks/synthetic.py), tokenizes them with the Alpaca template and keeps those of at most 2048 tokens:

  hf-first      `datasets.load_dataset("json", data_files=train.jsonl)`, as torchtune's
                `instruct_dataset(source="json")` calls it, its Arrow cache deleted first; the draw from the
                loaded table; `ref_tuning.data.tokenize_sample` on the drawn samples
  hf-cached     the same, its Arrow cache in place
  ours-first    `ref_tuning.data.codecontests_dataset`, its caches deleted first (index built, samples measured)
  ours-cached   the same, cached
  ours-packed   the same with `packed=True`

Before every run the data and caches are dropped from the page cache: every method reads cold. The fill table
gives, over the samples ours kept, the share of real tokens among all token slots: padded to the batch maximum
(batch 4, shuffled); packed in order as torchtune's `PackedDataset` packs; packed best-fit as ours; and a bound
no packer that keeps samples whole can beat (a sample longer than half a row needs a row of its own).
"""

import os
import random
import re
from pathlib import Path

import benchmarks as bench
from benchmarks import GB
from benchmarks.synthetic import JSONL, METADATA, PARAMS, REAL_LINES

HELP = "building the training set: HF datasets vs ours; how full the rows are"
KEYS = ["hf-first", "hf-cached", "ours-first", "ours-cached", "ours-packed"]
MAX_SEQ_LEN, BATCH_SIZE, SEED = 2048, 4, 0


def hf_datasets(data_dir: str, cache_dir: str, tokenizer: str, n_samples: str) -> None:
    import datasets

    from ref_tuning.data import tokenize_sample
    from ref_tuning.models import sheared_llama_tokenizer

    rows = datasets.load_dataset("json", data_files=str(Path(data_dir) / JSONL), split="train", cache_dir=cache_dir)
    correct = [i for i, c in enumerate(rows["is_correct"]) if c]
    drawn = rows.select(sorted(random.Random(SEED).sample(correct, int(n_samples))))
    tok = sheared_llama_tokenizer(tokenizer)
    print("samples", sum(len(tokenize_sample(tok, record)[0]) <= MAX_SEQ_LEN for record in drawn))


def ours(data_dir: str, cache_dir: str, tokenizer: str, n_samples: str, layout: str = "unpacked"):
    from ref_tuning.data import codecontests_dataset
    from ref_tuning.models import sheared_llama_tokenizer

    tok, packed = sheared_llama_tokenizer(tokenizer), layout == "packed"
    ds = codecontests_dataset(
        tok, data_dir, n_samples=int(n_samples), seed=SEED, max_seq_len=MAX_SEQ_LEN, cache_dir=cache_dir, packed=packed
    )
    print("packs" if packed else "samples", len(ds))
    return ds


def fills(data_dir: str, cache_dir: str, tokenizer: str, n_samples: str) -> None:
    print(fill_table(ours(data_dir, cache_dir, tokenizer, n_samples).lengths.tolist()))


def pad_layout(lengths: list[int], batch_size: int, seed: int) -> tuple[int, int]:
    """Rows and token slots of batches padded to their longest sample, in a seeded random order."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches = [[lengths[i] for i in order[at : at + batch_size]] for at in range(0, len(order), batch_size)]
    return len(order), sum(len(batch) * max(batch) for batch in batches)


def fill_table(lengths: list[int]) -> str:
    from ref_tuning.packing import pack_best_fit, pack_in_order

    total, (rows, slots) = sum(lengths), pad_layout(lengths, BATCH_SIZE, SEED)
    layouts = [(f"padded to the batch maximum (batch {BATCH_SIZE}, shuffled)", rows, slots)]
    for label, pack in (("torchtune's in-order packing", pack_in_order), ("ours: best-fit packing", pack_best_fit)):
        n = len(pack(lengths, MAX_SEQ_LEN))
        layouts.append((f"{label} at {MAX_SEQ_LEN}", n, n * MAX_SEQ_LEN))
    n = max(sum(x > MAX_SEQ_LEN // 2 for x in lengths), -(-total // MAX_SEQ_LEN))
    layouts.append(("bound: the fewest rows any packing needs", n, n * MAX_SEQ_LEN))
    lines = [f"| layout of the {len(lengths):,} kept samples | rows | token slots | fill |", "| --- |" + " ---: |" * 3]
    return "\n".join(lines + [f"| {label} | {n:,} | {s:,} | {total / s:.3f} |" for label, n, s in layouts])


def evict(*dirs: Path) -> None:
    """Write back, then drop from the page cache, every file under `dirs`: the next read is cold."""
    os.sync()  # POSIX_FADV_DONTNEED drops clean pages only
    for p in (p for d in dirs if d.is_dir() for p in d.rglob("*")):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def methods(workdir: Path, tokenizer: Path, n_samples: int, keys: list[str]) -> list[bench.Method]:
    data, ours_cache, hf_cache = workdir / "data", workdir / "cache", workdir / "hf-cache"

    def cold(drop: Path | None = None):
        def before() -> None:  # a first run lacks its cache and anything it wrote beside the data
            if drop is not None:
                bench.remove(drop)
                for p in data.iterdir():
                    if p.name not in (JSONL, METADATA, PARAMS):
                        bench.remove(p)
            evict(data, ours_cache, hf_cache)

        return before

    hf = bench.python_child("benchmarks.data", "hf_datasets", data, hf_cache, tokenizer, n_samples)
    ours_cmd = bench.python_child("benchmarks.data", "ours", data, ours_cache, tokenizer, n_samples)
    found = [
        bench.Method("hf-first", "HF datasets, first run (JSON to Arrow)", hf, before=cold(hf_cache)),
        bench.Method("hf-cached", "HF datasets, cached", hf, before=cold()),
        bench.Method("ours-first", "ours, first run (index built)", ours_cmd, before=cold(ours_cache)),
        bench.Method("ours-cached", "ours, cached", ours_cmd, before=cold()),
        bench.Method("ours-packed", "ours, packed, cached", ours_cmd + ["packed"], before=cold()),
    ]
    return [m for m in found if m.key in keys]


def built(log: Path) -> str:
    """What a method's child built: its last `samples N` or `packs N` line."""
    found = re.findall(r"^(?:samples|packs) \d+$", log.read_text(errors="replace"), re.MULTILINE)
    return found[-1] if found else "-"


def main(args) -> int:
    tokenizer, logs, data = bench.tokenizer_path(args.tokenizer), args.workdir / "logs", args.workdir / "data"
    bench.make_split(data, args.lines, tokenizer)
    chosen = methods(args.workdir, tokenizer, args.n_samples, args.methods)
    results = bench.measure(chosen, args.repeats, logs)
    bench.say("the fill table ...")
    cmd = bench.python_child("benchmarks.data", "fills", data, args.workdir / "cache", tokenizer, args.n_samples)
    if bench.run_child(cmd, logs / "fills.log")[2] != 0:
        raise SystemExit(f"the fill table failed; {logs / 'fills.log'}:\n{bench.tail(logs / 'fills.log')}")
    print("## data benchmark\n\n" + "\n".join(bench.machine_lines(args.workdir)))
    print(f"- data: {data}, synthetic, {args.lines:,} lines, {JSONL} {(data / JSONL).stat().st_size / GB:.2f} GB")
    print(f"- drawn: {args.n_samples:,} correct samples, kept if <= {MAX_SEQ_LEN} tokens; {args.repeats} repeats")
    print("- built (last run): " + "; ".join(f"{m.label}: {built(logs / f'{m.key}.log')}" for m in chosen) + "\n")
    print(bench.table(results) + "\n")
    print("\n".join(line for line in (logs / "fills.log").read_text().splitlines() if line.startswith("|")))
    return 0 if all(res.walls for res in results) else 1


def add_arguments(p) -> None:
    bench.add_tokenizer(p)
    p.add_argument("--lines", type=bench.positive, default=REAL_LINES, help="synthetic lines (default 3.7M: 18.6 GB)")
    p.add_argument("--n-samples", type=bench.positive, default=200_000, help="correct samples drawn (default 200000)")
    p.add_argument("--repeats", type=bench.positive, default=3, help="runs of each method (default 3)")
