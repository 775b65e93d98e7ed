"""Training precision: the same fine-tuning in fp32, bf16_mixed (the production default) and pure bf16.

    python -m benchmarks precision [--steps N] [--workdir DIR] [--tokenizer PATH]

Each mode is one `tune run --nproc_per_node 2 recipes/ref_finetune.py --config configs/tiny_cpu.yaml`
child with `precision=MODE` and everything else equal: the same base model, the same drawn samples in
the same order (seed 0), the production schedule's shape (AdamW lr 2e-5, betas 0.9/0.95, weight decay
0.01, cosine with 5% linear warmup, gradient clipping at 1.0), batch 1 row per process, `--steps`
optimizer steps, `output_dtype=fp32` (checkpoint_final holds the weights exactly as trained).

  - `fp32`: fp32 weights, AdamW state and matmuls.
  - `bf16_mixed`: fp32 master weights and AdamW state; FSDP2 gathers bf16 copies for bf16 matmuls and
    reduces the gradients in fp32 (MixedPrecisionPolicy).
  - `bf16`: weights, gradients and AdamW state all bf16. A bf16 weight w changes only when the update
    is over half its spacing, |w| * 2^-8 or so: at lr 2e-5, no weight above ~5e-3 in magnitude moves.

The data is a synthetic split like `bench train`'s (`bench data`'s generator, CodeContests-like
lengths, the real LLaMA-2 tokenizer): WORKDIR/data (20,000 lines) to train on, and a held-out
split written separately, WORKDIR/data_val (4,000 lines, its own problems and lines), to validate on.
Rows are 512 tokens (`tokenizer.max_seq_len=512`, `dataset.long_samples=truncate`: longer samples
are cut, those whose prompt alone fills the row are dropped).

The base model: a tiny LLaMA-2-family model in the LLaMA-2 vocabulary (32,000; width 64, 2 layers,
4.2M parameters, most of them the embedding and the output layer), written by
`ref_tuning.demo.write_tiny_checkpoint` with that shape and then pretrained by the recipe for
PRETRAIN_STEPS steps in fp32 at lr 3e-3 on other samples of the training split (seed 1). From random
weights, lr 2e-5 barely moves a model this small (60 steps: the validation loss falls by ~0.002 of
10.5); a pretrained model tuned at a small learning rate is also the production situation.

What is reported, per mode:

  - `unchanged by step k`: the share of all weight elements that optimizer step k left bit-identical,
    from the step checkpoints k-1 and k (`save_every_n_steps=1`; the launcher deletes those it does
    not need while the run goes). k: 2 (step 1's learning rate is 0 under torchtune's linear warmup,
    so step 1 changes no weight in any mode), the middle step and the last. The learning rate of step
    k is in the header: the last step's is ~1e-8, below half the fp32 spacing of weights above ~0.2
    (most of the embedding, initialized N(0, 1)), so fp32 too leaves about half the weights unchanged there.
  - `val loss before` / `end`: mean cross-entropy over the response tokens of the held-out samples,
    computed the same way for every model (fp32, `ref_tuning.scoring.token_losses`), of the base
    model and of each mode's checkpoint_final; `improvement` is before - end, and `vs fp32` its
    difference from fp32's improvement, in percent of it. A line below the table gives the base
    model's loss with its weights rounded to bf16, where pure bf16 starts.
  - `update cos` / `update norm`: the total update, checkpoint_final minus the initial weights (the
    base model as the run held it: cast to bf16 for `bf16`), all weight tensors flattened into one
    vector, against fp32's: cosine and norm ratio (1.0 for fp32 itself).

On the 2-core Xeon VM (default options, 5.4 min in all, data and base model included): bf16_mixed's
improvement equals fp32's to 0.02% (0.0356 of 8.3408), its total update has cosine 1.0000 and norm
1.0000 against fp32's, and it leaves no weight unchanged by steps 2 and 30, as fp32; pure bf16 leaves
99.0% and 98.1% of the weights unchanged by those steps, improves by 0.0013 (96% short of fp32), and
its update has cosine 0.27 and norm 0.26x against fp32's (the issue measured 0.28 and 0.26x on the
real model). This CPU has AMX: bf16 matmuls are no slower than fp32 ones here, and each run takes
about a minute.
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from benchmarks import PROJECT_ROOT, add_subcommand, machine_lines, positive, remove
from benchmarks.data import default_tokenizer, make_split

DEFAULT_WORKDIR = PROJECT_ROOT / "storage" / "bench" / "precision"
MODES = ("fp32", "bf16_mixed", "bf16")
PARAM_DTYPE = {"fp32": "float32", "bf16_mixed": "float32", "bf16": "bfloat16"}  # the weights as trained
COMPUTE = {"fp32": "fp32", "bf16_mixed": "bf16", "bf16": "bf16"}
# The model: the demo's family at this shape, in the LLaMA-2 vocabulary.
VOCAB_SIZE = 32_000
MODEL = dict(num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=64, intermediate_dim=176, max_seq_len=2048)
SEQ_LEN = 512
TRAIN_LINES, VAL_LINES = 20_000, 4_000
VAL_SAMPLES = 200  # drawn from data_val; those that fit (prompt shorter than SEQ_LEN) are kept
KEPT_SHARE = 0.3  # at least this share of drawn samples has room for a response at SEQ_LEN (~40% do)
NPROC, BATCH_SIZE = 2, 1
LR, WARMUP_SHARE = 2e-5, 0.05
PRETRAIN_STEPS, PRETRAIN_LR = 40, 3e-3
DEFAULT_STEPS = 60
ASSETS_VERSION = 1  # bump whenever the base model's recipe changes: it is then rebuilt


def model_overrides() -> List[str]:
    return [
        f"model.vocab_size={VOCAB_SIZE}",
        f"model.num_layers={MODEL['num_layers']}",
        f"model.num_heads={MODEL['num_heads']}",
        f"model.num_kv_heads={MODEL['num_kv_heads']}",
        f"model.embed_dim={MODEL['embed_dim']}",
        f"model.intermediate_dim={MODEL['intermediate_dim']}",
    ]


def run_overrides(
    tokenizer: Path, data: Path, model: Path, out: Path, steps: int, lr: float, warmup: int, seed: int, precision: str
) -> List[str]:
    return [
        *model_overrides(),
        f"tokenizer.path={tokenizer}",
        f"tokenizer.max_seq_len={SEQ_LEN}",
        f"checkpointer.checkpoint_dir={model}",
        f"dataset.data_dir={data}",
        "dataset.long_samples=truncate",
        f"dataset.n_samples={math.ceil(steps * NPROC * BATCH_SIZE / KEPT_SHARE)}",
        "dataset_val=null",
        f"batch_size={BATCH_SIZE}",
        "gradient_accumulation_steps=1",
        "epochs=1",
        f"max_steps_per_epoch={steps}",
        f"seed={seed}",
        f"optimizer.lr={lr}",
        "optimizer.betas=[0.9,0.95]",
        "optimizer.weight_decay=0.01",
        f"lr_scheduler.num_warmup_steps={warmup}",
        "clip_grad_norm=1.0",
        f"precision={precision}",
        "output_dtype=fp32",
        f"output_dir={out}",
    ]


def warmup_steps(steps: int) -> int:
    return max(1, round(WARMUP_SHARE * steps))


def step_lr(step: int, steps: int) -> float:
    """The learning rate optimizer step `step` (1-based) runs at: torchtune's cosine schedule with
    linear warmup, whose factor for the first step is 0."""
    warmup, s = warmup_steps(steps), step - 1
    if s < warmup:
        return LR * s / warmup
    return LR * max(0.0, 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))


def probe_steps(steps: int) -> List[int]:
    """The steps whose single update is measured: 2, the middle one and the last."""
    return sorted({min(2, steps), max(min(2, steps), steps // 2), steps})


# ---------------------------------------------------------------------------------------------
# Children (they import torch)


def write_init_model(out_dir: str, tokenizer: str) -> None:
    """`write_tiny_checkpoint` at MODEL's shape."""
    from ref_tuning.demo import write_tiny_checkpoint

    write_tiny_checkpoint(Path(out_dir), VOCAB_SIZE, Path(tokenizer), **MODEL)


