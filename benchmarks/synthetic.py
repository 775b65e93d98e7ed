"""A synthetic processed CodeContests split shaped like the real one, for the benchmarks (no download).

`train.jsonl` and a v2 `train_metadata.json` in the layout of docs/data.md: about 13,328 problems per 3.7M
lines, each with one description and its correct solutions (47% on average) before its incorrect ones. The text
is runs of words that the LLaMA-2 tokenizer encodes as one token each, so lengths are set in tokens: a
description of lognormal length (median 545 tokens), solutions of lognormal length with a per-problem shift,
those over 2048 tokens dropped, as when the real files were made. With the template, BOS and EOS, the mean
sample has ~1,450 tokens and ~19% have more than 2048; on those that fit, packing in file order fills ~74% of
the token slots and padding to the batch maximum ~71% (batches of 4, shuffled), as measured on the real data.
At full size the files take 18.6 GB. A split is written once and reused while `synthetic.json` beside it
matches its parameters and files.
"""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import remove, say

JSONL, METADATA, PARAMS = "train.jsonl", "train_metadata.json", "synthetic.json"
GENERATOR_VERSION = 3  # bump whenever the output changes: older splits are then rewritten
REAL_LINES, REAL_PROBLEMS = 3_700_000, 13_328
MIN_PROBLEMS = 50  # small splits (tests) still get a spread of problems
PROBLEM_LINES_SIGMA = 1.0  # lognormal spread of the lines per problem: some problems have thousands
CORRECT_BETA = (2.4, 2.7)  # per-problem share of correct solutions: 47% on average
# The real data's mean length and fills leave the spreads open; the best fill a packer can reach depends on them.
PROMPT_LOGNORMAL, PROMPT_MAX = (6.3, 0.75), 4096  # tokens of a description: median e^6.3 = 545
SOLUTION_LOGNORMAL, SOLUTION_MAX = (6.5, 0.95), 2048  # median e^6.5 = 665 before the cut, 575 after
SOLUTION_PROBLEM_SIGMA = 0.3  # per-problem shift of the log length: harder problems, longer code
# BOS, EOS and the Alpaca template's own tokens with the LLaMA-2 tokenizer on this text (37 to 39: the first
# word after a newline has no leading space and may take two).
TEMPLATE_TOKENS = 38
# Difficulty per problem: mostly Codeforces A to F (7-12), some CodeChef (1-5), unknown (0), external (6).
DIFFICULTY_WEIGHTS = [4, 3, 3, 2, 1, 0.5, 3, 14, 14, 12, 10, 8, 6, 4, 2.5, 1.5, 1, 0.6, 0.4, 0.3, 0.2] + [0.1] * 8
HAS_TESTS_SHARE = 0.98
# Words of 1-3 letters: ~3.2 bytes a token with the space, about real Python code's density.
WORD_LETTERS = {1: 0.15, 2: 0.5, 3: 0.35}
WORD_BUFFER = 1 << 21  # words generated once; every text is a run of them
TITLE_WORDS = ["Tree", "Graph", "Array", "String", "Game", "Path", "Sum", "Query", "Grid", "Set"]


class Plan(NamedTuple):
    """Every number of the split; problem p holds lines starts[p]:starts[p + 1], correct ones first."""

    difficulty: Any  # per problem (numpy arrays)
    has_tests: Any
    prompt: Any  # tokens of the description
    starts: Any  # n_problems + 1
    n_correct: Any
    line_problem: Any  # per line
    is_correct: Any
    solution: Any  # tokens of the solution

    def templated(self):
        """Tokens of every sample with BOS, template and EOS, as `ref_tuning.data.tokenize_sample` counts them."""
        return self.prompt[self.line_problem] + self.solution + TEMPLATE_TOKENS


def _lognormal_below(rng, mu, sigma: float, n: int, cap: int):
    """`n` lognormal draws, redrawn until none is over `cap` (dropped, not clipped, as in the data)."""
    import numpy as np

    mu = np.broadcast_to(np.asarray(mu, dtype=float), (n,))
    x = rng.lognormal(mu, sigma)
    while (over := x > cap).any():
        x[over] = rng.lognormal(mu[over], sigma)
    return np.maximum(np.rint(x), 1).astype(np.int64)


def make_plan(lines: int, seed: int = 0) -> Plan:
    import numpy as np

    rng = np.random.default_rng(seed)
    n_problems = min(lines, max(round(REAL_PROBLEMS * lines / REAL_LINES), MIN_PROBLEMS))
    weights = rng.lognormal(0.0, PROBLEM_LINES_SIGMA, n_problems)
    counts = 1 + rng.multinomial(lines - n_problems, weights / weights.sum())
    starts = np.concatenate([[0], np.cumsum(counts)])
    p = np.array(DIFFICULTY_WEIGHTS) / sum(DIFFICULTY_WEIGHTS)
    difficulty = rng.choice(len(p), n_problems, p=p)
    has_tests = rng.random(n_problems) < HAS_TESTS_SHARE
    n_correct = rng.binomial(counts, rng.beta(*CORRECT_BETA, n_problems))
    prompt = _lognormal_below(rng, PROMPT_LOGNORMAL[0], PROMPT_LOGNORMAL[1], n_problems, PROMPT_MAX)
    line_problem = np.repeat(np.arange(n_problems), counts)
    mu = SOLUTION_LOGNORMAL[0] + rng.normal(0.0, SOLUTION_PROBLEM_SIGMA, n_problems)[line_problem]
    solution = _lognormal_below(rng, mu, SOLUTION_LOGNORMAL[1], lines, SOLUTION_MAX)
    is_correct = np.arange(lines) - starts[line_problem] < n_correct[line_problem]
    return Plan(difficulty, has_tests, prompt, starts, n_correct, line_problem, is_correct, solution)


