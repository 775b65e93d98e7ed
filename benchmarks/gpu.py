"""The production config on GPUs: trained and non-padding tokens/s, MFU and peak memory per GPU of our recipe's
variants, against torchtune's own recipe on the same samples.

    python -m benchmarks gpu [--workdir DIR] [--methods KEYS] [--steps N] [--nproc N] [--peak-tflops T] [--tiny]

It writes once a random checkpoint shaped like Sheared-LLaMA-2.7B (bf16, no download) and a synthetic split
(benchmarks/synthetic.py); then each method is a `torchrun --nproc_per_node N` run (N: every GPU) of
configs/ref_tuning.yaml with `epochs=1 max_steps_per_epoch=STEPS gradient_accumulation_steps=1 dataset_val=null
save_every_n_steps=null` and the production batch of 4 x 2048 tokens per GPU, every method on the same samples:

  production     ours as configured: bf16_mixed, activation checkpointing (AC) on, unpacked, compiled
  packed         ours with dataset.packed=true (best fit)
  no-ac          ours with enable_activation_checkpointing=false
  eager          ours with compile=false
  bf16           ours in pure bf16, eager: torchtune's recipe's settings
  stock          torchtune's full_finetune_distributed (benchmarks/stock_recipe.py): bf16, AC on, unpacked, eager
  stock-packed   the same on the same samples packed by torchtune's own in-order PackedDataset

Rates are the recipes' own per-step logs, medians past the first quarter of the steps (warm-up, compilation);
peaks are the largest. torchtune's recipe logs no non-padding rate or MFU: those (`*`) are derived from our run
of the same layout (its ratio of non-padding to trained tokens; MFU in proportion). `x stock`: a row's trained
rate over the stock row's of the same layout. `--tiny` runs it all on CPU with the demo's tiny model
(configs/tiny_cpu.yaml), batch 1: the pipeline's test, not a measurement. The launcher never imports torch.
"""

import math
import shutil
import statistics
import subprocess
from typing import NamedTuple

import benchmarks as bench

HELP = "the production config on GPUs: its variants vs torchtune's recipe"


class Spec(NamedTuple):
    recipe: str = "ours"
    precision: str = "bf16_mixed"
    ac: bool = True
    packed: bool = False
    compile: bool = True

    @property
    def label(self) -> str:
        who = "ours" if self.recipe == "ours" else "torchtune's recipe"
        layout, mode = "packed" if self.packed else "unpacked", "compiled" if self.compile else "eager"
        return f"{who}, {self.precision}, AC {'on' if self.ac else 'off'}, {layout}, {mode}"

    def overrides(self) -> list[str]:
        flags = {"enable_activation_checkpointing": self.ac, "dataset.packed": self.packed, "compile": self.compile}
        return [f"precision={self.precision}"] + [f"{key}={str(on).lower()}" for key, on in flags.items()]


SPECS = {
    "production": Spec(),
    "packed": Spec(packed=True),
    "no-ac": Spec(ac=False),
    "eager": Spec(compile=False),
    "bf16": Spec(precision="bf16", compile=False),
    "stock": Spec("stock", "bf16", compile=False),
    "stock-packed": Spec("stock", "bf16", packed=True, compile=False),
}
KEYS = list(SPECS)


class Row(NamedTuple):
    spec: Spec
    steps: int
    trained: float  # tokens/s per GPU, median
    nonpad: float | None
    mfu: float | None
    alloc: float | None  # GiB, the largest peak
    reserved: float | None
    derived: bool = False  # nonpad and MFU derived from ours (torchtune's rows)


