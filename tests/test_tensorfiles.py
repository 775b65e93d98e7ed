"""Our streaming .bin and safetensors files against torch.load, zipfile and safetensors."""

import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from ref_tuning.tensorfiles import BinWriter, TensorFileError, open_writer, read_refs

TENSORS = {
    "w": torch.randn(33, 17),
    "ids": torch.arange(10, dtype=torch.int64),
    "half": torch.randn(5).to(torch.bfloat16),
    "view": torch.randn(8, 8)[2:4],  # a view into a larger storage: only its bytes are written
    "empty": torch.empty(0, 4),
}


def _write(path, tensors):
    with open_writer(path, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}) as w:
        for name, t in tensors.items():
            w.write(name, t)


@pytest.mark.parametrize("mmap", [False, True])
def test_bin_is_what_torch_save_writes(tmp_path, mmap):
    _write(tmp_path / "x.bin", TENSORS)
    assert zipfile.ZipFile(tmp_path / "x.bin").testzip() is None  # every CRC-32 is right
    loaded = torch.load(tmp_path / "x.bin", weights_only=True, mmap=mmap)
    assert loaded.keys() == TENSORS.keys()
    for name, t in TENSORS.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)


def test_reading_torch_save_and_copying_record_by_record(tmp_path):
    torch.save(TENSORS, tmp_path / "src.bin")
    refs = read_refs(tmp_path / "src.bin")
    assert {k: torch.equal(r.load(), TENSORS[k]) for k, r in refs.items()} == dict.fromkeys(TENSORS, True)
    whole = {k: r for k, r in refs.items() if r.is_whole_storage}
    assert "view" not in whole and "w" in whole
    with BinWriter(tmp_path / "copy.bin", {k: (r.dtype, tuple(r.shape)) for k, r in whole.items()}) as w:
        for name, ref in whole.items():
            w.copy(name, ref)
    assert zipfile.ZipFile(tmp_path / "copy.bin").testzip() is None
    loaded = torch.load(tmp_path / "copy.bin", weights_only=True, mmap=True)
    assert all(torch.equal(loaded[k], TENSORS[k]) for k in whole)


def test_safetensors_both_ways(tmp_path):
    _write(tmp_path / "ours.safetensors", TENSORS)
    loaded = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(loaded[k], t) for k, t in TENSORS.items())
    save_file({k: t.contiguous() for k, t in TENSORS.items()}, tmp_path / "theirs.safetensors")
    refs = read_refs(tmp_path / "theirs.safetensors")
    assert all(torch.equal(refs[k].load(), t) for k, t in TENSORS.items())


def test_writer_refuses_tensors_out_of_order(tmp_path):
    with pytest.raises(ValueError, match="expected tensor 'w'"):
        with open_writer(tmp_path / "x.bin", {"w": (torch.float32, (33, 17))}) as w:
            w.write("ids", TENSORS["ids"])


def test_not_a_weights_file(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"hello")
    with pytest.raises(TensorFileError, match="x.bin: not a readable torch.save archive"):
        read_refs(tmp_path / "x.bin")
