"""Training precision, one process on CPU: at the production learning rate (2e-5), bf16_mixed
(fp32 master weights and AdamW state, bf16 matmuls) moves the weights as fp32 does, and pure bf16
(bf16 weights and AdamW state) does not: most of its updates round away. `python -m benchmarks
precision` measures the same at a larger scale, with the validation loss."""

import json
from typing import Dict, Tuple

import pytest
import torch

from conftest import run_in_process
from ref_tuning.hf_checkpoint import METADATA_FILE, load_hf_state_dict

STEPS = 8
# The production schedule's shape at a tiny scale: AdamW lr 2e-5 (betas 0.9/0.95, weight decay 0.01 and
# clipping at 1.0 come from configs/tiny_cpu.yaml), cosine after one warmup step; 1 row per process.
RUN = [
    "optimizer.lr=2e-5",
    "lr_scheduler.num_warmup_steps=1",
    "epochs=1",
    f"max_steps_per_epoch={STEPS}",
    "dataset.n_samples=64",
    "batch_size=1",
    "dataset_val=null",
    "save_every_n_steps=null",
    "seed=0",
    "output_dtype=fp32",
]
# bf16_mixed's total update against fp32's: what "the same training" means here.
MIN_COSINE, NORM_RATIO = 0.8, (0.7, 1.4)
TRAINING_DTYPE = {"fp32": torch.float32, "bf16_mixed": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def updates(assets, tmp_path_factory) -> Dict[str, torch.Tensor]:
    """Each mode's total update: checkpoint_final minus the base weights as the run held them (cast to
    bf16 under pure bf16), every weight tensor flattened into one vector."""
    root = tmp_path_factory.mktemp("precision")
    base = load_hf_state_dict(assets["model"])
    found = {}
    for mode, dtype in TRAINING_DTYPE.items():
        out = root / mode
        code, text = run_in_process(
            "train",
            [
                f"tokenizer.path={assets['tokenizer']}",
                f"output_dir={out}",
                f"checkpointer.checkpoint_dir={assets['model']}",
                f"precision={mode}",
                f"dataset.data_dir={assets['data']}",
                *RUN,
            ],
        )
        assert code == 0, text[-3000:]
        assert json.loads((out / "checkpoint_final" / METADATA_FILE).read_text())["step"] == STEPS
        final = load_hf_state_dict(out / "checkpoint_final")
        assert final.keys() == base.keys() and all(t.dtype == torch.float32 for t in final.values())
        found[mode] = torch.cat([(final[n].double() - base[n].to(dtype).double()).flatten() for n in sorted(base)])
    return found


def against_fp32(updates: Dict[str, torch.Tensor], mode: str) -> Tuple[float, float]:
    """Cosine and norm ratio of `mode`'s total update against fp32's."""
    u, ref = updates[mode], updates["fp32"]
    return float(torch.nn.functional.cosine_similarity(u, ref, dim=0)), float(u.norm() / ref.norm())


def matches_fp32(cosine: float, ratio: float) -> bool:
    return cosine >= MIN_COSINE and NORM_RATIO[0] <= ratio <= NORM_RATIO[1]


def test_fp32_training_moves_the_weights(updates):
    assert float(updates["fp32"].norm()) > 0
    assert int((updates["fp32"] != 0).sum()) > 0.9 * updates["fp32"].numel()  # nearly every weight moved


def test_bf16_mixed_updates_the_weights_as_fp32_does(updates):
    cosine, ratio = against_fp32(updates, "bf16_mixed")
    assert matches_fp32(cosine, ratio), f"bf16_mixed vs fp32: update cosine {cosine:.3f}, norm ratio {ratio:.3f}"


def test_pure_bf16_fails_the_same_check(updates):
    # The check can fail: pure bf16 rounds away most updates of size lr (the issue measured cosine 0.28
    # and norm 0.26x on the real model).
    cosine, ratio = against_fp32(updates, "bf16")
    assert not matches_fp32(cosine, ratio), f"pure bf16 vs fp32: update cosine {cosine:.3f}, norm ratio {ratio:.3f}"
