"""Benchmarks of ref-tuning against the real alternatives, one subcommand each (results: benchmarks/RESULTS.md):

    python -m benchmarks convert ...     checkpoint conversion: cp -r, dd, transformers, torchtune's checkpointer
    python -m benchmarks data ...        building the training set: HF datasets and ours; how full the rows are
    python -m benchmarks train ...       training throughput on CPU against torchtune's full_finetune_distributed
    python -m benchmarks checkpoint ...  a step checkpoint: torchtune's recipe's way of saving against ours
    python -m benchmarks precision ...   fp32, bf16_mixed and pure bf16 training: how much the weights learn
    python -m benchmarks gpu ...         the production config's variants on GPUs against torchtune's recipe

Each writes a markdown table to stdout and says on stderr where its logs are. Every measured run is its own child
process, reaped with `os.wait4` so that its peak RSS is its own; methods are interleaved within each repeat, so
that a slow spell of the machine hits all alike, and tables give medians. A child's peak RSS starts from its
launcher's, so launchers never import torch; nor does this module, which every run of benchmarks/stock_recipe.py
imports.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

PROJECT_ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
TOKENIZER_ENV = "REF_TUNING_LLAMA_TOKENIZER"
DEFAULT_TOKENIZER = PROJECT_ROOT / "storage" / "models" / "ref-sheared-llama-2.7b" / "raw" / "tokenizer.model"
# Sheared-LLaMA-2.7B (ref_tuning.models.SHEARED_LLAMA_2_7B) and the demo's tiny model in its vocabulary
# (TINY_SHEARED_LLAMA), written out so that launchers need not import torch.
DIMS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim")
FULL_DIMS, TINY_DIMS = dict(zip(DIMS, (32000, 32, 20, 20, 2560, 6912))), dict(zip(DIMS, (32000, 2, 4, 4, 128, 352)))


def n_params(d: dict[str, int]) -> int:
    dim, hidden, kv_dim = d["embed_dim"], d["intermediate_dim"], d["embed_dim"] // d["num_heads"] * d["num_kv_heads"]
    layer = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden + 2 * dim  # attention, MLP, two norms
    return 2 * d["vocab_size"] * dim + d["num_layers"] * layer + dim  # embeddings, output, layers, final norm


class Method(NamedTuple):
    key: str
    label: str
    cmd: list[str]
    out: Path | None = None  # deleted after every run
    before: Callable[[], None] | None = None  # untimed, before every run (e.g. drop a cache)


@dataclass
class Result:
    label: str
    walls: list[float] = field(default_factory=list)  # successful runs only
    peak_kib: int = 0
    failed: int = 0


def run_child(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """Wall seconds, peak RSS (KiB) and exit code of `cmd` run as one child (with `env` added to the
    environment); its output goes to `log`."""
    with open(log, "w") as f:
        start = time.perf_counter()
        env = {**os.environ, **env} if env else None
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return wall, usage.ru_maxrss, proc.returncode


def python_child(module: str, function: str, *args) -> list[str]:
    """A Python child that calls `module.function(*args)`, every argument a string."""
    code = f"import sys; from {module} import {function}; {function}(*sys.argv[1:])"
    return [sys.executable, "-c", code, *map(str, args)]


def torchrun(nproc: int, module: str, *args: str) -> list[str]:
    """`python -m module *args` in `nproc` processes: `tune run --nproc_per_node N recipes/x.py ...` is this launch."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + ["-m", module, *args]


def make_split(data: Path, lines: int, tokenizer: Path) -> None:
    """A synthetic split, written once (benchmarks/synthetic.py; in a child: it imports numpy)."""
    subprocess.run(python_child("benchmarks.synthetic", "ensure_split", data, lines, tokenizer), check=True)


def make_checkpoint(out: Path, dims: dict[str, int], dtype: str) -> None:
    """A random HF checkpoint of shape `dims`, written once (benchmarks/convert.py; in a child: it imports torch)."""
    subprocess.run(python_child("benchmarks.convert", "random_checkpoint", out, json.dumps(dims), dtype), check=True)


