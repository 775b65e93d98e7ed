"""Which tokens would Rho-1 train on? The excess loss of a policy over the reference, previewed.

    python -m ref_tuning.preview REF_SCORES POLICY --out DIR [--base BASE_SCORES] [--k 0.6] [--examples 4] ...

REF_SCORES is the reference's score store, POLICY an HF directory or a score store. `preview.md` and `preview.json`
show Rho-1's selection (the top `k` of all tokens by policy minus reference loss) by position and difficulty, with
examples; given the untuned reference's store as --base, also how far tuning changes it (docs/rho1.md, The preview).
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

from ref_tuning.atomic import atomic_output
from ref_tuning.config import positive_int, share
from ref_tuning.paths import check_new, check_separate
from ref_tuning.scoring import (
    STORE_CONFIG,
    ScoreError,
    ScoreStore,
    check_data,
    check_vocab,
    data_record,
    load_reference,
)
from ref_tuning.scoring import score_dataset

POSITION_BINS = 10  # tenths of the solution


def select_top(excess: Dict[str, torch.Tensor], k: float) -> Dict[str, torch.Tensor]:
    """Per sample, a mask of the top `k` of all tokens by excess loss: exactly round(k * tokens), ties in order."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    flat = torch.cat(list(excess.values())) if excess else torch.zeros(0)
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[torch.argsort(flat, descending=True, stable=True)[: round(k * len(flat))]] = True
    return dict(zip(excess, chosen.split([len(x) for x in excess.values()])))


def shares(masks: Dict[str, torch.Tensor], difficulty: Dict[str, int]) -> Dict[str, Dict[str, List[float]]]:
    """The share of tokens selected, by tenth of the solution and by difficulty: {group: [selected, tokens]}."""
    selected, tokens = torch.zeros(POSITION_BINS, dtype=torch.long), torch.zeros(POSITION_BINS, dtype=torch.long)
    by_difficulty = {str(d): [0, 0] for d in sorted({difficulty[name] for name in masks})}
    for name, mask in masks.items():
        bins = torch.arange(len(mask)) * POSITION_BINS // max(len(mask), 1)
        selected += torch.bincount(bins[mask], minlength=POSITION_BINS)
        tokens += torch.bincount(bins, minlength=POSITION_BINS)
        slot = by_difficulty[str(difficulty[name])]
        slot[0] += int(mask.sum())
        slot[1] += len(mask)
    by_position = {f"{10 * b}-{10 * (b + 1)}%": [int(selected[b]), int(tokens[b])] for b in range(POSITION_BINS)}
    return {"position in the solution": by_position, "difficulty": by_difficulty}


# By state, tuned + 2 * base: neither, entering, leaving, both (one reference: base = mask). Brackets code never uses.
MARKS = ("{}", "⟪{}⟫", "⟬{}⟭", "⟦{}⟧")


def render(pieces: List[str], mask: torch.Tensor, base: Optional[torch.Tensor] = None) -> str:
    """The response with runs of selected tokens marked ⟦…⟧; given `base`, tuned only ⟪…⟫ and base only ⟬…⟭."""
    states = (mask.long() + 2 * (mask if base is None else base).long()).tolist()
    runs = itertools.groupby(zip(pieces, states), key=lambda pair: pair[1])
    return "".join(MARKS[state].format("".join(p for p, _ in run)) for state, run in runs)


def overlap(
    tuned: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor], difficulty: Dict[str, int]
) -> Dict[str, Any]:
    """How far the selections with the tuned and the base reference agree, overall and by the groups of `shares`."""
    either = {n: tuned[n] | base[n] for n in tuned}
    tables = [shares(m, difficulty) for m in (tuned, base, {n: tuned[n] & base[n] for n in tuned}, either)]

    def agreement(pairs: List[List[int]]) -> Dict[str, Any]:  # [selected, tokens] with tuned, base, both, either
        (t, n), (b, _), (tb, _), (e, _) = pairs
        counts = {"tokens": n, "tuned": t, "base": b, "both": tb, "entering": t - tb, "leaving": b - tb}
        # Nothing selected with either reference is the same (empty) selection.
        return counts | {"jaccard": tb / e if e else 1.0, "tuned_also_base": tb / t if t else None}

    by = {title: {g: agreement([t[title][g] for t in tables]) for g in groups} for title, groups in tables[0].items()}
    # Overall: the sums over the tenths of the solution, which every token falls in (even with no samples).
    return agreement([[sum(c) for c in zip(*t["position in the solution"].values())] for t in tables]) | {"by": by}


def _table(head: List[str], rows: List[List[Any]]) -> List[str]:
    """A markdown table, all columns but the first (numbers; fractions to 3 places, none as –) right-aligned."""
    cell = lambda v: "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    rule = "| --- |" + " ---: |" * (len(head) - 1)
    return [f"| {' | '.join(head)} |", rule] + [f"| {' | '.join(map(cell, row))} |" for row in rows]


