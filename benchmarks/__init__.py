"""Benchmarks of ref-tuning's tools next to their obvious baselines, one subcommand each:

    python -m benchmarks convert ...   checkpoint conversion (benchmarks/convert.py)
    python -m benchmarks data ...      dataset building and packing (benchmarks/data.py)
    python -m benchmarks train ...     training throughput against torchtune's recipe (benchmarks/train.py)
    python -m benchmarks checkpoint ... a step checkpoint: gather + HF write against sharded DCP
                                             (benchmarks/checkpoint.py)
    python -m benchmarks gpu ...       the production config on GPUs: variants vs torchtune's recipe, MFU,
                                             memory, resume and bf16 scoring checks (benchmarks/gpu.py)
    python -m benchmarks precision ... fp32 vs bf16_mixed vs pure bf16 training: unchanged weights, validation
                                             loss, total update (benchmarks/precision.py)

Every measured run is its own child process, reaped with `os.wait4`, so that its peak RSS is the
child's own `ru_maxrss`; methods are interleaved within each repeat so that a slow spell of the
machine hits all alike, and tables report medians. Linux counts the launching process's own peak
RSS into every child's `ru_maxrss`, so this package never imports torch in the launcher; the floor
it adds is printed as `launcher RSS`. `checkpoint` differs: it times the saves inside one torchrun
launch, between barriers, so that the 2.7B model is built once.
"""

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

PROJECT_ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


class Method(NamedTuple):
    label: str
    out: Path  # deleted after every run
    cmd: List[str]
    before: Optional[Callable[[], None]] = None  # untimed, before every run (e.g. drop a cache)


@dataclass
class Result:
    label: str
    walls: List[float] = field(default_factory=list)  # successful runs only
    peak_kib: int = 0
    failed: int = 0

    def add(self, wall: float, peak_kib: int, rc: int) -> None:
        if rc == 0:
            self.walls.append(wall)
            self.peak_kib = max(self.peak_kib, peak_kib)
        else:
            self.failed += 1

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.walls) if self.walls else None


def run_child(cmd: List[str], log: Path) -> Tuple[float, int, int]:
    """Wall seconds, peak RSS (KiB) and exit code of `cmd` run as one child; its output goes to `log`."""
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return wall, usage.ru_maxrss, proc.returncode


def remove(path: Path) -> None:
    """`path` and the temporaries an interrupted atomic write left beside it."""
    for p in [path, *path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.old-*")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def measure(methods: List[Method], repeats: int, keep: bool, logs: Path) -> List[Result]:
    results = [Result(m.label) for m in methods]
    for r in range(1, repeats + 1):
        for m, res in zip(methods, results):
            print(f"[bench] repeat {r}/{repeats}: {m.label} ...", file=sys.stderr, flush=True)
            log = logs / f"{m.out.name}.log"
            if m.before is not None:
                m.before()
            wall, kib, rc = run_child(m.cmd, log)
            res.add(wall, kib, rc)
            status = "ok" if rc == 0 else f"FAILED (exit {rc}); last lines of {log}:\n{_tail(log)}"
            print(f"[bench]   {wall:.2f} s, peak RSS {kib * 1024 / GB:.2f} GB, {status}", file=sys.stderr, flush=True)
            if not (keep and r == repeats):
                remove(m.out)
            os.sync()
    return results


def _meminfo_bytes(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _versions() -> str:
    found = []
    for name in ("torch", "torchtune"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def descendants(pid: int) -> List[int]:
    """Every living descendant of `pid`, from /proc (torchrun starts each worker in a session of its own,
    out of reach of its parent's process group)."""
    children: Dict[int, List[int]] = {}
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


def launcher_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def machine_lines(workdir: Path) -> List[str]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"- machine: {_cpu_model()}, {os.cpu_count()} cores ({usable} usable), "
        f"RAM {_meminfo_bytes('MemTotal') / GB:.1f} GB, "
        f"free disk at {workdir} {shutil.disk_usage(workdir).free / GB:.1f} GB",
        f"- software: {_versions()}",
    ]


def table(results: List[Result]) -> str:
    """Markdown table of the results; the ratio column divides by the first method's median."""
    base = results[0].median
    rows = [
        f"| method | median wall s | runs | peak RSS GB | x {results[0].label} |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for res in results:
        runs = f"{len(res.walls)}" + (f" ({res.failed} failed)" if res.failed else "")
        if res.median is None:
            rows.append(f"| {res.label} | failed | {runs} | - | - |")
            continue
        ratio = f"{res.median / base:.2f}" if base else "-"
        rows.append(f"| {res.label} | {res.median:.2f} | {runs} | {res.peak_kib * 1024 / GB:.2f} | {ratio} |")
    return "\n".join(rows)


def check_disk(workdir: Path, needed: int) -> None:
    free = shutil.disk_usage(workdir).free
    if free < needed + 2 * GB:
        raise SystemExit(
            f"{workdir}: {free / GB:.1f} GB free; the benchmark needs {needed / GB:.1f} GB plus 2 GB spare"
        )


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_subcommand(sub, name: str, help: str, doc: str, workdir: Path, workdir_help: str) -> argparse.ArgumentParser:
    """A benchmark's subcommand: its module docstring as the description, and its --workdir option."""
    p = sub.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = workdir.relative_to(PROJECT_ROOT)
    p.add_argument("--workdir", type=Path, default=workdir, help=workdir_help.format(default=default))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from benchmarks import gpu  # here: they import this module

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    if argv[:1] != ["gpu"]:  # `train` imports torchtune (and torch): the gpu launcher never does
        from benchmarks import checkpoint, convert, data, precision, train

        convert.add_parser(sub)
        data.add_parser(sub)
        train.add_parser(sub)
        checkpoint.add_parser(sub)
        precision.add_parser(sub)
    gpu.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)
