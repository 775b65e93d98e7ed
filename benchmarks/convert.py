"""Checkpoint conversion against copying the bytes, `transformers` and torchtune's checkpointer.

    python -m benchmarks convert [--src DIR] [--workdir DIR] [--repeats N] [--methods KEYS] [--num-layers N]

Each method rewrites one HF directory (without --src: a random fp32 Sheared-LLaMA-2.7B in the hub's layout,
10.8 GB in two `.bin` shards, written once):

  cp                 `cp -r SRC OUT`: reading and writing the bytes, nothing else
  dd                 `dd bs=32M oflag=direct`, file by file: the same past the page cache, as fast as the disk
  ours               `python -m ref_tuning.convert hf-to-hf SRC OUT`: re-sharded at 5GB, `.bin`
  ours-safetensors   the same with `--safetensors`
  ours-tune          `python -m ref_tuning.convert hf-to-tune SRC OUT.pt`: one torchtune state-dict file
  torchtune          torchtune's `FullModelHFCheckpointer`: `load_checkpoint()`, then `save_checkpoint()` as `.bin`
  transformers       `AutoModelForCausalLM.from_pretrained(SRC, dtype="auto").save_pretrained(OUT)`: safetensors

Outputs are deleted and `os.sync()` called between runs (untimed); the source may stay in the page cache (a warm
read, a write to disk). Times run from a child's start to its exit, imports included; peak RSS counts the pages
of memory-mapped files once touched.
"""

import json
import sys
from pathlib import Path

import benchmarks as bench
from benchmarks import GB

HELP = "checkpoint conversion vs cp -r, dd, transformers and torchtune's checkpointer"
KEYS = ["cp", "dd", "ours", "ours-safetensors", "ours-tune", "torchtune", "transformers"]
# The hub's fp32 Sheared-LLaMA-2.7B: 10,806,241,280 bytes, of which the first shard holds 9.95 GB.
FIRST_SHARD_FRACTION = 9.95e9 / 10_806_241_280
DD_SCRIPT = (
    'mkdir "$2" && for f in "$1"/*; do dd if="$f" of="$2/${f##*/}" bs=32M oflag=direct status=none || exit 1; done'
)
TORCHTUNE = """import json, sys
from torchtune.training import FullModelHFCheckpointer
src, out = sys.argv[1:]
files = sorted(set(json.load(open(src + "/pytorch_model.bin.index.json"))["weight_map"].values()))
checkpointer = FullModelHFCheckpointer(src, files, "LLAMA2", out, safe_serialization=False)
checkpointer.save_checkpoint(checkpointer.load_checkpoint(), epoch=0)"""
TRANSFORMERS = """import sys
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto").save_pretrained(sys.argv[2], max_shard_size="5GB")"""


def random_checkpoint(out: str, dims: str, dtype: str) -> None:
    """An HF directory of random weights (norms 1, the rest N(0, 0.02^2)) of the shape `dims` (JSON) in `dtype`, in
    the hub's layout, unless `out` holds one already (its config.json, which states the dtype, says so)."""
    import torch

    from ref_tuning.hf_checkpoint import OutputTensor, expected_hf_shapes, save_hf_dir
    from ref_tuning.models import hf_llama_config

    config = hf_llama_config(**json.loads(dims), max_seq_len=4096)
    config_file = Path(out) / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()) == dict(config, torch_dtype=dtype, dtype=dtype):
        return

    kind = getattr(torch, dtype)

    def make(name, shape, seed):
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=kind)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).mul_(0.02).to(kind)

    tensors = [
        OutputTensor(name, kind, shape, lambda scratch=None, n=name, s=shape, i=i: make(n, s, i))
        for i, (name, shape) in enumerate(expected_hf_shapes(config).items())
    ]
    bench.say(f"writing a random {config['num_hidden_layers']}-layer {dtype} checkpoint to {out}")
    max_shard = int(sum(t.nbytes for t in tensors) * FIRST_SHARD_FRACTION)
    save_hf_dir(tensors, out, config, max_shard_size=max_shard, overwrite=True)


def methods(src: Path, workdir: Path, keys: list[str]) -> list[bench.Method]:
    out = {key: workdir / f"out-{key}" for key in KEYS}
    out["ours-tune"] = out["ours-tune"].with_suffix(".pt")
    s, o = str(src), {key: str(path) for key, path in out.items()}

    def ours(*args: str) -> list[str]:
        return [sys.executable, "-m", "ref_tuning.convert", *args, "--no-progress"]

    commands = {
        "cp": ("cp -r", ["cp", "-r", s, o["cp"]]),
        "dd": ("dd oflag=direct", ["bash", "-c", DD_SCRIPT, "dd", s, o["dd"]]),
        "ours": ("ours hf-to-hf", ours("hf-to-hf", s, o["ours"])),
        "ours-safetensors": (
            "ours hf-to-hf --safetensors",
            ours("hf-to-hf", "--safetensors", s, o["ours-safetensors"]),
        ),
        "ours-tune": ("ours hf-to-tune", ours("hf-to-tune", s, o["ours-tune"])),
        "torchtune": ("torchtune FullModelHFCheckpointer", [sys.executable, "-c", TORCHTUNE, s, o["torchtune"]]),
        "transformers": ("transformers save_pretrained", [sys.executable, "-c", TRANSFORMERS, s, o["transformers"]]),
    }
    return [bench.Method(key, label, cmd, out[key]) for key, (label, cmd) in commands.items() if key in keys]


def main(args) -> int:
    src = args.src.resolve() if args.src else args.workdir / "source"
    if not args.src:
        bench.make_checkpoint(src, bench.model_dims(args), "float32")
    results = bench.measure(methods(src, args.workdir, args.methods), args.repeats, args.workdir / "logs")
    files = sorted(p.name for p in src.iterdir() if p.is_file())
    print("## convert benchmark\n\n" + "\n".join(bench.machine_lines(args.workdir)))
    print(f"- source: {src}, {bench.dir_bytes(src) / GB:.2f} GB in {len(files)} files ({', '.join(files)})")
    print(f"- {args.repeats} repeats, methods interleaved; outputs deleted after each run\n\n{bench.table(results)}")
    return 0 if all(res.walls for res in results) else 1


def add_arguments(p) -> None:
    p.add_argument("--src", type=Path, help="HF directory to convert (default: a random Sheared-LLaMA-2.7B, fp32)")
    p.add_argument("--repeats", type=bench.positive, default=3, help="runs of each method (default 3)")
    bench.add_model_shape(p)
