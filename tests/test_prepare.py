"""python -m ref_tuning.prepare: raw CodeContests (parquet or JSONL) to the processed layout, with the
caches the dataset then uses as they are."""

import copy
import json
import re
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ref_tuning import prepare
from ref_tuning.data import codecontests_dataset, tokenize_sample
from ref_tuning.demo import read_problems
from ref_tuning.line_index import CACHE_FOLDER, SplitIndex
from ref_tuning.models import sheared_llama_tokenizer


@pytest.fixture(scope="module")
def problems():
    """The shipped demo problems, with a C++ solution added to each (to be skipped) and one very long
    Python solution (to be dropped by the length filter)."""
    rows = copy.deepcopy(read_problems("train")[:8])
    for row in rows:
        row["solutions"]["language"].insert(1, 2)
        row["solutions"]["solution"].insert(1, "int main() { return 0; }\n")
    rows[3]["incorrect_solutions"]["language"].append(3)
    rows[3]["incorrect_solutions"]["solution"].append("print(1)\n" * 800)
    return rows


def write_jsonl(rows, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(rows, path: Path) -> Path:
    """As the public copy stores them: solutions as a struct of two lists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    return path


def run(capsys, *args):
    capsys.readouterr()
    rc = prepare.main([str(a) for a in args] + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_parquet_and_jsonl_inputs_give_the_same_files(problems, tmp_path, demo_tokenizer_path, capsys):
    write_parquet(problems[:5], tmp_path / "raw_pq" / "data" / "train-00000-of-00002.parquet")
    write_parquet(problems[5:], tmp_path / "raw_pq" / "data" / "train-00001-of-00002.parquet")
    write_jsonl(problems, tmp_path / "raw_jsonl" / "train.jsonl")
    for name in ("raw_pq", "raw_jsonl"):
        rc, out, err = run(
            capsys,
            tmp_path / name,
            tmp_path / f"out_{name}",
            "--tokenizer",
            demo_tokenizer_path,
            "--splits",
            "train",
            "--max-seq-len",
            "1024",
            "--workers",
            "1",
        )
        assert rc == 0, err
    for f in ("train.jsonl", "train_metadata.json"):
        assert (tmp_path / "out_raw_pq" / f).read_bytes() == (tmp_path / "out_raw_jsonl" / f).read_bytes()
    assert (
        "8 problems, 57 solutions; kept 32 correct and 16 incorrect; skipped 8 in other languages and 1 longer "
        "than 1024 tokens" in out
    )


def test_records_languages_and_the_length_filter(problems, tmp_path, demo_tokenizer_path, capsys):
    write_jsonl(problems, tmp_path / "raw" / "train.jsonl")
    out = tmp_path / "out"
    rc, _, err = run(
        capsys,
        tmp_path / "raw",
        out,
        "--tokenizer",
        demo_tokenizer_path,
        "--splits",
        "train",
        "--max-seq-len",
        "1024",
        "--workers",
        "1",
    )
    assert rc == 0, err
    tokenizer = sheared_llama_tokenizer(str(demo_tokenizer_path))
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    # Expected: every Python solution whose whole templated sample fits, computed here from the raw rows.
    expected = []
    for row in problems:
        for kind, key in (("correct", "solutions"), ("incorrect", "incorrect_solutions")):
            for i, (language, source) in enumerate(zip(row[key]["language"], row[key]["solution"])):
                record = {
                    "instruction": row["description"],
                    "input": "",
                    "output": source,
                    "task_id": f"{row['name']}_{kind}_{i}",
                    "is_correct": kind == "correct",
                }
                if language in (1, 3) and len(tokenize_sample(tokenizer, record)[0]) <= 1024:
                    expected.append(record)
    assert [{k: r[k] for k in expected[0]} for r in lines] == expected
    difficulty = {row["name"]: row["difficulty"] for row in problems}
    assert [r["metadata"]["difficulty"] for r in lines] == [difficulty[r["task_id"].rsplit("_", 2)[0]] for r in lines]

    meta = json.loads((out / "train_metadata.json").read_text())
    assert [e["is_correct"] for e in meta["metadata"]] == [r["is_correct"] for r in lines]
    assert [e["problem_id"] for e in meta["metadata"]] == [r["task_id"].rsplit("_", 2)[0] for r in lines]
    for pid, info in meta["problem_index_map"].items():
        for kind in ("correct", "incorrect"):
            indices = info[f"{kind}_indices"]
            assert all(lines[i]["task_id"].startswith(f"{pid}_{kind}_") for i in indices)
            assert len(info[f"{kind}_token_lengths"]) == len(indices)
    assert meta["stats"]["dropped_longer_than_max_seq_len"] == 1 and meta["stats"]["total"] == len(lines)


def test_the_dataset_uses_the_caches_as_written(problems, tmp_path, demo_tokenizer_path, capsys, monkeypatch):
    write_jsonl(problems, tmp_path / "raw" / "train.jsonl")
    out = tmp_path / "out"
    assert (
        run(capsys, tmp_path / "raw", out, "--tokenizer", demo_tokenizer_path, "--splits", "train", "--workers", "1")[0]
        == 0
    )
    assert sorted(p.name for p in (out / CACHE_FOLDER).iterdir())[0] == "train.index.pt"

    def untouched(*args):
        raise AssertionError("the cache written by prepare was not used")

    monkeypatch.setattr(SplitIndex, "_build", staticmethod(untouched))
    monkeypatch.setattr(SplitIndex, "read_line", untouched)
    tokenizer = sheared_llama_tokenizer(str(demo_tokenizer_path))
    ds = codecontests_dataset(tokenizer, str(out), n_samples=30, correct_ratio=0.5, max_per_problem=3)
    # ... and what it cached is right: the lengths of the samples as the dataset tokenizes them.
    assert [len(ds[i]["tokens"]) for i in range(len(ds))] == ds.lengths.tolist()


def test_output_does_not_depend_on_the_number_of_workers(problems, tmp_path, demo_tokenizer_path, capsys):
    write_jsonl(problems * 3, tmp_path / "raw" / "train.jsonl")
    for workers in (1, 2):
        rc, _, err = run(
            capsys,
            tmp_path / "raw",
            tmp_path / f"out{workers}",
            "--tokenizer",
            demo_tokenizer_path,
            "--splits",
            "train",
            "--workers",
            workers,
        )
        assert rc == 0, err
    for f in ("train.jsonl", "train_metadata.json"):
        assert (tmp_path / "out1" / f).read_bytes() == (tmp_path / "out2" / f).read_bytes()


def test_validation_split_files_are_found_under_either_name(problems, tmp_path, demo_tokenizer_path, capsys):
    write_parquet(problems[:2], tmp_path / "raw" / "validation-00000-of-00001.parquet")
    rc, out, err = run(
        capsys,
        tmp_path / "raw",
        tmp_path / "out",
        "--tokenizer",
        demo_tokenizer_path,
        "--splits",
        "valid",
        "--workers",
        "1",
    )
    assert rc == 0, err
    assert (tmp_path / "out" / "valid.jsonl").is_file() and out.startswith("valid: 2 problems")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda rows: rows[2].pop("description"), r"train\.jsonl:3: field 'description' must be a str, found None"),
        (lambda rows: rows[1].update(difficulty="7"), r"train\.jsonl:2: field 'difficulty' must be a int"),
        (lambda rows: rows[4]["solutions"]["language"].pop(), r"train\.jsonl:5: field 'solutions' must be"),
        (lambda rows: rows.insert(3, [1, 2]), r"train\.jsonl:4: expected an object \(one problem\), found list"),
    ],
)
def test_bad_rows_are_named_and_nothing_is_replaced(problems, tmp_path, demo_tokenizer_path, capsys, damage, message):
    raw = write_jsonl(problems, tmp_path / "raw" / "train.jsonl")
    out = tmp_path / "out"
    assert (
        run(capsys, raw.parent, out, "--tokenizer", demo_tokenizer_path, "--splits", "train", "--workers", "1")[0] == 0
    )
    before = (out / "train.jsonl").read_bytes()
    rows = copy.deepcopy(problems)
    damage(rows)
    write_jsonl(rows, raw)
    rc, _, err = run(
        capsys,
        raw.parent,
        out,
        "--tokenizer",
        demo_tokenizer_path,
        "--splits",
        "train",
        "--workers",
        "1",
        "--overwrite",
    )
    assert rc == 2 and err.startswith("error: ")
    assert re.search(message, err), err
    assert (out / "train.jsonl").read_bytes() == before  # the earlier output is intact
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != CACHE_FOLDER) == []


def test_unusable_arguments_are_clear_errors(problems, tmp_path, demo_tokenizer_path, capsys):
    raw = write_jsonl(problems, tmp_path / "raw" / "train.jsonl")
    rc, _, err = run(capsys, raw.parent, tmp_path / "out", "--tokenizer", demo_tokenizer_path, "--splits", "test")
    assert rc == 2 and "no raw files for split 'test'" in err
    rc, _, err = run(capsys, raw.parent, tmp_path / "out", "--tokenizer", tmp_path / "nope.model")
    assert rc == 2 and "nope.model: tokenizer not found" in err
    raw.write_text('{"name": "x", \n')
    rc, _, err = run(
        capsys, raw.parent, tmp_path / "out", "--tokenizer", demo_tokenizer_path, "--splits", "train", "--workers", "1"
    )
    assert rc == 2 and "train.jsonl:1: not a valid JSON line" in err
    write_jsonl(problems, raw)
    assert (
        run(
            capsys,
            raw.parent,
            tmp_path / "out",
            "--tokenizer",
            demo_tokenizer_path,
            "--splits",
            "train",
            "--workers",
            "1",
        )[0]
        == 0
    )
    rc, _, err = run(capsys, raw.parent, tmp_path / "out", "--tokenizer", demo_tokenizer_path, "--splits", "train")
    assert rc == 2 and "train.jsonl: already exists; pass --overwrite" in err


def test_an_output_folder_that_is_the_raw_folder_is_refused(problems, tmp_path, demo_tokenizer_path, capsys):
    raw = write_jsonl(problems, tmp_path / "raw" / "train.jsonl")
    before = raw.read_bytes()
    rc, _, err = run(
        capsys,
        raw.parent,
        raw.parent,
        "--tokenizer",
        demo_tokenizer_path,
        "--splits",
        "train",
        "--workers",
        "1",
        "--overwrite",
    )
    assert rc == 2 and "lies inside the input" in err and "writing it would destroy the input" in err, err
    assert raw.read_bytes() == before and sorted(p.name for p in raw.parent.iterdir()) == ["train.jsonl"]


def test_a_problem_without_solutions_field_or_nothing_kept_is_an_error(problems, tmp_path, demo_tokenizer_path, capsys):
    rows = copy.deepcopy(problems)
    del rows[2]["solutions"]
    raw = write_jsonl(rows, tmp_path / "raw" / "train.jsonl")
    out = tmp_path / "out"
    rc, _, err = run(capsys, raw.parent, out, "--tokenizer", demo_tokenizer_path, "--splits", "train", "--workers", "1")
    assert rc == 2 and "train.jsonl:3: field 'solutions' is missing" in err, err
    write_jsonl(problems, raw)
    with pytest.raises(SystemExit):  # argparse: "--max-seq-len: expected a positive integer, got 0"
        run(capsys, raw.parent, out, "--tokenizer", demo_tokenizer_path, "--max-seq-len", "0")
    rc, _, err = run(
        capsys,
        raw.parent,
        out,
        "--tokenizer",
        demo_tokenizer_path,
        "--splits",
        "train",
        "--workers",
        "1",
        "--max-seq-len",
        "8",
    )
    assert rc == 2 and "no solution kept" in err and "longer than --max-seq-len=8); nothing written" in err, err
    assert not out.exists() or not any(out.glob("train*"))


def test_a_worker_that_cannot_start_fails_the_split_once(problems, tmp_path):
    """A Pool restarts a worker whose initializer fails, forever: the failure must reach the caller once."""
    write_jsonl(problems, tmp_path / "raw" / "train.jsonl")
    (tmp_path / "empty.model").write_bytes(b"")
    outcome = []

    def prepare_with_two_workers():
        try:
            prepare.prepare_split(
                [tmp_path / "raw" / "train.jsonl"],
                tmp_path / "out",
                "train",
                tmp_path / "empty.model",
                workers=2,
                progress=False,
            )
        except Exception as e:
            outcome.append(e)

    worker = threading.Thread(target=prepare_with_two_workers, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "still running after 120 s: the pool restarts its failing workers"
    assert len(outcome) == 1 and "empty.model" in str(outcome[0]) and "an empty file" in str(outcome[0])
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder
