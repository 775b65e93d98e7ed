"""CodeContests solutions as Alpaca-templated samples: indexed sampling, lazy tokenization, packing.

Files: docs/data.md. Only the drawn lines are read (located by `ref_tuning.line_index`), again each time
the dataloader asks for them: memory grows with `n_samples`, not with the file, and no token ids are held.
"""

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from torchtune import utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from tqdm import tqdm

from ref_tuning.line_index import DataError, SplitIndex, TokenLengths, cache_folder
from ref_tuning.packing import Packs, fill_ratio, pack_best_fit

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
_RECORD_FIELDS = {"instruction": str, "input": str, "output": str, "task_id": str, "is_correct": bool}
LONG_SAMPLES = ("drop", "truncate")
_MEASURE_BATCH = 256  # lines read, then tokenized together


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt: everything up to and including `### Response:\\n`."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)


def tokenize_sample(tokenizer: ModelTokenizer, record: Dict[str, Any]) -> Tuple[List[int], List[int]]:
    """Ids `BOS prompt response EOS`, tokenized whole as the Rho-1 stage scores them; labels mask the prompt."""
    prompt = format_prompt(record["instruction"], record.get("input", ""))
    tokens = tokenizer.encode(prompt + record["output"], add_bos=True, add_eos=True)
    n_prompt = len(prompt_tokens := _prompt_tokens(tokenizer, prompt))
    # The prompt ends in a newline, which SentencePiece never merges across, so its ids are a prefix.
    if tuple(tokens[:n_prompt]) != prompt_tokens:
        raise DataError(
            f"task {record.get('task_id')}: the prompt's tokens are not a prefix of the full sample's; "
            "the tokenizer merges across the end of the prompt, so the prompt cannot be masked exactly"
        )
    return tokens, [CROSS_ENTROPY_IGNORE_IDX] * n_prompt + tokens[n_prompt:]


@functools.lru_cache(maxsize=16)
def _prompt_tokens(tokenizer: ModelTokenizer, prompt: str) -> Tuple[int, ...]:
    # The solutions of a problem lie on consecutive lines and share its prompt: encode it once.
    return tuple(tokenizer.encode(prompt, add_bos=True, add_eos=False))


def split_files(data_dir: str, split: str) -> Tuple[Path, Path]:
    """Paths of `{split}.jsonl` and its metadata file, accepting the older `validation_metadata.json`."""
    data_dir, name = Path(data_dir), "valid" if split == "validation" else split  # older trees say `validation`
    jsonl = data_dir / f"{name}.jsonl"
    if not jsonl.is_file():
        raise DataError(f"{jsonl}: not found; expected the processed split '{split}' in {data_dir}")
    names = [name, split] + (["validation"] if name == "valid" else [])
    metadata = next((p for p in (data_dir / f"{n}_metadata.json" for n in names) if p.is_file()), None)
    if metadata is None:
        raise DataError(f"{data_dir / name}_metadata.json: not found; expected the metadata file beside {jsonl.name}")
    return jsonl, metadata


def parse_record(jsonl: Path, line: int, raw: bytes) -> Dict[str, Any]:
    """One JSONL line (0-based `line`), decoded and checked: the fields a sample needs, typed."""
    where = f"{jsonl}:{line + 1}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}); the line is damaged") from e
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    for field, kind in _RECORD_FIELDS.items():
        value = record.get(field, "" if field == "input" else None)
        if not isinstance(value, kind):
            raise DataError(f"{where}: field '{field}' must be a {kind.__name__}, found {value!r:.80}")
    return record


