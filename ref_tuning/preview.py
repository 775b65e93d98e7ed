"""Which tokens would Rho-1 train on? The excess loss of a policy over the reference, previewed.

    python -m ref_tuning.preview REF_SCORES POLICY --out DIR [--base BASE_SCORES] [--k 0.6] [--examples 4] ...

REF_SCORES is the reference's score store (`recipes/ref_score.py`); POLICY an HF directory (scored here the same
way) or a score store. The excess loss (policy loss minus reference loss) of the top `k` of all the preview's
tokens selects them, as Rho-1 does within a batch. Writes `preview.md` (shares selected by position and by
difficulty, examples with selected tokens marked `⟦like this⟧`) and `preview.json`.

With `--base BASE_SCORES`, the store of the untuned reference over the same samples, REF_SCORES is the tuned one and
the preview also says how far tuning changes Rho-1's selection: the overlap of the two top-k sets (Jaccard, and
the share of the tuned selection also selected with the base), overall, by position and by difficulty, and examples
of tokens that enter (`⟪selected with the tuned reference only⟫`) and leave (`⟬with the base only⟭`) the
selection. Only the samples of both stores are previewed then.
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


def _marked(pieces: List[str], states: List[Any], marks: Dict[Any, str]) -> str:
    """The pieces with each run of one state formatted by its mark."""
    runs = itertools.groupby(zip(pieces, states), key=lambda pair: pair[1])
    return "".join(marks[state].format("".join(p for p, _ in run)) for state, run in runs)


def render(pieces: List[str], mask: torch.Tensor) -> str:
    """The response with each run of selected tokens marked ⟦…⟧."""
    return _marked(pieces, mask.tolist(), {True: "⟦{}⟧", False: "{}"})


# (selected with the tuned reference, selected with the base): brackets that code does not use, one pair a state.
CHANGE_MARKS = {(True, True): "⟦{}⟧", (True, False): "⟪{}⟫", (False, True): "⟬{}⟭", (False, False): "{}"}


def render_change(pieces: List[str], tuned: torch.Tensor, base: torch.Tensor) -> str:
    """The response with runs of tokens selected with both references marked ⟦…⟧, entering the selection
    (with the tuned reference only) ⟪…⟫ and leaving it (with the base only) ⟬…⟭."""
    return _marked(pieces, list(zip(tuned.tolist(), base.tolist())), CHANGE_MARKS)


def _agreement(tokens: int, tuned: int, base: int, both: int, either: int) -> Dict[str, Any]:
    return {
        "tokens": tokens,
        "tuned": tuned,
        "base": base,
        "both": both,
        "entering": tuned - both,
        "leaving": base - both,
        "jaccard": both / either if either else 1.0,  # nothing selected with either: the same (empty) selection
        "tuned_also_base": both / tuned if tuned else None,
    }


def overlap(
    tuned: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor], difficulty: Dict[str, int]
) -> Dict[str, Any]:
    """How far the selection with the tuned reference agrees with the one with the base, over all tokens and by the
    groups of `shares`: token counts selected with each, with both, entering (tuned only), leaving (base only), the
    Jaccard index and the share of the tuned selection also selected with the base."""
    masks = {
        "tuned": tuned,
        "base": base,
        "both": {n: tuned[n] & base[n] for n in tuned},
        "either": {n: tuned[n] | base[n] for n in tuned},
    }
    tables = {name: shares(m, difficulty) for name, m in masks.items()}
    counts = {name: sum(int(x.sum()) for x in m.values()) for name, m in masks.items()}
    result = _agreement(sum(len(x) for x in tuned.values()), **counts)
    result["by"] = {
        title: {
            group: _agreement(n, *(tables[name][title][group][0] for name in masks)) for group, (_, n) in groups.items()
        }
        for title, groups in tables["tuned"].items()
    }
    return result


def compare(
    tuned: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor], difficulty: Dict[str, int], examples: int
) -> Dict[str, Any]:
    """`overlap`, its reading, and the (at most) `examples` samples where the most tokens enter or leave the
    selection, in sample order among equals."""
    result = overlap(tuned, base, difficulty)
    result |= {"samples": len(tuned), "reading": reading(result)}
    changed = {n: int((tuned[n] ^ base[n]).sum()) for n in tuned}
    chosen = sorted((n for n in tuned if changed[n]), key=lambda n: -changed[n])[:examples]
    result["examples"] = [
        {
            "task_id": n,
            "difficulty": difficulty[n],
            "tokens": len(tuned[n]),
            "both": int((tuned[n] & base[n]).sum()),
            "entering": int((tuned[n] & ~base[n]).sum()),
            "leaving": int((~tuned[n] & base[n]).sum()),
        }
        for n in chosen
    ]
    return result


def reading(agreement: Dict[str, Any]) -> str:
    """The comparison in one line."""
    kept = agreement["tuned_also_base"]
    changed = "" if kept is None else f": {1 - kept:.1%} of the tokens selected with the tuned reference are not "
    changed += "" if kept is None else "selected with the base"
    return (
        "An overlap near 1 means tuning the reference does not change what Rho-1 trains on; here the Jaccard index "
        f"is {agreement['jaccard']:.3f}{changed}."
    )


def _comparison_lines(comparison: Dict[str, Any], texts: Dict[str, str]) -> List[str]:
    """The markdown section of the base-against-tuned comparison; `texts`: each example rendered."""
    c, left_out = comparison, comparison["left_out"]
    head = (
        "| {} | tokens | selected with base | with tuned | with both | entering | leaving | Jaccard | tuned also base |"
    )
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"

    def row(group: str, a: Dict[str, Any]) -> str:
        kept = "–" if a["tuned_also_base"] is None else f"{a['tuned_also_base']:.3f}"
        counts = " | ".join(str(a[key]) for key in ("tokens", "base", "tuned", "both", "entering", "leaving"))
        return f"| {group} | {counts} | {a['jaccard']:.3f} | {kept} |"

    lines = [
        f"\n## Base against tuned reference: how far tuning changes the selection\n\nbase reference scores: "
        f"{c['base_scores']}; "
        f"the {c['samples']} samples scored in both stores ({left_out['tuned only']} scored with the tuned reference "
        f"only and {left_out['base only']} with the base only are left out). Entering tokens are selected with the "
        'tuned reference and not with the base, leaving tokens the reverse; "tuned also base" is the share of the '
        "tuned selection also selected with the base.\n",
        f"**Reading:** {c['reading']}\n",
        head.format(""),
        rule,
        row("all", c),
    ]
    for title, groups in c["by"].items():
        lines += [f"\n### Overlap by {title}\n", head.format(title), rule]
        lines += [row(group, a) for group, a in groups.items() if a["tokens"]]
    legend = (
        "The samples where tuning changes the most; selected with both references ⟦ ⟧, entering (tuned only) ⟪ ⟫, "
        "leaving (base only) ⟬ ⟭."
    )
    legend = legend if c["examples"] else "No token enters or leaves the selection."
    lines.append(f"\n### Tokens that enter and leave the selection\n\n{legend}")
    for e in c["examples"]:
        lines.append(
            f"\n#### {e['task_id']} (difficulty {e['difficulty']}, {e['tokens']} tokens: {e['both']} selected with "
            f"both, {e['entering']} entering, {e['leaving']} leaving)\n"
        )
        lines += ["```", texts[e["task_id"]], "```"]
    return lines


def _check_same_samples(base: ScoreStore, tuned: ScoreStore) -> None:
    """Selections compare only over the same tokens: the same draw of samples, tokenized alike."""
    for key, what in (("dataset", "samples"), ("tokenizer", "tokenizer")):
        a, b = base.description[key], tuned.description[key]
        # Each store names the tokenizer file in its own model directory: one tokenizer at two paths is fine.
        ignore = {"path"} if key == "tokenizer" else set()
        differs = sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))
        if key == "tokenizer":
            files = [Path(a["path"]), Path(b["path"])]
            if all(f.is_file() for f in files) and files[0].read_bytes() != files[1].read_bytes():
                differs.append(f"path: {files[0]} and {files[1]} are different files")
        if differs:
            raise ScoreError(
                f"--base {base.path}: scored other {what} than {tuned.path} ({key} config differs in "
                f"{', '.join(differs)}); score the base with the tuned store's {key} config"
            )


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
    base: Optional[Path] = None,
) -> Dict[str, Any]:
    try:
        check_separate([ref, policy, *([base] if base else [])], [out])
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
    base_store = ScoreStore(base) if base is not None else None
    if base_store is not None:
        _check_same_samples(base_store, ref_store)
        in_base = {s.task_id for s in base_store}
        left_out = {"tuned only": sum(s.task_id not in in_base for s in samples)}
        samples = [s for s in samples if s.task_id in in_base]
        left_out["base only"] = len(in_base - {s.task_id for s in samples})
        if not samples:
            raise ScoreError(
                f"--base {base}: shares no scored sample with {ref} ({len(base_store)} and {len(ref_store)} "
                "samples, by task_id); score both on the same samples (the same dataset config)"
            )
    policy_store = ScoreStore(policy) if (policy / STORE_CONFIG).is_file() else None
    if policy_store is None:
        read_hf_config(policy)  # names the directory and what it lacks
    models = [description["model_dir"], policy_store.description["model_dir"] if policy_store else policy]
    models += [base_store.description["model_dir"]] if base_store is not None else []
    models = [d for m in models for d in (m if isinstance(m, list) else [m])]  # cross-fitted: one model a fold
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
    excess, base_excess, difficulty = {}, {}, {}
    for s in (s for s in samples if s.task_id in policy_losses):
        ref_losses, losses = ref_store.losses(s.task_id), policy_losses[s.task_id]
        if len(ref_losses) != len(losses):
            raise ScoreError(f"{ref}: {s.task_id} has {len(ref_losses)} scored tokens, the policy {len(losses)}")
        excess[s.task_id], difficulty[s.task_id] = losses - ref_losses, s.difficulty
        if base_store is not None:
            base_losses = base_store.losses(s.task_id)
            if len(base_losses) != len(losses):
                raise ScoreError(
                    f"--base {base}: {s.task_id} has {len(base_losses)} scored tokens, {ref} {len(losses)}; "
                    "score both with the same tokenizer and dataset config"
                )
            base_excess[s.task_id] = losses - base_losses
    masks = select_top(excess, k)
    table = shares(masks, difficulty)
    total, selected = sum(len(m) for m in masks.values()), sum(int(m.sum()) for m in masks.values())
    lines = [
        f"# Excess-loss preview\n\nreference scores{' (tuned)' if base else ''}: {ref}; policy: {policy}; "
        f"{len(masks)} samples, {total} response tokens; Rho-1 would train on the top {k:.0%} by excess loss (policy loss minus reference "
        f"loss): {selected} tokens.\n"
    ]

    def pieces_of(name: str) -> List[str]:  # only the rendered samples' lines are read again, for their token ids
        sample = ds[index_of[ref_store.sample(name).line]]
        pairs = zip(sample["tokens"][1:], sample["labels"][1:])
        return _pieces(tokenizer, [t for t, label in pairs if label != CROSS_ENTROPY_IGNORE_IDX])

    comparison = None
    if base_store is not None:
        base_masks = select_top(base_excess, k)
        comparison = compare(masks, base_masks, difficulty, examples) | {"base_scores": str(base), "left_out": left_out}
        names = [e["task_id"] for e in comparison["examples"]]
        lines += _comparison_lines(comparison, {n: render_change(pieces_of(n), masks[n], base_masks[n]) for n in names})
    for title, groups in table.items():
        lines += [f"\n## Share of tokens selected, by {title}\n| {title} | selected | tokens | share |"]
        lines += ["| --- | ---: | ---: | ---: |"] + [
            f"| {g} | {s} | {n} | {s / n:.3f} |" for g, (s, n) in groups.items() if n
        ]
    lines.append("\n## Examples (selected tokens marked ⟦ ⟧)\n")
    for name in list(masks)[:examples]:
        m = masks[name]
        lines.append(f"\n### {name} (difficulty {difficulty[name]}, {int(m.sum())} of {len(m)} tokens selected)\n")
        lines += ["```", render(pieces_of(name), m), "```"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "preview.md").write_text("\n".join(lines) + "\n")
    result = {"k": k, "samples": len(masks), "tokens": total, "selected": selected, "shares": table}
    if comparison is not None:
        result["base_vs_tuned"] = comparison
    (out / "preview.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ref_tuning.preview", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ref", metavar="REF_SCORES", type=Path, help="the (tuned) reference's score store")
    parser.add_argument("policy", type=Path, help="the policy: an HF directory, or a score store of it")
    parser.add_argument("--out", type=Path, required=True, help="where preview.md and preview.json go")
    parser.add_argument(
        "--base",
        metavar="BASE_SCORES",
        type=Path,
        help="the base (untuned) reference's score store over the same samples: also report how far tuning the "
        "reference changes the selection",
    )
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
