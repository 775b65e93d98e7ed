"""The report's memorization section: (a) solutions the tuned reference trained on, (b) unseen solutions of the
problems it trained on, (c) held-out problems, drawn as `trained_on` in its ref_tuning.json says, and their mean
losses equal to a direct mean of `score_dataset`'s."""

import json
from pathlib import Path

import pytest
import torch

from ref_tuning.hf_checkpoint import METADATA_FILE
from ref_tuning.data import CodeContestsDataset, measure_lengths, split_files
from ref_tuning.demo import MAX_SEQ_LEN, write_tiny_checkpoint
from ref_tuning.line_index import SplitIndex, cache_folder
from ref_tuning.models import sheared_llama_tokenizer
from ref_tuning.report import memorization, memorization_markdown, memorization_section, run_report, trained_on
from ref_tuning.scoring import load_reference, score_dataset

N = 6  # --n-samples: (a) 6 of 40, (b) 6 of 12, (c) the 3 correct of 6 held-out samples


def open_index(assets, split: str) -> SplitIndex:
    return SplitIndex.open(*split_files(assets["data"], split), cache_folder(Path(assets["data"])))


def names(index: SplitIndex, lines) -> set:
    return {index.problems[int(index.problem[line])] for line in lines}


@pytest.fixture(scope="module")
def tok(assets):
    return sheared_llama_tokenizer(str(assets["tokenizer"]))


@pytest.fixture(scope="module")
def train(assets) -> SplitIndex:
    return open_index(assets, "train")


@pytest.fixture(scope="module")
def trained_lines(train) -> list:
    """All correct solutions of problems 0..11 but the first of problems 0..7 each, and one incorrect solution of
    problem 12: 40 correct lines trained on; (b)'s pool: 8 left-out solutions and the 4 correct ones of problem 12."""
    correct = {
        p: [i for i in range(len(train)) if int(train.problem[i]) == p and train.is_correct[i]] for p in range(13)
    }
    assert all(len(lines) == 4 for lines in correct.values()), "the demo problems have 4 correct solutions each"
    lines = [i for p in range(12) for i in correct[p][1 if p < 8 else 0 :]]
    lines.append(next(i for i in range(len(train)) if int(train.problem[i]) == 12 and not train.is_correct[i]))
    return sorted(lines)


def tuned_dir(root: Path, assets, trained: object = None) -> Path:
    """A tuned reference: the tiny model with other weights, and a ref_tuning.json (with `trained`, if given)."""
    out = write_tiny_checkpoint(root, assets["vocab_size"], assets["tokenizer"], seed=1)
    meta = {"step": 4, "epoch": 1, "validation": {}, "config": {"dataset": {"cache_dir": None}}}
    (out / METADATA_FILE).write_text(json.dumps(meta if trained is None else dict(meta, trained_on=trained)))
    return out


@pytest.fixture(scope="module")
def report(assets, train, trained_lines, tmp_path_factory):
    root = tmp_path_factory.mktemp("memorization")
    trained = {"jsonl": str(train.jsonl), "fingerprint": train.fingerprint(), "lines": trained_lines}
    tuned = tuned_dir(root / "tuned", assets, trained)
    options = dict(n_samples=N, correct_ratio=0.5, max_seq_len=MAX_SEQ_LEN, tokenizer=assets["tokenizer"])
    run_report(assets["model"], tuned, root / "out", assets["data"], progress=False, **options)
    return tuned, json.loads((root / "out" / "report.json").read_text()), (root / "out" / "report.md").read_text()


