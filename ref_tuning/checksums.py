"""`SHA256SUMS` in each weights directory ref-tuning writes: the sha256 of every weight file, in `sha256sum`'s
format (so `sha256sum -c SHA256SUMS` checks it too). torch.load and safetensors check nothing: a flipped byte in a
shard loads as a wrong weight. Writers hash the bytes as they write them; a check reads every listed file once, in
parallel (hashlib lets go of the GIL), at about 1.3 GB/s a core (sha256 with SHA-NI)."""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional

from ref_tuning.atomic import atomic_output

SUMS_FILE = "SHA256SUMS"


def file_sha256(path: Path) -> Optional[str]:
    """The file's sha256 in hex, or None if it is missing (a file this user cannot read: PermissionError)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def write_sums(folder: Path, sums: Dict[str, str], name: str = SUMS_FILE) -> None:
    """Record `sums` (path relative to `folder` -> sha256) in `folder/name`, whole or not at all."""
    with atomic_output(folder / name, overwrite=True) as tmp:
        tmp.write_text("".join(f"{digest}  {file}\n" for file, digest in sorted(sums.items())))


def damaged(folder: Path, name: str = SUMS_FILE) -> Optional[str]:
    """Why the files `folder/name` lists are not those written, in one line; None if they are, or if nothing was
    recorded (a directory from the hub, or from before the record)."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    recorded = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            return f"{path}:{number}: expected '<sha256>  <file name>', found {line[:80]!r}; the record is damaged"
        recorded[name] = digest
    try:
        with ThreadPoolExecutor(min(len(recorded), os.cpu_count() or 1) or 1) as pool:
            found = dict(zip(recorded, pool.map(file_sha256, (path.parent / name for name in recorded))))
    except PermissionError as e:
        return f"{e.filename}: this user cannot read it ({e.strerror}); make it readable (chmod a+r)"
    for name, digest in recorded.items():
        if found[name] is None:
            return f"{path.parent / name}: listed in {path} but missing; copy the directory again from its source"
        if found[name] != digest:
            return (
                f"{path.parent / name}: damaged: its sha256 is not the one recorded in {path} when it was written; "
                "copy the directory again from its source, or use another checkpoint"
            )
    return None
