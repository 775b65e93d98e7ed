"""Rho-1 readiness: reference scores equal to transformers', a resumable store read back by task_id,
the excess-loss preview and the report."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from transformers import AutoModelForCausalLM

from ref_tuning import preview as preview_module
from ref_tuning.data import codecontests_dataset
from ref_tuning.demo import make_demo_assets, write_tiny_checkpoint
from ref_tuning.models import sheared_llama_tokenizer
from ref_tuning.report import auroc, loss_histograms, run_report, summarize, verdict
from ref_tuning.scoring import (
    ScoreError,
    ScoreStore,
    ScoreWriter,
    data_record,
    load_reference,
    open_store,
    score_dataset,
)

from conftest import descendants, run_in_process, tune_command

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # our `recipes` before torchtune's


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    paths = make_demo_assets(tmp_path_factory.mktemp("demo"))
    # A second model of the same shape, to play the policy (or a worse reference).
    paths["other"] = write_tiny_checkpoint(
        tmp_path_factory.mktemp("other") / "model", paths["vocab_size"], paths["tokenizer"], seed=1
    )
    return paths


VALID = ["dataset.split=valid", "dataset.n_samples=24", "dataset.correct_ratio=0.5", "batch_size=3"]


def score_args(assets, out: Path, *extra: str) -> list:
    return [
        f"model_dir={assets['model']}",
        f"output_dir={out}",
        "device=cpu",
        "dtype=fp32",
        "store_dtype=float32",
        f"dataset.data_dir={assets['data']}",
        *extra,
    ]


def score_command(assets, out: Path, nproc: int, *extra: str):
    return tune_command(nproc, "recipes/ref_score.py", "configs/ref_score.yaml", score_args(assets, out, *extra))


def score_alone(assets, out: Path, *extra: str) -> str:
    """One process, in this process (a world of one, as `--nproc_per_node 1`): the log."""
    code, text = run_in_process("score", score_args(assets, out, *extra))
    assert code == 0, text[-3000:]
    return text


def dataset_of(store: ScoreStore, assets):
    """The samples a store describes, rebuilt from its own record of its tokenizer and data."""
    d = store.description["dataset"]
    tok = sheared_llama_tokenizer(str(assets["tokenizer"]))
    args = {k: v for k, v in d.items() if k != "_component_"}
    return codecontests_dataset(tok, **args)


@pytest.fixture(scope="module")
def valid_store(assets, tmp_path_factory):
    """The base model's scores of 24 samples of the valid split (correct and incorrect), one process (two
    processes score in test_scoring_resumes_after_a_kill_with_another_number_of_processes)."""
    out = tmp_path_factory.mktemp("scores") / "valid"
    score_alone(assets, out, *VALID)
    return out


def test_scores_equal_transformers_per_token_losses(assets, valid_store):
    store = ScoreStore(valid_store)
    ds = dataset_of(store, assets)
    assert len(store) == len(ds) == 24
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    for i in range(len(ds)):
        sample = ds[i]
        with torch.no_grad():
            logits = model(torch.tensor([sample["tokens"]])).logits[0, :-1].float()  # no attention mask, as Rho-1
        labels = torch.tensor(sample["labels"][1:])
        keep = labels != CROSS_ENTROPY_IGNORE_IDX
        expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")
        got = store.losses(ds.record(i)["task_id"])
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_the_store_records_what_it_scored(assets, valid_store):
    store = ScoreStore(valid_store)
    assert store.description["model_dir"] == str(Path(assets["model"]).resolve())
    assert store.description["dataset"]["split"] == "valid" and store.description["store_dtype"] == "float32"
    assert sorted(p.suffix for p in valid_store.glob("part-*")) == [".bin", ".idx"]  # one part a process
    samples = list(store)
    assert sum(s.is_correct for s in samples) == 12 and all(s.difficulty >= 0 for s in samples)
    with pytest.raises(ScoreError, match=r"no scores for task_id 'nope' \(24 samples scored\)"):
        store.losses("nope")


def test_float16_values_are_the_float32_ones_rounded(assets, tmp_path):
    tok = sheared_llama_tokenizer(str(assets["tokenizer"]))
    ds = codecontests_dataset(tok, str(assets["data"]), split="valid", n_samples=6, correct_ratio=0.5)
    model = load_reference(assets["model"], torch.device("cpu"), torch.float32)
    for values in ("float16", "float32"):
        store = tmp_path / values
        open_store(store, {"store_dtype": values, "dataset": {}})
        writer = ScoreWriter(store, "run", 0, values)
        score_dataset(model, ds, range(len(ds)), writer, torch.device("cpu"), 2, tok.pad_id)
        writer.close()
    half, full = ScoreStore(tmp_path / "float16"), ScoreStore(tmp_path / "float32")
    for s in full:
        exact = full.losses(s.task_id)
        assert torch.equal(half.losses(s.task_id), exact.half().float())
    assert (tmp_path / "float16" / "part-run-00000.bin").stat().st_size * 2 == (
        tmp_path / "float32" / "part-run-00000.bin"
    ).stat().st_size


def test_stored_entropies_equal_the_models_predictive_entropy(assets, tmp_path):
    """store_entropy: each response token's entropy of the model's predictive distribution, beside its loss."""
    common = [f"model_dir={assets['model']}", f"dataset.data_dir={assets['data']}", "device=cpu", "dtype=fp32"]
    common += ["dataset.split=valid", "dataset.n_samples=6", "dataset.correct_ratio=0.5", "batch_size=3"]
    stores = {}
    for values, entropy in (("float32", "true"), ("float16", "true"), ("float32", "false")):
        out = tmp_path / f"{values}-{entropy}"
        code, text = run_in_process(
            "score", [*common, f"output_dir={out}", f"store_dtype={values}", f"store_entropy={entropy}"]
        )
        assert code == 0, text[-3000:]
        stores[values, entropy] = ScoreStore(out)
    full, half, plain = stores["float32", "true"], stores["float16", "true"], stores["float32", "false"]
    assert full.description["store_entropy"] is True and "store_entropy" not in plain.description  # as stores before
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    ds = dataset_of(plain, assets)
    for i in range(len(ds)):
        sample, task_id = ds[i], ds.record(i)["task_id"]
        with torch.no_grad():
            logits = model(torch.tensor([sample["tokens"]])).logits[0, :-1].float()
        expected = torch.distributions.Categorical(logits=logits[torch.tensor(sample["labels"][1:]) >= 0]).entropy()
        torch.testing.assert_close(full.entropies(task_id), expected, rtol=0, atol=1e-5)
        # float16 keeps 11 significant bits: an entropy near ln(1024) = 6.9 is rounded by up to 2**-11 of itself.
        torch.testing.assert_close(half.entropies(task_id), expected, rtol=2**-11, atol=1e-5)
        # Beside entropies or not, the losses are the same bits.
        assert torch.equal(full.losses(task_id), plain.losses(task_id))
        assert torch.equal(half.losses(task_id), plain.losses(task_id).half().float())
    sizes = {key: sum(p.stat().st_size for p in store.path.glob("part-*.bin")) for key, store in stores.items()}
    assert sizes["float32", "true"] == 2 * sizes["float32", "false"] == 2 * sizes["float16", "true"]  # 2 values a token
    with pytest.raises(ScoreError, match=r"float32-false: holds no entropies \(scored with store_entropy: false\)"):
        plain.entropies(task_id)
    # A store is all with entropies or all without: continuing it the other way is refused.
    out = plain.path
    code, text = run_in_process("score", [*common, f"output_dir={out}", "store_dtype=float32", "store_entropy=true"])
    assert code == 2 and "holds scores of another run (differing in store_entropy)" in text, text[-3000:]


def test_scoring_resumes_after_a_kill_with_another_number_of_processes(assets, tmp_path):
    out = tmp_path / "store"
    extra = ["dataset.split=train", "dataset.n_samples=96", "dataset.correct_ratio=0.5", "batch_size=1"]
    proc = subprocess.Popen(
        score_command(assets, out, 2, *extra),
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    goal = random.Random(os.getpid()).randint(4, 40)
    deadline = time.monotonic() + 300
    while proc.poll() is None and sum(len(p.read_text().splitlines()) for p in out.glob("part-*.idx")) < goal:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    before = len(ScoreStore(out))
    assert 0 < before < 96, before  # killed in the middle
    assert sorted(p.suffix for p in out.glob("part-*")) == [".bin", ".bin", ".idx", ".idx"]  # one part a rank
    # A crash may leave a line cut short and values without their index line: both are ignored.
    with open(next(out.glob("part-*.idx")), "a") as f:
        f.write('{"task_id": "half a li')
    with open(next(out.glob("part-*.bin")), "ab") as f:
        f.write(b"\x00" * 10)

    text = score_alone(assets, out, *extra)
    assert f"{before} scored already, {96 - before} to score by 1 processes" in text
    store = ScoreStore(out)
    assert len(store) == 96 and len({s.line for s in store}) == 96
    fresh = tmp_path / "fresh"
    score_alone(assets, fresh, *extra)
    reference = ScoreStore(fresh)
    for s in reference:  # to float precision: the thread count (and so the sums' order) differs with nproc
        torch.testing.assert_close(store.losses(s.task_id), reference.losses(s.task_id), rtol=0, atol=1e-5)


def test_a_damaged_part_is_found_on_open_and_scored_again(assets, valid_store, tmp_path):
    store_dir = shutil.copytree(valid_store, tmp_path / "store")
    part = max(store_dir.glob("part-*.bin"), key=lambda p: p.stat().st_size)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # as a copy cut short leaves it
    damaged = ScoreStore(store_dir)
    assert damaged.damaged and len(damaged) + len(damaged.damaged) == 24
    lost = next(iter(damaged.damaged))
    with pytest.raises(ScoreError, match=f"{part.name}: the scores of task_id '{lost}' are cut off"):
        damaged.losses(lost)
    text = score_alone(assets, store_dir, *VALID)
    assert f"{len(damaged.damaged)} samples' scores are damaged (in {part.name}): scoring them again" in text
    repaired, reference = ScoreStore(store_dir), ScoreStore(valid_store)
    assert len(repaired) == 24 and not repaired.damaged
    for s in reference:
        torch.testing.assert_close(repaired.losses(s.task_id), reference.losses(s.task_id), rtol=0, atol=1e-5)


def test_a_store_of_another_model_or_data_is_refused(assets, valid_store):
    code, text = run_in_process("score", score_args(assets, valid_store, *VALID, "dataset.seed=7"))
    assert code == 2 and "holds scores of another run (differing in dataset)" in text
    with pytest.raises(ScoreError, match="not a score store"):
        ScoreStore(assets["model"])


def test_a_store_records_its_data_and_one_from_before_the_record_continues(assets, valid_store, tmp_path):
    recorded = ScoreStore(valid_store).description["data_files"]
    assert recorded == data_record(dataset_of(ScoreStore(valid_store), assets))
    older = shutil.copytree(valid_store, tmp_path / "older")
    description = json.loads((older / "scores.json").read_text())
    del description["data_files"]
    (older / "scores.json").write_text(json.dumps(description))
    assert "24 scored already, 0 to score" in score_alone(assets, older, *VALID)
    assert "data_files" not in json.loads((older / "scores.json").read_text())


# ---------------------------------------------------------------------------------------------
# The excess-loss preview


def test_top_k_selection_and_its_shares():
    excess = {"a": torch.tensor([0.5, -1.0, 2.0, 0.0]), "b": torch.tensor([3.0, 0.5, -2.0, 1.0, 1.0, 0.1])}
    masks = preview_module.select_top(excess, 0.6)
    assert masks["a"].tolist() == [True, False, True, False]
    assert masks["b"].tolist() == [True, True, False, True, True, False]  # 6 of 10; tie at 0.5 broken by order
    table = preview_module.shares(masks, {"a": 7, "b": 9})
    assert table["difficulty"] == {"7": [2, 4], "9": [4, 6]}
    assert sum(s for s, _ in table["position in the solution"].values()) == 6
    assert sum(n for _, n in table["position in the solution"].values()) == 10
    assert preview_module.render(["x", "=", " 1", "\n"], torch.tensor([True, True, False, True])) == "⟦x=⟧ 1⟦\n⟧"


def test_preview_with_a_policy_directory_or_its_scores(assets, valid_store, tmp_path):
    first = preview_module.preview(valid_store, assets["other"], tmp_path / "p1", k=0.6, progress=False)
    assert first["samples"] == 24 and first["selected"] == round(0.6 * first["tokens"])
    text = (tmp_path / "p1" / "preview.md").read_text()
    assert "## Share of tokens selected, by position in the solution" in text and "by difficulty" in text
    assert text.count("### ") == 4 and "⟦" in text
    # The same from the policy's own score store.
    policy_scores = tmp_path / "policy-scores"
    score_alone(dict(assets, model=assets["other"]), policy_scores, *VALID)
    second = preview_module.preview(valid_store, policy_scores, tmp_path / "p2", k=0.6)
    assert second["shares"] == first["shares"] and second["selected"] == first["selected"]


# ---------------------------------------------------------------------------------------------
# The report


def test_auroc_against_counting_pairs():
    rng = random.Random(0)
    for _ in range(20):
        pos = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(rng.randint(1, 15))]
        neg = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(rng.randint(1, 15))]
        pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
        assert auroc(pos, neg) == pytest.approx(pairs)


def test_summary_and_verdict():
    losses = {"c1": torch.tensor([1.0, 1.0]), "c2": torch.tensor([2.0]), "i1": torch.tensor([3.0, 3.0, 3.0])}
    correct = {"c1": True, "c2": True, "i1": False}
    m = summarize(losses, correct)
    assert m["correct_loss"] == pytest.approx(4 / 3) and m["incorrect_loss"] == 3.0 and m["auroc"] == 1.0
    worse = dict(m, correct_loss=2.0, auroc=0.5)
    assert verdict(worse, m)[0] and "is better" in verdict(worse, m)[1]
    better, text = verdict(m, worse)
    assert not better and text.startswith("The tuned reference is NOT better than the base: its loss on correct")
    assert "AUROC 0.500 against 1.000" in text


def test_the_figure_has_a_panel_for_correct_and_one_for_incorrect_solutions():
    correct = {"c1": True, "c2": True, "i1": False}
    losses = {
        "base": {"c1": torch.tensor([1.0, 2.0]), "c2": torch.tensor([2.0]), "i1": torch.tensor([3.0])},
        "tuned": {"c1": torch.tensor([0.5]), "c2": torch.tensor([1.0]), "i1": torch.tensor([3.5])},
    }
    figure = loss_histograms(losses, correct, {name: summarize(x, correct) for name, x in losses.items()})
    assert [axes.get_title() for axes in figure.axes] == [
        "correct solutions (AUROC base 1.000, tuned 1.000)",
        "incorrect solutions (AUROC base 1.000, tuned 1.000)",
    ]
    legends = [[t.get_text() for t in axes.get_legend().get_texts()] for axes in figure.axes]
    assert legends == [["base (n=2)", "tuned (n=2)"], ["base (n=1)", "tuned (n=1)"]]
    assert all(axes.get_xlabel() and axes.get_ylabel() for axes in figure.axes)


def test_report_end_to_end(assets, tmp_path):
    out = tmp_path / "report"
    results = run_report(
        assets["model"],
        assets["other"],
        out,
        assets["data"],
        split="valid",
        n_samples=30,
        correct_ratio=0.5,
        tokenizer=assets["tokenizer"],
        progress=False,
    )
    report = json.loads((out / "report.json").read_text())
    assert report["base"] == results["base"] and report["base"]["correct_samples"] == 15
    text = (out / "report.md").read_text()
    assert f"| {results['base']['correct_loss']:.4f} |" in text and f"| {results['tuned']['auroc']:.3f} |" in text
    assert ("NOT better" in text) == (not report["tuned_is_better"])
    with Image.open(out / "report.png") as image:
        assert image.format == "PNG" and 800 <= image.size[0] <= 2000 and 300 <= image.size[1] < image.size[0]
    # Against itself a model is never better: the report says so.
    run_report(
        assets["model"],
        assets["model"],
        tmp_path / "same",
        assets["data"],
        n_samples=30,
        correct_ratio=0.5,
        tokenizer=assets["tokenizer"],
        progress=False,
    )
    assert "The tuned reference is NOT better than the base" in (tmp_path / "same" / "report.md").read_text()


def test_the_shipped_scoring_config_is_valid():
    from omegaconf import OmegaConf

    from recipes.ref_score import CONFIG_SCHEMA
    from ref_tuning.config import validate_config

    validate_config(OmegaConf.load(PROJECT_ROOT / "configs" / "ref_score.yaml"), CONFIG_SCHEMA)


def test_reports_of_checkpoint_best_and_final_go_to_folders_of_their_own_and_are_not_overwritten(
    assets, tmp_path, capsys
):
    from ref_tuning import report as report_module

    run = tmp_path / "run"
    for name in ("checkpoint_best", "checkpoint_final"):
        shutil.copytree(assets["other"], run / name)
    common = ["--data-dir", str(assets["data"]), "--n-samples", "6", "--tokenizer", str(assets["tokenizer"])]
    for name in ("checkpoint_best", "checkpoint_final"):
        assert report_module.main([str(assets["model"]), str(run / name), *common, "--no-progress"]) == 0
    assert sorted(p.name for p in run.glob("report-*")) == [
        "report-checkpoint_best-valid",
        "report-checkpoint_final-valid",
    ]
    before = (run / "report-checkpoint_final-valid" / "report.json").read_bytes()
    assert report_module.main([str(assets["model"]), str(run / "checkpoint_final"), *common, "--no-progress"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (run / "report-checkpoint_final-valid" / "report.json").read_bytes() == before
    args = [str(assets["model"]), str(run / "checkpoint_final"), *common, "--no-progress", "--overwrite"]
    assert report_module.main(args) == 0
