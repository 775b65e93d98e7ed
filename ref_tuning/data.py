"""CodeContests solutions as Alpaca-templated samples: metadata-driven sampling and tokenization.

Files (shared/docs/DATA_FORMAT.md): `{split}.jsonl`, one sample per line, and `{split}_metadata.json`,
whose `metadata` list has one entry per line (`is_correct`, `difficulty`, optionally `problem_id`).
"""

import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset
from torchtune import utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from tqdm import tqdm

log = utils.get_logger("INFO")

# The Alpaca template exactly as the Rho-1 stage applies it.
PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# Older trees call the validation split `validation`; its files are named `valid`.
SPLIT_ALIASES = {"validation": "valid"}
_RECORD_FIELDS = {"instruction": str, "input": str, "output": str, "task_id": str, "is_correct": bool}


class DataError(ValueError):
    """Bad data: the message names the file (and line) and what was expected there."""


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt: everything up to and including `### Response:\\n`."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)


def tokenize_sample(tokenizer: ModelTokenizer, record: Dict[str, Any]) -> Tuple[List[int], List[int]]:
    """Token ids `BOS prompt response EOS` and labels with the prompt masked out.

    The whole text is tokenized at once, as the Rho-1 stage does, so the ids are the ones it scores.
    """
    prompt = format_prompt(record["instruction"], record.get("input", ""))
    tokens = tokenizer.encode(prompt + record["output"], add_bos=True, add_eos=True)
    prompt_tokens = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    n_prompt = len(prompt_tokens)
    # The prompt ends in a newline, which SentencePiece never merges across, so its ids are a prefix.
    if tokens[:n_prompt] != prompt_tokens:
        raise DataError(
            f"task {record.get('task_id')}: the prompt's tokens are not a prefix of the full sample's; "
            "the tokenizer merges across the end of the prompt, so the prompt cannot be masked exactly"
        )
    labels = [CROSS_ENTROPY_IGNORE_IDX] * n_prompt + tokens[n_prompt:]
    return tokens, labels


def split_files(data_dir: str, split: str) -> Tuple[Path, Path]:
    """Paths of `{split}.jsonl` and its metadata file, accepting the older `validation_metadata.json`."""
    data_dir = Path(data_dir)
    name = SPLIT_ALIASES.get(split, split)
    jsonl = data_dir / f"{name}.jsonl"
    candidates = [data_dir / f"{name}_metadata.json", data_dir / f"{split}_metadata.json"]
    if name == "valid":
        candidates.append(data_dir / "validation_metadata.json")
    if not jsonl.is_file():
        raise DataError(f"{jsonl}: not found; expected the processed split '{split}' in {data_dir}")
    metadata = next((p for p in candidates if p.is_file()), None)
    if metadata is None:
        raise DataError(f"{candidates[0]}: not found; expected the metadata file beside {jsonl.name}")
    return jsonl, metadata


def read_metadata(path: Path) -> List[bool]:
    """`is_correct` of every line of the split, from either metadata form (v1 or v2)."""
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    entries = meta.get("metadata") if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a top-level object with a 'metadata' list, one entry per line")
    correct = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("is_correct"), bool):
            raise DataError(f"{path}: metadata[{i}] must be an object with a boolean 'is_correct', found {entry!r}")
        correct.append(entry["is_correct"])
    return correct


def sample_indices(is_correct: Sequence[bool], n_samples: int, correct_ratio: float, seed: int) -> List[int]:
    """Line numbers of `n_samples` samples, `correct_ratio` of them correct, the same for a given seed."""
    if not 0.0 <= correct_ratio <= 1.0:
        raise DataError(f"correct_ratio must be in [0, 1], got {correct_ratio}")
    if n_samples <= 0:
        raise DataError(f"n_samples must be positive, got {n_samples}")
    n_correct = round(n_samples * correct_ratio)
    pools = {True: [], False: []}
    for i, c in enumerate(is_correct):
        pools[c].append(i)
    rng = random.Random(seed)
    chosen = []
    for want_correct, n in ((True, n_correct), (False, n_samples - n_correct)):
        pool = pools[want_correct]
        if n > len(pool):
            kind = "correct" if want_correct else "incorrect"
            raise DataError(
                f"asked for {n} {kind} samples (n_samples={n_samples}, correct_ratio={correct_ratio}) "
                f"but the split has only {len(pool)}; lower n_samples or change correct_ratio"
            )
        chosen += rng.sample(pool, n)
    return sorted(chosen)


