"""Tensor files read and written one tensor at a time: PyTorch `.bin` (the zip archives `torch.save`
writes) and safetensors.

`torch.load` and `torch.save` hold a whole file's tensors at once; a 10 GB shard then needs 10 GB of
memory, or a memory map whose touched pages all count as resident. Here a file's pickle is read for
its tensors' names, dtypes, shapes and byte offsets (refusing any global that is not a tensor or a
storage, so no pickled code can run), and each tensor is then read with `pread` when asked for.
Writing goes the other way: the pickle first, from the names, dtypes and shapes alone, then each
tensor's bytes as its own zip record, through `OutputFile`'s aligned buffers (direct I/O where the
file system allows it); a tensor whose bytes do not change is read from its source file straight
into those buffers, its checksum checked on the way. The files are the ones `torch.save` writes:
`torch.load`, `transformers` and this module read them alike. Safetensors files are simpler (a JSON
header of offsets, then raw bytes) and get the same treatment.
"""

import collections
import errno
import fcntl
import io
import json
import mmap
import os
import pickle
import queue
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple, Union

import torch

PathLike = Union[str, Path]
_STORAGE_DTYPES = {cls.__name__: dtype for dtype, cls in ((d, getattr(torch, n)) for d, n in (
    (torch.float32, "FloatStorage"), (torch.float64, "DoubleStorage"), (torch.float16, "HalfStorage"),
    (torch.bfloat16, "BFloat16Storage"), (torch.int64, "LongStorage"), (torch.int32, "IntStorage"),
    (torch.int16, "ShortStorage"), (torch.int8, "CharStorage"), (torch.uint8, "ByteStorage"),
    (torch.bool, "BoolStorage"),
))}  # fmt: skip
_STORAGE_NAMES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header (30 bytes)
_MAX_READ = 1 << 30  # bytes per pread call; Linux caps one read at about 2 GiB


