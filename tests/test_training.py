"""Training you can trust, with 2 processes on CPU in fp32: exact resume after SIGKILL (also in the
middle of a checkpoint write), SIGTERM, validation and the outputs for Rho-1, a NaN stop, and per-step
losses equal to torchtune's own `full_finetune_distributed`."""

import json
import math
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from ref_tuning import convert
from ref_tuning.bench import descendants  # noqa: F401  (test_scoring imports it from here)
from ref_tuning.bench.stock_recipe import stock_config
from ref_tuning.checkpointing import METADATA_FILE, load_hf_state_dict
from ref_tuning.data import codecontests_dataset
from ref_tuning.demo import TINY_CONFIG, make_demo_assets, tune_run_command
from ref_tuning.models import sheared_llama_tokenizer
from ref_tuning.step_checkpoints import load_weights

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# 16 samples, 2 per process and micro-batch, 2 processes: 4 optimizer steps an epoch, 8 in 2 epochs.
RUN = ["batch_size=2", "dataset.n_samples=16", "epochs=2", "lr_scheduler.num_warmup_steps=2", "seed=0",
       "save_every_n_steps=2", "keep_last_n_checkpoints=2", "val_batch_size=2"]  # fmt: skip
STEPS = 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_demo_assets(tmp_path_factory.mktemp("demo"))


def overrides(assets, output_dir: Path, *extra: str, validation: bool = True) -> List[str]:
    val = [f"dataset_val.data_dir={assets['data']}", "dataset_val.n_samples=6"] if validation else ["dataset_val=null"]
    return [
        f"tokenizer.path={assets['tokenizer']}",
        f"checkpointer.checkpoint_dir={assets['model']}",
        f"dataset.data_dir={assets['data']}",
        f"output_dir={output_dir}",
        *val,
        *RUN,
        *extra,
    ]


def tune(args: List[str], nproc: int = 2, env: Optional[Dict[str, str]] = None, kill_at_step: Optional[int] = None,
         signal_to_send: int = signal.SIGKILL, log_dir: Optional[Path] = None,
         launcher_only: bool = False) -> subprocess.CompletedProcess:  # fmt: skip
    """`tune run` from the project root; with `kill_at_step`, `signal_to_send` goes to every process of
    the run (or to the launcher only) as soon as the metric log shows that step done."""
    proc = subprocess.Popen(tune_run_command(nproc, args), cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})),
                            start_new_session=True)  # fmt: skip
    if kill_at_step is not None:
        deadline = time.monotonic() + 300
        while proc.poll() is None and kill_at_step not in [s for s, _ in logged(log_dir, "loss")]:
            assert time.monotonic() < deadline, "the run never reached the step"
            time.sleep(0.005)
        if proc.poll() is None:
            # torchrun starts each worker in a session of its own: signal every process of the tree.
            for pid in [proc.pid, *([] if launcher_only else descendants(proc.pid))]:
                try:
                    os.kill(pid, signal_to_send)
                except ProcessLookupError:
                    pass
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def logged(log_dir: Optional[Path], key: str) -> List[Tuple[int, float]]:
    """(step, value) of `key` in every metric log under `log_dir`, in the order written."""
    found = []
    for log_file in sorted(Path(log_dir).glob("log_*.txt")) if log_dir and Path(log_dir).is_dir() else []:
        for line in log_file.read_text().splitlines():
            match = re.match(rf"Step (\d+) \| .*\b{key}:(\S+)", line)
            if match:
                found.append((int(match.group(1)), float(match.group(2))))
    return found


def final_weights(output_dir: Path) -> Dict[str, torch.Tensor]:
    return load_hf_state_dict(output_dir / "checkpoint_final")


