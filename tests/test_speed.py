"""Speed: the production config as shipped (packed, compiled) gives the eager per-step losses, on CPU with the
tiny model; an optimizer step holds the tokens it did unpacked; steps between log steps never wait for the
device; tokens/s over trained and over all non-padding tokens, MFU from the model's FLOPs."""

import sys
from collections import Counter

import numpy as np
import torch
from omegaconf import OmegaConf

from benchmarks.synthetic import make_plan
from recipes.ref_finetune import RefFinetuneRecipe
from ref_tuning.models import sheared_llama_2_7b, tiny_sheared_llama
from ref_tuning.packing import fill_ratio, pack_best_fit
from conftest import PROJECT_ROOT, logged, overrides, run_in_process

PRODUCTION = "configs/ref_tuning.yaml"
QUICK = ["dataset_val=null", "save_every_n_steps=null", "epochs=1", "max_steps_per_epoch=3"]


def production_on_tiny(assets, output_dir, *extra: str) -> list:
    """configs/ref_tuning.yaml as shipped (packed, compiled, activation checkpointing and batch as set), with the
    model and data swapped for the demo's tiny ones, on CPU in fp32; every step logged, two steps (the 144 demo
    samples fill 40 rows, 20 a step)."""
    swapped = ["model._component_=ref_tuning.models.tiny_sheared_llama", f"model.vocab_size={assets['vocab_size']}"]
    swapped += [f"tokenizer.path={assets['tokenizer']}", f"checkpointer.checkpoint_dir={assets['model']}"]
    swapped += [f"dataset.data_dir={assets['data']}", "dataset.n_samples=144", "dataset_val=null"]
    swapped += ["device=cpu", "precision=fp32", "output_dtype=fp32", "optimizer.fused=false"]
    return swapped + [f"output_dir={output_dir}", "epochs=1", "max_steps_per_epoch=2", "log_every_n_steps=1", *extra]


def test_flops_per_token_of_the_2_7b_model():
    with torch.device("meta"):
        model = sheared_llama_2_7b()
    flops = RefFinetuneRecipe._flops_constants(model)
    assert flops["per_token"] == 6 * (2_701_560_320 - 32000 * 2560)  # every weight but the embedding lookup
    assert flops["per_attended"] == 12 * 32 * 2560


def test_the_production_config_trains_packed_and_compiled_with_the_eager_losses(assets, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    args = production_on_tiny(assets, eager, "compile=false", "peak_tflops=0.001")
    code, text = run_in_process("train", args, PRODUCTION)
    assert code == 0, text[-3000:]
    code, compiled_text = run_in_process("train", production_on_tiny(assets, compiled), PRODUCTION)
    assert code == 0, compiled_text[-3000:]
    assert "packed into 40 rows of 2048 tokens" in compiled_text and "Compiling model layers" in compiled_text
    assert "an optimizer step: 20 rows, about 72 samples (4 x 5 x 1 processes); 2 steps an epoch" in compiled_text
    a, b = logged(eager / "logs", "loss"), logged(compiled / "logs", "loss")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2]
    assert all(abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(a, b)), (a, b)

    trained = dict(logged(eager / "logs", "tokens_per_second_per_gpu"))
    everything = dict(logged(eager / "logs", "all_tokens_per_second_per_gpu"))
    mfu = dict(logged(eager / "logs", "mfu"))
    with torch.device("meta"):
        flops = RefFinetuneRecipe._flops_constants(tiny_sheared_llama(vocab_size=assets["vocab_size"]))
    for step in (1, 2):
        assert 0 < trained[step] < everything[step]  # prompts count as computed, not as trained
        # FLOPs per non-padding token: the weights' share plus attention to 1 .. 2048 earlier positions.
        per_token = mfu[step] * 0.001e12 / everything[step]
        assert (
            flops["per_token"] + flops["per_attended"] < per_token < flops["per_token"] + 2048 * flops["per_attended"]
        )
    assert "non-padding tokens/s, MFU" in text


def test_an_optimizer_step_of_the_shipped_config_holds_the_tokens_it_did_unpacked():
    """The config took 128 samples a step unpacked (4 x 8 x 4 GPUs) and a 100-step warmup; packed, `batch_size`
    counts rows of 2048 tokens. On lengths shaped like the real split's, a step must still see about the same
    tokens, and the warmup the same share of the run."""
    cfg = OmegaConf.load(PROJECT_ROOT / PRODUCTION)
    assert cfg.dataset.packed and cfg.compile and cfg.tokenizer.max_seq_len == 2048
    plan = make_plan(400_000)
    lengths = plan.templated()[plan.is_correct.astype(bool)]
    kept = np.random.default_rng(0).permutation(lengths[lengths <= 2048])[:30_000].tolist()
    packs = pack_best_fit(kept, 2048)
    rows = cfg.batch_size * cfg.gradient_accumulation_steps * 4  # the 4 GPUs the config is set for
    packed_tokens = rows * 2048 * fill_ratio(kept, packs, 2048)
    unpacked_tokens = 128 * np.mean(kept)
    assert 1.0 <= packed_tokens / unpacked_tokens <= 1.1, (packed_tokens, unpacked_tokens)
    samples_per_step = rows * len(kept) / len(packs)
    warmup_share, unpacked_share = cfg.lr_scheduler.num_warmup_steps * samples_per_step, 100 * 128  # per sample
    assert abs(warmup_share / unpacked_share - 1) < 0.03, (warmup_share, unpacked_share)


def test_steps_between_log_steps_never_wait_for_the_device(assets, tmp_path, monkeypatch):
    """The recipe reads a tensor's value (a wait for the GPU) once per log step, in `_read_steps`, and before a
    checkpoint; steps in between only queue work. Counted on CPU by wrapping every way a tensor's value is read."""
    reads = Counter()
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):

        def counted(self, *args, _read=getattr(torch.Tensor, name), _name=name):
            caller = sys._getframe(1).f_code
            if caller.co_filename.endswith("ref_finetune.py"):
                reads[caller.co_name, _name] += 1
            return _read(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    args = overrides(assets, tmp_path / "run", "dataset_val=null", "save_every_n_steps=null", "log_every_n_steps=4")
    code, text = run_in_process("train", args)
    assert code == 0, text[-3000:]
    assert sorted(s for s, _ in logged(tmp_path / "run" / "logs", "loss")) == [4, 8, 12, 16]
    # 16 steps: four reads. Host tensors: the stop-signal flag (agreed over gloo), the lines trained on (in
    # checkpoint_final's metadata). The check that the weights are finite, before checkpoint_final.
    assert reads == {
        ("_read_steps", "tolist"): 4,
        ("_stop_signal_of_any_rank", "__int__"): 16,
        ("_check_finite_weights", "item"): 1,
        ("_trained_on", "tolist"): 1,
    }, reads
