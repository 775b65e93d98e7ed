"""Step checkpoints of a training run: their layout, the atomic commit, the newest complete one,
and how many are kept.

    output_dir/checkpoints/step_000120/
        model/            the weights as an HF directory (Rho-1 can load any step as it is)
        optimizer/        the optimizer state, sharded: each rank writes its own part
                          (torch.distributed.checkpoint, which can also read it back resharded)
        train_state.pt    step, epoch, learning-rate schedule, best validation loss, world size
        rank_0.pt ...     each rank's dataloader position and random number generator states

A checkpoint is written under `.tmp-step_000120` and renamed to `step_000120` only once every rank
has written its part, so a directory named `step_*` is always complete, and a crash during a write
leaves the previous checkpoint the newest.
"""

import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torchtune.utils import get_world_size_and_rank

_STEP_DIR = re.compile(r"step_(\d+)")
TRAIN_STATE = "train_state.pt"


def _rank() -> int:
    return get_world_size_and_rank()[1]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class StepCheckpoints:
    """The step checkpoints under `root`, of which the newest `keep_last` are kept."""

    def __init__(self, root: Path, keep_last: int):
        self.root = Path(root)
        self.keep_last = keep_last

    def complete(self) -> List[Tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.fullmatch(path.name)
            if match and (path / TRAIN_STATE).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def newest(self) -> Optional[Path]:
        found = self.complete()
        return found[-1][1] if found else None

    def begin(self, step: int) -> Path:
        """The temporary directory every rank writes step `step`'s checkpoint into, emptied first
        (a killed run may have left one)."""
        tmp = self.root / f".tmp-step_{step:06d}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        return tmp

    def commit(self, tmp: Path, step: int) -> Path:
        """Once every rank has written into `tmp`: make it `step_{step}` and drop the oldest."""
        final = self.root / f"step_{step:06d}"
        _barrier()
        if _rank() == 0:
            if final.exists():  # the same step again (a resumed run saving where it started)
                shutil.rmtree(final)
            tmp.rename(final)
            for _, old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: Dict[str, Any],
               rank_state: Dict[str, Any]) -> None:  # fmt: skip
    """Everything but the model weights, into the checkpoint directory `path` (all ranks call this)."""
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path / "optimizer")
    torch.save(rank_state, path / f"rank_{_rank()}.pt")
    _barrier()
    if _rank() == 0:  # last: its presence marks the directory complete
        torch.save(train_state, path / TRAIN_STATE)


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Restore the optimizer from checkpoint `path`; return its train state and this rank's state."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path / "optimizer")
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])
    train_state = torch.load(path / TRAIN_STATE, weights_only=True)
    rank_file = path / f"rank_{_rank()}.pt"
    if not rank_file.is_file():
        raise RuntimeError(
            f"{path}: has no state for rank {_rank()}: it was written by {train_state['world_size']} processes; "
            "resume with the same number of processes"
        )
    return train_state, torch.load(rank_file, weights_only=True)