def _bins(
    bins: Optional[Mapping[str, Sequence[int]]], weights: Optional[Mapping[str, float]]
) -> List[Tuple[str, int, int, Optional[float]]]:
    """(name, lowest, highest difficulty, weight) of each configured bin, checked."""
    if bins is None:
        if weights is not None:
            raise DataError("difficulty_weights needs difficulty_bins ({name: [lowest, highest]}) to weigh")
        return [("all", -(2**15), 2**15 - 1, None)]
    if not isinstance(bins, Mapping) or not bins:
        raise DataError(f"difficulty_bins must map bin names to [lowest, highest] difficulty, got {bins!r}")
    out = []
    for name, bounds in bins.items():
        ints = isinstance(bounds, Sequence) and len(bounds) == 2 and all(type(b) is int for b in bounds)
        if not (ints and bounds[0] <= bounds[1]):
            raise DataError(f"difficulty_bins.{name} must be [lowest, highest] (integers, inclusive), got {bounds!r}")
        out.append((str(name), bounds[0], bounds[1], None))
    if weights is not None:
        if not isinstance(weights, Mapping) or set(weights) != set(bins):
            raise DataError(
                f"difficulty_weights must give a weight to each of the difficulty_bins {sorted(bins)} and to nothing "
                f"else, got {sorted(weights) if isinstance(weights, Mapping) else weights!r}"
            )
        for name, w in weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
                raise DataError(f"difficulty_weights.{name} must be a number >= 0, got {w!r}")
        if not sum(weights.values()) > 0:
            raise DataError("difficulty_weights are all 0: nothing could be drawn")
        out = [(name, lo, hi, float(weights[name])) for name, lo, hi, _ in out]
    return out


