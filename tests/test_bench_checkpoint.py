"""python -m benchmarks checkpoint at a tiny size: a row per method, and the new checkpoint
loaded back into a freshly sharded model bit for bit (checked inside the worker, `--verify`)."""

import argparse
import json

import pytest

import benchmarks as bench
from benchmarks import checkpoint

pytestmark = pytest.mark.slow  # benchmarks: `python -m pytest -q -m slow`


def test_checkpoint_bench_prints_both_methods_and_the_new_checkpoint_loads_back(tmp_path, capsys):
    argv = ["checkpoint", "--workdir", str(tmp_path), "--num-layers", "1", "--repeats", "1", "--tiny", "--verify"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")][2:]
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == ["today", "new (defaults)", "new (crc32=false)"]
    for row in rows:
        wall, size, rate, vs_today, vs_dd = (float(cell) for cell in row.split("|")[2:7])
        assert wall > 0 and size > 0 and rate > 0 and vs_today > 0 and vs_dd > 0, row

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["params"] == checkpoint.n_params(1, tiny=True)
    sizes = {label: m["bytes"][0] for label, m in result["methods"].items()}
    state_bytes = 3 * 2 * result["params"]  # bf16 weights and AdamW's two moments
    assert all(state_bytes <= size < 1.2 * state_bytes for size in sizes.values()), sizes
    # Every tensor of the last row's checkpoint (model and optimizer) came back bit for bit, into a
    # model and optimizer whose own values differed before the load.
    verify = result["verify"]
    assert verify["mismatches"] == 0 and not verify["fresh_was_identical"] and verify["tensors_per_rank"] > 0
    assert "bit-identical" in out
    # The outputs are gone; the config the HF checkpointer reads and the logs stay.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_config", "logs", "result.json"]


def test_writer_options_parse_over_torch_defaults():
    assert checkpoint.parse_writer("defaults") == {}
    assert checkpoint.parse_writer("thread_count=4,crc32=false") == {"thread_count": 4, "crc32": False}
    assert checkpoint.writer_label({"thread_count": 4, "crc32": False}) == "new (thread_count=4, crc32=false)"
    assert checkpoint.writer_label({}) == "new (defaults)"
    for bad in ("threads=4", "sync_files=maybe", "thread_count"):
        with pytest.raises(argparse.ArgumentTypeError):
            checkpoint.parse_writer(bad)


def test_parameter_count_is_sheared_llama_2_7b():
    assert checkpoint.n_params(32) == 2_701_560_320
