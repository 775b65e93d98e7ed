"""LoRA in the same recipe: torchtune's `lora_finetune_distributed` step for step, adapters only in the step
checkpoints, an exact resume after SIGKILL, and outputs that `transformers` (merged) and `peft` (adapter) load
with the LoRA model's logits."""

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import PROJECT_ROOT, TINY_CONFIG, logged, ok, overrides, preempt_this_process_after, run_in_process
from conftest import send, tune, when
from ref_tuning import convert, hf_checkpoint
from ref_tuning.hf_checkpoint import METADATA_FILE, CheckpointError, HFBinCheckpointer, load_hf_state_dict
from ref_tuning.hf_checkpoint import load_tune_state_dict
from ref_tuning.models import lora_tiny_sheared_llama
from ref_tuning.scoring import load_reference
from ref_tuning.step_checkpoints import load_weights
from benchmarks.stock_recipe import RECIPE_ENV, stock_config

LORA = dict(lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], lora_rank=4, lora_alpha=8.0)
ARGS = [
    "model._component_=ref_tuning.models.lora_tiny_sheared_llama",
    f"model.lora_attn_modules=[{','.join(LORA['lora_attn_modules'])}]",
    "model.apply_lora_to_mlp=false",  # torchtune's LoRA recipe reads it
    f"model.lora_rank={LORA['lora_rank']}",
    f"model.lora_alpha={LORA['lora_alpha']}",
    "optimizer.lr=1e-3",  # adapters start at zero: a visible change in 8 steps
    "eval_every_n_steps=4",
]
STEPS = 8


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    """An uninterrupted 2-process LoRA run of STEPS steps."""
    out = tmp_path_factory.mktemp("lora") / "run"
    ok(tune(overrides(assets, out, *ARGS)))
    return out


def lora_model(assets, step_dir) -> torch.nn.Module:
    """The LoRA model in torchtune: the base checkpoint's weights and a step checkpoint's adapters."""
    model = lora_tiny_sheared_llama(vocab_size=assets["vocab_size"], **LORA)
    adapters = load_weights(step_dir)
    assert adapters and all(".lora_" in name for name in adapters)  # only what trains is in a step checkpoint
    model.load_state_dict({**load_tune_state_dict(assets["model"]), **adapters}, strict=True)
    for m in model.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
    return model.eval()


def test_outputs_give_the_lora_models_logits_merged_and_through_peft(assets, lora_run, monkeypatch):
    tokens = torch.randint(1, assets["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = lora_model(assets, lora_run / "checkpoints" / f"step_{STEPS:06d}")(tokens)
        merged = load_reference(lora_run / "checkpoint_final", torch.device("cpu"), torch.float32)(tokens)
        transformers_merged = AutoModelForCausalLM.from_pretrained(lora_run / "checkpoint_final").eval()(tokens).logits
        base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
        untuned = base(tokens).logits
        # peft refuses to load at all beside torchao < 0.16, which torchtune 0.6.1 needs; LoRA uses none of it.
        monkeypatch.setattr("peft.tuners.lora.torchao.is_torchao_available", lambda: False)
        from peft import PeftModel

        through_peft = PeftModel.from_pretrained(base, lora_run / "adapter_final").eval()(tokens).logits
    assert (untuned - expected).abs().max() > 1e-3  # the adapters changed the model
    for got in (merged, transformers_merged, through_peft):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    meta = json.loads((lora_run / "checkpoint_final" / METADATA_FILE).read_text())
    assert meta["lora"] == dict(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=sorted(LORA["lora_attn_modules"]))
    adapter_config = json.loads((lora_run / "adapter_final" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert adapter_config["base_model_name_or_path"] == str(assets["model"].resolve())


def test_validation_and_the_best_checkpoint_work_as_for_full_fine_tuning(lora_run):
    val = logged(lora_run / "logs", "val_loss")
    assert [s for s, _ in val] == [4, 8]
    best = json.loads((lora_run / "checkpoint_best" / METADATA_FILE).read_text())
    assert best["step"] == min(val, key=lambda sv: sv[1])[0] and (lora_run / "adapter_best").is_dir()


def test_the_adapter_lives_inside_its_merged_model_so_a_failed_write_never_splits_the_pair(
    assets, lora_run, tmp_path, monkeypatch
):
    for which in ("best", "final"):  # adapter_* links to the adapter inside checkpoint_*: one directory, one step
        assert (lora_run / f"adapter_{which}").readlink() == Path(f"checkpoint_{which}/adapter")
    run = Path(shutil.copytree(lora_run, tmp_path / "run", symlinks=True))
    (run / "adapter_final").unlink()  # as a run from before the layout left it: a folder of its own
    shutil.copytree(run / "checkpoint_final" / "adapter", run / "adapter_final")
    state = {
        "model": load_tune_state_dict(run / "checkpoint_final"),
        "adapter": load_weights(run / "checkpoints" / f"step_{STEPS:06d}"),
        "adapter_config": json.loads((run / "checkpoint_final" / METADATA_FILE).read_text())["lora"],
    }
    checkpointer = HFBinCheckpointer(str(assets["model"]), str(run))
    before = {p: p.read_bytes() for p in sorted((run / "adapter_best").iterdir())}
    best = (run / "checkpoint_best" / METADATA_FILE).read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the disk fills while the merged model is written, after the adapter was
        m.setattr(hf_checkpoint, "save_tensor_file", full_disk)
        with pytest.raises(OSError, match="No space left"):
            checkpointer.save_checkpoint(state, name="checkpoint_best", metadata={"step": 99})
    assert {p: p.read_bytes() for p in sorted((run / "adapter_best").iterdir())} == before
    assert (run / "checkpoint_best" / METADATA_FILE).read_bytes() == best
    checkpointer.save_checkpoint(state, name="checkpoint_final", metadata={"step": 99})
    assert (run / "adapter_final").readlink() == Path("checkpoint_final/adapter")  # the old folder replaced
    written = load_file(run / "adapter_final" / "adapter_model.safetensors")
    assert written.keys() == load_file(lora_run / "adapter_final" / "adapter_model.safetensors").keys()


def test_a_lora_step_checkpoint_is_refused_by_step_to_hf(lora_run, tmp_path):
    with pytest.raises(CheckpointError, match="holds only its adapters"):
        convert.step_to_hf_dir(lora_run / "checkpoints" / f"step_{STEPS:06d}", tmp_path / "hf")


def stock_lora(assets, lora_run, out, *extra):
    """torchtune's own lora_finetune_distributed on the LoRA run's model and data, with our checkpointer under
    torchtune's keys."""
    ours = OmegaConf.merge(
        OmegaConf.load(PROJECT_ROOT / TINY_CONFIG), OmegaConf.from_dotlist(overrides(assets, lora_run, *ARGS))
    )
    cfg = stock_config(OmegaConf.create(OmegaConf.to_container(ours, resolve=True)), str(out))
    cfg.checkpointer._component_ = "ref_tuning.hf_checkpoint.HFBinCheckpointer"
    OmegaConf.save(OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(extra))), out.parent / "stock.yaml")
    env = {RECIPE_ENV: "lora_finetune_distributed"}
    ok(tune([], recipe="benchmarks/stock_recipe.py", config=str(out.parent / "stock.yaml"), env=env))


@pytest.fixture(scope="module")
def stock_run(assets, lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("stock_lora") / "run"
    stock_lora(assets, lora_run, out)
    return out


def test_per_step_losses_equal_torchtunes_lora_finetune_distributed_which_takes_our_checkpointer(lora_run, stock_run):
    ours_losses, stock_losses = logged(lora_run / "logs", "loss"), logged(stock_run / "logs", "loss")
    assert len(ours_losses) == len(stock_losses) == STEPS
    for (s1, a), (s2, b) in zip(ours_losses, stock_losses):
        assert s1 == s2 and abs(a - b) <= 1e-5, (s1, a, b)
    # Its last epoch: the merged model, as ours, and beside it the adapter in the PEFT layout.
    theirs, mine = load_hf_state_dict(stock_run / "epoch_1"), load_hf_state_dict(lora_run / "checkpoint_final")
    assert theirs.keys() == mine.keys() and all(torch.allclose(theirs[k], mine[k], atol=1e-5) for k in mine)
    adapter = load_file(stock_run / "adapter_epoch_1" / "adapter_model.safetensors")
    assert adapter.keys() == load_file(lora_run / "adapter_final" / "adapter_model.safetensors").keys()


@pytest.mark.slow
def test_torchtunes_lora_recipe_resumes_exactly_with_our_checkpointer(assets, lora_run, stock_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("epoch_0", "adapter_epoch_0", "recipe_state"):  # what its first epoch left
        shutil.copytree(stock_run / name, out / name)
    stock_lora(assets, lora_run, out, "resume_from_checkpoint=true")
    assert logged(out / "logs", "loss") == logged(stock_run / "logs", "loss")[STEPS // 2 :]
    a, b = load_hf_state_dict(stock_run / "epoch_1"), load_hf_state_dict(out / "epoch_1")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_outputs(a, b) -> None:
    """checkpoint_final and adapter_final of runs `a` and `b` are bit-identical."""
    outputs = {
        "checkpoint_final": load_hf_state_dict,
        "adapter_final": lambda d: load_file(d / "adapter_model.safetensors"),
    }
    for name, read in outputs.items():
        x, y = read(a / name), read(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.mark.slow  # the same with one process, stopped by SIGTERM, is in the default suite (below)
def test_resume_after_sigkill_is_bit_identical(assets, lora_run, tmp_path):
    out = tmp_path / "run"
    # The whole run dies the moment step 6's checkpoint is begun: step 4's, adapters only, is the newest.
    begun = lambda: any((out / "checkpoints").glob(".step_000006.tmp-*"))  # noqa: E731
    killed = tune(overrides(assets, out, *ARGS), watch=when(begun, send(signal.SIGKILL)))
    assert killed.returncode != 0 and not (out / "checkpoint_final").exists()
    ok(tune(overrides(assets, out, *ARGS, "resume_from_checkpoint=true")))
    assert_same_outputs(out, lora_run)
    expected = dict(logged(lora_run / "logs", "loss"))
    resumed = [(s, v) for s, v in logged(out / "logs", "loss") if s > 4]
    assert [s for s, _ in resumed][-(STEPS - 4) :] == list(range(5, STEPS + 1))
    assert all(v == expected[s] for s, v in resumed), (resumed, expected)


def test_sigterm_stops_with_an_adapter_checkpoint_and_the_resume_finishes(assets, tmp_path):
    out = tmp_path / "run"
    preempt_this_process_after(out / "logs", step=3)
    args = [*overrides(assets, out, *ARGS, "save_every_n_steps=null", "dataset_val=null")]
    code, text = run_in_process("train", args)
    assert code == 0 and "SIGTERM: stopped after step" in text and not (out / "checkpoint_final").exists(), text[-2000:]
    (step,) = (out / "checkpoints").glob("step_*")
    assert all(".lora_" in name for name in load_weights(step))  # the adapters, not the model
    code, text = run_in_process("train", [*args, "resume_from_checkpoint=true"])
    assert code == 0 and (out / "checkpoint_final").is_dir() and (out / "adapter_final").is_dir(), text[-2000:]
    assert [s for s, _ in logged(out / "logs", "loss")][-1] == 2 * STEPS  # one process: twice the steps of two
    # Bit-identical to the same run uninterrupted: outputs and the losses after the stop.
    whole = tmp_path / "whole"
    code, text = run_in_process("train", overrides(assets, whole, *ARGS, "save_every_n_steps=null", "dataset_val=null"))
    assert code == 0, text[-2000:]
    assert_same_outputs(out, whole)
    expected = dict(logged(whole / "logs", "loss"))
    assert all(v == expected[s] for s, v in logged(out / "logs", "loss"))