def word_text(tokenizer: Path, rng):
    """A long text of random lowercase words that the tokenizer encodes as one piece `▁word` each, and where
    each word starts: the `k` words from any start are `k` tokens."""
    import numpy as np
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    words: dict[int, list[str]] = {n: [] for n in WORD_LETTERS}
    for i in range(sp.get_piece_size()):
        m = re.fullmatch(r"\u2581([a-z]+)", sp.id_to_piece(i))
        if m and len(m[1]) in words and sp.encode(m[1]) == [i]:
            words[len(m[1])].append(m[1])
    if any(len(found) < 10 for found in words.values()):
        raise SystemExit(f"{tokenizer}: too few single-token lowercase words; is it the LLaMA-2 tokenizer?")
    letters = rng.choice(list(WORD_LETTERS), WORD_BUFFER, p=list(WORD_LETTERS.values())).tolist()
    chosen = [words[n][int(x * len(words[n]))] for n, x in zip(letters, rng.random(WORD_BUFFER).tolist())]
    text, starts = " ".join(chosen), np.concatenate([[0], np.cumsum([len(w) + 1 for w in chosen])])
    if len(sp.encode(text[: starts[20_000] - 1])) != 20_000:
        raise SystemExit(f"{tokenizer}: the synthetic words do not encode to one token each")
    return text, starts


def write_split(data_dir: Path, plan: Plan, tokenizer: Path, seed: int = 1) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    text, word_starts = word_text(tokenizer, rng)

    def runs(n_words):  # (start, end) characters of runs of n_words[i] words at random places
        first = (rng.random(len(n_words)) * (WORD_BUFFER - n_words + 1)).astype(int)
        return word_starts[first].tolist(), (word_starts[first + n_words] - 1).tolist()

    names, metas, prompts = [], [], []
    for p, (d, (a, b)) in enumerate(zip(plan.difficulty.tolist(), zip(*runs(plan.prompt)))):
        letter = chr(ord("A") + d - 7) if d >= 7 else "ABCDE"[p % 5]  # like the real `1041_E. Tree Reconstruction`
        names.append(f"{1000 + p}_{letter}. {TITLE_WORDS[p % 10]} {TITLE_WORDS[p // 10 % 10]}")
        metas.append({"source": "code_contests", "difficulty": d, "has_tests": bool(plan.has_tests[p])})
        prompts.append(text[a:b])
    starts, n_correct, solution = plan.starts.tolist(), plan.n_correct.tolist(), plan.solution.tolist()
    lines = list(zip(plan.line_problem.tolist(), plan.is_correct.tolist()))
    with open(data_dir / JSONL, "w") as f:
        for line, ((p, correct), a, b) in enumerate(zip(lines, *runs(plan.solution))):
            kind, i = ("correct", line - starts[p]) if correct else ("incorrect", line - starts[p] - n_correct[p])
            record = {"instruction": prompts[p], "input": "", "output": text[a:b], "task_id": f"{names[p]}_{kind}_{i}"}
            f.write(json.dumps(dict(record, is_correct=correct, metadata=metas[p])) + "\n")
    index_map = {}
    for p, name in enumerate(names):
        start, mid, stop = starts[p], starts[p] + n_correct[p], starts[p + 1]
        index_map[name] = {
            "difficulty": metas[p]["difficulty"],
            "correct_indices": list(range(start, mid)),
            "incorrect_indices": list(range(mid, stop)),
            "correct_token_lengths": solution[start:mid],
            "incorrect_token_lengths": solution[mid:stop],
        }
    correct, dist = int(plan.is_correct.sum()), Counter(plan.difficulty[plan.line_problem].tolist())
    stats = {"total": len(lines), "correct": correct, "incorrect": len(lines) - correct, "n_problems": len(names)}
    stats["difficulty_dist"] = {str(d): n for d, n in sorted(dist.items())}
    entries = [{"is_correct": c, "difficulty": metas[p]["difficulty"], "problem_id": names[p]} for p, c in lines]
    with open(data_dir / METADATA, "w") as f:
        json.dump({"metadata": entries, "problem_index_map": index_map, "stats": stats}, f, indent=2)


def read_split_info(data_dir: Path) -> dict[str, Any]:
    """The split's `synthetic.json`, or {} if absent, unreadable or its files changed size since."""
    try:
        info = json.loads((data_dir / PARAMS).read_text())
        sizes = {name: (data_dir / name).stat().st_size for name in (JSONL, METADATA)}
    except (OSError, ValueError):
        return {}
    return info if info.get("bytes") == sizes else {}


def ensure_split(data_dir: Path, lines: int, tokenizer: Path) -> dict[str, Any]:
    """Write the split of `lines` lines into `data_dir` unless it is there already; its `synthetic.json`."""
    data_dir, lines = Path(data_dir), int(lines)
    digest = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    params = {"generator": GENERATOR_VERSION, "lines": lines, "tokenizer_sha256": digest}
    info = read_split_info(data_dir)
    if info.get("params") == params:
        return info
    for name in (PARAMS, JSONL, METADATA):  # the info first: a half-written split is never reused
        remove(data_dir / name)
    data_dir.mkdir(parents=True, exist_ok=True)
    say(f"writing a synthetic split of {lines:,} lines to {data_dir}")
    plan = make_plan(lines)
    write_split(data_dir, plan, tokenizer)
    sizes = {name: (data_dir / name).stat().st_size for name in (JSONL, METADATA)}
    info = {"params": params, "lines": lines, "correct": int(plan.is_correct.sum()), "problems": len(plan.prompt)}
    (data_dir / PARAMS).write_text(json.dumps(dict(info, bytes=sizes), indent=2) + "\n")
    return read_split_info(data_dir)
