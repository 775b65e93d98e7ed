"""A training step checkpoint of Sheared-LLaMA-2.7B: today's gather-then-write against every rank
writing its own shards with torch.distributed.checkpoint (DCP).

    python -m benchmarks checkpoint [--workdir DIR] [--repeats N] [--num-layers N] [--nproc N]
                                          [--writer KEY=VALUE,...]... [--verify]

The state is the one a step checkpoint of the production run holds: the model at Sheared-LLaMA-2.7B's
shape (2,701,560,320 parameters; `--num-layers` keeps fewer layers), bf16, sharded over `--nproc`
processes (gloo, CPU) by `torchtune.training.shard_model` as `recipes/ref_finetune.py` does, with random
weights, and AdamW's state made by one optimizer step on zero gradients: 5.4 GB of weights and 10.8 GB
of optimizer state at full size. Two ways to write it:

  1. `today`: what the recipe does now. `torchtune.training.gather_cpu_state_dict` gathers the whole
     model to rank 0, which writes it as an HF directory (`HFBinCheckpointer.save_checkpoint`: `.bin`
     shards); then every rank writes its part of the optimizer state with `dcp.save`
     (torch's defaults). Its phases on rank 0 are printed below the table.
  2. `new` (`new_save`): no gather; every rank writes its own shards of the model and of the optimizer
     state at once, `dcp.save({"model": ..., "optimizer": ...}, storage_writer=FileSystemWriter(...))`.
     Each `--writer` makes one such row, its options given over torch's defaults: FileSystemWriter's
     `thread_count`, `sync_files`, `single_file_per_rank`, `per_thread_copy_ahead`; and `crc32`, torch.save's
     checksum (`torch.serialization.set_crc32_options`). The default rows: torch's defaults and
     `crc32=false`.

Measured on the 2-core VM (ext4 on virtio; dd direct 1.3-1.4 GB/s), 12 layers (6.7 GB), 2 repeats,
the machine otherwise nearly idle, GB/s: torch's defaults 0.78; `thread_count=2` 1.08, `4` 1.20;
`crc32=false` 1.49 (0.88x the dd time), with `thread_count=2` or `4` 1.29-1.33;
`crc32=false,single_file_per_rank=false` (a file per tensor) 0.87; `crc32=false,sync_files=false`
1.65, but the data is not on disk when it returns; `direct_io=true` (an O_DIRECT experiment, since removed) 1.45-1.58, no better.
`per_thread_copy_ahead` only acts when CUDA is present. So: DCP's default format is one torch.save
per tensor, and torch.save's CRC-32 over every byte is what bounds torch's defaults (threads hide
some of it); without it one buffered stream per rank, fsynced, keeps up with the disk. Full size
(`--repeats 2`): today 32.0 s (gather 18.1 s, HF write 4.3 s, optimizer 9.4 s), torch's defaults 13.4 s
(2.4x faster), `crc32=false` 10.8 s (3.0x; 0.95x the dd time). Under load (other tests running on
both cores) every buffered variant fell to 0.2-0.65 GB/s: the page-cache copy and the checksum are
CPU work, and direct I/O (`direct_io=true`, 1.3 GB/s then) is the one that held up.

Memory: at full size the processes peak at 14.2 GB (rank 0, during today's gather) and 8.9 GB, 23 GB
of this machine's 25. So the launcher waits until that much is available, and rank 0 again before
each `today` until the gathered model fits (untimed; 20 minutes at most, then it goes on).

The model is built once, in one `torchrun --nproc_per_node NPROC` launch of this module (`--worker`);
within it, every repeat runs `dd if=/dev/zero bs=64M oflag=direct` (rank 0 alone: the disk's direct
write throughput) and then each method, in turn. A method is timed on rank 0 from a barrier before the
save to a barrier after it (every rank done); building and filling the model are not timed. Each
output is measured, deleted and `os.sync()` called (untimed) before the next method; nothing else is
dropped. The table reports medians over the repeats: `bytes written GB` (GB = 10^9 bytes) is the size
of the files a method wrote, `GB/s` those bytes over its wall time, `x today` its time over today's,
and `x (bytes / dd throughput)` its time over the time dd would take to write the same bytes (1.0: as
fast as one stream of direct writes). `--verify` then saves once more with `new_save`'s defaults,
loads that checkpoint into a freshly built and sharded model and optimizer with `dcp.load`, and checks
every weight and optimizer tensor bit for bit. The worker's log is `WORKDIR/logs/worker.log`.
"""

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks import GB, PROJECT_ROOT, check_disk, dir_bytes, machine_lines, positive, remove

