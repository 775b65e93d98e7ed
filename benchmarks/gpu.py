"""The production config on GPUs: trained and non-padding tokens/s, MFU and peak memory per GPU of our recipe's
variants, against torchtune's own recipe on the same samples and a bare bf16 matmul on the same GPU.

    python -m benchmarks gpu [--workdir DIR] [--methods KEYS] [--steps N] [--nproc N] [--peak-tflops T]
                             [--json FILE] [--tiny]

It writes once a random checkpoint shaped like Sheared-LLaMA-2.7B (bf16, no download) and a synthetic split
(benchmarks/synthetic.py); then each method is a `torchrun --nproc_per_node N` run (N: every GPU) of
configs/ref_tuning.yaml as shipped (its batch of 4 rows x 2048 tokens per GPU and 5 micro-batches a step) with
`epochs=1 max_steps_per_epoch=STEPS log_every_n_steps=2 dataset_val=null save_every_n_steps=null`, every method
on the same samples:

  production     ours as shipped: bf16_mixed, packed, activation checkpointing (AC) off, compiled
  ac-on          the same with enable_activation_checkpointing=true (40 GB cards)
  unpacked       the same with dataset.packed=false (batch_size counts samples, padded to the longest)
  eager          the same with compile=false
  stock          torchtune's full_finetune_distributed (benchmarks/stock_recipe.py) as torchtune sets it: bf16,
                 AC on, unpacked, eager
  stock-packed   the same on the same samples packed by torchtune's own in-order PackedDataset
  batch-6        (not run by default) ours with batch_size=6: the next micro-batch that may fill an 80 GB card

Before the runs, a bare bf16 matmul of the model's two main shapes ([tokens x 2560] x [2560 x 6912] and
[tokens x 2560] x [2560 x 2560], tokens = 4 x 2048) is timed on one GPU: what the card delivers, to read MFU
against. Rates are the recipes' own logs, medians past the first quarter of the reads (warm-up, compilation);
peaks are the largest. Every run logs torch.compile's graph breaks and recompilations (TORCH_LOGS), counted in
its log. torchtune's recipe logs no non-padding rate or MFU: those (`*`) are derived from our run of the same
layout (its ratio of non-padding to trained tokens; MFU in proportion). `x stock`: a row's trained rate over
the stock row's of the same layout. It prints the table and writes every number as JSON (--json; default
WORKDIR/gpu.json). `--tiny` runs it all on CPU with the demo's tiny model (configs/tiny_cpu.yaml), batch 1: the
pipeline's test, not a measurement. The launcher never imports torch.
"""

import json
import math
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

from omegaconf import OmegaConf

import benchmarks as bench

HELP = "the production config on GPUs: its variants vs torchtune's recipe and a bare matmul"
READ_EVERY = 2  # log_every_n_steps of the runs: a read every 2 steps of 5 micro-batches
TORCH_LOGS = "graph_breaks,recompiles"
COUNTED = {"graph_breaks": "Graph break", "recompiles": "Recompiling function"}  # how TORCH_LOGS words them


class Spec(NamedTuple):
    recipe: str = "ours"
    precision: str = "bf16_mixed"
    ac: bool = False
    packed: bool = True
    compile: bool = True
    batch: int | None = None  # batch_size; None: the config's

    @property
    def label(self) -> str:
        who = "ours" if self.recipe == "ours" else "torchtune's recipe"
        layout, mode = "packed" if self.packed else "unpacked", "compiled" if self.compile else "eager"
        batch = f", batch {self.batch}" if self.batch else ""
        return f"{who}, {self.precision}, AC {'on' if self.ac else 'off'}, {layout}, {mode}{batch}"

    def overrides(self) -> list[str]:
        flags = {"enable_activation_checkpointing": self.ac, "dataset.packed": self.packed, "compile": self.compile}
        batch = [f"batch_size={self.batch}"] if self.batch else []
        return [f"precision={self.precision}"] + [f"{key}={str(on).lower()}" for key, on in flags.items()] + batch


SPECS = {
    "production": Spec(),
    "ac-on": Spec(ac=True),
    "unpacked": Spec(packed=False),
    "eager": Spec(compile=False),
    "stock": Spec("stock", "bf16", ac=True, packed=False, compile=False),
    "stock-packed": Spec("stock", "bf16", ac=True, compile=False),
    "batch-6": Spec(batch=6),
}
KEYS = list(SPECS)
DEFAULT_KEYS = [key for key in KEYS if key != "batch-6"]


class Row(NamedTuple):
    spec: Spec
    steps: int
    trained: float  # tokens/s per GPU, median
    nonpad: float | None
    mfu: float | None
    alloc: float | None  # GiB, the largest peak
    reserved: float | None
    derived: bool = False  # nonpad and MFU derived from ours (torchtune's rows)
    graph_breaks: int | None = None  # counted in the run's log (every rank's)
    recompiles: int | None = None


