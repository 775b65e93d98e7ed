"""Which run an output directory belongs to, so that a training run never overwrites or mixes with another.

A fresh run writes `output_dir/run.json`: the resolved config less `MAY_CHANGE`, and the number of processes.
A fresh run into a directory that holds a run's outputs is refused (`start_over=true` deletes them first); a
resumed run must have the identity of the run it resumes; a finished run (`checkpoint_final`) is not resumed.
"""

import fcntl
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import IO, Any, Dict, List, Tuple

from omegaconf import DictConfig, OmegaConf

from ref_tuning.atomic import atomic_output

RUN_FILE = "run.json"
DATA_KEY = "data_files"  # in RUN_FILE beside the identity: the training and validation splits' fingerprints
LOCK_FILE = ".run.lock"  # held (flock) by the run using the directory: its host and pid inside
# Changing these does not change what is trained: logging, cadences, speed, memory, where outputs go.
MAY_CHANGE = """experiment output_dir resume_from_checkpoint start_over metric_logger log_every_n_steps eval_every_n_steps
save_every_n_steps keep_last_n_checkpoints timeout_setup_s timeout_step_s peak_tflops compile
enable_activation_checkpointing fsdp_reshard_after_forward val_batch_size output_dtype checkpointer.output_dir
checkpointer.max_shard_size dataset.cache_dir dataset_val.cache_dir""".split()
# What a run leaves in its output directory besides its logs.
RUN_OUTPUTS = (RUN_FILE, "checkpoints", "checkpoint_best", "checkpoint_final", "adapter_best", "adapter_final")
# What a run reads from files: none of it may lie in what the run writes or deletes.
INPUT_KEYS = ("checkpointer.checkpoint_dir", "tokenizer.path", "dataset.data_dir", "dataset_val.data_dir")


class RunDirError(ValueError):
    """The output directory holds another run, or the run to resume differs from this config."""


