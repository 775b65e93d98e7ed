"""Which tokens would Rho-1 train on? The excess loss of a policy over the reference, previewed.

    python -m ref_tuning.preview REF_SCORES POLICY --out DIR [--k 0.6] [--examples 4] ...

REF_SCORES is the reference's score store (`recipes/ref_score.py`); POLICY an HF directory (scored here the same
way) or a score store. The excess loss (policy loss minus reference loss) of the top `k` of all the preview's
tokens selects them, as Rho-1 does within a batch. Writes `preview.md` (shares selected by position and by
difficulty, examples with selected tokens marked `⟦like this⟧`) and `preview.json`.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf
from torchtune import config as tt_config, training
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from tqdm import tqdm

from ref_tuning.checkpointing import read_hf_config
from ref_tuning.config import positive_int, share
from ref_tuning.paths import check_separate
from ref_tuning.scoring import STORE_CONFIG, ScoreError, ScoreStore, check_vocab, load_reference, score_dataset

POSITION_BINS = 10  # tenths of the solution


def select_top(excess: Dict[str, torch.Tensor], k: float) -> Dict[str, torch.Tensor]:
    """Per sample, a mask of the tokens among the top `k` share of all tokens by excess loss (ties
    broken by order, so that exactly round(k * tokens) are chosen)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    flat = torch.cat(list(excess.values())) if excess else torch.zeros(0)
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[torch.argsort(flat, descending=True, stable=True)[: round(k * len(flat))]] = True
    return dict(zip(excess, chosen.split([len(x) for x in excess.values()])))


def shares(masks: Dict[str, torch.Tensor], difficulty: Dict[str, int]) -> Dict[str, Dict[str, List[float]]]:
    """The share of tokens selected, by tenth of the solution and by difficulty: {group: [selected, tokens]}."""
    selected, tokens = torch.zeros(POSITION_BINS, dtype=torch.long), torch.zeros(POSITION_BINS, dtype=torch.long)
    by_difficulty: Dict[str, List[int]] = {}
    for name, mask in masks.items():
        bins = torch.arange(len(mask)) * POSITION_BINS // max(len(mask), 1)
        selected += torch.bincount(bins[mask], minlength=POSITION_BINS)
        tokens += torch.bincount(bins, minlength=POSITION_BINS)
        slot = by_difficulty.setdefault(str(difficulty[name]), [0, 0])
        slot[0] += int(mask.sum())
        slot[1] += len(mask)
    by_position = {f"{10 * b}-{10 * (b + 1)}%": [int(selected[b]), int(tokens[b])] for b in range(POSITION_BINS)}
    return {
        "position in the solution": by_position,
        "difficulty": dict(sorted(by_difficulty.items(), key=lambda kv: int(kv[0]))),
    }


def render(pieces: List[str], mask: torch.Tensor) -> str:
    """The response with each run of selected tokens marked ⟦…⟧."""
    runs = itertools.groupby(zip(pieces, mask.tolist()), key=lambda pair: pair[1])
    return "".join(("⟦{}⟧" if selected else "{}").format("".join(p for p, _ in run)) for selected, run in runs)


def _pieces(tokenizer, ids: List[int]) -> List[str]:
    """Each token as the text it stands for (SentencePiece: ▁ is a space, <0x0A> a byte)."""
    spm = tokenizer._spm_model.spm_model
    out = []
    for i in ids:
        piece = spm.id_to_piece(i)
        if spm.is_byte(i):
            piece = bytes([int(piece[3:-1], 16)]).decode("latin-1")
        elif spm.is_control(i):
            piece = f"<{piece.strip('<>')}>"
        out.append(piece.replace("\u2581", " "))
    return out