class TensorFileError(ValueError):
    """A tensor file that cannot be read as weights; the message names the file and what is wrong."""


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lies in a `.bin` file; `load()` reads it."""

    path: Path
    dtype: torch.dtype
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    storage_offset: int  # in elements
    data_offset: int  # in bytes, of the storage's first byte in the file
    storage_numel: int
    crc32: Optional[int] = None  # of the storage's bytes, where the file records one

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize

    @property
    def storage_nbytes(self) -> int:
        return self.storage_numel * self.dtype.itemsize

    @property
    def is_whole_storage(self) -> bool:
        """The tensor's bytes are exactly its storage's, in row-major order: a byte copy reproduces it."""
        contiguous = tuple(_numel(self.shape[i + 1 :]) for i in range(len(self.shape)))
        return self.storage_offset == 0 and _numel(self.shape) == self.storage_numel and self.stride == contiguous

    def load(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tensor, read into `out` (a flat uint8 scratch tensor of at least `storage_nbytes`,
        reused across calls: fresh memory costs a page fault per 4 KiB) or into new memory."""
        if out is not None and out.numel() >= self.storage_nbytes:
            storage = out[: self.storage_nbytes].view(self.dtype)
        else:
            storage = torch.empty(self.storage_numel, dtype=self.dtype)
        buffer = memoryview(storage.view(torch.uint8).numpy()).cast("B")
        with open(self.path, "rb", buffering=0) as f:
            done = 0
            while done < len(buffer):
                n = os.preadv(f.fileno(), [buffer[done : done + _MAX_READ]], self.data_offset + done)
                if n == 0:
                    raise TensorFileError(f"{self.path}: ends inside a tensor's data; the file is truncated")
                done += n
        if self.crc32 is not None and zlib.crc32(buffer) != self.crc32:
            raise TensorFileError(
                f"{self.path}: the data of a tensor does not match its checksum; the file is corrupt, "
                "copy it again from its source"
            )
        tensor = storage.as_strided(self.shape, self.stride, self.storage_offset)
        if tensor.numel() != self.storage_numel or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()  # a view of part of a storage: keep only its bytes
        return tensor


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _WeightsOnlyUnpickler(pickle.Unpickler):
    """Knows tensors, storages and ordered dicts; any other global is refused before it is looked up."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, backward_hooks, *_: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise TensorFileError(
            f"{self._path}: refused: its pickle asks for '{module}.{name}', which a weights file never "
            "needs (loading it could run code); only tensors and storages are read"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TensorFileError(f"{self._path}: unexpected persistent id {pid!r:.80} in its pickle")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise TensorFileError(f"{self._path}: storage {key} has no known dtype ({dtype!r:.80})")
        return _Storage(str(key), dtype, int(numel))


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return (storage, int(storage_offset), tuple(size), tuple(stride))


def _data_offsets(path: Path, zf: zipfile.ZipFile) -> Tuple[str, Dict[str, Tuple[int, int, Optional[int]]]]:
    """The archive's folder name and, for each storage key, the byte offset, size and CRC-32 of its data."""
    pickles = [i.filename for i in zf.infolist() if i.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TensorFileError(f"{path}: expected one '<archive>/data.pkl' record, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    offsets = {}
    with open(path, "rb") as f:
        for info in zf.infolist():
            if not info.filename.startswith(prefix + "data/"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise TensorFileError(f"{path}: record {info.filename} is compressed; torch.save never does that")
            f.seek(info.header_offset)
            header = f.read(_LOCAL_HEADER.size)
            signature, *_, name_len, extra_len = _LOCAL_HEADER.unpack(header.ljust(_LOCAL_HEADER.size, b"\0"))
            # The central directory must point at this record's own header, or we would read another's bytes.
            if signature != b"PK\x03\x04" or f.read(name_len) != info.orig_filename.encode("utf-8"):
                raise TensorFileError(f"{path}: record {info.filename} does not start where the zip index says")
            offsets[info.filename[len(prefix) + len("data/") :]] = (
                info.header_offset + _LOCAL_HEADER.size + name_len + extra_len,
                info.file_size,
                # 0 on data: written without checksums (torch.save can be told to skip them)
                None if info.CRC == 0 and info.file_size else info.CRC,
            )
    return prefix, offsets


def read_tensor_refs(path: PathLike) -> Dict[str, TensorRef]:
    """Names and locations of the tensors of a `torch.save`d dict, without reading their data."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            prefix, offsets = _data_offsets(path, zf)
            data = zf.read(prefix + "data.pkl")
    except TensorFileError:
        raise
    except Exception as e:  # zipfile raises many types on a damaged archive (BadZipFile, struct.error, ...)
        raise TensorFileError(
            f"{path}: not a readable torch.save archive ({e}); the file is truncated or corrupt, "
            "copy it again from its source"
        ) from e
    try:
        obj = _WeightsOnlyUnpickler(data, path).load()
    except TensorFileError:
        raise
    except Exception as e:
        raise TensorFileError(f"{path}: its pickle is corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, tuple) for k, v in obj.items()):
        raise TensorFileError(f"{path}: expected a dict of parameter name -> tensor")
    refs = {}
    for name, (storage, storage_offset, shape, stride) in obj.items():
        if storage.key not in offsets:
            raise TensorFileError(f"{path}: tensor '{name}' points to a storage record that is missing")
        data_offset, size, crc = offsets[storage.key]
        if size != storage.numel * storage.dtype.itemsize:
            raise TensorFileError(
                f"{path}: tensor '{name}' needs {storage.numel * storage.dtype.itemsize} bytes, "
                f"its record holds {size}; the file is corrupt"
            )
        refs[name] = TensorRef(path, storage.dtype, shape, stride, storage_offset, data_offset, storage.numel, crc)
    return refs


class _StorageRef:
    """Pickled as a persistent id, exactly as `torch.save` pickles a storage."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    def __init__(self, storage: _StorageRef, shape: Tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(_numel(self.shape[i + 1 :]) for i in range(len(self.shape)))
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict()))


class _StubPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, _STORAGE_NAMES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy where it is already contiguous."""
    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()).cast("B")


class OutputFile:
    """A file written front to back through a few page-aligned buffers: the caller fills one while a
    thread writes the full ones to disk, with O_DIRECT where the file system takes it.

    Why O_DIRECT: on the 2-core VMs this project is measured on (ext4 on virtio), buffered writes
    are bound by the kernel's page-cache work: `dd` wrote 0.43 GB/s buffered and 1.5 GB/s direct,
    and `cp` of a 9.95 GB shard took 12-18 s where this class takes under 4 s. Direct I/O wants
    block-aligned offsets, lengths and memory: the buffers are page-aligned mmaps whose size is a
    multiple of 4 KiB, only whole buffers are written, the last one padded, and the file is then cut
    to its length. Where the file system refuses O_DIRECT (tmpfs, some network file systems), the
    same code writes through the page cache.

    Args:
        path: the file to create (truncated if it exists).
        direct: try O_DIRECT first.
    """

    BUFFER_SIZE = 32 << 20
    BLOCK = 4096  # the largest logical block size of common disks
    BUFFERS = 3  # one being filled, one being written, one spare so the two sides rarely wait

    def __init__(self, path: PathLike, direct: bool = True):
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                    raise
        if self._fd < 0:
            self._fd = os.open(self.path, flags, 0o644)
        self._free: "queue.Queue[mmap.mmap]" = queue.Queue()
        for _ in range(self.BUFFERS):
            self._free.put(mmap.mmap(-1, self.BUFFER_SIZE))
        self._full: "queue.Queue[Optional[Tuple[mmap.mmap, int, int]]]" = queue.Queue()
        self._buffer = self._free.get()
        self._used = 0  # bytes of `_buffer` filled
        self._start = 0  # file offset of `_buffer`'s first byte
        self._error: Optional[BaseException] = None
        self._writer = threading.Thread(target=self._write_buffers, name=f"write {self.path.name}", daemon=True)
        self._writer.start()

    @property
    def direct(self) -> bool:
        """Whether writes bypass the page cache (False where the file system refused O_DIRECT)."""
        return self._fd >= 0 and bool(fcntl.fcntl(self._fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))

    def tell(self) -> int:
        return self._start + self._used

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = min(len(view), self.BUFFER_SIZE - self._used)
            self._buffer[self._used : self._used + n] = view[:n]
            self._used += n
            view = view[n:]
            if self._used == self.BUFFER_SIZE:
                self._hand_over()

    def write_from(self, fd: int, offset: int, size: int, source: PathLike, checksum: bool = True) -> int:
        """Append `size` bytes of the open file `fd` from `offset`, read straight into the buffers
        (one copy, from the page cache), and return their CRC-32 (0 without `checksum`)."""
        crc = 0
        while size:
            n = min(size, self.BUFFER_SIZE - self._used)
            region = memoryview(self._buffer)[self._used : self._used + n]
            got = os.preadv(fd, [region], offset)
            if got == 0:
                raise TensorFileError(f"{source}: ends inside a tensor's data; the file is truncated")
            if checksum:
                crc = zlib.crc32(region[:got], crc)  # releases the GIL: runs beside the writer thread
            region.release()
            self._used += got
            offset += got
            size -= got
            if self._used == self.BUFFER_SIZE:
                self._hand_over()
        return crc

    def close(self) -> None:
        """Write what is left and cut the file to its length; raises if any write failed."""
        size = self.tell()
        try:
            if self._used:
                self._hand_over(padded=-self._used % self.BLOCK)
            self._stop()
            if self._error is not None:
                raise self._error
            os.ftruncate(self._fd, size)  # drop the last block's padding
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop writing and close (again, harmlessly); whoever made the path removes it."""
        if self._fd >= 0:
            self._stop()
            os.close(self._fd)
            self._fd = -1

    def _hand_over(self, padded: int = 0) -> None:
        if self._error is not None:
            raise self._error
        self._full.put((self._buffer, self._used + padded, self._start))
        self._start += self._used
        self._buffer, self._used = self._free.get(), 0

    def _stop(self) -> None:
        if self._writer.is_alive():
            self._full.put(None)
            self._writer.join()

    def _write_buffers(self) -> None:
        while (item := self._full.get()) is not None:
            buffer, length, offset = item
            try:
                if self._error is None:
                    self._pwrite_all(memoryview(buffer)[:length], offset)
            except OSError as e:  # handed to the caller at its next buffer or at close, naming the file
                self._error = OSError(e.errno, f"writing failed: {e.strerror or e}", str(self.path))
            except BaseException as e:
                self._error = e
            finally:
                self._free.put(buffer)

    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self._fd, view[done:], offset + done)
            except OSError as e:
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                if e.errno != errno.EINVAL or not flags & getattr(os, "O_DIRECT", 0):
                    raise
                # Opened with O_DIRECT but refused on writing (some FUSE and network file systems).
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)