def assert_bit_identical(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted run of STEPS steps: its output folder."""
    out = tmp_path_factory.mktemp("reference") / "run"
    ok(tune(overrides(assets, out)))
    return out


# ---------------------------------------------------------------------------------------------
# Resume, preemption, atomic checkpoints


def test_the_uninterrupted_run_writes_rotated_step_checkpoints_and_the_outputs(reference):
    assert [s for s, _ in logged(reference / "logs", "loss")] == list(range(1, STEPS + 1))
    checkpoints = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert checkpoints == ["step_000006", "step_000008"]  # keep_last_n_checkpoints=2, nothing half-written
    step = reference / "checkpoints" / "step_000008"
    assert sorted(p.name for p in step.iterdir()) == ["hf", "rank_0.pt", "rank_1.pt", "state", "train_state.pt"]
    # Each rank wrote its own shard of weights and optimizer state; nothing was gathered.
    assert sorted(p.name for p in (step / "state").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    final = json.loads((reference / "checkpoint_final" / METADATA_FILE).read_text())
    assert final["step"] == STEPS and final["config"]["batch_size"] == 2 and "val_loss" in final["validation"]
    assert final["epoch"] == 2  # epochs=2 (it once said 3: the counter was read after the loop advanced it)


def test_a_step_checkpoint_converts_to_an_hf_directory_that_transformers_loads(reference, tmp_path):
    out = tmp_path / "step8-hf"
    assert convert.main(["step-to-hf", str(reference / "checkpoints" / "step_000008"), str(out), "--no-progress"]) == 0
    # The last step's checkpoint holds the weights checkpoint_final holds, both fp32 here.
    assert_bit_identical(load_hf_state_dict(out), final_weights(reference))
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.float32 and (out / "tokenizer.model").is_file()
    assert convert.main(["step-to-hf", str(reference), str(tmp_path / "x"), "--no-progress"]) == 2  # not a step dir


def test_sigkill_at_a_random_step_then_resume_gives_the_same_weights_and_losses(assets, reference, tmp_path):
    out = tmp_path / "run"
    kill_at = random.Random(os.getpid()).randint(3, STEPS - 2)
    tune(overrides(assets, out), kill_at_step=kill_at, log_dir=out / "logs")
    assert not (out / "checkpoint_final").exists()
    resumed_from = max(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*"))
    assert 2 <= resumed_from <= kill_at + 1
    ok(tune(overrides(assets, out, "resume_from_checkpoint=true")))

    assert_bit_identical(final_weights(out), final_weights(reference))
    expected = dict(logged(reference / "logs", "loss"))
    after = [(s, v) for s, v in logged(out / "logs", "loss") if s > resumed_from]
    assert [s for s, _ in after][-(STEPS - resumed_from):] == list(range(resumed_from + 1, STEPS + 1))
    assert all(v == expected[s] for s, v in after), (after, expected)


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_and_resume_is_exact(assets, reference, tmp_path):
    out = tmp_path / "run"
    # Rank 0 SIGKILLs the whole run in the middle of writing step 4's checkpoint (weight and optimizer
    # shards written, the train state not yet): fault injection, so the moment is certain.
    result = tune(overrides(assets, out), env={"REF_TUNING_FAULT": "kill_in_checkpoint:4"})
    assert result.returncode != 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".tmp-step_000004", "step_000002"]
    ok(tune(overrides(assets, out, "resume_from_checkpoint=true")))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000006", "step_000008"]
    assert_bit_identical(final_weights(out), final_weights(reference))


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_cleanly(assets, reference, tmp_path):
    out = tmp_path / "run"
    result = tune(overrides(assets, out, "save_every_n_steps=null"), kill_at_step=3, signal_to_send=signal.SIGTERM,
                  log_dir=out / "logs")  # fmt: skip
    assert "SIGTERM: stopped after step" in result.stderr + result.stdout, result.stderr[-3000:]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].startswith("step_") and not (out / "checkpoint_final").exists()
    stopped_at = int(saved[0][5:])
    assert [s for s, _ in logged(out / "logs", "loss")] == list(range(1, stopped_at + 1))
    ok(tune(overrides(assets, out, "resume_from_checkpoint=true", "save_every_n_steps=null")))
    assert_bit_identical(final_weights(out), final_weights(reference))


def test_ctrl_c_stops_like_sigterm_without_a_traceback(assets, tmp_path):
    out = tmp_path / "run"
    # Ctrl-C reaches the launcher, which passes SIGINT on to the workers.
    result = tune(overrides(assets, out, "save_every_n_steps=null"), kill_at_step=3, signal_to_send=signal.SIGINT,
                  log_dir=out / "logs", launcher_only=True)  # fmt: skip
    text = result.stderr + result.stdout
    assert "SIGINT: stopped after step" in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "]: Traceback" not in text  # no worker's traceback ("[rank0]: Traceback")
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].startswith("step_") and not (out / "checkpoint_final").exists()


def test_resume_without_a_checkpoint_starts_from_the_base_model(assets, reference, tmp_path):
    result = ok(tune(overrides(assets, tmp_path / "run", "resume_from_checkpoint=true", "epochs=1", "save_every_n_steps=null")))
    assert "no checkpoint in" in result.stderr + result.stdout


# ---------------------------------------------------------------------------------------------
# Validation and the outputs for Rho-1


def _transformers_val_loss(model_dir: Path, assets, n_samples: int, seed: int) -> float:
    """Mean cross-entropy over the response tokens of the validation samples, by `transformers`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ds = codecontests_dataset(sheared_llama_tokenizer(str(assets["tokenizer"])), str(assets["data"]), split="valid",
                              n_samples=n_samples, correct_ratio=1.0, seed=seed)  # fmt: skip
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in ds:
            logits = model(torch.tensor([sample["tokens"]])).logits[0, :-1]
            labels = torch.tensor(sample["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


def test_validation_metrics_and_the_best_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    # An odd number of validation samples: one rank has one fewer, and pads with a label-less one.
    ok(tune(overrides(assets, out, "eval_every_n_steps=2", "dataset_val.n_samples=5", "optimizer.lr=3e-2")))
    val = logged(out / "logs", "val_loss")
    assert [s for s, _ in val] == [2, 4, 6, 8]
    accuracy, perplexity = dict(logged(out / "logs", "val_accuracy")), dict(logged(out / "logs", "val_perplexity"))
    assert all(0 < accuracy[s] < 1 and perplexity[s] == pytest.approx(math.exp(v)) for s, v in val)

    best_step, best_loss = min(val, key=lambda sv: sv[1])
    best = json.loads((out / "checkpoint_best" / METADATA_FILE).read_text())
    assert best["step"] == best_step and best["validation"]["val_loss"] == pytest.approx(best_loss)
    # The recipe's validation loss is the one transformers computes on the written directory.
    assert _transformers_val_loss(out / "checkpoint_best", assets, n_samples=5, seed=0) == pytest.approx(best_loss, abs=1e-4)
    final = json.loads((out / "checkpoint_final" / METADATA_FILE).read_text())
    assert final["step"] == STEPS and final["validation"]["step"] == STEPS


def test_progress_bar_and_summary(reference, assets, tmp_path):
    result = ok(tune(overrides(assets, tmp_path / "run", "epochs=1", "save_every_n_steps=null")))
    assert re.search(r"training: 100%.*4/4 .*loss=\d+\.\d+, lr=\S+, tok_s=\d+", result.stderr), result.stderr[-2000:]
    assert re.search(r"done: 4 steps \(4 in this run\), [\d,]+ tokens trained on in \d+ s, best validation loss",
                     result.stderr + result.stdout)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Failure is loud


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    # A learning rate that blows the weights up within a few steps, without gradient clipping.
    result = tune(overrides(assets, out, "optimizer.lr=1e30", "clip_grad_norm=null", "save_every_n_steps=1",
                            "lr_scheduler.num_warmup_steps=0"))  # fmt: skip
    assert result.returncode != 0
    message = re.search(r"NonFiniteError: the (training loss|weights) (is|are) (nan|inf|not finite)[^\n]* at step (\d+)"
                        r"[^\n]*The last good checkpoint is (\S+)\. ", result.stderr)  # fmt: skip
    assert message, result.stderr[-3000:]
    step, good = int(message.group(4)), Path(message.group(5))
    # The newest checkpoint is the one named, from before the failing step, and its weights are finite.
    assert good == out / "checkpoints" / f"step_{step - 1:06d}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) [-1] == good.name
    weights = load_weights(good)
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "checkpoint_final").exists()


def test_config_and_data_mistakes_fail_before_any_model_is_built(assets, tmp_path):
    result = tune(overrides(assets, tmp_path / "a", "batch_size=8", "dataset.n_samples=4"))
    assert result.returncode != 0 and "lower batch_size or raise dataset.n_samples" in result.stderr + result.stdout
    assert "model built" not in result.stderr + result.stdout
    result = tune(overrides(assets, tmp_path / "b", "batch_size=two", "eval_every_n_steps=0", "precision=fp16"))
    text = result.stderr + result.stdout
    assert result.returncode != 0 and "model built" not in text
    for message in ("config key 'batch_size': expected a positive integer, got 'two'",
                    "config key 'eval_every_n_steps': expected a positive integer or null, got 0",
                    "config key 'precision': expected one of bf16_mixed, bf16, fp32, got 'fp16'"):  # fmt: skip
        assert message in text, text[-3000:]
    result = tune(overrides(assets, tmp_path / "c", "optimizer.lr=-1e-5", "device=cuda"))
    text = result.stderr + result.stdout
    assert result.returncode != 0 and "model built" not in text
    assert "config key 'optimizer.lr': expected a positive number, got -1e-05" in text, text[-3000:]
    assert "config key 'device': cuda, but torch" in text and "sees no CUDA device here" in text, text[-3000:]
    result = tune(overrides(assets, tmp_path / "d", "model.vocab_size=512"))
    text = result.stderr + result.stdout
    assert result.returncode != 0 and "model built" not in text
    assert f"vocab_size {assets['vocab_size']} in the checkpoint, 512 in the model" in text, text[-3000:]


# ---------------------------------------------------------------------------------------------
# Peer parity: torchtune's own recipe


def test_per_step_losses_equal_torchtunes_full_finetune_distributed(assets, tmp_path):
    extra = ["epochs=1", "dataset.n_samples=96", "save_every_n_steps=null", "batch_size=2", "gradient_accumulation_steps=2"]
    ours = tmp_path / "ours"
    ok(tune(overrides(assets, ours, *extra, validation=False)))
    ours_cfg = OmegaConf.load(PROJECT_ROOT / TINY_CONFIG)
    dotlist = overrides(assets, ours, *extra, validation=False)
    ours_cfg = OmegaConf.merge(ours_cfg, OmegaConf.from_dotlist(dotlist))
    ours_cfg = OmegaConf.create(OmegaConf.to_container(ours_cfg, resolve=True))
    stock = tmp_path / "stock"
    config_path = tmp_path / "stock.yaml"
    OmegaConf.save(stock_config(ours_cfg, str(stock)), config_path)
    command = tune_run_command(2, [])[:4] + ["ref_tuning/bench/stock_recipe.py", "--config", str(config_path)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    ok(result)
    ours_losses, stock_losses = logged(ours / "logs", "loss"), logged(stock / "logs", "loss")
    assert len(ours_losses) == len(stock_losses) >= 10
    for (s1, a), (s2, b) in zip(ours_losses, stock_losses):
        assert s1 == s2 and abs(a - b) <= 1e-5, (s1, a, b)


def test_tensorboard_when_asked(assets, tmp_path):
    out = tmp_path / "run"
    logger = ["metric_logger._component_=torchtune.training.metric_logging.TensorBoardLogger", "epochs=1",
              "save_every_n_steps=null"]  # fmt: skip
    result = tune(overrides(assets, out, *logger))
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert result.returncode != 0
        assert "config key 'metric_logger': torchtune.training.metric_logging.TensorBoardLogger needs a package that is not " \
               "installed" in result.stderr and "pip install tensorboard" in result.stderr  # fmt: skip
        assert "model built" not in result.stderr + result.stdout
        return
    ok(result)
    assert list((out / "logs").rglob("events.out.tfevents.*"))
