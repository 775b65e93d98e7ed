"""Speed knobs and throughput metrics, one process on CPU: `compile=true` gives the eager per-step
losses; tokens/s over trained and over all non-padding tokens, MFU from the model's FLOPs."""

import torch

from recipes.ref_finetune import RefFinetuneRecipe
from ref_tuning.models import sheared_llama_2_7b, tiny_sheared_llama
from conftest import logged, overrides, run_in_process

QUICK = ["dataset_val=null", "save_every_n_steps=null", "epochs=1", "max_steps_per_epoch=3"]


def test_flops_per_token_of_the_2_7b_model():
    with torch.device("meta"):
        model = sheared_llama_2_7b()
    flops = RefFinetuneRecipe._flops_constants(model)
    assert flops["per_token"] == 6 * (2_701_560_320 - 32000 * 2560)  # every weight but the embedding lookup
    assert flops["per_attended"] == 12 * 32 * 2560


def test_compiled_and_eager_losses_agree_and_the_rates_are_logged(assets, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    code, text = run_in_process("train", overrides(assets, eager, *QUICK, "peak_tflops=0.001"))
    assert code == 0, text[-3000:]
    code, compiled_text = run_in_process("train", overrides(assets, compiled, *QUICK, "compile=true"))
    assert code == 0, compiled_text[-3000:]
    a, b = logged(eager / "logs", "loss"), logged(compiled / "logs", "loss")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    assert all(abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(a, b)), (a, b)

    trained = dict(logged(eager / "logs", "tokens_per_second_per_gpu"))
    everything = dict(logged(eager / "logs", "all_tokens_per_second_per_gpu"))
    mfu = dict(logged(eager / "logs", "mfu"))
    with torch.device("meta"):
        flops = RefFinetuneRecipe._flops_constants(tiny_sheared_llama(vocab_size=assets["vocab_size"]))
    for step in (1, 2, 3):
        assert 0 < trained[step] < everything[step]  # prompts count as computed, not as trained
        # FLOPs per non-padding token: the weights' share plus attention to 1 .. 2048 earlier positions.
        per_token = mfu[step] * 0.001e12 / everything[step]
        assert (
            flops["per_token"] + flops["per_attended"] < per_token < flops["per_token"] + 2048 * flops["per_attended"]
        )
    assert "non-padding tokens/s, MFU" in text