def _flat(node: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def identity(cfg: DictConfig, world_size: int) -> Dict[str, Any]:
    """The flattened resolved config less `MAY_CHANGE`, and the number of processes."""
    flat = _flat(OmegaConf.to_container(cfg, resolve=True))
    kept = {k: v for k, v in flat.items() if not any(k == m or k.startswith(m + ".") for m in MAY_CHANGE)}
    return dict(kept, world_size=world_size)


def differences(run: Dict[str, Any], now: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(key, how it differs) for every key whose value differs; a key absent on one side counts as null there,
    so that a key newer than a run, left at its null default, does not stop its resume."""
    keys = [key for key in sorted(set(run) | set(now)) if run.get(key) != now.get(key)]
    shown = [[repr(d[key]) if key in d else "absent" for d in (run, now)] for key in keys]
    return [(key, f"{a} in the run, {b} now") for key, (a, b) in zip(keys, shown)]


def check(output_dir: Path, cfg: DictConfig, world_size: int) -> None:
    """Raise `RunDirError` unless this run may use `output_dir`. Every rank checks (they see the same
    files), all before rank 0 changes anything (`record`)."""
    output_dir = Path(output_dir)
    dangling = next((p for p in (output_dir, *output_dir.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:
        raise RunDirError(
            f"output_dir {output_dir}: {dangling} is a link to {os.readlink(dangling)}, which does not exist; "
            "create that folder (a disk not mounted?), or remove the link"
        )
    existing = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RunDirError(f"output_dir {output_dir}: {existing} is a file, not a directory; choose another output_dir")
    try:  # a real write, not os.access: root passes that even on a read-only file system
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise RunDirError(
            f"output_dir {output_dir}: cannot write in {existing} ({e.strerror}); choose another "
            "output_dir or fix its permissions"
        ) from None
    _check_inputs_outside(output_dir, cfg)
    found = [name for name in RUN_OUTPUTS[1:] if (output_dir / name).exists()]  # run.json alone holds nothing
    steps = sorted(p.name for p in (output_dir / "checkpoints").glob("step_*"))
    finished = "checkpoint_final" in found
    resume = cfg.resume_from_checkpoint
    if resume and cfg.start_over:
        raise RunDirError(
            "resume_from_checkpoint=true and start_over=true: choose one (continue the run in "
            f"{output_dir}, or delete it and start again)"
        )
    if not resume and found and not cfg.start_over:
        state = f"an unfinished run (newest step checkpoint {steps[-1]})" if steps else f"a run ({', '.join(found)})"
        raise RunDirError(
            f"output_dir {output_dir} holds {'a finished run (checkpoint_final)' if finished else state}. To continue "
            "it, run the same command with resume_from_checkpoint=true; to start it over, add start_over=true (deletes "
            "its checkpoints and outputs); or choose another experiment=NAME"
        )
    if resume and finished:
        raise RunDirError(
            f"output_dir {output_dir} holds a finished run (checkpoint_final): nothing to resume. To train it "
            f"further, start a new experiment=NAME from it (checkpointer.checkpoint_dir={output_dir / 'checkpoint_final'}"
            "); to train this one again from its base model, use start_over=true instead of resume_from_checkpoint=true"
        )
    run_file = output_dir / RUN_FILE
    diff = []
    if resume and run_file.is_file():
        recorded = json.loads(run_file.read_text())
        recorded.pop(DATA_KEY, None)  # checked by `check_data`, once the data is read
        diff = differences(recorded, identity(cfg, world_size))
    if diff:
        raise RunDirError(
            f"resume_from_checkpoint=true: this config differs from that of the run in {output_dir} ({RUN_FILE}) "
            f"in {', '.join(key for key, _ in diff)}, so resuming would mix two runs; resume with the run's values, "
            "or start another experiment=NAME:\n  " + "\n  ".join(f"{key}: {what}" for key, what in diff)
        )


def _check_inputs_outside(output_dir: Path, cfg: DictConfig) -> None:
    """No input lies in an output this run writes, or deletes with `start_over`: outputs never eat inputs. Not
    `paths.check_separate`: that also refuses an output inside an input's folder, a layout runs may well have."""
    for key in INPUT_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if not isinstance(value, str):
            continue
        source = Path(value).resolve()
        for name in RUN_OUTPUTS[1:]:
            output = (output_dir / name).resolve()
            if source == output or output in source.parents:
                fate = "deletes (start_over=true) and writes" if cfg.start_over else "writes"
                raise RunDirError(
                    f"config key '{key}': {value} lies in {output_dir / name}, which this run {fate}; copy it out "
                    "of the run's folder first, or train into another experiment=NAME"
                )


def hold(output_dir: Path) -> IO[str]:
    """Hold `output_dir` for this run's life (one process of the run): a second run into it is refused while this
    one lives. The kernel lets go when the holder dies, however it dies, so a dead run's file blocks nothing."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = open(output_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise RunDirError(
            f"output_dir {output_dir}: another run is using it now (host and pid: {holder}); wait for it to end, "
            "or choose another experiment=NAME"
        ) from None
    lock.truncate(0)
    lock.write(f"{socket.gethostname()} {os.getpid()}\n")
    lock.flush()
    return lock


def check_data(output_dir: Path, cfg: DictConfig, data: Dict[str, Dict[str, str]]) -> None:
    """On resume: the data files (`data`: config key -> {"jsonl", "fingerprint"}) are the ones the run began with;
    changed ones would make a draw of other samples."""
    run_file = Path(output_dir) / RUN_FILE
    if not cfg.resume_from_checkpoint or not run_file.is_file():
        return
    recorded = json.loads(run_file.read_text()).get(DATA_KEY) or {}  # none: a run from before data was recorded
    for key, now in data.items():
        if key in recorded and recorded[key]["fingerprint"] != now["fingerprint"]:
            raise RunDirError(
                f"resume_from_checkpoint=true: {now['jsonl']} (config key '{key}') or its metadata changed since the "
                f"run in {output_dir} began (other lines, lengths or metadata), so the resumed run would draw other "
                "samples; restore the files, or start over with start_over=true"
            )


def record(output_dir: Path, cfg: DictConfig, world_size: int, data: Dict[str, Dict[str, str]]) -> None:
    """Once `check` passed on every rank (rank 0 alone): delete an earlier run with `start_over`, and
    record this run's identity and its data files' fingerprints (see `check_data`)."""
    output_dir = Path(output_dir)
    if cfg.start_over and not cfg.resume_from_checkpoint:
        for path in (output_dir / name for name in RUN_OUTPUTS):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    if not cfg.resume_from_checkpoint or not (output_dir / RUN_FILE).is_file():
        with atomic_output(output_dir / RUN_FILE, overwrite=True) as tmp:  # creates output_dir too
            tmp.write_text(
                json.dumps(dict(identity(cfg, world_size), **{DATA_KEY: data}), indent=2, default=str) + "\n"
            )
