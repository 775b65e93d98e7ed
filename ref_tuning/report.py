"""Does the tuned reference give Rho-1 a better signal than the base one? A report on held-out data.

    python -m ref_tuning.report BASE_DIR TUNED_DIR [--split valid] [--data-dir DIR] [--out DIR] ...

Writes `report.md`, `report.json` and `report.png`: both models' losses on held-out correct and incorrect solutions
and, where the tuned directory's `ref_tuning.json` names what it trained on, what it memorized (docs/rho1.md).
"""

import argparse
import json
import sys
from collections import namedtuple
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchtune import training
from tqdm import tqdm

from ref_tuning.atomic import atomic_output
from ref_tuning.hf_checkpoint import METADATA_FILE
from ref_tuning.config import positive_int, share
from ref_tuning.data import CodeContestsDataset, DataError, codecontests_dataset, measure_lengths, split_files
from ref_tuning.line_index import SplitIndex, cache_folder
from ref_tuning.models import sheared_llama_tokenizer
from ref_tuning.paths import check_new, check_separate
from ref_tuning.scoring import check_vocab, load_reference, score_dataset

DEFAULT_DATA = Path("storage/datasets/codecontests/processed")
REPORT_FILES = ("report.md", "report.json", "report.png")


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive scores higher than a negative), ties counting half (the Mann-Whitney U / n1 n2)."""
    if not positives or not negatives:
        return float("nan")
    _, inverse, counts = numpy.unique(numpy.array([*positives, *negatives]), return_inverse=True, return_counts=True)
    ranks = (numpy.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, tied values share their mean rank
    n1, n0 = len(positives), len(negatives)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def summarize(losses: Dict[str, torch.Tensor], correct: Dict[str, bool]) -> Dict[str, float]:
    """Mean per-token loss of correct and incorrect solutions, and the AUROC by per-sample mean loss."""
    out = {}
    for kind, want in (("correct", True), ("incorrect", False)):
        chosen = [losses[t] for t in losses if correct[t] == want]
        tokens = sum(len(x) for x in chosen)
        out[f"{kind}_loss"] = float(sum(x.sum() for x in chosen) / tokens) if tokens else float("nan")
        out[f"{kind}_samples"] = len(chosen)
    means = {t: float(x.mean()) for t, x in losses.items() if len(x)}
    out["auroc"] = auroc([-m for t, m in means.items() if correct[t]], [-m for t, m in means.items() if not correct[t]])
    return out


def verdict(base: Dict[str, float], tuned: Dict[str, float]) -> Tuple[bool, str]:
    loss = f"({tuned['correct_loss']:.4f} against {base['correct_loss']:.4f})"
    auc = f"(AUROC {tuned['auroc']:.3f} against {base['auroc']:.3f})"
    lower, sharper = tuned["correct_loss"] < base["correct_loss"], tuned["auroc"] > base["auroc"]
    findings = [
        f"its loss on correct solutions is {'' if lower else 'not '}lower {loss}",
        f"it {'tells' if sharper else 'does not tell'} correct from incorrect solutions better {auc}",
    ]
    if lower and sharper:
        return True, f"The tuned reference is better: {' and '.join(findings)}."
    problems = [finding for finding, ok in zip(findings, (lower, sharper)) if not ok]
    return False, "The tuned reference is NOT better than the base: " + "; ".join(problems) + "."


def markdown(base_dir: Path, tuned_dir: Path, results: Dict[str, Dict[str, float]], text: str, where: str) -> str:
    rows = [
        "| reference | mean loss, correct | mean loss, incorrect | gap | AUROC (correct vs incorrect) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, m in ((f"base ({base_dir})", results["base"]), (f"tuned ({tuned_dir})", results["tuned"])):
        gap = m["incorrect_loss"] - m["correct_loss"]
        rows.append(f"| {name} | {m['correct_loss']:.4f} | {m['incorrect_loss']:.4f} | {gap:+.4f} | {m['auroc']:.3f} |")
    base = results["base"]
    return (
        f"# Reference report\n\n{where}: {base['correct_samples']} correct and {base['incorrect_samples']} "
        f"incorrect solutions; per-token losses over the response tokens, as Rho-1 scores a reference.\n\n"
        + "\n".join(rows)
        + f"\n\n{text}\n\n![per-sample mean loss, base against tuned](report.png)\n"
    )


def loss_histograms(
    losses: Dict[str, Dict[str, torch.Tensor]], correct: Dict[str, bool], results: Dict[str, Dict[str, float]]
) -> Figure:
    """Per-sample mean loss (`losses`: name -> task_id -> losses), a series per reference, a panel per kind."""
    means = {name: {t: float(x.mean()) for t, x in by_task.items() if len(x)} for name, by_task in losses.items()}
    bins = numpy.histogram_bin_edges([m for by_task in means.values() for m in by_task.values()], bins=30)
    aurocs = ", ".join(f"{name} {results[name]['auroc']:.3f}" for name in means)
    # A bare Figure draws with Agg (no display, no pyplot state), as matplotlib advises for files.
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    for axes, (kind, want) in zip(figure.subplots(1, 2, sharex=True), (("correct", True), ("incorrect", False))):
        for name, by_task in means.items():
            chosen = [m for t, m in by_task.items() if correct[t] == want]
            axes.hist(chosen, bins=bins, alpha=0.5, label=f"{name} (n={len(chosen)})")
        title = f"{kind} solutions (AUROC {aurocs})"
        axes.set(title=title, xlabel="mean loss per response token (nats)", ylabel="samples")
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
        axes.legend()
    return figure


# The sets of the memorization section: (a), (b), (c) in the report, these keys in report.json.
MEMORIZATION_SETS = {
    "trained": "(a) trained on",
    "unseen_solution": "(b) seen problem, unseen solution",
    "unseen_problem": "(c) unseen problem",
}
# Each gap (name, x, y, heading) is the mean loss of set x minus set y's: positive where the model does better on y.
MEMORIZATION_GAPS = (
    ("memorized_solutions", "unseen_solution", "trained", "b − a: memorized solutions"),
    ("memorized_problems", "unseen_problem", "unseen_solution", "c − b: memorized problems"),
    ("memorized_total", "unseen_problem", "trained", "c − a: both"),
)


# Lines trained on, their problems' names, the samples (a) and (b), and the size of (b)'s pool (0 leaves (b) empty).
TrainedOn = namedtuple("TrainedOn", "lines problems trained unseen_solution unseen_pool")


def trained_on(tuned_dir: Path, tokenizer, n_samples: int, seed: int, max_seq_len: int) -> Union[TrainedOn, str]:
    """The samples (a) and (b) of what `tuned_dir` trained on, or the one line that says why there are none."""
    path = Path(tuned_dir) / METADATA_FILE
    unknown = "what the tuned reference trained on is unknown, so memorization is not measured"
    if not path.is_file():
        return f"No {METADATA_FILE} in {tuned_dir} (not written by the training recipe): {unknown}."
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{path} is not valid JSON ({e}): {unknown}."
    found = meta.get("trained_on") if isinstance(meta, dict) else None
    if found is None:
        return f"{path} has no `trained_on` (a run from before the recipe recorded it): {unknown}."
    jsonl, lines = (found.get(k) for k in ("jsonl", "lines")) if isinstance(found, dict) else (None, None)
    if not isinstance(jsonl, str) or not isinstance(lines, list) or not all(type(i) is int for i in lines):
        return (
            f'{path}: `trained_on` should be {{"jsonl": path, "lines": [line numbers]}}, found '
            f"{json.dumps(found)[:80]}: {unknown}."
        )
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        return f"{jsonl}, the split the tuned reference trained on, is gone: {unknown}."
    # The training's own caches where it kept them elsewhere: the index of a 3.7M-line split is not built again.
    cache_dir = ((meta.get("config") or {}).get("dataset") or {}).get("cache_dir")
    cache = cache_folder(jsonl.parent, cache_dir if cache_dir and Path(cache_dir).is_dir() else None)
    try:
        index = SplitIndex.open(*split_files(jsonl.parent, jsonl.stem), cache)
    except DataError as e:
        return f"{e}: {unknown}."
    recorded = found.get("fingerprint")  # absent in runs from before it
    if recorded is not None and recorded != index.fingerprint():
        return f"{jsonl} changed since the tuned reference trained on it (its lines are other samples now): {unknown}."
    bad = next((i for i in lines if not 0 <= i < len(index)), None)
    if bad is not None:
        return (
            f"{path}: `trained_on` lists line {bad}, but {jsonl} has {len(index)} lines: the file changed since "
            f"training, {unknown}."
        )
    trained = torch.tensor(lines, dtype=torch.int64)
    problems = index.problem[trained].unique()
    unseen = torch.isin(index.problem, problems) & index.is_correct
    unseen[trained] = False
    unseen = unseen.nonzero().flatten()
    # Up to n_samples lines of each pool, drawn at random, less those longer than max_seq_len (as the held-out draw).
    generator, drawn = torch.Generator().manual_seed(seed), []
    for pool in (trained[index.is_correct[trained]], unseen):
        chosen = pool[torch.randperm(len(pool), generator=generator)[:n_samples]].sort().values
        total, _ = measure_lengths(index, chosen, tokenizer, cache)
        keep = total <= max_seq_len
        drawn.append(CodeContestsDataset(index, chosen[keep], total[keep], tokenizer, max_seq_len))
    return TrainedOn(len(trained), {index.problems[p] for p in problems.tolist()}, *drawn, len(unseen))


def memorization(losses: Dict[str, Dict[str, List[torch.Tensor]]]) -> Dict[str, Dict[str, Optional[float]]]:
    """Per reference (-> set -> per-sample losses), each set's mean loss per token (or None), the gaps; the same
    `tuned_minus_base`."""

    def minus(x, y):
        return None if x is None or y is None else x - y

    out: Dict[str, Dict[str, Optional[float]]] = {}
    for name, by_set in losses.items():
        tokens = {k: torch.cat(by_set[k]).double() if by_set[k] else torch.zeros(0) for k in MEMORIZATION_SETS}
        means = {k: float(x.mean()) if len(x) else None for k, x in tokens.items()}
        out[name] = dict(means, **{gap: minus(means[x], means[y]) for gap, x, y, _ in MEMORIZATION_GAPS})
    out["tuned_minus_base"] = {key: minus(out["tuned"][key], out["base"][key]) for key in out["base"]}
    return out


def memorization_section(trained: TrainedOn, held_out: Path, unseen: List[Dict], n_correct: int, losses: Dict) -> Dict:
    """report.json's memorization: `unseen`, (c), are of the `n_correct` held-out correct samples of `held_out`."""
    sets = {"trained": trained.trained.lines.tolist(), "unseen_solution": trained.unseen_solution.lines.tolist()}
    sets["unseen_problem"] = [info["line"] for info in unseen]
    notes = [
        "No problem it trained on has a correct solution it did not train on: (b) is empty, so memorized "
        "solutions and memorized problems cannot be told apart (c − a gives both)."
    ] * (not trained.unseen_pool)
    if n_correct > len(unseen):
        notes.append(f"{n_correct - len(unseen)} held-out correct solutions are of problems it trained on: not in (c).")
    result = memorization(losses)
    extra = result["tuned_minus_base"]  # the tuned model's gaps beyond the base's
    total, solutions = extra["memorized_total"], extra["memorized_solutions"]
    if total is None:
        reading = "with a set empty (none drawn, or all over --max-seq-len), memorization cannot be measured"
    else:
        gaps = (
            f"{total:+.4f} nats/token between solutions it trained on and problems it never saw"
            if solutions is None
            else f"{solutions:+.4f} nats/token between trained and unseen solutions of the same problems (memorized "
            f"solutions), {extra['memorized_problems']:+.4f} between seen and unseen problems (memorized problems)"
        )
        effect = (
            f"on the tokens it trained on, Rho-1's excess loss comes out about {total:.4f} higher than a reference "
            "that never saw them would give"
            if total > 0
            else "no memorization shows that would raise Rho-1's excess loss on the tokens it trained on"
        )
        reading = f"the tuned model's gaps beyond the base's (which show how the sets differ): {gaps}; {effect}"
    return {
        "trained_on": {"jsonl": str(trained.trained.jsonl), "lines": trained.lines, "problems": len(trained.problems)},
        "samples": {key: len(lines) for key, lines in sets.items()},
        **result,
        "reading": f"Reading: {reading}.",
        "notes": notes,
        "held_out": str(held_out),
        "lines": sets,  # (a) and (b) in trained_on.jsonl, (c) in held_out
    }


