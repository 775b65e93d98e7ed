"""Per-token reference losses exactly as Rho-1 computes them, and a compact store for them (docs/rho1.md).

Rho-1 feeds the reference a sample's ids (BOS, Alpaca prompt, solution, EOS; no attention mask) and takes, in
float32, the cross-entropy of each response token; a test checks `token_losses` against `transformers`. A part's
table (`.idx`) gets a sample's line only once its values are in the `.bin`, so a killed run leaves every listed
sample whole; the next run scores again what is damaged (past the end of its `.bin`, or a garbled line).
"""

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft

from ref_tuning.atomic import atomic_output, write_error
from ref_tuning.hf_checkpoint import load_tune_state_dict, read_hf_config
from ref_tuning.models import llama_from_hf_config

STORE_CONFIG = "scores.json"
DATA_KEY = "data_files"  # in STORE_CONFIG: the scored split's file and its fingerprint (`SplitIndex.fingerprint`)
VALUE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class ScoreError(ValueError):
    """A score store that cannot be used as asked; the message names the store and the fix."""


def check_vocab(model_dirs: Sequence[Union[str, Path]], tokenizer_size: int, tokenizer_name: str) -> None:
    """Losses are comparable only between models of one vocabulary that covers the tokenizer's ids."""
    sizes = {Path(d) / "config.json": read_hf_config(d)["vocab_size"] for d in model_dirs}
    if len(set(sizes.values())) > 1:
        found = ", ".join(f"{p}: vocab_size {v}" for p, v in sizes.items())
        raise ScoreError(f"the models have different vocabularies ({found}); compare models that share one tokenizer")
    path, size = next(iter(sizes.items()), ("", tokenizer_size))  # no models: nothing to check
    if tokenizer_size > size:
        raise ScoreError(
            f"{tokenizer_name}: {tokenizer_size} token ids, more than vocab_size {size} in {path}; "
            "use the tokenizer of these models"
        )


def load_reference(model_dir: Union[str, Path], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The HF directory's model as our torchtune model, in `dtype` on `device`, for inference."""
    with torch.device("meta"):
        model = llama_from_hf_config(read_hf_config(model_dir))
    state = {name: tensor.to(dtype) for name, tensor in load_tune_state_dict(model_dir).items()}
    model.load_state_dict(state, strict=True, assign=True)
    with torch.device(device):
        for m in model.modules():
            if hasattr(m, "rope_init"):  # RoPE buffers are not in the state dict
                m.rope_init()
    return model.to(device).eval()


def token_losses(
    model: torch.nn.Module, samples: Sequence[Dict[str, List[int]]], device: torch.device, pad_id: int = 0
) -> List[torch.Tensor]:
    """Per sample, the float32 cross-entropy of each response token given the tokens before it."""
    return [losses for losses, _ in token_scores(model, samples, device, pad_id)]


@torch.no_grad()
def token_scores(
    model: torch.nn.Module, samples: Sequence[Dict[str, List[int]]], device: torch.device, pad_id=0, entropy=False
) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Per sample, `token_losses`' losses and, with `entropy`, the float32 entropy of each predictive distribution."""
    batch = padded_collate_sft(list(samples), padding_idx=pad_id, ignore_idx=CROSS_ENTROPY_IGNORE_IDX)
    # Right padding under a causal mask: a sample's positions never see the padding after them.
    logits = model(batch["tokens"].to(device))
    labels = batch["labels"].to(device)
    scores = []
    for x, y, k in zip(logits, labels, labels[:, 1:] != CROSS_ENTROPY_IGNORE_IDX):
        # cross_entropy is nll_loss of log_softmax (the same bits): one log-softmax serves losses and entropies.
        logp = F.log_softmax(x[:-1][k].float(), dim=-1)
        losses = F.nll_loss(logp, y[1:][k], reduction="none").cpu()
        # Clamped as torch.distributions does: a -inf log-probability (p = 0) adds 0, not nan.
        entropies = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1).cpu() if entropy else None
        scores.append((losses, entropies))
    return scores


@dataclass(frozen=True)
class ScoredSample:
    task_id: str
    line: int
    is_correct: bool
    difficulty: int
    part: str
    offset: int  # in values
    count: int
    fold: Optional[int] = None  # cross-fitted stores: the sample's fold, scored by the model that never trained on it


