"""The CodeContests dataset: the template against the real LLaMA tokenizer, indexed sampling with
difficulty bins and a per-problem cap, the caches, long samples, ranks, and every kind of bad input."""

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import sentencepiece as spm
import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from ref_tuning import line_index as index_module
from ref_tuning.data import (
    CodeContestsDataset,
    DataError,
    codecontests_dataset,
    parse_record,
    split_files,
    token_counts,
    tokenize_sample,
)
from ref_tuning.line_index import CACHE_FOLDER, SplitIndex
from ref_tuning.models import sheared_llama_tokenizer
from ref_tuning.prepare import SplitWriter

RECORD = {
    "instruction": "Given two integers a and b, print a + b.",
    "input": "",
    "output": "a, b = map(int, input().split())\nprint(a + b)\n",
    "task_id": "1_A. Sum_correct_0",
    "is_correct": True,
}
# The templates written out by hand (shared/docs/DATA_FORMAT.md), not taken from the code under test.
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGiven two integers a and b, print a + b.\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGiven two integers a and b, print a + b.\n\n### Input:\nInput: 1 2\nOutput: 3\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def llama(llama_tokenizer_path):
    return sheared_llama_tokenizer(str(llama_tokenizer_path))


@pytest.fixture(scope="module")
def sp(llama_tokenizer_path):
    return spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))


@pytest.fixture(scope="module")
def tok(demo_tokenizer_path):
    return sheared_llama_tokenizer(str(demo_tokenizer_path))


@pytest.mark.parametrize("record_input, prompt", [("", PROMPT), ("Input: 1 2\nOutput: 3", PROMPT_WITH_INPUT)])
def test_exact_tokens_and_labels(llama, sp, record_input, prompt):
    tokens, labels = tokenize_sample(llama, dict(RECORD, input=record_input))
    # Reference: SentencePiece itself on the whole text, BOS first, EOS last (ids 1 and 2).
    assert tokens == [1] + sp.encode(prompt + RECORD["output"]) + [2]
    n_prompt = 1 + len(sp.encode(prompt))
    assert labels[:n_prompt] == [CROSS_ENTROPY_IGNORE_IDX] * n_prompt
    assert labels[n_prompt:] == tokens[n_prompt:]
    assert sp.decode(labels[n_prompt:-1]) == RECORD["output"]
    assert labels[-1] == 2  # the model learns to stop


# ---------------------------------------------------------------------------------------------
# Splits written the way the earlier pipeline wrote them


def make_rows(n_problems: int, per_problem: int, seed: int = 0) -> List[Dict]:
    """Solutions of `n_problems` problems: difficulty 1..20 by problem, about half correct, outputs
    of varied length (solution j of a problem prints j + 1 values)."""
    rng = random.Random(seed)
    rows = []
    for p in range(n_problems):
        for j in range(per_problem):
            output = "".join(f"print({k})\n" for k in range(rng.randint(1, 12)))
            rows.append(
                {
                    "problem": f"{p}_A. Problem {p}",
                    "difficulty": 1 + p % 20,
                    "correct": rng.random() < 0.5,
                    "output": output,
                }
            )
    return rows


def write_split(
    data_dir: Path, rows: List[Dict], split: str = "train", form: str = "v2", metadata_name: Optional[str] = None
) -> Path:
    """`{split}.jsonl` and its metadata, v2 as the project writes it or v1 (without problem ids and map)."""
    with SplitWriter(data_dir, split) as writer:
        for i, row in enumerate(rows):
            kind = "correct" if row["correct"] else "incorrect"
            record = dict(
                RECORD,
                instruction=f"Solve problem {row['problem']}.",
                output=row["output"],
                task_id=f"{row['problem']}_{kind}_{i}",
                is_correct=row["correct"],
                metadata={"source": "code_contests", "difficulty": row["difficulty"], "has_tests": True},
            )
            writer.add(record, row["problem"])
    if form == "v1":
        edit_metadata(data_dir, _as_v1, split)
    if metadata_name:
        (data_dir / f"{split}_metadata.json").rename(data_dir / metadata_name)
    return data_dir


def _as_v1(meta: Dict) -> None:
    del meta["problem_index_map"]
    for entry in meta["metadata"]:
        del entry["problem_id"]