def memorization_markdown(section: Dict[str, Any]) -> str:
    """The report's memorization section: the absence line, or the table and its reading."""
    if "absent" in section:
        return f"\n## Memorization\n\n{section['absent']}\n"
    n, t = section["samples"], section["trained_on"]
    head = ["reference", *MEMORIZATION_SETS.values(), *(heading for *_, heading in MEMORIZATION_GAPS)]
    rows = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name in ("base", "tuned", "tuned_minus_base"):
        diff = name == "tuned_minus_base"  # gaps and differences are signed
        cells = [
            "—" if v is None else f"{v:+.4f}" if diff or key not in MEMORIZATION_SETS else f"{v:.4f}"
            for key, v in section[name].items()
        ]
        rows.append(f"| {'tuned − base' if diff else name} | " + " | ".join(cells) + " |")
    return (
        f"\n## Memorization\n\nThe tuned reference trained on {t['lines']} lines of {t['jsonl']} ({t['problems']} "
        f"problems). Mean loss per response token of correct solutions: (a) {n['trained']} it trained on, "
        f"(b) {n['unseen_solution']} of those problems that it did not train on, (c) {n['unseen_problem']} of "
        f"held-out problems it never saw.\n\n"
        + "".join(f"{note}\n\n" for note in section["notes"])
        + "\n".join(rows)
        + f"\n\n{section['reading']}\n"
    )


