"""torchtune's own recipes take our checkpointer: the stock `full_finetune_distributed` (benchmarks/stock_recipe.py)
with our model builder and `HFBinCheckpointer` in place of `FullModelHFCheckpointer`, 2 processes on CPU in
fp32, trains, writes complete HF directories at `output_dir/epoch_{N}`, and resumes exactly from its recipe state."""

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config as tt_config
from transformers import AutoModelForCausalLM

from conftest import PROJECT_ROOT, TINY_CONFIG, logged, ok, overrides, tune
from ref_tuning.hf_checkpoint import METADATA_FILE, RECIPE_STATE_FILE, CheckpointError, load_hf_state_dict
from ref_tuning.scoring import load_reference
from benchmarks.stock_recipe import stock_config

OURS = "ref_tuning.hf_checkpoint.HFBinCheckpointer"
# 16 samples, 2 per process and step, 2 processes: 4 steps an epoch, capped at 2; 2 epochs, so that the
# first one's checkpoint is an intermediate one (with recipe state) and the second's the final one.
RUN = ["dataset.n_samples=16", "batch_size=2", "gradient_accumulation_steps=1", "epochs=2", "max_steps_per_epoch=2"]


def stock_with_ours(assets, output_dir: Path) -> DictConfig:
    """The stock recipe's config for our tiny run, with our checkpointer under the same keys as torchtune's."""
    ours = OmegaConf.merge(
        OmegaConf.load(PROJECT_ROOT / TINY_CONFIG),
        OmegaConf.from_dotlist(overrides(assets, output_dir, *RUN, validation=False)),
    )
    cfg = stock_config(OmegaConf.create(OmegaConf.to_container(ours, resolve=True)), str(output_dir))
    cfg.model.vocab_size = assets["vocab_size"]  # the demo tokenizer's
    cfg.checkpointer._component_ = OURS  # checkpoint_files, model_type, recipe_checkpoint kept as they are
    return cfg


def run(cfg: DictConfig, path: Path) -> None:
    OmegaConf.save(cfg, path)
    ok(tune([], recipe="benchmarks/stock_recipe.py", config=str(path)))


@pytest.fixture(scope="module")
def stock_run(assets, tmp_path_factory):
    """A run of the stock recipe with our checkpointer: its config and output_dir."""
    out = tmp_path_factory.mktemp("stock_ours") / "run"
    cfg = stock_with_ours(assets, out)
    run(cfg, out.parent / "config.yaml")
    return cfg, out


def test_the_stock_recipe_trains_and_writes_hf_directories_with_our_checkpointer(assets, stock_run):
    cfg, out = stock_run
    losses = logged(out / "logs", "loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4] and all(math.isfinite(v) for _, v in losses)
    assert sorted(p.name for p in out.iterdir()) == [
        "epoch_0",
        "epoch_1",
        "logs",
        "recipe_state",
        "torchtune_config.yaml",
    ]
    final = out / "epoch_1"
    # A complete HF directory: the hub's file names, an index, the config with its dtype, the tokenizer.
    names = {p.name for p in final.iterdir()}
    assert {"pytorch_model.bin.index.json", "config.json", "tokenizer.model"} <= names and METADATA_FILE not in names
    assert all(n.startswith("pytorch_model-0") for n in names if n.endswith(".bin"))
    before, after = load_hf_state_dict(assets["model"]), load_hf_state_dict(final)
    assert before.keys() == after.keys() and not torch.equal(before["model.norm.weight"], after["model.norm.weight"])
    # transformers and our torchtune model read the same model out of it.
    hf_model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = load_reference(final, torch.device("cpu"), torch.float32)
    tokens = torch.randint(0, assets["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_model(tokens).logits, atol=1e-5, rtol=1e-5)
    # The intermediate checkpoint's recipe state is where torchtune's own checkpointer puts it.
    state = torch.load(out / RECIPE_STATE_FILE, weights_only=True)
    assert state["epochs_run"] == 1 and state["seed"] == cfg.seed and "optimizer" in state and "model" not in state


def test_the_stock_recipe_resumes_exactly_from_our_checkpoint(assets, stock_run, tmp_path):
    _, first = stock_run
    # Only what the first epoch left: its model and the recipe state.
    out = tmp_path / "resumed"
    out.mkdir()
    for name in ("epoch_0", "recipe_state"):
        shutil.copytree(first / name, out / name)
    resumed = stock_with_ours(assets, out)
    resumed.resume_from_checkpoint = True
    run(resumed, tmp_path / "config.yaml")
    assert logged(out / "logs", "loss") == logged(first / "logs", "loss")[2:]  # steps 3 and 4, the same losses
    a, b = load_hf_state_dict(first / "epoch_1"), load_hf_state_dict(out / "epoch_1")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ends with other weights"


def instantiate(cfg: DictConfig, **changes):
    return tt_config.instantiate(OmegaConf.merge(cfg.checkpointer, changes), should_load_recipe_state=False)


def test_wrong_checkpoint_files_or_model_type_are_clear_errors(assets, tmp_path):
    cfg = stock_with_ours(assets, tmp_path / "out")
    instantiate(cfg)  # the stock keys as they are
    files = list(cfg.checkpointer.checkpoint_files)
    with pytest.raises(
        CheckpointError, match=rf"\['model-00001-of-00002.bin'\] disagree with .*{re.escape(str(files))}"
    ):
        instantiate(cfg, checkpoint_files=["model-00001-of-00002.bin"])
    with pytest.raises(CheckpointError, match="model_type: expected LLAMA2 .* found 'QWEN2'"):
        instantiate(cfg, model_type="QWEN2")
    with pytest.raises(CheckpointError, match=rf"{RECIPE_STATE_FILE}: not found; resuming needs the recipe state"):
        tt_config.instantiate(cfg.checkpointer, should_load_recipe_state=True)


def test_a_new_run_into_a_finished_runs_output_dir_is_refused(assets, stock_run):
    cfg, out = stock_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"holds epoch_0, epoch_1, recipe_state of an earlier run.* resume it"):
        instantiate(cfg)  # what the stock recipe builds first, before it trains
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