def edit_metadata(data_dir: Path, edit, split: str = "train") -> None:
    path = data_dir / f"{split}_metadata.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def drawn_rows(ds: CodeContestsDataset, rows: List[Dict]) -> List[Dict]:
    return [rows[i] for i in ds.lines.tolist()]


@pytest.fixture()
def data(tmp_path) -> Path:
    return write_split(tmp_path / "data", make_rows(30, 6))


# ---------------------------------------------------------------------------------------------
# Sampling


def test_correct_ratio_one_gives_only_correct_samples(tok, data):
    ds = codecontests_dataset(tok, str(data), n_samples=40, correct_ratio=1.0, seed=3)
    assert len(ds) == 40 and all("_correct_" in t for t in ds.task_ids)
    mixed = codecontests_dataset(tok, str(data), n_samples=40, correct_ratio=0.3, seed=3)
    assert sum("_incorrect_" in t for t in mixed.task_ids) == 28


def test_same_seed_same_draw_and_both_metadata_forms_agree(tok, tmp_path):
    rows = make_rows(30, 6)
    v1, v2 = write_split(tmp_path / "v1", rows, form="v1"), write_split(tmp_path / "v2", rows, form="v2")
    for cap in (None, 1):  # v1 has no problem ids: they come from each line's task_id
        a = codecontests_dataset(tok, str(v1), n_samples=25, seed=7, max_per_problem=cap, correct_ratio=0.5)
        b = codecontests_dataset(tok, str(v2), n_samples=25, seed=7, max_per_problem=cap, correct_ratio=0.5)
        assert a.lines.tolist() == b.lines.tolist() and [s["tokens"] for s in a] == [s["tokens"] for s in b]
    c = codecontests_dataset(tok, str(v2), n_samples=25, seed=8)
    assert a.lines.tolist() != c.lines.tolist()
    assert a.lines.tolist() == sorted(a.lines.tolist())


def test_difficulty_bins_and_weights_are_applied(tok, data):
    rows = make_rows(30, 6)
    bins = {"easy": [1, 7], "hard": [8, 20]}
    ds = codecontests_dataset(
        tok,
        str(data),
        n_samples=40,
        correct_ratio=0.5,
        seed=1,
        difficulty_bins=bins,
        difficulty_weights={"easy": 3, "hard": 1},
    )
    drawn = drawn_rows(ds, rows)
    assert sum(r["difficulty"] <= 7 for r in drawn) == 30
    assert sum(r["correct"] for r in drawn if r["difficulty"] <= 7) == 15  # the ratio holds within each bin
    # Without weights, bins are drawn in proportion to the lines they hold (7 of 20 difficulties easy).
    ds = codecontests_dataset(
        tok, str(data), n_samples=40, correct_ratio=0.5, seed=1, difficulty_bins={"easy": [1, 7], "mid": [8, 10]}
    )
    drawn = drawn_rows(ds, rows)
    assert sum(r["difficulty"] <= 7 for r in drawn) == 28 and all(r["difficulty"] <= 10 for r in drawn)


@pytest.mark.parametrize(
    "bins, weights, message",
    [
        (
            {"easy": [1, 7], "hard": [8, 20]},
            {"easy": 1, "hrad": 1},
            r"difficulty_weights must give a weight to each of",
        ),
        ({"easy": [1, 9], "hard": [8, 20]}, None, r"difficulty_bins overlap"),
        ({"easy": [7, 1]}, None, r"difficulty_bins\.easy must be \[lowest, highest\]"),
        ({"far": [50, 60]}, None, r"difficulty bin 'far' \(difficulty 50\.\.60\) holds no line; difficulties present"),
        # A bin that holds nothing is an error even when the others have data and weights are null.
        ({"easy": [1, 7], "far": [50, 60]}, None, r"difficulty bin 'far' \(difficulty 50\.\.60\) holds no line"),
        (None, {"easy": 1}, r"difficulty_weights needs difficulty_bins"),
        ({"easy": [1, 7]}, {"easy": -1}, r"difficulty_weights\.easy must be a number >= 0"),
    ],
)
def test_bad_bins_and_weights_are_named(tok, data, bins, weights, message):
    with pytest.raises(DataError, match=message):
        codecontests_dataset(tok, str(data), n_samples=10, difficulty_bins=bins, difficulty_weights=weights)


