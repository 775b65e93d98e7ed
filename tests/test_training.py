"""Training you can trust. With 2 processes on CPU in fp32 (`tune run`, as users run it): the outputs
for Rho-1, validation, per-step losses equal to torchtune's own `full_finetune_distributed`, an exact
resume after the whole run is killed in the middle of a checkpoint write, a clean stop on Ctrl-C, and
collective timeouts. In one process (in this process): SIGTERM, a NaN stop, resume without a checkpoint,
packed rows, the plain `python recipes/ref_finetune.py` form in bf16."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from conftest import (
    PROJECT_ROOT,
    STEPS,
    TINY_CONFIG,
    logged,
    ok,
    overrides,
    preempt_this_process_after,
    reached,
    run_in_process,
    send,
    tune,
    when,
    worker,
)
from ref_tuning import convert
from ref_tuning.checksums import file_sha256
from ref_tuning.hf_checkpoint import METADATA_FILE, HFBinCheckpointer, load_hf_state_dict
from ref_tuning.data import codecontests_dataset, split_files
from ref_tuning.line_index import SplitIndex, cache_folder
from ref_tuning.demo import validation_loss
from ref_tuning.models import sheared_llama_tokenizer, tiny_sheared_llama
from ref_tuning.step_checkpoints import load_weights
from benchmarks.stock_recipe import stock_config

VALIDATION = ["eval_every_n_steps=2", "dataset_val.n_samples=5"]  # odd: one rank pads with a label-less sample


def final_weights(output_dir: Path) -> Dict[str, torch.Tensor]:
    return load_hf_state_dict(output_dir / "checkpoint_final")


def assert_bit_identical(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def train(assets, output_dir: Path, *extra: str) -> str:
    """One process, in this process: the log."""
    code, text = run_in_process("train", overrides(assets, output_dir, *extra))
    assert code == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted 2-process run of STEPS steps, by the README's literal `tune run` command: its output folder
    and its output."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = ok(tune(overrides(assets, out, *VALIDATION), literal=True))
    return out, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# The uninterrupted run


def test_rotated_step_checkpoints_and_the_outputs(assets, reference):
    out, _ = reference
    assert [s for s, _ in logged(out / "logs", "loss")] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000006", "step_000008"]  # keep 2
    step = out / "checkpoints" / "step_000008"
    sums = ["SHA256SUMS.rank_0", "SHA256SUMS.rank_1"]  # each rank's own files, hashed after the commit
    assert sorted(p.name for p in step.iterdir()) == [*sums, "hf", "rank_0.pt", "rank_1.pt", "state", "train_state.pt"]
    listed = {
        line.split("  ")[1]: line.split("  ")[0] for name in sums for line in (step / name).read_text().splitlines()
    }
    expected = ["rank_0.pt", "rank_1.pt", "state/__0_0.distcp", "state/__1_0.distcp", "train_state.pt"]
    assert sorted(listed) == expected and all(file_sha256(step / f) == digest for f, digest in listed.items())
    # Each rank wrote its own shard of weights and optimizer state; nothing was gathered.
    assert sorted(p.name for p in (step / "state").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    final = json.loads((out / "checkpoint_final" / METADATA_FILE).read_text())
    assert final["step"] == STEPS and final["config"]["batch_size"] == 2 and final["validation"]["step"] == STEPS
    assert final["epoch"] == 2  # epochs=2 (it once said 3: the counter was read after the loop advanced it)
    train = SplitIndex.open(*split_files(assets["data"], "train"), cache_folder(Path(assets["data"])))
    assert final["trained_on"]["fingerprint"] == train.fingerprint()  # what the report checks its memorization by


def test_progress_bar_and_summary(reference):
    _, text = reference
    assert re.search(rf"training: 100%.*{STEPS}/{STEPS} .*loss=\d+\.\d+, lr=\S+, tok_s=\d+", text), text[-2000:]
    assert re.search(
        rf"done: {STEPS} steps \({STEPS} in this run\), [\d,]+ tokens trained on in \d+ s, best "
        r"validation loss",
        text,
    )


def test_checkpoint_final_is_what_transformers_loads_and_it_learned(assets, reference, tmp_path):
    out, _ = reference
    final = out / "checkpoint_final"
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == "float32"
    assert (final / "tokenizer.model").read_bytes() == assets["tokenizer"].read_bytes()
    before, after = load_hf_state_dict(assets["model"]), load_hf_state_dict(final)
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("proj.weight"))
    # transformers and our torchtune model read the same weights out of the directory.
    hf_model = AutoModelForCausalLM.from_pretrained(final).eval()
    model_args = {k: v for k, v in OmegaConf.load(PROJECT_ROOT / TINY_CONFIG).model.items() if k != "_component_"}
    ours = tiny_sheared_llama(**dict(model_args, vocab_size=assets["vocab_size"])).eval()
    ours.load_state_dict(HFBinCheckpointer(str(final), str(tmp_path / "unused")).load_checkpoint()["model"])
    tokens = torch.randint(0, assets["vocab_size"], (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_model(tokens).logits, atol=1e-5, rtol=1e-5)
    # Training on code lowered the held-out loss.
    assert validation_loss(final, assets["data"], assets["tokenizer"], n_samples=8) < validation_loss(
        assets["model"], assets["data"], assets["tokenizer"], n_samples=8
    )


def test_a_step_checkpoint_converts_to_an_hf_directory_that_transformers_loads(reference, tmp_path):
    out, _ = reference
    hf = tmp_path / "step8-hf"
    assert convert.main(["step-to-hf", str(out / "checkpoints" / "step_000008"), str(hf), "--no-progress"]) == 0
    # The last step's checkpoint holds the weights checkpoint_final holds, both fp32 here.
    assert_bit_identical(load_hf_state_dict(hf), final_weights(out))
    model = AutoModelForCausalLM.from_pretrained(hf, dtype="auto")
    assert model.dtype == torch.float32 and (hf / "tokenizer.model").is_file()


def test_validation_metrics_and_the_best_checkpoint(assets, reference):
    out, _ = reference
    val = logged(out / "logs", "val_loss")
    assert [s for s, _ in val] == [2, 4, 6, 8]
    accuracy, perplexity = dict(logged(out / "logs", "val_accuracy")), dict(logged(out / "logs", "val_perplexity"))
    assert all(0 <= accuracy[s] < 1 and perplexity[s] == pytest.approx(math.exp(v)) for s, v in val)
    best_step, best_loss = min(val, key=lambda sv: sv[1])
    best = json.loads((out / "checkpoint_best" / METADATA_FILE).read_text())
    assert best["step"] == best_step and best["validation"]["val_loss"] == pytest.approx(best_loss)
    # The recipe's validation loss is the one transformers computes on the written directory.
    assert validation_loss(out / "checkpoint_best", assets["data"], assets["tokenizer"], n_samples=5) == pytest.approx(
        best_loss, abs=1e-4
    )


def test_per_step_losses_equal_torchtunes_full_finetune_distributed(assets, reference, tmp_path):
    out, _ = reference
    ours = OmegaConf.merge(OmegaConf.load(PROJECT_ROOT / TINY_CONFIG), OmegaConf.from_dotlist(overrides(assets, out)))
    ours = OmegaConf.create(OmegaConf.to_container(ours, resolve=True))
    stock, config_path = tmp_path / "stock", tmp_path / "stock.yaml"
    OmegaConf.save(stock_config(ours, str(stock)), config_path)
    ok(tune([], recipe="benchmarks/stock_recipe.py", config=str(config_path)))
    ours_losses, stock_losses = logged(out / "logs", "loss"), logged(stock / "logs", "loss")
    assert len(ours_losses) == len(stock_losses) == STEPS
    for (s1, a), (s2, b) in zip(ours_losses, stock_losses):
        assert s1 == s2 and abs(a - b) <= 1e-5, (s1, a, b)


# ---------------------------------------------------------------------------------------------
# Interrupted runs


def test_a_kill_during_a_checkpoint_write_then_ctrl_c_and_the_resumes_are_exact(assets, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "run"
    # The whole run (launcher and workers) dies the moment step 4's checkpoint is begun, as on a power cut.
    begun = lambda: any((out / "checkpoints").glob(".step_000004.tmp-*"))  # noqa: E731
    result = tune(overrides(assets, out, *VALIDATION), watch=when(begun, send(signal.SIGKILL)))
    assert result.returncode != 0 and not (out / "checkpoint_final").exists()
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(left) == 2 and left[0].startswith(".step_000004.tmp-") and left[1] == "step_000002", left

    # Resumed from step 2, it gets Ctrl-C after step 5: the launcher passes SIGINT on to the workers, which
    # finish the step, write a checkpoint and exit without a traceback.
    resume = [*VALIDATION, "resume_from_checkpoint=true"]
    result = tune(
        overrides(assets, out, *resume),
        watch=when(lambda: 5 in dict(logged(out / "logs", "loss")), send(signal.SIGINT, launcher_only=True)),
    )
    text = result.stderr + result.stdout
    assert "SIGINT: stopped after step" in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "]: Traceback" not in text  # no worker's traceback ("[rank0]: Traceback")
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    stopped = int(re.search(r"SIGINT: stopped after step (\d+)", text).group(1))
    # Step 4 written again swept the killed run's temporary; the stop's checkpoint is the newest.
    assert len(saved) == 2 and saved[-1] == f"step_{stopped:06d}" and not (out / "checkpoint_final").exists(), saved

    ok(tune(overrides(assets, out, *resume)))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000006", "step_000008"]
    assert_bit_identical(final_weights(out), final_weights(ref))
    expected = dict(logged(ref / "logs", "loss"))
    after = [(s, v) for s, v in logged(out / "logs", "loss") if s > 2]
    assert {s for s, _ in after} == set(range(3, STEPS + 1))
    assert all(v == expected[s] for s, v in after), (after, expected)


def test_sigterm_stops_like_ctrl_c(assets, tmp_path):
    out = tmp_path / "run"
    preempt_this_process_after(out / "logs", step=2)
    text = train(assets, out, "save_every_n_steps=null", "dataset_val=null")
    assert "SIGTERM: stopped after step" in text and not (out / "checkpoint_final").exists()
    assert len(list((out / "checkpoints").glob("step_*"))) == 1


def _pause(rank: int, seconds: float):
    def act(proc: subprocess.Popen) -> None:
        pid = worker(proc, rank)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(pid, signal.SIGCONT)

    return act


def test_collective_timeouts_a_slow_setup_survives_and_a_hung_rank_is_a_clear_error(assets, tmp_path):
    out = tmp_path / "run"
    quick = [
        "dataset_val=null",
        "save_every_n_steps=null",
        "epochs=1",
        "max_steps_per_epoch=3",
        "timeout_setup_s=120",
        "timeout_step_s=2",
    ]

    def watch(proc: subprocess.Popen) -> None:
        # Rank 0 stops for 3 s in setup (as when it indexes a first run's data alone) while rank 1 waits
        # in a collective: that survives. Then rank 1 hangs after step 1: that is an error after 2 s.
        if reached(proc, (out / "logs").exists):
            _pause(0, 3)(proc)
        if reached(proc, lambda: 1 in dict(logged(out / "logs", "loss"))):
            _pause(1, 4)(proc)

    start = time.monotonic()
    result = tune(overrides(assets, out, *quick), watch=watch)
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "model built" in text
    assert re.search(
        r"after training step \d: a collective waited longer than timeout_step_s=2 s for another "
        "process",
        text,
    ), text[-3000:]
    assert time.monotonic() - start < 120


# ---------------------------------------------------------------------------------------------
# One process


def test_resume_without_a_checkpoint_starts_from_the_base_model(assets, tmp_path):
    text = train(
        assets,
        tmp_path / "run",
        "resume_from_checkpoint=true",
        "epochs=1",
        "max_steps_per_epoch=1",
        "save_every_n_steps=null",
        "dataset_val=null",
    )
    assert "no checkpoint in" in text


def test_a_val_batch_size_beyond_the_samples_validates_them_in_one_batch(assets, tmp_path):
    small, huge = tmp_path / "small", tmp_path / "huge"
    quick = ["epochs=1", "max_steps_per_epoch=1", "save_every_n_steps=null", "eval_every_n_steps=1"]
    train(assets, small, *quick, "val_batch_size=2")
    train(assets, huge, *quick, f"val_batch_size={10**11}")  # once allocated a label row per batch slot: 800 GB
    (step, loss), (step_small, loss_small) = *logged(huge / "logs", "val_loss"), *logged(small / "logs", "val_loss")
    assert step == step_small == 1 and loss == pytest.approx(loss_small, abs=1e-6)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    # A learning rate that blows the weights up within a few steps, without gradient clipping.
    code, text = run_in_process(
        "train",
        overrides(
            assets,
            out,
            "optimizer.lr=1e30",
            "clip_grad_norm=null",
            "save_every_n_steps=1",
            "lr_scheduler.num_warmup_steps=0",
        ),
    )
    assert code == 2
    message = re.search(
        r"NonFiniteError: the (training loss|weights) (is|are) (nan|inf|not finite)[^\n]* at step (\d+)"
        r"[^\n]*from the newest checkpoint, (\S+) \(finite weights",
        text,
    )
    assert message, text[-3000:]
    step, good = int(message.group(4)), Path(message.group(5))
    # The newest checkpoint is the one named, from before the failing step, and its weights are finite.
    assert good == out / "checkpoints" / f"step_{step - 1:06d}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))[-1] == good.name
    weights = load_weights(good)
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "checkpoint_final").exists()

    # Metrics read only every 5 steps still name the first step whose loss failed (the one after the weights
    # broke), not the step that read them.
    blown = ["optimizer.lr=1e30", "clip_grad_norm=null", "lr_scheduler.num_warmup_steps=0", "log_every_n_steps=5"]
    code, text = run_in_process("train", overrides(assets, tmp_path / "read", *blown, "save_every_n_steps=null"))
    first = step + 1 if message.group(1) == "weights" else step
    assert code == 2 and f"the training loss is nan at step {first} " in text and first % 5, text[-2000:]


def test_packed_rows_and_sampling_keys_from_the_command_line(assets, tmp_path):
    out = tmp_path / "run"
    sampling = [
        "dataset.difficulty_bins={easy: [0, 9], hard: [10, 28]}",
        "dataset.difficulty_weights={easy: 3, hard: 1}",
        "dataset.max_per_problem=3",
        "dataset.correct_ratio=0.75",
    ]
    train(
        assets,
        out,
        "batch_size=1",
        "gradient_accumulation_steps=1",
        "dataset.n_samples=48",
        "dataset.packed=true",
        "epochs=1",
        "dataset_val=null",
        "save_every_n_steps=null",
        *sampling,
    )
    # The rows the recipe trained on: the same draw, packed the same way, built here.
    rows = codecontests_dataset(
        sheared_llama_tokenizer(str(assets["tokenizer"])),
        str(assets["data"]),
        n_samples=48,
        seed=0,
        max_seq_len=2048,
        packed=True,
        correct_ratio=0.75,
        difficulty_bins={"easy": [0, 9], "hard": [10, 28]},
        difficulty_weights={"easy": 3, "hard": 1},
        max_per_problem=3,
    )
    assert len(rows) < 48 / 2
    assert [step for step, _ in logged(out / "logs", "loss")] == list(range(1, len(rows) + 1))


def test_the_plain_python_form_in_bf16_with_activation_checkpointing(assets, tmp_path):
    # `python recipes/ref_finetune.py` needs the project root ahead of torchtune's own `recipes`.
    out = tmp_path / "run"
    args = overrides(
        assets,
        out,
        "batch_size=4",
        "gradient_accumulation_steps=1",
        "dataset.n_samples=8",
        "epochs=1",
        "dataset_val=null",
        "save_every_n_steps=null",
        "precision=bf16",
        "output_dtype=bf16",
        "enable_activation_checkpointing=true",
    )
    ok(
        subprocess.run(
            [sys.executable, "recipes/ref_finetune.py", "--config", TINY_CONFIG, *args],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)),
        )
    )
    assert [step for step, _ in logged(out / "logs", "loss")] == [1, 2]
    assert json.loads((out / "checkpoint_final" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoint_final", dtype="auto").dtype == torch.bfloat16