def summarize(spec: Spec, steps: list[dict[str, float]], log: str = "") -> Row:
    """Medians over the reads past the first quarter (warm-up, compilation); the largest memory peaks of all;
    graph breaks and recompilations as torch.compile logged them in `log`."""

    def median(key):
        values = [s[key] for s in steps[len(steps) // 4 :] if key in s]
        return statistics.median(values) if values else None

    rates = [median(key) for key in ("tokens_per_second_per_gpu", "all_tokens_per_second_per_gpu", "mfu")]
    peaks = [max((s[k] for s in steps if k in s), default=None) for k in ("peak_memory_alloc", "peak_memory_reserved")]
    counts = [log.count(words) for words in COUNTED.values()] if spec.compile else [None, None]
    return Row(spec, int(max(s["step"] for s in steps)), *rates, *peaks, False, *counts)


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
    columns += ["graph breaks / recompiles", "x stock"]
    lines = ["| " + " | ".join(columns) + " |", "| --- |" + " ---: |" * 7]
    stock = {r.spec.packed: r.trained for r in rows.values() if r and r.spec.recipe == "stock"}
    for key, row in rows.items():
        if row is None:
            lines.append(f"| {SPECS[key].label} | FAILED | | | | | | |")
            continue
        vs = row.trained / stock[row.spec.packed] if row.spec.packed in stock else None
        cells = [row.spec.label, row.steps, num(row.trained, ",.0f"), num(row.nonpad, ",.0f", row.derived)]
        cells += [num(row.mfu, ".1%", row.derived), f"{num(row.alloc, '.1f')} / {num(row.reserved, '.1f')}"]
        cells += [f"{num(row.graph_breaks, 'd')} / {num(row.recompiles, 'd')}", num(vs, ".2f")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def entries(rows: dict[str, Row | None]) -> list[dict]:
    """One JSON entry per method; the production default's marked."""
    found = []
    for key, row in rows.items():
        entry = {"key": key, "label": SPECS[key].label, "production": key == "production", "failed": row is None}
        if row is not None:
            entry |= {"mfu": row.mfu, "tokens_per_s": row.trained, "all_tokens_per_s": row.nonpad}
            entry |= {"peak_alloc_gib": row.alloc, "peak_reserved_gib": row.reserved, "steps": row.steps}
            entry |= {"derived": row.derived, "graph_breaks": row.graph_breaks, "recompiles": row.recompiles}
        found.append(entry)
    return found


def gpus() -> list[str]:
    """The names of the GPUs nvidia-smi lists (the launcher does not import torch)."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True, check=False).stdout.splitlines()


def matmul_tflops(device: str, tokens: str, dim: str, *widths: str) -> None:
    """Prints the achieved TFLOP/s of a bf16 matmul [tokens x dim] x [dim x width] per width, as JSON: the median
    of `torch.utils.benchmark`'s timed blocks (it synchronizes CUDA) over half a second (in a child: it imports
    torch)."""
    import torch
    from torch.utils.benchmark import Timer

    m, k = int(tokens), int(dim)
    found = {}
    for n in map(int, widths):
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
        seconds = Timer("a @ b", globals={"a": a, "b": b}).blocked_autorange(min_run_time=0.5).median
        found[f"{m}x{k}x{n}"] = 2 * m * k * n / seconds / 1e12
    print(json.dumps(found))


def matmul_line(found: dict[str, float], peak: float | None) -> str:
    """`found`: TFLOP/s by shape, "MxKxN"."""

    def tflops(value: float) -> str:
        return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"  # a GPU's hundreds, or the tiny CPU run's

    shapes = [f"[{m} x {k}] x [{k} x {n}] {tflops(found[shape])}" for shape in found for m, k, n in [shape.split("x")]]
    of_peak = f" (dense bf16 peak {peak:g})" if peak else ""
    return f"- bare bf16 matmul on this device, TFLOP/s: {'; '.join(shapes)}{of_peak}"


def main(args) -> int:
    tokenizer, logs, names = bench.tokenizer_path(args.tokenizer), args.workdir / "logs", gpus()
    nproc = args.nproc or (2 if args.tiny else len(names))
    if nproc < 1:
        raise SystemExit("nvidia-smi lists no GPU: pass --tiny for the pipeline on CPU")
    config = "configs/tiny_cpu.yaml" if args.tiny else "configs/ref_tuning.yaml"
    shipped = OmegaConf.load(bench.PROJECT_ROOT / config)
    steps, batch = args.steps or (4 if args.tiny else 12), 1 if args.tiny else shipped.batch_size
    accumulation = shipped.gradient_accumulation_steps
    dims = bench.TINY_DIMS if args.tiny else bench.FULL_DIMS
    # Rows (or samples) a run takes; ~80% of the samples drawn fit in 2048 tokens, a packed row holds ~1.7.
    largest = max(SPECS[key].batch or batch for key in args.methods)
    n_samples = math.ceil(2.4 * steps * accumulation * largest * nproc) + 8
    data, model = args.workdir / "data", args.workdir / ("model-tiny" if args.tiny else "model")
    bench.make_split(data, max(2000, 4 * n_samples), tokenizer)
    bench.make_checkpoint(model, dims, "float32" if args.tiny else "bfloat16")
    device, tokens = ("cpu", 2048) if args.tiny else ("cuda", batch * 2048)
    widths = (dims["intermediate_dim"], dims["embed_dim"])
    matmul = bench.python_child("benchmarks.gpu", "matmul_tflops", device, tokens, dims["embed_dim"], *widths)
    bench.say("bare bf16 matmuls ...")
    found = json.loads(subprocess.run(matmul, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    rows: dict[str, Row | None] = {}
    started = time.perf_counter()
    for key in args.methods:
        spec, out = SPECS[key], args.workdir / "runs" / key
        overrides = [f"output_dir={out}", f"tokenizer.path={tokenizer}", f"checkpointer.checkpoint_dir={model}"]
        overrides += [f"dataset.data_dir={data}", f"dataset.n_samples={n_samples}", "dataset_val=null", "epochs=1"]
        overrides += [f"max_steps_per_epoch={steps}", "save_every_n_steps=null", f"log_every_n_steps={READ_EVERY}"]
        overrides += [f"batch_size={batch}", *spec.overrides()]
        overrides += ["model.vocab_size=32000"] if args.tiny else []  # configs/tiny_cpu.yaml's tokenizer has 1,024
        overrides += [f"peak_tflops={args.peak_tflops}"] if args.peak_tflops else []
        bench.remove(out)
        bench.say(f"{key}: {spec.label} ...")
        cmd = bench.recipe_command(spec.recipe, nproc, config, overrides, out.with_suffix(".yaml"))
        log = logs / f"{key}.log"
        wall, _, rc = bench.run_child(cmd, log, env={"TORCH_LOGS": TORCH_LOGS})
        logged = bench.metric_steps(out) if (out / "logs").is_dir() else []
        rows[key] = summarize(spec, logged, log.read_text(errors="replace")) if rc == 0 and logged else None
        failed = "" if rows[key] else f", FAILED:\n{bench.tail(log)}"
        bench.say(f"  {wall:.0f} s, {len(logged)} reads{failed}")
        bench.remove(out)  # its checkpoint_final: 5.4 GB at full size
    measured = {key: row for key, row in rows.items() if row}
    derive(measured)
    rows.update(measured)
    what = "the demo's tiny model on CPU" if args.tiny else f"{names[0] if names else 'GPU'}; random Sheared-LLaMA-2.7B"
    head = [f"- {nproc} processes, {what} ({bench.n_params(dims):,} parameters); {n_samples} samples drawn"]
    head += [f"- batch {batch} x 2048 tokens per process, {accumulation} micro-batches a step, {steps} steps; "]
    head[-1] += f"metrics read every {READ_EVERY} steps, medians past the first quarter of the reads"
    head += [matmul_line(found, args.peak_tflops or (None if args.tiny else 989.0))]
    head += [f"- the runs took {time.perf_counter() - started:.0f} s"]
    print("## gpu benchmark\n\n" + "\n".join(bench.machine_lines(args.workdir) + head) + "\n")
    print(table(rows) + "\n\n`*` derived from ours on the same samples. Peaks: torch's CUDA allocator's.")
    result = {"device": names[0] if names else "cpu", "nproc": nproc, "steps": steps, "batch": batch}
    result |= {"accumulation": accumulation, "matmul_tflops": found, "methods": entries(rows)}
    path = args.json or args.workdir / "gpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    bench.say(f"numbers in {path}")
    return 0 if all(rows.values()) else 1


def add_arguments(p) -> None:
    bench.add_tokenizer(p)
    p.add_argument("--steps", type=bench.positive, help="optimizer steps per run (default 12; 4 with --tiny)")
    p.add_argument("--nproc", type=bench.positive, help="processes (GPUs) per run (default: every GPU; 2 with --tiny)")
    p.add_argument("--peak-tflops", type=float, help="per GPU, dense bf16, for MFU (default: the recipe's own table)")
    p.add_argument("--json", type=Path, help="where to write every number (default WORKDIR/gpu.json)")
    p.add_argument("--tiny", action="store_true", help="the demo's tiny model on CPU (gloo): the pipeline's test")
