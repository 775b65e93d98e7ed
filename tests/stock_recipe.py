"""torchtune's own `full_finetune_distributed` recipe, the peer our recipe is measured against, run as
it ships but for its two CPU guards (shared/docs/TORCHTUNE_NOTES.md):

    tune run --nproc_per_node 2 tests/stock_recipe.py --config CONFIG [key=value ...]

On CPU, `training.get_memory_stats` raises and `training.cleanup_before_training` calls
`torch.cpu.empty_cache`, which does not exist; both are skipped there, nothing else changes.
`stock_config` makes its config from one of ours: the same model, tokenizer, data, optimizer and
schedule, with torchtune's `FullModelHFCheckpointer` reading the same HF directory.
"""

import runpy
from pathlib import Path
from typing import Any, Dict, List

import torch
import torchtune
from omegaconf import DictConfig, OmegaConf
from torchtune import training

STOCK_RECIPE = Path(torchtune.__file__).resolve().parent.parent / "recipes" / "full_finetune_distributed.py"
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

if __name__ == "__main__":
    training.get_memory_stats = _memory_stats
    training.cleanup_before_training = _cleanup_before_training
    runpy.run_path(str(STOCK_RECIPE), run_name="__main__")
