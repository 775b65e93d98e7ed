"""CodeContests solutions as Alpaca-templated samples (docs/data.md), drawn by the line index, read when asked."""

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
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
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
# The prompt ends in a newline, which SentencePiece never merges across, so its ids are a prefix of the sample's.
_NOT_A_PREFIX = "the tokenizer merges across the end of the prompt, so the prompt cannot be masked exactly"


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
    if tuple(tokens[:n_prompt]) != prompt_tokens:
        raise DataError(f"task {record.get('task_id')}: {_NOT_A_PREFIX}")
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
    for path in (jsonl, metadata):  # read later by every rank and data worker: refused here, once
        if not os.access(path, os.R_OK):
            raise DataError(f"{path}: this user cannot read it (Permission denied); make it readable (chmod a+r)")
    return jsonl, metadata


def parse_record(jsonl: Path, line: int, raw: bytes) -> Dict[str, Any]:
    """One JSONL line (0-based `line`), decoded and checked: the fields a sample needs, typed."""
    where = f"{jsonl}:{line + 1}"
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}); the line is damaged") from e
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
) -> Tuple[List[Tuple[str, int, int]], Optional[List[float]]]:
    """(label, lowest, highest difficulty) of each configured bin, and their weights if given; checked."""
    if bins is None:
        if weights is not None:
            raise DataError("difficulty_weights needs difficulty_bins ({name: [lowest, highest]}) to weigh")
        return [("the split", -(2**15), 2**15 - 1)], None
    if not isinstance(bins, Mapping) or not bins:
        raise DataError(f"difficulty_bins must map bin names to [lowest, highest] difficulty, got {bins!r}")
    for name, bounds in bins.items():
        ints = isinstance(bounds, Sequence) and len(bounds) == 2 and all(type(b) is int for b in bounds)
        if not (ints and bounds[0] <= bounds[1]):
            raise DataError(f"difficulty_bins.{name} must be [lowest, highest] (integers, inclusive), got {bounds!r}")
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
        weights = [float(weights[name]) for name in bins]
    return [(f"bin '{name}' (difficulty {lo}..{hi})", lo, hi) for name, (lo, hi) in bins.items()], weights


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
    rank = torch.empty_like(order)  # place among the problem's elements: position minus the problem's first
    rank[order] = torch.arange(len(order)) - torch.searchsorted(problems[order], problems[order])
    return rank < cap


def problem_fold(problem_id: str, folds: int) -> int:
    """sha256 of the id mod `folds`, not the salted `hash`: runs months apart must agree on every problem's fold."""
    return int.from_bytes(hashlib.sha256(problem_id.encode("utf-8")).digest()[:8], "big") % folds


def fold_of_lines(index: SplitIndex, folds: int) -> torch.Tensor:
    """Each line's fold (int64), its problem's: whatever the seed, the line order or the ranks."""
    return torch.tensor([problem_fold(p, folds) for p in index.problems], dtype=torch.int64)[index.problem.long()]


