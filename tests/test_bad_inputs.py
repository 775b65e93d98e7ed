"""A table of bad or careless inputs across every entry point (training, scoring, conversion,
preparation, report, preview): each ends with a non-zero exit and exactly one error line that names
the key or the file, and changes nothing, neither the inputs nor any output.

The recipes run in this process (one process, no torchrun): a known error ends them before any
collective, so one process says what two would, in a fraction of the time. A failed run may leave its
own log (`logs/`, `torchtune_config.yaml`); nothing else may change.
"""

import hashlib
import importlib.util
import json
import os
import re
import resource
import signal
import tempfile
import shutil
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import pytest

from conftest import run_in_fork, run_in_forks, run_in_process
from ref_tuning.demo import make_demo_assets, read_problems, write_tiny_checkpoint
from ref_tuning.prepare import prepare_split
from ref_tuning.scoring import ScoreStore

TRAIN = [
    "batch_size=2",
    "dataset.n_samples=16",
    "epochs=1",
    "seed=0",
    "save_every_n_steps=2",
    "keep_last_n_checkpoints=2",
    "val_batch_size=2",
    "dataset_val.n_samples=6",
    "lr_scheduler.num_warmup_steps=2",
]
SCORE = [
    "device=cpu",
    "dtype=fp32",
    "store_dtype=float32",
    "dataset.split=valid",
    "dataset.n_samples=6",
    "batch_size=3",
]
LOG_FILES = ("logs", "torchtune_config.yaml", ".run.lock")  # a failed run's own log, and its lock


