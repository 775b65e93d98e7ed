"""What the tests share: the demo assets (built once per test run), `tune run` and what watches it."""

import contextlib
import importlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist

from benchmarks import descendants  # every process of a run: torchrun starts each worker in a session of its own

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # our `recipes` before torchtune's
# The real LLaMA-2 tokenizer lies beside the checkout, never inside it.
LLAMA_TOKENIZER = Path(
    os.environ.get("REF_TUNING_LLAMA_TOKENIZER", PROJECT_ROOT.parent / "shared" / "assets" / "llama2-tokenizer.model")
)
TINY_CONFIG = "configs/tiny_cpu.yaml"
# 32 samples, 2 per process and micro-batch, 2 micro-batches a step, 2 processes: 4 optimizer steps an
# epoch, 8 in 2 epochs.
RUN = [
    "batch_size=2",
    "gradient_accumulation_steps=2",
    "dataset.n_samples=32",
    "epochs=2",
    "seed=0",
    "lr_scheduler.num_warmup_steps=2",
    "save_every_n_steps=2",
    "keep_last_n_checkpoints=2",
    "val_batch_size=2",
]
STEPS = 8


@pytest.fixture(scope="session")
def llama_tokenizer_path() -> Path:
    if not LLAMA_TOKENIZER.is_file():
        pytest.skip(f"the real LLaMA-2 tokenizer is not at {LLAMA_TOKENIZER} (set REF_TUNING_LLAMA_TOKENIZER)")
    return LLAMA_TOKENIZER


@pytest.fixture(scope="session")
def demo_tokenizer_path(assets) -> Path:
    """A small SentencePiece model with LLaMA-2's settings, trained on the shipped demo problems
    (always available, unlike the real tokenizer)."""
    return assets["tokenizer"]


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Dict[str, Path]:
    """The demo's tokenizer, tiny checkpoint and processed splits, shared by every test that only reads them."""
    from ref_tuning.demo import make_demo_assets

    return make_demo_assets(tmp_path_factory.mktemp("demo"))


def overrides(assets, output_dir: Path, *extra: str, validation: bool = True) -> List[str]:
    val = [f"dataset_val.data_dir={assets['data']}", "dataset_val.n_samples=6"] if validation else ["dataset_val=null"]
    return [
        f"tokenizer.path={assets['tokenizer']}",
        f"checkpointer.checkpoint_dir={assets['model']}",
        f"dataset.data_dir={assets['data']}",
        f"output_dir={output_dir}",
        *val,
        *RUN,
        *extra,
    ]


def tune_command(nproc: int, recipe: str, config: str, args: List[str], literal: bool = False) -> List[str]:
    """`tune run --nproc_per_node N recipe --config config args`. Unless `literal`, as the command that `tune run`
    itself runs for a recipe file, torchrun with `-m recipes.name`: the same launcher code, without the 5 s
    that the `tune` process spends importing torchtune before it starts torchrun."""
    # --standalone: a free port per run, so that runs never collide on torchrun's default one.
    launch = ["--standalone", "--nproc_per_node", str(nproc)]
    if literal:
        tune = shutil.which("tune") or str(Path(sys.executable).parent / "tune")
        return [tune, "run", *launch, recipe, "--config", config, *args]
    module = str(Path(recipe).with_suffix("")).replace("/", ".")
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", module, "--config", config, *args]


