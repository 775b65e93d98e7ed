"""Cross-fitted references (K = 2 on the demo data): problems split into folds by a stable hash, a training side
that never holds its fold's problems, and a store whose every sample is scored by the model that never saw it."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from ref_tuning.hf_checkpoint import METADATA_FILE
from ref_tuning.data import DataError, codecontests_dataset, fold_of_lines, problem_fold, split_files
from ref_tuning.demo import write_tiny_checkpoint
from ref_tuning.line_index import SplitIndex, cache_folder
from ref_tuning.models import sheared_llama_tokenizer
from ref_tuning.scoring import ScoreStore, load_reference, score_dataset

from conftest import overrides, run_in_process

K = 2
SCORED = ["dataset.split=train", "dataset.n_samples=24", "dataset.correct_ratio=0.5"]


def train_index(assets) -> SplitIndex:
    return SplitIndex.open(*split_files(assets["data"], "train"), cache_folder(Path(assets["data"])))


def problem_of(index: SplitIndex, line: int) -> str:
    return index.problems[int(index.problem[line])]


# ---------------------------------------------------------------------------------------------
# Data: the folds and the training side


def test_a_problems_fold_is_a_stable_hash_of_its_id(assets):
    # Pinned: models trained before a change of the hash would no longer match the scoring run's folds.
    assert problem_fold("1041_E. Tree Reconstruction", 2) == 0 and problem_fold("1041_E. Tree Reconstruction", 5) == 2
    index = train_index(assets)
    for name in index.problems:
        assert problem_fold(name, K) == int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % K
    folds = fold_of_lines(index, K)
    for p in range(len(index.problems)):  # all solutions of a problem go together
        assert len(set(folds[index.problem == p].tolist())) == 1
    assert sorted(set(folds.tolist())) == [0, 1]  # both folds hold problems of the demo split


def test_a_fold_dataset_holds_no_problem_of_its_fold_and_draws_from_the_others(assets, caplog):
    tok = sheared_llama_tokenizer(str(assets["tokenizer"]))
    index = train_index(assets)
    for fold in range(K):
        ds = codecontests_dataset(tok, str(assets["data"]), n_samples=60, correct_ratio=0.5, folds=K, fold=fold)
        assert len(ds) == 60
        assert all(problem_fold(problem_of(index, int(line)), K) != fold for line in ds.lines)
    assert "2 folds by problem (fold 0: 18 problems, 108 lines; fold 1: 18 problems, 108 lines)" in caplog.text
    # Asking for more than the other folds hold says so.
    with pytest.raises(DataError, match="too few samples .* Available outside the held-out fold 1 of folds=2"):
        codecontests_dataset(tok, str(assets["data"]), n_samples=100, folds=K, fold=1)


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"fold": 0}, r"fold=0 needs folds"),
        ({"folds": 2, "fold": 2}, r"fold must be .* from 0 to 1 \(folds=2\), got 2"),
        ({"folds": 2}, r"fold must be .* from 0 to 1 \(folds=2\), got None"),
        ({"folds": 1, "fold": 0}, r"folds must be an integer >= 2 .* got 1"),
    ],
    ids=["fold without folds", "fold >= folds", "folds without fold", "folds < 2"],
)
def test_bad_fold_keys_are_one_clear_error(assets, keys, message):
    tok = sheared_llama_tokenizer(str(assets["tokenizer"]))
    with pytest.raises(DataError, match=message):
        codecontests_dataset(tok, str(assets["data"]), n_samples=8, **keys)


def test_the_training_recipe_records_the_fold_keys_and_its_fold_runs_score_together(assets, tmp_path):
    for fold in (0, 1):  # each fold its own experiment, as docs/rho1.md says
        out = tmp_path / f"run{fold}"
        extra = [f"experiment=fold{fold}", "dataset.folds=2", f"dataset.fold={fold}", "dataset.n_samples=8", "epochs=1"]
        code, text = run_in_process(
            "train", overrides(assets, out, *extra, "save_every_n_steps=null", validation=False)
        )
        assert code == 0, text[-3000:]
        assert f"fold {fold} is held out of this draw" in text
    trained = json.loads((out / "checkpoint_final" / METADATA_FILE).read_text())["config"]["dataset"]
    assert (trained["folds"], trained["fold"]) == (2, 1)  # what the scoring recipe checks
    identity = json.loads((out / "run.json").read_text())  # a run of another fold is another run
    assert (identity["dataset.folds"], identity["dataset.fold"]) == (2, 1)
    # The two runs differ only where fold runs must (the fold, their folders): scoring takes them.
    models = [tmp_path / f"run{fold}" / "checkpoint_final" for fold in (0, 1)]
    code, text = run_in_process("score", score_args(assets, models, tmp_path / "store"))
    assert code == 0, text[-3000:]


# ---------------------------------------------------------------------------------------------
# Scoring with one model per fold


def fold_model(root: Path, assets, fold: int, **dataset) -> Path:
    """A tiny model (its own weights) and the ref_tuning.json of a run trained without `fold`."""
    model = write_tiny_checkpoint(root / f"fold{fold}", assets["vocab_size"], assets["tokenizer"], seed=10 + fold)
    config = {"dataset": dict(folds=K, fold=fold, data_dir=str(assets["data"]), split="train", **dataset)}
    config |= {"output_dir": str(root / f"run{fold}"), "optimizer": {"lr": 2e-5}}  # a run's own folder
    (model / METADATA_FILE).write_text(json.dumps({"step": 1, "world_size": 2, "config": config}))
    return model


@pytest.fixture(scope="module")
def models(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    return [fold_model(root, assets, fold) for fold in range(K)]


def score_args(assets, models, out: Path, *extra: str):
    return [
        f"model_dir=[{','.join(str(m) for m in models)}]",
        f"tokenizer.path={models[0] / 'tokenizer.model'}",
        f"output_dir={out}",
        "device=cpu",
        "dtype=fp32",
        "store_dtype=float32",
        "batch_size=4",
        f"dataset.data_dir={assets['data']}",
        *SCORED,
        *extra,
    ]


@pytest.fixture(scope="module")
def crossfit_store(assets, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "train"
    code, text = run_in_process("score", score_args(assets, models, out))
    assert code == 0, text[-3000:]
    return out


def index_entries(store: Path):
    return [json.loads(line) for idx in sorted(store.glob("part-*.idx")) for line in idx.read_text().splitlines()]


def test_each_sample_is_scored_once_by_the_model_of_its_fold(assets, models, crossfit_store):
    store = ScoreStore(crossfit_store)
    d = store.description
    assert d["model_dir"] == [str(m.resolve()) for m in models] and d["cross_fitted"]["folds"] == K
    tok = sheared_llama_tokenizer(str(assets["tokenizer"]))
    ds = codecontests_dataset(tok, **{k: v for k, v in d["dataset"].items() if k != "_component_"})
    entries = index_entries(crossfit_store)
    assert len(ds) == 24 and sorted(e["line"] for e in entries) == sorted(ds.lines.tolist())  # once each
    index = train_index(assets)
    by_fold = {
        k: [i for i in range(len(ds)) if problem_fold(problem_of(index, int(ds.lines[i])), K) == k] for k in (0, 1)
    }
    assert all(by_fold.values())  # both models score something
    samples = {s.line: s for s in store}
    direct = {}  # (model, task_id) -> every sample scored directly by each model
    for k, model_dir in enumerate(models):
        model = load_reference(model_dir, torch.device("cpu"), torch.float32)
        for info, losses in score_dataset(model, ds, range(len(ds)), None, torch.device("cpu"), 4, tok.pad_id):
            direct[k, info["task_id"]] = losses
    for k, items in by_fold.items():
        for i in items:
            s = samples[int(ds.lines[i])]
            assert s.fold == k  # recorded: its problem's fold, so scored by model k, trained without it
            torch.testing.assert_close(store.losses(s.task_id), direct[k, s.task_id], rtol=0, atol=1e-5)
            assert not torch.allclose(store.losses(s.task_id), direct[1 - k, s.task_id], atol=1e-3)  # not the other


def test_a_stopped_cross_fitted_run_scores_only_what_is_missing(assets, models, crossfit_store, tmp_path):
    store_dir = shutil.copytree(crossfit_store, tmp_path / "store")
    idx = next(store_dir.glob("part-*.idx"))
    lines = idx.read_text().splitlines(keepends=True)
    idx.write_text("".join(lines[:10]))  # as if stopped after 10 samples
    code, text = run_in_process("score", score_args(assets, models, store_dir))
    assert code == 0, text[-3000:]
    assert "24 samples, 10 scored already, 14 to score by 1 processes" in text
    left = [int(n) for n in re.findall(r"fold \d: \d+ samples, (\d+) to score, by ", text)]
    assert len(left) == K and sum(left) == 14  # each fold's model scores what is missing of its fold
    entries = index_entries(store_dir)
    assert len(entries) == 24 and len({e["line"] for e in entries}) == 24
    resumed, reference = ScoreStore(store_dir), ScoreStore(crossfit_store)
    for s in reference:
        assert resumed.sample(s.task_id).fold == s.fold
        torch.testing.assert_close(resumed.losses(s.task_id), reference.losses(s.task_id), rtol=0, atol=1e-5)


def retrain(model_dir: Path, lr=None, world_size=None, **dataset) -> None:
    """Make `model_dir`'s ref_tuning.json say it was trained with these dataset keys, learning rate, processes."""
    meta = json.loads((model_dir / METADATA_FILE).read_text())
    meta["config"]["dataset"].update(dataset)
    meta["config"]["optimizer"]["lr"] = lr or meta["config"]["optimizer"]["lr"]
    meta["world_size"] = world_size or meta["world_size"]
    (model_dir / METADATA_FILE).write_text(json.dumps(meta))