DEFAULT_WORKDIR = PROJECT_ROOT / "storage" / "bench" / "checkpoint"
# new_save's defaults, as options over torch's (for the report).
NEW_SAVE_OPTIONS: Dict[str, Any] = {}  # the recipe keeps torch's defaults: the targets are met with them
# The `new` rows unless --writer is given: torch's defaults, then what measured best (see the docstring).
DEFAULT_WRITERS = ("defaults", "crc32=false")
DD_BLOCK = 64 * 2**20
# glibc serves allocations of up to 32 MB (its dynamic mmap threshold) from its heaps, where the
# temporaries of filling, stepping and gathering leave holes between the long-lived shards: 2 GB per
# process at full size, more than this machine has to spare. From 1 MB up, every tensor gets its own
# mapping, given back when freed.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
# The same narrow shape as `bench convert --tiny`, for tests (`--tiny`, hidden).
TINY_DIMS = dict(num_heads=4, num_kv_heads=4, embed_dim=64, intermediate_dim=176)
# Sheared-LLaMA-2.7B (ref_tuning.models.SHEARED_LLAMA_2_7B), repeated so that the launcher never imports torch.
FULL_DIMS = dict(vocab_size=32_000, num_layers=32, num_heads=20, num_kv_heads=20, embed_dim=2560, intermediate_dim=6912)
# What a --writer may set, and torch's defaults: FileSystemWriter's options; torch.save's crc32
# (`torch.serialization.set_crc32_options`; DCP's default format is one torch.save per tensor).
TORCH_DEFAULTS = {
    "thread_count": 1,
    "sync_files": True,
    "single_file_per_rank": True,
    "per_thread_copy_ahead": 10_000_000,
    "crc32": True,
}


def n_params(num_layers: int, tiny: bool = False) -> int:
    d = dict(FULL_DIMS, **(TINY_DIMS if tiny else {}))
    dim, hidden, vocab = d["embed_dim"], d["intermediate_dim"], d["vocab_size"]
    kv_dim = dim // d["num_heads"] * d["num_kv_heads"]
    layer = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden + 2 * dim  # attention, MLP, two norms
    return 2 * vocab * dim + num_layers * layer + dim  # embeddings, output, layers, final norm


def parse_writer(text: str) -> Dict[str, Any]:
    """'thread_count=4,sync_files=false' -> the options that differ from torch's defaults; 'defaults' -> {}."""
    options: Dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        if item.strip() == "defaults":
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in TORCH_DEFAULTS:
            raise argparse.ArgumentTypeError(
                f"expected KEY=VALUE with KEY one of {', '.join(TORCH_DEFAULTS)}, or 'defaults'; got {item!r}"
            )
        if isinstance(TORCH_DEFAULTS[key], bool):
            if value.strip().lower() not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"{key}: expected true or false, got {value!r}")
            options[key] = value.strip().lower() == "true"
        else:
            options[key] = int(value)
    return options


def writer_spec(options: Dict[str, Any]) -> str:
    return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()) or "defaults"


def writer_label(options: Dict[str, Any]) -> str:
    return f"new ({writer_spec(options).replace(',', ', ')})"


# ---------------------------------------------------------------------------------------------
# The worker: one torchrun process (imports torch)