class _Sources:
    """Source files kept open while a writer copies from them: a file reopened for every tensor
    would restart the kernel's read-ahead each time."""

    def __init__(self):
        self._fds: Dict[Path, int] = {}

    def copy(self, ref: TensorRef, out: OutputFile, checksum: bool) -> int:
        """Append the bytes of `ref`'s storage to `out`; returns their CRC-32 (0 without `checksum`)."""
        if ref.path not in self._fds:
            self._fds[ref.path] = fd = os.open(ref.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return out.write_from(self._fds[ref.path], ref.data_offset, ref.storage_nbytes, ref.path, checksum)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _ZipRecords:
    """The zip container of `torch.save`: stored (uncompressed) records with zip64 sizes, their data
    aligned to 64 bytes so that `torch.load(mmap=True)` can map them. Written by hand rather than with
    `zipfile`, so that a record's CRC-32 can be given (carried over from the source file) instead of
    computed before writing, and so that the bytes go through `OutputFile`."""

    ALIGNMENT = 64
    _PADDING_FIELD = 0x4246  # an extra-field id no reader interprets ("FB", as torch's writer uses)
    _DOS_DATE = (0, 0x21)  # 1980-01-01 00:00, as torch.save stamps its records

    def __init__(self, file: OutputFile):
        self.file = file
        self._central = []  # (name, crc, size, offset)

    def header(self, name: str, crc: int, size: int) -> None:
        """Write a record's local header; its `size` bytes of data must follow, 64-byte aligned."""
        raw = name.encode()
        offset = self.file.tell()
        zip64 = struct.pack("<HHQQ", 1, 16, size, size)
        pad = -(offset + 30 + len(raw) + len(zip64) + 4) % self.ALIGNMENT
        extra = zip64 + struct.pack("<HH", self._PADDING_FIELD, pad) + b"\0" * pad
        time, date = self._DOS_DATE
        self.file.write(
            struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 0, time, date, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                        len(raw), len(extra)) + raw + extra
        )  # fmt: skip
        self._central.append((raw, crc, size, offset))

    def record(self, name: str, data) -> None:
        self.header(name, zlib.crc32(data), len(data))
        self.file.write(data)

    def close(self) -> None:
        start = self.file.tell()
        time, date = self._DOS_DATE
        for raw, crc, size, offset in self._central:
            extra = struct.pack("<HHQQQ", 1, 24, size, size, offset)
            self.file.write(
                struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 0, time, date, crc, 0xFFFFFFFF,
                            0xFFFFFFFF, len(raw), len(extra), 0, 0, 0, 0, 0xFFFFFFFF) + raw + extra
            )  # fmt: skip
        end, n = self.file.tell(), len(self._central)
        self.file.write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, end - start, start))
        self.file.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1))
        self.file.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
        self.file.close()


