"""The one way ref-tuning commits an output, a file or a whole folder: it is written under a temporary name
beside its target, made durable (fsync), then renamed over the target (a folder over a folder is swapped in
one step). A crash at any point, SIGKILL included, leaves the target absent or complete, old or new.

Temporaries are named `.{target}.tmp-{host}-{pid}-{token}` (a folder moved aside: `.old-` instead of `.tmp-`);
the next write to the same target removes those whose writer is dead, and puts back an old version that was
moved aside by a writer that died before the new one took its place.
"""

import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())  # several nodes may share a file system
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit


class WriteError(OSError):
    """An output that could not be written; the message names it and the space left on its file system."""


def last_line(error: BaseException) -> str:
    """What an error from deep inside torch says last (DCP and the zip writer wrap theirs), at most 200 characters."""
    return ([line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__])[-1][:200]


def write_error(path: Path, error: BaseException) -> WriteError:
    """`error`, raised while writing `path`, as one line naming the path and the free space."""
    reason = last_line(error)
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    free = shutil.disk_usage(existing).free / 1e9
    return WriteError(f"{path}: writing failed ({reason}); {free:.2f} GB free on its file system")


@contextmanager
def atomic_output(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write (a file, or a folder the block creates); it becomes
    `target` once the block completes, and is removed if the block raises. Without `overwrite`, an existing
    target is refused before any work."""
    target = Path(target)
    tmp = temporary(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists; choose another output or pass --overwrite")
    try:
        yield tmp
        commit(tmp, target)
    except OSError as e:
        if isinstance(e, WriteError) or e.errno not in _NO_ROOM:
            raise
        raise write_error(tmp, e) from e
    finally:
        remove(tmp)  # after a swap: the old version


def temporary(target: Path) -> Path:
    """A fresh temporary name beside `target` (its folder created), after sweeping what dead writers left."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target)
    return target.with_name(f".{target.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def commit(tmp: Path, target: Path) -> None:
    """Make the complete `tmp` durable and give it `target`'s name, replacing what was there."""
    for file in [tmp] if tmp.is_file() else (Path(d) / f for d, _, files in os.walk(tmp) for f in files):
        _fsync(file)
    if not target.is_dir() or tmp.is_file():
        os.replace(tmp, target)  # atomic for a new name and for a file over a file
    elif not _exchange(tmp, target):  # a folder over a folder: swap them in one step
        # No atomic swap (not Linux, or the file system lacks it): move the old one aside first; if we die
        # in between, the next write to this target puts it back.
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
        os.replace(target, old)
        os.replace(tmp, target)
        remove(old)
    with suppress(OSError):  # the rename itself; some file systems cannot sync a folder
        _fsync(target.parent)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _sweep(target: Path) -> None:
    """Remove the temporaries of dead writers on this host beside `target`; put back an old version aside."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-{re.escape(_HOST)}-(\d+)-[0-9a-f]{{8}}")
    for path in sorted(target.parent.glob(f".{target.name}.*-*")):
        match = pattern.fullmatch(path.name)
        if match and not _alive(int(match.group(2))):
            os.replace(path, target) if match.group(1) == "old" and not target.exists() else remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return isinstance(e, PermissionError)  # alive, another user's
    return True