def select_lines(index: SplitIndex, n_samples, correct_ratio, bins, weights, max_per_problem, seed, folds, fold):
    """Sorted lines of `n_samples` samples drawn without replacement, by the seed and index alone: alike on any rank."""
    bins, weights = _bins(bins, weights)
    labels = ", ".join(label for label, _, _ in bins)
    masks = [(index.difficulty >= lo) & (index.difficulty <= hi) for _, lo, hi in bins]
    in_bins = torch.stack(masks).sum(0)
    if bool((in_bins > 1).any()):
        raise DataError(f"difficulty_bins overlap: {labels}; give each difficulty one bin")
    outside = int((in_bins == 0).sum())
    if outside:
        log.info(f"{index.jsonl}: {outside} of {len(index)} lines fall in no difficulty bin and are never drawn")
    empty = [label for (label, _, _), mask in zip(bins, masks) if not mask.any()]
    if empty:  # a bin that can never be drawn is a mistake in the bins (the one bin of no bins holds every line)
        raise DataError(
            f"{index.jsonl}: difficulty {', '.join(empty)} holds no line; difficulties present: "
            f"{sorted(set(index.difficulty.tolist()))}. Fix or drop the bin"
        )
    # Held-out problems leave before the draw, so bins are weighed by (and drawn from) the other folds alone.
    held_out = ""
    if folds is not None:
        of_line = fold_of_lines(index, folds)
        masks = [mask & (of_line != fold) for mask in masks]
        held_out = f" outside the held-out fold {fold} of folds={folds}"
        counts = "; ".join(
            f"fold {k}: {index.problem[of_line == k].unique().numel()} problems, {int((of_line == k).sum())} lines"
            for k in range(folds)
        )
        utils.log_rank_zero(
            log, f"{index.jsonl}: {folds} folds by problem ({counts}); fold {fold} is held out of this draw"
        )
    weights = weights or [int(m.sum()) for m in masks]
    if not sum(weights) > 0:
        raise DataError(f"{index.jsonl}: no line{held_out} falls in {labels}")

    generator = torch.Generator().manual_seed(seed)
    chosen, shortfalls, report = [], [], []
    for (where, _, _), mask, quota in zip(bins, masks, _quotas(n_samples, weights)):
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
        with open(index.jsonl, "rb") as f, tqdm(total=len(mine), desc=desc, disable=rank != 0) as bar:
            for at in range(0, len(mine), _MEASURE_BATCH):
                batch = mine[at : at + _MEASURE_BATCH]
                records = [parse_record(index.jsonl, line, index.read_line(line, f.fileno())) for line in batch]
                for line, record in zip(batch, records):
                    if record["is_correct"] != bool(index.is_correct[line]):
                        raise DataError(
                            f"{index.jsonl}:{line + 1}: is_correct={record['is_correct']} but {index.metadata.name} "
                            f"says {not record['is_correct']} for this line; the metadata does not belong to this file"
                        )
                measured += token_counts(tokenizer, records, [f"{index.jsonl}:{line + 1}" for line in batch], threads)
                bar.update(len(batch))
        parts = [measured] * world  # all_gather_object fills in the other ranks' shares
        if world > 1:
            dist.all_gather_object(parts, measured)
        for r, part in enumerate(parts):  # (tokens, prompt tokens) of each line of rank r's share
            values = torch.tensor(part, dtype=torch.int32).reshape(-1, 2).T
            lengths.total[missing[r::world]], lengths.prompt[missing[r::world]] = values
        lengths.save()
    return lengths.total[lines].clone(), lengths.prompt[lines].clone()


def token_counts(tokenizer: ModelTokenizer, records: List[dict], where: List[str], threads: int = 1) -> List[tuple]:
    """(tokens, prompt tokens) of each record as `tokenize_sample` counts them, batched in `threads` (1.8x with 2)."""
    spm = getattr(getattr(tokenizer, "_spm_model", None), "spm_model", None)

    def encode(texts: List[str], add_eos: bool) -> List[List[int]]:
        if spm is None:
            return [tokenizer.encode(text, add_bos=True, add_eos=add_eos) for text in texts]
        return spm.encode(texts, add_bos=True, add_eos=add_eos, out_type=int, num_threads=threads)

    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    full = encode([p + r["output"] for p, r in zip(prompts, records)], add_eos=True)
    unique = list(dict.fromkeys(prompts))  # a problem's solutions share its prompt
    encoded = dict(zip(unique, encode(unique, add_eos=False)))
    counts = []
    for prompt, tokens, at in zip(prompts, full, where):
        if tokens[: len(encoded[prompt])] != encoded[prompt]:
            raise DataError(f"{at}: {_NOT_A_PREFIX}")
        counts.append((len(tokens), len(encoded[prompt])))
    if records:  # the batch must count as tokenize_sample does: checked on one record per batch
        tokens, labels = tokenize_sample(tokenizer, records[0])
        if counts[0] != (len(tokens), labels.count(CROSS_ENTROPY_IGNORE_IDX)):
            raise RuntimeError(f"{where[0]}: batch tokenization counts {counts[0]}, tokenize_sample {len(tokens)}")
    return counts


