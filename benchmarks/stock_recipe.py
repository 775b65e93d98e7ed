"""torchtune's own recipes, the peers ours is measured against, run as they ship but for their CPU guards:

    tune run --nproc_per_node 2 benchmarks/stock_recipe.py --config CONFIG [key=value ...]

runs `full_finetune_distributed`. On CPU, `training.get_memory_stats` raises and
`training.cleanup_before_training` calls `torch.cpu.empty_cache`, which does not exist; both are skipped
there; without NCCL, process groups are gloo's. Nothing else changes.
Another of torchtune's recipes runs the same way with REF_TUNING_STOCK_RECIPE set to its name (e.g.
`lora_finetune_distributed`): `tune run` has no place for it, and the environment reaches every worker.
`stock_config` makes its config from one of ours: the same model, tokenizer, data, optimizer and
schedule, with torchtune's `FullModelHFCheckpointer` reading the same HF directory. The parity tests
(tests/) and `python -m benchmarks train` and `gpu` use it.
"""

import os
import runpy
from pathlib import Path
from typing import Any

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
    files: list[str] = (
        sorted(set(OmegaConf.load(index).weight_map.values())) if index.is_file() else ["pytorch_model.bin"]
    )
    cfg: dict[str, Any] = {
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


def write_stock_config(path: str, ours: str, *overrides: str) -> None:
    """Write to `path` the stock recipe's config for our config file `ours` with `overrides`, logging through the
    same metric logger; where ours packs, the same samples packed by torchtune's own `PackedDataset`."""
    cfg = OmegaConf.merge(OmegaConf.load(ours), OmegaConf.from_dotlist(list(overrides)))
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    stock = stock_config(cfg, cfg.output_dir)
    stock.metric_logger._component_ = cfg.metric_logger._component_
    stock.log_peak_memory_stats = cfg.device == "cuda"
    if cfg.dataset.packed:  # the stock recipe reads `dataset.packed` to pick its collate function
        stock.dataset._component_ = "benchmarks.stock_recipe.torchtune_packed"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(stock, path)


def torchtune_packed(tokenizer, packed: bool = True, **kwargs):
    """Our dataset of the same draw, packed the way torchtune's own builders pack: `PackedDataset`, in order,
    samples kept whole."""
    from torchtune.datasets import PackedDataset

    from ref_tuning.data import codecontests_dataset

    ds = codecontests_dataset(tokenizer, **kwargs)
    return PackedDataset(ds, max_seq_len=kwargs["max_seq_len"], padding_idx=tokenizer.pad_id, split_across_pack=False)


def _memory_stats(device: torch.device, reset_stats: bool = True) -> dict[str, float]:
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