def recipe_command(recipe: str, nproc: int, config: str, overrides: list[str], stock_config: Path) -> list[str]:
    """Our recipe on our `config` with `overrides`, or ("stock") torchtune's recipe on the same run, its config
    written to `stock_config` first (benchmarks/stock_recipe.py)."""
    if recipe == "ours":
        return torchrun(nproc, "recipes.ref_finetune", "--config", config, *overrides)
    write = python_child("benchmarks.stock_recipe", "write_stock_config", stock_config, config, *overrides)
    subprocess.run(write, check=True, stdout=subprocess.DEVNULL)
    return torchrun(nproc, "benchmarks.stock_recipe", "--config", str(stock_config))


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def tail(log: Path, n: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def remove(path: Path) -> None:
    """`path`, and the temporaries an interrupted atomic write left beside it (ref_tuning/atomic.py)."""
    for p in [path, *path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.old-*")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def metric_steps(out: Path) -> list[dict[str, float]]:
    """The training steps that a recipe's DiskLogger wrote under `out/logs` (`Step N | key:value ...` with a loss)."""
    steps = []
    for log in sorted((out / "logs").glob("log_*.txt")):
        for line in log.read_text().splitlines():
            head, _, items = line.partition(" | ")
            if not head.startswith("Step "):
                continue
            values = {"step": float(head.split()[1])}
            for key, _, value in (item.partition(":") for item in items.split()):
                try:
                    values[key] = float(value)
                except ValueError:  # the stock recipe logs its grad norm as a tensor repr
                    pass
            if "loss" in values:
                steps.append(values)
    return steps


def measure(methods: list[Method], repeats: int, logs: Path) -> list[Result]:
    results = [Result(m.label) for m in methods]
    for r in range(1, repeats + 1):
        for m, res in zip(methods, results):
            say(f"repeat {r}/{repeats}: {m.label} ...")
            if m.before is not None:
                m.before()
            wall, kib, rc = run_child(m.cmd, logs / f"{m.key}.log")
            if rc == 0:
                res.walls.append(wall)
                res.peak_kib = max(res.peak_kib, kib)
            else:
                res.failed += 1
                say(f"FAILED (exit {rc}); last lines of {logs / f'{m.key}.log'}:\n{tail(logs / f'{m.key}.log')}")
            say(f"  {wall:.2f} s, peak RSS {kib * 1024 / GB:.2f} GB")
            if m.out is not None:
                remove(m.out)
            os.sync()  # one run's write-back must not slow the next
    return results


def table(results: list[Result]) -> str:
    """Markdown table of the results; the ratio column divides by the first method's median."""
    base = statistics.median(results[0].walls) if results[0].walls else None
    rows = [f"| method | median wall s | runs | peak RSS GB | x {results[0].label} |", "| --- |" + " ---: |" * 4]
    for res in results:
        runs = f"{len(res.walls)}" + (f" ({res.failed} failed)" if res.failed else "")
        if not res.walls:
            rows.append(f"| {res.label} | failed | {runs} | - | - |")
            continue
        wall = statistics.median(res.walls)
        ratio = f"{wall / base:.2f}" if base else "-"
        rows.append(f"| {res.label} | {wall:.2f} | {runs} | {res.peak_kib * 1024 / GB:.2f} | {ratio} |")
    return "\n".join(rows)


def _proc(path: str, key: str) -> str:
    """The value of `key` in a /proc file of `key: value` lines."""
    pairs = (line.partition(":") for line in Path(path).read_text().splitlines())
    return next(value.strip() for name, _, value in pairs if name.strip() == key)


def machine_lines(workdir: Path) -> list[str]:
    cpu, cores = _proc("/proc/cpuinfo", "model name"), len(os.sched_getaffinity(0))
    ram, disk = int(_proc("/proc/meminfo", "MemTotal").split()[0]) * 1024, shutil.disk_usage(workdir).free
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("torch", "torchtune", "torchao"))
    rss = int(_proc("/proc/self/status", "VmHWM").split()[0]) * 1024
    return [
        f"- machine: {cpu}, {cores} cores, RAM {ram / GB:.1f} GB, free disk at {workdir} {disk / GB:.1f} GB",
        f"- software: Python {platform.python_version()}, {versions}",
        f"- launcher RSS (counted in every child's peak): {rss / GB:.3f} GB",
    ]


def descendants(pid: int) -> list[int]:
    """Every living descendant of `pid`, from /proc (torchrun starts each worker in a session of its own,
    out of reach of its parent's process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def tokenizer_path(given: Path | None) -> Path:
    """The LLaMA-2 tokenizer: --tokenizer, else $REF_TUNING_LLAMA_TOKENIZER, else the model's own in storage/."""
    path = Path(given or os.environ.get(TOKENIZER_ENV) or DEFAULT_TOKENIZER).resolve()
    if not path.is_file():
        raise SystemExit(f"{path}: the LLaMA-2 tokenizer is not there; pass --tokenizer PATH or set {TOKENIZER_ENV}")
    return path


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_model_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-layers", type=positive, help="layers of the model (default 32: Sheared-LLaMA-2.7B's)")
    p.add_argument("--tiny", action="store_true", help="the demo's tiny model in the LLaMA-2 vocabulary (for tests)")


def model_dims(args: argparse.Namespace) -> dict[str, int]:
    """Sheared-LLaMA-2.7B's shape (with --tiny the demo's tiny model's), --num-layers layers if given."""
    return dict(TINY_DIMS if args.tiny else FULL_DIMS) | ({"num_layers": args.num_layers} if args.num_layers else {})


def add_tokenizer(p: argparse.ArgumentParser) -> None:
    where = f"${TOKENIZER_ENV} or {DEFAULT_TOKENIZER.relative_to(PROJECT_ROOT)}"
    p.add_argument("--tokenizer", type=Path, help=f"the LLaMA-2 tokenizer.model (default {where})")


RAW = argparse.RawDescriptionHelpFormatter  # help shows the docstrings as written


def add_subcommand(sub, module) -> None:
    """A benchmark's subcommand: its module's docstring, HELP and arguments; --workdir; --methods among its KEYS
    (by default its DEFAULT_KEYS, else all)."""
    name, keys = module.__name__.rsplit(".", 1)[1], module.KEYS
    default_keys = getattr(module, "DEFAULT_KEYS", keys)
    p = sub.add_parser(name, help=module.HELP, description=module.__doc__, formatter_class=RAW)
    default = PROJECT_ROOT / "storage" / "bench" / name
    p.add_argument("--workdir", type=Path, default=default, help=f"its data, outputs and logs (default {default})")

    def methods(text: str) -> list[str]:
        chosen = [k.strip() for k in text.split(",") if k.strip()]
        if not chosen or set(chosen) - set(keys):
            raise argparse.ArgumentTypeError(f"{text!r}: expected some of {', '.join(keys)}")
        return chosen

    help = f"comma-separated, of {', '.join(keys)} (default {','.join(default_keys)})"
    p.add_argument("--methods", type=methods, default=default_keys, help=help)
    module.add_arguments(p)
    p.set_defaults(func=module.main)
