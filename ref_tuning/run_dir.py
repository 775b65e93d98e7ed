"""Which run an output directory belongs to, so that a training run never overwrites or mixes
with another one.

A fresh run writes `output_dir/run.json`: its identity, the resolved config less the keys that may
change when a run is resumed (logging, cadences, speed and memory knobs), and the number of
processes. Then:

- a fresh run into a directory that holds a run's checkpoints or outputs (finished or not) is
  refused, with the command to resume it or the key to start over (`start_over=true`, which deletes
  them first); a run that failed before it saved anything left only `run.json`: nothing to lose;
- a resumed run must have the identity of the run it resumes, and the error names every difference;
- a finished run (one with `checkpoint_final`) is not resumed: there is nothing left to train.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

from omegaconf import DictConfig, OmegaConf

RUN_FILE = "run.json"
# Changing these does not change what is trained: logging, cadences, speed, memory, where outputs go.
MAY_CHANGE = (
    "experiment", "output_dir", "resume_from_checkpoint", "start_over", "metric_logger", "log_every_n_steps",
    "eval_every_n_steps", "save_every_n_steps", "keep_last_n_checkpoints", "timeout_setup_s", "timeout_step_s",
    "peak_tflops", "compile", "enable_activation_checkpointing", "fsdp_reshard_after_forward", "val_batch_size",
    "output_dtype", "checkpointer.output_dir", "checkpointer.max_shard_size", "dataset.cache_dir",
    "dataset_val.cache_dir",
)  # fmt: skip
# What a run leaves in its output directory besides its logs.
RUN_OUTPUTS = (RUN_FILE, "checkpoints", "checkpoint_best", "checkpoint_final")


class RunDirError(ValueError):
    """The output directory holds another run, or the run to resume differs from this config."""


def _flat(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def identity(cfg: DictConfig, world_size: int) -> Dict[str, Any]:
    """The flattened resolved config less `MAY_CHANGE`, and the number of processes."""
    flat = _flat(OmegaConf.to_container(cfg, resolve=True))
    kept = {k: v for k, v in flat.items() if not any(k == m or k.startswith(m + ".") for m in MAY_CHANGE)}
    return dict(kept, world_size=world_size)


def differences(run: Dict[str, Any], now: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(key, how it differs) for every key whose value differs."""
    missing = object()
    return [(key, f"{run.get(key, missing)!r} in the run, {now.get(key, missing)!r} now".replace(repr(missing), "absent"))
            for key in sorted(set(run) | set(now)) if run.get(key, missing) != now.get(key, missing)]  # fmt: skip


def check(output_dir: Path, cfg: DictConfig, world_size: int) -> None:
    """Raise `RunDirError` unless this run may use `output_dir`. Every rank checks (they see the same
    files), all before rank 0 changes anything (`record`)."""
    output_dir = Path(output_dir)
    existing = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RunDirError(f"output_dir {output_dir}: {existing} is a file, not a directory; choose another output_dir")
    try:  # a real write, not os.access: root passes that even on a read-only file system
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise RunDirError(f"output_dir {output_dir}: cannot write in {existing} ({e.strerror}); choose another "
                          "output_dir or fix its permissions") from None
    found = [name for name in RUN_OUTPUTS[1:] if (output_dir / name).exists()]  # run.json alone holds nothing
    steps = sorted(p.name for p in (output_dir / "checkpoints").glob("step_*")) if "checkpoints" in found else []
    finished = "checkpoint_final" in found
    if cfg.resume_from_checkpoint and cfg.start_over:
        raise RunDirError("resume_from_checkpoint=true and start_over=true: choose one (continue the run in "
                          f"{output_dir}, or delete it and start again)")  # fmt: skip
    if not cfg.resume_from_checkpoint and found and not cfg.start_over:
        state = "a finished run (checkpoint_final)" if finished else (
            f"an unfinished run (newest step checkpoint {steps[-1]})" if steps else "a run (" + ", ".join(found) + ")")
        raise RunDirError(
            f"output_dir {output_dir} holds {state}. To continue it, run the same command with "
            "resume_from_checkpoint=true; to start it over, add start_over=true (deletes its checkpoints and "
            "outputs); or choose another experiment=NAME"
        )
    if cfg.resume_from_checkpoint and finished:
        raise RunDirError(
            f"output_dir {output_dir} holds a finished run (checkpoint_final): nothing to resume. To train it "
            f"further, start a new experiment from it (checkpointer.checkpoint_dir={output_dir / 'checkpoint_final'}), "
            "or start this one over with start_over=true instead of resume_from_checkpoint=true"
        )
    if cfg.resume_from_checkpoint and (output_dir / RUN_FILE).is_file():
        run = json.loads((output_dir / RUN_FILE).read_text())
        diff = differences(run, identity(cfg, world_size))
        if diff:
            raise RunDirError(
                f"resume_from_checkpoint=true: this config differs from that of the run in {output_dir} ({RUN_FILE}) "
                f"in {', '.join(key for key, _ in diff)}, so resuming would mix two runs; resume with the run's values, "
                "or start another experiment=NAME:\n  " + "\n  ".join(f"{key}: {what}" for key, what in diff)
            )


def record(output_dir: Path, cfg: DictConfig, world_size: int) -> None:
    """Once `check` passed on every rank (rank 0 alone): delete an earlier run with `start_over`, and
    record this run's identity."""
    output_dir = Path(output_dir)
    if cfg.start_over and not cfg.resume_from_checkpoint:
        for name in RUN_OUTPUTS:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    if not cfg.resume_from_checkpoint or not (output_dir / RUN_FILE).is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = output_dir / f".{RUN_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(identity(cfg, world_size), indent=2, default=str) + "\n")
        tmp.rename(output_dir / RUN_FILE)
