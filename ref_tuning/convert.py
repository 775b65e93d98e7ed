"""Checkpoint conversion between HF directories and torchtune state dicts, for Rho-1 and back.

    python -m ref_tuning.convert hf-to-tune SRC_DIR OUT.pt
    python -m ref_tuning.convert tune-to-hf SRC.pt OUT_DIR --config HF_DIR
    python -m ref_tuning.convert hf-to-hf SRC_DIR OUT_DIR --dtype bf16
    python -m ref_tuning.convert step-to-hf OUTPUT_DIR/checkpoints/step_NNNNNN OUT_DIR --dtype bf16
    python -m ref_tuning.convert verify HF_DIR

Tensors are read lazily and written one by one, so memory stays at a few tensors whatever the model's
size; outputs appear under their final name only once complete; input files are read weights-only.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch
from tqdm import tqdm

from ref_tuning.checkpointing import (
    CheckpointError,
    atomic_output,
    check_hf_tensors,
    converted,
    expected_hf_shapes,
    hf_tensor_refs,
    hf_to_tune,
    read_hf_config,
    ref_sources,
    save_hf_dir,
    tune_to_hf,
    write_tensor_file,
)
from ref_tuning.paths import check_separate
from ref_tuning.tensorfiles import TensorFileError, read_refs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VERIFY_PROMPT = "def solve():\n    n = int(input())\n    print(sum(range(n)))\n"


def _checked_hf_refs(src_dir: Path):
    config = read_hf_config(src_dir)
    refs = hf_tensor_refs(src_dir)
    check_hf_tensors(refs, config, src_dir)
    # The model's order, so that the output lists parameters as HF does.
    return config, {name: refs[name] for name in expected_hf_shapes(config)}


def hf_to_tune_file(src_dir: Path, out: Path, dtype: Optional[torch.dtype] = None, overwrite: bool = False,
                    progress: bool = True, direct_io: bool = True) -> Path:  # fmt: skip
    """An HF directory to one torchtune state-dict file (`torch.save` format, loaded by torchtune's
    `FullModelTorchTuneCheckpointer` and by `torch.load`)."""
    config, refs = _checked_hf_refs(src_dir)
    tensors = converted(ref_sources(refs), hf_to_tune, config, dtype)
    with atomic_output(out, overwrite) as tmp:
        bar = tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc=out.name, disable=not progress)
        write_tensor_file(tmp, tensors, bar, direct_io)
    bar.close()
    return out


def tune_to_hf_dir(src: Path, out_dir: Path, config_dir: Path, dtype: Optional[torch.dtype] = None,
                   max_shard_size: str = "5GB", safetensors: bool = False, overwrite: bool = False,
                   progress: bool = True, direct_io: bool = True) -> Path:  # fmt: skip
    """A torchtune state-dict file to an HF directory, with config and side files from `config_dir`."""
    config = read_hf_config(config_dir)
    if src.is_dir():
        raise CheckpointError(f"{src}: a directory; tune-to-hf reads one torchtune state-dict file (.pt). For an HF "
                              "directory use hf-to-hf, for a step checkpoint step-to-hf")  # fmt: skip
    try:
        refs = read_refs(src)
    except TensorFileError as e:
        raise CheckpointError(str(e)) from e
    meta = {name: torch.empty(shape, device="meta") for name, shape in expected_hf_shapes(config).items()}
    expected = {name: tuple(t.shape) for name, t in hf_to_tune(meta, config).items()}
    wrong = [f"{name} {tuple(ref.shape)} (expected {expected[name]})" for name, ref in refs.items()
             if name in expected and tuple(ref.shape) != expected[name]]  # fmt: skip
    if wrong:
        raise CheckpointError(f"{src}: its weights are not of the shape {config_dir}/config.json describes: "
                              f"{', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}; give --config the HF "
                              "directory of the model these weights came from")  # fmt: skip
    tensors = converted(ref_sources(refs), tune_to_hf, config, dtype)
    check_hf_tensors({t.name: t for t in tensors}, config, src)
    return save_hf_dir(tensors, out_dir, config, config_dir, max_shard_size, safetensors, overwrite, progress, direct_io)


def hf_to_hf_dir(src_dir: Path, out_dir: Path, dtype: Optional[torch.dtype] = None, max_shard_size: str = "5GB",
                 safetensors: bool = False, overwrite: bool = False, progress: bool = True,
                 direct_io: bool = True) -> Path:  # fmt: skip
    """Re-cast and re-shard an HF directory."""
    config, refs = _checked_hf_refs(src_dir)
    tensors = converted(ref_sources(refs), None, config, dtype)
    return save_hf_dir(tensors, out_dir, config, src_dir, max_shard_size, safetensors, overwrite, progress, direct_io)


def step_to_hf_dir(step_dir: Path, out_dir: Path, dtype: Optional[torch.dtype] = None, max_shard_size: str = "5GB",
                   safetensors: bool = False, overwrite: bool = False, progress: bool = True,
                   direct_io: bool = True) -> Path:  # fmt: skip
    """A training step checkpoint (sharded weights, any number of ranks) to an HF directory, with the
    config and tokenizer files the run stored beside the weights."""
    from ref_tuning.step_checkpoints import HF_DIR, STATE_DIR, weight_sources

    if not (step_dir / STATE_DIR / ".metadata").is_file() or not (step_dir / HF_DIR / "config.json").is_file():
        raise CheckpointError(f"{step_dir}: not a step checkpoint (expected {STATE_DIR}/.metadata and {HF_DIR}/config.json, "
                              "as in OUTPUT_DIR/checkpoints/step_NNNNNN)")  # fmt: skip
    config = read_hf_config(step_dir / HF_DIR)
    tensors = converted(weight_sources(step_dir), tune_to_hf, config, dtype)
    check_hf_tensors({t.name: t for t in tensors}, config, step_dir)
    return save_hf_dir(tensors, out_dir, config, step_dir / HF_DIR, max_shard_size, safetensors, overwrite, progress,
                       direct_io)  # fmt: skip


def verify(hf_dir: Path, prompt: str = VERIFY_PROMPT) -> float:
    """Max absolute difference between the logits of `transformers` and of our torchtune model, both
    in float32, on a fixed prompt: what a Rho-1 user checks before using a directory as reference."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise SystemExit("verify needs transformers: pip install transformers (or the project's [dev] extra)") from e
    from ref_tuning.models import llama_from_hf_config, sheared_llama_tokenizer

    config, refs = _checked_hf_refs(hf_dir)
    if (hf_dir / "tokenizer.model").is_file():
        ids = sheared_llama_tokenizer(str(hf_dir / "tokenizer.model")).encode(prompt, add_eos=False)
    else:  # no tokenizer: any fixed ids will do for comparing two implementations
        ids = [1 + (i * 7919) % (config["vocab_size"] - 1) for i in range(32)]
    tokens = torch.tensor([ids])

    # One model in memory at a time: the 2.7B model takes 10.8 GB in float32.
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf_model(tokens).logits
    del hf_model
    with torch.device("meta"):
        ours = llama_from_hf_config(config)
    hf_sd = {name: ref.load().float() for name, ref in refs.items()}
    ours.load_state_dict(hf_to_tune(hf_sd, config), strict=True, assign=True)
    del hf_sd
    for m in ours.modules():
        if hasattr(m, "rope_init"):  # RoPE buffers are not in the state dict
            m.rope_init()
    with torch.no_grad():
        got = ours.eval()(tokens)
    return (got - expected).abs().max().item()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ref_tuning.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def output_options(p, hf: bool):
        p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--no-direct-io", action="store_true",
                       help="write through the page cache instead of with O_DIRECT (which is used where the "
                            "file system supports it, being several times faster on the machines measured)")  # fmt: skip
        if hf:
            p.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 5GB, 500MB (default 5GB)")
            p.add_argument("--safetensors", action="store_true", help="write safetensors instead of .bin shards")

    p = sub.add_parser("hf-to-tune", help="HF directory -> torchtune state-dict file")
    p.add_argument("src_dir", type=Path)
    p.add_argument("out", type=Path, help="the file to write, e.g. model.pt")
    output_options(p, hf=False)
    p = sub.add_parser("tune-to-hf", help="torchtune state-dict file -> HF directory")
    p.add_argument("src", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--config", type=Path, required=True, help="HF directory whose config.json and tokenizer to use")
    output_options(p, hf=True)
    p = sub.add_parser("hf-to-hf", help="re-cast or re-shard an HF directory")
    p.add_argument("src_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    output_options(p, hf=True)
    p = sub.add_parser("step-to-hf", help="training step checkpoint -> HF directory")
    p.add_argument("step_dir", type=Path, help="e.g. OUTPUT_DIR/checkpoints/step_000500")
    p.add_argument("out_dir", type=Path)
    output_options(p, hf=True)
    p = sub.add_parser("verify", help="compare transformers' and our logits on a fixed prompt")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("--atol", type=float, default=1e-4, help="largest difference accepted (default 1e-4)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "verify":
            diff = verify(args.hf_dir)
            ok = diff <= args.atol
            print(f"{args.hf_dir}: max |logits(transformers) - logits(torchtune)| = {diff:.3e} "
                  f"({'OK' if ok else 'MISMATCH'}, tolerance {args.atol:g})")  # fmt: skip
            return 0 if ok else 1
        dtype, progress, direct = DTYPES.get(args.dtype), not args.no_progress, not args.no_direct_io
        inputs = {"hf-to-tune": ["src_dir"], "tune-to-hf": ["src", "config"], "hf-to-hf": ["src_dir"],
                  "step-to-hf": ["step_dir"]}[args.command]  # fmt: skip
        output = args.out if args.command == "hf-to-tune" else args.out_dir
        check_separate([getattr(args, name) for name in inputs], [output])
        if args.command == "hf-to-tune":
            out = hf_to_tune_file(args.src_dir, args.out, dtype, args.overwrite, progress, direct)
        elif args.command == "step-to-hf":
            out = step_to_hf_dir(args.step_dir, args.out_dir, dtype, args.max_shard_size, args.safetensors,
                                 args.overwrite, progress, direct)  # fmt: skip
        elif args.command == "tune-to-hf":
            out = tune_to_hf_dir(args.src, args.out_dir, args.config, dtype, args.max_shard_size,
                                 args.safetensors, args.overwrite, progress, direct)  # fmt: skip
        else:
            out = hf_to_hf_dir(args.src_dir, args.out_dir, dtype, args.max_shard_size, args.safetensors,
                               args.overwrite, progress, direct)  # fmt: skip
    except (CheckpointError, ValueError, OSError) as e:  # OSError: a full disk, a missing or unwritable path
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
