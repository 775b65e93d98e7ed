"""Checkpoint conversion between HF directories and torchtune state dicts, for Rho-1 and back.

    python -m ref_tuning.convert hf-to-tune SRC_DIR OUT.pt
    python -m ref_tuning.convert tune-to-hf SRC.pt OUT_DIR --config HF_DIR
    python -m ref_tuning.convert hf-to-hf SRC_DIR OUT_DIR --dtype bf16
    python -m ref_tuning.convert step-to-hf OUTPUT_DIR/checkpoints/step_NNNNNN OUT_DIR --dtype bf16
    python -m ref_tuning.convert verify HF_DIR

Inputs are read memory-mapped and weights-only (`torch.load`, `safetensors`); outputs are written
one file at a time (an HF directory shard by shard), holding in memory only what a file's conversion
changes (a cast, the permuted q and k), and appear under their final name only once complete.
"""

import argparse
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ref_tuning.atomic import atomic_output
from ref_tuning.checksums import SUMS_FILE, damaged
from ref_tuning.hf_checkpoint import CheckpointError, OutputTensor, check_hf_tensors, converted
from ref_tuning.hf_checkpoint import expected_hf_shapes, hf_to_tune, read_hf_checkpoint, read_hf_config
from ref_tuning.hf_checkpoint import read_tensor_file, save_hf_dir, save_tensor_file, tensor_sources, tune_to_hf
from ref_tuning.paths import check_separate

# Not torchtune's get_dtype: importing torchtune costs about 3 s, and most conversions need none of it.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VERIFY_PROMPT = "def solve():\n    n = int(input())\n    print(sum(range(n)))\n"


def _sums_checked_beside(src_dir: Path) -> Callable[[Path], None]:
    """The source's checksums checked in a thread while the conversion reads the same files (checked first, they
    made `hf-to-hf` 1.3x as slow); call the result before the output takes its name: it raises if they fail."""
    pool = ThreadPoolExecutor(1)
    problem = pool.submit(damaged, src_dir)

    def join(_: Path) -> None:
        pool.shutdown()
        if problem.result():
            raise CheckpointError(problem.result())

    return join