class ScoreWriter:
    """Appends samples' losses (with `store_entropy`, entropies too) to one part of a store, one per process and run."""

    def __init__(self, store: Path, run_id: str, rank: int, store_dtype: str = "float16", store_entropy: bool = False):
        self._dtype = VALUE_DTYPES[store_dtype]
        self.store_entropy = store_entropy
        name = f"part-{run_id}-{rank:05d}"
        self._bin = open(store / f"{name}.bin", "ab")
        self._table = open(store / f"{name}.idx", "a", encoding="utf-8")
        self._offset = 0
        self._pending: List[Dict[str, Any]] = []  # sample lines of values not flushed yet

    def write(self, info: Dict[str, Any], losses: torch.Tensor, entropies: Optional[torch.Tensor] = None) -> None:
        values = losses
        if self.store_entropy:  # every sample of the store has them, or none: the layout is the store's
            if getattr(entropies, "shape", None) != losses.shape:
                found = "none" if entropies is None else f"shape {tuple(entropies.shape)}"
                raise ValueError(f"store_entropy: expected an entropy per loss ({len(losses)}), got {found}")
            values = torch.cat([losses, entropies])
        try:
            self._bin.write(values.to(self._dtype).numpy().tobytes())
        except OSError as e:  # a full disk: the samples not in the table yet are scored again by the next run
            raise write_error(Path(self._bin.name), e) from e
        self._pending.append(dict(info, offset=self._offset, count=len(losses)))
        self._offset += len(values)

    def flush(self) -> None:
        """Make what was written durable: the values first, then their sample lines."""
        for f, lines in ((self._bin, []), (self._table, [json.dumps(entry) + "\n" for entry in self._pending])):
            try:
                f.writelines(lines)
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:  # a line cut short by a full disk is left out by the reader, and scored again
                raise write_error(Path(f.name), e) from e
        self._pending = []

    def close(self) -> None:
        self.flush()
        self._bin.close()
        self._table.close()


def new_run_id() -> str:
    return secrets.token_hex(4)


def open_store(store: Path, description: Dict[str, Any]) -> None:
    """Create the store, or check that an existing one holds scores of the same model and data."""
    path = store / STORE_CONFIG
    if not path.is_file():
        with atomic_output(path, overwrite=True) as tmp:  # creates the store's folder
            tmp.write_text(json.dumps(description, indent=2) + "\n")
        return
    found = json.loads(path.read_text())
    if DATA_KEY not in found:  # a store from before the record: continued unchecked, as before
        description = {key: value for key, value in description.items() if key != DATA_KEY}
    check_data(store, found, description.get(DATA_KEY))
    if found != description:
        changed = sorted(k for k in set(found) | set(description) if found.get(k) != description.get(k))
        raise ScoreError(
            f"{store}: holds scores of another run (differing in {', '.join(changed)}); "
            "choose another output_dir, or delete the store to score again"
        )


def data_record(ds) -> Dict[str, str]:
    """What a store records of the split it scores, for `check_data`."""
    return {"jsonl": str(Path(ds.jsonl).resolve()), "fingerprint": ds.fingerprint}


def check_data(store: Path, description: Dict[str, Any], now: Optional[Dict[str, str]]) -> None:
    """The split is the one the store scored: a store knows its samples by line, and a changed file moves them."""
    recorded = description.get(DATA_KEY)
    if recorded and now and recorded["jsonl"] == now["jsonl"] and recorded["fingerprint"] != now["fingerprint"]:
        raise ScoreError(
            f"{now['jsonl']}: changed since {store} was scored (its lines are no longer the samples scored); "
            "score into a new output_dir, or delete the store to score the file as it is now"
        )


