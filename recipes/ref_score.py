"""Score a reference model for Rho-1: the per-token loss of every response token of a processed split.

    tune run --nproc_per_node 4 recipes/ref_score.py --config configs/ref_score.yaml [key=value ...]

Each process holds the whole model (no sharding for inference) and scores its share of the samples the store
lacks, writing its own part of the store (`ref_tuning.scoring`): a stopped run continues with any number of
processes. Rho-1 reads a sample's reference losses by `task_id` (`ScoreStore.losses`).
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed import destroy_process_group, init_process_group
from torchtune import config, training, utils
from tqdm import tqdm

from ref_tuning.checkpointing import CheckpointError, read_hf_config
from ref_tuning.config import COMPONENT, POSITIVE_INT, STRING, ConfigError, one_line_errors, one_of, validate_config
from ref_tuning.index import DataError
from ref_tuning.paths import check_separate
from ref_tuning.scoring import ScoreError, ScoreStore, ScoreWriter, load_reference, new_run_id, open_store
from ref_tuning.scoring import score_dataset

log = utils.get_logger("INFO")

CONFIG_SCHEMA = {"model_dir": STRING, "output_dir": STRING, "device": one_of("cuda", "cpu"), "tokenizer": COMPONENT}
CONFIG_SCHEMA |= {"dataset": COMPONENT, "batch_size": POSITIVE_INT, "dtype": one_of("bf16", "fp32")}
CONFIG_SCHEMA |= {"store_dtype": one_of("float16", "float32")}


class RefScoreRecipe:
    """Data-parallel scoring: setup (data, what is left, model), score, cleanup."""

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        world = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)  # else no torchrun
        init_process_group(training.get_distributed_backend(self._device.type), **world)
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._store = Path(cfg.output_dir)
        self._batch_size = cfg.batch_size

    def setup(self, cfg: DictConfig) -> None:
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._ds = config.instantiate(cfg.dataset, self._tokenizer)
        if getattr(self._ds, "packed", False):
            raise ConfigError(
                "config key 'dataset.packed': must be false for scoring: every sample is scored on its own, as Rho-1 does"
            )
        resolved = OmegaConf.to_container(cfg, resolve=True)
        description = {"model_dir": str(Path(cfg.model_dir).resolve())}
        description |= {key: resolved[key] for key in ("dtype", "store_dtype", "dataset", "tokenizer")}
        if self.rank == 0:
            open_store(self._store, description)
        dist.barrier()
        store = ScoreStore(self._store)
        done = store.lines()  # by any earlier run, with any number of processes
        if store.damaged:
            n, files = len(store.damaged), ", ".join(sorted(set(store.damaged.values())))
            utils.log_rank_zero(log, f"{n} samples' scores are damaged (in {files}): scoring them again")
        todo = [i for i in range(len(self._ds)) if int(self._ds.lines[i]) not in done]
        self._mine = todo[self.rank :: self.world_size]
        n, by = len(self._ds), self.world_size
        utils.log_rank_zero(log, f"{n} samples, {n - len(todo)} scored already, {len(todo)} to score by {by} processes")
        run_id = [new_run_id() if self.rank == 0 else None]
        dist.broadcast_object_list(run_id, src=0)
        self._writer = ScoreWriter(self._store, run_id[0], self.rank, cfg.store_dtype) if self._mine else None
        self._model = load_reference(cfg.model_dir, self._device, self._dtype)

    def score(self) -> None:
        bar = tqdm(total=len(self._mine), disable=self.rank != 0, desc="scoring (rank 0's share)", unit=" samples")
        # Longest first: the batch's padding is smallest when similar lengths go together.
        order = sorted(self._mine, key=lambda i: -int(self._ds.lengths[i]))
        pad_id = self._tokenizer.pad_id
        score_dataset(self._model, self._ds, order, self._writer, self._device, self._batch_size, pad_id, bar)
        bar.close()
        if self._writer is not None:
            self._writer.close()
        dist.barrier()
        if self.rank == 0:
            log.info(f"{self._store}: {len(ScoreStore(self._store))} of {len(self._ds)} samples scored")

    def cleanup(self) -> None:
        destroy_process_group()


def _check(cfg: DictConfig) -> None:
    """Before anything is built or written: the values, the model directory, a store apart from its inputs."""
    validate_config(cfg, CONFIG_SCHEMA)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"config key 'device': cuda, but torch {torch.__version__} sees no CUDA device here; "
            "run on a GPU machine, or set device=cpu for tiny models"
        )
    read_hf_config(cfg.model_dir)  # names the directory and what is missing
    try:
        check_separate([cfg.model_dir, cfg.dataset.data_dir], [cfg.output_dir])
    except ValueError as e:
        raise ConfigError(f"config key 'output_dir': {e}") from None


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    with one_line_errors(ConfigError, DataError, CheckpointError, ScoreError):
        _check(cfg)
        recipe = RefScoreRecipe(cfg)
        recipe.setup(cfg)
        recipe.score()
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
