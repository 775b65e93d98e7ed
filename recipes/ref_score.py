"""Score a reference model for Rho-1: the per-token loss of every response token of a processed split.

    tune run --nproc_per_node 4 recipes/ref_score.py --config configs/ref_score.yaml [key=value ...]

Each process holds the whole model and scores its share of what the store lacks (a stopped run continues with any
number of processes); cross-fitted, each sample by the model that never trained on its problem (docs/rho1.md).
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
from ref_tuning.config import Kind, parse, validate_config
from ref_tuning.data import problem_fold
from ref_tuning import run_dir
from ref_tuning.atomic import WriteError
from ref_tuning.line_index import DataError
from ref_tuning.paths import check_separate
from ref_tuning.scoring import DATA_KEY, ScoreError, ScoreStore, ScoreWriter, data_record, load_reference, new_run_id
from ref_tuning.scoring import open_store, score_dataset

log = utils.get_logger("INFO")

MODEL_DIRS = Kind(
    lambda v: STRING.accepts(v) or isinstance(v, list) and len(v) >= 2 and all(STRING.accepts(d) for d in v),
    "an HF directory, or a list of K >= 2 (cross-fitted: model i trained with dataset.folds=K, dataset.fold=i)",
)
CONFIG_SCHEMA = {"model_dir": MODEL_DIRS, "output_dir": STRING, "device": one_of("cuda", "cpu"), "tokenizer": COMPONENT}
CONFIG_SCHEMA |= {"dataset": COMPONENT, "batch_size": POSITIVE_INT, "dtype": one_of("bf16", "fp32")}
CONFIG_SCHEMA |= {"store_dtype": one_of("float16", "float32")}
CONFIG_SCHEMA |= {"store_entropy": BOOL._replace(optional=True)}  # optional: configs from before it still run


def score(cfg: DictConfig, dirs: List[str]) -> None:
    """Data-parallel scoring: each process scores its share of what the store lacks, one model at a time."""
    device = utils.get_device(device=cfg.device)
    dtype = training.get_dtype(cfg.dtype, device=device)
    world = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)  # else no torchrun
    init_process_group(training.get_distributed_backend(device.type), **world)
    world_size, rank = utils.get_world_size_and_rank()
    tokenizer = config.instantiate(cfg.tokenizer)
    ds = config.instantiate(cfg.dataset, tokenizer)
    if getattr(ds, "packed", False):
        raise ConfigError(
            "config key 'dataset.packed': must be false for scoring: every sample is scored on its own, as Rho-1 does"
        )
    store_dir, k = Path(cfg.output_dir), len(dirs)
    paths = [str(Path(d).resolve()) for d in dirs]
    description = {"model_dir": paths if k > 1 else paths[0]}  # a single model's stores keep their description
    if k > 1:
        how = f"each problem is in fold sha256(problem id) mod {k} (ref_tuning.data.problem_fold); a sample "
        how += "of fold i (`fold` in the .idx) is scored by model_dir[i], trained with dataset.fold=i: "
        description["cross_fitted"] = {"folds": k, "how": how + "without its problem"}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    description |= {key: resolved[key] for key in ("dtype", "store_dtype", "dataset", "tokenizer")}
    store_entropy = bool(cfg.get("store_entropy", False))
    description |= {"store_entropy": True} if store_entropy else {}  # only when on: older stores keep theirs
    description[DATA_KEY] = data_record(ds)
    if rank == 0:
        open_store(store_dir, description)
    dist.barrier()
    store = ScoreStore(store_dir)
    if store.damaged:
        n, files = len(store.damaged), ", ".join(sorted(set(store.damaged.values())))
        utils.log_rank_zero(log, f"{n} samples' scores are damaged (in {files}): scoring them again")
    done = store.lines()  # by any earlier run, with any number of processes
    todo = [i for i in range(len(ds)) if int(ds.lines[i]) not in done]
    n, by = len(ds), world_size
    utils.log_rank_zero(log, f"{n} samples, {n - len(todo)} scored already, {len(todo)} to score by {by} processes")
    # Model i scores what is left of fold i, shared out among the processes; a single model is fold None of K=1.
    fold_of = [problem_fold(problem, k) for problem in ds.problem_ids]
    shares = []  # (model, fold, this process's items)
    for i, model_dir in enumerate(dirs):
        left = [j for j in todo if fold_of[j] == i]
        if k > 1:
            utils.log_rank_zero(log, f"fold {i}: {fold_of.count(i)} samples, {len(left)} to score, by {model_dir}")
        # Longest first: the batch's padding is smallest when similar lengths go together.
        mine = sorted(left[rank::world_size], key=lambda j: -int(ds.lengths[j]))
        shares += [(model_dir, i if k > 1 else None, mine)] if mine else []
    run_id = [new_run_id() if rank == 0 else None]
    dist.broadcast_object_list(run_id, src=0)
    writer = ScoreWriter(store_dir, run_id[0], rank, cfg.store_dtype, store_entropy) if shares else None  # or no part
    total = sum(len(mine) for *_, mine in shares)
    bar = tqdm(total=total, disable=rank != 0, desc="scoring (rank 0's share)", unit=" samples")
    for model_dir, fold, mine in shares:
        if fold is not None:
            bar.set_description(f"scoring fold {fold} (rank 0's share)")
        # One model at a time, freed before the next loads: the memory of one model, whatever the folds.
        model = load_reference(model_dir, device, dtype)
        score_dataset(model, ds, mine, writer, device, cfg.batch_size, tokenizer.pad_id, bar, fold=fold)
        del model
    bar.close()
    if writer is not None:
        writer.close()
    dist.barrier()
    if rank == 0:
        log.info(f"{store_dir}: {len(ScoreStore(store_dir))} of {len(ds)} samples scored")
    destroy_process_group()


def _check(cfg: DictConfig) -> List[str]:
    """The models to score with (K: model i scores fold i), checked before anything is built or written."""
    validate_config(cfg, CONFIG_SCHEMA)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"config key 'device': cuda, but torch {torch.__version__} sees no CUDA device here; "
            "run on a GPU machine, or set device=cpu for tiny models"
        )
    dirs = [cfg.model_dir] if isinstance(cfg.model_dir, str) else list(cfg.model_dir)
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
    tokenizer = Path(str(cfg.tokenizer.get("path")))
    for model_dir in dirs:  # a model scored with another tokenizer than its own gives losses of other tokens
        own = Path(model_dir) / "tokenizer.model"
        same_file = own.resolve() == tokenizer.resolve()
        if not same_file and own.is_file() and tokenizer.is_file() and own.read_bytes() != tokenizer.read_bytes():
            raise ConfigError(
                f"config key 'tokenizer.path': {tokenizer} is another tokenizer than {own}, the model's own; "
                f"score with the model's (tokenizer.path={own})"
            )
    settings = []  # each fold model's run identity but its fold
    for i, model_dir in enumerate(dirs if k > 1 else []):
        path = Path(model_dir) / METADATA_FILE
        try:
            meta = json.loads(path.read_text())
            trained = dict(meta["config"]["dataset"])
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
            if found != value and not same_dir:
                order = f"list the K={k} models in fold order, model i trained with dataset.folds={k} dataset.fold=i"
                raise ConfigError(
                    f"config key 'model_dir' (item {i}): {model_dir} was trained with dataset.{key}={found!r} "
                    f"({METADATA_FILE}), but scoring needs dataset.{key}={value!r} there; "
                    + (order if key in ("folds", "fold") else "score the data the models were trained on")
                )
        settings.append(run_dir.identity(OmegaConf.create(meta["config"]), meta.get("world_size")))
        settings[-1].pop("dataset.fold", None)
    for i, model_dir in enumerate(dirs[1:] if settings else [], 1):  # a cross-fit is one training, K times
        a, b = settings[0], settings[i]
        differ = [key for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key) and not _same_path(a, b, key)]
        if differ:
            shown = "; ".join(f"{key}: {a.get(key)!r} and {b.get(key)!r}" for key in differ)
            raise ConfigError(
                f"config key 'model_dir' (item {i}): {model_dir} was trained with other settings than {dirs[0]} "
                f"({METADATA_FILE}: {shown}); the fold models must differ in dataset.fold alone: train them again alike"
            )
    try:
        check_separate([*dirs, cfg.dataset.data_dir], [cfg.output_dir])
    except ValueError as e:
        raise ConfigError(f"config key 'output_dir': {e}") from None
    return dirs


def _same_path(a: dict, b: dict, key: str) -> bool:
    """One input file named two ways (relative, absolute, a link) is the same input."""
    paths = [d.get(key) for d in (a, b)]
    return (
        key in run_dir.INPUT_KEYS
        and all(isinstance(p, str) for p in paths)
        and len({Path(p).resolve() for p in paths}) == 1
    )


@parse
def recipe_main(cfg: DictConfig) -> None:
    with one_line_errors(ConfigError, DataError, CheckpointError, ScoreError, WriteError):
        score(cfg, _check(cfg))


if __name__ == "__main__":
    sys.exit(recipe_main())