def _check_same_samples(base: ScoreStore, tuned: ScoreStore) -> None:
    """Selections compare only over the same tokens: the same draw of samples, tokenized alike."""
    for key, what in (("dataset", "samples"), ("tokenizer", "tokenizer")):
        a, b = base.description[key], tuned.description[key]
        # Each store names the tokenizer file in its own model directory: one tokenizer at two paths is fine.
        differs = [x for x in sorted(a.keys() | b.keys()) if a.get(x) != b.get(x) and (key, x) != ("tokenizer", "path")]
        files = [Path(a["path"]), Path(b["path"])] if key == "tokenizer" else []
        if files and all(f.is_file() for f in files) and files[0].read_bytes() != files[1].read_bytes():
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
    overwrite: bool = False,
) -> Dict[str, Any]:
    try:
        check_separate([ref, policy, *([base] if base else [])], [out])
    except ValueError as e:
        raise ValueError(f"--out: {e}") from None
    check_new(out, ("preview.md", "preview.json"), overwrite)
    if base is not None and Path(base).resolve() == Path(ref).resolve():
        raise ScoreError(f"--base {base}: the same store as REF_SCORES; give the base (untuned) reference's store")
    ref_store = ScoreStore(ref)
    description = ref_store.description
    tokenizer = tt_config.instantiate(OmegaConf.create(description["tokenizer"]))
    ds = tt_config.instantiate(OmegaConf.create(description["dataset"]), tokenizer)
    check_data(ref, description, data_record(ds))
    item_of = {line: i for i, line in enumerate(ds.lines.tolist())}  # dataset item of each line
    samples = [s for s in ref_store if s.line in item_of]
    if not samples:
        raise ScoreError(f"{ref}: none of its samples is in its dataset any more; score it again")
    base_store = ScoreStore(base) if base is not None else None
    if base_store is not None:
        _check_same_samples(base_store, ref_store)
        check_data(base, base_store.description, data_record(ds))
        in_base, in_ref = {s.task_id for s in base_store}, {s.task_id for s in samples}
        left_out = {"tuned only": len(in_ref - in_base), "base only": len(in_base - in_ref)}
        samples = [s for s in samples if s.task_id in in_base]
        if not samples:
            raise ScoreError(
                f"--base {base}: shares no scored sample with {ref} ({len(base_store)} and {len(ref_store)} "
                "samples, by task_id); score both on the same samples (the same dataset config)"
            )
    policy_store = ScoreStore(policy) if (policy / STORE_CONFIG).is_file() else None
    # A store's models (cross-fitted: one a fold) may have moved since it scored: compare those still there. A policy
    # directory is read in any case: its error names the directory and what it lacks.
    stored = [s.description["model_dir"] for s in (ref_store, policy_store, base_store) if s is not None]
    models = [d for m in stored for d in (m if isinstance(m, list) else [m]) if (Path(d) / "config.json").is_file()]
    check_vocab(models + [policy] * (policy_store is None), tokenizer.vocab_size, description["tokenizer"]["path"])
    if policy_store is not None:
        if policy_store.description["dataset"] != description["dataset"]:
            raise ScoreError(f"{policy}: scores other samples than {ref} (its dataset config differs)")
        check_data(policy, policy_store.description, data_record(ds))
        policy_losses = {s.task_id: policy_store.losses(s.task_id) for s in policy_store}
    else:
        device = torch.device(device)
        model = load_reference(policy, device, training.get_dtype(dtype, device))
        with tqdm(total=len(samples), desc="scoring with the policy", disable=not progress) as bar:
            items = [item_of[s.line] for s in samples]
            scored = score_dataset(model, ds, items, None, device, batch_size, tokenizer.pad_id, bar)
        policy_losses = {info["task_id"]: x for info, x in scored}
    references = [(str(ref), ref_store)] + ([(f"--base {base}", base_store)] if base_store is not None else [])
    excess, difficulty = [{} for _ in references], {}  # policy loss minus each reference's, per sample
    for s in (s for s in samples if s.task_id in policy_losses):
        losses, difficulty[s.task_id] = policy_losses[s.task_id], s.difficulty
        for (name, store), by_task in zip(references, excess):
            theirs = store.losses(s.task_id)
            if len(theirs) != len(losses):
                raise ScoreError(
                    f"{name}: {s.task_id} has {len(theirs)} scored tokens, the policy {len(losses)}; score them "
                    "with the same tokenizer and dataset config"
                )
            by_task[s.task_id] = losses - theirs
    selections = [select_top(by_task, k) for by_task in excess]
    masks = selections[0]
    table = shares(masks, difficulty)
    total, selected = sum(len(m) for m in masks.values()), sum(int(m.sum()) for m in masks.values())
    lines = [
        f"# Excess-loss preview\n\nreference scores{' (tuned)' if base else ''}: {ref}; policy: {policy}; "
        f"{len(masks)} samples, {total} response tokens; Rho-1 would train on the top {k:.0%} by excess loss "
        f"(policy loss minus reference loss): {selected} tokens.\n"
    ]

    def pieces_of(name: str) -> List[str]:  # only the rendered samples' lines are read again, for their token ids
        sample = ds[item_of[ref_store.sample(name).line]]
        pairs = zip(sample["tokens"][1:], sample["labels"][1:])
        return _pieces(tokenizer, [t for t, label in pairs if label != CROSS_ENTROPY_IGNORE_IDX])

    result = {"k": k, "samples": len(masks), "tokens": total, "selected": selected, "shares": table}
    if base_store is not None:
        base_masks = selections[1]
        c = result["base_vs_tuned"] = overlap(masks, base_masks, difficulty)
        c |= {"samples": len(masks), "examples": [], "left_out": left_out}
        # Per sample, the tokens selected with neither, entering (tuned only), leaving (base only) and both.
        states = {n: (masks[n].long() + 2 * base_masks[n].long()).bincount(minlength=4).tolist() for n in masks}
        changed = {n: s[1] + s[2] for n, s in states.items()}  # the samples that change most first, in sample order
        chosen = sorted((n for n in masks if changed[n]), key=lambda n: -changed[n])[:examples]
        reading = f"here the Jaccard index is {c['jaccard']:.3f}"
        if c["tuned_also_base"] is not None:  # something is selected with the tuned reference
            reading += f": {1 - c['tuned_also_base']:.1%} of the tokens selected with the tuned reference are not "
            reading += "selected with the base"
        columns = "tokens,selected with base,with tuned,with both,entering,leaving,Jaccard,tuned also base".split(",")
        keys = ("tokens", "base", "tuned", "both", "entering", "leaving", "jaccard", "tuned_also_base")
        rows = lambda groups: [[g, *(a[x] for x in keys)] for g, a in groups.items() if a["tokens"]]
        lines += [
            "\n## Base against tuned reference: how far tuning changes the selection\n\nbase reference scores: "
            f"{base}; the {c['samples']} samples scored in both stores ({left_out['tuned only']} scored with the tuned "
            f"reference only and {left_out['base only']} with the base only are left out). Entering tokens are "
            'selected with the tuned reference and not with the base, leaving tokens the reverse; "tuned also base" '
            "is the share of the tuned selection also selected with the base.\n",
            "**Reading:** An overlap near 1 means tuning the reference does not change what Rho-1 trains on; "
            f"{reading}.\n",
            *_table(["", *columns], rows({"all": c})),
        ]
        for title, groups in c["by"].items():
            lines += [f"\n### Overlap by {title}\n", *_table([title, *columns], rows(groups))]
        legend = "The samples where tuning changes the most; selected with both references ⟦ ⟧, entering (tuned only) "
        legend = legend + "⟪ ⟫, leaving (base only) ⟬ ⟭." if chosen else "No token enters or leaves the selection."
        lines.append(f"\n### Tokens that enter and leave the selection\n\n{legend}")
        for n in chosen:
            _, entering, leaving, both = states[n]
            e = {"task_id": n, "difficulty": difficulty[n], "tokens": len(masks[n]), "both": both}
            c["examples"].append(e | {"entering": entering, "leaving": leaving})
            lines.append(
                f"\n#### {n} (difficulty {difficulty[n]}, {len(masks[n])} tokens: {both} selected with both, "
                f"{entering} entering, {leaving} leaving)\n"
            )
            lines += ["```", render(pieces_of(n), masks[n], base_masks[n]), "```"]
    for title, groups in table.items():
        lines.append(f"\n## Share of tokens selected, by {title}")
        lines += _table([title, "selected", "tokens", "share"], [[g, s, n, s / n] for g, (s, n) in groups.items() if n])
    lines.append("\n## Examples (selected tokens marked ⟦ ⟧)\n")
    for name, m in list(masks.items())[:examples]:
        lines.append(f"\n### {name} (difficulty {difficulty[name]}, {int(m.sum())} of {len(m)} tokens selected)\n")
        lines += ["```", render(pieces_of(name), m), "```"]
    for name, text in (("preview.md", "\n".join(lines) + "\n"), ("preview.json", json.dumps(result, indent=2))):
        with atomic_output(out / name, overwrite=True) as tmp:  # each whole or absent, others in `out` left alone
            tmp.write_text(text)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ref_tuning.preview", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ref", metavar="REF_SCORES", type=Path, help="the (tuned) reference's score store")
    parser.add_argument("policy", type=Path, help="the policy: an HF directory, or a score store of it")
    parser.add_argument("--out", type=Path, required=True, help="where preview.md and preview.json go")
    base_help = "the base (untuned) reference's score store: also report how far tuning it changes the selection"
    parser.add_argument("--base", metavar="BASE_SCORES", type=Path, help=base_help)
    parser.add_argument("--k", type=share, default=0.6, help="share of tokens Rho-1 selects (default 0.6)")
    parser.add_argument("--examples", type=int, default=4, help="samples rendered with their selection")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier preview in --out")
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
