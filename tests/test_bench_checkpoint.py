"""python -m benchmarks checkpoint at a tiny size: a row per method, each writing the whole state."""

import json

import pytest

import benchmarks as bench
from benchmarks.__main__ import main as bench_main

pytestmark = pytest.mark.slow  # benchmarks: `python -m pytest -q -m slow`


def test_checkpoint_bench_prints_both_methods(tmp_path, capsys):
    assert bench_main(["checkpoint", "--workdir", str(tmp_path), "--tiny", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    assert [row.split("|")[1].strip() for row in rows] == ["torchtune", "ours"]
    for row in rows:
        wall, size, rate, vs_dd = (float(cell) for cell in row.split("|")[2:6])
        assert wall > 0 and size > 0 and rate > 0 and vs_dd > 0, row

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["params"] == bench.n_params(bench.TINY_DIMS)
    # Both write the whole state: bf16 weights and AdamW's two moments (and a little metadata).
    state_bytes = 3 * 2 * result["params"]
    assert all(state_bytes <= size < 1.1 * state_bytes for size in result["bytes"].values()), result["bytes"]
    # The outputs are emptied after each save; the source stays for reuse.
    assert not any((tmp_path / "out-ours").iterdir()) and not any((tmp_path / "out-torchtune").iterdir())
    assert (tmp_path / "source" / "config.json").is_file()


def test_parameter_count_is_sheared_llama_2_7b():
    assert bench.n_params(bench.FULL_DIMS) == 2_701_560_320
