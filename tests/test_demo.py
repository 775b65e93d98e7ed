"""`python -m ref_tuning.demo`, the README's Demo section, end to end."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the whole demo, end to end: `python -m pytest -q -m slow`


def _run_demo(root, *args):
    result = subprocess.run(
        [sys.executable, "-m", "ref_tuning.demo", "--root", str(root), *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    found = re.findall(r"(full|LoRA): validation loss .* before (\d+\.\d+), after (\d+\.\d+)", result.stdout)
    assert [kind for kind, *_ in found] == ["full", "LoRA"], result.stdout[-3000:]
    assert result.stdout.count("## Memorization") == 2, result.stdout[-3000:]
    # Quiet: a line per phase, the losses and the reports; the launchers' output is in the logs, not here.
    bars = re.compile(r"\d+/\d+ \[|\?(it|step)/s\]")
    shown = [line for line in (result.stdout + result.stderr).replace("\r", "\n").splitlines() if not bars.search(line)]
    assert len(shown) <= 60 and not any("Skipping import of cpp" in line for line in shown), "\n".join(shown)
    for kind in ("full", "lora"):
        log = (root / "logs" / f"train-{kind}.log").read_text()
        assert log.startswith("$ ") and "recipes/ref_finetune.py" in log and "checkpoint written to" in log, kind
    return {kind: (float(before), float(after)) for kind, before, after in found}


def _check_layout(root):
    raw = root / "models" / "tiny-sheared-llama" / "raw"
    assert sorted(p.name for p in raw.glob("pytorch_model-*.bin")) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    data = root / "datasets" / "codecontests" / "processed"
    for name in ("train.jsonl", "train_metadata.json", "valid.jsonl", "valid_metadata.json"):
        assert (data / name).is_file()
    assert (root / "checkpoints" / "ref-tuning" / "tiny-demo" / "checkpoint_final" / "config.json").is_file()


def test_demo_lowers_the_validation_loss_and_reports_both_references(tmp_path):
    losses = _run_demo(tmp_path / "demo")
    _check_layout(tmp_path / "demo")
    for kind, run in (("full", "tiny-demo"), ("LoRA", "tiny-demo-lora")):
        before, after = losses[kind]
        assert after < before, kind
        report = json.loads(
            (tmp_path / "demo" / "checkpoints" / "ref-tuning" / run / "report-valid" / "report.json").read_text()
        )
        assert report["base"]["correct_samples"] == 40 and report["base"]["incorrect_samples"] == 20
        # The tuned reference's held-out loss beside the base's: tuning on code lowered it.
        assert report["tuned"]["correct_loss"] < report["base"]["correct_loss"]
        assert 0 <= report["tuned"]["auroc"] <= 1 and 0 <= report["base"]["auroc"] <= 1
        # Memorization measured from what the run trained on: the tuned model's gap beyond the base's.
        assert report["memorization"]["tuned_minus_base"]["memorized_total"] is not None, kind


def test_demo_with_the_real_llama_tokenizer(tmp_path, llama_tokenizer_path):
    losses = _run_demo(tmp_path / "demo", "--tokenizer", str(llama_tokenizer_path))
    _check_layout(tmp_path / "demo")
    assert all(after < before for before, after in losses.values())