def summarize(spec: Spec, steps: list[dict[str, float]]) -> Row:
    """Medians over the steps past the first quarter (warm-up, compilation); the largest memory peaks of all."""

    def median(key):
        values = [s[key] for s in steps[len(steps) // 4 :] if key in s]
        return statistics.median(values) if values else None

    rates = [median(key) for key in ("tokens_per_second_per_gpu", "all_tokens_per_second_per_gpu", "mfu")]
    peaks = [max((s[k] for s in steps if k in s), default=None) for k in ("peak_memory_alloc", "peak_memory_reserved")]
    return Row(spec, len(steps), *rates, *peaks)


def derive(rows: dict[str, Row]) -> None:
    """Non-padding rate and MFU of torchtune's rows, from our run of the same layout (the same samples)."""
    for key, row in rows.items():
        s = row.spec
        peers = [r for r in rows.values() if r.spec.recipe == "ours" and r.spec.packed == s.packed and r.nonpad]
        if s.recipe == "stock" and peers:
            peer = max(peers, key=lambda r: (r.spec.precision == s.precision, r.spec.compile == s.compile))
            nonpad = row.trained * peer.nonpad / peer.trained
            mfu = peer.mfu * nonpad / peer.nonpad if peer.mfu is not None else None
            rows[key] = row._replace(nonpad=nonpad, mfu=mfu, derived=True)


def table(rows: dict[str, Row | None]) -> str:
    def num(value, fmt: str, star: bool = False) -> str:
        return "-" if value is None else format(value, fmt) + "*" * star

    columns = ["method", "steps", "trained tok/s/GPU", "non-padding tok/s/GPU", "MFU", "peak alloc / reserved GiB"]
    lines = ["| " + " | ".join(columns) + " | x stock |", "| --- |" + " ---: |" * 6]
    stock = {r.spec.packed: r.trained for r in rows.values() if r and r.spec.recipe == "stock"}
    for key, row in rows.items():
        if row is None:
            lines.append(f"| {SPECS[key].label} | FAILED | | | | | |")
            continue
        vs = row.trained / stock[row.spec.packed] if row.spec.packed in stock else None
        cells = [row.spec.label, row.steps, num(row.trained, ",.0f"), num(row.nonpad, ",.0f", row.derived)]
        cells += [num(row.mfu, ".1%", row.derived), f"{num(row.alloc, '.1f')} / {num(row.reserved, '.1f')}"]
        lines.append("| " + " | ".join(map(str, [*cells, num(vs, ".2f")])) + " |")
    return "\n".join(lines)


def gpus() -> list[str]:
    """The names of the GPUs nvidia-smi lists (the launcher does not import torch)."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True, check=False).stdout.splitlines()


def main(args) -> int:
    tokenizer, logs, names = bench.tokenizer_path(args.tokenizer), args.workdir / "logs", gpus()
    nproc = args.nproc or (2 if args.tiny else len(names))
    if nproc < 1:
        raise SystemExit("nvidia-smi lists no GPU: pass --tiny for the pipeline on CPU")
    steps, batch = args.steps or (4 if args.tiny else 20), 1 if args.tiny else 4
    dims = bench.TINY_DIMS if args.tiny else bench.FULL_DIMS
    n_samples = math.ceil(2.2 * steps * batch * nproc) + 8  # ~80% fit in 2048 tokens; a packed row holds ~1.35
    data, model = args.workdir / "data", args.workdir / ("model-tiny" if args.tiny else "model")
    bench.make_split(data, max(2000, 4 * n_samples), tokenizer)
    bench.make_checkpoint(model, dims, "float32" if args.tiny else "bfloat16")
    config = "configs/tiny_cpu.yaml" if args.tiny else "configs/ref_tuning.yaml"
    rows: dict[str, Row | None] = {}
    for key in args.methods:
        spec, out = SPECS[key], args.workdir / "runs" / key
        overrides = [f"output_dir={out}", f"tokenizer.path={tokenizer}", f"checkpointer.checkpoint_dir={model}"]
        overrides += [f"dataset.data_dir={data}", f"dataset.n_samples={n_samples}", "dataset_val=null", "epochs=1"]
        overrides += [f"max_steps_per_epoch={steps}", "save_every_n_steps=null", "gradient_accumulation_steps=1"]
        overrides += [f"batch_size={batch}", *spec.overrides()]
        overrides += ["model.vocab_size=32000"] if args.tiny else []  # configs/tiny_cpu.yaml's tokenizer has 1,024
        overrides += [f"peak_tflops={args.peak_tflops}"] if args.peak_tflops else []
        bench.remove(out)
        bench.say(f"{key}: {spec.label} ...")
        cmd = bench.recipe_command(spec.recipe, nproc, config, overrides, out.with_suffix(".yaml"))
        wall, _, rc = bench.run_child(cmd, logs / f"{key}.log")
        logged = bench.metric_steps(out) if (out / "logs").is_dir() else []
        rows[key] = summarize(spec, logged) if rc == 0 and logged else None
        failed = "" if rows[key] else f", FAILED:\n{bench.tail(logs / f'{key}.log')}"
        bench.say(f"  {wall:.0f} s, {len(logged)} steps{failed}")
        bench.remove(out)  # its checkpoint_final: 5.4 GB at full size
    measured = {key: row for key, row in rows.items() if row}
    derive(measured)
    rows.update(measured)
    print("## gpu benchmark\n\n" + "\n".join(bench.machine_lines(args.workdir)))
    what = "the demo's tiny model on CPU" if args.tiny else f"{names[0] if names else 'GPU'}; random Sheared-LLaMA-2.7B"
    print(f"- {nproc} processes, {what} ({bench.n_params(dims):,} parameters); {n_samples} samples drawn")
    print(f"- batch {batch} x 2048 tokens per process, {steps} steps, medians of the last {steps - steps // 4}\n")
    print(table(rows) + "\n\n`*` derived from ours on the same samples. Peaks: torch's CUDA allocator's.")
    return 0 if all(rows.values()) else 1


def add_arguments(p) -> None:
    bench.add_tokenizer(p)
    p.add_argument("--steps", type=bench.positive, help="optimizer steps per run (default 20; 4 with --tiny)")
    p.add_argument("--nproc", type=bench.positive, help="processes (GPUs) per run (default: every GPU; 2 with --tiny)")
    p.add_argument("--peak-tflops", type=float, help="per GPU, dense bf16, for MFU (default: the recipe's own table)")
    p.add_argument("--tiny", action="store_true", help="the demo's tiny model on CPU (gloo): the pipeline's test")
