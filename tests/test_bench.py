"""python -m benchmarks convert on a tiny random source; bench train's step timing and its table; the launchers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks as bench
from benchmarks.__main__ import main as bench_main
from benchmarks import train

pytestmark = pytest.mark.slow  # benchmarks: `python -m pytest -q -m slow`

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def table_rows(text: str) -> list[list[str]]:
    """The cells of the first markdown table's rows (after its header and rule)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:] if not line.startswith("| ---")]


def test_convert_bench_prints_a_table_of_every_method(tmp_path, capsys):
    assert bench_main(["convert", "--workdir", str(tmp_path), "--tiny", "--repeats", "1"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [row[0] for row in rows] == [
        "cp -r",
        "dd oflag=direct",
        "ours hf-to-hf",
        "ours hf-to-hf --safetensors",
        "ours hf-to-tune",
        "torchtune FullModelHFCheckpointer",
        "transformers save_pretrained",
    ]
    for row in rows:
        wall, runs, rss, ratio = (float(re.sub(r"\s.*", "", cell)) for cell in row[1:5])
        assert wall > 0 and runs == 1 and rss > 0 and ratio > 0, row
    # The source stays for reuse; the outputs are gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "source"]


def test_the_random_source_is_written_once_and_reused(tmp_path):
    source = tmp_path / "source"
    bench.make_checkpoint(source, bench.TINY_DIMS, "bfloat16")
    stamp = (source / "config.json").stat().st_mtime_ns
    bench.make_checkpoint(source, bench.TINY_DIMS, "bfloat16")
    assert (source / "config.json").stat().st_mtime_ns == stamp
    bench.make_checkpoint(source, bench.TINY_DIMS, "float32")  # another dtype: written again
    assert '"torch_dtype": "float32"' in (source / "config.json").read_text()


def test_train_bench_times_steps_from_the_logged_wall_clock(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    # 3 steps, 2 processes: steps 2 and 3 took 2 s and 1 s and trained 2*100*2 = 400 and 2*300*1 = 600 tokens.
    (logs / "log_1.txt").write_text(
        "Step 1 | loss:7.0 tokens_per_second_per_gpu:50.0 wall:1000.0 \n"
        "Step 2 | loss:6.0 tokens_per_second_per_gpu:100.0 wall:1002.0 grad_norm:tensor(0.9123) \n"
        "Step 2 | val_loss:6.5 wall:1002.5 \n"  # validation lines carry no training loss
        "Step 3 | loss:5.0 tokens_per_second_per_gpu:300.0 wall:1003.0 \n"
    )
    steps = bench.metric_steps(tmp_path)
    assert [s["step"] for s in steps] == [1, 2, 3] and "grad_norm" not in steps[1]
    assert train.trained_rate(steps, nproc=2) == (400 + 600) / 3.0 / 2


def test_train_bench_prints_the_four_methods(tmp_path, capsys, llama_tokenizer_path):
    argv = ["train", "--workdir", str(tmp_path), "--n-samples", "12", "--repeats", "1"]
    assert bench_main(argv + ["--tokenizer", str(llama_tokenizer_path)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [row[0] for row in rows] == ["stock", "ours", "stock-packed", "ours-packed"]
    assert all(float(row[2]) > 0 and float(row[3]) > float(row[2]) for row in rows), rows
    assert rows[0][4] == rows[2][4] == "1.00"


def test_no_launcher_imports_torch_and_every_subcommand_has_help():
    code = (
        "import sys\nfrom benchmarks.__main__ import main\n"
        "for name in ('convert', 'data', 'train', 'checkpoint', 'precision', 'gpu'):\n"
        "    try:\n"
        "        main([name, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, name\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.count("usage: python -m benchmarks ") == 6


def test_methods_are_checked_against_each_benchmarks_own(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_main(["convert", "--workdir", str(tmp_path), "--methods", "cp,fast"])
    assert "'cp,fast': expected some of cp, dd, ours" in capsys.readouterr().err