def step_weights(step_dir: Path) -> Dict[str, Any]:
    """The full weights of a step checkpoint at training precision, torchtune names."""
    try:
        from ref_tuning.step_checkpoints import load_weights
    except ImportError:  # older checkouts: read the model's shards of `state/` in this one process
        load_weights = None
    if load_weights is not None:
        return load_weights(step_dir)
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state = step_dir / "state"
    meta = dcp.FileSystemReader(state).read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in meta.items()
        if key.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    dcp.load(tensors, storage_reader=dcp.FileSystemReader(state), no_dist=True)
    return {key.removeprefix("model."): t for key, t in tensors.items()}


def validation_loss(model_dir: Path, samples: Sequence[Dict[str, Any]], rounded_to_bf16: bool = False) -> float:
    """Mean fp32 cross-entropy over the response tokens of `samples` (with the weights first rounded
    to bf16, if asked: where pure bf16 training starts from)."""
    import torch

    from ref_tuning.scoring import load_reference, token_losses

    model = load_reference(model_dir, torch.device("cpu"), torch.bfloat16 if rounded_to_bf16 else torch.float32)
    model = model.float()
    total, count = 0.0, 0
    for i in range(0, len(samples), 8):
        for losses in token_losses(model, samples[i : i + 8], torch.device("cpu")):
            total += float(losses.double().sum())
            count += len(losses)
    return total / count