def test_max_per_problem_caps_each_problem(tok, data):
    rows = make_rows(30, 6)
    ds = codecontests_dataset(tok, str(data), n_samples=40, correct_ratio=0.5, seed=2, max_per_problem=1)
    drawn = drawn_rows(ds, rows)
    for correct in (True, False):
        problems = [r["problem"] for r in drawn if r["correct"] == correct]
        assert len(problems) == 20 and len(set(problems)) == 20


def test_too_few_samples_says_how_many_each_bin_has(tok, data):
    rows = make_rows(30, 6)
    n_easy_correct = sum(r["correct"] and r["difficulty"] <= 7 for r in rows)
    with pytest.raises(DataError) as raised:
        codecontests_dataset(
            tok,
            str(data),
            n_samples=150,
            correct_ratio=1.0,
            difficulty_bins={"easy": [1, 7], "hard": [8, 20]},
            difficulty_weights={"easy": 1, "hard": 0},
        )
    message = str(raised.value)
    assert f"150 correct from bin 'easy' (difficulty 1..7), which has {n_easy_correct}" in message
    assert "bin 'hard' (difficulty 8..20): " in message and "Lower n_samples" in message
    with pytest.raises(
        DataError, match=r"31 correct from the split, which has 30.* with max_per_problem=1: the split: 30 correct"
    ):
        codecontests_dataset(tok, str(data), n_samples=31, correct_ratio=1.0, max_per_problem=1)


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_an_empty_or_nonsense_selection_is_refused(tok, data, n):
    with pytest.raises(DataError, match=r"n_samples must be a positive integer"):
        codecontests_dataset(tok, str(data), n_samples=n)


def test_lines_in_no_bin_are_counted_and_reported(tok, data, caplog):
    with caplog.at_level(logging.INFO):
        codecontests_dataset(tok, str(data), n_samples=10, difficulty_bins={"easy": [1, 7]})
    n_outside = sum(r["difficulty"] > 7 for r in make_rows(30, 6))
    assert f"{n_outside} of 180 lines fall in no difficulty bin and are never drawn" in caplog.text


# ---------------------------------------------------------------------------------------------
# The index and the caches: only the chosen lines are read


def test_only_the_drawn_lines_are_read_and_their_lengths_are_cached(tok, data, monkeypatch):
    read = []
    real = SplitIndex.read_line
    monkeypatch.setattr(SplitIndex, "read_line", lambda self, i, fd: read.append(i) or real(self, i, fd))
    ds = codecontests_dataset(tok, str(data), n_samples=20, seed=0)
    assert sorted(read) == ds.lines.tolist()  # each drawn line once, nothing else
    read.clear()
    again = codecontests_dataset(tok, str(data), n_samples=20, seed=0)
    assert read == [] and again.lengths.tolist() == ds.lengths.tolist()  # lengths from the cache
    other = codecontests_dataset(tok, str(data), n_samples=20, seed=1)
    assert sorted(read) == sorted(set(other.lines.tolist()) - set(ds.lines.tolist()))
    # The cached lengths are the true ones.
    assert [len(tokenize_sample(tok, other.record(i))[0]) for i in range(len(other))] == other.lengths.tolist()


def test_index_is_cached_beside_the_data_and_rebuilt_when_the_file_changes(tok, tmp_path, monkeypatch):
    rows = make_rows(10, 4)
    data = write_split(tmp_path / "data", rows)
    codecontests_dataset(tok, str(data), n_samples=5)
    assert (data / CACHE_FOLDER / "train.index.pt").is_file()

    def no_rebuild(*args):
        raise AssertionError("rebuilt a current index")

    with monkeypatch.context() as m:
        m.setattr(SplitIndex, "_build", staticmethod(no_rebuild))
        codecontests_dataset(tok, str(data), n_samples=5)
    # More lines (and their metadata): the index follows, and the new lines can be drawn.
    rows += [dict(r, problem="new", correct=True) for r in rows[:8]]
    write_split(data, rows)
    ds = codecontests_dataset(tok, str(data), n_samples=sum(r["correct"] for r in rows), correct_ratio=1.0)
    assert max(ds.lines.tolist()) >= 40


