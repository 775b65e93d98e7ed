"""Training throughput: our recipe against torchtune's own `full_finetune_distributed`, without and
with packing, on the same tiny model, data and settings.

    python -m benchmarks train [--workdir DIR] [--n-samples N] [--repeats N] [--nproc N]
                                     [--batch-size N] [--tokenizer PATH]

Four methods, each a `tune run --nproc_per_node NPROC` of one epoch over the same drawn samples:

  1. `stock, unpacked`: torchtune's recipe (tests/stock_recipe.py: as shipped, but for its
     two CPU guards) on our dataset, padded to the batch maximum by `padded_collate_sft`.
  2. `ours, unpacked`: our recipe, the same.
  3. `stock, packed`: torchtune's recipe on the same samples packed by torchtune's own
     `PackedDataset` (greedy, in order; samples never split across rows).
  4. `ours, packed`: our recipe with `dataset.packed=true` (best-fit packing).

Both recipes log, per optimizer step, `tokens_per_second_per_gpu` over the tokens trained on
(response tokens: labels not masked), through `TimedDiskLogger`, torchtune's DiskLogger with the
wall-clock time of each line. Step i took the time between lines i-1 and i, and trained
`tokens_per_second_per_gpu * nproc` times that many tokens. A method's rate is its trained tokens
over its time from the end of step 1 (which pays for lazy initializations) to the end of the epoch;
start-up (imports, data, model) is left out. The non-padding rate (prompt tokens too) is that rate
times the drawn samples' ratio of all tokens to trained tokens, the same for every method: each
method sees every sample once.

The data is a synthetic split with lengths calibrated to CodeContests' (`bench data`'s generator,
in the real LLaMA-2 vocabulary), the model the demo's tiny shape with that vocabulary, fp32 on CPU.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from torchtune.training.metric_logging import DiskLogger

from benchmarks import PROJECT_ROOT, add_subcommand, machine_lines, positive, run_child
from benchmarks.data import default_tokenizer, make_split

DEFAULT_WORKDIR = PROJECT_ROOT / "storage" / "bench" / "train"
SPLIT_LINES = 20_000
METHODS = ("stock, unpacked", "ours, unpacked", "stock, packed", "ours, packed")


def torchtune_packed(tokenizer, packed: bool = True, **kwargs):
    """Our dataset of the same draw, packed the way torchtune's own builders pack: `PackedDataset`
    (in order, samples kept whole). For the stock recipe's `packed` run."""
    from torchtune.datasets import PackedDataset

    from ref_tuning.data import codecontests_dataset

    ds = codecontests_dataset(tokenizer, **kwargs)
    return PackedDataset(ds, max_seq_len=kwargs["max_seq_len"], padding_idx=tokenizer.pad_id, split_across_pack=False)


class TimedDiskLogger(DiskLogger):
    """torchtune's DiskLogger, each line with its wall-clock time: both recipes' steps timed alike."""

    def log_dict(self, payload, step: int) -> None:
        super().log_dict(dict(payload, wall=time.time()), step)


def make_assets(workdir: Path, tokenizer: Path) -> Dict[str, Path]:
    """The synthetic split and a tiny model in the LLaMA-2 vocabulary, made once and reused."""
    data = workdir / "data"
    info = make_split(data, SPLIT_LINES, tokenizer, spare_bytes=0)
    model = workdir / "model"
    if not (model / "config.json").is_file():
        code = (
            "import sys; from pathlib import Path; from ref_tuning.demo import write_tiny_checkpoint; "
            "write_tiny_checkpoint(Path(sys.argv[1]), 32000, Path(sys.argv[2]))"
        )
        subprocess.run([sys.executable, "-c", code, str(model), str(tokenizer)], cwd=PROJECT_ROOT, check=True)
    return {"data": data, "model": model, "tokenizer": tokenizer, "lines": info["lines"]}


