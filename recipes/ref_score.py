"""Score a reference model for Rho-1: the per-token loss of every response token of a processed split.

    tune run --nproc_per_node 4 recipes/ref_score.py --config configs/ref_score.yaml [key=value ...]

Each process holds the whole model (no sharding for inference) and scores its share of the samples the store
lacks, writing its own part of the store (`ref_tuning.scoring`): a stopped run continues with any number of
processes. Rho-1 reads a sample's reference losses by `task_id` (`ScoreStore.losses`; with `store_entropy: true`,
the entropies too, `ScoreStore.entropies`).

Cross-fitted (`model_dir` a list of K directories, model i trained with `dataset.folds=K dataset.fold=i`): each
sample is scored by the model of its problem's fold, which never trained on that problem; one model is loaded at
a time, and the store records each sample's fold.
"""

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed import destroy_process_group, init_process_group
from torchtune import config, training, utils
from tqdm import tqdm

from ref_tuning.checkpointing import METADATA_FILE, CheckpointError, read_hf_config
from ref_tuning.config import BOOL, COMPONENT, POSITIVE_INT, STRING, ConfigError, one_line_errors, one_of
from ref_tuning.config import Kind, validate_config
from ref_tuning.data import fold_of_lines
from ref_tuning.index import DataError, SplitIndex, cache_folder
from ref_tuning.paths import check_separate
from ref_tuning.scoring import ScoreError, ScoreStore, ScoreWriter, load_reference, new_run_id, open_store
from ref_tuning.scoring import score_dataset

log = utils.get_logger("INFO")

MODEL_DIRS = Kind(
    lambda v: STRING.accepts(v) or isinstance(v, list) and len(v) >= 2 and all(STRING.accepts(d) for d in v),
    "an HF directory, or a list of K >= 2 (cross-fitted: model i trained with dataset.folds=K, dataset.fold=i)",
)
CONFIG_SCHEMA = {"model_dir": MODEL_DIRS, "output_dir": STRING, "device": one_of("cuda", "cpu"), "tokenizer": COMPONENT}
CONFIG_SCHEMA |= {"dataset": COMPONENT, "batch_size": POSITIVE_INT, "dtype": one_of("bf16", "fp32")}
CONFIG_SCHEMA |= {"store_dtype": one_of("float16", "float32")}
CONFIG_SCHEMA |= {"store_entropy": BOOL._replace(optional=True)}  # optional: configs from before it still run


class RefScoreRecipe:
    """Data-parallel scoring: setup (data, what is left), score (model by model), cleanup."""

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
        dirs = model_dirs(cfg)
        description = {"model_dir": str(Path(dirs[0]).resolve())}
        if len(dirs) > 1:  # only then: a single model's stores keep their description, and continue
            description = {"model_dir": [str(Path(d).resolve()) for d in dirs], "cross_fitted": _cross_fitted(dirs)}
        description |= {key: resolved[key] for key in ("dtype", "store_dtype", "dataset", "tokenizer")}
        self._store_entropy = bool(cfg.get("store_entropy", False))
        if self._store_entropy:  # recorded only when on: stores scored without it keep their description
            description["store_entropy"] = True
        if self.rank == 0:
            open_store(self._store, description)
        dist.barrier()
        store = ScoreStore(self._store)
        done = store.lines()  # by any earlier run, with any number of processes
        if store.damaged:
            n, files = len(store.damaged), ", ".join(sorted(set(store.damaged.values())))
            utils.log_rank_zero(log, f"{n} samples' scores are damaged (in {files}): scoring them again")
        todo = [i for i in range(len(self._ds)) if int(self._ds.lines[i]) not in done]
        n, by = len(self._ds), self.world_size
        utils.log_rank_zero(log, f"{n} samples, {n - len(todo)} scored already, {len(todo)} to score by {by} processes")
        # (model, fold, this process's items) for each model in turn; what is scored already is never redone.
        self._shares = [(dirs[0], None, todo[self.rank :: self.world_size])]
        if len(dirs) > 1:
            self._shares = self._fold_shares(cfg, dirs, todo)
        self._mine = [i for _, _, mine in self._shares for i in mine]
        run_id = [new_run_id() if self.rank == 0 else None]
        dist.broadcast_object_list(run_id, src=0)
        self._writer = (
            ScoreWriter(self._store, run_id[0], self.rank, cfg.store_dtype, self._store_entropy) if self._mine else None
        )

    def _fold_shares(self, cfg: DictConfig, dirs: List[str], todo: List[int]) -> List[Tuple[str, int, List[int]]]:
        """Cross-fitted: the items of fold k go to model k (trained without fold k), shared out among the processes."""
        d = cfg.dataset
        index = SplitIndex.open(self._ds.jsonl, self._ds.metadata, cache_folder(Path(d.data_dir), d.cache_dir))
        of_item = fold_of_lines(index, len(dirs))[self._ds.lines].tolist()
        shares = []
        for k, model_dir in enumerate(dirs):
            left = [i for i in todo if of_item[i] == k]
            utils.log_rank_zero(log, f"fold {k}: {of_item.count(k)} samples, {len(left)} to score, by {model_dir}")
            shares.append((model_dir, k, left[self.rank :: self.world_size]))
        return shares

    def score(self) -> None:
        bar = tqdm(total=len(self._mine), disable=self.rank != 0, desc="scoring (rank 0's share)", unit=" samples")
        pad_id = self._tokenizer.pad_id
        for model_dir, fold, mine in self._shares:
            if not mine:
                continue
            if fold is not None:
                bar.set_description(f"scoring fold {fold} (rank 0's share)")
            # One model at a time, freed before the next loads: the memory of one model, whatever the folds.
            model = load_reference(model_dir, self._device, self._dtype)
            # Longest first: the batch's padding is smallest when similar lengths go together.
            order = sorted(mine, key=lambda i: -int(self._ds.lengths[i]))
            score_dataset(model, self._ds, order, self._writer, self._device, self._batch_size, pad_id, bar, fold=fold)
            del model
            if self._device.type == "cuda":
                torch.cuda.empty_cache()
        bar.close()
        if self._writer is not None:
            self._writer.close()
        dist.barrier()
        if self.rank == 0:
            log.info(f"{self._store}: {len(ScoreStore(self._store))} of {len(self._ds)} samples scored")

    def cleanup(self) -> None:
        destroy_process_group()


