"""The production training config on GPUs: throughput, MFU and memory of our recipe's variants against
torchtune's own recipe, an exact-resume check and a bf16 scoring check, in one budgeted run.

    python -m benchmarks gpu --tokenizer PATH [--out DIR] [--workdir DIR] [--nproc N] [--steps N]
                                   [--skip N] [--batch-size N] [--methods KEYS] [--checks resume,scoring]
                                   [--resume-every S] [--budget-s S] [--peak-tflops T] [--no-final] [--tiny]

It writes, once, into `--workdir`: a random checkpoint shaped like Sheared-LLaMA-2.7B in bf16 (HF
`.bin` shards, norms 1 and every other weight N(0, 0.02^2)) and a synthetic CodeContests-like split
(`bench data`'s generator) tokenized by the real LLaMA-2 tokenizer. Then, each as its own
`tune run --nproc_per_node N` child (N = `--nproc`, default `torch.cuda.device_count()`),
`configs/ref_tuning.yaml` with its paths overridden and `epochs=1 max_steps_per_epoch=STEPS
dataset_val=null save_every_n_steps=null gradient_accumulation_steps=1 batch_size=4`, in these
variants (`--methods`, comma-separated keys or labels; default all but `stock-unpacked`):

  key              label
  ours-unpacked    ours, bf16_mixed, AC on, unpacked          (the production config)
  ours-packed      ours, bf16_mixed, AC on, packed            (dataset.packed=true)
  ours-noac        ours, bf16_mixed, AC off, packed
  ours-compile     ours, bf16_mixed, AC on, packed, compile
  ours-bf16        ours, bf16, AC on, packed
  stock            stock, bf16, AC on, packed                 (torchtune's full_finetune_distributed,
                                                               tests/stock_recipe.py; packed by
                                                               torchtune's own in-order PackedDataset)
  stock-unpacked   stock, bf16, AC on, unpacked               (not run unless named)

Every method draws the same samples (same `dataset.n_samples` and seed). Per step, our recipe logs
trained tokens/s per GPU (labels not masked), all non-padding tokens/s per GPU, MFU (against the
GPU's known dense bf16 peak, or `--peak-tflops`) and the CUDA peaks since the previous step; the
stock recipe logs trained tokens/s and, with `log_peak_memory_stats`, the same peaks. The table gives
medians over the steps after the first `--skip` (warm-up, compilation), the largest peaks over all
steps, and the child's wall time from its start to its last step's log line: a run is stopped there
(its final checkpoint is not written), but for the first of ours, which goes on to the end to time
`checkpoint_final` (unless `--no-final`). For the stock recipe, the non-padding rate and MFU are derived from our run of
the same layout (same samples: the non-padding/trained token ratio is ours', MFU scales with the
non-padding rate). `x stock-same-layout` is a method's trained tokens/s over the stock run's of the
same layout (packed or not).

Checks (`--checks`, default both):
  resume   the production method with `save_every_n_steps=S` run to 2S steps (stopped after step 2S's
           log line, before its second checkpoint is written); then a copy of its output directory
           (hard links) holding only step S, run with `resume_from_checkpoint=true` to 2S: the largest
           difference of the per-step losses S+1..2S between the two runs, and the step checkpoint's
           write time as the recipe logs it.
  scoring  per-token losses of ~8 samples by our scoring code (`ref_tuning.scoring`, as
           `recipes/ref_score.py` computes them, batched) against `transformers`'
           `AutoModelForCausalLM` on the same directory and token ids, in bf16 and in fp32, on the GPU.

Phases run most important first: scoring, ours-unpacked, ours-packed, stock, ours-bf16, ours-noac,
stock-unpacked, resume, ours-compile; the table lists methods in the order above. `--budget-s`: a
phase that would start when too little of the budget is left is skipped (and says so), and a child
still running when the budget ends is stopped, its logged steps kept (`N (budget)`). The memory
estimate after the table derives, from the single-GPU peaks, the per-GPU memory on 4 GPUs: the
training state (16 bytes a parameter under bf16_mixed: fp32 weight, fp32 gradient, AdamW's two fp32
moments; 8 under bf16) is sharded 4 ways, activations and the gathered bf16 layers are not.

`--out DIR` receives the table (`bench_gpu.md`), every number (`bench_gpu.json`), every child's output
(`children.log`, the last 256 KB of each) and every run's metric lines (`metrics.log`): four files
(a lent machine returns at most eight), rewritten or appended after each phase so that a run cut
short leaves what it measured. `--tiny` runs the same pipeline on CPU (gloo) with the demo's tiny
model shape in the LLaMA-2 vocabulary, fp32 for every method, 2 processes, 6 steps of batch 1, and
without ours-compile unless named: the pipeline's test.

The launcher never imports torch: a first child checks that every module imports and counts the GPUs
(`torch.cuda.device_count()`). The recipes are launched as `python -m torchtune._cli.tune run ...` (the
`tune` script's own code, whatever its shebang), or by torchrun directly where `tune`'s CLI does not
import (it needs kagglehub, which the recipes do not).
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from benchmarks import GB, PROJECT_ROOT, add_subcommand, descendants, machine_lines, positive
from benchmarks.data import default_tokenizer, make_split

DEFAULT_WORKDIR = PROJECT_ROOT / "storage" / "bench" / "gpu"
CONFIG = "configs/ref_tuning.yaml"
GIB = 2**30
# Sheared-LLaMA-2.7B (ref_tuning.models.SHEARED_LLAMA_2_7B), repeated so that the launcher never imports torch.
FULL_DIMS = dict(vocab_size=32_000, num_layers=32, num_heads=20, num_kv_heads=20, embed_dim=2560, intermediate_dim=6912)
# The demo's tiny shape (ref_tuning.demo.TINY_MODEL) in the LLaMA-2 vocabulary.
TINY_DIMS = dict(vocab_size=32_000, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=128, intermediate_dim=352)
# Training state in bytes per parameter: weight, gradient and AdamW's two moments.
STATE_BYTES = {"bf16_mixed": 4 + 4 + 8, "bf16": 2 + 2 + 4, "fp32": 4 + 4 + 8}
# A step checkpoint: the weights at training precision and the optimizer state.
CHECKPOINT_BYTES = {"bf16_mixed": 4 + 8, "bf16": 2 + 4, "fp32": 4 + 8}
CARDS_GIB = {"40 GB": 39.5, "80 GB": 79.2}  # what a 40 GB (A100) and an 80 GB (A100/H100) card report
CARD_RESERVE_GIB = 1.5  # CUDA context and NCCL buffers, outside PyTorch's allocator
SCORE_BATCH = 8  # configs/ref_score.yaml's batch_size
SCORE_SAMPLES = 8
TAIL_BYTES = 256 * 1024  # of each child's output kept in children.log


class Spec(NamedTuple):
    key: str
    label: str
    recipe: str  # "ours" or "stock"
    precision: str
    ac: bool
    packed: bool
    compile: bool = False
    default: bool = True


SPECS = [
    Spec("ours-unpacked", "ours, bf16_mixed, AC on, unpacked", "ours", "bf16_mixed", True, False),
    Spec("ours-packed", "ours, bf16_mixed, AC on, packed", "ours", "bf16_mixed", True, True),
    Spec("ours-noac", "ours, bf16_mixed, AC off, packed", "ours", "bf16_mixed", False, True),
    Spec("ours-compile", "ours, bf16_mixed, AC on, packed, compile", "ours", "bf16_mixed", True, True, True),
    Spec("ours-bf16", "ours, bf16, AC on, packed", "ours", "bf16", True, True),
    Spec("stock", "stock, bf16, AC on, packed", "stock", "bf16", True, True),
    Spec("stock-unpacked", "stock, bf16, AC on, unpacked", "stock", "bf16", True, False, default=False),
]
BY_KEY = {s.key: s for s in SPECS}
PRODUCTION = "ours-unpacked"
# The order runs start in: what matters most first, so that a short budget drops the least.
RUN_ORDER = [
    "scoring",
    "ours-unpacked",
    "ours-packed",
    "stock",
    "ours-bf16",
    "ours-noac",
    "stock-unpacked",
    "resume",
    "ours-compile",
]
CHECKS = ("resume", "scoring")


@dataclass
class Run:
    """One child run of a recipe: what it logged and how long it took."""

    name: str
    rc: Optional[int] = None
    wall: Optional[float] = None  # start to the last step's log line (or to the end)
    total: Optional[float] = None  # start to exit
    first_step_s: Optional[float] = None  # start to the first step's log line
    steps: List[Dict[str, float]] = field(default_factory=list)
    stopped: str = ""  # why the launcher stopped it, if it did
    log: str = ""

    @property
    def ok(self) -> bool:
        """Steps were logged, and the run ended by itself or was stopped by the launcher (its steps kept)."""
        return bool(self.steps) and (self.rc == 0 or bool(self.stopped))


@dataclass
class Row:
    spec: Spec
    run: Optional[Run] = None
    skipped: str = ""
    trained: Optional[float] = None
    nonpad: Optional[float] = None
    mfu: Optional[float] = None
    peak_alloc: Optional[float] = None
    peak_reserved: Optional[float] = None
    derived: bool = False  # nonpad and MFU derived from ours (stock rows)
    vs_stock: Optional[float] = None


# ---------------------------------------------------------------------------------------------
# Children's work (each runs in its own process: these import torch)


def _worker_preflight(_: Dict[str, Any]) -> Dict[str, Any]:
    """Versions, GPUs, and whether `tune`'s CLI and our modules import here."""
    from importlib import metadata

    import torch

    info: Dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count(),
    }
    info["gpu_name"] = torch.cuda.get_device_name(0) if info["gpus"] else None
    try:
        import torchtune._cli.tune  # noqa: F401  (imports kagglehub and huggingface_hub for `tune download`)

        info["tune_cli"] = True
    except Exception as e:  # the recipes need no more than torchtune itself: torchrun is launched directly
        info["tune_cli"] = f"{type(e).__name__}: {e}"
    import recipes.ref_finetune  # noqa: F401
    import recipes.ref_score  # noqa: F401
    import tests.stock_recipe  # noqa: F401
    import benchmarks.train  # noqa: F401
    import ref_tuning.scoring  # noqa: F401
    import transformers  # noqa: F401

    for name in ("torchtune", "torchao", "torchdata", "omegaconf", "datasets", "transformers", "huggingface_hub"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "?"
    return info


def _worker_checkpoint(args: Dict[str, Any]) -> Dict[str, Any]:
    """A random HF checkpoint (bf16 at full size, fp32 tiny) in the hub's layout, reused while its
    parameters match: norms 1, every other weight N(0, 0.02^2)."""
    import torch

    from ref_tuning.hf_checkpoint import OutputTensor, expected_hf_shapes, save_hf_dir
    from ref_tuning.demo import HF_SIDE_FILES
    from ref_tuning.models import hf_llama_config

    out, tiny = Path(args["out"]), args["tiny"]
    dims = TINY_DIMS if tiny else FULL_DIMS
    dtype = torch.float32 if tiny else torch.bfloat16
    params = {"dims": dims, "dtype": str(dtype), "seed": 0, "version": 1}
    marker = out / "bench_gpu.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return {"reused": True}
    start = time.perf_counter()
    config = hf_llama_config(**dims, max_seq_len=2048 if tiny else 4096)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def make(name: str, shape: Tuple[int, ...], i: int) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        generator = torch.Generator(device=device).manual_seed(i)
        return torch.randn(shape, generator=generator, device=device).mul_(0.02).to(dtype).cpu()

    tensors = [
        OutputTensor(name, dtype, shape, lambda scratch=None, name=name, shape=shape, i=i: make(name, shape, i))
        for i, (name, shape) in enumerate(expected_hf_shapes(config).items())
    ]
    extra = {name: json.dumps(content, indent=2) + "\n" for name, content in HF_SIDE_FILES.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_hf_dir(tensors, out, config, max_shard_size="5GB", overwrite=True, extra_files=extra)
    shutil.copy2(args["tokenizer"], out / "tokenizer.model")
    marker.write_text(json.dumps(params))
    return {"reused": False, "seconds": round(time.perf_counter() - start, 1)}


def _worker_stock_config(args: Dict[str, Any]) -> Dict[str, Any]:
    """The stock recipe's config for the run our config with these overrides describes."""
    from omegaconf import OmegaConf

    from tests.stock_recipe import stock_config

    cfg = OmegaConf.merge(OmegaConf.load(PROJECT_ROOT / CONFIG), OmegaConf.from_dotlist(args["overrides"]))
    stock = stock_config(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), args["out"])
    stock.log_peak_memory_stats = True
    if args["packed"]:  # torchtune's own in-order packing, as bench train's `stock, packed`
        stock.dataset._component_ = "benchmarks.train.torchtune_packed"
        stock.dataset.packed = True  # the stock recipe reads it to pick its collate function
    else:
        stock.dataset.packed = False
    OmegaConf.save(stock, args["path"])
    return {"path": args["path"]}


def _worker_scoring(args: Dict[str, Any]) -> Dict[str, Any]:
    """Per-token losses by our scoring code and by transformers, bf16 then fp32, on `device`; the
    result file is written after each dtype, so that a run stopped in fp32 keeps the bf16 figures."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from ref_tuning.data import codecontests_dataset
    from ref_tuning.models import sheared_llama_tokenizer
    from ref_tuning.scoring import load_reference, score_dataset

    device = torch.device(args["device"])
    tok = sheared_llama_tokenizer(args["tokenizer"])
    ds = codecontests_dataset(
        tok, args["data"], split="train", n_samples=args["n_samples"], correct_ratio=1.0, seed=42, max_seq_len=2048
    )
    order = sorted(range(len(ds)), key=lambda i: -int(ds.lengths[i]))  # as recipes/ref_score.py orders its share
    ours: Dict[str, List[torch.Tensor]] = {}
    hf: Dict[str, List[torch.Tensor]] = {}
    result: Dict[str, Any] = {
        "samples": len(ds),
        "device": str(device),
        "seconds": {},
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }

    def diff(a: List[torch.Tensor], b: List[torch.Tensor]) -> Dict[str, float]:
        d = torch.cat([(x - y).abs() for x, y in zip(a, b)])
        return {"max": d.max().item(), "mean": d.mean().item()}

    def free() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        start = time.perf_counter()
        model = load_reference(args["model"], device, dtype)
        ours[name] = [losses for _, losses in score_dataset(model, ds, order, None, device, SCORE_BATCH, tok.pad_id)]
        result["seconds"][f"ours_{name}"] = round(time.perf_counter() - start, 1)
        del model
        free()
        start = time.perf_counter()
        try:  # straight onto the GPU where transformers can (accelerate), else through the CPU
            model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=dtype, device_map=str(device))
        except Exception:  # noqa: BLE001  (no accelerate, or a device_map this version refuses)
            model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=dtype).to(device)
        model.eval()
        hf[name] = []
        with torch.no_grad():
            for i in order:
                sample = ds[i]
                logits = (
                    model(torch.tensor([sample["tokens"]], device=device)).logits[0, :-1].float()
                )  # no mask, as Rho-1
                labels = torch.tensor(sample["labels"][1:], device=device)
                keep = labels != -100
                hf[name].append(F.cross_entropy(logits[keep], labels[keep], reduction="none").cpu())
        result["seconds"][f"transformers_{name}"] = round(time.perf_counter() - start, 1)
        del model
        free()
        result[f"{name}_ours_vs_transformers"] = diff(ours[name], hf[name])
        result["tokens"] = sum(len(x) for x in ours[name])
        result[f"mean_loss_{name}"] = torch.cat(ours[name]).mean().item()
        if name == "fp32":
            result["bf16_ours_vs_fp32_ours"] = diff(ours["bf16"], ours["fp32"])
            result["bf16_transformers_vs_fp32_transformers"] = diff(hf["bf16"], hf["fp32"])
        Path(args["result"]).write_text(json.dumps(result))
    return result


WORKERS = {
    "preflight": _worker_preflight,
    "checkpoint": _worker_checkpoint,
    "stock_config": _worker_stock_config,
    "scoring": _worker_scoring,
}


def worker_main(argv: List[str]) -> None:
    """`python -m benchmarks.gpu WORKER JSON_ARGS RESULT_FILE`"""
    name, args, result = argv
    out = WORKERS[name](json.loads(args))
    Path(result).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# Running children


def _say(*lines: str) -> None:
    for line in lines:
        print(f"[bench gpu] {line}", file=sys.stderr, flush=True)


# Children get a process group of their own, to be killed whole (tune, torchrun and its workers), but
# stay in the launcher's session: whatever ends the launcher's session ends them too.
OWN_GROUP: Dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def _popen(cmd: List[str], out) -> subprocess.Popen:
    """A child in a process group of its own, its output into the open file `out`."""
    return subprocess.Popen(
        cmd,
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=child_env(),
        **OWN_GROUP,
    )


def child_env() -> Dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


def run_worker(
    name: str, args: Dict[str, Any], log: Path, timeout: Optional[float]
) -> Tuple[Optional[Dict[str, Any]], str]:
    """A worker in a child; its result (or None) and its output."""
    result = log.with_suffix(".result.json")
    result.unlink(missing_ok=True)
    args = dict(args, result=str(result))  # a worker may write partial results there itself
    cmd = [sys.executable, "-m", "benchmarks.gpu", name, json.dumps(args), str(result)]
    with open(log, "w") as f:
        proc = _popen(cmd, f)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            f.write(f"\n[bench gpu] stopped: over the budget ({timeout:.0f} s)\n")
        except BaseException:
            _kill_group(proc)
            raise
    output = log.read_text(errors="replace")
    if result.is_file():
        found = json.loads(result.read_text())
        if proc.returncode != 0:
            found["error"] = f"stopped or failed (exit {proc.returncode}) after writing this much:\n{_tail(output, 15)}"
        return found, output
    return None, output


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2 :].split()[0] != "Z"


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child, its process group and every descendant (tune, torchrun and the workers, which
    torchrun puts in sessions of their own), and wait until all are gone: a worker left running would
    hold GPU memory through the next run."""
    victims = set()
    for _ in range(2):  # a second look for any started meanwhile
        pids = [proc.pid, *descendants(proc.pid)]
        victims.update(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in victims):
        time.sleep(0.1)
    left = [pid for pid in victims if _alive(pid)]
    if left:
        _say(f"processes {left} still alive 30 s after SIGKILL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_STEP_LINE = re.compile(r"^Step (\d+) \| (.*)$")


def parse_metric_lines(text: str) -> List[Dict[str, float]]:
    """The training steps of DiskLogger lines (`Step N | key:value ...`): those with a loss."""
    steps = []
    for line in text.splitlines():
        match = _STEP_LINE.match(line.strip())
        if not match:
            continue
        values: Dict[str, float] = {"step": float(match.group(1))}
        for item in match.group(2).split():
            key, sep, value = item.partition(":")
            if sep:
                try:
                    values[key] = float(value)
                except ValueError:
                    pass  # a tensor repr (the stock recipe's grad_norm) or anything else not a number
        if "loss" in values:
            steps.append(values)
    return steps


def metric_text(out: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((out / "logs").glob("log_*.txt")))


class Bench:
    """The launcher: assets, runs, checks, and the report."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start = time.monotonic()
        self.tiny = args.tiny
        self.workdir = args.workdir.resolve()
        self.out = args.out.resolve() if args.out else None
        self.logs = self.workdir / "logs"
        self.rows: Dict[str, Row] = {}
        self.checks: Dict[str, Any] = {}
        self.notes: List[str] = []
        self.info: Dict[str, Any] = {}
        self.walls: List[float] = []  # of finished runs, for the budget's estimates
        self.launcher = "tune"
        self.dims = TINY_DIMS if self.tiny else FULL_DIMS
        self.n_params = n_params(self.dims)
        self.peer_of: Dict[str, str] = {}  # stock method -> our method its derived columns come from

    # -- time ---------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> Optional[float]:
        return None if self.args.budget_s is None else self.args.budget_s - self.elapsed()

    def estimate(self, phase: str) -> float:
        """A phase's expected seconds, from the runs so far (or a first guess)."""
        run = statistics.median(self.walls) if self.walls else (30.0 if self.tiny else 90.0)
        if phase == "ours-compile":
            return run * 2.5
        if phase == "resume":  # two runs, and a step checkpoint written and read back at ~1 GB/s
            return run * 2.2 + 2 * CHECKPOINT_BYTES["fp32" if self.tiny else "bf16_mixed"] * self.n_params / GB
        if phase == "scoring":
            return 20.0 if self.tiny else 60.0
        return run

    def can_start(self, phase: str) -> Optional[str]:
        """None, or why `phase` is skipped."""
        left = self.remaining()
        if left is None:
            return None
        need = 0.6 * self.estimate(phase)
        if left < need:
            return f"skipped: {max(left, 0):.0f} s of the budget left, about {self.estimate(phase):.0f} s needed"
        return None

    # -- the parts ----------------------------------------------------------------------------

    def preflight(self) -> None:
        info, output = run_worker("preflight", {}, self.logs / "preflight.log", self.remaining())
        self._save_child("preflight", output)
        if info is None:
            raise SystemExit(f"the environment cannot run the recipes (imports failed):\n{_tail(output, 30)}")
        self.info.update(info)
        if info["tune_cli"] is not True:
            self.launcher = "torchrun"
            self.notes.append(
                f"`tune`'s CLI does not import here ({info['tune_cli']}): the recipes were launched by "
                "`python -m torch.distributed.run --nproc_per_node N -m recipes.ref_finetune`, "
                "the same launch (README, Several nodes)"
            )
        _say(f"preflight: {json.dumps(info)}")

    def nproc(self) -> int:
        if self.args.nproc:
            return self.args.nproc
        if self.tiny:
            return 2
        n = int(self.info.get("gpus") or 0)  # torch.cuda.device_count(), in the preflight child
        if n < 1:
            listed = count_gpus()
            raise SystemExit(
                f"torch sees no GPU (nvidia-smi lists {listed if listed is not None else 'none'}): "
                "run with --tiny for the CPU pipeline"
            )
        return n

    def assets(self, nproc: int) -> Dict[str, Any]:
        tokenizer = (self.args.tokenizer or default_tokenizer()).resolve()
        if not tokenizer.is_file():
            raise SystemExit(f"{tokenizer}: the LLaMA-2 tokenizer is not there; pass --tokenizer PATH")
        rows_needed = self.args.steps * self.args.batch_size * nproc
        # Enough samples for every method: ~80% fit in 2048 tokens, packed rows hold ~1.35 samples.
        n_samples = math.ceil(2.2 * rows_needed) + 8
        lines = max(2000, 4 * n_samples)
        start = time.perf_counter()
        info = make_split(self.workdir / "data", lines, tokenizer, spare_bytes=0)
        _say(f"split: {info['lines']:,} lines in {self.workdir / 'data'} ({time.perf_counter() - start:.1f} s)")
        model = self.workdir / ("model-tiny" if self.tiny else "model")
        start = time.perf_counter()
        result, output = run_worker(
            "checkpoint",
            {"out": str(model), "tiny": self.tiny, "tokenizer": str(tokenizer)},
            self.logs / "checkpoint.log",
            self.remaining(),
        )
        self._save_child("checkpoint", output)
        if result is None:
            raise SystemExit(f"writing the random checkpoint failed:\n{_tail(output, 30)}")
        size = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
        what = "reused" if result["reused"] else f"written in {time.perf_counter() - start:.1f} s"
        _say(f"checkpoint: {model} ({size / GB:.2f} GB) {what}")
        return {
            "data": self.workdir / "data",
            "model": model,
            "tokenizer": tokenizer,
            "lines": info["lines"],
            "n_samples": n_samples,
            "checkpoint_bytes": size,
        }

    def overrides(self, spec: Spec, out: Path, assets: Dict[str, Any], steps: int) -> List[str]:
        precision = "fp32" if self.tiny else spec.precision
        ov = [
            f"output_dir={out}",
            f"experiment=bench-{spec.key}",
            f"tokenizer.path={assets['tokenizer']}",
            f"checkpointer.checkpoint_dir={assets['model']}",
            f"dataset.data_dir={assets['data']}",
            f"dataset.n_samples={assets['n_samples']}",
            f"dataset.packed={str(spec.packed).lower()}",
            "dataset_val=null",
            "epochs=1",
            f"max_steps_per_epoch={steps}",
            "save_every_n_steps=null",
            "gradient_accumulation_steps=1",
            f"batch_size={self.args.batch_size}",
            f"precision={precision}",
            f"enable_activation_checkpointing={str(spec.ac).lower()}",
            f"compile={str(spec.compile).lower()}",
        ]
        if self.args.peak_tflops:
            ov.append(f"peak_tflops={self.args.peak_tflops}")
        if self.tiny:
            d = self.dims
            ov += [
                "device=cpu",
                "model._component_=ref_tuning.models.tiny_sheared_llama",
                f"model.vocab_size={d['vocab_size']}",
                f"model.num_layers={d['num_layers']}",
                f"model.num_heads={d['num_heads']}",
                f"model.num_kv_heads={d['num_kv_heads']}",
                f"model.embed_dim={d['embed_dim']}",
                f"model.intermediate_dim={d['intermediate_dim']}",
                "model.max_seq_len=2048",
                "loss._component_=torch.nn.CrossEntropyLoss",  # as configs/tiny_cpu.yaml: chunked CE breaks gloo
                "optimizer.fused=false",
            ]
        return ov

    def launch_command(self, nproc: int, module_path: str, config: str, overrides: List[str]) -> List[str]:
        port = str(free_port())
        if self.launcher == "tune":
            return [
                sys.executable,
                "-m",
                "torchtune._cli.tune",
                "run",
                "--nproc_per_node",
                str(nproc),
                "--master_port",
                port,
                module_path,
                "--config",
                config,
                *overrides,
            ]
        module = module_path.removesuffix(".py").replace("/", ".")
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            port,
            "-m",
            module,
            "--config",
            config,
            *overrides,
        ]

    def run_recipe(self, name: str, cmd: List[str], out: Path, last_step: int, finish: bool) -> Run:
        """Run one recipe child, watching its metric log: stopped after step `last_step` unless `finish`,
        and when the budget ends."""
        log = self.logs / f"{name}.log"
        run = Run(name)
        timeout = self.remaining()
        _say(f"{name}: {' '.join(cmd)}")
        with open(log, "w") as f:
            start = time.monotonic()
            proc = _popen(cmd, f)
            try:
                while True:
                    rc = proc.poll()
                    steps = parse_metric_lines(metric_text(out)) if (out / "logs").is_dir() else []
                    now = time.monotonic() - start
                    if steps and run.first_step_s is None:
                        run.first_step_s = now
                    if steps and steps[-1]["step"] >= last_step and run.wall is None:
                        run.wall = now
                        if not finish and rc is None:
                            run.stopped = "after its last step"
                            _kill_group(proc)
                            rc = proc.returncode
                    if rc is not None:
                        break
                    if timeout is not None and now > timeout:
                        run.stopped = f"over the budget, after {len(steps)} steps"
                        _kill_group(proc)
                        break
                    time.sleep(0.2)
            except BaseException:
                _kill_group(proc)
                raise
            run.total = time.monotonic() - start
        run.rc = proc.returncode
        run.steps = parse_metric_lines(metric_text(out)) if (out / "logs").is_dir() else []
        if run.wall is None:
            run.wall = run.total
        run.log = log.read_text(errors="replace")
        self._save_child(name, run.log, metrics=metric_text(out) if (out / "logs").is_dir() else "")
        status = "ok" if run.ok else "FAILED"
        _say(
            f"{name}: {status}, {len(run.steps)} steps, {run.wall:.1f} s to the last step, {run.total:.1f} s in all"
            + (f" (stopped {run.stopped})" if run.stopped else "")
            + f", exit {run.rc}"
        )
        if not run.ok:
            _say(f"{name}: last lines of {log}:", _tail(run.log, 20))
        elif not run.stopped.startswith("over the budget"):
            self.walls.append(run.total)
        return run

    def method(self, spec: Spec, assets: Dict[str, Any], nproc: int, finish: bool) -> Run:
        out = self.workdir / "runs" / spec.key
        shutil.rmtree(out, ignore_errors=True)
        ours_ov = self.overrides(spec, out, assets, self.args.steps)
        if spec.recipe == "ours":
            cmd = self.launch_command(nproc, "recipes/ref_finetune.py", CONFIG, ours_ov)
        else:
            path = self.workdir / "runs" / f"{spec.key}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            result, output = run_worker(
                "stock_config",
                {"overrides": ours_ov, "out": str(out), "path": str(path), "packed": spec.packed},
                self.logs / f"{spec.key}-config.log",
                self.remaining(),
            )
            if result is None:
                self._save_child(f"{spec.key}-config", output)
                run = Run(spec.key, rc=1, wall=0.0, total=0.0, log=output)
                _say(f"{spec.key}: FAILED to write its config:", _tail(output, 20))
                return run
            cmd = self.launch_command(nproc, "tests/stock_recipe.py", str(path), [])
        run = self.run_recipe(spec.key, cmd, out, self.args.steps, finish)
        if finish and run.ok:
            final = re.search(r"HF checkpoint written to (\S+)", run.log)
            if final and run.total and run.wall:
                self.checks["final_checkpoint"] = {
                    "method": spec.key,
                    "seconds": round(run.total - run.wall, 1),
                    "path": final.group(1),
                }
        shutil.rmtree(out, ignore_errors=True)
        return run

    def resume_check(self, assets: Dict[str, Any], nproc: int) -> Dict[str, Any]:
        spec = BY_KEY[PRODUCTION]
        every = self.args.resume_every
        last = 2 * every
        # One step checkpoint is on disk at a time; where bf16_mixed's does not fit, pure bf16's (half) may.
        free = shutil.disk_usage(self.workdir).free
        for precision in ["fp32"] if self.tiny else [spec.precision, "bf16"]:
            need = CHECKPOINT_BYTES[precision] * self.n_params + 2 * GB
            if free >= need:
                break
        else:
            return {"skipped": f"needs {need / GB:.1f} GB free for a step checkpoint, {free / GB:.1f} GB free"}
        if precision != ("fp32" if self.tiny else spec.precision):
            self.notes.append(
                f"resume check in {precision}: {free / GB:.1f} GB free is too little for a "
                f"{spec.precision} step checkpoint ({CHECKPOINT_BYTES[spec.precision] * self.n_params / GB:.1f} GB)"
            )
        first, second = self.workdir / "runs" / "resume-a", self.workdir / "runs" / "resume-b"
        for d in (first, second):
            shutil.rmtree(d, ignore_errors=True)
        ov = self.overrides(spec, first, assets, last)
        ov = [o for o in ov if not o.startswith(("save_every_n_steps=", "precision="))]
        ov += [f"save_every_n_steps={every}", f"precision={precision}"]
        run_a = self.run_recipe(
            "resume-a", self.launch_command(nproc, "recipes/ref_finetune.py", CONFIG, ov), first, last, finish=False
        )
        result: Dict[str, Any] = {"every": every, "steps": last, "precision": precision, "run_a": _run_summary(run_a)}
        saved = re.search(r"checkpoint written to (\S+) in ([\d.]+) ?s\b", run_a.log)
        if saved:
            result["checkpoint_seconds"] = float(saved.group(2))
            state = Path(saved.group(1))
            if state.is_dir():
                result["checkpoint_bytes"] = sum(p.stat().st_size for p in state.rglob("*") if p.is_file())
        step_dir = first / "checkpoints" / f"step_{every:06d}"
        if not (run_a.ok and len(run_a.steps) >= last and step_dir.is_dir()):
            result["error"] = "the first run did not reach its last step with a step checkpoint"
            shutil.rmtree(first, ignore_errors=True)
            return result
        # The second run starts from a copy holding only step S (hard links: no bytes copied).
        shutil.copytree(first, second, copy_function=os.link)
        for p in (second / "checkpoints").iterdir():
            if p.name != step_dir.name:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for name in ("checkpoint_final", "checkpoint_best", "logs"):
            shutil.rmtree(second / name, ignore_errors=True)
        ov_b = [o.replace(f"output_dir={first}", f"output_dir={second}") for o in ov] + ["resume_from_checkpoint=true"]
        run_b = self.run_recipe(
            "resume-b", self.launch_command(nproc, "recipes/ref_finetune.py", CONFIG, ov_b), second, last, finish=False
        )
        result["run_b"] = _run_summary(run_b)
        resumed = re.search(r"resumed from (\S+) \(step (\d+)", run_b.log)
        result["resumed_from_step"] = int(resumed.group(2)) if resumed else None
        losses_a = {int(s["step"]): s["loss"] for s in run_a.steps if s["step"] > every}
        losses_b = {int(s["step"]): s["loss"] for s in run_b.steps}
        common = sorted(set(losses_a) & set(losses_b))
        result["compared_steps"] = common
        if common and run_b.ok and common == list(range(every + 1, last + 1)):
            result["max_abs_loss_diff"] = max(abs(losses_a[s] - losses_b[s]) for s in common)
            result["losses_a"] = [losses_a[s] for s in common]
            result["losses_b"] = [losses_b[s] for s in common]
        else:
            result["error"] = f"the resumed run logged steps {sorted(losses_b)}, expected {every + 1}..{last}"
        for d in (first, second):
            shutil.rmtree(d, ignore_errors=True)
        return result

    def scoring_check(self, assets: Dict[str, Any]) -> Dict[str, Any]:
        args = {
            "model": str(assets["model"]),
            "tokenizer": str(assets["tokenizer"]),
            "data": str(assets["data"]),
            "n_samples": 5 if self.tiny else SCORE_SAMPLES,
            "device": "cpu" if self.tiny else "cuda",
        }
        start = time.monotonic()
        result, output = run_worker("scoring", args, self.logs / "scoring.log", self.remaining())
        self._save_child("scoring", output)
        if result is None:
            _say("scoring: FAILED; last lines:", _tail(output, 20))
            return {"error": _tail(output, 15)}
        result["wall"] = round(time.monotonic() - start, 1)
        return result

    # -- results ------------------------------------------------------------------------------

    def summarize(self) -> None:
        """Medians, derived columns and ratios of every row."""
        for row in self.rows.values():
            run = row.run
            if run is None or not run.ok:
                continue
            steps = run.steps
            skip = min(self.args.skip, len(steps) // 2)
            window = steps[skip:] or steps
            row.trained = _median(window, "tokens_per_second_per_gpu")
            row.nonpad = _median(window, "all_tokens_per_second_per_gpu")
            row.mfu = _median(window, "mfu")
            row.peak_alloc = _max(steps, "peak_memory_alloc")
            row.peak_reserved = _max(steps, "peak_memory_reserved")
        for row in self.rows.values():
            if row.spec.recipe != "stock" or row.trained is None:
                continue
            peer = self._ours_peer(row.spec)
            if peer is None:
                continue
            # Non-padding over trained tokens of the samples our run consumed (per step, weighted by the
            # step's trained tokens: the pooled ratio, sum of all tokens over sum of trained tokens).
            pairs = [
                (s["all_tokens_per_second_per_gpu"] / s["tokens_per_second_per_gpu"], s.get("tokens", 1.0))
                for s in peer.run.steps
                if s.get("tokens_per_second_per_gpu") and "all_tokens_per_second_per_gpu" in s
            ]
            if pairs and peer.nonpad:
                row.nonpad = row.trained * sum(r * w for r, w in pairs) / sum(w for _, w in pairs)
                row.mfu = peer.mfu * row.nonpad / peer.nonpad if peer.mfu is not None else None
                row.derived = True
                self.peer_of[row.spec.key] = peer.spec.key
        for row in self.rows.values():
            stock = next(
                (
                    r
                    for r in self.rows.values()
                    if r.spec.recipe == "stock" and r.spec.packed == row.spec.packed and r.trained
                ),
                None,
            )
            if stock is not None and row.trained is not None:
                row.vs_stock = row.trained / stock.trained

    def _ours_peer(self, spec: Spec) -> Optional[Row]:
        """Our run of the stock run's layout: same precision, AC and packing if run, else the nearest."""
        ours = [
            r for r in self.rows.values() if r.spec.recipe == "ours" and r.trained is not None and not r.spec.compile
        ]
        for match in (
            lambda s: (s.precision, s.ac, s.packed) == (spec.precision, spec.ac, spec.packed),
            lambda s: (s.ac, s.packed) == (spec.ac, spec.packed),
            lambda s: s.packed == spec.packed,
        ):
            found = [r for r in ours if match(r.spec)]
            if found:
                return found[0]
        return None

    def table(self) -> str:
        rows = [
            "| method | steps | trained tok/s/GPU | non-padding tok/s/GPU | MFU | peak alloc GiB | peak reserved GiB "
            "| wall s | x stock-same-layout |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for spec in SPECS:
            row = self.rows.get(spec.key)
            if row is None:
                continue
            if row.skipped:
                rows.append(f"| {spec.label} | {row.skipped} | | | | | | | |")
                continue
            run = row.run
            if run is None or not run.ok:
                why = f"exit {run.rc}" if run and run.rc is not None else "no step logged"
                rows.append(f"| {spec.label} | FAILED ({why}) | | | | | | {_fmt(run.wall if run else None, 1)} | |")
                continue
            star = "*" if row.derived else ""
            steps = f"{len(run.steps)}" + (" (budget)" if run.stopped.startswith("over the budget") else "")
            rows.append(
                f"| {spec.label} | {steps} | {_fmt(row.trained, 0)} | {_fmt(row.nonpad, 0)}{star} | "
                f"{_pct(row.mfu)}{star if row.mfu is not None else ''} | {_fmt(row.peak_alloc, 2)} | "
                f"{_fmt(row.peak_reserved, 2)} | {_fmt(run.wall, 1)} | {_fmt(row.vs_stock, 2)} |"
            )
        return "\n".join(rows)

    def memory_table(self, nproc: int) -> List[str]:
        """Per-GPU memory on 4 GPUs, derived from the measured peaks (state sharded 4 ways)."""
        measured = [
            r
            for r in (self.rows.get(s.key) for s in SPECS)
            if r and r.spec.recipe == "ours" and not r.spec.compile and r.peak_alloc is not None
        ]
        if not measured:
            return ["No CUDA memory peaks were measured (CPU run, or no method finished): no estimate."]
        lines = [
            f"Derived, not measured: per-GPU memory of the same runs on 4 GPUs, from the {nproc}-GPU peaks, as "
            f"`peak_{nproc}gpu - state_bytes x params x (1/{nproc} - 1/4)` (for 1 GPU: `peak_1gpu - 16 B x params x "
            f"3/4`): the training state (bf16_mixed: 4 B fp32 weight + 4 B fp32 gradient + 8 B AdamW = 16 B a "
            f"parameter; bf16: 8 B) is sharded over the GPUs, activations and the gathered bf16 layers are not. "
            f"params = {self.n_params:,}. A card fits when the estimated reserved memory plus {CARD_RESERVE_GIB} GiB "
            "(CUDA context, NCCL buffers) is within what it reports (40 GB: "
            f"{CARDS_GIB['40 GB']} GiB, 80 GB: {CARDS_GIB['80 GB']} GiB). Unmeasured: unpacked with AC off "
            "(its rows are never longer than packed rows, so at most packed AC off's figure).",
            "",
            "| method (batch 4 x 2048 per GPU) | measured peak alloc / reserved GiB | state sharded away GiB | "
            "est. alloc / reserved GiB per GPU on 4 | 40 GB card | 80 GB card |",
            "| --- | ---: | ---: | ---: | :---: | :---: |",
        ]
        for row in measured:
            saved = STATE_BYTES[row.spec.precision] * self.n_params * (1 / nproc - 1 / 4) / GIB
            alloc, reserved = row.peak_alloc - saved, row.peak_reserved - saved
            fits = []
            for card in CARDS_GIB.values():
                spare = card - CARD_RESERVE_GIB - reserved
                fits.append(f"yes ({spare:.1f} GiB spare)" if spare >= 0 else f"no ({-spare:.1f} GiB short)")
            lines.append(
                f"| {row.spec.label} | {row.peak_alloc:.2f} / {row.peak_reserved:.2f} | {saved:.2f} | "
                f"{alloc:.2f} / {reserved:.2f} | {fits[0]} | {fits[1]} |"
            )
        return lines

    def check_lines(self) -> List[str]:
        lines = []
        resume = self.checks.get("resume")
        if resume is not None:
            lines.append("### Resume check")
            lines.append("")
            if "skipped" in resume:
                lines.append(f"- {resume['skipped']}")
            else:
                lines.append(
                    f"- production method ({resume['precision']}), `save_every_n_steps={resume['every']}`, "
                    f"run to step {resume['steps']}, then resumed from step {resume.get('resumed_from_step')} "
                    f"in a copy holding only that checkpoint"
                )
                if "max_abs_loss_diff" in resume:
                    lines.append(
                        f"- max |loss difference| over steps {resume['compared_steps'][0]}.."
                        f"{resume['compared_steps'][-1]}: {resume['max_abs_loss_diff']:.3g}"
                    )
                if "error" in resume:
                    lines.append(f"- FAILED: {resume['error']}")
                if "checkpoint_seconds" in resume:
                    size = f" ({resume['checkpoint_bytes'] / GB:.1f} GB)" if "checkpoint_bytes" in resume else ""
                    lines.append(
                        f"- step checkpoint{size} written in {resume['checkpoint_seconds']:.1f} s (recipe's log)"
                    )
                a, b = resume.get("run_a"), resume.get("run_b")
                if a and b and a.get("first_step_s") and b.get("first_step_s"):
                    lines.append(
                        f"- start to first step: {a['first_step_s']:.1f} s fresh, {b['first_step_s']:.1f} s "
                        "resumed (reading the step checkpoint)"
                    )
            lines.append("")
        final = self.checks.get("final_checkpoint")
        if final:
            lines += [
                "### checkpoint_final",
                "",
                f"- {final['method']}: from its last step's log line to its exit (gather to rank 0, bf16 HF "
                f"`.bin` write, shutdown): {final['seconds']:.1f} s",
                "",
            ]
        scoring = self.checks.get("scoring")
        if scoring is not None:
            lines.append("### Scoring check: ref_tuning.scoring against transformers")
            lines.append("")
            if "skipped" in scoring:
                lines.append(f"- {scoring['skipped']}")
            elif "samples" not in scoring:
                lines += ["- FAILED:", "", "```", scoring.get("error", "?"), "```"]
            else:
                loss = scoring.get("mean_loss_fp32", scoring.get("mean_loss_bf16"))
                lines.append(
                    f"- {scoring['samples']} samples, {scoring.get('tokens', 0):,} response tokens, on "
                    f"{scoring['gpu'] or scoring['device']}; ours batched {SCORE_BATCH} (right-padded, as "
                    "recipes/ref_score.py), transformers one sample at a time (no attention mask, as Rho-1); "
                    f"mean loss {loss:.3f}; seconds {scoring.get('seconds')}"
                )
                lines.append("")
                lines.append("| per-token losses | max abs diff | mean abs diff |")
                lines.append("| --- | ---: | ---: |")
                for key, label in (
                    ("bf16_ours_vs_transformers", "bf16: ours vs transformers"),
                    ("fp32_ours_vs_transformers", "fp32: ours vs transformers"),
                    ("bf16_ours_vs_fp32_ours", "ours: bf16 vs fp32 (bf16's own error, for scale)"),
                    ("bf16_transformers_vs_fp32_transformers", "transformers: bf16 vs fp32"),
                ):
                    d = scoring.get(key)
                    lines.append(
                        f"| {label} | {d['max']:.3g} | {d['mean']:.3g} |" if d else f"| {label} | not reached | |"
                    )
                if "error" in scoring:
                    lines += ["", "- INCOMPLETE:", "", "```", scoring["error"], "```"]
            lines.append("")
        return lines

    def report(self, nproc: int, assets: Optional[Dict[str, Any]], final: bool) -> str:
        self.summarize()
        head = ["## gpu benchmark" + ("" if final else " (in progress)"), ""]
        head += machine_lines(self.workdir)
        if self.info:
            head.append(
                f"- device: {self.info.get('gpus')} x {self.info.get('gpu_name') or 'no GPU'}; torch "
                f"{self.info.get('torch')}, torchtune {self.info.get('torchtune')}, torchao "
                f"{self.info.get('torchao')}, transformers {self.info.get('transformers')}; launched by "
                f"`{'tune run' if self.launcher == 'tune' else 'torchrun'}`"
            )
        if assets:
            model = (
                "the demo's tiny shape, LLaMA-2 vocabulary, fp32 for every method (CPU)"
                if self.tiny
                else ("random Sheared-LLaMA-2.7B (bf16 checkpoint)")
            )
            head.append(
                f"- model: {model}, {self.n_params:,} parameters; {nproc} process(es), batch "
                f"{self.args.batch_size} x 2048 per process, gradient accumulation 1, {self.args.steps} steps "
                f"of one epoch; medians over the steps after the first {self.args.skip}"
            )
            head.append(
                f"- data: synthetic CodeContests-like split, {assets['lines']:,} lines; "
                f"dataset.n_samples={assets['n_samples']} (the same samples for every method)"
            )
        head.append(
            f"- elapsed {self.elapsed():.0f} s"
            + (f" of a {self.args.budget_s:.0f} s budget" if self.args.budget_s else "")
        )
        body = ["", self.table(), ""]
        body.append(
            "`*` derived from our run of the same layout ("
            + ", ".join(f"{k} from {v}" for k, v in self.peer_of.items())
            + "): non-padding rate = the stock "
            "run's trained rate x the non-padding/trained token ratio of the samples our run trained on (the same "
            "draw); MFU = ours x the ratio of the non-padding rates. MFU counts 6 FLOPs a weight a token plus attention (PaLM), no recomputation. "
            "`wall s`: the child's start (imports, data, model load) to its last step's log line. Peaks: the largest "
            "per-step CUDA peaks (torch's allocator), GiB."
        )
        body += [""] + [f"- {n}" for n in self.notes] + ([""] if self.notes else [])
        body += self.check_lines()
        body += ["### Memory on 4 GPUs (derived)", ""] + self.memory_table(nproc) + [""]
        failures = [r for r in self.rows.values() if r.run is not None and not r.run.ok]
        if failures:
            body += ["### Failures", ""]
            for r in failures:
                body += [f"{r.spec.label}: last lines", "", "```", _tail(r.run.log, 15), "```", ""]
        return "\n".join(head + body)

    def write(self, nproc: int, assets: Optional[Dict[str, Any]], final: bool = False) -> str:
        text = self.report(nproc, assets, final)
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "bench_gpu.md").write_text(text + "\n")
            data = {
                "info": self.info,
                "nproc": nproc,
                "args": {k: str(v) for k, v in vars(self.args).items() if k != "func"},
                "assets": {k: str(v) for k, v in (assets or {}).items()},
                "params": self.n_params,
                "rows": {
                    k: {
                        **{f: v for f, v in asdict(r).items() if f not in ("spec", "run")},
                        "label": r.spec.label,
                        "run": _run_summary(r.run) if r.run else None,
                    }
                    for k, r in self.rows.items()
                },
                "checks": self.checks,
                "notes": self.notes,
                "elapsed": self.elapsed(),
                "final": final,
            }
            (self.out / "bench_gpu.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        return text

    def _save_child(self, name: str, output: str, metrics: str = "") -> None:
        if not self.out:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        data = output.encode(errors="replace")
        if len(data) > TAIL_BYTES:
            output = f"[... {len(data) - TAIL_BYTES} bytes left out ...]\n" + data[-TAIL_BYTES:].decode(
                errors="replace"
            )
        with open(self.out / "children.log", "a") as f:
            f.write(f"\n===== {name} ({self.elapsed():.0f} s) =====\n{output}\n")
        if metrics:
            with open(self.out / "metrics.log", "a") as f:
                f.write(f"\n===== {name} =====\n{metrics}")


def _run_summary(run: Run) -> Dict[str, Any]:
    return {
        "rc": run.rc,
        "wall": run.wall,
        "total": run.total,
        "first_step_s": run.first_step_s,
        "steps": len(run.steps),
        "stopped": run.stopped,
        "losses": [s["loss"] for s in run.steps],
    }


def _median(steps: List[Dict[str, float]], key: str) -> Optional[float]:
    values = [s[key] for s in steps if key in s]
    return statistics.median(values) if values else None


def _max(steps: List[Dict[str, float]], key: str) -> Optional[float]:
    values = [s[key] for s in steps if key in s]
    return max(values) if values else None


def _fmt(value: Optional[float], digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1%}"


def _tail(text: str, n: int) -> str:
    return "\n".join(text.replace("\r", "\n").splitlines()[-n:])


def n_params(d: Dict[str, int]) -> int:
    dim, hidden, vocab = d["embed_dim"], d["intermediate_dim"], d["vocab_size"]
    kv_dim = dim // d["num_heads"] * d["num_kv_heads"]
    layer = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden + 2 * dim  # attention, MLP, two norms
    return 2 * vocab * dim + d["num_layers"] * layer + dim  # embeddings, output, layers, final norm


def count_gpus() -> Optional[int]:
    """GPUs this process may use, without importing torch: nvidia-smi's list (CUDA_VISIBLE_DEVICES respected)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def select_methods(text: str) -> List[str]:
    """Keys or labels, comma-separated (a label's own commas are matched whole: the longest match wins)."""
    if text.strip() in ("default", ""):
        return [s.key for s in SPECS if s.default]
    if text.strip() == "all":
        return [s.key for s in SPECS]
    names = {s.key: s.key for s in SPECS} | {s.label: s.key for s in SPECS}
    parts = [t.strip() for t in text.split(",")]
    keys, i = [], 0
    while i < len(parts):
        for j in range(len(parts), i, -1):
            key = names.get(", ".join(parts[i:j]))
            if key is not None:
                keys.append(key)
                i = j
                break
        else:
            raise argparse.ArgumentTypeError(f"unknown method {parts[i]!r}; keys: {', '.join(BY_KEY)}")
    return list(dict.fromkeys(keys))


def select_checks(text: str) -> List[str]:
    if text in ("none", ""):
        return []
    checks = [t.strip() for t in text.split(",")]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    return checks


# ---------------------------------------------------------------------------------------------
# The subcommand


def bench_gpu(args: argparse.Namespace) -> int:
    if args.methods is None:  # compiling on CPU works, but slowly: not by default there
        args.methods = [k for k in select_methods("default") if not (args.tiny and BY_KEY[k].compile)]
    if args.tiny:  # CPU defaults for what the user left unset
        args.steps = args.steps or 6
        args.skip = 2 if args.skip is None else args.skip
        args.batch_size = args.batch_size or 1
        args.resume_every = args.resume_every or 2
    else:
        args.steps = args.steps or 20
        args.skip = 5 if args.skip is None else args.skip
        args.batch_size = args.batch_size or 4
        args.resume_every = args.resume_every or 3
    bench = Bench(args)

    def on_sigterm(signum, frame):  # unwinds through the running child's kill
        raise SystemExit(f"[bench gpu] SIGTERM after {bench.elapsed():.0f} s; partial results in {bench.out}")

    signal.signal(signal.SIGTERM, on_sigterm)
    bench.workdir.mkdir(parents=True, exist_ok=True)
    bench.logs.mkdir(parents=True, exist_ok=True)
    if bench.out:
        bench.out.mkdir(parents=True, exist_ok=True)
        for name in ("children.log", "metrics.log"):
            (bench.out / name).unlink(missing_ok=True)
    bench.preflight()
    nproc = bench.nproc()
    assets = bench.assets(nproc)
    _say(
        f"{nproc} process(es); {args.steps} steps; methods {', '.join(args.methods)}; checks {', '.join(args.checks) or 'none'}"
        + (f"; budget {args.budget_s:.0f} s ({bench.remaining():.0f} s left)" if args.budget_s else "")
    )
    finished_first = False
    for phase in RUN_ORDER:
        if phase in CHECKS:
            if phase not in args.checks:
                continue
            why = bench.can_start(phase)
            if why:
                bench.checks[phase] = {"skipped": why}
                _say(f"{phase}: {why}")
            else:
                _say(f"{phase} check ...")
                bench.checks[phase] = (
                    bench.resume_check(assets, nproc) if phase == "resume" else bench.scoring_check(assets)
                )
        elif phase in args.methods:
            spec = BY_KEY[phase]
            why = bench.can_start(phase)
            row = Row(spec)
            bench.rows[phase] = row
            if why:
                row.skipped = why
                _say(f"{phase}: {why}")
            else:
                finish = spec.recipe == "ours" and not finished_first and not args.no_final
                row.run = bench.method(spec, assets, nproc, finish=finish)
                finished_first = finished_first or spec.recipe == "ours"
        else:
            continue
        bench.write(nproc, assets)
        print(bench.table(), file=sys.stderr, flush=True)  # the table so far
    text = bench.write(nproc, assets, final=True)
    print(text, flush=True)
    failed = [r for r in bench.rows.values() if r.run is not None and not r.run.ok]
    check_failed = [k for k, v in bench.checks.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed or check_failed else 0


def add_parser(sub) -> None:
    p = add_subcommand(
        sub,
        "gpu",
        "the production config on GPUs: variants vs torchtune's recipe, resume and scoring checks",
        __doc__,
        DEFAULT_WORKDIR,
        "checkpoint, data and runs (default {default}); "
        "needs ~6 GB, plus a step checkpoint (~33 GB) for the resume check",
    )
    p.add_argument("--tokenizer", type=Path, help="the LLaMA-2 tokenizer.model (default: as bench data)")
    p.add_argument("--out", type=Path, help="where the table, the numbers and every child's output go")
    p.add_argument("--nproc", type=positive, help="processes (GPUs) per run (default: every GPU; 2 with --tiny)")
    p.add_argument("--steps", type=positive, help="optimizer steps per run (default 20; 6 with --tiny)")
    p.add_argument("--skip", type=int, help="first steps left out of the medians (default 5; 2 with --tiny)")
    p.add_argument("--batch-size", type=positive, help="rows of 2048 tokens per process (default 4; 1 with --tiny)")
    p.add_argument(
        "--methods",
        type=select_methods,
        help=f"comma-separated keys or labels, or 'all' (default: all but stock-unpacked, and with --tiny "
        f"but ours-compile too); keys: {', '.join(BY_KEY)}",
    )
    p.add_argument(
        "--checks",
        type=select_checks,
        default=list(CHECKS),
        help="comma-separated: resume, scoring; or 'none' (default: both)",
    )
    p.add_argument(
        "--resume-every",
        type=positive,
        help="S of the resume check: save at S, compare S+1..2S (default 3; 2 with --tiny)",
    )
    p.add_argument("--budget-s", type=float, help="total seconds: later phases are skipped, a child over it stopped")
    p.add_argument(
        "--peak-tflops", type=float, help="per GPU, dense bf16, for MFU (default: the recipe's known values)"
    )
    p.add_argument(
        "--no-final",
        action="store_true",
        help="stop every run after its last step (default: the first of ours goes on to write and time "
        "checkpoint_final)",
    )
    p.add_argument("--tiny", action="store_true", help="the tiny model on CPU (gloo), fp32: the pipeline's test")
    p.set_defaults(func=bench_gpu)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