def our_overrides(assets: Dict[str, Any], out: Path, n_samples: int, batch_size: int, packed: bool) -> List[str]:
    return [
        "model.vocab_size=32000",
        f"tokenizer.path={assets['tokenizer']}",
        f"checkpointer.checkpoint_dir={assets['model']}",
        f"dataset.data_dir={assets['data']}",
        f"dataset.n_samples={n_samples}",
        f"dataset.packed={str(packed).lower()}",
        "dataset_val=null",
        f"batch_size={batch_size}",
        "epochs=1",
        "seed=0",
        "save_every_n_steps=null",
        "lr_scheduler.num_warmup_steps=2",
        f"output_dir={out}",
        "metric_logger._component_=benchmarks.train.TimedDiskLogger",
    ]


def stock_config_file(assets: Dict[str, Any], out: Path, n_samples: int, batch_size: int, packed: bool) -> Path:
    """The stock recipe's config for the run our config with these overrides describes."""
    from omegaconf import OmegaConf

    from tests.stock_recipe import stock_config
    from ref_tuning.demo import TINY_CONFIG

    cfg = OmegaConf.merge(
        OmegaConf.load(PROJECT_ROOT / TINY_CONFIG),
        OmegaConf.from_dotlist(our_overrides(assets, out, n_samples, batch_size, False)),
    )
    stock = stock_config(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), str(out))
    stock.metric_logger._component_ = "benchmarks.train.TimedDiskLogger"
    if packed:
        stock.dataset._component_ = "benchmarks.train.torchtune_packed"
        stock.dataset.packed = True  # the stock recipe reads it to pick its collate function
    path = out.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(stock, path)
    return path


def commands(
    assets: Dict[str, Any], workdir: Path, n_samples: int, batch_size: int, nproc: int
) -> Dict[str, List[str]]:
    from ref_tuning.demo import tune_run_command

    runs = {}
    for label in METHODS:
        out = workdir / "runs" / re.sub(r"\W+", "-", label)
        packed = label.endswith(", packed")
        if label.startswith("ours"):
            runs[label] = tune_run_command(nproc, our_overrides(assets, out, n_samples, batch_size, packed))
        else:
            config = stock_config_file(assets, out, n_samples, batch_size, packed)
            runs[label] = tune_run_command(nproc, [])[:4] + ["tests/stock_recipe.py", "--config", str(config)]
    return runs


def step_log(out: Path) -> List[Tuple[float, float]]:
    """(tokens_per_second_per_gpu, wall-clock time) of every optimizer step in the run's metric log."""
    steps = []
    for log_file in sorted((out / "logs").glob("log_*.txt")):
        for line in log_file.read_text().splitlines():
            rate = re.search(r"\btokens_per_second_per_gpu:(\S+)", line)
            wall = re.search(r"\bwall:(\S+)", line)
            if line.startswith("Step ") and rate and wall:
                steps.append((float(rate.group(1)), float(wall.group(1))))
    return steps


def trained_tokens_per_second(out: Path, nproc: int) -> Tuple[float, int]:
    """Trained tokens per second per process from the end of step 1 to the end, and the step count."""
    steps = step_log(out)
    if len(steps) < 3:
        raise SystemExit(f"{out}: fewer than 3 steps logged")
    tokens = sum(rate * nproc * (wall - before) for (_, before), (rate, wall) in zip(steps, steps[1:]))
    return tokens / (steps[-1][1] - steps[0][1]) / nproc, len(steps)


