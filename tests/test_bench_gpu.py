"""python -m benchmarks gpu: the whole pipeline in --tiny CPU mode, and its parts."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks as bench
from benchmarks import gpu

pytestmark = pytest.mark.slow  # benchmarks: `python -m pytest -q -m slow`

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def table_rows(text: str):
    """The main table's rows (after its header and rule), as lists of cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | steps |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    return float(cell.rstrip("*%").replace(",", ""))


def test_tiny_pipeline_on_cpu(tmp_path, llama_tokenizer_path):
    out = tmp_path / "out"
    argv = [
        "gpu",
        "--tiny",
        "--tokenizer",
        str(llama_tokenizer_path),
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--methods",
        "ours-packed,stock",
        "--steps",
        "4",
        "--skip",
        "1",
        "--resume-every",
        "2",
        "--budget-s",
        "3000",
    ]
    assert bench.main(argv) == 0
    text = (out / "bench_gpu.md").read_text()
    rows = {row[0]: row for row in table_rows(text)}
    assert list(rows) == ["ours, bf16_mixed, AC on, packed", "stock, bf16, AC on, packed"]
    for label, row in rows.items():
        steps, trained, nonpad, mfu, alloc, reserved, wall, vs = row[1:]
        assert steps == "4", row
        assert number(trained) > 0 and number(nonpad) > number(trained) and number(wall) > 0, row
        assert mfu == alloc == reserved == "-", row  # no MFU or CUDA peaks on CPU
    assert rows["stock, bf16, AC on, packed"][3].endswith("*")  # derived from ours, same layout
    assert rows["stock, bf16, AC on, packed"][8] == "1.00" and number(rows["ours, bf16_mixed, AC on, packed"][8]) > 0

    data = json.loads((out / "bench_gpu.json").read_text())
    assert data["final"] and data["nproc"] == 2
    resume = data["checks"]["resume"]
    assert resume["compared_steps"] == [3, 4] and resume["resumed_from_step"] == 2
    assert resume["max_abs_loss_diff"] == 0.0  # exact on CPU
    assert resume["checkpoint_seconds"] > 0 and "max |loss difference| over steps 3..4: 0" in text
    scoring = data["checks"]["scoring"]
    assert "error" not in scoring and scoring["samples"] > 0 and scoring["tokens"] > 0
    assert scoring["fp32_ours_vs_transformers"]["max"] < 1e-4
    assert scoring["bf16_ours_vs_transformers"]["max"] < 0.1
    assert data["checks"]["final_checkpoint"]["seconds"] >= 0  # the first of ours ran to its end
    # Every child's output and every run's metric lines came back, in a few files.
    assert sorted(p.name for p in out.iterdir()) == ["bench_gpu.json", "bench_gpu.md", "children.log", "metrics.log"]
    children = (out / "children.log").read_text()
    for name in ("preflight", "checkpoint", "scoring", "ours-packed", "stock", "resume-a", "resume-b"):
        assert f"===== {name} (" in children
    assert re.search(r"Step 4 \| loss:", (out / "metrics.log").read_text())


def test_metric_lines_are_parsed_from_both_recipes():
    text = (
        "Step 1 | loss:10.5 lr:2e-05 tokens:900.0 tokens_per_second_per_gpu:100.0 all_tokens_per_second_per_gpu:250.0 "
        "mfu:0.41 peak_memory_active:30.1 peak_memory_alloc:30.5 peak_memory_reserved:33.0 \n"
        "Step 1 | val_loss:10.1 \n"  # validation lines carry no training loss
        "Step 2 | loss:10.25 lr:2e-05 tokens_per_second_per_gpu:120.5 peak_memory_alloc:31.0 "
        "grad_norm:tensor(0.9123, device='cuda:0') \n"  # the stock recipe logs its grad norm as a tensor
    )
    steps = gpu.parse_metric_lines(text)
    assert [s["step"] for s in steps] == [1, 2]
    assert steps[0]["mfu"] == 0.41 and steps[0]["peak_memory_reserved"] == 33.0
    assert steps[1]["tokens_per_second_per_gpu"] == 120.5 and "grad_norm" not in steps[1]


