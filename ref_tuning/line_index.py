"""Caches of a processed split (docs/data.md), rebuilt when their sources' size or mtime change, written atomically:
`SplitIndex`, each line's offset, correctness, difficulty and problem, memory-mapped (33 MB for 3.7M lines, not the
2 GB parsed metadata), and `TokenLengths`, per tokenizer."""

import hashlib
import json
import os
import re
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from tqdm import tqdm

from ref_tuning.atomic import atomic_output

INDEX_VERSION = 1
CACHE_FOLDER = ".ref_tuning_cache"
_CHUNK = 64 << 20  # bytes read at a time by the line scan
# A JSON string member "task_id": "...", as json.dumps writes it; an escaped quote inside another
# string cannot match, since the quote after `task_id` would then be preceded by a backslash.
_TASK_ID = re.compile(rb'"task_id"\s*:\s*"((?:[^"\\]|\\.)*)"')
_TASK_ID_FORM = re.compile(r"(.+)_(?:correct|incorrect)_\d+")
_COLUMNS = ("offsets", "is_correct", "difficulty", "problem", "problems")


class DataError(ValueError):
    """Bad data: the message names the file (and line or key) and what was expected there."""


def _identity(path: Path) -> Dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _writable(folder: Path) -> bool:
    """Whether a file can be created in `folder`, tried: permission bits mislead root and read-only mounts."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def cache_folder(data_dir: Path, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Where the caches of `data_dir` go: `cache_dir`, else beside the data, else the user's cache."""
    if cache_dir is not None:
        return Path(cache_dir)
    if _writable(data_dir):
        return data_dir / CACHE_FOLDER
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ref_tuning"
    return user / hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]


def _save_atomic(obj: Dict[str, Any], path: Path) -> None:
    with atomic_output(path, overwrite=True) as tmp:
        torch.save(obj, tmp)


def _load(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return torch.load(path, mmap=True, weights_only=True)
    except Exception:  # absent, damaged or from another version: rebuilt by the caller
        return None


def _local_leader() -> bool:
    """One process per machine writes the shared caches, so that ranks don't race."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


@dataclass
class SplitIndex:
    """Every line of a split: `offsets[i]:offsets[i + 1]` are the bytes of line i (its newline
    included), `is_correct[i]`, `difficulty[i]`, and `problems[problem[i]]` its problem."""

    jsonl: Path
    metadata: Path
    offsets: torch.Tensor  # int64, lines + 1
    is_correct: torch.Tensor  # bool
    difficulty: torch.Tensor  # int16
    problem: torch.Tensor  # int32
    problems: List[str]

    def __len__(self) -> int:
        return len(self.is_correct)

    @classmethod
    def open(cls, jsonl: Path, metadata: Path, cache: Path, progress: bool = False) -> "SplitIndex":
        """The index of `jsonl` from `cache` if current, else built (by one process per machine) and cached."""
        path = cache / f"{jsonl.stem}.index.pt"
        ids = {"version": INDEX_VERSION, "jsonl": _identity(jsonl), "metadata": _identity(metadata)}
        found = _load(path) if _local_leader() else None
        if _local_leader() and (found is None or any(found.get(k) != v for k, v in ids.items())):
            found = cls._build(jsonl, metadata, progress)
            _save_atomic(found, path)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if not _local_leader():
            found = _load(path)
            if found is None or any(found.get(k) != v for k, v in ids.items()):
                raise DataError(f"{path}: the index written by local rank 0 is missing or stale")
        return cls(jsonl, metadata, *(found[k] for k in _COLUMNS))

    @staticmethod
    def _build(jsonl: Path, metadata: Path, progress: bool) -> Dict[str, Any]:
        jsonl_id, metadata_id = _identity(jsonl), _identity(metadata)
        entries, problem_lines = _read_metadata(metadata)
        has_problem_ids = "problem_id" in entries[0] if entries else True
        offsets, task_problems = _scan_lines(jsonl, with_task_ids=not has_problem_ids, progress=progress)
        n = len(offsets) - 1
        if n == 0:
            raise DataError(f"{jsonl}: empty; expected one JSON sample per line, as listed in {metadata}")
        blank = ((offsets[1:] - offsets[:-1]) <= 1).nonzero().flatten()
        if len(blank):  # it would shift every later line against its metadata entry
            raise DataError(
                f"{jsonl}:{int(blank[0]) + 1}: blank line ({len(blank)} in all); every line must be one "
                "JSON sample: remove them"
            )
        if len(entries) != n:
            raise DataError(
                f"{metadata}: lists {len(entries)} entries but {jsonl} has {n} lines; the metadata must have "
                "one entry per line, in line order (regenerate it, or use the metadata file made with this JSONL)"
            )
        if problem_lines is not None:
            _check_problem_lines(metadata, problem_lines, entries)
        problem_ids: Dict[str, int] = {}
        pids = (e["problem_id"] for e in entries) if has_problem_ids else task_problems
        problem = torch.tensor([problem_ids.setdefault(pid, len(problem_ids)) for pid in pids], dtype=torch.int32)
        is_correct = torch.tensor([e["is_correct"] for e in entries], dtype=torch.bool)
        difficulty = torch.tensor([e["difficulty"] for e in entries], dtype=torch.int16)
        if jsonl_id != _identity(jsonl) or metadata_id != _identity(metadata):
            raise DataError(f"{jsonl} or {metadata} changed while being indexed; run again once they are written")
        return _index_record(jsonl_id, metadata_id, offsets, is_correct, difficulty, problem, list(problem_ids))

    @classmethod
    def write(cls, jsonl: Path, metadata: Path, cache: Path, *columns: Any) -> "SplitIndex":
        """Cache the index of files whose columns (as `_COLUMNS`) the caller knows already: it just wrote them."""
        _save_atomic(_index_record(_identity(jsonl), _identity(metadata), *columns), cache / f"{jsonl.stem}.index.pt")
        return cls(jsonl, metadata, *columns)

    def fingerprint(self) -> str:
        """A digest of every line's length, correctness, difficulty and problem: which lines a draw can pick.
        Cheap (the index is in memory), unlike a digest of a 17 GB file."""
        h = hashlib.sha256()
        for column in (self.offsets, self.is_correct, self.difficulty, self.problem):
            h.update(column.numpy().tobytes())
        h.update("\n".join(self.problems).encode())
        return h.hexdigest()[:16]

    def read_line(self, i: int, fd: int) -> bytes:
        """The bytes of line i (without its newline), read from the open JSONL `fd`."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        data = os.pread(fd, end - start, start)
        if len(data) != end - start:
            raise DataError(f"{self.jsonl}:{i + 1}: the file is shorter than its index says; it changed, run again")
        return data.rstrip(b"\n")


def _index_record(jsonl_id: Dict[str, int], metadata_id: Dict[str, int], *columns: Any) -> Dict[str, Any]:
    return {"version": INDEX_VERSION, "jsonl": jsonl_id, "metadata": metadata_id, **dict(zip(_COLUMNS, columns))}


def _read_metadata(path: Path) -> Tuple[List[Dict[str, Any]], Any]:
    """The `metadata` entries of either form, their fields' types checked, and the v2 `problem_index_map`."""
    try:
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    entries = meta.get("metadata") if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a top-level object with a 'metadata' list, one entry per line")
    checks = [("is_correct", "a boolean", bool), ("difficulty", "an integer", int)]
    if entries and isinstance(entries[0], dict) and "problem_id" in entries[0]:
        checks.append(("problem_id", "a string", str))
    for i, entry in enumerate(entries):
        where = f"{path}: metadata[{i}] (line {i + 1})"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, found {entry!r:.80}")
        for key, what, kind in checks:
            if type(entry.get(key)) is not kind:  # exact: a bool is no integer here, nor 1 a boolean
                note = " (entry 0 has one)" if key == "problem_id" else ""
                raise DataError(f"{where}: expected {what} '{key}'{note}, found {entry.get(key)!r:.80}")
    return entries, meta.get("problem_index_map")


def _check_problem_lines(path: Path, problem_lines: Any, entries: List[Dict[str, Any]]) -> None:
    """The v2 `problem_index_map` (problem id -> its correct and incorrect lines) must agree with the entries."""
    if not isinstance(problem_lines, dict):
        raise DataError(f"{path}: 'problem_index_map' must be an object of problem id -> indices")
    for pid, info in problem_lines.items():
        for key, correct in (("correct_indices", True), ("incorrect_indices", False)):
            where = f"{path}: problem_index_map[{pid!r}].{key}"
            lines = info.get(key, []) if isinstance(info, dict) else None
            if not isinstance(lines, list):
                raise DataError(f"{where} must be a list of line numbers")
            for i in lines:
                if type(i) is not int or not 0 <= i < len(entries):
                    raise DataError(f"{where} lists line {i!r}, out of range: the split has {len(entries)} lines")
                if entries[i]["is_correct"] != correct or entries[i].get("problem_id", pid) != pid:
                    raise DataError(
                        f"{where} lists line {i}, but metadata[{i}] says is_correct={entries[i]['is_correct']}, "
                        f"problem_id={entries[i].get('problem_id')!r}; the two parts of the file disagree"
                    )


def _scan_lines(jsonl: Path, with_task_ids: bool, progress: bool) -> Tuple[torch.Tensor, List[str]]:
    """Offsets of each line's start and of the file's end, in one pass; with `with_task_ids`, each line's problem."""
    starts, problems = array("q", [0]), []
    size = jsonl.stat().st_size
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"indexing {jsonl.name}", disable=not progress)
    with open(jsonl, "rb", buffering=_CHUNK) as f, bar:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for line, raw in enumerate(f):
            starts.append(starts[-1] + len(raw))
            bar.update(len(raw))
            if with_task_ids:
                problems.append(_task_problem(jsonl, line, raw))
    return torch.frombuffer(starts, dtype=torch.int64).clone(), problems


