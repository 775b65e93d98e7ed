"""A run directory knows its run: a re-typed command never retrains over a finished run, never mixes
with another run's checkpoints, and never resumes with a config that would make a mixed run.
(`test_bad_inputs.py` holds every refusal as a one-process case; here, what is allowed, and a
refusal as users meet it, from two processes.)"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
from omegaconf import OmegaConf

from conftest import overrides, run_in_forks, run_in_process
from ref_tuning import run_dir
from ref_tuning.demo import read_problems
from ref_tuning.prepare import prepare_split

QUICK = ["dataset_val=null", "epochs=1", "max_steps_per_epoch=4", "save_every_n_steps=2"]


def snapshot(root: Path) -> Dict[str, str]:
    """Every file under `root` and a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def train(assets, output_dir: Path, *extra: str) -> str:
    code, text = run_in_process("train", overrides(assets, output_dir, *QUICK, *extra))
    assert code == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(assets, out)
    return out


@pytest.fixture
def unfinished(finished, tmp_path):
    """A copy of the finished run as a killed run leaves it: step checkpoints, no checkpoint_final."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoint_final")
    return out


def test_a_refusal_from_two_processes_is_one_line_from_each_and_keeps_the_run(assets, finished):
    before = snapshot(finished)
    codes, text = run_in_forks("train", overrides(assets, finished, *QUICK))  # two ranks, as torchrun starts them
    assert codes == [2, 2] and "model built" not in text, text[-3000:]
    # Its line from each process, no tracebacks.
    assert text.count(f"error: RunDirError: output_dir {finished} holds a finished run") == 2, text[-3000:]
    assert "Traceback" not in text and "resume_from_checkpoint=true" in text and "start_over=true" in text
    assert {k: v for k, v in snapshot(finished).items() if not k.startswith("logs/")} == {
        k: v for k, v in before.items() if not k.startswith("logs/")
    }


def test_a_refused_resume_names_every_difference_and_cadence_may_change(assets, unfinished):
    before = snapshot(unfinished)
    code, text = run_in_process(
        "train",
        overrides(assets, unfinished, *QUICK, "resume_from_checkpoint=true", "batch_size=1", "dataset.n_samples=12"),
    )
    assert code == 2 and "differs from that of the run" in text and "in batch_size, dataset.n_samples" in text
    assert "batch_size: 2 in the run, 1 now" in text and "dataset.n_samples: 32 in the run, 12 now" in text
    assert snapshot(unfinished) == before
    # Logging and checkpoint cadence may change on resume.
    train(assets, unfinished, "resume_from_checkpoint=true", "save_every_n_steps=null", "log_every_n_steps=2")
    assert (unfinished / "checkpoint_final" / "config.json").is_file()


def test_start_over_deletes_a_lora_runs_adapter_links_with_the_models(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint_final" / "adapter").mkdir(parents=True)
    (out / "adapter_final").symlink_to("checkpoint_final/adapter", target_is_directory=True)
    (out / "adapter_best").symlink_to("checkpoint_best/adapter", target_is_directory=True)  # dangling
    cfg = OmegaConf.create({"start_over": True, "resume_from_checkpoint": False, "seed": 0})
    run_dir.record(out, cfg, 1, {})
    assert sorted(p.name for p in out.iterdir()) == [run_dir.RUN_FILE]


def test_start_over_replaces_the_earlier_run(assets, unfinished):
    stale = unfinished / "checkpoints" / "step_000002"
    train(assets, unfinished, "save_every_n_steps=null", "start_over=true")
    assert not (unfinished / "checkpoints").exists() and not stale.exists()
    assert (unfinished / "checkpoint_final" / "config.json").is_file()


def test_an_incomplete_newest_step_checkpoint_is_skipped_with_a_line_saying_so(assets, unfinished):
    (unfinished / "checkpoints" / "step_000004" / "train_state.pt").unlink()  # as a copy cut short leaves it
    text = train(assets, unfinished, "resume_from_checkpoint=true")
    assert f"skipping step_000004 in {unfinished / 'checkpoints'}: incomplete (no train_state.pt)" in text
    assert f"resumed from {unfinished / 'checkpoints' / 'step_000002'} (step 2" in text, text[-2000:]


def test_a_run_that_failed_before_its_first_checkpoint_is_taken_over(assets, tmp_path):
    out = tmp_path / "run"
    code, text = run_in_process("train", overrides(assets, out, *QUICK, "checkpointer.checkpoint_dir=/nowhere"))
    assert code == 2 and not (out / "run.json").exists()  # nothing but its log
    train(assets, out, "max_steps_per_epoch=1", "save_every_n_steps=null", "epochs=1")
    (out / "checkpoint_final").rename(out / "elsewhere")  # leaves run.json alone, as a crash before a save does
    shutil.rmtree(out / "checkpoint_best", ignore_errors=True)
    train(assets, out, "seed=3")
    assert '"seed": 3' in (out / "run.json").read_text()


def test_a_run_into_a_directory_in_use_is_refused_and_a_dead_runs_lock_blocks_nothing(assets, tmp_path):
    out = tmp_path / "run"
    # Another live run holds the directory (its lock, taken from a process of its own).
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out / run_dir.LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, text = run_in_process("train", overrides(assets, out, *QUICK))
        errors = [line for line in text.splitlines() if "error:" in line]
        assert (
            code == 2
            and len(errors) == 1
            and "another run is using it now (host and pid: otherhost 12345)" in errors[0]
        ), text[-3000:]
        assert sorted(p.name for p in out.iterdir()) == [run_dir.LOCK_FILE]  # nothing else touched
    finally:
        holder.kill()  # it dies without a word: the kernel lets go of its lock
        holder.wait()
    train(assets, out)
    assert (out / "checkpoint_final").is_dir()


# Hold a file's lock until killed, as a run's rank 0 does.
HOLD = """
import fcntl, os, sys, time
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX)
lock.write("otherhost 12345\\n"); lock.flush()
print("held", flush=True)
time.sleep(600)
"""


def test_a_resume_after_the_data_changed_is_refused_naming_the_file(assets, tmp_path):
    data = shutil.copytree(assets["data"], tmp_path / "data")
    out = tmp_path / "run"
    train(assets, out, f"dataset.data_dir={data}")
    shutil.rmtree(out / "checkpoint_final")  # as a killed run leaves it
    # The split prepared again without its first problem: other lines, and a metadata file to match.
    rows = read_problems("train")[1:]
    raw = tmp_path / "raw" / "train.jsonl"
    raw.parent.mkdir()
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prepare_split([raw], data, "train", assets["tokenizer"], progress=False)
    before = snapshot(out)
    args = overrides(assets, out, *QUICK, f"dataset.data_dir={data}", "resume_from_checkpoint=true")
    code, text = run_in_process("train", args)
    errors = [line for line in text.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1, text[-3000:]
    assert f"{data.resolve() / 'train.jsonl'} (config key 'dataset') or its metadata changed" in errors[0]
    assert snapshot(out) == before