class ScoreStore:
    """The scores of a store directory, by `task_id` (or by line)."""

    def __init__(self, store: Union[str, Path]):
        self.path = Path(store)
        self._fds: Dict[str, int] = {}  # part -> open file: a reader looks up sample after sample
        if not (self.path / STORE_CONFIG).is_file():
            raise ScoreError(f"{self.path}: not a score store (no {STORE_CONFIG}); run recipes/ref_score.py first")
        self.description = json.loads((self.path / STORE_CONFIG).read_text())
        self._dtype = VALUE_DTYPES[self.description["store_dtype"]]
        self.has_entropy = bool(self.description.get("store_entropy", False))  # then each loss has an entropy
        self._samples: Dict[str, ScoredSample] = {}
        self.damaged: Dict[str, str] = {}  # task_id (or "<part>.idx line n") -> the part file that should hold it
        for table in sorted(self.path.glob("part-*.idx")):
            values = table.with_suffix(".bin")
            size = values.stat().st_size if values.is_file() else 0
            with open(table, encoding="utf-8", errors="replace") as f:
                lines = [line for line in f if line.endswith("\n")]  # a last line cut short by a crash is left out
            for number, line in enumerate(lines, 1):
                try:
                    sample = ScoredSample(part=table.stem, **json.loads(line))
                except (ValueError, TypeError):  # garbled, not an object, or fields missing or unknown
                    self.damaged[f"{table.name} line {number}"] = table.name
                    continue
                if (sample.offset + (1 + self.has_entropy) * sample.count) * self._dtype.itemsize > size:
                    self.damaged[sample.task_id] = values.name
                else:
                    self._samples.setdefault(sample.task_id, sample)
        self.damaged = {key: part for key, part in self.damaged.items() if key not in self._samples}  # scored again

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[ScoredSample]:
        return iter(sorted(self._samples.values(), key=lambda s: s.line))

    def lines(self) -> set:
        return {s.line for s in self._samples.values()}

    def sample(self, task_id: str) -> ScoredSample:
        if task_id in self._samples:
            return self._samples[task_id]
        if task_id in self.damaged:
            raise ScoreError(
                f"{self.path / self.damaged[task_id]}: the scores of task_id {task_id!r} are cut off (the file is "
                "shorter than the part's table says); run recipes/ref_score.py again with the same config to score "
                "what is damaged"
            )
        raise ScoreError(f"{self.path}: no scores for task_id {task_id!r} ({len(self)} samples scored)")

    def losses(self, task_id: str) -> torch.Tensor:
        """The float32 losses of one sample's response tokens, in order."""
        return self._values(task_id, entropies=False)

    def entropies(self, task_id: str) -> torch.Tensor:
        """The float32 entropies of the model's predictive distributions at one sample's response tokens, in order."""
        if not self.has_entropy:
            raise ScoreError(
                f"{self.path}: holds no entropies (scored with store_entropy: false); score into a new "
                "output_dir with store_entropy=true to have them"
            )
        return self._values(task_id, entropies=True)

    def _values(self, task_id: str, entropies: bool) -> torch.Tensor:
        s, size = self.sample(task_id), self._dtype.itemsize
        if s.part not in self._fds:  # pread keeps no file position: safe to share with forked workers
            self._fds[s.part] = os.open(self.path / f"{s.part}.bin", os.O_RDONLY)
        raw = os.pread(self._fds[s.part], s.count * size, (s.offset + entropies * s.count) * size)  # after the losses
        if len(raw) != s.count * size:
            raise ScoreError(f"{self.path / s.part}.bin: shorter than the part's table says; the store is damaged")
        return torch.frombuffer(bytearray(raw), dtype=self._dtype).float()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


def score_dataset(
    model: torch.nn.Module,
    ds,
    indices: Sequence[int],
    writer: Optional[ScoreWriter],
    device: torch.device,
    batch_size: int,
    pad_id: int,
    progress=None,
    fold: Optional[int] = None,
) -> List[Tuple[Dict[str, Any], torch.Tensor]]:
    """Score items `indices` of `ds` (each line read once), write them if `writer`, return (store fields, losses)."""
    entropy = writer is not None and writer.store_entropy
    scored = []
    for at in range(0, len(indices), batch_size):
        batch = list(indices[at : at + batch_size])
        items = [ds.item(i) for i in batch]
        scores = token_scores(model, [s for s, _ in items], device, pad_id, entropy)
        for i, (_, record), (losses, entropies) in zip(batch, items, scores):
            meta = record.get("metadata")
            difficulty = meta.get("difficulty") if isinstance(meta, dict) else None
            info = dict(task_id=record["task_id"], line=int(ds.lines[i]), is_correct=record["is_correct"])
            info |= dict(difficulty=difficulty if isinstance(difficulty, int) else -1, fold=fold)
            if writer is not None:
                writer.write(info, losses, entropies)
            scored.append((info, losses))
        if writer is not None:
            writer.flush()
        if progress is not None:
            progress.update(len(batch))
    return scored