def _task_problem(jsonl: Path, line: int, raw: bytes) -> str:
    """The `{problem}` of the line's task_id `{problem}_{correct|incorrect}_{i}`, else the task_id."""
    match = _TASK_ID.search(raw)
    if match is None:
        raise DataError(
            f'{jsonl}:{line + 1}: no "task_id" string field; the metadata has no problem_id, '
            "so each line's problem is read from its task_id"
        )
    task_id = json.loads(b'"' + match.group(1) + b'"')
    form = _TASK_ID_FORM.fullmatch(task_id)
    return form.group(1) if form else task_id


TEMPLATE_VERSION = 1  # bump when the template or the tokenization of a sample changes


def tokenizer_fingerprint(tokenizer: Any) -> Optional[str]:
    """A digest of a SentencePiece-based tokenizer's model and special ids; None for others."""
    spm = getattr(getattr(tokenizer, "_spm_model", None), "spm_model", None)
    if spm is None:
        return None
    h = hashlib.sha256(spm.serialized_model_proto())
    h.update(f"bos={tokenizer.bos_id} eos={tokenizer.eos_id} template={TEMPLATE_VERSION}".encode())
    return h.hexdigest()[:16]


class TokenLengths:
    """Token lengths (`total`) and prompt lengths (`prompt`) of a split's lines under one tokenizer; -1: unknown."""

    def __init__(self, index: SplitIndex, cache: Path, tokenizer: Any):
        fingerprint = tokenizer_fingerprint(tokenizer)
        self._path = cache / f"{index.jsonl.stem}.lengths-{fingerprint}.pt" if fingerprint else None
        self._jsonl_id = _identity(index.jsonl)
        found = _load(self._path) if self._path is not None else None
        if found is not None and found.get("jsonl") == self._jsonl_id and len(found["total"]) == len(index):
            self.total, self.prompt = found["total"].clone(), found["prompt"].clone()
        else:
            self.total, self.prompt = (torch.full((len(index),), -1, dtype=torch.int32) for _ in "tp")

    def save(self) -> None:
        """Write the lengths known now (by one process per machine; the others' copies are equal)."""
        if self._path is not None and _local_leader():
            _save_atomic({"jsonl": self._jsonl_id, "total": self.total, "prompt": self.prompt}, self._path)