def _quotas(n: int, weights: Sequence[float]) -> List[int]:
    """`n` split in proportion to `weights`, rounded so that the parts sum to `n` (largest remainders)."""
    exact = [n * w / sum(weights) for w in weights]
    quotas = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: n - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _within_cap(problems: torch.Tensor, cap: int) -> torch.Tensor:
    """Mask of the elements that are among the first `cap` of their problem, in the given order."""
    order = torch.argsort(problems, stable=True)
    _, counts = torch.unique_consecutive(problems[order], return_counts=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return rank < cap


def problem_fold(problem_id: str, folds: int) -> int:
    """The cross-fitting fold of a problem: sha256 of its id, mod `folds`. Never Python's `hash`, which is salted
    per process: models trained months apart, and the scoring run, must agree on every problem's fold."""
    return int.from_bytes(hashlib.sha256(problem_id.encode("utf-8")).digest()[:8], "big") % folds


def fold_of_lines(index: SplitIndex, folds: int) -> torch.Tensor:
    """Each line's fold (int64): its problem's, so that all solutions of a problem share one fold, whatever the
    seed, the order of the split or the number of ranks. Training drops a fold's lines; scoring splits by them."""
    return torch.tensor([problem_fold(p, folds) for p in index.problems], dtype=torch.int64)[index.problem.long()]


def _check_folds(folds, fold) -> None:
    if folds is None:
        if fold is not None:
            raise DataError(f"fold={fold!r} needs folds (the number of cross-fitting folds, e.g. folds: 2); got null")
        return
    if type(folds) is not int or folds < 2:
        raise DataError(f"folds must be an integer >= 2 (cross-fitting folds) or null for none, got {folds!r}")
    if type(fold) is not int or not 0 <= fold < folds:
        raise DataError(
            f"fold must be the fold held out of this training run, an integer from 0 to {folds - 1} "
            f"(folds={folds}), got {fold!r}"
        )


def select_lines(
    index: SplitIndex,
    n_samples,
    correct_ratio,
    difficulty_bins,
    difficulty_weights,
    max_per_problem,
    seed,
    folds=None,
    fold=None,
):
    """Sorted line numbers of `n_samples` samples drawn without replacement; arguments as `codecontests_dataset`'s.
    The draw depends on the seed and the index alone: every rank draws the same lines."""
    _check_folds(folds, fold)
    if type(n_samples) is not int or n_samples <= 0:
        raise DataError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(correct_ratio, (int, float)) or not 0.0 <= correct_ratio <= 1.0:
        raise DataError(f"correct_ratio must be in [0, 1], got {correct_ratio!r}")
    if max_per_problem is not None and (type(max_per_problem) is not int or max_per_problem <= 0):
        raise DataError(f"max_per_problem must be a positive integer or null, got {max_per_problem!r}")
    bins = _bins(difficulty_bins, difficulty_weights)
    masks = [(index.difficulty >= lo) & (index.difficulty <= hi) for _, lo, hi, _ in bins]
    in_bins = torch.stack(masks).sum(0) if masks else torch.zeros(len(index))
    if bool((in_bins > 1).any()):
        raise DataError(
            f"difficulty_bins overlap: {[(name, lo, hi) for name, lo, hi, _ in bins]}; give each difficulty one bin"
        )
    outside = int((in_bins == 0).sum())
    if outside:
        log.info(f"{index.jsonl}: {outside} of {len(index)} lines fall in no difficulty bin and are never drawn")
    sizes = [int(m.sum()) for m in masks]
    empty = [f"'{name}' (difficulty {lo}..{hi})" for (name, lo, hi, _), size in zip(bins, sizes) if not size]
    if difficulty_bins is not None and empty:  # a bin that can never be drawn is a mistake in the bins
        raise DataError(
            f"{index.jsonl}: difficulty bin {', '.join(empty)} holds no line; difficulties present: "
            f"{sorted(set(index.difficulty.tolist()))}. Fix or drop the bin"
        )
    # Held-out problems leave before the draw, so bins are weighed by (and drawn from) the other folds alone.
    held_out = ""
    if folds is not None:
        of_line = fold_of_lines(index, folds)
        masks = [mask & (of_line != fold) for mask in masks]
        sizes = [int(m.sum()) for m in masks]
        held_out = f" outside the held-out fold {fold} of folds={folds}"
        counts = "; ".join(
            f"fold {k}: {index.problem[of_line == k].unique().numel()} problems, {int((of_line == k).sum())} lines"
            for k in range(folds)
        )
        utils.log_rank_zero(
            log, f"{index.jsonl}: {folds} folds by problem ({counts}); fold {fold} is held out of this draw"
        )
    weights = [w if w is not None else size for (_, _, _, w), size in zip(bins, sizes)]
    if not sum(weights) > 0:
        bounds = [(n, lo, hi) for n, lo, hi, _ in bins]
        raise DataError(f"{index.jsonl}: no line{held_out} falls in the difficulty_bins {bounds}")

    generator = torch.Generator().manual_seed(seed)
    chosen, shortfalls, report = [], [], []
    for (name, lo, hi, _), mask, quota in zip(bins, masks, _quotas(n_samples, weights)):
        where = f"bin '{name}' (difficulty {lo}..{hi})" if difficulty_bins is not None else "the split"
        n_correct = round(quota * correct_ratio)
        for correct, n in ((True, n_correct), (False, quota - n_correct)):
            pool = (mask & (index.is_correct == correct)).nonzero().flatten()
            drawn = pool[torch.randperm(len(pool), generator=generator)]
            if max_per_problem is not None:
                drawn = drawn[_within_cap(index.problem[drawn], max_per_problem)]
            kind = "correct" if correct else "incorrect"
            report.append(f"{where}: {len(drawn)} {kind}")
            if n > len(drawn):
                shortfalls.append(f"{n} {kind} from {where}, which has {len(drawn)}")
            chosen.append(drawn[:n])
    if shortfalls:
        cap = f" with max_per_problem={max_per_problem}" if max_per_problem is not None else ""
        raise DataError(
            f"{index.jsonl}: too few samples for n_samples={n_samples}, correct_ratio={correct_ratio}: asked for "
            f"{'; '.join(shortfalls)}. Available{cap}{held_out}: {'; '.join(report)}. Lower n_samples, or change "
            "correct_ratio, the bins or their weights"
        )
    return torch.cat(chosen).sort().values


def measure_lengths(
    index: SplitIndex, lines: torch.Tensor, tokenizer: ModelTokenizer, cache: Path
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token and prompt lengths of `lines`: cached, else measured (shared out among the ranks) and cached."""
    lengths = TokenLengths(index, cache, tokenizer)
    missing = lines[lengths.total[lines] < 0]
    if len(missing):
        world, rank = utils.get_world_size_and_rank()
        mine = missing[rank::world].tolist()
        measured: List[Tuple[int, int]] = []
        threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        desc = f"measuring {index.jsonl.name} samples (cached for later runs)"
        bar = tqdm(total=len(mine), desc=desc, disable=rank != 0)
        with open(index.jsonl, "rb") as f:
            for at in range(0, len(mine), _MEASURE_BATCH):
                batch = mine[at : at + _MEASURE_BATCH]
                records = [_checked_record(index, line, f.fileno()) for line in batch]
                measured += token_counts(tokenizer, records, [f"{index.jsonl}:{line + 1}" for line in batch], threads)
                bar.update(len(batch))
        bar.close()
        parts = [measured]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, measured)
        for r, part in enumerate(parts):
            if part:
                values = torch.tensor(part, dtype=torch.int32).T  # (tokens, prompt tokens) rows
                lengths.total[missing[r::world]], lengths.prompt[missing[r::world]] = values
        lengths.save()
    return lengths.total[lines].clone(), lengths.prompt[lines].clone()


def token_counts(tokenizer: ModelTokenizer, records: List[dict], where: List[str], threads: int = 1) -> List[tuple]:
    """(tokens, prompt tokens) of each record as `tokenize_sample` counts them; SentencePiece encodes the batch in
    `threads` C++ threads (1.8x with 2)."""
    spm = getattr(getattr(tokenizer, "_spm_model", None), "spm_model", None)
    counts = []
    if spm is None or threads <= 1:
        for record, at in zip(records, where):
            try:
                tokens, labels = tokenize_sample(tokenizer, record)
            except DataError as e:
                raise DataError(f"{at}: {e}") from e
            counts.append((len(tokens), labels.count(CROSS_ENTROPY_IGNORE_IDX)))
        return counts
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    kw = dict(add_bos=True, out_type=int, num_threads=threads)
    full = spm.encode([p + r["output"] for p, r in zip(prompts, records)], add_eos=True, **kw)
    unique = list(dict.fromkeys(prompts))  # a problem's solutions share its prompt
    encoded = dict(zip(unique, spm.encode(unique, add_eos=False, **kw)))
    for prompt, tokens, at in zip(prompts, full, where):
        prompt_tokens = encoded[prompt]
        if tokens[: len(prompt_tokens)] != prompt_tokens:
            raise DataError(
                f"{at}: the prompt's tokens are not a prefix of the full sample's; the prompt cannot be masked exactly"
            )
        counts.append((len(tokens), len(prompt_tokens)))
    # The batch path must count as tokenize_sample does: checked on one record per batch.
    tokens, labels = tokenize_sample(tokenizer, records[0])
    if counts[0] != (len(tokens), labels.count(CROSS_ENTROPY_IGNORE_IDX)):
        raise RuntimeError(f"{where[0]}: batch tokenization counts {counts[0]}, tokenize_sample {len(tokens)}")
    return counts


def _checked_record(index: SplitIndex, line: int, fd: int) -> Dict[str, Any]:
    record = parse_record(index.jsonl, line, index.read_line(line, fd))
    if record["is_correct"] != bool(index.is_correct[line]):
        raise DataError(
            f"{index.jsonl}:{line + 1}: is_correct={record['is_correct']} but {index.metadata.name} says "
            f"{bool(index.is_correct[line])} for this line; the metadata does not belong to this file"
        )
    return record


class CodeContestsDataset(Dataset):
    """Items `{"tokens", "labels"}` for `padded_collate_sft`, read and tokenized when asked for, truncated to
    `max_seq_len`. Holds per sample only its line number, byte range and token length."""

    packed = False  # as torchtune's datasets say which collate function they need

    def __init__(
        self, index: SplitIndex, lines: torch.Tensor, lengths: torch.Tensor, tokenizer: ModelTokenizer, max_seq_len: int
    ):
        self.jsonl, self.metadata = index.jsonl, index.metadata
        self.lines = lines
        self.lengths = lengths.clamp(max=max_seq_len)  # tokens per item, after truncation
        self._full_lengths = lengths
        self._starts, self._ends = index.offsets[lines].clone(), index.offsets[lines + 1].clone()
        self._is_correct = index.is_correct[lines].clone()
        self.problem_ids = [index.problems[p] for p in index.problem[lines].tolist()]  # each item's problem
        self._file_end = int(index.offsets[-1])
        self._tokenizer, self._max_seq_len = tokenizer, max_seq_len
        self._fd, self._pid = -1, -1

    def __len__(self) -> int:
        return len(self.lines)

    def record(self, i: int) -> Dict[str, Any]:
        """The JSON record of item i, checked."""
        if self._pid != os.getpid():  # opened once per process (dataloader workers fork)
            self._fd, self._pid = os.open(self.jsonl, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), os.getpid()
        line, start, end = int(self.lines[i]), int(self._starts[i]), int(self._ends[i])
        raw = os.pread(self._fd, end - start, start)
        # A line ends in a newline (the file's last may not): any other end means the file changed.
        same = len(raw) == end - start and (raw.endswith(b"\n") or end == self._file_end)
        record = parse_record(self.jsonl, line, raw.rstrip(b"\n")) if same else None
        if record is None or record["is_correct"] != bool(self._is_correct[i]):
            raise DataError(f"{self.jsonl}:{line + 1}: the file changed since it was indexed; run again")
        return record

    def __getitem__(self, i: int) -> Dict[str, List[int]]:
        return self.item(i)[0]

    def item(self, i: int) -> Tuple[Dict[str, List[int]], Dict[str, Any]]:
        """Item i and the JSON record it was made from, read once."""
        record = self.record(i)
        tokens, labels = tokenize_sample(self._tokenizer, record)
        if len(tokens) != int(self._full_lengths[i]):
            raise DataError(
                f"{self.jsonl}:{int(self.lines[i]) + 1}: tokenizes to {len(tokens)} tokens, but its cached length "
                f"is {int(self._full_lengths[i])}; the file or the tokenizer changed: delete the cache and run again"
            )
        return {"tokens": tokens[: self._max_seq_len], "labels": labels[: self._max_seq_len]}, record

    @property
    def task_ids(self) -> List[str]:
        """Every item's `task_id`, read from the file (for small datasets: it reads every line)."""
        return [self.record(i)["task_id"] for i in range(len(self))]

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__, _fd=-1, _pid=-1)  # a file descriptor does not travel to workers


class PackedCodeContestsDataset(Dataset):
    """Rows of `max_seq_len` tokens, one pack each, laid out as torchtune's `PackedDataset` does for
    `padded_collate_packed`: `input_pos` restart at each sample, `seq_lens` count the padding as one more."""

    packed = True

    def __init__(self, samples: CodeContestsDataset, packs: Packs, max_seq_len: int, pad_id: int):
        self.samples, self.packs, self.lengths = samples, packs, samples.lengths
        self._max_seq_len, self._pad_id = max_seq_len, pad_id

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, p: int) -> Dict[str, torch.Tensor]:
        tokens, labels, input_pos, seq_lens = [], [], [], []
        for i in self.packs[p]:
            sample = self.samples[i]
            tokens += sample["tokens"]
            labels += sample["labels"]
            input_pos += range(len(sample["tokens"]))
            seq_lens.append(len(sample["tokens"]))
        pad = self._max_seq_len - len(tokens)
        if pad:  # positions of the padding go on counting, as torchtune's PackedDataset does
            tokens += [self._pad_id] * pad
            labels += [CROSS_ENTROPY_IGNORE_IDX] * pad
            input_pos += [min(input_pos[-1] + 1 + k, self._max_seq_len - 1) for k in range(pad)]
            seq_lens.append(pad)
        row = {"tokens": tokens, "labels": labels, "input_pos": input_pos, "seq_lens": seq_lens}
        return {k: torch.tensor(v, dtype=torch.long) for k, v in row.items()}