def preview(
    ref: Path,
    policy: Path,
    out: Path,
    k: float = 0.6,
    examples: int = 4,
    device: str = "cpu",
    dtype: str = "fp32",
    batch_size: int = 4,
    progress: bool = True,
) -> Dict[str, Any]:
    try:
        check_separate([ref, policy], [out])
    except ValueError as e:
        raise ValueError(f"--out: {e}") from None
    ref_store = ScoreStore(ref)
    description = ref_store.description
    tokenizer = tt_config.instantiate(OmegaConf.create(description["tokenizer"]))
    ds = tt_config.instantiate(OmegaConf.create(description["dataset"]), tokenizer)
    index_of = {line: i for i, line in enumerate(ds.lines.tolist())}  # dataset item of each line
    samples = [s for s in ref_store if s.line in index_of]
    if not samples:
        raise ScoreError(f"{ref}: none of its samples is in its dataset any more; score it again")
    policy_store = ScoreStore(policy) if (policy / STORE_CONFIG).is_file() else None
    if policy_store is None:
        read_hf_config(policy)  # names the directory and what it lacks
    models = [description["model_dir"], policy_store.description["model_dir"] if policy_store else policy]
    # A store's model may have moved since it was scored: compare the models that are still there.
    models = [d for d in models if (Path(d) / "config.json").is_file()]
    check_vocab(models, tokenizer.vocab_size, description["tokenizer"]["path"])
    if policy_store is not None:
        if policy_store.description["dataset"] != description["dataset"]:
            raise ScoreError(f"{policy}: scores other samples than {ref} (its dataset config differs)")
        policy_losses = {s.task_id: policy_store.losses(s.task_id) for s in policy_store}
    else:
        device = torch.device(device)
        model = load_reference(policy, device, training.get_dtype(dtype, device))
        with tqdm(total=len(samples), desc="scoring with the policy", disable=not progress) as bar:
            items = [index_of[s.line] for s in samples]
            scored = score_dataset(model, ds, items, None, device, batch_size, tokenizer.pad_id, bar)
        policy_losses = {info["task_id"]: x for info, x in scored}
    excess, difficulty = {}, {}
    for s in (s for s in samples if s.task_id in policy_losses):
        ref_losses, losses = ref_store.losses(s.task_id), policy_losses[s.task_id]
        if len(ref_losses) != len(losses):
            raise ScoreError(f"{ref}: {s.task_id} has {len(ref_losses)} scored tokens, the policy {len(losses)}")
        excess[s.task_id], difficulty[s.task_id] = losses - ref_losses, s.difficulty
    masks = select_top(excess, k)
    table = shares(masks, difficulty)
    total, selected = sum(len(m) for m in masks.values()), sum(int(m.sum()) for m in masks.values())
    lines = [
        f"# Excess-loss preview\n\nreference scores: {ref}; policy: {policy}; {len(masks)} samples, {total} "
        f"response tokens; Rho-1 would train on the top {k:.0%} by excess loss (policy loss minus reference "
        f"loss): {selected} tokens.\n"
    ]
    for title, groups in table.items():
        lines += [f"\n## Share of tokens selected, by {title}\n| {title} | selected | tokens | share |"]
        lines += ["| --- | ---: | ---: | ---: |"] + [
            f"| {g} | {s} | {n} | {s / n:.3f} |" for g, (s, n) in groups.items() if n
        ]
    lines.append("\n## Examples (selected tokens marked ⟦ ⟧)\n")
    for name in list(masks)[:examples]:  # only these lines are read again, for their token ids
        sample = ds[index_of[ref_store.sample(name).line]]
        pairs = zip(sample["tokens"][1:], sample["labels"][1:])
        text = render(_pieces(tokenizer, [t for t, label in pairs if label != CROSS_ENTROPY_IGNORE_IDX]), masks[name])
        m = masks[name]
        lines.append(f"\n### {name} (difficulty {difficulty[name]}, {int(m.sum())} of {len(m)} tokens selected)\n")
        lines += ["```", text, "```"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "preview.md").write_text("\n".join(lines) + "\n")
    result = {"k": k, "samples": len(masks), "tokens": total, "selected": selected, "shares": table}
    (out / "preview.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ref_tuning.preview", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ref", metavar="REF_SCORES", type=Path, help="the reference's score store")
    parser.add_argument("policy", type=Path, help="the policy: an HF directory, or a score store of it")
    parser.add_argument("--out", type=Path, required=True, help="where preview.md and preview.json go")
    parser.add_argument("--k", type=share, default=0.6, help="share of tokens Rho-1 selects (default 0.6)")
    parser.add_argument("--examples", type=int, default=4, help="samples rendered with their selection")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    try:
        preview(**vars(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((args.out / "preview.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
