"""Checkpoint conversion against `cp -r`, a direct-I/O copy and torchtune's checkpointer.

    python -m benchmarks convert [--src DIR] [--workdir DIR] [--repeats N] [--layers N] [--keep]

It measures the wall time and the peak resident memory (RSS) of five ways to rewrite one HF
checkpoint directory:

  1. `cp -r SRC OUT`: the baseline; reading and writing the bytes, nothing else.
  2. `dd bs=32M oflag=direct`, file by file: the same copy with direct-I/O writes, past the page cache:
     what the disk itself sustains.
  3. `python -m ref_tuning.convert hf-to-hf SRC OUT --no-progress`: re-shard at 5GB, fp32 kept.
  4. `python -m ref_tuning.convert hf-to-tune SRC OUT.pt --no-progress`: one torchtune state-dict file.
  5. torchtune's `FullModelHFCheckpointer`: `load_checkpoint()` then `save_checkpoint(..., epoch=0)`
     in a `python -c` child, writing `.bin` shards (`safe_serialization=False`) like the others.

Without `--src`, a random fp32 checkpoint shaped like Sheared-LLaMA-2.7B is written first, in the hub's
layout (`pytorch_model-00001-of-00002.bin` of ~9.95 GB, `...-00002-of-00002.bin` of ~0.86 GB, index,
config.json), tensor by tensor; it is kept in the work directory and reused while its config matches.

Each run is its own child process (see `benchmarks`). Outputs are deleted and `os.sync()` is
called between runs (untimed), so that one run's write-back does not slow the next. The source stays in the page cache whenever RAM allows (nothing
here drops caches): the numbers are for a warm read and a write to disk.

Reading the table: `median wall s` is the median over the successful runs (`runs`) of the time from
start to exit of the child, Python start-up and imports included; `peak RSS GB` is the largest peak
over those runs (GB = 10^9 bytes; pages of memory-mapped files count as resident once touched);
`x cp -r` is the method's median divided by the median of `cp -r`, so 1.5 means 50% slower than
copying the bytes.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

from benchmarks import (
    add_subcommand,
    GB,
    PROJECT_ROOT,
    Method,
    check_disk,
    dir_bytes,
    launcher_rss_kib,
    machine_lines,
    measure,
    positive,
    remove,
    table,
)

DEFAULT_WORKDIR = PROJECT_ROOT / "storage" / "bench" / "convert"
# The hub's fp32 Sheared-LLaMA-2.7B: 10,806,241,280 bytes, of which the first shard holds 9.95 GB.
FIRST_SHARD_FRACTION = 9.95e9 / 10_806_241_280
# The same names as ref_tuning.hf_checkpoint; repeated so that the launcher never imports torch.
INDEX_FILES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")
SINGLE_FILES = ("pytorch_model.bin", "model.safetensors")
# A model of the same family small enough for tests (`--tiny`, hidden).
TINY_DIMS = dict(num_heads=4, num_kv_heads=4, embed_dim=64, intermediate_dim=176)

TORCHTUNE_SCRIPT = """
import sys
from torchtune.training import FullModelHFCheckpointer
src, out, *files = sys.argv[1:]
checkpointer = FullModelHFCheckpointer(
    checkpoint_dir=src, checkpoint_files=files, model_type="LLAMA2", output_dir=out, safe_serialization=False
)
state_dict = checkpointer.load_checkpoint()["model"]
checkpointer.save_checkpoint({"model": state_dict}, epoch=0)
"""


# ---------------------------------------------------------------------------------------------
# The random source checkpoint (runs in a child process: it imports torch)


def source_config(layers: int, tiny: bool = False) -> dict:
    from ref_tuning.models import SHEARED_LLAMA_2_7B, hf_llama_config

    return hf_llama_config(**dict(SHEARED_LLAMA_2_7B, num_layers=layers, **(TINY_DIMS if tiny else {})))


def random_tensors(config: dict, seed: int = 0) -> list:
    """Every HF parameter as an `OutputTensor` whose data (N(0, 0.02^2), fp32) is made when written."""
    import torch

    from ref_tuning.hf_checkpoint import OutputTensor, expected_hf_shapes

    def make(shape, seed):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).mul_(0.02)

    shapes = expected_hf_shapes(config).items()
    return [
        OutputTensor(name, torch.float32, shape, lambda scratch=None, shape=shape, i=i: make(shape, seed + i))
        for i, (name, shape) in enumerate(shapes)
    ]


def _source_matches(src: Path, config: dict) -> bool:
    import torch

    from ref_tuning.hf_checkpoint import CheckpointError, check_hf_tensors, hf_tensor_refs, read_hf_config

    try:
        found = read_hf_config(src)
        if any(found.get(k) != v for k, v in config.items()):
            return False
        refs = hf_tensor_refs(src)
        check_hf_tensors(refs, found, src)
    except CheckpointError:
        return False
    return all(ref.dtype == torch.float32 for ref in refs.values())


def ensure_source(src: Path, layers: int, tiny: bool = False) -> None:
    """Write a random fp32 checkpoint of the hub's layout at `src`, unless one with this config is there."""
    from ref_tuning.hf_checkpoint import save_hf_dir

    config = source_config(layers, tiny)
    if _source_matches(src, config):
        print(f"[bench] reusing {src}", file=sys.stderr, flush=True)
        return
    tensors = random_tensors(config)
    total = sum(t.nbytes for t in tensors)
    src.parent.mkdir(parents=True, exist_ok=True)
    check_disk(src.parent, 2 * total)  # the source and one output
    max_shard = int(total * FIRST_SHARD_FRACTION)
    print(f"[bench] writing a random {layers}-layer fp32 checkpoint to {src}", file=sys.stderr, flush=True)
    save_hf_dir(tensors, src, config, max_shard_size=max_shard, overwrite=True, progress=True)
    if len(weight_files(src)) != 2:
        raise SystemExit(f"{src}: expected 2 shards, got {weight_files(src)}")


