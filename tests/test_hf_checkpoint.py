"""HFBinCheckpointer against transformers: same logits, exact round trips, loadable output."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ref_tuning.hf_checkpoint import (
    CheckpointError,
    HFBinCheckpointer,
    hf_to_tune,
    load_hf_state_dict,
    parse_size,
    save_hf_checkpoint,
)
from ref_tuning.models import hf_llama_config, tiny_sheared_llama

TINY = dict(
    vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=64, intermediate_dim=176, max_seq_len=128
)


@pytest.fixture()
def hf_model_dir(tmp_path):
    """A randomly initialized `transformers` Llama written as two `.bin` shards, with side files."""
    torch.manual_seed(0)
    config = hf_llama_config(**TINY)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    hf_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    total = sum(t.numel() * t.element_size() for t in hf_sd.values())
    out = save_hf_checkpoint(hf_sd, tmp_path / "raw", config, max_shard_size=total // 2)
    (out / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')
    (out / "tokenizer.model").write_bytes(b"not a real tokenizer, only copied")
    return out, model


def _logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def test_torchtune_model_matches_transformers_logits(hf_model_dir, tmp_path):
    path, hf_model = hf_model_dir
    state = HFBinCheckpointer(str(path), str(tmp_path / "out")).load_checkpoint()
    ours = tiny_sheared_llama(**TINY).eval()
    ours.load_state_dict(state["model"], strict=True)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(ours, tokens), _logits(hf_model, tokens), atol=1e-5, rtol=1e-5)


def test_round_trip_is_bit_identical(hf_model_dir, tmp_path):
    path, _ = hf_model_dir
    checkpointer = HFBinCheckpointer(str(path), str(tmp_path / "out"))
    out = checkpointer.save_checkpoint(checkpointer.load_checkpoint(), name="again")
    original, again = load_hf_state_dict(path), load_hf_state_dict(out)
    assert original.keys() == again.keys()
    for name in original:
        assert again[name].dtype == original[name].dtype
        assert torch.equal(again[name], original[name]), name


def test_saved_directory_is_a_complete_hf_model(hf_model_dir, tmp_path):
    path, hf_model = hf_model_dir
    checkpointer = HFBinCheckpointer(str(path), str(tmp_path / "out"), max_shard_size="100KB")
    state = checkpointer.load_checkpoint()
    bf16 = {k: v.to(torch.bfloat16) for k, v in state["model"].items()}
    out = checkpointer.save_checkpoint({"model": bf16})

    assert out == tmp_path / "out" / "checkpoint_final"
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"  # the dtype written, not the source's float32
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all(re.fullmatch(rf"pytorch_model-\d{{5}}-of-{len(files):05d}\.bin", f) for f in files)
    written = load_hf_state_dict(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    assert all((out / f).stat().st_size < 100_000 + 2_000 or len(index["weight_map"]) == 1 for f in files)
    assert (out / "tokenizer.model").read_bytes() == (path / "tokenizer.model").read_bytes()
    assert (out / "generation_config.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_saved_fp32_directory_gives_the_original_logits(hf_model_dir, tmp_path):
    path, hf_model = hf_model_dir
    checkpointer = HFBinCheckpointer(str(path), str(tmp_path / "out"))
    out = checkpointer.save_checkpoint(checkpointer.load_checkpoint())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.float32
    tokens = torch.randint(0, TINY["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(reloaded, tokens), _logits(hf_model, tokens), atol=1e-6, rtol=0)


def test_missing_shard_is_named(hf_model_dir, tmp_path):
    path, _ = hf_model_dir
    last = sorted(path.glob("pytorch_model-*.bin"))[-1]
    last.unlink()
    with pytest.raises(CheckpointError, match=rf"{last.name}: listed in .* but missing"):
        HFBinCheckpointer(str(path), str(tmp_path / "out")).load_checkpoint()


def test_heads_that_do_not_divide_hidden_size_are_refused(hf_model_dir, tmp_path):
    path, _ = hf_model_dir
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, num_attention_heads=5)))
    with pytest.raises(CheckpointError, match="config.json: num_attention_heads=5 does not divide hidden_size=64"):
        HFBinCheckpointer(str(path), str(tmp_path / "out"))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five gigs")


def test_model_key_is_torchtunes():
    from torchtune.training import MODEL_KEY

    from ref_tuning import hf_checkpoint

    assert hf_checkpoint.MODEL_KEY == MODEL_KEY


def test_only_rank_zero_reads_the_weights(hf_model_dir, tmp_path, monkeypatch):
    """The recipe's model state: the weights on rank 0; on the other ranks, whose data `distribute_tensor`
    ignores, placeholders of the right shapes and dtypes that hold no memory."""
    path, hf_model = hf_model_dir
    checkpointer = HFBinCheckpointer(str(path), str(tmp_path / "out"))
    weights = checkpointer.load_checkpoint(rank_zero_only=True)["model"]  # not distributed: rank 0
    expected = hf_to_tune(hf_model.state_dict(), checkpointer.config)
    assert weights.keys() == tiny_sheared_llama(**TINY).state_dict().keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert all(torch.equal(t, weights[k]) for k, t in checkpointer.load_checkpoint()["model"].items())
    placeholders = checkpointer.load_checkpoint(rank_zero_only=True)["model"]
    assert {k: (t.shape, t.dtype) for k, t in placeholders.items()} == {
        k: (t.shape, t.dtype) for k, t in weights.items()
    }
    assert all(t.untyped_storage().nbytes() == t.element_size() for t in placeholders.values())


def test_metadata_is_written_inside_the_directory(hf_model_dir, tmp_path):
    path, _ = hf_model_dir
    checkpointer = HFBinCheckpointer(str(path), str(tmp_path / "out"))
    out = checkpointer.save_checkpoint(checkpointer.load_checkpoint(), name="best", metadata={"step": 7, "x": [1, 2]})
    assert json.loads((out / "ref_tuning.json").read_text()) == {"step": 7, "x": [1, 2]}
    assert sorted(p.name for p in tmp_path.joinpath("out").iterdir()) == ["best"]  # nothing beside it


def test_weight_files_are_torch_save_files_written_through(hf_model_dir, tmp_path):
    """A shard is byte for byte what `torch.save` writes (CRC-32s off), though written through a file that
    sends its pages to disk as it goes (records named `archive/`, as torch names them in a file object)."""
    src, _ = hf_model_dir
    state = load_hf_state_dict(src)
    out = save_hf_checkpoint(state, tmp_path / "out", hf_llama_config(**TINY))
    torch.serialization.set_crc32_options(False)
    try:
        with open(tmp_path / "plain.bin", "wb") as f:
            torch.save({k: v.clone() for k, v in state.items()}, f)
    finally:
        torch.serialization.set_crc32_options(True)
    assert (out / "pytorch_model-00001-of-00001.bin").read_bytes() == (tmp_path / "plain.bin").read_bytes()