class _Writer:
    """What both formats share: specs checked in order, sources kept open, the output file."""

    def __init__(self, path: PathLike, specs: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]], direct: bool):
        self._specs = list(specs.items())
        self._next = 0
        self._sources = _Sources()
        self._file = OutputFile(path, direct)

    def _advance(self, name: str, tensor) -> int:
        _check_next(self._specs, self._next, name, tensor)
        self._next += 1
        return self._next - 1

    def _finish(self) -> None:
        _check_all_written(self._specs, self._next)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:  # on an error, abandoned unfinished: whoever made the path removes it
            self._file.abort()
            self._sources.close()


class BinWriter(_Writer):
    """Writes a `torch.save`-compatible dict one tensor at a time, in the order given up front.

    Args:
        path: the `.bin` file to write.
        specs: name -> (dtype, shape) of every tensor, in the order they will be written.
        direct: write with O_DIRECT where the file system allows it (see `OutputFile`).
    """

    def __init__(self, path: PathLike, specs: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]], direct: bool = True):
        super().__init__(path, specs, direct)
        self._prefix = "archive/"  # torch.save's folder name for a buffer; readers take any
        stubs = {
            name: _TensorStub(_StorageRef(str(i), dtype, _numel(shape)), tuple(shape))
            for i, (name, (dtype, shape)) in enumerate(self._specs)
        }
        buf = io.BytesIO()
        _StubPickler(buf, protocol=2).dump(stubs)  # torch.save's default protocol
        self._zip = _ZipRecords(self._file)
        self._zip.record(self._prefix + "data.pkl", buf.getvalue())
        self._zip.record(self._prefix + ".format_version", b"1")
        self._zip.record(self._prefix + ".storage_alignment", str(_ZipRecords.ALIGNMENT).encode())
        self._zip.record(self._prefix + "byteorder", b"little")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor (name, dtype and shape as in `specs`)."""
        i = self._advance(name, tensor)
        data = _bytes_of(tensor)
        self._zip.header(f"{self._prefix}data/{i}", zlib.crc32(data), len(data))
        self._file.write(data)

    def can_copy(self, ref: TensorRef) -> bool:
        return ref.crc32 is not None  # a record's header needs its checksum before its data

    def copy(self, name: str, ref: TensorRef) -> None:
        """Write the next tensor as a byte copy of `ref`'s storage (a whole, contiguous one), under
        the checksum the source recorded, which the copied bytes must match."""
        i = self._advance(name, ref)
        self._zip.header(f"{self._prefix}data/{i}", ref.crc32, ref.storage_nbytes)
        if self._sources.copy(ref, self._file, checksum=True) != ref.crc32:
            raise TensorFileError(
                f"{ref.path}: the data of '{name}' does not match its checksum; the file is corrupt, "
                "copy it again from its source"
            )

    def close(self) -> None:
        self._finish()
        self._zip.record(self._prefix + "version", b"3\n")
        self._zip.close()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def read_safetensors_refs(path: PathLike) -> Dict[str, TensorRef]:
    """Names and locations of the tensors of a safetensors file, from its header alone."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise TensorFileError(f"{path}: not a safetensors file (header size {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise TensorFileError(f"{path}: its safetensors header is not valid JSON ({e})") from e
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        begin, end = info.get("data_offsets", (0, -1))
        shape = tuple(info.get("shape", ()))
        if dtype is None or end - begin != _numel(shape) * dtype.itemsize or 8 + n + end > size:
            raise TensorFileError(f"{path}: tensor '{name}' has a bad header entry or lies past the end of the file")
        stride = tuple(_numel(shape[i + 1 :]) for i in range(len(shape)))
        refs[name] = TensorRef(path, dtype, shape, stride, 0, 8 + n + begin, _numel(shape))
    return refs


class SafetensorsWriter(_Writer):
    """Writes a safetensors file one tensor at a time: the header first, from `specs`, then the bytes."""

    def __init__(self, path: PathLike, specs: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]], direct: bool = True):
        super().__init__(path, specs, direct)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, (dtype, shape) in self._specs:
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._advance(name, tensor)
        self._file.write(_bytes_of(tensor))

    def can_copy(self, ref: TensorRef) -> bool:
        return True

    def copy(self, name: str, ref: TensorRef) -> None:
        self._advance(name, ref)
        crc = self._sources.copy(ref, self._file, checksum=ref.crc32 is not None)
        if ref.crc32 is not None and crc != ref.crc32:
            raise TensorFileError(
                f"{ref.path}: the data of '{name}' does not match its checksum; the file is corrupt, "
                "copy it again from its source"
            )

    def close(self) -> None:
        self._finish()
        self._file.close()


def _check_next(specs, index: int, name: str, tensor) -> None:
    expected_name, (dtype, shape) = specs[index]
    if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"expected tensor '{expected_name}' {dtype} {tuple(shape)} next, got '{name}' {tensor.dtype} {tuple(tensor.shape)}"
        )


def _check_all_written(specs, written: int) -> None:
    if written != len(specs):
        raise ValueError(f"{len(specs) - written} tensors were never written, the first '{specs[written][0]}'")


def read_refs(path: PathLike) -> Dict[str, TensorRef]:
    """Tensor locations of a `.safetensors` file or of a `torch.save` archive (any other suffix)."""
    return read_safetensors_refs(path) if str(path).endswith(".safetensors") else read_tensor_refs(path)


def open_writer(path: PathLike, specs: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]], direct: bool = True):
    """A streaming writer for `path`: safetensors for `.safetensors`, a `torch.save` archive otherwise."""
    writer = SafetensorsWriter if str(path).endswith(".safetensors") else BinWriter
    return writer(path, specs, direct)