def test_the_three_sets_are_drawn_from_what_it_trained_on(assets, train, trained_lines, report, tok):
    tuned, found, _ = report
    section = found["memorization"]
    a, b, c = (section["lines"][k] for k in ("trained", "unseen_solution", "unseen_problem"))
    assert section["trained_on"] == {"jsonl": str(train.jsonl), "lines": 41, "problems": 13}
    assert section["samples"] == {"trained": N, "unseen_solution": N, "unseen_problem": N // 2}
    # (a): correct solutions it trained on; the incorrect trained line is never among them.
    assert set(a) < {i for i in trained_lines if train.is_correct[i]} and len(set(a)) == N
    # (b): correct solutions of the problems it trained on (problem 12 through its incorrect line), none trained on.
    assert not set(b) & set(trained_lines) and all(train.is_correct[i] for i in b) and len(set(b)) == N
    assert names(train, b) <= names(train, trained_lines)
    # (c): the report's held-out correct solutions, of problems it never trained on.
    valid = open_index(assets, "valid")
    assert section["held_out"] == str(valid.jsonl) and all(valid.is_correct[i] for i in c)
    assert not names(valid, c) & names(train, trained_lines)
    assert found["base"]["correct_samples"] == len(c)
    # The draw is a function of the seed: the same lines again.
    again = trained_on(tuned, tok, N, 0, MAX_SEQ_LEN)
    assert again.trained.lines.tolist() == a and again.unseen_solution.lines.tolist() == b
    assert again.unseen_pool == 8 + 4 and again.problems == names(train, trained_lines)


def test_the_numbers_are_the_mean_of_score_dataset_losses(assets, train, report, tok):
    tuned, found, text = report
    section = found["memorization"]
    valid = open_index(assets, "valid")
    cache = cache_folder(Path(assets["data"]))
    datasets = {}
    for key, index in (("trained", train), ("unseen_solution", train), ("unseen_problem", valid)):
        lines = torch.tensor(section["lines"][key])
        datasets[key] = CodeContestsDataset(
            index, lines, measure_lengths(index, lines, tok, cache)[0], tok, MAX_SEQ_LEN
        )
    for name, model_dir in (("base", assets["model"]), ("tuned", tuned)):
        model = load_reference(model_dir, torch.device("cpu"), torch.float32)
        for key, ds in datasets.items():
            losses = [x for _, x in score_dataset(model, ds, range(len(ds)), None, torch.device("cpu"), N, tok.pad_id)]
            assert section[name][key] == pytest.approx(float(torch.cat(losses).mean()), rel=1e-6), (name, key)
        means = section[name]
        assert means["memorized_solutions"] == pytest.approx(means["unseen_solution"] - means["trained"])
        assert means["memorized_problems"] == pytest.approx(means["unseen_problem"] - means["unseen_solution"])
    extra = section["tuned_minus_base"]["memorized_total"]
    assert extra == pytest.approx(section["tuned"]["memorized_total"] - section["base"]["memorized_total"])
    # The markdown: a row per reference and the tuned model's gaps beyond the base's, then the reading.
    assert "## Memorization" in text and section["reading"] in text and section["reading"].startswith("Reading: ")
    assert f"| tuned | {section['tuned']['trained']:.4f} | {section['tuned']['unseen_solution']:.4f} |" in text
    assert f" {extra:+.4f} |\n" in text and not section["notes"]


@pytest.mark.parametrize(
    "trained, says",
    [
        (None, "has no `trained_on`"),
        ({"jsonl": "/nowhere/train.jsonl", "lines": [0]}, "/nowhere/train.jsonl, the split the tuned reference"),
        ({"jsonl": "{train}", "lines": [0, 10**6]}, "lists line 1000000, but"),
        ({"jsonl": "{train}", "lines": [0], "fingerprint": "0" * 16}, "train.jsonl changed since the tuned reference"),
        ({"jsonl": "{train}", "lines": "0-9"}, '`trained_on` should be {"jsonl": path, "lines": [line numbers]}'),
    ],
)
def test_without_what_it_trained_on_the_section_says_why(assets, train, tok, tmp_path, trained, says):
    if trained is not None:
        trained = dict(trained, jsonl=trained["jsonl"].format(train=train.jsonl))
    found = trained_on(tuned_dir(tmp_path / "tuned", assets, trained), tok, N, 0, MAX_SEQ_LEN)
    assert isinstance(found, str) and says in found and "\n" not in found
    assert found.endswith("what the tuned reference trained on is unknown, so memorization is not measured.")


def test_a_base_model_as_tuned_gives_the_one_line_absence_note(assets, tmp_path):
    out = tmp_path / "out"
    options = dict(n_samples=4, max_seq_len=MAX_SEQ_LEN, tokenizer=assets["tokenizer"], progress=False)
    run_report(assets["model"], assets["model"], out, assets["data"], **options)
    section = json.loads((out / "report.json").read_text())["memorization"]
    assert section == {
        "absent": f"No {METADATA_FILE} in {assets['model']} (not written by the training recipe): "
        "what the tuned reference trained on is unknown, so memorization is not measured."
    }
    text = (out / "report.md").read_text()
    assert text.endswith(f"\n## Memorization\n\n{section['absent']}\n")


def test_no_unseen_solution_of_a_trained_problem_is_said(assets, train, tok, tmp_path):
    every = [i for i in range(len(train)) if int(train.problem[i]) < 4 and train.is_correct[i]]
    sets = trained_on(tuned_dir(tmp_path, assets, {"jsonl": str(train.jsonl), "lines": every}), tok, N, 0, MAX_SEQ_LEN)
    assert sets.unseen_pool == 0 and len(sets.unseen_solution) == 0 and len(sets.trained) == N
    losses = {
        name: {"trained": [torch.tensor([1.0, 2.0])], "unseen_solution": [], "unseen_problem": [torch.tensor([c])]}
        for name, c in (("base", 2.0), ("tuned", 3.0))
    }
    section = memorization_section(sets, Path("valid.jsonl"), [{"line": 0}], 3, losses)
    assert section["tuned"]["memorized_total"] == 1.5 and section["tuned_minus_base"]["memorized_total"] == 1.0
    assert section["tuned"]["memorized_solutions"] is None and section["samples"]["unseen_solution"] == 0
    assert section["notes"] == [
        "No problem it trained on has a correct solution it did not train on: (b) is empty, so memorized solutions "
        "and memorized problems cannot be told apart (c − a gives both).",
        "2 held-out correct solutions are of problems it trained on: not in (c).",
    ]
    text = memorization_markdown(json.loads(json.dumps(section)))  # as report.json keeps it
    assert section["notes"][0] in text and "| tuned | 1.5000 | — | 3.0000 | — | — | +1.5000 |" in text
    assert "+1.0000 nats/token between solutions it trained on and problems it never saw" in text


def test_memorization_means_are_per_token():
    losses = {
        name: {
            "trained": [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3.0])],
            "unseen_solution": [],
            "unseen_problem": [],
        }
        for name in ("base", "tuned")
    }
    result = memorization(losses)
    assert result["base"]["trained"] == 1.5 and result["base"]["unseen_solution"] is None
    assert result["tuned_minus_base"]["trained"] == 0.0 and result["tuned_minus_base"]["memorized_total"] is None
