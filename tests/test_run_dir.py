"""A run directory knows its run: a re-typed command never retrains over a finished run, never mixes
with another run's checkpoints, and never resumes with a config that would make a mixed run."""

import hashlib
import shutil
from pathlib import Path
from typing import Dict

import pytest

from tests.test_training import assets, ok, overrides, tune  # noqa: F401  (assets is a fixture)

QUICK = ["dataset_val=null", "epochs=1", "max_steps_per_epoch=4", "save_every_n_steps=2"]


def snapshot(root: Path) -> Dict[str, str]:
    """Every file under `root` and a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def refused(result, *messages: str) -> str:
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "model built" not in text, text[-3000:]
    # Its line from each process, no tracebacks (torchrun's own failure report follows).
    assert text.count("error: RunDirError: ") == 2 and "]: Traceback" not in text, text[-3000:]  # "[rank0]: Traceback"
    for message in messages:
        assert message in text, text[-3000:]
    return text


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    ok(tune(overrides(assets, out, *QUICK)))
    return out


@pytest.fixture
def unfinished(finished, tmp_path):
    """A copy of the finished run as a killed run leaves it: step checkpoints, no checkpoint_final."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoint_final")
    return out


def test_rerunning_a_finished_run_without_resume_is_refused_and_keeps_it(assets, finished):
    before = snapshot(finished)
    refused(tune(overrides(assets, finished, *QUICK)), f"output_dir {finished} holds a finished run",
            "resume_from_checkpoint=true", "start_over=true")  # fmt: skip
    refused(tune(overrides(assets, finished, *QUICK, "resume_from_checkpoint=true")), "nothing to resume")
    assert {k: v for k, v in snapshot(finished).items() if not k.startswith("logs/")} == {
        k: v for k, v in before.items() if not k.startswith("logs/")}


def test_a_fresh_run_into_another_runs_checkpoints_is_refused(assets, unfinished):
    before = snapshot(unfinished)
    refused(tune(overrides(assets, unfinished, *QUICK, "seed=1")), "holds an unfinished run (newest step checkpoint step_000004)")
    assert snapshot(unfinished) == before


def test_resuming_with_another_batch_or_draw_names_every_difference_and_changes_nothing(assets, unfinished):
    before = snapshot(unfinished)
    result = tune(overrides(assets, unfinished, *QUICK, "resume_from_checkpoint=true", "batch_size=1",
                            "dataset.n_samples=12"))  # fmt: skip
    refused(result, "so resuming would mix two runs", "batch_size: 2 in the run, 1 now",
            "dataset.n_samples: 16 in the run, 12 now")  # fmt: skip
    assert snapshot(unfinished) == before
    # Logging and checkpoint cadence may change on resume.
    ok(tune(overrides(assets, unfinished, *QUICK, "resume_from_checkpoint=true", "save_every_n_steps=null",
                      "log_every_n_steps=2")))  # fmt: skip
    assert (unfinished / "checkpoint_final" / "config.json").is_file()


def test_start_over_replaces_the_earlier_run(assets, unfinished):
    stale = unfinished / "checkpoints" / "step_000002"
    ok(tune(overrides(assets, unfinished, *QUICK, "save_every_n_steps=null", "start_over=true")))
    assert not (unfinished / "checkpoints").exists() and not stale.exists()
    assert (unfinished / "checkpoint_final" / "config.json").is_file()


def test_an_output_dir_that_is_a_file_is_refused(assets, tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    refused(tune(overrides(assets, tmp_path / "taken" / "run", *QUICK)),
            f"{tmp_path / 'taken'} is a file, not a directory")  # fmt: skip
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_a_damaged_step_checkpoint_names_itself_and_the_previous_one(assets, unfinished):
    shard = unfinished / "checkpoints" / "step_000004" / "state" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated, as by a full disk
    result = tune(overrides(assets, unfinished, *QUICK, "resume_from_checkpoint=true"))
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{unfinished / 'checkpoints' / 'step_000004'}: cannot be read, it is damaged" in text, text[-3000:]
    assert f"continue from the previous complete checkpoint, {unfinished / 'checkpoints' / 'step_000002'}" in text
