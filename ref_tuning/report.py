"""Does the tuned reference give Rho-1 a better signal than the base one? A report on held-out data.

    python -m ref_tuning.report BASE_DIR TUNED_DIR [--split valid] [--data-dir DIR] [--out DIR] ...

Both HF directories score the same samples per token as Rho-1 scores a reference. Written: `report.md` (mean loss
of correct and incorrect solutions, the AUROC of telling them apart by mean loss, and a plain verdict),
`report.json` and `report.png` (histograms of the per-sample mean loss).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchtune import training
from tqdm import tqdm

from ref_tuning.config import positive_int, share
from ref_tuning.data import DataError, codecontests_dataset
from ref_tuning.models import sheared_llama_tokenizer
from ref_tuning.paths import check_separate
from ref_tuning.scoring import check_vocab, load_reference, score_dataset

DEFAULT_DATA = Path("storage/datasets/codecontests/processed")


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
    if lower and sharper:
        return (
            True,
            f"The tuned reference is better: its loss on correct solutions is lower {loss} and it tells "
            f"correct from incorrect solutions better {auc}.",
        )
    problems = [f"its loss on correct solutions is not lower {loss}"] * (not lower)
    problems += [f"it does not tell correct from incorrect solutions better {auc}"] * (not sharper)
    return False, "The tuned reference is NOT better than the base: " + "; ".join(problems) + "."


def markdown(base_dir: Path, tuned_dir: Path, base: Dict[str, float], tuned: Dict[str, float], where: str) -> str:
    rows = [
        "| reference | mean loss, correct | mean loss, incorrect | gap | AUROC (correct vs incorrect) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, m in ((f"base ({base_dir})", base), (f"tuned ({tuned_dir})", tuned)):
        gap = m["incorrect_loss"] - m["correct_loss"]
        rows.append(f"| {name} | {m['correct_loss']:.4f} | {m['incorrect_loss']:.4f} | {gap:+.4f} | {m['auroc']:.3f} |")
    _, text = verdict(base, tuned)
    return (
        f"# Reference report\n\n{where}: {base['correct_samples']} correct and {base['incorrect_samples']} "
        f"incorrect solutions; per-token losses over the response tokens, as Rho-1 scores a reference.\n\n"
        + "\n".join(rows)
        + f"\n\n{text}\n\n![per-sample mean loss, base against tuned](report.png)\n"
    )


def loss_histograms(
    losses: Dict[str, Dict[str, torch.Tensor]], correct: Dict[str, bool], results: Dict[str, Dict[str, float]]
) -> Figure:
    """Histograms of the per-sample mean loss, one series per reference (`losses`: name -> task_id ->
    losses), in a panel for correct and one for incorrect solutions, on the same bins."""
    means = {name: {t: float(x.mean()) for t, x in by_task.items() if len(x)} for name, by_task in losses.items()}
    bins = numpy.histogram_bin_edges([m for by_task in means.values() for m in by_task.values()], bins=30)
    aurocs = ", ".join(f"{name} {results[name]['auroc']:.3f}" for name in means)
    # A bare Figure draws with Agg (no display, no pyplot state), as matplotlib advises for files.
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    for axes, (kind, want) in zip(figure.subplots(1, 2, sharex=True), (("correct", True), ("incorrect", False))):
        for name, by_task in means.items():
            chosen = [m for t, m in by_task.items() if correct[t] == want]
            axes.hist(chosen, bins=bins, alpha=0.5, label=f"{name} (n={len(chosen)})")
        axes.set(
            title=f"{kind} solutions (AUROC {aurocs})", xlabel="mean loss per response token (nats)", ylabel="samples"
        )
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
        axes.legend()
    return figure


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
) -> Dict[str, Dict[str, float]]:
    """Score both directories on the same held-out samples and write the report into `out`."""
    try:
        check_separate([base_dir, tuned_dir, data_dir], [out])
    except ValueError as e:
        raise ValueError(f"--out: {e}") from None
    tokenizer = Path(tokenizer or base_dir / "tokenizer.model")
    if not tokenizer.is_file():
        raise SystemExit(f"{tokenizer}: no tokenizer; pass --tokenizer PATH")
    tok = sheared_llama_tokenizer(str(tokenizer))
    check_vocab([base_dir, tuned_dir], tok.vocab_size, str(tokenizer))
    ds = codecontests_dataset(tok, str(data_dir), split, n_samples, correct_ratio, seed=seed, max_seq_len=max_seq_len)
    device = torch.device(device)
    results, losses, correct = {}, {}, {}
    for name, model_dir in (("base", base_dir), ("tuned", tuned_dir)):
        model = load_reference(model_dir, device, training.get_dtype(dtype, device))
        bar = tqdm(total=len(ds), desc=f"scoring with the {name} reference", disable=not progress)
        scored = score_dataset(model, ds, range(len(ds)), None, device, batch_size, tok.pad_id, bar)
        bar.close()
        del model
        losses[name] = {info["task_id"]: x for info, x in scored}
        correct.update({info["task_id"]: info["is_correct"] for info, _ in scored})
        results[name] = summarize(losses[name], correct)
    out.mkdir(parents=True, exist_ok=True)
    where = f"{data_dir}/{split}"
    (out / "report.md").write_text(markdown(base_dir, tuned_dir, results["base"], results["tuned"], where))
    better, text = verdict(results["base"], results["tuned"])
    summary = dict(base_dir=str(base_dir), tuned_dir=str(tuned_dir), data=where, **results, tuned_is_better=better)
    (out / "report.json").write_text(json.dumps(dict(summary, verdict=text), indent=2))
    loss_histograms(losses, correct, results).savefig(out / "report.png")
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
    parser.add_argument("--out", type=Path, help="where the report goes (default: TUNED_DIR/../report-SPLIT)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="model dtype (default fp32)")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    out = args.out = args.out or args.tuned_dir.parent / f"report-{args.split}"
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