def hf_to_tune_file(src_dir: Path, out: Path, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """An HF directory to one torchtune state-dict file (`torch.save` format, as torchtune's
    `FullModelTorchTuneCheckpointer` and `torch.load` read it): one file, so no progress bar."""
    checked = _sums_checked_beside(src_dir)
    config, tensors = read_hf_checkpoint(src_dir, check_sums=False)
    outputs = converted(tensor_sources(tensors), hf_to_tune, config, dtype)
    with atomic_output(out, overwrite) as tmp:
        save_tensor_file(tmp, outputs)
        checked(tmp)
    return out


def tune_to_hf_dir(src: Path, out_dir: Path, config_dir: Path, dtype: torch.dtype | None = None, **options) -> Path:
    """A torchtune state-dict file to an HF directory, with config and side files from `config_dir`.
    `options`: those of `save_hf_dir` (max_shard_size, safetensors, overwrite, progress)."""
    config = read_hf_config(config_dir)
    if src.is_dir():
        raise CheckpointError(
            f"{src}: a directory; tune-to-hf reads one torchtune state-dict file (.pt). For an HF "
            "directory use hf-to-hf, for a step checkpoint step-to-hf"
        )
    tensors = read_tensor_file(src)
    meta = {name: torch.empty(shape, device="meta") for name, shape in expected_hf_shapes(config).items()}
    expected = {name: tuple(t.shape) for name, t in hf_to_tune(meta, config).items()}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    wrong = [f"{k} {shape} (expected {expected[k]})" for k, shape in shapes.items() if shape != expected.get(k, shape)]
    if wrong:
        raise CheckpointError(
            f"{src}: its weights are not of the shape {config_dir}/config.json describes: {', '.join(wrong[:3])}"
            f"{' ...' if len(wrong) > 3 else ''}; give --config the HF directory of the model these weights came from"
        )
    outputs = converted(tensor_sources(tensors), tune_to_hf, config, dtype)
    check_hf_tensors({t.name: t for t in outputs}, config, src)
    return save_hf_dir(outputs, out_dir, config, config_dir, **options)


def hf_to_hf_dir(src_dir: Path, out_dir: Path, dtype: torch.dtype | None = None, **options) -> Path:
    """Re-cast and re-shard an HF directory; `options` as for `tune_to_hf_dir`."""
    checked = _sums_checked_beside(src_dir)
    config, tensors = read_hf_checkpoint(src_dir, check_sums=False)
    outputs = converted(tensor_sources(tensors), None, config, dtype)
    return save_hf_dir(outputs, out_dir, config, src_dir, **options, write_more=checked)


def step_to_hf_dir(step_dir: Path, out_dir: Path, dtype: torch.dtype | None = None, **options) -> Path:
    """A training step checkpoint (sharded weights, any number of ranks) to an HF directory, with the
    config and tokenizer files the run stored beside the weights; `options` as for `tune_to_hf_dir`."""
    from ref_tuning.step_checkpoints import HF_DIR, STATE_DIR, weight_sources

    if not (step_dir / STATE_DIR / ".metadata").is_file() or not (step_dir / HF_DIR / "config.json").is_file():
        raise CheckpointError(
            f"{step_dir}: not a step checkpoint (expected {STATE_DIR}/.metadata and {HF_DIR}/config.json, "
            "as in OUTPUT_DIR/checkpoints/step_NNNNNN)"
        )
    for sums in sorted(step_dir.glob(f"{SUMS_FILE}.rank_*")):  # each rank's files, as it wrote them
        problem = damaged(step_dir, sums.name)
        if problem:
            raise CheckpointError(problem)
    config = read_hf_config(step_dir / HF_DIR)
    sources = [OutputTensor(name, *source[:3]) for name, source in weight_sources(step_dir).items()]
    if any(".lora_" in t.name for t in sources):
        raise CheckpointError(
            f"{step_dir}: a LoRA run's step checkpoint holds only its adapters, not a model; use the run's "
            "checkpoint_final or checkpoint_best (merged), or resume the run to write them"
        )
    outputs = converted(sources, tune_to_hf, config, dtype)
    check_hf_tensors({t.name: t for t in outputs}, config, step_dir)
    return save_hf_dir(outputs, out_dir, config, step_dir / HF_DIR, **options)


def verify(hf_dir: Path, prompt: str = VERIFY_PROMPT) -> float:
    """Max absolute difference between the logits of `transformers` and of our torchtune model, both
    in float32, on a fixed prompt: what a Rho-1 user checks before using a directory as reference."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise SystemExit("verify needs transformers: pip install transformers (or the project's [dev] extra)") from e
    from ref_tuning.models import sheared_llama_tokenizer
    from ref_tuning.scoring import load_reference

    ours = load_reference(hf_dir, torch.device("cpu"), torch.float32)  # checks the weights against config.json
    if (hf_dir / "tokenizer.model").is_file():
        ids = sheared_llama_tokenizer(str(hf_dir / "tokenizer.model")).encode(prompt, add_eos=False)
    else:  # no tokenizer: any fixed ids will do for comparing two implementations
        ids = [1 + (i * 7919) % (read_hf_config(hf_dir)["vocab_size"] - 1) for i in range(32)]
    tokens = torch.tensor([ids])
    with torch.no_grad():
        got = ours(tokens)
        del ours  # one model in memory at a time: the 2.7B model takes 10.8 GB in float32
        expected = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(tokens).logits
    return (got - expected).abs().max().item()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ref_tuning.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, src: str, out: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("src", metavar=src, type=Path)
        p.add_argument("out", metavar=out, type=Path)
        p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        p.add_argument("--no-progress", action="store_true", help="no progress bar (one file has none anyway)")
        if out == "OUT_DIR":
            p.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 5GB, 500MB (default 5GB)")
            p.add_argument("--safetensors", action="store_true", help="write safetensors instead of .bin shards")
        return p

    command("hf-to-tune", "HF directory -> torchtune state-dict file", "SRC_DIR", "OUT.pt")
    command("tune-to-hf", "torchtune state-dict file -> HF directory", "SRC.pt", "OUT_DIR").add_argument(
        "--config", type=Path, required=True, help="HF directory whose config.json and tokenizer to use"
    )
    command("hf-to-hf", "re-cast or re-shard an HF directory", "SRC_DIR", "OUT_DIR")
    command("step-to-hf", "training step checkpoint -> HF directory", "OUTPUT_DIR/checkpoints/step_NNNNNN", "OUT_DIR")
    p = sub.add_parser("verify", help="compare transformers' and our logits on a fixed prompt")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("--atol", type=float, default=1e-4, help="largest difference accepted (default 1e-4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "verify":
            diff = verify(args.hf_dir)
            ok = diff <= args.atol
            print(
                f"{args.hf_dir}: max |logits(transformers) - logits(torchtune)| = {diff:.3e} "
                f"({'OK' if ok else 'MISMATCH'}, tolerance {args.atol:g})"
            )
            return 0 if ok else 1
        dtype = DTYPES.get(args.dtype)
        config = [args.config] if args.command == "tune-to-hf" else []
        check_separate([args.src, *config], [args.out])
        if args.command == "hf-to-tune":
            out = hf_to_tune_file(args.src, args.out, dtype, args.overwrite)
        else:
            to_hf = {"tune-to-hf": tune_to_hf_dir, "hf-to-hf": hf_to_hf_dir, "step-to-hf": step_to_hf_dir}[args.command]
            options = dict(
                max_shard_size=args.max_shard_size, safetensors=args.safetensors, progress=not args.no_progress
            )
            out = to_hf(args.src, args.out, *config, dtype=dtype, overwrite=args.overwrite, **options)
    except (CheckpointError, ValueError, OSError) as e:  # OSError: a full disk, a missing or unwritable path
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
