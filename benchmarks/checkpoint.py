"""A step checkpoint of Sheared-LLaMA-2.7B: torchtune's recipe's way of saving against ours.

    python -m benchmarks checkpoint [--workdir DIR] [--repeats N] [--methods KEYS] [--num-layers N] [--nproc N]

The state: the model (2,701,560,320 parameters; `--num-layers` keeps fewer layers) in bf16, loaded from a random
HF checkpoint (written once) and sharded over `--nproc` CPU processes as torchtune's `full_finetune_distributed`
does it, and AdamW's state after one step: 5.4 GB of weights and 10.8 GB of optimizer state at full size.

  torchtune   `full_finetune_distributed`'s save after an epoch but the last (`CheckpointClient`,
              `FullModelHFCheckpointer`): model and optimizer state gathered to rank 0, which writes the HF
              safetensors shards and `recipe_state.pt`
  ours        `recipes/ref_finetune.py`'s (`ref_tuning.step_checkpoints.save_sharded`): every rank writes its own
              shards of the model and the optimizer state with torch.distributed.checkpoint

One `torchrun` launch of this module builds the model once; each repeat times `dd oflag=direct` (rank 0: the
disk's own rate), then each save from a barrier before it to one after it. `x dd`: a save's time over dd's for
the same bytes.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchmarks as bench
from benchmarks import GB

HELP = "a step checkpoint: torchtune's recipe's way of saving vs ours"
KEYS = ["torchtune", "ours"]
DD_BLOCK = 64 * 2**20


def build(source: Path, torchtune_out: Path):
    """The model loaded and sharded as torchtune's recipe does it, AdamW's state after one step, and the
    recipe's checkpoint client (its checkpointer writes into `torchtune_out`)."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.distributed import init_device_mesh
    from torchtune import training
    from torchtune.training.checkpointing._checkpoint_client import CheckpointClient

    from ref_tuning.hf_checkpoint import read_hf_config
    from ref_tuning.models import llama_from_hf_config

    files = sorted(set(json.loads((source / "pytorch_model.bin.index.json").read_text())["weight_map"].values()))
    checkpointer = {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": str(source)}
    checkpointer.update(checkpoint_files=files, model_type="LLAMA2", output_dir=str(torchtune_out))
    client = CheckpointClient(OmegaConf.create({"device": "cpu", "checkpointer": checkpointer}))
    with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
        model = llama_from_hf_config(read_hf_config(source))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    training.shard_model(model, [training.get_shard_conditions], cpu_offload=False, dp_mesh=mesh)
    state = client.load_base_checkpoint()[training.MODEL_KEY]  # on every rank, as in the recipe
    training.load_from_full_model_state_dict(model, state, torch.device("cpu"), strict=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, client


def worker(workdir: str, repeats: str, methods: str, dd_count: str) -> None:
    import torch.distributed as dist
    from torchtune.training.checkpointing._checkpoint_client import TrainingProgress

    from ref_tuning.step_checkpoints import save_sharded

    dist.init_process_group("gloo")
    rank0, workdir = dist.get_rank() == 0, Path(workdir)
    out = {key: workdir / f"out-{key}" for key in KEYS}
    model, optimizer, client = build(workdir / "source", out["torchtune"])
    progress = TrainingProgress(seed=0, epochs_run=1, total_epochs=2, max_steps_per_epoch=0, dataloader_state_dict={})
    saves = {
        "torchtune": lambda: client.save_checkpoint(model, optimizer, progress, epoch=0),
        "ours": lambda: save_sharded(out["ours"], model, optimizer),
    }
    results = {"params": sum(p.numel() for p in model.parameters()), "dd": [], "walls": {}, "bytes": {}}
    for r in range(int(repeats)):
        if rank0:  # the disk's own rate, past the page cache
            start, dd = time.perf_counter(), ["dd", "if=/dev/zero", f"of={workdir / 'ddtest'}", "oflag=direct"]
            subprocess.run(dd + [f"bs={DD_BLOCK}", f"count={dd_count}", "status=none"], check=True)
            results["dd"].append(time.perf_counter() - start)
            bench.remove(workdir / "ddtest")
        for key in methods.split(","):
            dist.barrier()
            start = time.perf_counter()
            saves[key]()
            dist.barrier()
            if rank0:
                results["walls"].setdefault(key, []).append(time.perf_counter() - start)
                results["bytes"][key] = size = bench.dir_bytes(out[key])
                bench.say(f"repeat {r + 1}/{repeats}: {key} {results['walls'][key][-1]:.2f} s, {size / GB:.2f} GB")
                for p in out[key].iterdir() if out[key].is_dir() else []:
                    bench.remove(p)  # torchtune's checkpointer keeps its output_dir
                os.sync()
    if rank0:
        (workdir / "result.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main(args) -> int:
    dims = bench.model_dims(args)
    bench.make_checkpoint(args.workdir / "source", dims, "bfloat16")
    dd_count = min(max(-(-3 * 2 * bench.n_params(dims) // DD_BLOCK), 16), 128)  # the bf16 state's size, 1 to 8.6 GB
    (args.workdir / "result.json").unlink(missing_ok=True)
    log = args.workdir / "logs" / "worker.log"
    bench.say(f"{args.nproc} processes, {bench.n_params(dims):,} parameters; progress in {log}")
    worker = [args.workdir, args.repeats, ",".join(args.methods), dd_count]
    cmd = bench.torchrun(args.nproc, "benchmarks.checkpoint", "--worker", *map(str, worker))
    if bench.run_child(cmd, log)[2] != 0:
        raise SystemExit(f"the worker failed; last lines of {log}:\n{bench.tail(log, 30)}")
    results = json.loads((args.workdir / "result.json").read_text())
    dd_rate = dd_count * DD_BLOCK / statistics.median(results["dd"])
    print("## checkpoint benchmark\n\n" + "\n".join(bench.machine_lines(args.workdir)))
    print(f"- model: {results['params']:,} parameters, bf16, AdamW state after one step; {args.nproc} processes (gloo)")
    print(f"- dd bs=64M count={dd_count} oflag=direct: {dd_rate / GB:.2f} GB/s; {args.repeats} repeats, medians\n")
    print("| method | median wall s | bytes written GB | GB/s | x dd |\n| --- | ---: | ---: | ---: | ---: |")
    for key, walls in results["walls"].items():
        wall, size = statistics.median(walls), results["bytes"][key]
        print(f"| {key} | {wall:.2f} | {size / GB:.2f} | {size / GB / wall:.2f} | {wall / (size / dd_rate):.2f} |")
    return 0


def add_arguments(p) -> None:
    p.add_argument("--repeats", type=bench.positive, default=3, help="runs of each method (default 3)")
    p.add_argument("--nproc", type=bench.positive, default=2, help="processes (default 2)")
    bench.add_model_shape(p)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(*sys.argv[2:])
