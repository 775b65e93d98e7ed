"""The recipe as users run it: `tune run` from the project root, on CPU, on the tiny demo assets."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from ref_tuning.checkpointing import HFBinCheckpointer, load_hf_state_dict
from ref_tuning.config import ConfigError, validate_config
from ref_tuning.data import codecontests_dataset
from ref_tuning.demo import TINY_CONFIG, make_demo_assets, tune_run_command, validation_loss
from ref_tuning.models import sheared_llama_tokenizer, tiny_sheared_llama

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
from recipes.ref_finetune import CONFIG_SCHEMA  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_demo_assets(tmp_path_factory.mktemp("demo"))


def _overrides(assets, output_dir, *extra):
    return [
        f"tokenizer.path={assets['tokenizer']}",
        f"checkpointer.checkpoint_dir={assets['model']}",
        f"dataset.data_dir={assets['data']}",
        f"dataset_val.data_dir={assets['data']}",
        f"output_dir={output_dir}",
        *extra,
    ]


def _tune(command, env=None, expect_ok=True):
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=600
    )
    if expect_ok and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def _logged_steps(output_dir):
    """(step, training loss) of every step in the run's metric log (validation lines left out)."""
    (log_file,) = (Path(output_dir) / "logs").glob("log_*.txt")
    found = [re.match(r"Step (\d+) \| loss:(\S+)", line) for line in log_file.read_text().splitlines()]
    return [(int(m.group(1)), float(m.group(2))) for m in found if m]


def test_two_processes_train_and_write_a_checkpoint_transformers_loads(assets, tmp_path):
    out = tmp_path / "run"
    # 16 samples, 2 per process, 2 processes, 1 accumulation step: 4 optimizer steps per epoch.
    overrides = _overrides(assets, out, "batch_size=2", "dataset.n_samples=16", "epochs=1",
                           "lr_scheduler.num_warmup_steps=1")  # fmt: skip
    _tune(tune_run_command(2, overrides))

    assert [step for step, _ in _logged_steps(out)] == [1, 2, 3, 4]  # the overrides took effect
    final = out / "checkpoint_final"
    config = json.loads((final / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    assert (final / "tokenizer.model").read_bytes() == assets["tokenizer"].read_bytes()

    before, after = load_hf_state_dict(assets["model"]), load_hf_state_dict(final)
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("proj.weight"))

    # transformers and our torchtune model read the same weights out of the directory.
    hf_model = AutoModelForCausalLM.from_pretrained(final).eval()
    ours = tiny_sheared_llama(vocab_size=assets["vocab_size"], **_tiny_model_args()).eval()
    ours.load_state_dict(HFBinCheckpointer(str(final), str(tmp_path / "unused")).load_checkpoint()["model"])
    tokens = torch.randint(0, assets["vocab_size"], (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_model(tokens).logits, atol=1e-5, rtol=1e-5)

    # Training on code lowered the held-out loss.
    assert validation_loss(final, assets["data"], assets["tokenizer"]) < validation_loss(
        assets["model"], assets["data"], assets["tokenizer"]
    )


def test_packed_rows_and_sampling_keys_from_the_command_line(assets, tmp_path):
    out = tmp_path / "run"
    sampling = ["dataset.difficulty_bins={easy: [0, 9], hard: [10, 28]}", "dataset.difficulty_weights={easy: 3, hard: 1}",
                "dataset.max_per_problem=3", "dataset.correct_ratio=0.75"]  # fmt: skip
    overrides = _overrides(assets, out, "batch_size=1", "dataset.n_samples=48", "dataset.packed=true",
                           "epochs=1", "lr_scheduler.num_warmup_steps=1", *sampling)  # fmt: skip
    _tune(tune_run_command(2, overrides))
    # The rows the recipe trained on: the same draw, packed the same way, built here.
    rows = codecontests_dataset(sheared_llama_tokenizer(str(assets["tokenizer"])), str(assets["data"]),
                                n_samples=48, seed=42, max_seq_len=2048, packed=True, correct_ratio=0.75,
                                difficulty_bins={"easy": [0, 9], "hard": [10, 28]},
                                difficulty_weights={"easy": 3, "hard": 1}, max_per_problem=3)  # fmt: skip
    assert len(rows) < 48 / 2
    assert [step for step, _ in _logged_steps(out)] == list(range(1, len(rows) // 2 + 1))
    assert (out / "checkpoint_final" / "config.json").is_file()


def _tiny_model_args():
    model = OmegaConf.load(PROJECT_ROOT / TINY_CONFIG).model
    return {k: v for k, v in model.items() if k not in ("_component_", "vocab_size")}


@pytest.mark.parametrize(
    "command, env, extra, dtype",
    [
        # The production settings too: bf16 and activation checkpointing.
        (["--nproc_per_node", "1"], {}, ["precision=bf16", "output_dtype=bf16", "enable_activation_checkpointing=true"], torch.bfloat16),
        # The plain single-process form needs the project root ahead of torchtune's own `recipes`.
        ([], {"PYTHONPATH": str(PROJECT_ROOT)}, [], torch.float32),
    ],
    ids=["nproc_per_node-1-bf16", "plain-with-PYTHONPATH"],
)
def test_single_process_forms(assets, tmp_path, command, env, extra, dtype):
    out = tmp_path / "run"
    overrides = _overrides(assets, out, "batch_size=4", "dataset.n_samples=8", "epochs=1", *extra)
    full = tune_run_command(1, overrides)
    full[2:4] = command  # replace "--nproc_per_node 1" by the form under test
    _tune(full, env=env)
    assert [step for step, _ in _logged_steps(out)] == [1, 2]
    config = json.loads((out / "checkpoint_final" / "config.json").read_text())
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoint_final", dtype="auto").dtype == dtype


@pytest.mark.parametrize("config_file", ["configs/ref_tuning.yaml", "configs/tiny_cpu.yaml"])
def test_shipped_configs_are_valid(config_file):
    validate_config(OmegaConf.load(PROJECT_ROOT / config_file), CONFIG_SCHEMA)


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.n_sample=16", "unknown config key 'dataset.n_sample': did you mean 'n_samples'?"),
        ("batchsize=2", "unknown config key 'batchsize': did you mean 'batch_size'?"),
        ("optimizer.learning_rate=1e-5", "unknown config key 'optimizer.learning_rate'"),
    ],
)
def test_misspelled_keys_are_errors(override, message):
    cfg = OmegaConf.merge(OmegaConf.load(PROJECT_ROOT / TINY_CONFIG), OmegaConf.from_dotlist([override]))
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        validate_config(cfg, CONFIG_SCHEMA)