def test_read_only_data_folder_uses_the_user_cache(tok, data, tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "_writable", lambda path: path != data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    codecontests_dataset(tok, str(data), n_samples=5)
    assert not (data / CACHE_FOLDER).exists()
    assert len(list((tmp_path / "xdg" / "ref_tuning").glob("*/train.index.pt"))) == 1
    codecontests_dataset(tok, str(data), n_samples=5, cache_dir=str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "train.index.pt").is_file()


def test_validation_split_reads_valid_files_and_older_metadata_name(tok, tmp_path):
    data = write_split(tmp_path / "data", make_rows(4, 3), split="valid", metadata_name="validation_metadata.json")
    assert split_files(str(data), "validation") == (data / "valid.jsonl", data / "validation_metadata.json")
    ds = codecontests_dataset(tok, str(data), split="validation", n_samples=4, correct_ratio=0.5)
    assert len(ds) == 4


def _draw_in_process(rank: int, world: int, data: str, cache: str, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        ds = codecontests_dataset(
            sheared_llama_tokenizer(os.environ["TOKENIZER"]),
            data,
            n_samples=60,
            correct_ratio=0.5,
            seed=4,
            max_per_problem=2,
            cache_dir=cache,
        )
        torch.save({"lines": ds.lines, "lengths": ds.lengths, "first": ds[0]["tokens"]}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_the_draw_does_not_depend_on_the_number_of_ranks(tok, data, tmp_path, demo_tokenizer_path, monkeypatch):
    monkeypatch.setenv("TOKENIZER", str(demo_tokenizer_path))
    alone = codecontests_dataset(
        tok, str(data), n_samples=60, correct_ratio=0.5, seed=4, max_per_problem=2, cache_dir=str(tmp_path / "alone")
    )
    args = (2, str(data), str(tmp_path / "two"), str(tmp_path / "init"), str(tmp_path / "out"))
    # Forked: the children start with this process's imports, not afresh (9 s less).
    torch.multiprocessing.start_processes(_draw_in_process, args=args, nprocs=2, start_method="fork")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}")
        assert got["lines"].tolist() == alone.lines.tolist()
        assert got["lengths"].tolist() == alone.lengths.tolist()  # measured half by each rank, then shared
        assert got["first"] == alone[0]["tokens"]


# ---------------------------------------------------------------------------------------------
# Long samples


def _lengths(tok, data, n):
    return codecontests_dataset(tok, str(data), n_samples=n, correct_ratio=0.5, seed=0).lengths.tolist()


def test_long_samples_dropped_by_default_and_counted(tok, data, caplog):
    lengths = _lengths(tok, data, 60)
    limit = sorted(lengths)[30]
    with caplog.at_level(logging.INFO):
        ds = codecontests_dataset(tok, str(data), n_samples=60, correct_ratio=0.5, max_seq_len=limit)
    n_long = sum(n > limit for n in lengths)
    assert len(ds) == 60 - n_long and max(len(s["tokens"]) for s in ds) <= limit
    assert f"{60 - n_long} samples kept of 60 drawn" in caplog.text
    assert f"{n_long} longer than max_seq_len={limit} dropped" in caplog.text


def test_long_samples_truncated_when_asked(tok, data, caplog):
    lengths = _lengths(tok, data, 60)
    limit = sorted(lengths)[30]
    with caplog.at_level(logging.INFO):
        ds = codecontests_dataset(
            tok, str(data), n_samples=60, correct_ratio=0.5, max_seq_len=limit, long_samples="truncate"
        )
    assert len(ds) == 60 and ds.lengths.tolist() == [min(n, limit) for n in lengths]
    n_long = sum(n > limit for n in lengths)
    assert f"({n_long} truncated, 0 dropped" in caplog.text
    for sample, n in zip(ds, lengths):
        assert len(sample["tokens"]) == min(n, limit) == len(sample["labels"])
        assert any(label != CROSS_ENTROPY_IGNORE_IDX for label in sample["labels"])


@pytest.mark.parametrize("mode", ["drop", "truncate"])
def test_a_prompt_that_fills_max_seq_len_never_becomes_a_fully_masked_row(tok, data, mode):
    ds = codecontests_dataset(tok, str(data), n_samples=10)
    n_prompt = min(s["labels"].count(CROSS_ENTROPY_IGNORE_IDX) for s in ds)
    with pytest.raises(DataError, match=r"10 samples kept|0 samples kept of 10 drawn.*nothing is left to train on"):
        codecontests_dataset(tok, str(data), n_samples=10, max_seq_len=n_prompt, long_samples=mode)
    with pytest.raises(DataError, match=r"long_samples must be one of \('drop', 'truncate'\), got 'cut'"):
        codecontests_dataset(tok, str(data), n_samples=10, long_samples="cut")


# ---------------------------------------------------------------------------------------------
# Bad input: every error names the file, and the line or key


def _rewrite_line(data: Path, line: int, edit) -> None:
    path = data / "train.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[line] = edit(lines[line])
    path.write_bytes(b"\n".join(lines))


def _first_correct(rows) -> int:
    return next(i for i, r in enumerate(rows) if r["correct"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: b[:-5], r"train\.jsonl:{line}: not valid JSON"),
        (
            lambda b: b.replace(b"print", b"pr\xffint", 1),
            r"train\.jsonl:{line}: not UTF-8 \(invalid start byte at byte \d+\)",
        ),
        (
            lambda b: json.dumps({k: v for k, v in json.loads(b).items() if k != "output"}).encode(),
            r"train\.jsonl:{line}: field 'output' must be a str, found None",
        ),
        (
            lambda b: json.dumps(dict(json.loads(b), is_correct="yes")).encode(),
            r"train\.jsonl:{line}: field 'is_correct' must be a bool, found 'yes'",
        ),
        (lambda b: b"[1, 2]", r"train\.jsonl:{line}: expected a JSON object, found list"),
        (
            lambda b: json.dumps(dict(json.loads(b), is_correct=False)).encode(),
            r"train\.jsonl:{line}: is_correct=False but train_metadata\.json says True .* does not belong to this file",
        ),
    ],
)
def test_a_bad_line_is_named(tok, tmp_path, edit, message):
    rows = make_rows(5, 4)
    data = write_split(tmp_path / "data", rows)
    line = _first_correct(rows)
    _rewrite_line(data, line, edit)
    with pytest.raises(DataError, match=message.format(line=line + 1)):
        codecontests_dataset(tok, str(data), n_samples=sum(r["correct"] for r in rows), correct_ratio=1.0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda m: m["metadata"].append({"is_correct": True, "difficulty": 3, "problem_id": "x"}),
            r"train_metadata\.json: lists 21 entries but .*train\.jsonl has 20 lines",
        ),
        (lambda m: m["metadata"].pop(), r"train_metadata\.json: lists 19 entries but .*train\.jsonl has 20 lines"),
        (
            lambda m: m["metadata"][4].pop("difficulty"),
            r"train_metadata\.json: metadata\[4\] \(line 5\): expected an integer 'difficulty', found None",
        ),
        (
            lambda m: m["metadata"][6].update(is_correct=1),
            r"train_metadata\.json: metadata\[6\] \(line 7\): expected a boolean 'is_correct', found 1",
        ),
        (
            lambda m: m["metadata"][2].pop("problem_id"),
            r"train_metadata\.json: metadata\[2\] \(line 3\): expected a string 'problem_id'",
        ),
        (
            lambda m: m["problem_index_map"]["0_A. Problem 0"]["correct_indices"].append(99),
            r"train_metadata\.json: problem_index_map\['0_A\. Problem 0'\]\.correct_indices lists line 99, out of range: "
            r"the split has 20 lines",
        ),
        (
            lambda m: m["problem_index_map"]["1_A. Problem 1"]["incorrect_indices"].append(0),
            r"problem_index_map\['1_A\. Problem 1'\]\.incorrect_indices lists line 0, but metadata\[0\] says",
        ),
        (lambda m: m.pop("metadata"), r"train_metadata\.json: expected a top-level object with a 'metadata' list"),
    ],
)
def test_bad_metadata_is_named(tok, tmp_path, edit, message):
    data = write_split(tmp_path / "data", make_rows(5, 4))
    edit_metadata(data, edit)
    with pytest.raises(DataError, match=message):
        codecontests_dataset(tok, str(data), n_samples=2, correct_ratio=0.5)


