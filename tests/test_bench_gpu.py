"""python -m benchmarks gpu: the whole pipeline in --tiny CPU mode, and its table."""

import subprocess
import sys
from pathlib import Path

import pytest

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
    argv = ["gpu", "--tiny", "--workdir", str(tmp_path), "--methods", "packed,stock-packed", "--steps", "4"]
    assert bench_main(argv + ["--tokenizer", str(llama_tokenizer_path)]) == 0
    rows = table_rows(capsys.readouterr().out)
    ours, stock = gpu.SPECS["packed"].label, gpu.SPECS["stock-packed"].label
    assert list(rows) == [ours, stock]
    for label, (_, steps, trained, nonpad, mfu, memory, vs) in rows.items():
        assert steps == "4" and number(trained) > 0 and number(nonpad) > number(trained), label
        assert mfu == "-" and memory == "- / -", label  # no MFU or CUDA peaks on CPU
    assert rows[stock][3].endswith("*") and rows[stock][6] == "1.00"  # derived from ours, same layout
    assert number(rows[ours][6]) > 0
    # Every run's output is gone (checkpoint_final is 5.4 GB at full size); its log stays.
    assert not any((tmp_path / "runs").glob("*/")) and (tmp_path / "logs" / "stock-packed.log").is_file()


def test_stock_columns_are_derived_from_ours_on_the_same_layout():
    def row(key, trained, nonpad=None, mfu=None, alloc=None):
        return gpu.Row(gpu.SPECS[key], 3, trained, nonpad, mfu, alloc, None if alloc is None else alloc + 5)

    # Ours on the stock run's layout: 1.5 non-padding tokens per trained token, MFU 0.4 at 3000.
    rows = {
        "bf16": row("bf16", 2000.0, 3000.0, 0.4, 33.0),
        "packed": row("packed", 1000.0, 2000.0, 0.3),
        "stock": row("stock", 1600.0, alloc=20.0),
    }
    gpu.derive(rows)
    stock = rows["stock"]
    assert stock.derived and stock.nonpad == pytest.approx(2400.0) and stock.mfu == pytest.approx(0.4 * 2400 / 3000)
    table = gpu.table(dict(rows, production=None))
    assert (
        "| torchtune's recipe, bf16, AC on, unpacked, eager | 3 | 1,600 | 2,400* | 32.0%* | 20.0 / 25.0 | 1.00 |"
        in table
    )
    assert "| ours, bf16, AC on, unpacked, eager | 3 | 2,000 | 3,000 | 40.0% | 33.0 / 38.0 | 1.25 |" in table
    assert "| ours, bf16_mixed, AC on, packed, compiled | 3 | 1,000 | 2,000 | 30.0% | - / - | - |" in table
    assert "| ours, bf16_mixed, AC on, unpacked, compiled | FAILED |" in table


def test_medians_skip_the_first_quarter_and_peaks_take_every_step():
    steps = [{"tokens_per_second_per_gpu": rate, "peak_memory_alloc": 10.0 + i} for i, rate in enumerate([1, 9, 9, 9])]
    row = gpu.summarize(gpu.SPECS["production"], steps)
    assert row.trained == 9 and row.alloc == 13.0 and row.nonpad is None and row.steps == 4


def test_every_method_is_a_variant_of_the_production_config():
    assert gpu.SPECS["production"].overrides() == [
        "precision=bf16_mixed",
        "enable_activation_checkpointing=true",
        "dataset.packed=false",
        "compile=true",
    ]
    assert {spec.recipe for spec in gpu.SPECS.values()} == {"ours", "stock"}


def test_the_gpu_launcher_never_imports_torch():
    code = (
        "import sys\nfrom benchmarks.__main__ import main\n"
        "try:\n    main(['gpu', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, capture_output=True)