def model_dirs(cfg: DictConfig) -> List[str]:
    """The models to score with: one, or K for cross-fitted scores (model i scores the samples of fold i)."""
    return [cfg.model_dir] if isinstance(cfg.model_dir, str) else list(cfg.model_dir)


def _cross_fitted(dirs: List[str]) -> Dict[str, Any]:
    """What scores.json says of a cross-fitted store."""
    return {
        "folds": len(dirs),
        "how": f"each problem is in fold sha256(problem id) mod {len(dirs)} (ref_tuning.data.problem_fold); a sample "
        "of fold i (`fold` in the .idx) is scored by model_dir[i], trained with dataset.fold=i: without its problem",
    }


def _same_path(a: str, b: str) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


def _check_folds(cfg: DictConfig, dirs: List[str]) -> None:
    """Cross-fitted: model i must say (its ref_tuning.json) that it was trained on this data without fold i."""
    if cfg.dataset.get("folds") is not None or cfg.dataset.get("fold") is not None:
        raise ConfigError(
            "config key 'dataset.folds'/'dataset.fold': the samples to score are Rho-1's whole draw; leave them null "
            "(the folds of a cross-fitted store come from the list of model_dir)"
        )
    if len(dirs) == 1:
        return
    raw = OmegaConf.to_container(cfg.tokenizer, resolve=False).get("path")
    if "${model_dir}" in str(raw):
        raise ConfigError(
            f"config key 'tokenizer.path': {raw} cannot name one file when model_dir is a list; set it to the "
            f"tokenizer of the models, e.g. tokenizer.path={Path(dirs[0]) / 'tokenizer.model'}"
        )
    k = len(dirs)
    for i, model_dir in enumerate(dirs):
        path = Path(model_dir) / METADATA_FILE
        try:
            trained = json.loads(path.read_text())["config"]["dataset"]
        except (OSError, ValueError, KeyError, TypeError):
            trained = None
        if not isinstance(trained, dict):
            raise ConfigError(
                f"config key 'model_dir' (item {i}): {path} holds no training config ('config.dataset'); cross-fitted "
                "scoring reads each model's folds there. Use the checkpoint_final (or checkpoint_best) directory that "
                "recipes/ref_finetune.py wrote"
            )
        wanted = {"folds": k, "fold": i, "data_dir": cfg.dataset.data_dir, "split": cfg.dataset.split}
        for key, value in wanted.items():
            found = trained.get(key)
            same = _same_path(str(found), value) if key == "data_dir" and found is not None else found == value
            if not same:
                fix = (
                    f"list the K={k} models in fold order, model i trained with dataset.folds={k} dataset.fold=i"
                    if key in ("folds", "fold")
                    else f"score the data the models were trained on (dataset.{key}={found})"
                )
                raise ConfigError(
                    f"config key 'model_dir' (item {i}): {model_dir} was trained with dataset.{key}={found!r} "
                    f"({METADATA_FILE}), but scoring needs dataset.{key}={value!r} there; {fix}"
                )


def _check(cfg: DictConfig) -> None:
    """Before anything is built or written: the values, the model directory, a store apart from its inputs."""
    validate_config(cfg, CONFIG_SCHEMA)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"config key 'device': cuda, but torch {torch.__version__} sees no CUDA device here; "
            "run on a GPU machine, or set device=cpu for tiny models"
        )
    dirs = model_dirs(cfg)
    for model_dir in dirs:
        read_hf_config(model_dir)  # names the directory and what is missing
    _check_folds(cfg, dirs)
    try:
        check_separate([*dirs, cfg.dataset.data_dir], [cfg.output_dir])
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
