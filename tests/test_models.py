"""The 2.7B builder against the HF reference architecture, built on the meta device (no memory)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ref_tuning.hf_checkpoint import hf_to_tune, tune_to_hf
from ref_tuning.models import SHEARED_LLAMA_2_7B, hf_llama_config, sheared_llama_2_7b, sheared_llama_tokenizer


def _meta_models():
    config = hf_llama_config(**SHEARED_LLAMA_2_7B)
    with torch.device("meta"):
        ours = sheared_llama_2_7b()
        theirs = LlamaForCausalLM(LlamaConfig(**config))
    return config, ours, theirs


def test_sheared_llama_2_7b_parameter_count():
    _, ours, theirs = _meta_models()
    assert sum(p.numel() for p in ours.parameters()) == 2_701_560_320
    assert sum(p.numel() for p in theirs.parameters()) == 2_701_560_320


def test_state_dict_maps_one_to_one_onto_hf_names():
    config, ours, theirs = _meta_models()
    ours_sd = ours.state_dict()
    hf_sd = theirs.state_dict()
    as_hf = tune_to_hf(ours_sd, config)
    assert len(as_hf) == len(ours_sd)  # no two torchtune keys map to one HF name
    assert {k: tuple(v.shape) for k, v in as_hf.items()} == {k: tuple(v.shape) for k, v in hf_sd.items()}
    as_tune = hf_to_tune(hf_sd, config)
    assert {k: tuple(v.shape) for k, v in as_tune.items()} == {k: tuple(v.shape) for k, v in ours_sd.items()}


def test_a_tokenizer_path_that_is_no_sentencepiece_model_is_a_clear_error(tmp_path):
    (tmp_path / "empty.model").touch()
    (tmp_path / "text.model").write_text("not a model")
    for path, found in (
        (tmp_path, "found a directory"),
        (tmp_path / "empty.model", "found an empty file"),
        (tmp_path / "missing.model", "found nothing"),
        (tmp_path / "text.model", "SentencePiece cannot read it"),
    ):
        with pytest.raises(ValueError, match=f"tokenizer.path {path}: expected a SentencePiece model.*{found}"):
            sheared_llama_tokenizer(str(path))
