"""python -m ref_tuning.bench convert on a tiny random source: five methods, positive numbers."""

import re

from ref_tuning import bench


def test_convert_bench_prints_a_table_of_the_five_methods(tmp_path, capsys):
    argv = ["convert", "--workdir", str(tmp_path), "--layers", "1", "--repeats", "1", "--tiny"]
    assert bench.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == [
        "cp -r", "dd oflag=direct", "ours hf-to-hf", "ours hf-to-tune", "torchtune FullModelHFCheckpointer"
    ]  # fmt: skip
    for row in rows:
        wall, runs, rss, ratio = (float(re.sub(r"\s.*", "", cell.strip())) for cell in row.split("|")[2:6])
        assert wall > 0 and runs == 1 and rss > 0 and ratio > 0, row
    # The source stays for reuse; the outputs are gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "source"]
