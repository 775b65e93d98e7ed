"""python -m benchmarks convert on a tiny random source; bench train's step timing."""

import re

import pytest

import benchmarks as bench

pytestmark = pytest.mark.slow  # benchmarks: `python -m pytest -q -m slow`


def test_convert_bench_prints_a_table_of_the_five_methods(tmp_path, capsys):
    argv = ["convert", "--workdir", str(tmp_path), "--layers", "1", "--repeats", "1", "--tiny"]
    assert bench.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == [
        "cp -r",
        "dd oflag=direct",
        "ours hf-to-hf",
        "ours hf-to-tune",
        "torchtune FullModelHFCheckpointer",
    ]
    for row in rows:
        wall, runs, rss, ratio = (float(re.sub(r"\s.*", "", cell.strip())) for cell in row.split("|")[2:6])
        assert wall > 0 and runs == 1 and rss > 0 and ratio > 0, row
    # The source stays for reuse; the outputs are gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "source"]


def test_train_bench_times_steps_from_the_logged_wall_clock(tmp_path):
    from benchmarks import train

    logs = tmp_path / "logs"
    logs.mkdir()
    # 3 steps, 2 processes: steps 2 and 3 took 2 s and 1 s and trained 2*100*2 = 400 and 2*300*1 = 600 tokens.
    (logs / "log_1.txt").write_text(
        "Step 1 | loss:7.0 tokens_per_second_per_gpu:50.0 wall:1000.0 \n"
        "Step 2 | loss:6.0 tokens_per_second_per_gpu:100.0 wall:1002.0 \n"
        "Step 2 | val_loss:6.5 wall:1002.5 \n"
        "Step 3 | loss:5.0 tokens_per_second_per_gpu:300.0 wall:1003.0 \n"
    )
    rate, steps = train.trained_tokens_per_second(tmp_path, nproc=2)
    assert steps == 3 and rate == (400 + 600) / 3.0 / 2


@pytest.mark.slow
def test_train_bench_prints_the_four_methods(tmp_path, capsys, llama_tokenizer_path):
    argv = [
        "train",
        "--workdir",
        str(tmp_path),
        "--n-samples",
        "12",
        "--repeats",
        "1",
        "--tokenizer",
        str(llama_tokenizer_path),
    ]
    assert bench.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    assert [row.split("|")[1].strip() for row in rows] == [
        "stock, unpacked",
        "ours, unpacked",
        "stock, packed",
        "ours, packed",
    ]
    assert all(float(row.split("|")[3]) > 0 for row in rows)
