"""Training precision: the same fine-tuning in fp32, bf16_mixed (the production default) and pure bf16.

    python -m benchmarks precision [--steps N] [--methods KEYS] [--workdir DIR]

Each mode is one run of our recipe on 2 CPU processes (configs/tiny_cpu.yaml), all else equal: the same base
model and samples in the same order, the production schedule (AdamW lr 2e-5, betas 0.9/0.95, weight decay 0.01,
cosine with 5% warmup, clipping at 1.0), batch 1 row of 512 tokens per process, `--steps` steps, and
`output_dtype=fp32` so that checkpoint_final holds the weights as trained:

  fp32         fp32 weights, AdamW state and matmuls
  bf16_mixed   fp32 weights and AdamW state, bf16 matmuls, gradients reduced in fp32 (FSDP2 MixedPrecisionPolicy)
  bf16         all bf16: a weight w moves only when its update is over half its spacing, about |w| * 2^-9

The base is the demo's tiny model in the LLaMA-2 vocabulary, first trained 40 steps at lr 3e-3 (lr 2e-5 barely
moves random weights; tuning a trained model is the production case), on synthetic data (benchmarks/synthetic.py)
with a held-out split. Per mode: the share of weights the run left bit-identical; the fp32 loss on the held-out
responses before and after (`ref_tuning.scoring.token_losses`), and the gain against fp32's; the total update
(final minus initial weights, as one vector): its cosine and norm ratio against fp32's.
"""

import json
import math
from pathlib import Path

import benchmarks as bench

HELP = "fp32 vs bf16_mixed vs pure bf16 training: what the weights learn"
KEYS = ["fp32", "bf16_mixed", "bf16"]
WEIGHTS = {"fp32": "fp32 / fp32", "bf16_mixed": "fp32 / bf16", "bf16": "bf16 / bf16"}  # weights and AdamW / matmuls
TRAIN_LINES, VAL_LINES, VAL_SAMPLES = 20_000, 4_000, 200
SEQ_LEN, NPROC, LR, TINY_CONFIG = 512, 2, 2e-5, "configs/tiny_cpu.yaml"
PRETRAIN_STEPS, PRETRAIN_LR = 40, 3e-3


def train(args, tokenizer: Path, name: str, model: Path, steps: int, lr: float, seed: int, mode: str) -> float:
    """One run of our recipe into WORKDIR/runs/NAME; its wall seconds."""
    out, log = args.workdir / "runs" / name, args.workdir / "logs" / f"{name}.log"
    n_samples = math.ceil(steps * NPROC / 0.3)  # ~40% of the samples leave room for a response in SEQ_LEN tokens
    overrides = ["model.vocab_size=32000", f"checkpointer.checkpoint_dir={model}", f"seed={seed}"]
    overrides += [f"tokenizer.path={tokenizer}", f"tokenizer.max_seq_len={SEQ_LEN}", f"output_dir={out}"]
    overrides += [f"dataset.data_dir={args.workdir / 'data'}", f"dataset.n_samples={n_samples}", "dataset_val=null"]
    overrides += ["dataset.long_samples=truncate", "batch_size=1", "gradient_accumulation_steps=1", "epochs=1"]
    overrides += [f"max_steps_per_epoch={steps}", f"optimizer.lr={lr}", "optimizer.betas=[0.9,0.95]"]
    overrides += ["optimizer.weight_decay=0.01", f"lr_scheduler.num_warmup_steps={max(1, round(0.05 * steps))}"]
    overrides += [f"precision={mode}", "output_dtype=fp32", "save_every_n_steps=null", "clip_grad_norm=1.0"]
    bench.remove(out)
    bench.say(f"{name}: {steps} steps ...")
    wall, _, rc = bench.run_child(bench.recipe_command("ours", NPROC, TINY_CONFIG, overrides, None), log)
    if rc != 0 or len(bench.metric_steps(out)) != steps:
        raise SystemExit(f"{name} failed (exit {rc}); {log}:\n{bench.tail(log)}")
    return wall