class CodeContestsDataset(Dataset):
    """Items `{"tokens", "labels"}` for `padded_collate_sft`, read and tokenized when asked, truncated to `max_seq_len`.
    Per sample it holds only a line number, byte range and length: memory grows with the samples, not the file."""

    packed = False  # as torchtune's datasets say which collate function they need

    def __init__(
        self, index: SplitIndex, lines: torch.Tensor, lengths: torch.Tensor, tokenizer: ModelTokenizer, max_seq_len: int
    ):
        self.jsonl, self.metadata, self.lines = index.jsonl, index.metadata, lines
        self.fingerprint = index.fingerprint()  # of the split's files, for a resume to find them changed
        self.lengths = lengths.clamp(max=max_seq_len)  # tokens per item, after truncation
        self._full_lengths = lengths
        self._starts, self._ends = index.offsets[lines].clone(), index.offsets[lines + 1].clone()
        self._is_correct = index.is_correct[lines].clone()
        self.problem_ids = [index.problems[p] for p in index.problem[lines].tolist()]  # each item's problem
        self._file_end = int(index.offsets[-1])
        self._tokenizer, self._max_seq_len = tokenizer, max_seq_len
        self._fd = -1

    def __len__(self) -> int:
        return len(self.lines)

    def record(self, i: int) -> Dict[str, Any]:
        """The JSON record of item i, checked."""
        if self._fd < 0:  # opened once; forked workers share it, as pread keeps no file position
            self._fd = os.open(self.jsonl, os.O_RDONLY)
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
        return dict(self.__dict__, _fd=-1)  # a file descriptor does not travel to spawned workers


class PackedCodeContestsDataset(Dataset):
    """Rows of `max_seq_len` tokens, one pack each, laid out as torchtune's `PackedDataset` does for
    `padded_collate_packed`: `input_pos` restart at each sample, `seq_lens` count the padding as one more."""

    packed = True

    def __init__(self, samples: CodeContestsDataset, packs: Packs, max_seq_len: int, pad_id: int):
        self.samples, self.packs, self.lengths = samples, packs, samples.lengths
        self.jsonl, self.fingerprint = samples.jsonl, samples.fingerprint
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
    """Draw `n_samples` samples of a processed CodeContests split by its metadata; every argument but the
    tokenizer is a `dataset.` key of docs/data.md. With `folds`, only problems outside `fold` (by `problem_fold`)."""
    # Checked before the index is built: a mistake in the keys shows at once.
    if long_samples not in LONG_SAMPLES:
        raise DataError(f"long_samples must be one of {LONG_SAMPLES}, got {long_samples!r}")
    if type(max_seq_len) is not int or max_seq_len <= 0:
        raise DataError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    if type(n_samples) is not int or n_samples <= 0:
        raise DataError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(correct_ratio, (int, float)) or not 0.0 <= correct_ratio <= 1.0:
        raise DataError(f"correct_ratio must be in [0, 1], got {correct_ratio!r}")
    if max_per_problem is not None and (type(max_per_problem) is not int or max_per_problem <= 0):
        raise DataError(f"max_per_problem must be a positive integer or null, got {max_per_problem!r}")
    if folds is None and fold is not None:
        raise DataError(f"fold={fold!r} needs folds (the number of cross-fitting folds, e.g. folds: 2); got null")
    if folds is not None and (type(folds) is not int or folds < 2):
        raise DataError(f"folds must be an integer >= 2 (cross-fitting folds) or null for none, got {folds!r}")
    if folds is not None and (type(fold) is not int or not 0 <= fold < folds):
        raise DataError(
            f"fold must be the fold held out of this training run, an integer from 0 to {folds - 1} "
            f"(folds={folds}), got {fold!r}"
        )
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
    fate = "dropped" if long_samples == "drop" else f"({cut} truncated, {lost} dropped: their prompt alone fills it)"
    summary = f"{jsonl}: {int(keep.sum())} samples kept of {len(lines)} drawn from {len(index)} lines; "
    summary += f"{int(too_long.sum())} longer than max_seq_len={max_seq_len} {fate}"
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