def snapshot(root: Path) -> Dict[str, str]:
    """Every file under `root` (caches and run logs aside) and a hash of its bytes."""
    found = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and ".ref_tuning_cache" not in rel.parts and not set(rel.parts) & set(LOG_FILES):
            found[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs and outputs of every kind, good and bad, under one root."""
    root = tmp_path_factory.mktemp("world")
    w = make_demo_assets(root / "demo")
    w["root"] = root
    w["gpt2"] = _copy(
        w["model"], root / "gpt2", lambda c: dict(c, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    )
    w["wide"] = write_tiny_checkpoint(root / "wide", 2 * w["vocab_size"], w["tokenizer"], seed=1)
    w["narrow"] = write_tiny_checkpoint(root / "narrow", w["vocab_size"] // 2, w["tokenizer"], seed=1)
    w["no_shard"] = shutil.copytree(w["model"], root / "no_shard")
    next(w["no_shard"].glob("*.bin")).unlink()
    for name, damage in (("blank", lambda lines: lines[:3] + [""] + lines[3:]), ("empty", lambda lines: [])):
        data = shutil.copytree(w["data"], root / f"data_{name}", ignore=shutil.ignore_patterns(".ref_tuning_cache"))
        lines = (data / "train.jsonl").read_text().splitlines()
        (data / "train.jsonl").write_text("".join(line + "\n" for line in damage(lines)))
    (root / "a_file").write_text("not a directory\n")
    (root / "bad.yaml").write_text("batch_size: [1\nepochs: 2\n")  # a bracket left open
    (root / "dangling").symlink_to(root / "unmounted", target_is_directory=True)
    (root / "other.model").write_bytes(w["tokenizer"].read_bytes() + b"\0")  # another tokenizer file
    (root / "empty_file").write_bytes(b"")
    (root / "tokenizer_dir").mkdir()
    raw = root / "raw"
    raw.mkdir()
    (raw / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in read_problems("train")))
    no_solutions = root / "raw_no_solutions"
    no_solutions.mkdir()
    rows = read_problems("train")
    del rows[1]["solutions"]
    (no_solutions / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in rows))
    (root / "raw_empty").mkdir()
    (root / "prepared").mkdir()
    (root / "prepared" / "train.jsonl").write_text("an earlier output\n")

    base = _train_args(w, root / "finished")
    code, text = run_in_process("train", base)
    assert code == 0, text[-3000:]
    w["finished"] = root / "finished"
    w["unfinished"] = shutil.copytree(w["finished"], root / "unfinished")
    for name in ("checkpoint_final", "checkpoint_best"):
        shutil.rmtree(w["unfinished"] / name)
    # Runs from before run.json (no identity to compare): what their step checkpoints hold is checked instead.
    w["full_unrecorded"] = shutil.copytree(w["unfinished"], root / "full_unrecorded")
    w["lora_unrecorded"] = root / "lora_unrecorded"
    code, text = run_in_process(
        "train", _train_args(w, w["lora_unrecorded"], *LORA_MODEL, "model.lora_attn_modules=[q_proj]")
    )
    assert code == 0, text[-3000:]
    for run in (w["full_unrecorded"], w["lora_unrecorded"]):
        for name in ("run.json", "checkpoint_final", "checkpoint_best", "adapter_final", "adapter_best"):
            path = run / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    w["one_step_left"] = shutil.copytree(w["unfinished"], root / "one_step_left")  # to resume at step 6
    shutil.rmtree(sorted((w["one_step_left"] / "checkpoints").glob("step_*"))[-1])
    w["damaged_step"] = shutil.copytree(w["unfinished"], root / "damaged_step")
    newest = sorted((w["damaged_step"] / "checkpoints").glob("step_*"))[-1]
    shard = max(newest.rglob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    w["flipped_step"] = shutil.copytree(w["unfinished"], root / "flipped_step")  # one bit of a weight
    shard = next((sorted((w["flipped_step"] / "checkpoints").glob("step_*"))[-1] / "state").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x80
    shard.write_bytes(data)
    # Step checkpoints from before their sums: what DCP's own metadata says is checked.
    w["cut_step"], w["shardless_step"] = (
        shutil.copytree(newest, root / name) for name in ("cut_step", "shardless_step")
    )
    for path in [*w["cut_step"].glob("SHA256SUMS*"), *w["shardless_step"].glob("SHA256SUMS*")]:
        path.unlink()
    for shard in (w["shardless_step"] / "state").glob("*.distcp"):
        shard.unlink()
    w["store"] = root / "store"
    code, text = run_in_process("score", _score_args(w, w["store"]))
    assert code == 0 and len(ScoreStore(w["store"])) == 6, text[-3000:]
    # A store of a split that was then prepared again without its first problem: other samples on its lines.
    w["moving"] = shutil.copytree(w["data"], root / "data_moving", ignore=shutil.ignore_patterns(".ref_tuning_cache"))
    w["moved_store"] = root / "moved_store"
    code, text = run_in_process("score", _score_args(w, w["moved_store"], f"dataset.data_dir={w['moving']}"))
    assert code == 0, text[-3000:]
    (root / "raw_valid").mkdir()
    (root / "raw_valid" / "valid.jsonl").write_text("".join(json.dumps(p) + "\n" for p in read_problems("valid")[1:]))
    prepare_split([root / "raw_valid" / "valid.jsonl"], w["moving"], "valid", w["tokenizer"], progress=False)
    w["earlier"] = root / "earlier"  # an earlier report and preview
    w["earlier"].mkdir()
    for name in ("report.md", "report.json", "report.png", "preview.md", "preview.json"):
        (w["earlier"] / name).write_text(f"an earlier {name}\n")
    return w


def _copy(src: Path, dst: Path, edit: Callable[[dict], dict]) -> Path:
    shutil.copytree(src, dst)
    config = dst / "config.json"
    config.write_text(json.dumps(edit(json.loads(config.read_text()))))
    return dst


def _train_args(w, output_dir: Path, *extra: str) -> List[str]:
    return [
        f"tokenizer.path={w['tokenizer']}",
        f"checkpointer.checkpoint_dir={w['model']}",
        f"dataset.data_dir={w['data']}",
        f"dataset_val.data_dir={w['data']}",
        f"output_dir={output_dir}",
        *TRAIN,
        *extra,
    ]


def _score_args(w, output_dir: Path, *extra: str) -> List[str]:
    return [f"model_dir={w['model']}", f"output_dir={output_dir}", f"dataset.data_dir={w['data']}", *SCORE, *extra]


class Case(NamedTuple):
    entry: str
    args: Callable[[dict], List[str]]  # of the world
    names: str  # the key or file the error line must name (a substring of it)


def train(*extra: str, out: str = "new_run") -> Callable[[dict], List[str]]:
    """`out`: a path of the world (by name), an absolute path, or a new folder."""
    return lambda w: _train_args(w, w.get(out) or w["root"] / out, *[e.format(**w) for e in extra])


def score(*extra: str, out: Optional[str] = None) -> Callable[[dict], List[str]]:
    return lambda w: _score_args(w, w[out] if out else w["root"] / "new_store", *[e.format(**w) for e in extra])


LORA_MODEL = ["model._component_=ref_tuning.models.lora_tiny_sheared_llama", "model.lora_rank=4", "model.lora_alpha=8"]


def lora(*extra: str, targets: str = "q_proj,v_proj", out: str = "new_run") -> Callable[[dict], List[str]]:
    """A LoRA run of the tiny model; `extra` after the good settings."""
    return train(*LORA_MODEL, f"model.lora_attn_modules=[{targets}]", *extra, out=out)


def cli(*args: str) -> Callable[[dict], List[str]]:
    return lambda w: [a.format(**w) for a in args]


MLFLOW = ["metric_logger._component_=torchtune.training.metric_logging.MLFlowLogger", "~metric_logger.log_dir"]
CASES = {
    # Training: config keys
    "unknown key": Case("train", train("bogus=1"), "'bogus'"),
    "misspelled key": Case("train", train("batch_sise=2"), "'batch_sise': did you mean 'batch_size'"),
    "not a number": Case("train", train("batch_size=two"), "'batch_size'"),
    "zero accumulation": Case("train", train("gradient_accumulation_steps=0"), "'gradient_accumulation_steps'"),
    "unknown precision": Case("train", train("precision=fp16"), "'precision'"),
    "the old dtype key": Case("train", train("dtype=bf16"), "'dtype'"),
    "negative learning rate": Case("train", train("optimizer.lr=-1e-5"), "'optimizer.lr'"),
    "cuda without a GPU": Case("train", train("device=cuda"), "'device'"),
    "unknown builder": Case("train", train("dataset._component_=ref_tuning.data.nope"), "dataset._component_"),
    "unknown builder argument": Case("train", train("dataset.n_sample=3"), "'dataset.n_sample'"),
    "batch larger than the data": Case("train", train("batch_size=8", "dataset.n_samples=4"), "batch_size"),
    **(
        {}
        if importlib.util.find_spec("tensorboard")
        else {  # TensorBoardLogger without its package
            "metric logger without its package": Case(
                "train",
                train("metric_logger._component_=torchtune.training.metric_logging.TensorBoardLogger"),
                "pip install tensorboard",
            )
        }
    ),
    **(
        {
            f"mlflow: {what}": Case("train", train(*MLFLOW, f"metric_logger.tracking_uri={uri}"), uri)
            for what, uri in (
                ("a server not running", "http://127.0.0.1:9"),
                ("a store not writable", "file:/sys/mlruns"),
            )
        }
        if importlib.util.find_spec("mlflow")
        else {}
    ),
    # Training: the config file and the command line
    "config: YAML that does not parse": Case("train", cli("--config", "{root}/bad.yaml"), "bad.yaml, line 2, column 7"),
    "config: a missing file": Case("train", cli("--config", "{root}/nowhere.yaml"), "nowhere.yaml"),
    "config: an override YAML cannot read": Case("train", train("batch_size=[1"), "the override 'batch_size=[1'"),
    "config: an override without a value": Case("train", train("batch_size"), "key=value, got batch_size"),
    # Training: files
    "model of another vocabulary": Case("train", train("model.vocab_size=512"), "vocab_size"),
    "tokenizer is a directory": Case("train", train("tokenizer.path={root}/tokenizer_dir"), "tokenizer.path"),
    "tokenizer is empty": Case("train", train("tokenizer.path={root}/empty_file"), "tokenizer.path"),
    "tokenizer is not SentencePiece": Case("train", train("tokenizer.path={root}/a_file"), "tokenizer.path"),
    "tokenizer is missing": Case("train", train("tokenizer.path={root}/nowhere.model"), "tokenizer.path"),
    "blank line in the data": Case("train", train("dataset.data_dir={root}/data_blank"), "data_blank/train.jsonl:4"),
    "empty data file": Case("train", train("dataset.data_dir={root}/data_empty"), "data_empty/train.jsonl"),
    "missing data folder": Case("train", train("dataset.data_dir={root}/nowhere"), "nowhere"),
    "missing split": Case("train", train("dataset.split=tset"), "tset"),
    "missing checkpoint": Case("train", train("checkpointer.checkpoint_dir={root}/nowhere"), "nowhere"),
    "checkpoint of another architecture": Case("train", train("checkpointer.checkpoint_dir={gpt2}"), "gpt2"),
    "checkpoint without a shard": Case("train", train("checkpointer.checkpoint_dir={no_shard}"), "no_shard"),
    # Training: the output directory
    "output_dir is a file": Case("train", train(out="a_file"), "a_file"),
    "output_dir under a file": Case("train", train("output_dir={root}/a_file/run"), "a_file"),
    "output_dir a dangling link": Case("train", train(out="dangling"), "is a link to"),
    "output_dir under a dangling link": Case("train", train("output_dir={root}/dangling/run"), "dangling is a link"),
    "output_dir not writable": Case("train", train(out="/sys/ref-tuning-run"), "/sys"),
    "fresh run over a finished one": Case("train", train(out="finished"), "holds a finished run"),
    "fresh run over an unfinished one": Case("train", train(out="unfinished"), "holds an unfinished run"),
    "resume a finished run": Case("train", train("resume_from_checkpoint=true", out="finished"), "nothing to resume"),
    "resume with another batch": Case(
        "train", train("resume_from_checkpoint=true", "batch_size=4", out="unfinished"), "in batch_size"
    ),
    "resume with another draw": Case(
        "train", train("resume_from_checkpoint=true", "dataset.n_samples=12", out="unfinished"), "in dataset.n_samples"
    ),
    "start over from its own checkpoint_final": Case(
        "train",
        train("checkpointer.checkpoint_dir={finished}/checkpoint_final", "start_over=true", out="finished"),
        "config key 'checkpointer.checkpoint_dir'",
    ),
    "data inside the run's checkpoints": Case(
        "train", train("dataset.data_dir={unfinished}/checkpoints", out="unfinished"), "config key 'dataset.data_dir'"
    ),
    "resume and start over": Case(
        "train", train("resume_from_checkpoint=true", "start_over=true", out="unfinished"), "choose one"
    ),
    "damaged step checkpoint": Case("train", train("resume_from_checkpoint=true", out="damaged_step"), "step_000006"),
    "step checkpoint with a flipped bit": Case(
        "train", train("resume_from_checkpoint=true", out="flipped_step"), "__0_0.distcp: damaged: its sha256"
    ),
    "resume a LoRA run as full fine-tuning": Case(
        "train", train("resume_from_checkpoint=true", out="lora_unrecorded"), "holds a LoRA run's adapters"
    ),
    "resume a full run as LoRA": Case(
        "train", lora("resume_from_checkpoint=true", out="full_unrecorded"), "holds a full run's weights"
    ),
    # Training: LoRA settings that torchtune takes without a word and trains wrongly
    "lora: PEFT's o_proj": Case("train", lora(targets="q_proj,o_proj"), "'o_proj' is PEFT's name"),
    "lora: unknown target": Case("train", lora(targets="q_proj,bogus"), "unknown target 'bogus'"),
    "lora: no target": Case("train", lora(targets=""), "model.lora_attn_modules"),
    "lora: alpha 0": Case("train", lora("model.lora_alpha=0"), "model.lora_alpha"),
    "lora: rank 0": Case("train", lora("model.lora_rank=0"), "model.lora_rank"),
    "lora: negative rank": Case("train", lora("model.lora_rank=-4"), "model.lora_rank"),
    "lora: rank a string": Case("train", lora("model.lora_rank=four"), "model.lora_rank"),
    "lora: dropout 1.5": Case("train", lora("model.lora_dropout=1.5"), "model.lora_dropout"),
    "lora: rank missing": Case(
        "train",
        train("model._component_=ref_tuning.models.lora_tiny_sheared_llama", "model.lora_attn_modules=[q_proj]"),
        "'lora_rank'",
    ),
    "negative seed": Case("train", train("seed=-1"), "'seed'"),
    # Scoring
    "score: unknown key": Case("score", score("bogus=1"), "'bogus'"),
    "score: zero batch": Case("score", score("batch_size=0"), "'batch_size'"),
    "score: cuda without a GPU": Case("score", score("device=cuda"), "'device'"),
    "score: packed samples": Case("score", score("dataset.packed=true"), "dataset.packed"),
    "score: missing model": Case("score", score("model_dir={root}/nowhere"), "nowhere/config.json"),
    "score: model of another architecture": Case("score", score("model_dir={gpt2}"), "gpt2"),
    "score: store inside the model": Case("score", score("output_dir={model}/scores"), "output_dir"),
    "score: store of another draw": Case("score", score("dataset.seed=7", out="store"), "holds scores of another run"),
    "score: another tokenizer than the model's": Case(
        "score", score("tokenizer.path={root}/other.model"), "is another tokenizer than"
    ),
    "score: a store continued after its data changed": Case(
        "score", score("dataset.data_dir={moving}", out="moved_store"), "data_moving/valid.jsonl: changed since"
    ),
    "score: YAML that does not parse": Case("score", cli("--config", "{root}/bad.yaml"), "bad.yaml, line 2"),
    "score: tokenizer is a directory": Case("score", score("tokenizer.path={root}/tokenizer_dir"), "tokenizer.path"),
    # Conversion
    "convert: output contains the source": Case(
        "convert", cli("hf-to-hf", "{model}", "{root}/demo", "--overwrite"), "contains the input"
    ),
    "convert: output inside the source": Case("convert", cli("hf-to-hf", "{model}", "{model}/out"), "lies inside"),
    "convert: config of another architecture": Case("convert", cli("hf-to-hf", "{gpt2}", "{root}/out"), "gpt2"),
    "convert: missing source": Case("convert", cli("hf-to-hf", "{root}/nowhere", "{root}/out"), "nowhere"),
    "convert: missing shard": Case("convert", cli("hf-to-hf", "{no_shard}", "{root}/out"), "no_shard"),
    "convert: existing output": Case("convert", cli("hf-to-hf", "{model}", "{wide}"), "--overwrite"),
    "convert: HF folder as tune source": Case(
        "convert", cli("tune-to-hf", "{model}", "{root}/out", "--config", "{model}"), "tune-to-hf"
    ),
    "convert: step checkpoint without its shards": Case(
        "convert", cli("step-to-hf", "{shardless_step}", "{root}/out"), "__0_0.distcp: missing, but"
    ),
    "convert: step checkpoint with a shard cut short": Case(
        "convert", cli("step-to-hf", "{cut_step}", "{root}/out"), "cut short"
    ),
    "convert: step checkpoint with a flipped bit": Case(
        "convert", cli("step-to-hf", "{flipped_step}/checkpoints/step_000008", "{root}/out"), "damaged: its sha256"
    ),
    "convert: not a step checkpoint": Case("convert", cli("step-to-hf", "{model}", "{root}/out"), "step"),
    # Preparation
    "prepare: output is the raw folder": Case(
        "prepare",
        cli("{root}/raw", "{root}/raw", "--tokenizer", "{tokenizer}", "--splits", "train", "--overwrite"),
        "raw",
    ),
    "prepare: max-seq-len 0": Case(
        "prepare", cli("{root}/raw", "{root}/out", "--tokenizer", "{tokenizer}", "--max-seq-len", "0"), "--max-seq-len"
    ),
    "prepare: missing tokenizer": Case(
        "prepare", cli("{root}/raw", "{root}/out", "--tokenizer", "{root}/nowhere.model"), "nowhere.model"
    ),
    "prepare: empty tokenizer, two workers": Case(
        "prepare", cli("{root}/raw", "{root}/out", "--tokenizer", "{root}/empty_file", "--workers", "2"), "empty_file"
    ),
    "prepare: no raw files": Case(
        "prepare", cli("{root}/raw_empty", "{root}/out", "--tokenizer", "{tokenizer}"), "raw_empty"
    ),
    "prepare: existing output": Case(
        "prepare",
        cli("{root}/raw", "{root}/prepared", "--tokenizer", "{tokenizer}", "--splits", "train"),
        "prepared/train.jsonl",
    ),
    "prepare: no solutions field": Case(
        "prepare",
        cli("{root}/raw_no_solutions", "{root}/out", "--tokenizer", "{tokenizer}", "--splits", "train"),
        "train.jsonl:2",
    ),
    # Report and preview
    "report: different vocabularies": Case(
        "report", cli("{model}", "{wide}", "--data-dir", "{data}", "--out", "{root}/out", "--no-progress"), "vocab_size"
    ),
    "report: tokenizer beyond the vocabulary": Case(
        "report",
        cli("{narrow}", "{narrow}", "--data-dir", "{data}", "--out", "{root}/out", "--no-progress"),
        "tokenizer",
    ),
    "report: missing model": Case(
        "report", cli("{model}", "{root}/nowhere", "--data-dir", "{data}", "--out", "{root}/out"), "nowhere"
    ),
    "report: output inside a model": Case(
        "report", cli("{model}", "{wide}", "--data-dir", "{data}", "--out", "{model}/report"), "--out"
    ),
    "preview: different vocabularies": Case(
        "preview", cli("{store}", "{wide}", "--out", "{root}/out", "--no-progress"), "vocab_size"
    ),
    "preview: not a score store": Case(
        "preview", cli("{model}", "{model}", "--out", "{root}/out"), "not a score store"
    ),
    "preview: k out of range": Case(
        "preview", cli("{store}", "{model}", "--out", "{root}/out", "--k", "2", "--no-progress"), "--k"
    ),
    "preview: output is the store": Case("preview", cli("{store}", "{model}", "--out", "{store}"), "--out"),
    "preview: base is the same store": Case(
        "preview", cli("{store}", "{model}", "--base", "{store}", "--out", "{root}/out"), "the same store"
    ),
    "preview: a store whose data changed": Case(
        "preview", cli("{moved_store}", "{model}", "--out", "{root}/out", "--no-progress"), "changed since"
    ),
    "preview: existing output": Case("preview", cli("{store}", "{model}", "--out", "{earlier}"), "--overwrite"),
    "report: existing output": Case(
        "report", cli("{model}", "{model}", "--data-dir", "{data}", "--out", "{earlier}"), "--overwrite"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_error_and_changes_nothing(world, name):
    case = CASES[name]
    before = snapshot(world["root"])
    code, text = run_in_process(case.entry, case.args(world))
    errors = [line for line in text.splitlines() if "error:" in line]
    assert code not in (0, None), text[-3000:]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert case.names in errors[0], errors[0]
    after = snapshot(world["root"])
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"changed: {changed[:10]}\n{text[-2000:]}"


def run_with_file_size_limit(entry: str, args: List[str], limit: int) -> Tuple[int, str]:
    """`run_in_process` in a forked child whose files cannot grow past `limit` bytes, as on a full disk."""

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return run_in_fork(entry, args, limit_files)


@pytest.fixture(scope="module")
def unreadable(world):
    """Inputs in a folder another user can reach (pytest's are root's alone), each also as a copy with a file
    that only root can read, and a folder that only root can write."""
    root = Path(tempfile.mkdtemp(prefix="ref-tuning-permissions-"))
    for name in ("model", "data"):
        for copy in (name, f"{name}_unreadable"):
            shutil.copytree(world[name], root / copy)
    shutil.copy(world["tokenizer"], root / "tokenizer.model")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    next((root / "model_unreadable").glob("*.bin")).chmod(0)
    (root / "data_unreadable" / "train.jsonl").chmod(0)
    (root / "readonly").mkdir(mode=0o555)
    yield root
    shutil.rmtree(root)


def as_nobody() -> None:
    """Root reads and writes whatever the permission bits say: the check needs another user."""
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)


# What this user may not do -> (model, data, output_dir) under the fixture's folder, what the line names.
PERMISSIONS = {
    "read a shard": (("model_unreadable", "data", "out"), "-of-00002.bin: this user cannot read it"),
    "read the data": (("model", "data_unreadable", "out"), "data_unreadable/train.jsonl: this user cannot read it"),
    "write the output_dir": (("model", "data", "readonly/run"), "cannot write in"),
}


@pytest.mark.parametrize("name", PERMISSIONS)
def test_a_file_this_user_may_not_read_or_write_is_one_line_naming_it(unreadable, name):
    (model, data, out), says = PERMISSIONS[name]
    inputs = dict(model=unreadable / model, data=unreadable / data, tokenizer=unreadable / "tokenizer.model")
    args = _train_args(inputs, unreadable / out, f"dataset_val.data_dir={unreadable / 'data'}")
    code, text = run_in_fork("train", args, as_nobody)
    errors = [line for line in text.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert says in errors[0], errors[0]


# A write that fails for want of room: (case, file-size limit in bytes, what the line says besides the path).
FULL_DISK = {
    "a step checkpoint": (
        Case("train", train("resume_from_checkpoint=true", out="one_step_left"), "checkpoints/step_000008"),
        1_000_000,
        "step_000006 is intact: free space, then resume",
    ),
    "checkpoint_final": (
        Case("train", train("resume_from_checkpoint=true", out="unfinished"), ".checkpoint_"),
        400_000,
        "is as it was: free space, then resume (resume_from_checkpoint=true) from",
    ),
}


@pytest.mark.parametrize("name", FULL_DISK)
def test_a_full_disk_is_one_line_naming_the_path_and_the_run_is_left_as_it_was(world, name):
    case, limit, says = FULL_DISK[name]
    before = snapshot(world["root"])
    code, text = run_with_file_size_limit(case.entry, case.args(world), limit)
    errors = [line for line in text.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert case.names in errors[0] and "writing failed" in errors[0] and "GB free on its file system" in errors[0]
    assert says in errors[0], errors[0]
    assert snapshot(world["root"]) == before  # earlier checkpoints intact, no temporary left
    assert not [p for p in world["root"].rglob(".*tmp-*")], "a temporary was left"


def test_a_full_disk_while_scoring_leaves_a_store_the_next_run_completes(world, tmp_path):
    out = tmp_path / "store"
    code, text = run_with_file_size_limit("score", _score_args(world, out, "dataset.n_samples=24"), 3000)
    errors = [line for line in text.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert re.search(r"part-\w+-00000\.bin: writing failed \(.*File too large\); [\d.]+ GB free", errors[0])
    assert len(ScoreStore(out)) < 24
    code, text = run_in_process("score", _score_args(world, out, "dataset.n_samples=24"))
    assert code == 0 and len(ScoreStore(out)) == 24 and not ScoreStore(out).damaged, text[-3000:]


# What one rank finds alone (rank 0 indexes the data, opens the store) while its peer waits in a collective.
TWO_PROCESSES = ["blank line in the data", "score: a store continued after its data changed"]


@pytest.mark.parametrize("name", TWO_PROCESSES)
def test_with_two_processes_the_peer_of_the_failed_rank_ends_quietly(world, name):
    case = CASES[name]
    before = snapshot(world["root"])
    codes, text = run_in_forks(case.entry, case.args(world))
    errors = [line for line in text.splitlines() if "error:" in line]
    assert codes == [2, 2] and len(errors) == 1 and case.names in errors[0], text[-3000:]
    assert "rank 1 stopped: rank 0 failed, with the error above" in text and "Traceback" not in text, text[-3000:]
    assert snapshot(world["root"]) == before


def test_the_table_covers_every_entry_point():
    assert len(CASES) >= 90
    assert {c.entry for c in CASES.values()} == {"train", "score", "convert", "prepare", "report", "preview"}