def test_metadata_that_is_not_json_and_missing_files_are_named(tok, tmp_path):
    data = write_split(tmp_path / "data", make_rows(2, 2))
    (data / "train_metadata.json").write_text('{"metadata": [')
    with pytest.raises(DataError, match=r"train_metadata\.json: not valid JSON"):
        codecontests_dataset(tok, str(data), n_samples=1)
    (data / "train_metadata.json").unlink()
    with pytest.raises(
        DataError, match=r"train_metadata\.json: not found; expected the metadata file beside train\.jsonl"
    ):
        codecontests_dataset(tok, str(data), n_samples=1)
    with pytest.raises(DataError, match=r"test\.jsonl: not found; expected the processed split 'test'"):
        codecontests_dataset(tok, str(data), split="test", n_samples=1)


def test_a_v1_line_without_task_id_is_named(tok, tmp_path):
    rows = make_rows(3, 2)
    data = write_split(tmp_path / "data", rows, form="v1")
    _rewrite_line(data, 4, lambda b: json.dumps({k: v for k, v in json.loads(b).items() if k != "task_id"}).encode())
    with pytest.raises(DataError, match=r'train\.jsonl:5: no "task_id" string field'):
        codecontests_dataset(tok, str(data), n_samples=1, correct_ratio=0.5)


