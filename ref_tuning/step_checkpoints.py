"""Step checkpoints of a training run, `output_dir/checkpoints/step_000120/`: `state/` (weights at the
training precision and optimizer state, written by every rank in parallel with torch.distributed.checkpoint),
`hf/` (config.json and tokenizer files, for `python -m ref_tuning.convert step-to-hf`), `train_state.pt`
(counters, schedule, world size) and `rank_N.pt` (each rank's dataloader position and RNG states).

A checkpoint is written under a temporary name (`ref_tuning.atomic`) and renamed once every rank has written its
part, so a directory named `step_*` is always complete, and a crash during a write leaves the previous one the newest.
"""

import random
import re
import threading
import warnings
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import state_dict as dcp_sd
from torchtune.utils import get_world_size_and_rank

from ref_tuning.atomic import WriteError, commit, remove, temporary, write_error
from ref_tuning.checksums import SUMS_FILE, file_sha256, write_sums
from ref_tuning.hf_checkpoint import CheckpointError

_STEP_DIR = re.compile(r"step_(\d+)")
TRAIN_STATE = "train_state.pt"
STATE_DIR = "state"  # model and optimizer shards
HF_DIR = "hf"  # config.json and tokenizer files


def _rank() -> int:
    return get_world_size_and_rank()[1]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class StepCheckpoints:
    """The step checkpoints under `root`, of which the newest `keep_last` are kept."""

    def __init__(self, root: Path, keep_last: int):
        self.root, self.keep_last = Path(root), keep_last
        self._hashing: Optional[threading.Thread] = None

    def complete(self) -> List[Tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        paths = self.root.iterdir() if self.root.is_dir() else []
        found = [(_STEP_DIR.fullmatch(p.name), p) for p in paths if (p / TRAIN_STATE).is_file()]
        return sorted((int(match.group(1)), p) for match, p in found if match)

    def incomplete(self) -> List[Path]:
        """`step_*` folders without the train state that marks one complete (a copy cut short): never resumed from."""
        paths = self.root.iterdir() if self.root.is_dir() else []
        return sorted(p for p in paths if _STEP_DIR.fullmatch(p.name) and not (p / TRAIN_STATE).is_file())

    def newest(self) -> Optional[Path]:
        found = self.complete()
        return found[-1][1] if found else None

    def begin(self, step: int) -> Path:
        """The temporary directory every rank writes step `step` into (`atomic`'s, named by rank 0)."""
        tmp = [None]
        if _rank() == 0:
            tmp[0] = temporary(self.root / f"step_{step:06d}")
            tmp[0].mkdir()
        if dist.is_initialized():
            dist.broadcast_object_list(tmp, src=0)
        return tmp[0]

    def abandon(self, tmp: Path, step: int, error: BaseException) -> WriteError:
        """After a failed write of step `step` into `tmp` (on any rank): `tmp` removed, and the error to raise."""
        remove(tmp)
        newest = self.newest()
        left = (
            f"{newest} is intact: free space, then resume (resume_from_checkpoint=true)"
            if newest
            else "no earlier step checkpoint exists: free space, then run again"
        )
        return WriteError(f"{write_error(self.root / f'step_{step:06d}', error)}; nothing of it is left, {left}")

    def commit(self, tmp: Path, step: int) -> Path:
        """Once every rank has written into `tmp`: make it `step_{step}` and drop the oldest."""
        final = self.root / f"step_{step:06d}"
        self.wait()  # the sums of the checkpoint before: written before any checkpoint is dropped
        _barrier()
        if _rank() == 0:
            commit(tmp, final)  # over the same step saved before, too (a resumed run saving where it started)
            remove(tmp)  # after a swap: the one saved before
            for _, old in self.complete()[: -self.keep_last]:
                remove(old)
        _barrier()
        self._hashing = threading.Thread(target=_record_sums, args=(final, _rank()), name="step-checkpoint-sums")
        self._hashing.start()
        return final

    def wait(self) -> None:
        """Until this rank's sums of the newest checkpoint are written."""
        if self._hashing is not None:
            self._hashing.join()
            self._hashing = None


def sums_file(rank: int) -> str:
    return f"{SUMS_FILE}.rank_{rank}"


def _record_sums(step_dir: Path, rank: int) -> None:
    """This rank's files of `step_dir` and their sha256, in `sums_file(rank)`: hashed in a thread while training goes
    on, from pages still in memory (the 2.7B model's 32.4 GB over 4 processes: about 6 s each at 1.3 GB/s). A crash
    first leaves the checkpoint without them: it is then read unchecked."""
    names = [f"{STATE_DIR}/{p.name}" for p in (step_dir / STATE_DIR).glob(f"__{rank}_*.distcp")]
    names += [f"rank_{rank}.pt"] + ([TRAIN_STATE] if rank == 0 else [])
    with suppress(OSError):  # the checkpoint deleted meanwhile (by hand: the rotation waits for this)
        sums = {name: file_sha256(step_dir / name) for name in names}
        if None not in sums.values():
            write_sums(step_dir, sums, sums_file(rank))


def weight_sources(step_dir: Path) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...], Callable[..., torch.Tensor]]]:
    """The weights of step checkpoint `step_dir` (torchtune names, training precision) as (dtype, shape, load)
    for `hf_checkpoint.converted`, each tensor read when loaded, in one process, whatever the ranks that wrote it."""
    reader = dcp.FileSystemReader(Path(step_dir) / STATE_DIR)
    metadata = reader.read_metadata()
    check_shards(Path(step_dir) / STATE_DIR, metadata)
    sources = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if fqn.startswith("model.") and hasattr(meta, "size"):

            def load(scratch=None, fqn=fqn, meta=meta):
                tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                with warnings.catch_warnings():  # "assuming ... a single process": exactly so
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.load({fqn: tensor}, storage_reader=reader, no_dist=True)
                return tensor

            sources[fqn.removeprefix("model.")] = (meta.properties.dtype, tuple(meta.size), load)
    return sources


