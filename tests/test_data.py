"""The CodeContests dataset builder with the real LLaMA-2 tokenizer."""

import json
import random

import pytest
import sentencepiece as spm

from ref_tuning.data import DataError, codecontests_dataset, sample_indices, tokenize_sample
from ref_tuning.models import sheared_llama_tokenizer

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
def tokenizer(llama_tokenizer_path):
    return sheared_llama_tokenizer(str(llama_tokenizer_path))


@pytest.fixture(scope="module")
def sp(llama_tokenizer_path):
    return spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))


@pytest.mark.parametrize("record_input, prompt", [("", PROMPT), ("Input: 1 2\nOutput: 3", PROMPT_WITH_INPUT)])
def test_exact_tokens_and_labels(tokenizer, sp, record_input, prompt):
    tokens, labels = tokenize_sample(tokenizer, dict(RECORD, input=record_input))
    # Reference: SentencePiece itself on the whole text, BOS first, EOS last (ids 1 and 2).
    assert tokens == [1] + sp.encode(prompt + RECORD["output"]) + [2]
    n_prompt = 1 + len(sp.encode(prompt))
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == tokens[n_prompt:]
    assert sp.decode(labels[n_prompt:-1]) == RECORD["output"]
    assert labels[-1] == 2  # the model learns to stop


def _write_split(data_dir, n_correct, n_incorrect, split="train", form="v2", metadata_name=None):
    data_dir.mkdir(parents=True, exist_ok=True)
    kinds = [True] * n_correct + [False] * n_incorrect
    random.Random(0).shuffle(kinds)
    entries = []
    with open(data_dir / f"{split}.jsonl", "w") as f:
        for i, correct in enumerate(kinds):
            # Solutions of growing length: sample i prints i values.
            output = "".join(f"print({j})\n" for j in range(i + 1))
            task_id = f"p{i // 3}_{'correct' if correct else 'incorrect'}_{i}"
            record = dict(RECORD, output=output, task_id=task_id, is_correct=correct)
            f.write(json.dumps(record) + "\n")
            entry = {"is_correct": correct, "difficulty": 7}
            if form == "v2":
                entry["problem_id"] = f"p{i // 3}"
            entries.append(entry)
    meta = {"metadata": entries, "stats": {"total": len(entries)}}
    (data_dir / (metadata_name or f"{split}_metadata.json")).write_text(json.dumps(meta, indent=2))
    return data_dir


def test_correct_ratio_one_gives_only_correct_samples(tokenizer, tmp_path):
    data_dir = _write_split(tmp_path / "data", n_correct=20, n_incorrect=20)
    ds = codecontests_dataset(tokenizer, str(data_dir), n_samples=15, correct_ratio=1.0, seed=3)
    assert len(ds) == 15
    assert all("_correct_" in t for t in ds.task_ids)


def test_correct_ratio_mixes_as_asked(tokenizer, tmp_path):
    data_dir = _write_split(tmp_path / "data", n_correct=20, n_incorrect=20)
    ds = codecontests_dataset(tokenizer, str(data_dir), n_samples=10, correct_ratio=0.3, seed=3)
    assert sum("_incorrect_" in t for t in ds.task_ids) == 7


def test_same_seed_same_sample_and_both_metadata_forms_agree(tokenizer, tmp_path):
    v1 = _write_split(tmp_path / "v1", 30, 10, form="v1")
    v2 = _write_split(tmp_path / "v2", 30, 10, form="v2")
    a = codecontests_dataset(tokenizer, str(v1), n_samples=8, seed=7)
    b = codecontests_dataset(tokenizer, str(v2), n_samples=8, seed=7)
    c = codecontests_dataset(tokenizer, str(v2), n_samples=8, seed=8)
    assert a.task_ids == b.task_ids
    assert [s["tokens"] for s in a] == [s["tokens"] for s in b]
    assert a.task_ids != c.task_ids


def test_validation_split_reads_valid_files_and_older_metadata_name(tokenizer, tmp_path):
    data_dir = _write_split(tmp_path / "data", 6, 0, split="valid", metadata_name="validation_metadata.json")
    ds = codecontests_dataset(tokenizer, str(data_dir), split="validation", n_samples=4)
    assert len(ds) == 4


def test_too_few_samples_says_how_many_there_are(tokenizer, tmp_path):
    data_dir = _write_split(tmp_path / "data", 5, 5)
    with pytest.raises(DataError, match="asked for 8 correct samples .* the split has only 5"):
        codecontests_dataset(tokenizer, str(data_dir), n_samples=8, correct_ratio=1.0)


def test_malformed_line_is_named(tokenizer, tmp_path):
    data_dir = _write_split(tmp_path / "data", 4, 0)
    lines = (data_dir / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]
    (data_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:3: not valid JSON"):
        codecontests_dataset(tokenizer, str(data_dir), n_samples=4)


def test_metadata_of_another_file_is_caught(tokenizer, tmp_path):
    data_dir = _write_split(tmp_path / "data", 4, 4)
    meta = json.loads((data_dir / "train_metadata.json").read_text())
    meta["metadata"] = [dict(e, is_correct=not e["is_correct"]) for e in meta["metadata"]]
    (data_dir / "train_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="the metadata does not belong to this file"):
        codecontests_dataset(tokenizer, str(data_dir), n_samples=4)


def test_metadata_longer_than_file_is_caught(tokenizer, tmp_path):
    data_dir = _write_split(tmp_path / "data", 4, 0)
    meta = json.loads((data_dir / "train_metadata.json").read_text())
    meta["metadata"] += [{"is_correct": True, "difficulty": 7}] * 10
    (data_dir / "train_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="the file has only 4 lines"):
        codecontests_dataset(tokenizer, str(data_dir), n_samples=14)


def test_long_samples_are_dropped_never_fully_masked(tokenizer, sp, tmp_path):
    data_dir = _write_split(tmp_path / "data", 6, 0)
    n_prompt = 1 + len(sp.encode(PROMPT))
    full = codecontests_dataset(tokenizer, str(data_dir), n_samples=6)
    lengths = sorted(len(s["tokens"]) for s in full)
    ds = codecontests_dataset(tokenizer, str(data_dir), n_samples=6, max_seq_len=lengths[2])
    assert sorted(len(s["tokens"]) for s in ds) == lengths[:3]
    assert all(-100 in s["labels"] and any(label != -100 for label in s["labels"]) for s in ds)
    # A prompt that alone fills max_seq_len never becomes a row with every label masked.
    with pytest.raises(DataError, match="every drawn sample is longer than max_seq_len"):
        codecontests_dataset(tokenizer, str(data_dir), n_samples=6, max_seq_len=n_prompt)


def test_sample_indices_are_rank_independent_and_sorted():
    is_correct = [i % 3 != 0 for i in range(100)]
    a = sample_indices(is_correct, 20, 0.5, seed=1)
    assert a == sample_indices(is_correct, 20, 0.5, seed=1) == sorted(a)
    assert sum(is_correct[i] for i in a) == 10