def read_records(path: Path, indices: Sequence[int]) -> List[Dict[str, Any]]:
    """The JSON records on the given (sorted) 0-based lines, validated; stops after the last one."""
    wanted = set(indices)
    last = max(indices)
    records = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i in wanted:
                records.append(_parse_record(path, i, line))
            if i == last:
                break
    if len(records) < len(indices):
        raise DataError(f"{path}: the metadata lists line {last + 1} but the file has only {i + 1} lines")
    return records


def _parse_record(path: Path, i: int, line: str) -> Dict[str, Any]:
    where = f"{path}:{i + 1}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from e
    for field, kind in _RECORD_FIELDS.items():
        value = record.get(field, "" if field == "input" else None)
        if not isinstance(value, kind):
            raise DataError(f"{where}: field '{field}' must be a {kind.__name__}, found {value!r:.80}")
    return record


class CodeContestsDataset(Dataset):
    """Tokenized samples as `{"tokens": [...], "labels": [...]}`, the input of `padded_collate_sft`."""

    def __init__(self, samples: List[Dict[str, List[int]]], task_ids: List[str]):
        self._samples = samples
        self.task_ids = task_ids

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        return self._samples[index]


def codecontests_dataset(
    tokenizer: ModelTokenizer,
    data_dir: str,
    split: str = "train",
    n_samples: int = 1000,
    correct_ratio: float = 1.0,
    seed: int = 0,
    max_seq_len: int = 2048,
) -> CodeContestsDataset:
    """Sample `n_samples` lines of a processed CodeContests split by its metadata and tokenize them.

    Args:
        tokenizer: a torchtune tokenizer (`sheared_llama_tokenizer`).
        data_dir: the folder with `{split}.jsonl` and `{split}_metadata.json`.
        split: `train`, `valid` (or `validation`) or `test`.
        n_samples: samples to draw before the length filter.
        correct_ratio: share of correct solutions; 1.0 for reference tuning.
        seed: the draw is a function of the seed and the metadata alone.
        max_seq_len: samples longer than this (template, BOS and EOS included) are dropped and counted.
    """
    jsonl, metadata = split_files(data_dir, split)
    is_correct = read_metadata(metadata)
    indices = sample_indices(is_correct, n_samples, correct_ratio, seed)
    records = read_records(jsonl, indices)
    samples, task_ids, dropped = [], [], 0
    for i, record in zip(indices, tqdm(records, desc=f"tokenizing {split}", disable=not _is_rank_zero())):
        if record["is_correct"] != is_correct[i]:
            raise DataError(
                f"{jsonl}:{i + 1}: is_correct={record['is_correct']} but {metadata.name} says "
                f"{is_correct[i]} for this line; the metadata does not belong to this file"
            )
        tokens, labels = tokenize_sample(tokenizer, record)
        if len(tokens) > max_seq_len:
            dropped += 1
            continue
        samples.append({"tokens": tokens, "labels": labels})
        task_ids.append(record["task_id"])
    utils.log_rank_zero(
        log,
        f"{jsonl}: {len(samples)} samples kept of {len(indices)} drawn "
        f"({dropped} dropped as longer than max_seq_len={max_seq_len})",
    )
    if not samples:
        raise DataError(f"{jsonl}: every drawn sample is longer than max_seq_len={max_seq_len}; raise it")
    return CodeContestsDataset(samples, task_ids)


def _is_rank_zero() -> bool:
    return utils.get_world_size_and_rank()[1] == 0
