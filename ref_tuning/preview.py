"""Which tokens would Rho-1 train on? The excess loss of a policy over the reference, previewed.

    python -m ref_tuning.preview REF_SCORES POLICY --out DIR [--k 0.6] [--examples 4]
        [--device cpu|cuda] [--dtype fp32|bf16] [--batch-size 4]

REF_SCORES is a score store of the reference (`recipes/ref_score.py`); POLICY is the policy's HF
directory (its losses are computed here, on the same samples, the same way) or a score store of it.
For every response token, the excess loss is the policy's loss minus the reference's; Rho-1 trains
on the tokens whose excess loss is in the top `k` (0.6 by default). Rho-1 picks them within each
batch; over the preview's samples they are picked over all tokens at once, which a random batch of
Rho-1 approximates. Written into DIR: `preview.md` (the share of tokens selected by their position in
the solution and by the problem's difficulty, and examples with the selected tokens marked
`⟦like this⟧`) and `preview.json`.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torchtune import training
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from ref_tuning.config import positive_int, share
from ref_tuning.scoring import STORE_CONFIG, ScoreError, ScoreStore

POSITION_BINS = 10  # tenths of the solution


def select_top(excess: Dict[str, torch.Tensor], k: float) -> Dict[str, torch.Tensor]:
    """Per sample, a mask of the tokens among the top `k` share of all tokens by excess loss (ties
    broken by order, so that exactly round(k * tokens) are chosen)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    names = list(excess)
    flat = torch.cat([excess[n] for n in names]) if names else torch.zeros(0)
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[torch.argsort(flat, descending=True, stable=True)[: round(k * len(flat))]] = True
    masks, at = {}, 0
    for n in names:
        masks[n] = chosen[at : at + len(excess[n])]
        at += len(excess[n])
    return masks