def run_report(
    base_dir: Path,
    tuned_dir: Path,
    out: Path,
    data_dir: Path,
    split: str = "valid",
    n_samples: int = 1000,
    correct_ratio: float = 0.5,
    seed: int = 0,
    max_seq_len: int = 2048,
    tokenizer: Optional[Path] = None,
    device: str = "cpu",
    dtype: str = "fp32",
    batch_size: int = 4,
    progress: bool = True,
    overwrite: bool = False,
) -> Dict[str, Dict[str, float]]:
    """Score both directories on the same held-out samples and write the report into `out` (an earlier report
    there only with `overwrite`)."""
    try:
        check_separate([base_dir, tuned_dir, data_dir], [out])
    except ValueError as e:
        raise ValueError(f"--out: {e}") from None
    check_new(out, REPORT_FILES, overwrite)
    tokenizer = Path(tokenizer or base_dir / "tokenizer.model")
    if not tokenizer.is_file():
        raise SystemExit(f"{tokenizer}: no tokenizer; pass --tokenizer PATH")
    tok = sheared_llama_tokenizer(str(tokenizer))
    check_vocab([base_dir, tuned_dir], tok.vocab_size, str(tokenizer))
    ds = codecontests_dataset(tok, str(data_dir), split, n_samples, correct_ratio, seed=seed, max_seq_len=max_seq_len)
    seen = trained_on(tuned_dir, tok, n_samples, seed, max_seq_len)  # or the line that says why it cannot be known
    extra = {} if isinstance(seen, str) else {"trained": seen.trained, "unseen_solution": seen.unseen_solution}
    device = torch.device(device)
    results, losses, correct, extra_losses = {}, {}, {}, {}
    for name, model_dir in (("base", base_dir), ("tuned", tuned_dir)):
        model = load_reference(model_dir, device, training.get_dtype(dtype, device))
        total = len(ds) + sum(map(len, extra.values()))
        bar = tqdm(total=total, desc=f"scoring with the {name} reference", disable=not progress)
        scored = score_dataset(model, ds, range(len(ds)), None, device, batch_size, tok.pad_id, bar)
        extra_losses[name] = {
            key: [x for _, x in score_dataset(model, d, range(len(d)), None, device, batch_size, tok.pad_id, bar)]
            for key, d in extra.items()
        }
        bar.close()
        del model
        losses[name] = {info["task_id"]: x for info, x in scored}
        correct.update({info["task_id"]: info["is_correct"] for info, _ in scored})
        results[name] = summarize(losses[name], correct)
    if isinstance(seen, str):
        section = {"absent": seen}
    else:  # (c): the held-out correct samples of problems it did not train on
        problem = dict(zip(ds.lines.tolist(), ds.problem_ids))
        unseen = [info for info, _ in scored if info["is_correct"] and problem[info["line"]] not in seen.problems]
        for name in losses:
            extra_losses[name]["unseen_problem"] = [losses[name][info["task_id"]] for info in unseen]
        section = memorization_section(seen, ds.jsonl, unseen, results["base"]["correct_samples"], extra_losses)
    where = f"{data_dir}/{split}"
    better, text = verdict(results["base"], results["tuned"])
    summary = dict(base_dir=str(base_dir), tuned_dir=str(tuned_dir), data=where, **results, tuned_is_better=better)
    with atomic_output(out / "report.md", overwrite=True) as tmp:  # each file whole or absent, others left alone
        tmp.write_text(markdown(base_dir, tuned_dir, results, text, where) + memorization_markdown(section))
    with atomic_output(out / "report.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(dict(summary, verdict=text, memorization=section), indent=2))
    with atomic_output(out / "report.png", overwrite=True) as tmp:
        loss_histograms(losses, correct, results).savefig(tmp, format="png")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ref_tuning.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("base_dir", type=Path, help="the base reference (HF directory)")
    parser.add_argument("tuned_dir", type=Path, help="the tuned reference (HF directory)")
    parser.add_argument("--split", default="valid", help="held-out split (default valid)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help=f"processed data (default {DEFAULT_DATA})")
    parser.add_argument("--n-samples", type=positive_int, default=1000, help="samples drawn (default 1000)")
    parser.add_argument("--correct-ratio", type=share, default=0.5, help="share of correct solutions (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seq-len", type=positive_int, default=2048)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: BASE_DIR/tokenizer.model)")
    out_help = "where the report goes (default: TUNED_DIR/../report-TUNED-SPLIT, TUNED the directory's name)"
    parser.add_argument("--out", type=Path, help=out_help)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="model dtype (default fp32)")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    # One folder a model: checkpoint_best's report and checkpoint_final's never replace each other.
    out = args.out = args.out or args.tuned_dir.parent / f"report-{args.tuned_dir.resolve().name}-{args.split}"
    try:
        run_report(**vars(args))
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