def token_ratio(assets: Dict[str, Any], n_samples: int) -> Tuple[float, int]:
    """All tokens over trained tokens of the drawn samples, and how many were kept (in a child)."""
    code = (
        "import sys, json; from ref_tuning.data import codecontests_dataset; from ref_tuning.models import "
        "sheared_llama_tokenizer; ds = codecontests_dataset(sheared_llama_tokenizer(sys.argv[1]), sys.argv[2], "
        "n_samples=int(sys.argv[3]), seed=0); t = [ds[i] for i in range(len(ds))]; "
        "print(json.dumps([sum(len(s['tokens']) for s in t), sum(sum(x != -100 for x in s['labels'][1:]) for s in t), len(t)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(assets["tokenizer"]), str(assets["data"]), str(n_samples)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total, trained, kept = json.loads(out.strip().splitlines()[-1])
    return total / trained, kept


def bench_train(args: argparse.Namespace) -> int:
    workdir = args.workdir.resolve()
    tokenizer = (args.tokenizer or default_tokenizer()).resolve()
    if not tokenizer.is_file():
        raise SystemExit(f"{tokenizer}: the LLaMA-2 tokenizer is not there; pass --tokenizer PATH")
    workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_lines(workdir)
    assets = make_assets(workdir, tokenizer)
    runs = commands(assets, workdir, args.n_samples, args.batch_size, args.nproc)
    rates: Dict[str, List[float]] = {label: [] for label in METHODS}
    steps: Dict[str, int] = {}
    (workdir / "logs").mkdir(exist_ok=True)
    for r in range(1, args.repeats + 1):
        for label, cmd in runs.items():
            out = workdir / "runs" / re.sub(r"\W+", "-", label)
            subprocess.run(["rm", "-rf", str(out)], check=True)
            print(f"[bench] repeat {r}/{args.repeats}: {label} ...", file=sys.stderr, flush=True)
            wall, _, rc = run_child(cmd, workdir / "logs" / f"{out.name}.log")
            if rc != 0:
                raise SystemExit(f"{label} failed (exit {rc}); see {workdir / 'logs' / f'{out.name}.log'}")
            rate, steps[label] = trained_tokens_per_second(out, args.nproc)
            rates[label].append(rate)
            print(
                f"[bench]   {wall:.1f} s in all, {steps[label]} steps, {rate:.0f} trained tokens/s per process",
                file=sys.stderr,
                flush=True,
            )
    ratio, kept = token_ratio(assets, args.n_samples)
    median = {label: statistics.median(v) for label, v in rates.items()}
    print("## train benchmark\n")
    print("\n".join(machine))
    print(
        f"- data: {assets['data']} (synthetic, {assets['lines']:,} lines, CodeContests-like lengths); "
        f"{args.n_samples} samples drawn, {kept} kept (<= 2048 tokens); all/trained tokens {ratio:.3f}"
    )
    print(
        f"- model: the demo's tiny shape, LLaMA-2 vocabulary (32,000), fp32; {args.nproc} processes on CPU (gloo), "
        f"batch_size {args.batch_size} rows per process, one epoch; {args.repeats} repeats, medians\n"
    )
    rows = [
        "| method | steps | trained tokens/s per process | non-padding tokens/s per process | vs stock, same layout |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label in METHODS:
        peer = "stock" + label[label.index(",") :]
        vs = f"{median[label] / median[peer]:.2f}"
        rows.append(f"| {label} | {steps[label]} | {median[label]:.0f} | {median[label] * ratio:.0f} | {vs} |")
    print("\n".join(rows))
    print(f"\nours packed vs stock unpacked: {median['ours, packed'] / median['stock, unpacked']:.2f}x")
    return 0


def add_parser(sub) -> None:
    p = add_subcommand(
        sub,
        "train",
        "training throughput vs torchtune's full_finetune_distributed",
        __doc__,
        DEFAULT_WORKDIR,
        "data, model and runs (default {default})",
    )
    p.add_argument("--n-samples", type=positive, default=96, help="samples drawn (default 96)")
    p.add_argument("--repeats", type=positive, default=3, help="runs of each method (default 3)")
    p.add_argument("--nproc", type=positive, default=2, help="processes per run (default 2)")
    p.add_argument("--batch-size", type=positive, default=1, help="rows per process and step (default 1)")
    p.add_argument("--tokenizer", type=Path, help="the LLaMA-2 tokenizer.model (default: as bench data)")
    p.set_defaults(func=bench_train)