def analyse(workdir: str, tokenizer: str, modes: str) -> None:
    """Every number of the table, into WORKDIR/analysis.json."""
    import torch

    from ref_tuning.data import codecontests_dataset
    from ref_tuning.hf_checkpoint import load_hf_state_dict
    from ref_tuning.models import sheared_llama_tokenizer
    from ref_tuning.scoring import load_reference, token_losses

    workdir, cpu, tok = Path(workdir), torch.device("cpu"), sheared_llama_tokenizer(tokenizer)
    val = codecontests_dataset(
        tok, workdir / "data_val", n_samples=VAL_SAMPLES, max_seq_len=SEQ_LEN, long_samples="truncate"
    )
    samples = [val[i] for i in range(len(val))]

    def val_loss(model_dir: Path) -> float:
        model = load_reference(model_dir, cpu, torch.float32)
        losses = [x for i in range(0, len(samples), 8) for x in token_losses(model, samples[i : i + 8], cpu)]
        return float(torch.cat(losses).double().mean())

    base = load_hf_state_dict(workdir / "base")
    result, updates = {"val_before": val_loss(workdir / "base"), "val_samples": len(samples), "modes": {}}, {}
    for mode in modes.split(","):
        final_dir = workdir / "runs" / mode / "checkpoint_final"
        final, dtype = load_hf_state_dict(final_dir), torch.bfloat16 if mode == "bf16" else torch.float32
        updates[mode] = torch.cat([(final[k].double() - base[k].to(dtype).double()).flatten() for k in sorted(base)])
        unchanged = float((updates[mode] == 0).double().mean())  # bit-identical: the weights are fp32 or bf16
        result["modes"][mode] = {"val_after": val_loss(final_dir), "unchanged": unchanged}
    for mode, update in updates.items():
        if "fp32" in updates:
            cos = torch.nn.functional.cosine_similarity(update, updates["fp32"], dim=0)
            result["modes"][mode].update(cos=float(cos), norm=float(update.norm() / updates["fp32"].norm()))
    (workdir / "analysis.json").write_text(json.dumps(result))


def base_model(args, tokenizer: Path) -> Path:
    """The base: random weights trained PRETRAIN_STEPS steps in fp32 at PRETRAIN_LR, made once and reused."""
    base, marker = args.workdir / "base", args.workdir / "base.json"
    params = {"dims": bench.TINY_DIMS, "steps": PRETRAIN_STEPS, "lr": PRETRAIN_LR, "seq_len": SEQ_LEN, "version": 2}
    if marker.is_file() and json.loads(marker.read_text()) == params and (base / "config.json").is_file():
        return base
    bench.remove(marker)
    bench.make_checkpoint(args.workdir / "init", bench.TINY_DIMS, "float32")
    train(args, tokenizer, "pretrain", args.workdir / "init", PRETRAIN_STEPS, PRETRAIN_LR, 1, "fp32")
    bench.remove(base)
    (args.workdir / "runs" / "pretrain" / "checkpoint_final").rename(base)
    marker.write_text(json.dumps(params))
    return base


def main(args) -> int:
    tokenizer, log = bench.tokenizer_path(args.tokenizer), args.workdir / "logs" / "analysis.log"
    bench.make_split(args.workdir / "data", TRAIN_LINES, tokenizer)
    bench.make_split(args.workdir / "data_val", VAL_LINES, tokenizer)
    base = base_model(args, tokenizer)
    walls = {mode: train(args, tokenizer, mode, base, args.steps, LR, 0, mode) for mode in args.methods}
    bench.say("validation losses and updates ...")
    if bench.run_child(bench.python_child(__name__, "analyse", args.workdir, tokenizer, ",".join(walls)), log)[2]:
        raise SystemExit(f"the analysis failed; last lines of {log}:\n{bench.tail(log)}")
    result = json.loads((args.workdir / "analysis.json").read_text())
    print("## precision benchmark\n\n" + "\n".join(bench.machine_lines(args.workdir)))
    print(f"- the demo's tiny model, LLaMA-2 vocabulary, trained {PRETRAIN_STEPS} steps at lr {PRETRAIN_LR:g} first")
    print(f"- {NPROC} CPU processes, batch 1 row of {SEQ_LEN} tokens each, {args.steps} steps at lr {LR:g}; ", end="")
    print(f"validation on {result['val_samples']} held-out samples\n")
    columns = ["precision", "weights, AdamW / matmuls", f"unchanged after {args.steps} steps", "val loss before"]
    columns += ["after", "improvement", "vs fp32", "update cos vs fp32", "update norm vs fp32", "wall s"]
    print("| " + " | ".join(columns) + " |\n| --- | --- |" + " ---: |" * 8)
    before = result["val_before"]
    fp32 = before - result["modes"]["fp32"]["val_after"] if "fp32" in result["modes"] else None
    for mode, row in result["modes"].items():
        gain = before - row["val_after"]
        vs = f"{100 * (gain - fp32) / fp32:+.2f}%" if fp32 else "-"
        cos, norm = (f"{row[k]:.4f}" if k in row else "-" for k in ("cos", "norm"))
        cells = [mode, WEIGHTS[mode], f"{row['unchanged']:.1%}", f"{before:.4f}", f"{row['val_after']:.4f}"]
        print("| " + " | ".join([*cells, f"{gain:.4f}", vs, cos, norm, f"{walls[mode]:.0f}"]) + " |")
    return 0


def add_arguments(p) -> None:
    bench.add_tokenizer(p)
    p.add_argument("--steps", type=bench.positive, default=60, help="optimizer steps of each run (default 60)")