def new_save(path: Path, model, optimizer, thread_count: int = 1, crc32: bool = True, **writer_options) -> None:
    """The new step checkpoint: every rank writes its own shards of the model and the optimizer state,
    no gather, into `path/state` (all ranks call this). `crc32=False` turns off torch.save's checksum
    for this save (`torch.serialization.set_crc32_options`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.serialization import get_crc32_options, set_crc32_options

    given = dict(writer_options, thread_count=thread_count, crc32=crc32)
    if all(TORCH_DEFAULTS[k] == v for k, v in given.items()):  # torch's defaults: the recipe's own save
        from ref_tuning.step_checkpoints import save_sharded

        return save_sharded(Path(path), model, optimizer)
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    writer = FileSystemWriter(Path(path) / "state", thread_count=thread_count, **writer_options)
    before = get_crc32_options()
    set_crc32_options(crc32)
    try:
        dcp.save(state, storage_writer=writer)
    finally:
        set_crc32_options(before)


def today_save(path: Path, model, optimizer, checkpointer, is_rank_zero: bool) -> Dict[str, float]:
    """What the recipe's `save_checkpoint` writes now: the gathered weights as an HF directory from
    rank 0, then the optimizer state with DCP's defaults (all ranks call this). Returns the seconds
    of each phase, as this rank saw them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torchtune import training

    t0 = time.perf_counter()
    state_dict = training.gather_cpu_state_dict(model, is_rank_zero)
    t1 = time.perf_counter()
    if is_rank_zero:
        checkpointer.save_checkpoint({training.MODEL_KEY: state_dict}, name=Path(path).resolve() / "model")
    del state_dict
    t2 = time.perf_counter()
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=Path(path) / "optimizer")
    t3 = time.perf_counter()
    return {"gather": t1 - t0, "HF write": t2 - t1, "optimizer dcp.save": t3 - t2}


def build(num_layers: int, tiny: bool, seed: int):
    """The sharded bf16 model with random weights and AdamW's state after one step on zero gradients."""
    import torch
    import torch.distributed as dist
    from torch.distributed import init_device_mesh
    from torchtune import training
    from torchtune.models.llama2 import llama2

    from ref_tuning.models import SHEARED_LLAMA_2_7B

    world, rank = dist.get_world_size(), dist.get_rank()
    with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
        model = llama2(**dict(SHEARED_LLAMA_2_7B, num_layers=num_layers, **(TINY_DIMS if tiny else {})))
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    training.shard_model(
        model=model,
        shard_conditions=[training.get_shard_conditions],
        cpu_offload=False,
        reshard_after_forward=True,
        dp_mesh=mesh,
    )
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_(0.0, 0.02, generator=generator)  # each rank fills its own shard
    with training.set_default_dtype(torch.bfloat16), torch.device("cpu"):
        for m in model.modules():
            if hasattr(m, "rope_init"):  # RoPE buffers are not in the state dict
                m.rope_init()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, fused=False, foreach=False)
    # One step on zero gradients, a parameter at a time (params without a gradient are skipped), so
    # that only one gradient exists at once: the full-size state needs 22 of this machine's 24 GB.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
        optimizer.step()
        p.grad = None
    return model, optimizer


def _bits(t):
    import torch

    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _mismatches(a: Any, b: Any, where: str = "") -> List[str]:
    """Where the nested state dicts `a` and `b` differ: keys, dtypes, shapes or any bit of a tensor."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))[:3]} differ"]
        return [m for k in a for m in _mismatches(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [m for i, (x, y) in enumerate(zip(a, b)) for m in _mismatches(x, y, f"{where}/{i}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"]
        return [] if torch.equal(_bits(a), _bits(b)) else [f"{where}: values differ"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def verify_new(path: Path, model, optimizer, num_layers: int, tiny: bool) -> Dict[str, Any]:
    """Load the `new` checkpoint at `path` into a freshly built model and optimizer (other random weights,
    optimizer state overwritten with noise) and compare every tensor bit for bit (all ranks call this)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    fresh_model, fresh_optimizer = build(num_layers, tiny, seed=1)
    with torch.no_grad():
        for state in fresh_optimizer.state.values():
            for name, value in state.items():
                if name != "step":
                    value.to_local().normal_()  # AdamW's state after zero gradients is zero: make it not
                else:
                    value.fill_(7.0)
    expected = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    before = _mismatches(
        expected,
        {
            "model": get_model_state_dict(fresh_model),
            "optimizer": get_optimizer_state_dict(fresh_model, fresh_optimizer),
        },
    )
    state = {
        "model": get_model_state_dict(fresh_model),
        "optimizer": get_optimizer_state_dict(fresh_model, fresh_optimizer),
    }
    dcp.load(state, checkpoint_id=Path(path) / "state")
    set_model_state_dict(fresh_model, state["model"])
    set_optimizer_state_dict(fresh_model, fresh_optimizer, optim_state_dict=state["optimizer"])
    loaded = {
        "model": get_model_state_dict(fresh_model),
        "optimizer": get_optimizer_state_dict(fresh_model, fresh_optimizer),
    }
    after = _mismatches(expected, loaded)
    n_tensors = len(loaded["model"]) + sum(len(s) for s in loaded["optimizer"]["state"].values())
    counts = torch.tensor([len(after), len(before) == 0], dtype=torch.int64)
    dist.all_reduce(counts)
    return {
        "mismatches": int(counts[0]),
        "fresh_was_identical": bool(counts[1]),
        "tensors_per_rank": n_tensors,
        "first_mismatches": after[:5],
    }