def test_method_selection_and_checks():
    assert gpu.select_methods("default") == [
        "ours-unpacked",
        "ours-packed",
        "ours-noac",
        "ours-compile",
        "ours-bf16",
        "stock",
    ]
    assert gpu.select_methods("all")[-1] == "stock-unpacked"
    assert gpu.select_methods("stock,ours-noac") == ["stock", "ours-noac"]
    # Labels hold commas of their own: matched whole, mixed with keys.
    assert gpu.select_methods("ours, bf16, AC on, packed,stock, ours-packed") == ["ours-bf16", "stock", "ours-packed"]
    assert gpu.select_methods("stock, bf16, AC on, unpacked") == ["stock-unpacked"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown method 'fast'"):
        gpu.select_methods("ours-packed,fast")
    assert gpu.select_checks("none") == [] and gpu.select_checks("scoring") == ["scoring"]
    with pytest.raises(argparse.ArgumentTypeError):
        gpu.select_checks("resume,speed")


def test_param_count_and_memory_estimate(tmp_path):
    assert gpu.n_params(gpu.FULL_DIMS) == 2_701_560_320  # Sheared-LLaMA-2.7B
    args = argparse.Namespace(tiny=False, workdir=tmp_path, out=None, budget_s=None, skip=0)
    b = gpu.Bench(args)
    row = gpu.Row(gpu.BY_KEY["ours-packed"], run=gpu.Run("ours-packed", rc=0, wall=1.0, total=1.0))
    row.run.steps = [
        {
            "step": 1.0,
            "loss": 1.0,
            "tokens_per_second_per_gpu": 10.0,
            "peak_memory_alloc": 70.0,
            "peak_memory_reserved": 72.0,
        }
    ]
    b.rows["ours-packed"] = row
    b.summarize()
    lines = b.memory_table(nproc=1)
    saved = 16 * 2_701_560_320 * 3 / 4 / 2**30  # 30.19 GiB of state sharded away on 4 GPUs
    expected = f"| 70.00 / 72.00 | {saved:.2f} | {70 - saved:.2f} / {72 - saved:.2f} |"
    assert any(expected in line for line in lines), lines
    assert "Derived, not measured" in lines[0] and "peak_1gpu - 16 B x params x 3/4" in lines[0]
    # 72 - 30.19 = 41.8 GiB reserved: fits a card reporting 79.2 GiB, not one of 39.5 (1.5 GiB kept aside).
    assert lines[-1].endswith("| no (3.8 GiB short) | yes (35.9 GiB spare) |"), lines[-1]


def test_stock_columns_are_derived_from_ours_on_the_same_layout(tmp_path):
    args = argparse.Namespace(tiny=False, workdir=tmp_path, out=None, budget_s=None, skip=1)
    b = gpu.Bench(args)

    def run(key, steps):
        b.rows[key] = gpu.Row(gpu.BY_KEY[key], run=gpu.Run(key, rc=0, wall=9.0, total=9.0, steps=steps))

    # Ours, same layout as the stock run (bf16, AC, packed): 1.5 non-padding tokens per trained token, MFU 0.4 at 3000.
    run(
        "ours-bf16",
        [
            {
                "step": s,
                "loss": 1.0,
                "tokens_per_second_per_gpu": 2000.0,
                "all_tokens_per_second_per_gpu": 3000.0,
                "mfu": 0.4,
                "peak_memory_alloc": 30.0 + s,
                "peak_memory_reserved": 40.0,
            }
            for s in (1, 2, 3)
        ],
    )
    run(
        "ours-packed",
        [
            {
                "step": s,
                "loss": 1.0,
                "tokens_per_second_per_gpu": 1000.0,
                "all_tokens_per_second_per_gpu": 2000.0,
                "mfu": 0.3,
            }
            for s in (1, 2, 3)
        ],
    )
    run(
        "stock",
        [
            {
                "step": s,
                "loss": 1.0,
                "tokens_per_second_per_gpu": 1600.0,
                "peak_memory_alloc": 20.0,
                "peak_memory_reserved": 25.0,
            }
            for s in (1, 2, 3)
        ],
    )
    b.summarize()
    stock = b.rows["stock"]
    assert b.peer_of == {"stock": "ours-bf16"} and stock.derived
    assert stock.nonpad == pytest.approx(2400.0) and stock.mfu == pytest.approx(0.4 * 2400 / 3000)
    assert b.rows["ours-bf16"].vs_stock == pytest.approx(2000 / 1600) and stock.vs_stock == 1.0
    assert b.rows["ours-bf16"].peak_alloc == 33.0  # the largest peak over all steps, warm-up included
    table = b.table()
    assert "| stock, bf16, AC on, packed | 3 | 1,600 | 2,400* | 32.0%* | 20.00 | 25.00 | 9.0 | 1.00 |" in table
    assert "| ours, bf16, AC on, packed | 3 | 2,000 | 3,000 | 40.0% | 33.00 | 40.00 | 9.0 | 1.25 |" in table


def test_a_short_budget_skips_phases(tmp_path):
    args = argparse.Namespace(tiny=True, workdir=tmp_path, out=None, budget_s=1.0, skip=0)
    b = gpu.Bench(args)
    b.start -= 5  # five seconds in: the budget is spent
    assert b.can_start("ours-packed").startswith("skipped: ")
    args.budget_s = None
    assert b.can_start("ours-packed") is None


def test_the_gpu_launcher_never_imports_torch():
    code = (
        "import sys; from benchmarks import gpu; "
        "gpu.add_parser(__import__('argparse').ArgumentParser().add_subparsers()); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True)
