"""python -m benchmarks gpu: the whole pipeline in --tiny CPU mode, and its table."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmarks.__main__ import main as bench_main
from benchmarks import gpu

pytestmark = pytest.mark.slow  # benchmarks: `python -m pytest -q -m slow`

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def table_rows(text: str) -> dict[str, list[str]]:
    """The main table's rows by label, as lists of cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | steps |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def number(cell: str) -> float:
    return float(cell.rstrip("*%").replace(",", ""))


def test_tiny_pipeline_on_cpu(tmp_path, capsys, llama_tokenizer_path):
    argv = ["gpu", "--tiny", "--workdir", str(tmp_path), "--methods", "eager,stock-packed", "--steps", "4"]
    assert bench_main(argv + ["--tokenizer", str(llama_tokenizer_path)]) == 0
    text = capsys.readouterr().out
    rows = table_rows(text)
    ours, stock = gpu.SPECS["eager"].label, gpu.SPECS["stock-packed"].label
    assert list(rows) == [ours, stock]
    for label, (_, steps, trained, nonpad, mfu, memory, compiled, vs) in rows.items():
        assert steps == "4" and number(trained) > 0 and number(nonpad) > number(trained), label
        assert mfu == "-" and memory == "- / -" and compiled == "- / -", label  # no MFU or CUDA peaks on CPU; eager
    assert rows[stock][3].endswith("*") and rows[stock][7] == "1.00"  # derived from ours, same layout
    assert number(rows[ours][7]) > 0
    assert re.search(r"bare bf16 matmul on this device, TFLOP/s: \[2048 x 128\] x \[128 x 352\] [\d.,]+;", text)
    # Every run's output is gone (checkpoint_final is 5.4 GB at full size); its log stays.
    assert not any((tmp_path / "runs").glob("*/")) and (tmp_path / "logs" / "stock-packed.log").is_file()
    numbers = json.loads((tmp_path / "gpu.json").read_text())
    assert [m["key"] for m in numbers["methods"]] == ["eager", "stock-packed"]
    assert round(numbers["methods"][0]["tokens_per_s"]) == number(rows[ours][2])
    assert not any(m["production"] for m in numbers["methods"]) and set(numbers["matmul_tflops"]) == {
        "2048x128x352",
        "2048x128x128",
    }


def test_stock_columns_are_derived_from_ours_on_the_same_layout():
    def row(key, trained, nonpad=None, mfu=None, alloc=None):
        return gpu.Row(gpu.SPECS[key], 3, trained, nonpad, mfu, alloc, None if alloc is None else alloc + 5)

    # Ours on the stock run's layout: 1.5 non-padding tokens per trained token, MFU 0.4 at 3000.
    rows = {
        "unpacked": row("unpacked", 2000.0, 3000.0, 0.4, 33.0)._replace(graph_breaks=0, recompiles=2),
        "eager": row("eager", 1000.0, 2000.0, 0.3),
        "stock": row("stock", 1600.0, alloc=20.0),
    }
    gpu.derive(rows)
    stock = rows["stock"]
    assert stock.derived and stock.nonpad == pytest.approx(2400.0) and stock.mfu == pytest.approx(0.4 * 2400 / 3000)
    table = gpu.table(dict(rows, production=None))
    assert (
        "| torchtune's recipe, bf16, AC on, unpacked, eager | 3 | 1,600 | 2,400* | 32.0%* | 20.0 / 25.0 | - / - | 1.00 |"
        in table
    )
    assert (
        "| ours, bf16_mixed, AC off, unpacked, compiled | 3 | 2,000 | 3,000 | 40.0% | 33.0 / 38.0 | 0 / 2 | 1.25 |"
        in table
    )
    assert "| ours, bf16_mixed, AC off, packed, eager | 3 | 1,000 | 2,000 | 30.0% | - / - | - / - | - |" in table
    assert "| ours, bf16_mixed, AC off, packed, compiled | FAILED |" in table
    entries = gpu.entries(dict(rows, production=None))
    assert entries[-1] == {
        "key": "production",
        "label": gpu.SPECS["production"].label,
        "production": True,
        "failed": True,
    }
    assert entries[0]["recompiles"] == 2 and entries[2]["derived"] and entries[2]["mfu"] == pytest.approx(0.32)


def test_medians_skip_the_first_quarter_and_peaks_take_every_step():
    steps = [
        {"step": 2.0 * (i + 1), "tokens_per_second_per_gpu": rate, "peak_memory_alloc": 10.0 + i}
        for i, rate in enumerate([1, 9, 9, 9])
    ]
    log = "... Graph break in user code at x.py:1\n... Recompiling function forward in y.py\n... Graph break in"
    row = gpu.summarize(gpu.SPECS["production"], steps, log)
    assert row.trained == 9 and row.alloc == 13.0 and row.nonpad is None and row.steps == 8
    assert (row.graph_breaks, row.recompiles) == (2, 1)
    assert gpu.summarize(gpu.SPECS["eager"], steps, log).graph_breaks is None  # nothing compiled


def test_the_production_method_is_the_shipped_config_and_the_others_vary_it():
    shipped = OmegaConf.load(PROJECT_ROOT / "configs" / "ref_tuning.yaml")
    production = gpu.SPECS["production"]
    assert production.overrides() == [
        f"precision={shipped.precision}",
        f"enable_activation_checkpointing={str(shipped.enable_activation_checkpointing).lower()}",
        f"dataset.packed={str(shipped.dataset.packed).lower()}",
        f"compile={str(shipped.compile).lower()}",
    ]
    ours = [spec for spec in gpu.SPECS.values() if spec.recipe == "ours" and spec != production]
    assert all(sum(a != b for a, b in zip(spec, production)) == 1 for spec in ours)  # one knob each
    assert {spec.recipe for spec in gpu.SPECS.values()} == {"ours", "stock"}
    assert "batch-6" not in gpu.DEFAULT_KEYS


def test_the_gpu_launcher_never_imports_torch():
    code = (
        "import sys\nfrom benchmarks.__main__ import main\n"
        "try:\n    main(['gpu', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, capture_output=True)