def tune(
    args: List[str],
    nproc: int = 2,
    env: Optional[Dict[str, str]] = None,
    watch: Optional[Callable[[subprocess.Popen], None]] = None,
    recipe: str = "recipes/ref_finetune.py",
    config: str = TINY_CONFIG,
    literal: bool = False,
) -> subprocess.CompletedProcess:
    """`tune run` from the project root (see `tune_command`); `watch(process)`, if given, acts on the run while it
    runs."""
    proc = subprocess.Popen(
        tune_command(nproc, recipe, config, args, literal),
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **(env or {})),
        start_new_session=True,
    )
    if watch is not None:
        watch(proc)
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def reached(proc: subprocess.Popen, condition: Callable[[], bool]) -> bool:
    """Wait until `condition()` holds (True) or the run ends (False)."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and not condition():
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.001)
    return proc.poll() is None


def when(condition: Callable[[], bool], *actions: Callable[[subprocess.Popen], None]):
    """A `watch`: once `condition()` holds, each action acts on the run."""

    def watch(proc: subprocess.Popen) -> None:
        if reached(proc, condition):
            for action in actions:
                action(proc)

    return watch


def run_in_process(entry: str, args: List[str], config: Optional[str] = None) -> Tuple[int, str]:
    """An entry point run in this process (a recipe as one process, no torchrun): (exit status, output).
    A recipe runs on `config`, by default the tiny one (training) or configs/ref_score.yaml (scoring)."""
    out = io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # the recipe sets its own
    argv = sys.argv
    log_handler = logging.StreamHandler(out)  # the recipes' log lines too
    logging.getLogger().addHandler(log_handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if entry in ("train", "score"):
                from recipes import ref_finetune, ref_score

                recipe, default = (
                    (ref_finetune, TINY_CONFIG) if entry == "train" else (ref_score, "configs/ref_score.yaml")
                )
                config = config or default
                sys.argv = [entry, "--config", str(PROJECT_ROOT / config), *args]
                recipe.recipe_main()
                code = 0
            else:
                code = importlib.import_module(f"ref_tuning.{entry}").main(args)
    except SystemExit as e:  # torchtune's `config.parse` exits with the recipe's result; argparse with 2
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            out.write(f"{e.code}\n")
    finally:
        logging.getLogger().removeHandler(log_handler)
        sys.argv = argv
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return code, out.getvalue()


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def logged(log_dir: Optional[Path], key: str) -> List[Tuple[int, float]]:
    """(step, value) of `key` in every metric log under `log_dir`, in the order written."""
    found = []
    for log_file in sorted(Path(log_dir).glob("log_*.txt")) if log_dir and Path(log_dir).is_dir() else []:
        for line in log_file.read_text().splitlines():
            match = re.match(rf"Step (\d+) \| .*\b{key}:(\S+)", line)
            if match:
                found.append((int(match.group(1)), float(match.group(2))))
    return found


def step_done(log_dir: Path, step: int) -> Callable[[], bool]:
    return lambda: step in [s for s, _ in logged(log_dir, "loss")]


def preempt_this_process_after(log_dir: Path, step: int) -> None:
    """SIGTERM to this process (running a recipe in-process) once `step` is logged, as a scheduler does, from outside."""

    def preempt() -> None:
        while not step_done(log_dir, step)():
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()


def send(sig: int, launcher_only: bool = False) -> Callable[[subprocess.Popen], None]:
    """Signal every process of a run (or the launcher alone, as a terminal's Ctrl-C does)."""

    def act(proc: subprocess.Popen) -> None:
        for pid in [proc.pid, *([] if launcher_only else descendants(proc.pid))]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    return act


def worker(proc: subprocess.Popen, rank: int) -> int:
    """The pid of the worker of `rank`, from its environment."""
    for pid in descendants(proc.pid):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    raise AssertionError(f"no worker of rank {rank}")


def run_in_fork(entry: str, args: List[str], prepare: Optional[Callable[[], None]] = None) -> Tuple[int, str]:
    """`run_in_process` in a child forked from this process, after `prepare()` there (a limit, another user)."""
    return _result(*_fork(entry, args, prepare))


def run_in_forks(entry: str, args: List[str], nproc: int = 2) -> Tuple[List[int], str]:
    """`entry` as `nproc` ranks forked from this process, with torchrun's environment and a store that this
    process holds, as torchrun's agent does: a distributed run without the 9 s of imports each worker of a
    launch spends. (exit status per rank, the ranks' output in rank order)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    world = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE=str(nproc))
    world |= dict(LOCAL_WORLD_SIZE=str(nproc), TORCHELASTIC_USE_AGENT_STORE="True")
    ranks = [
        _fork(entry, args, lambda rank=rank: os.environ.update(world, RANK=str(rank), LOCAL_RANK=str(rank)))
        for rank in range(nproc)
    ]
    results = [_result(*rank) for rank in ranks]
    del store
    return [code for code, _ in results], "".join(text for _, text in results)


def _fork(entry: str, args: List[str], prepare: Optional[Callable[[], None]]) -> Tuple[int, int]:
    """A child that runs `entry` and sends back its result through a pipe: (pid, the pipe's end to read)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        torch.set_num_threads(1)  # the parent's OpenMP threads do not exist in a fork: joining them would hang
        code, text = 1, ""
        try:
            if prepare is not None:
                prepare()
            code, text = run_in_process(entry, args)
        except BaseException:  # what escaped the recipe: a bug's traceback
            text = traceback.format_exc()
        finally:
            with os.fdopen(write, "w") as f:
                f.write(f"{code}\n{text}")
            os._exit(0)
    os.close(write)
    return pid, read


def _result(pid: int, read: int) -> Tuple[int, str]:
    with os.fdopen(read) as f:
        code, _, text = f.read().partition("\n")
    os.waitpid(pid, 0)
    return int(code), text