def test_a_file_changed_after_its_lengths_were_measured_is_caught(tok, data):
    ds = codecontests_dataset(tok, str(data), n_samples=5)
    line = ds.lines.tolist()[0]
    _rewrite_line(data, line, lambda b: b.replace(b"print(", b"print (", 1))  # same JSON, other tokens
    fresh = codecontests_dataset(tok, str(data), n_samples=5)  # index rebuilt, length cache dropped
    assert fresh.lines.tolist() == ds.lines.tolist()
    assert len(fresh[0]["tokens"]) == int(fresh.lengths[0])
    with pytest.raises(DataError, match=rf"train\.jsonl:{line + 1}: "):
        ds[0]  # the dataset built before the change notices: its byte range or tokens no longer match


def test_parse_record_accepts_a_missing_input(tmp_path):
    record = {k: v for k, v in RECORD.items() if k != "input"}
    assert parse_record(tmp_path / "x.jsonl", 0, json.dumps(record).encode()) == record


@pytest.mark.parametrize("which", ["demo", "llama"])
def test_batched_token_counts_equal_tokenize_sample(which, tok, request):
    tokenizer = tok if which == "demo" else request.getfixturevalue("llama")
    rows = make_rows(6, 5)
    records = [
        dict(
            RECORD,
            instruction=f"Solve problem {r['problem']}.",
            output=r["output"],
            input="Input: 1 2\nOutput: 3" if i % 4 == 0 else "",
        )
        for i, r in enumerate(rows)
    ]
    where = [f"x.jsonl:{i + 1}" for i in range(len(records))]
    one_by_one = token_counts(tokenizer, records, where, threads=1)
    assert token_counts(tokenizer, records, where, threads=2) == one_by_one
    samples = (tokenize_sample(tokenizer, r) for r in records)
    assert one_by_one == [(len(t), lab.count(CROSS_ENTROPY_IGNORE_IDX)) for t, lab in samples]


@pytest.mark.parametrize("chunk", [64, 1000, 1 << 26])
@pytest.mark.parametrize("newline_at_end", [True, False])
def test_the_line_scan_across_chunk_boundaries(tmp_path, monkeypatch, chunk, newline_at_end):
    monkeypatch.setattr(index_module, "_CHUNK", chunk)
    rows = make_rows(5, 4)
    path = write_split(tmp_path / "data", rows, form="v1") / "train.jsonl"
    if not newline_at_end:
        path.write_bytes(path.read_bytes().rstrip(b"\n"))
    offsets, problems = index_module._scan_lines(path, with_task_ids=True, progress=False)
    raw = path.read_bytes()
    assert offsets.tolist() == [0] + [i + 1 for i, b in enumerate(raw) if b == 10] + (
        [] if newline_at_end else [len(raw)]
    )
    assert problems == [r["problem"] for r in rows]


def test_a_blank_line_or_an_empty_jsonl_is_named(tok, data, tmp_path):
    broken = Path(shutil.copytree(data, tmp_path / "blank", ignore=shutil.ignore_patterns(".ref_tuning_cache")))
    lines = (broken / "train.jsonl").read_text().split("\n")
    (broken / "train.jsonl").write_text("\n".join(lines[:3] + [""] + lines[3:]))
    with pytest.raises(DataError, match=r"train\.jsonl:4: blank line \(1 in all\); every line must be one JSON sample"):
        codecontests_dataset(tok, str(broken), n_samples=8)
    (broken / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"train\.jsonl: empty; expected one JSON sample per line"):
        codecontests_dataset(tok, str(broken), n_samples=8)