def shares(masks: Dict[str, torch.Tensor], difficulty: Dict[str, int]) -> Dict[str, Dict[str, List[float]]]:
    """The share of tokens selected, by tenth of the solution and by difficulty: {group: [selected, tokens]}."""
    by_position = {f"{10 * b}-{10 * (b + 1)}%": [0, 0] for b in range(POSITION_BINS)}
    by_difficulty: Dict[str, List[int]] = {}
    for name, mask in masks.items():
        n = len(mask)
        for i, selected in enumerate(mask.tolist()):
            b = min(i * POSITION_BINS // n, POSITION_BINS - 1)
            key = f"{10 * b}-{10 * (b + 1)}%"
            by_position[key][0] += selected
            by_position[key][1] += 1
        slot = by_difficulty.setdefault(str(difficulty[name]), [0, 0])
        slot[0] += int(mask.sum())
        slot[1] += n
    by_difficulty = dict(sorted(by_difficulty.items(), key=lambda kv: int(kv[0])))
    return {"position in the solution": by_position, "difficulty": by_difficulty}


def render(pieces: List[str], mask: torch.Tensor) -> str:
    """The response with each run of selected tokens marked ⟦…⟧."""
    out, inside = [], False
    for piece, selected in zip(pieces, mask.tolist()):
        if selected and not inside:
            out.append("⟦")
        elif not selected and inside:
            out.append("⟧")
        inside = selected
        out.append(piece)
    if inside:
        out.append("⟧")
    return "".join(out)


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


def preview(ref: Path, policy: Path, out: Path, k: float = 0.6, examples: int = 4, device: str = "cpu",
            dtype: str = "fp32", batch_size: int = 4, progress: bool = True) -> Dict[str, Any]:  # fmt: skip
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    from ref_tuning.checkpointing import read_hf_config
    from ref_tuning.paths import check_separate
    from ref_tuning.scoring import check_vocab, load_reference, score_dataset

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
    is_store = (policy / STORE_CONFIG).is_file()
    policy_store = ScoreStore(policy) if is_store else None
    models = [description["model_dir"], policy_store.description["model_dir"] if is_store else policy]
    if not is_store:
        read_hf_config(policy)  # names the directory and what it lacks
    # A store's model may have moved since it was scored: compare the models that are still there.
    check_vocab([d for d in models if (Path(d) / "config.json").is_file()], tokenizer.vocab_size,
                description["tokenizer"]["path"])  # fmt: skip
    if is_store:
        if policy_store.description["dataset"] != description["dataset"]:
            raise ScoreError(f"{policy}: scores other samples than {ref} (its dataset config differs)")
        policy_losses = {s.task_id: policy_store.losses(s.task_id) for s in policy_store}
    else:
        from tqdm import tqdm

        model = load_reference(policy, torch.device(device), training.get_dtype(dtype, torch.device(device)))
        bar = tqdm(total=len(samples), desc="scoring with the policy", disable=not progress)
        scored = score_dataset(model, ds, [index_of[s.line] for s in samples], None, torch.device(device), batch_size,
                               tokenizer.pad_id, bar)  # fmt: skip
        bar.close()
        policy_losses = {info["task_id"]: x for info, x in scored}
    excess, difficulty = {}, {}
    for s in samples:
        if s.task_id not in policy_losses:
            continue
        ref_losses = ref_store.losses(s.task_id)
        if len(ref_losses) != len(policy_losses[s.task_id]):
            raise ScoreError(f"{ref}: {s.task_id} has {len(ref_losses)} scored tokens, the policy "
                             f"{len(policy_losses[s.task_id])}")  # fmt: skip
        excess[s.task_id] = policy_losses[s.task_id] - ref_losses
        difficulty[s.task_id] = s.difficulty
    masks = select_top(excess, k)
    table = shares(masks, difficulty)
    total = sum(len(m) for m in masks.values())
    lines = [f"# Excess-loss preview\n\nreference scores: {ref}; policy: {policy}; {len(masks)} samples, {total} "
             f"response tokens; Rho-1 would train on the top {k:.0%} by excess loss (policy loss minus reference "
             f"loss): {sum(int(m.sum()) for m in masks.values())} tokens.\n"]  # fmt: skip
    for title, groups in table.items():
        lines += [f"\n## Share of tokens selected, by {title}\n", f"| {title} | selected | tokens | share |",
                  "| --- | ---: | ---: | ---: |"]  # fmt: skip
        lines += [f"| {g} | {s} | {n} | {s / n:.3f} |" for g, (s, n) in groups.items() if n]
    lines.append("\n## Examples (selected tokens marked ⟦ ⟧)\n")
    for name in list(masks)[:examples]:  # only these lines are read again, for their token ids
        sample = ds[index_of[ref_store.sample(name).line]]
        pairs = zip(sample["tokens"][1:], sample["labels"][1:])
        response = [t for t, label in pairs if label != CROSS_ENTROPY_IGNORE_IDX]
        lines += [f"\n### {name} (difficulty {difficulty[name]}, {int(masks[name].sum())} of {len(masks[name])} "
                  f"tokens selected)\n", "```", render(_pieces(tokenizer, response), masks[name]), "```"]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "preview.md").write_text("\n".join(lines) + "\n")
    result = {"k": k, "samples": len(masks), "tokens": total, "selected": sum(int(m.sum()) for m in masks.values()),
              "shares": table}  # fmt: skip
    (out / "preview.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ref_tuning.preview", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("ref_scores", type=Path, help="the reference's score store")
    parser.add_argument("policy", type=Path, help="the policy: an HF directory, or a score store of it")
    parser.add_argument("--out", type=Path, required=True, help="where preview.md and preview.json go")
    parser.add_argument("--k", type=share, default=0.6, help="share of tokens Rho-1 selects (default 0.6)")
    parser.add_argument("--examples", type=int, default=4, help="samples rendered with their selection")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        preview(args.ref_scores, args.policy, args.out, args.k, args.examples, args.device, args.dtype,
                args.batch_size, not args.no_progress)  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((args.out / "preview.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
