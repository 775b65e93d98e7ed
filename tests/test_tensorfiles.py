"""Our streaming .bin and safetensors files against torch.load, zipfile and safetensors; the direct-I/O
output file against the bytes it was given."""

import errno
import fcntl
import os
import random
import zipfile
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from ref_tuning.tensorfiles import BinWriter, OutputFile, TensorFileError, open_writer, read_refs

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


# ---------------------------------------------------------------------------------------------
# OutputFile: direct I/O through aligned buffers, with the page cache as the fallback


def _direct_io_supported(folder) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    return True


def _write_pieces(out: OutputFile, src, rng: random.Random, n: int) -> bytes:
    """Appends `n` random pieces, from memory or from `src` (a file), of sizes around the buffer's
    (empty, one byte, exactly a buffer, several buffers); returns the bytes the file must hold."""
    data = src.read_bytes()
    expected = bytearray()
    sizes = [0, 1, OutputFile.BUFFER_SIZE, 2 * OutputFile.BUFFER_SIZE + 7, OutputFile.BUFFER_SIZE - 1]
    fd = os.open(src, os.O_RDONLY)
    try:
        for _ in range(n):
            size = rng.choice(sizes + [rng.randrange(1, 3 * OutputFile.BUFFER_SIZE)])
            offset = rng.randrange(0, len(data) - size)
            assert out.tell() == len(expected)
            if rng.random() < 0.5:
                out.write(data[offset : offset + size])
            else:
                assert out.write_from(fd, offset, size, src) == zlib.crc32(data[offset : offset + size])
            expected += data[offset : offset + size]
    finally:
        os.close(fd)
    return bytes(expected)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_output_file_writes_exactly_the_bytes_given(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(OutputFile, "BUFFER_SIZE", 3 * OutputFile.BLOCK)  # many buffer boundaries
    src = tmp_path / "src"
    src.write_bytes(os.urandom(200_000))
    out = OutputFile(tmp_path / "out", direct)
    assert out.direct == (direct and _direct_io_supported(tmp_path))
    expected = _write_pieces(out, src, random.Random(0), 60)
    assert len(expected) % OutputFile.BLOCK  # the last block is partial: padded, then cut
    out.close()
    assert (tmp_path / "out").read_bytes() == expected


def test_output_file_falls_back_where_direct_io_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(OutputFile, "BUFFER_SIZE", 2 * OutputFile.BLOCK)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(50_000))
    real_open, real_pwrite = os.open, os.pwrite

    def open_without_direct(path, flags, *args):  # as tmpfs answers
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_without_direct)
    out = OutputFile(tmp_path / "a", direct=True)
    assert not out.direct
    expected = _write_pieces(out, src, random.Random(1), 20)
    out.close()
    assert (tmp_path / "a").read_bytes() == expected

    if not _direct_io_supported(tmp_path):
        return
    monkeypatch.setattr(os, "open", real_open)

    def pwrite_without_direct(fd, data, offset):  # as some FUSE file systems answer: open works, writes fail
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite_without_direct)
    out = OutputFile(tmp_path / "b", direct=True)
    assert out.direct
    expected = _write_pieces(out, src, random.Random(2), 20)
    out.close()
    assert (tmp_path / "b").read_bytes() == expected


def test_output_file_reports_a_failed_write_with_the_file_name(tmp_path, monkeypatch):
    monkeypatch.setattr(OutputFile, "BUFFER_SIZE", OutputFile.BLOCK)

    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", disk_full)
    out = OutputFile(tmp_path / "x.bin")
    with pytest.raises(OSError, match=r"writing failed: No space left on device: '.*x\.bin'") as raised:
        for _ in range(10):  # the writer thread's error surfaces at a later buffer at the latest
            out.write(b"\0" * OutputFile.BLOCK)
        out.close()
    assert raised.value.errno == errno.ENOSPC
    out.abort()  # closing once more is harmless
