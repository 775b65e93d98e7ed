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
from typing import List

import ref_tuning  # noqa: F401, I001  first: it hides torchao's import-time warning before torchtune imports torchao

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed import destroy_process_group, init_process_group
from torchtune import config, training, utils
from tqdm import tqdm

from ref_tuning.hf_checkpoint import METADATA_FILE, CheckpointError, read_hf_config
from ref_tuning.config import BOOL, COMPONENT, POSITIVE_INT, STRING, ConfigError, one_line_errors, one_of
from ref_tuning.config import Kind, validate_config
from ref_tuning.data import problem_fold
from ref_tuning.line_index import DataError
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
        k = len(dirs)
        paths = [str(Path(d).resolve()) for d in dirs]
        description = {"model_dir": paths if k > 1 else paths[0]}  # a single model's stores keep their description
        if k > 1:
            how = f"each problem is in fold sha256(problem id) mod {k} (ref_tuning.data.problem_fold); a sample "
            how += "of fold i (`fold` in the .idx) is scored by model_dir[i], trained with dataset.fold=i: "
            description["cross_fitted"] = {"folds": k, "how": how + "without its problem"}
        description |= {key: resolved[key] for key in ("dtype", "store_dtype", "dataset", "tokenizer")}
        store_entropy = bool(cfg.get("store_entropy", False))
        description |= {"store_entropy": True} if store_entropy else {}  # only when on: older stores keep theirs
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
        # Model i scores what is left of fold i, shared out among the processes; a single model is fold None of K=1.
        fold_of = [problem_fold(problem, k) for problem in self._ds.problem_ids]
        self._shares = []  # (model, fold, this process's items)
        for i, model_dir in enumerate(dirs):
            left = [j for j in todo if fold_of[j] == i]
            if k > 1:
                utils.log_rank_zero(log, f"fold {i}: {fold_of.count(i)} samples, {len(left)} to score, by {model_dir}")
            self._shares.append((model_dir, i if k > 1 else None, left[self.rank :: self.world_size]))
        self._total = sum(len(mine) for _, _, mine in self._shares)
        run_id = [new_run_id() if self.rank == 0 else None]
        dist.broadcast_object_list(run_id, src=0)
        self._writer = (
            ScoreWriter(self._store, run_id[0], self.rank, cfg.store_dtype, store_entropy) if self._total else None
        )

    def score(self) -> None:
        bar = tqdm(total=self._total, disable=self.rank != 0, desc="scoring (rank 0's share)", unit=" samples")
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


def _check(cfg: DictConfig) -> None:
    """Before anything is built or written: the values, the model directories (cross-fitted: that model i says, in its
    ref_tuning.json, that it was trained on this data without fold i), a store apart from its inputs."""
    validate_config(cfg, CONFIG_SCHEMA)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"config key 'device': cuda, but torch {torch.__version__} sees no CUDA device here; "
            "run on a GPU machine, or set device=cpu for tiny models"
        )
    dirs = model_dirs(cfg)
    k = len(dirs)
    for model_dir in dirs:
        read_hf_config(model_dir)  # names the directory and what is missing
    if cfg.dataset.get("folds") is not None or cfg.dataset.get("fold") is not None:
        raise ConfigError(
            "config key 'dataset.folds'/'dataset.fold': the samples to score are Rho-1's whole draw; leave them null "
            "(the folds of a cross-fitted store come from the list of model_dir)"
        )
    raw = OmegaConf.to_container(cfg.tokenizer, resolve=False).get("path")
    if k > 1 and "${model_dir}" in str(raw):
        raise ConfigError(
            f"config key 'tokenizer.path': {raw} cannot name one file when model_dir is a list; set it to the "
            f"tokenizer of the models, e.g. tokenizer.path={Path(dirs[0]) / 'tokenizer.model'}"
        )
    for i, model_dir in enumerate(dirs if k > 1 else []):
        path = Path(model_dir) / METADATA_FILE
        try:
            trained = dict(json.loads(path.read_text())["config"]["dataset"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(
                f"config key 'model_dir' (item {i}): {path} holds no training config ('config.dataset'); cross-fitted "
                "scoring reads each model's folds there. Use the checkpoint_final (or checkpoint_best) directory that "
                "recipes/ref_finetune.py wrote"
            ) from None
        wanted = {"folds": k, "fold": i, "data_dir": cfg.dataset.data_dir, "split": cfg.dataset.split}
        for key, value in wanted.items():
            found = trained.get(key)
            same_dir = key == "data_dir" and found is not None and Path(str(found)).resolve() == Path(value).resolve()
            if found == value or same_dir:
                continue
            order = f"list the K={k} models in fold order, model i trained with dataset.folds={k} dataset.fold=i"
            raise ConfigError(
                f"config key 'model_dir' (item {i}): {model_dir} was trained with dataset.{key}={found!r} "
                f"({METADATA_FILE}), but scoring needs dataset.{key}={value!r} there; "
                + (order if key in ("folds", "fold") else "score the data the models were trained on")
            )
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