def dd_direct(workdir: Path, count: int) -> float:
    """Seconds for `dd if=/dev/zero bs=64M count=COUNT oflag=direct` into `workdir/ddtest`."""
    target = workdir / "ddtest"
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", f"bs={DD_BLOCK}", f"count={count}", "oflag=direct", "status=none"],
        check=True,
    )
    wall = time.perf_counter() - start
    target.unlink()
    os.sync()
    return wall


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_for_memory(needed: int, log, timeout: float = 1200.0, checks: int = 3) -> None:
    """Wait (untimed) until the system has had `needed` bytes available at `checks` checks in a row,
    5 s apart, up to `timeout` seconds: other work on the machine (tests) comes and goes, and at full
    size the gather leaves no room for it."""
    start = time.monotonic()
    ok = 0
    while ok < checks and time.monotonic() - start < timeout:
        free = mem_available()
        if free >= needed + 4 * GB:  # plenty: a passing test cannot take it all
            break
        ok = ok + 1 if free >= needed else 0
        if ok < checks:
            if not ok and int(time.monotonic() - start) % 60 < 5:
                log(f"waiting for memory: {free / GB:.1f} GB available, {needed / GB:.1f} GB needed")
            time.sleep(5)
    waited = time.monotonic() - start
    if waited > 5 * checks:
        log(f"waited {waited:.0f} s for memory; {mem_available() / GB:.1f} GB available, {needed / GB:.1f} GB needed")


def worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from benchmarks.convert import source_config
    from ref_tuning.hf_checkpoint import HFBinCheckpointer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    is_rank_zero = rank == 0
    workdir = args.workdir
    config_dir = workdir / "hf_config"  # the checkpoint_dir HFBinCheckpointer reads its config.json from
    if is_rank_zero:
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "config.json").write_text(json.dumps(source_config(args.num_layers, args.tiny), indent=2) + "\n")
    dist.barrier()

    def log(message: str) -> None:
        if is_rank_zero:
            print(f"[worker] {message}", file=sys.stderr, flush=True)

    def trim() -> None:
        """Hand the allocator's free pages back to the system: the per-tensor temporaries of building,
        stepping and gathering leave holes between long-lived tensors that would count as resident,
        and the full-size run needs all the memory it can get."""
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass

    def rss() -> str:
        """Every rank's resident memory now and at its peak so far (all ranks call this)."""
        page = os.sysconf("SC_PAGE_SIZE")
        now = int(Path("/proc/self/statm").read_text().split()[1]) * page
        mine = (now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        return "RSS now / peak: " + ", ".join(f"{a / GB:.2f} / {b / GB:.2f} GB" for a, b in every)

    log(f"started; {rss()}")
    start = time.perf_counter()
    model, optimizer = build(args.num_layers, args.tiny, seed=0)
    trim()
    n = sum(p.numel() for p in model.parameters())
    log(f"model built and optimizer stepped: {n:,} parameters, {time.perf_counter() - start:.1f} s; {rss()}")
    checkpointer = HFBinCheckpointer(str(config_dir), str(workdir))

    writers = args.writer or [parse_writer(w) for w in DEFAULT_WRITERS]
    methods = [("today", lambda out: today_save(out, model, optimizer, checkpointer, is_rank_zero))]
    for options in writers:
        full = dict(TORCH_DEFAULTS, **options)
        methods.append((writer_label(options), lambda out, o=full: new_save(out, model, optimizer, **o)))
    results: Dict[str, Any] = {
        "params": n,
        "dd": [],
        "today_phases": [],
        "methods": {label: {"walls": [], "bytes": []} for label, _ in methods},
    }
    for r in range(1, args.repeats + 1):
        if is_rank_zero:
            wall = dd_direct(workdir, args.dd_count)
            results["dd"].append(wall)
            log(f"repeat {r}/{args.repeats}: dd {args.dd_count * DD_BLOCK / GB:.2f} GB oflag=direct: {wall:.2f} s")
        for i, (label, save) in enumerate(methods):
            out = workdir / f"out-{i}"
            if is_rank_zero:
                remove(out)
                if label == "today":  # the gather puts the whole model on rank 0, besides its shards
                    wait_for_memory(2 * n + GB, log)
            dist.barrier()
            start = time.perf_counter()
            phases = save(out)
            dist.barrier()
            wall = time.perf_counter() - start
            if is_rank_zero:
                if phases:
                    results["today_phases"].append(phases)
                    log(
                        f"repeat {r}/{args.repeats}: {label} phases on rank 0: "
                        + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
                    )
                size = dir_bytes(out)
                results["methods"][label]["walls"].append(wall)
                results["methods"][label]["bytes"].append(size)
                rate = size / GB / wall
                log(f"repeat {r}/{args.repeats}: {label}: {wall:.2f} s, {size / GB:.2f} GB, {rate:.2f} GB/s")
                remove(out)
                os.sync()
            trim()
            log(f"repeat {r}/{args.repeats}: {label}: {rss()}")
    if args.verify:
        out = workdir / "out-verify"
        if is_rank_zero:
            remove(out)
        dist.barrier()
        new_save(out, model, optimizer)  # its defaults: what the recipe is to use
        dist.barrier()
        results["verify"] = verify_new(out, model, optimizer, args.num_layers, args.tiny)
        log(f"verify: {results['verify']}")
        dist.barrier()
        if is_rank_zero:
            remove(out)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    results["peak_rss"] = peaks
    if is_rank_zero:
        args.result.write_text(json.dumps(results, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------
# The subcommand (the launcher: no torch)


def report(results: Dict[str, Any], dd_bytes: int) -> str:
    dd_rate = dd_bytes / statistics.median(results["dd"])  # bytes/s
    rows = [
        "| method | median wall s | bytes written GB | GB/s | x today | x (bytes / dd throughput) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = statistics.median(results["methods"]["today"]["walls"])
    for label, m in results["methods"].items():
        wall, size = statistics.median(m["walls"]), statistics.median(m["bytes"])
        rows.append(
            f"| {label} | {wall:.2f} | {size / GB:.2f} | {size / GB / wall:.2f} | {wall / base:.2f} | "
            f"{wall / (size / dd_rate):.2f} |"
        )
    return "\n".join(rows)


def bench_checkpoint(args: argparse.Namespace) -> int:
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_lines(workdir)  # free disk before anything is written
    params = n_params(args.num_layers, args.tiny)
    state_bytes = 3 * 2 * params  # bf16 weights, AdamW's two moments
    dd_count = min(max(-(-state_bytes // DD_BLOCK), 16), 128)  # 1 to 8.6 GB
    check_disk(workdir, state_bytes + max(state_bytes, dd_count * DD_BLOCK))
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    log, result = logs / "worker.log", workdir / "result.json"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "benchmarks.checkpoint",
        "--worker",
        "--workdir",
        str(workdir),
        "--result",
        str(result),
        "--num-layers",
        str(args.num_layers),
        "--repeats",
        str(args.repeats),
        "--dd-count",
        str(dd_count),
    ]
    cmd += ["--tiny"] * args.tiny + ["--verify"] * args.verify
    for options in args.writer or []:
        cmd += ["--writer", writer_spec(options)]
    print(f"[bench] {args.nproc} processes, {params:,} parameters; progress in {log}", file=sys.stderr, flush=True)
    # The peak: every rank's shards and a base of about 0.6 GB, plus the whole model gathered on rank 0.
    peak = state_bytes + 2 * params + args.nproc * 6 * GB // 10 + GB // 4
    wait_for_memory(peak, lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
    with open(log, "w") as f:
        rc = subprocess.run(
            cmd,
            cwd=PROJECT_ROOT,
            env=dict(os.environ, **WORKER_ENV),
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
        ).returncode
    if rc != 0 or not result.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        print(f"[bench] the worker failed (exit {rc}); last lines of {log}:\n{tail}", file=sys.stderr)
        return 1
    results = json.loads(result.read_text())
    dd_bytes = dd_count * DD_BLOCK
    print("## checkpoint benchmark\n")
    print("\n".join(machine))
    print(
        f"- model: Sheared-LLaMA-2.7B shape, {args.num_layers} layers{' (tiny widths)' if args.tiny else ''}, "
        f"{results['params']:,} parameters, bf16, AdamW state after one step; "
        f"{args.nproc} processes, gloo, CPU"
    )
    dd_wall = statistics.median(results["dd"])
    print(
        f"- dd if=/dev/zero bs=64M count={dd_count} oflag=direct: {dd_bytes / GB:.2f} GB in "
        f"{dd_wall:.2f} s (median), {dd_bytes / GB / dd_wall:.2f} GB/s"
    )
    print(f"- {args.repeats} repeats, methods interleaved, medians; outputs deleted and os.sync() after each run\n")
    print(report(results, dd_bytes))
    print(f"\n- peak RSS per process: {', '.join(f'{b / GB:.2f} GB' for b in results['peak_rss'])}")
    if results["today_phases"]:
        phases = {k: statistics.median(p[k] for p in results["today_phases"]) for k in results["today_phases"][0]}
        print("- today's phases on rank 0 (medians): " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    if "verify" in results:
        v = results["verify"]
        ok = v["mismatches"] == 0 and not v["fresh_was_identical"]
        print(
            f"- verify: new_save's checkpoint ({writer_spec(NEW_SAVE_OPTIONS)}), loaded into a fresh model "
            f"with dcp.load: "
            f"{'bit-identical' if ok else 'MISMATCH ' + str(v['first_mismatches'])} "
            f"({v['tensors_per_rank']} tensors per rank)"
        )
        if not ok:
            return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "checkpoint",
        help="step checkpoint: gather + HF write vs sharded DCP write",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p)
    p.add_argument("--nproc", type=positive, default=2, help="processes (default 2)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="after timing, load new_save's checkpoint into a fresh model and check it bit for bit",
    )
    p.set_defaults(func=bench_checkpoint)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="outputs; about 17 GB free at full size")
    p.add_argument("--repeats", type=positive, default=3, help="runs of each method (default 3)")
    p.add_argument("--num-layers", type=positive, default=32, help="layers (default 32: the full 2.7B model)")
    p.add_argument(
        "--writer",
        type=parse_writer,
        action="append",
        help=f"one `new` row: KEY=VALUE,... over torch's defaults, KEY among {', '.join(TORCH_DEFAULTS)}, "
        f"or 'defaults'; repeatable (default: {' '.join(DEFAULT_WRITERS)})",
    )
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # narrow layers, for tests


def worker_main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint --worker")
    add_common(p)
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--dd-count", type=positive, required=True)
    p.add_argument("--verify", action="store_true")
    return worker(p.parse_args(argv))


def launcher_main(argv: Optional[List[str]] = None) -> int:
    """`python -m benchmarks.checkpoint ...` without `--worker`: the same as `python -m
    benchmarks checkpoint ...`, from a launcher that never imports torch (`bench train` does,
    so `python -m benchmarks` holds 0.3 GB more while the workers run: at full size this
    machine has little more to spare)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["checkpoint", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(worker_main() if "--worker" in sys.argv[1:] else launcher_main())