def analyse(spec_path: str) -> None:
    """Every number of the table, from the runs' outputs; printed as one JSON line."""
    import torch

    from ref_tuning.hf_checkpoint import load_hf_state_dict, load_tune_state_dict
    from ref_tuning.data import codecontests_dataset
    from ref_tuning.models import sheared_llama_tokenizer

    spec = json.loads(Path(spec_path).read_text())
    base = Path(spec["base"])
    tokenizer = sheared_llama_tokenizer(spec["tokenizer"])
    val = codecontests_dataset(
        tokenizer,
        spec["data_val"],
        split="train",
        n_samples=VAL_SAMPLES,
        seed=0,
        max_seq_len=SEQ_LEN,
        long_samples="truncate",
    )
    samples = [val[i] for i in range(len(val))]
    result: Dict[str, Any] = {
        "val_samples": len(samples),
        "val_tokens": sum(sum(label != -100 for label in s["labels"][1:]) for s in samples),
        "val_before": validation_loss(base, samples),
        "val_before_bf16": validation_loss(base, samples, rounded_to_bf16=True),
        "modes": {},
    }
    base_hf = load_hf_state_dict(base)
    updates: Dict[str, torch.Tensor] = {}
    for mode, out in spec["runs"].items():
        dtype = getattr(torch, PARAM_DTYPE[mode])
        out = Path(out)
        row: Dict[str, Any] = {"val_end": validation_loss(out / "checkpoint_final", samples), "unchanged": {}}
        for step in spec["probe_steps"]:
            if step == 1:
                before = {k: v.to(dtype) for k, v in load_tune_state_dict(base).items()}
            else:
                before = step_weights(out / "checkpoints" / f"step_{step - 1:06d}")
            after = step_weights(out / "checkpoints" / f"step_{step:06d}")
            same = sum(int(torch.eq(before[k], after[k]).sum()) for k in after)
            row["unchanged"][str(step)] = same / sum(t.numel() for t in after.values())
        final = load_hf_state_dict(out / "checkpoint_final")
        names = sorted(base_hf)
        updates[mode] = torch.cat([(final[n].double() - base_hf[n].to(dtype).double()).flatten() for n in names])
        result["modes"][mode] = row
    reference = updates["fp32"]
    for mode, update in updates.items():
        row = result["modes"][mode]
        row["update_norm"] = float(update.norm())
        row["update_cos"] = float(torch.nn.functional.cosine_similarity(update, reference, dim=0))
        row["update_norm_ratio"] = float(update.norm() / reference.norm())
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The launcher


