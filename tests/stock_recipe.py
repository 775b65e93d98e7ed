"""torchtune's own `full_finetune_distributed` recipe, the peer our recipe is measured against, run as
it ships but for its CPU guards (shared/docs/TORCHTUNE_NOTES.md):

    tune run --nproc_per_node 2 tests/stock_recipe.py --config CONFIG [key=value ...]

On CPU, `training.get_memory_stats` raises and `training.cleanup_before_training` calls
`torch.cpu.empty_cache`, which does not exist; both are skipped there; without NCCL, process groups are
gloo's. Nothing else changes.
Another of torchtune's recipes runs the same way with REF_TUNING_STOCK_RECIPE set to its name (e.g.
`lora_finetune_distributed`): `tune run` has no place for it, and the environment reaches every worker.
`stock_config` makes its config from one of ours: the same model, tokenizer, data, optimizer and
schedule, with torchtune's `FullModelHFCheckpointer` reading the same HF directory.
"""

import os
import runpy
from pathlib import Path
from typing import Any, Dict, List

import torch
import torchtune
from omegaconf import DictConfig, OmegaConf
from torchtune import training

RECIPES_DIR = Path(torchtune.__file__).resolve().parent.parent / "recipes"  # the recipes the torchtune wheel ships
STOCK_RECIPE = RECIPES_DIR / "full_finetune_distributed.py"
RECIPE_ENV = "REF_TUNING_STOCK_RECIPE"  # another of them to run, by name
_NO_MEMORY_STATS = {"peak_memory_active": 0.0, "peak_memory_alloc": 0.0, "peak_memory_reserved": 0.0}


def stock_config(ours: DictConfig, output_dir: str) -> DictConfig:
    """The stock recipe's config for the run that `ours` (one of our configs, resolved) describes."""
    checkpoint_dir = Path(ours.checkpointer.checkpoint_dir)
    index = checkpoint_dir / "pytorch_model.bin.index.json"
    files: List[str] = (
        sorted(set(OmegaConf.load(index).weight_map.values())) if index.is_file() else ["pytorch_model.bin"]
    )
    cfg: Dict[str, Any] = {
        "output_dir": output_dir,
        "model": OmegaConf.to_container(ours.model),
        "tokenizer": OmegaConf.to_container(ours.tokenizer),
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(checkpoint_dir),
            "checkpoint_files": files,
            "model_type": "LLAMA2",
            "output_dir": output_dir,
            "recipe_checkpoint": None,
        },
        "resume_from_checkpoint": False,
        "dataset": OmegaConf.to_container(ours.dataset),
        "seed": ours.seed,
        "shuffle": ours.shuffle,
        "batch_size": ours.batch_size,
        "epochs": ours.epochs,
        "max_steps_per_epoch": ours.max_steps_per_epoch,
        "gradient_accumulation_steps": ours.gradient_accumulation_steps,
        "clip_grad_norm": ours.clip_grad_norm,
        "optimizer": OmegaConf.to_container(ours.optimizer),
        "lr_scheduler": OmegaConf.to_container(ours.lr_scheduler),
        "loss": OmegaConf.to_container(ours.loss),
        "optimizer_in_bwd": False,
        "compile": False,
        "device": ours.device,
        "dtype": "fp32" if ours.precision == "fp32" else "bf16",  # the stock recipe has no fp32 master weights
        "enable_activation_checkpointing": ours.enable_activation_checkpointing,
        "enable_activation_offloading": False,
        "fsdp_reshard_after_forward": ours.fsdp_reshard_after_forward,
        "metric_logger": {
            "_component_": "torchtune.training.metric_logging.DiskLogger",
            "log_dir": f"{output_dir}/logs",
        },
        "log_every_n_steps": 1,
        "log_peak_memory_stats": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }
    return OmegaConf.create(cfg)


def _memory_stats(device: torch.device, reset_stats: bool = True) -> Dict[str, float]:
    return _real_memory_stats(device, reset_stats) if device.type != "cpu" else dict(_NO_MEMORY_STATS)


def _cleanup_before_training() -> None:
    if torch.cuda.is_available():
        _real_cleanup()


_real_memory_stats, _real_cleanup = training.get_memory_stats, training.cleanup_before_training


def stock_recipe(name: str = "") -> Path:
    """The path of torchtune's recipe `name` (default: full_finetune_distributed)."""
    path = RECIPES_DIR / f"{name}.py" if name else STOCK_RECIPE
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.py") if not p.name.startswith("_")))
        raise SystemExit(f"{RECIPE_ENV}={name}: torchtune {torchtune.__version__} ships no such recipe; one of {known}")
    return path


def _init_process_group(backend=None, **kwargs) -> None:
    # lora_finetune_distributed asks for "cuda:nccl,cpu:gloo" outright; a CPU build of torch has no NCCL.
    _real_init(backend if torch.distributed.is_nccl_available() else "gloo", **kwargs)


_real_init = torch.distributed.init_process_group


if __name__ == "__main__":
    training.get_memory_stats = _memory_stats
    training.cleanup_before_training = _cleanup_before_training
    torch.distributed.init_process_group = _init_process_group
    runpy.run_path(str(stock_recipe(os.environ.get(RECIPE_ENV, ""))), run_name="__main__")