def make_source(src: Path, layers: int, tiny: bool) -> Path:
    code = "import sys; from pathlib import Path; from benchmarks.convert import ensure_source; "
    code += "ensure_source(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == 'tiny')"
    cmd = [sys.executable, "-c", code, str(src), str(layers), "tiny" if tiny else "full"]
    subprocess.run(cmd, cwd=PROJECT_ROOT, check=True)
    return src


# ---------------------------------------------------------------------------------------------
# Running and measuring


def weight_files(src: Path) -> List[str]:
    """The weight files of an HF directory, in its index's order."""
    for name in INDEX_FILES:
        if (src / name).is_file():
            return list(dict.fromkeys(json.loads((src / name).read_text())["weight_map"].values()))
    singles = [name for name in SINGLE_FILES if (src / name).is_file()]
    if not singles:
        raise SystemExit(f"{src}: no weights found (expected {INDEX_FILES[0]} or {SINGLE_FILES[0]})")
    return singles[:1]


# Every file of SRC copied by dd with O_DIRECT writes (dd drops O_DIRECT for a file's last, partial block).
DD_DIRECT_SCRIPT = (
    'mkdir "$2" && for f in "$1"/*; do dd if="$f" of="$2/${f##*/}" bs=32M oflag=direct status=none || exit 1; done'
)


def convert_methods(src: Path, workdir: Path) -> List[Method]:
    py = [sys.executable, "-m", "ref_tuning.convert"]
    out = {key: workdir / f"out-{key}" for key in ("cp", "dd", "hf-to-hf", "tune", "torchtune")}
    out["tune"] = out["tune"].with_suffix(".pt")
    tt_cmd = [sys.executable, "-c", TORCHTUNE_SCRIPT, str(src), str(out["torchtune"]), *weight_files(src)]
    return [
        Method("cp -r", out["cp"], ["cp", "-r", str(src), str(out["cp"])]),
        Method("dd oflag=direct", out["dd"], ["bash", "-c", DD_DIRECT_SCRIPT, "dd", str(src), str(out["dd"])]),
        Method("ours hf-to-hf", out["hf-to-hf"], py + ["hf-to-hf", str(src), str(out["hf-to-hf"]), "--no-progress"]),
        Method("ours hf-to-tune", out["tune"], py + ["hf-to-tune", str(src), str(out["tune"]), "--no-progress"]),
        Method("torchtune FullModelHFCheckpointer", out["torchtune"], tt_cmd),
    ]


# ---------------------------------------------------------------------------------------------
# The subcommand


def bench_convert(args: argparse.Namespace) -> int:
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_lines(workdir)  # free disk before anything is written
    if args.src is None:
        src = make_source(workdir / "source", args.layers, args.tiny)
    else:
        src = args.src.resolve()
    src_bytes = dir_bytes(src)
    methods = convert_methods(src, workdir)
    check_disk(workdir, src_bytes * (len(methods) if args.keep else 1))
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    for m in methods:
        remove(m.out)
    os.sync()
    results = measure(methods, args.repeats, args.keep, logs)
    files = sorted(p.name for p in src.iterdir() if p.is_file())
    print("## convert benchmark\n")
    print("\n".join(machine))
    print(f"- source: {src}, {src_bytes / GB:.2f} GB in {len(files)} files ({', '.join(files)})")
    print(f"- launcher RSS (counted in every child's peak): {launcher_rss_kib() * 1024 / GB:.3f} GB")
    print(f"- {args.repeats} repeats, methods interleaved; outputs {'kept' if args.keep else 'deleted'} in {workdir}\n")
    print(table(results))
    return 0 if all(res.walls for res in results) else 1


def add_parser(sub) -> None:
    p = add_subcommand(
        sub,
        "convert",
        "checkpoint conversion vs cp -r and torchtune's checkpointer",
        __doc__,
        DEFAULT_WORKDIR,
        "generated source and outputs; needs 2x the source's size free, 6x with --keep (default {default})",
    )
    p.add_argument(
        "--src", type=Path, help="HF directory to convert (default: a random Sheared-LLaMA-2.7B in --workdir)"
    )
    p.add_argument("--repeats", type=positive, default=3, help="runs of each method (default 3)")
    p.add_argument(
        "--layers",
        type=positive,
        default=32,
        help="layers of the generated source (default 32: 10.8 GB; 2 layers make 1.3 GB)",
    )
    p.add_argument("--keep", action="store_true", help="keep the last repeat's outputs")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # narrow layers, for tests
    p.set_defaults(func=bench_convert)