def _child(function: str, *args: Any) -> List[str]:
    """A Python child that calls `function` of this module with `args` (strings)."""
    code = f"import sys; from benchmarks.precision import {function}; {function}(*sys.argv[1:])"
    return [sys.executable, "-c", code, *map(str, args)]


def prune(checkpoints: Path, keep: Set[int]) -> None:
    """Delete the complete step checkpoints whose step is not in `keep` (the recipe renames a
    checkpoint to `step_*` only once it is complete, and never reads it again in a run that does not
    resume, so deleting it under a running recipe is safe)."""
    for path in checkpoints.glob("step_*"):
        try:
            step = int(path.name[5:])
        except ValueError:
            continue
        if step not in keep and (path / "train_state.pt").is_file():
            shutil.rmtree(path, ignore_errors=True)


def run_pruned(cmd: List[str], log: Path, checkpoints: Optional[Path], keep: Set[int]) -> Tuple[float, int]:
    """Wall seconds and exit code of `cmd` (output to `log`), pruning its step checkpoints meanwhile."""
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if checkpoints is not None:
                prune(checkpoints, keep)
            time.sleep(0.2)
        if checkpoints is not None:
            prune(checkpoints, keep)
    return time.perf_counter() - start, proc.returncode


def _tail(log: Path, n: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def logged_steps(out: Path) -> List[int]:
    steps = []
    for log_file in sorted((out / "logs").glob("log_*.txt")):
        for line in log_file.read_text().splitlines():
            if line.startswith("Step ") and " loss:" in line:
                steps.append(int(line.split()[1]))
    return steps


def make_assets(workdir: Path, tokenizer: Path, logs: Path) -> Dict[str, Path]:
    """The two synthetic splits and the pretrained base model, made once and reused."""
    from ref_tuning.demo import tune_run_command

    data = workdir / "data"
    make_split(data, TRAIN_LINES, tokenizer, spare_bytes=0)
    data_val = workdir / "data_val"
    make_split(data_val, VAL_LINES, tokenizer, spare_bytes=0)
    base = workdir / "base"
    params = {
        "version": ASSETS_VERSION,
        "model": MODEL,
        "vocab_size": VOCAB_SIZE,
        "seq_len": SEQ_LEN,
        "pretrain_steps": PRETRAIN_STEPS,
        "pretrain_lr": PRETRAIN_LR,
        "data": json.loads((data / "synthetic.json").read_text())["params"],
    }
    marker = workdir / "base.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == params and (base / "config.json").is_file()):
        remove(marker)
        init, pretrain = workdir / "init", workdir / "pretrain"
        for path in (init, pretrain, base):
            remove(path)
        print(
            f"[bench] writing the model and pretraining it for {PRETRAIN_STEPS} steps (fp32, lr {PRETRAIN_LR})",
            file=sys.stderr,
            flush=True,
        )
        subprocess.run(_child("write_init_model", init, tokenizer), cwd=PROJECT_ROOT, check=True)
        overrides = run_overrides(
            tokenizer, data, init, pretrain, PRETRAIN_STEPS, PRETRAIN_LR, warmup_steps(PRETRAIN_STEPS), 1, "fp32"
        ) + ["save_every_n_steps=null"]
        wall, rc = run_pruned(tune_run_command(NPROC, overrides), logs / "pretrain.log", None, set())
        if rc != 0 or logged_steps(pretrain) != list(range(1, PRETRAIN_STEPS + 1)):
            raise SystemExit(
                f"pretraining failed (exit {rc}); last lines of {logs / 'pretrain.log'}:\n"
                f"{_tail(logs / 'pretrain.log')}"
            )
        (pretrain / "checkpoint_final").rename(base)
        for path in (init, pretrain):
            remove(path)
        marker.write_text(json.dumps(params, indent=2) + "\n")
        print(f"[bench]   {wall:.0f} s", file=sys.stderr, flush=True)
    return {"data": data, "data_val": data_val, "base": base}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def report(result: Dict[str, Any], steps: int, probes: List[int], walls: Dict[str, float]) -> List[str]:
    before = result["val_before"]
    imp32 = before - result["modes"]["fp32"]["val_end"]
    probe_heads = " | ".join(f"unchanged by step {k} (lr {step_lr(k, steps):.2g})" for k in probes)
    rows = [
        f"| precision | weights, AdamW state / matmuls | {probe_heads} | val loss before | val loss end | "
        "improvement | vs fp32 | update cos vs fp32 | update norm vs fp32 | wall s |",
        "| --- | --- | " + "---: | " * len(probes) + "---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in MODES:
        row = result["modes"][mode]
        imp = before - row["val_end"]
        vs = f"{100 * (imp - imp32) / imp32:+.2f}%" if imp32 else "-"
        unchanged = " | ".join(_pct(row["unchanged"][str(k)]) for k in probes)
        rows.append(
            f"| {mode} | {PARAM_DTYPE[mode].replace('bfloat16', 'bf16').replace('float32', 'fp32')} / "
            f"{COMPUTE[mode]} | {unchanged} | {before:.4f} | {row['val_end']:.4f} | {imp:.4f} | {vs} | "
            f"{row['update_cos']:.4f} | {row['update_norm_ratio']:.4f} | {walls[mode]:.0f} |"
        )
    mixed = before - result["modes"]["bf16_mixed"]["val_end"]
    bf16 = before - result["modes"]["bf16"]["val_end"]
    gap = abs(mixed - imp32) / imp32 if imp32 else math.inf
    lines = rows + [
        "",
        f"bf16_mixed: improvement {mixed:.4f} against fp32's {imp32:.4f}, {100 * gap:.2f}% apart: "
        + ("within 2%" if gap <= 0.02 else "NOT within 2%")
        + ".",
        f"bf16: improvement {bf16:.4f}, {100 * (imp32 - bf16) / imp32:.1f}% short of fp32's." if imp32 else "",
        f"(The base model rounded to bf16, where pure bf16 starts: val loss {result['val_before_bf16']:.4f}; "
        f"bf16's improvement from there: {result['val_before_bf16'] - result['modes']['bf16']['val_end']:.4f}.)",
    ]
    if imp32 <= 0:
        lines.append("fp32's validation loss did not improve: raise --steps.")
    return lines


def bench_precision(args: argparse.Namespace) -> int:
    from ref_tuning.demo import tune_run_command

    workdir = args.workdir.resolve()
    tokenizer = (args.tokenizer or default_tokenizer()).resolve()
    if not tokenizer.is_file():
        raise SystemExit(f"{tokenizer}: the LLaMA-2 tokenizer is not there; pass --tokenizer PATH")
    steps = args.steps
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    machine = machine_lines(workdir)
    start = time.perf_counter()
    assets = make_assets(workdir, tokenizer, logs)
    probes = probe_steps(steps)
    keep = {s for k in probes for s in (k - 1, k) if s >= 1}
    runs: Dict[str, Path] = {}
    walls: Dict[str, float] = {}
    for mode in MODES:
        out = workdir / "runs" / mode
        remove(out)
        overrides = run_overrides(
            tokenizer, assets["data"], assets["base"], out, steps, LR, warmup_steps(steps), 0, mode
        ) + ["save_every_n_steps=1", f"keep_last_n_checkpoints={steps}"]
        print(f"[bench] {mode}: {steps} steps ...", file=sys.stderr, flush=True)
        log = logs / f"{mode}.log"
        walls[mode], rc = run_pruned(tune_run_command(NPROC, overrides), log, out / "checkpoints", keep)
        done = logged_steps(out)
        if rc != 0 or done != list(range(1, steps + 1)):
            raise SystemExit(
                f"{mode} failed (exit {rc}, steps logged {done[-1:] or 'none'} of {steps}); "
                f"last lines of {log}:\n{_tail(log)}"
            )
        print(f"[bench]   {walls[mode]:.0f} s", file=sys.stderr, flush=True)
        runs[mode] = out
    spec = workdir / "analysis.json"
    spec.write_text(
        json.dumps(
            {
                "base": str(assets["base"]),
                "tokenizer": str(tokenizer),
                "data_val": str(assets["data_val"]),
                "probe_steps": probes,
                "runs": {mode: str(out) for mode, out in runs.items()},
            }
        )
    )
    print("[bench] validation losses and updates ...", file=sys.stderr, flush=True)
    analysis = subprocess.run(
        _child("analyse", spec), cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if analysis.returncode != 0:
        raise SystemExit(f"the analysis failed (exit {analysis.returncode}):\n{analysis.stderr[-3000:]}")
    result = json.loads(analysis.stdout.strip().splitlines()[-1])
    for out in runs.values():  # the step checkpoints are only needed for the analysis
        remove(out / "checkpoints")
    total = time.perf_counter() - start
    n_params = (
        VOCAB_SIZE * MODEL["embed_dim"] * 2
        + MODEL["embed_dim"]
        + MODEL["num_layers"]
        * (4 * MODEL["embed_dim"] ** 2 + 3 * MODEL["embed_dim"] * MODEL["intermediate_dim"] + 2 * MODEL["embed_dim"])
    )
    print("## precision benchmark\n")
    print("\n".join(machine))
    print(
        f"- model: tiny LLaMA-2 family, vocabulary 32,000, width {MODEL['embed_dim']}, {MODEL['num_layers']} layers, "
        f"{n_params:,} parameters; base: pretrained {PRETRAIN_STEPS} steps in fp32 at lr {PRETRAIN_LR:g} "
        f"({assets['base']})"
    )
    print(
        f"- data: synthetic CodeContests-like split ({TRAIN_LINES:,} lines, {assets['data']}), rows of {SEQ_LEN} "
        f"tokens (longer samples truncated); validation: {result['val_samples']} held-out samples, "
        f"{result['val_tokens']:,} response tokens ({assets['data_val']}), fp32 evaluation"
    )
    print(
        f"- training: {NPROC} processes on CPU (gloo), batch {BATCH_SIZE} row per process, {steps} steps; AdamW "
        f"lr {LR:g}, betas 0.9/0.95, weight decay 0.01, cosine with {warmup_steps(steps)} warmup steps, clip 1.0; "
        f"output_dtype=fp32; total wall {total:.0f} s\n"
    )
    print("\n".join(report(result, steps, probes, walls)))
    return 0


def add_parser(sub) -> None:
    p = add_subcommand(
        sub,
        "precision",
        "fp32 vs bf16_mixed vs pure bf16: updates and validation loss",
        __doc__,
        DEFAULT_WORKDIR,
        "data, base model, runs and logs (default {default})",
    )
    p.add_argument(
        "--steps", type=positive, default=DEFAULT_STEPS, help=f"optimizer steps of each run (default {DEFAULT_STEPS})"
    )
    p.add_argument("--tokenizer", type=Path, help="the LLaMA-2 tokenizer.model (default: as bench data)")
    p.set_defaults(func=bench_precision)