# What is wrong -> what the error says.
REFUSED = {
    "swapped": r"\(item 0\): \S+fold1 was trained with dataset.fold=1 \(ref_tuning.json\), but scoring needs ",
    "folds": r"\(item 1\): \S+fold1 was trained with dataset.folds=3 \(ref_tuning.json\), but scoring needs ",
    "data_dir": r"\(item 1\): \S+fold1 was trained with dataset.data_dir='/elsewhere' .* score the data",
    "no config": r"\(item 1\): \S+fold1/ref_tuning.json holds no training config",
    "tokenizer": r"'tokenizer.path': \$\{model_dir\}/tokenizer.model cannot name one file .* tokenizer.path=",
    "scored folds": r"'dataset.folds'/'dataset.fold': the samples to score are Rho-1's whole draw",
    "learning rate": r"\(item 1\): \S+fold1 was trained with other settings than \S+fold0 \(ref_tuning.json: "
    r"optimizer.lr: 2e-05 and 0.02\); the fold models must differ in dataset.fold alone",
    "processes": r"\(item 1\): \S+fold1 was trained with other settings .*world_size: 2 and 4\)",
}


@pytest.mark.parametrize("change", REFUSED)
def test_models_whose_training_does_not_match_their_fold_are_refused(assets, models, tmp_path, change):
    dirs = [shutil.copytree(m, tmp_path / m.name) for m in models]
    extra = []
    if change == "swapped":
        dirs.reverse()
    elif change == "folds":
        retrain(dirs[1], folds=3)
    elif change == "data_dir":
        retrain(dirs[1], data_dir="/elsewhere")
    elif change == "no config":
        (dirs[1] / METADATA_FILE).unlink()
    elif change == "tokenizer":
        extra = ["tokenizer.path=${model_dir}/tokenizer.model"]
    elif change == "scored folds":
        extra = ["dataset.folds=2", "dataset.fold=0"]
    elif change == "learning rate":  # three orders apart; the other runs' paths differ, as fold runs' do
        retrain(dirs[1], lr=0.02)
    elif change == "processes":
        retrain(dirs[1], world_size=4)
    out = tmp_path / "store"
    code, text = run_in_process("score", score_args(assets, dirs, out, *extra))
    assert code == 2 and "error: ConfigError: config key" in text, text[-3000:]
    assert re.search(REFUSED[change], text), text[-2000:]
    assert not out.exists()  # refused before anything was written