def codecontests_dataset(
    tokenizer: ModelTokenizer,
    data_dir: str,
    split: str = "train",
    n_samples: int = 1000,
    correct_ratio: float = 1.0,
    difficulty_bins: Optional[Mapping[str, Sequence[int]]] = None,
    difficulty_weights: Optional[Mapping[str, float]] = None,
    max_per_problem: Optional[int] = None,
    seed: int = 0,
    max_seq_len: int = 2048,
    long_samples: str = "drop",
    packed: bool = False,
    cache_dir: Optional[str] = None,
    folds: Optional[int] = None,
    fold: Optional[int] = None,
) -> Union[CodeContestsDataset, PackedCodeContestsDataset]:
    """Draw `n_samples` samples of a processed CodeContests split by its metadata.

    Args:
        tokenizer: a torchtune tokenizer (`sheared_llama_tokenizer`).
        data_dir, split: the folder with `{split}.jsonl` and its metadata; `train`, `valid` (or `validation`), `test`.
        n_samples, correct_ratio: samples to draw (before the length filter); share of correct ones (1.0 to ref-tune).
        difficulty_bins: `{name: [lowest, highest]}` CodeContests difficulties, inclusive; null: one bin.
        difficulty_weights: `{name: weight}`, each bin's share of `n_samples`; null: by the lines it holds.
        max_per_problem: at most this many correct and this many incorrect solutions of one problem.
        seed: the draw is a function of the seed and the files alone, whatever the number of ranks.
        max_seq_len: tokens per sample (template, BOS and EOS included), or per packed row.
        long_samples: `drop` or `truncate` samples past `max_seq_len`; one whose prompt alone fills it is dropped.
        packed: best-fit pack samples into rows (attention and positions reset at each sample).
        cache_dir: where the index and token-length caches go (default: see `ref_tuning.line_index`).
        folds, fold: cross-fitting; every problem is in one of `folds` folds (`problem_fold`), and the draw takes
            only problems outside `fold`: the reference that scores fold `fold` never saw its problems. null: no folds.
    """
    if long_samples not in LONG_SAMPLES:
        raise DataError(f"long_samples must be one of {LONG_SAMPLES}, got {long_samples!r}")
    if type(max_seq_len) is not int or max_seq_len <= 0:
        raise DataError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    _check_folds(folds, fold)  # before the index is built: a mistake in the keys shows at once
    jsonl, metadata = split_files(data_dir, split)
    cache = cache_folder(Path(data_dir), cache_dir)
    index = SplitIndex.open(jsonl, metadata, cache, progress=utils.get_world_size_and_rank()[1] == 0)
    draw = (n_samples, correct_ratio, difficulty_bins, difficulty_weights, max_per_problem, seed, folds, fold)
    lines = select_lines(index, *draw)
    total, prompt = measure_lengths(index, lines, tokenizer, cache)

    too_long = total > max_seq_len
    no_room = prompt >= max_seq_len  # not a single response token would be left to learn from
    keep = ~too_long if long_samples == "drop" else ~no_room
    cut, lost = int((too_long & ~no_room).sum()), int(no_room.sum())
    fate = f"({cut} truncated, {lost} dropped: their prompt alone fills max_seq_len)"
    summary = (
        f"{jsonl}: {int(keep.sum())} samples kept of {len(lines)} drawn from {len(index)} lines; "
        f"{int(too_long.sum())} longer than max_seq_len={max_seq_len} "
        + ("dropped" if long_samples == "drop" else fate)
    )
    if not bool(keep.any()):
        raise DataError(f"{summary}; nothing is left to train on: raise max_seq_len")
    dataset = CodeContestsDataset(index, lines[keep], total[keep], tokenizer, max_seq_len)
    if packed:
        packs = pack_best_fit(dataset.lengths.tolist(), max_seq_len)
        fill = fill_ratio(dataset.lengths.tolist(), packs, max_seq_len)
        summary += f"; packed into {len(packs)} rows of {max_seq_len} tokens, {fill:.1%} of them sample tokens"
        dataset = PackedCodeContestsDataset(dataset, packs, max_seq_len, tokenizer.pad_id)
    utils.log_rank_zero(log, summary)
    return dataset