def check_shards(state_dir: Path, metadata: Any) -> None:
    """Every shard file DCP's metadata names is there and long enough: DCP finds out only while reading it."""
    ends: Dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (state_dir / name).stat().st_size if (state_dir / name).is_file() else None
        if size is None or size < end:
            found = "missing" if size is None else f"cut short ({size:,} of {end:,} bytes)"
            raise CheckpointError(
                f"{state_dir / name}: {found}, but {state_dir / '.metadata'} lists it; the step checkpoint is damaged"
            )


def load_weights(step_dir: Path) -> Dict[str, torch.Tensor]:
    """All weights of step checkpoint `step_dir`, full tensors under torchtune's names."""
    return {name: load() for name, (_, _, load) in weight_sources(step_dir).items()}


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    return dict(state, cuda=torch.cuda.get_rng_state()) if torch.cuda.is_available() else state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# What trains: all weights in full fine-tuning, only the adapters of a LoRA model (its base is the base checkpoint).
_TRAINED = dcp_sd.StateDictOptions(ignore_frozen_params=True)


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    model_state = dcp_sd.get_model_state_dict(model, options=_TRAINED)
    return {"model": model_state, "optimizer": dcp_sd.get_optimizer_state_dict(model, optimizer)}


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its own shards of the weights and optimizer state into `path/state`."""
    dcp.save(_sharded_state(model, optimizer), storage_writer=dcp.FileSystemWriter(path / STATE_DIR))


def save_state(path: Path, train_state: Dict[str, Any], rank_state: Dict[str, Any]) -> None:
    """After `save_sharded`, on all ranks: each rank's state, then the train state, which marks `path` complete."""
    torch.save(rank_state, path / f"rank_{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        torch.save(train_state, path / TRAIN_STATE)


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Tuple[Dict, Dict]:
    """Restore the weights and optimizer from checkpoint `path`; return its train state and this rank's state."""
    if not (path / STATE_DIR / ".metadata").is_file():
        raise RuntimeError(
            f"{path}: has no {STATE_DIR}/ shards: written by an earlier version of ref-tuning, which kept the weights "
            f"as an HF directory in model/. This version cannot resume it; start a new run from those weights "
            f"(checkpointer.checkpoint_dir={path / 'model'}) with start_over=true or another experiment=NAME"
        )
    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=path / STATE_DIR)
    dcp_sd.set_model_state_dict(
        model, state["model"], options=dcp_sd.StateDictOptions(strict=False)
    )  # frozen: not in it
    dcp_sd.set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])
    train_state = torch.load(path / TRAIN_STATE, weights_only=True)
    rank_file = path / f"rank_{_rank()}.pt"
    if not rank_file.is_file():
        raise RuntimeError(
            f"{path}: has no state for rank {_rank()}: it was written by {train_state['world_size']} processes; "
            "resume with the same number of processes"
        )
    return train_state, torch.load(rank_file, weights_only=True)
