"""python -m benchmarks data: the synthetic split (benchmarks/synthetic.py), the methods, the whole subcommand."""

import json
import random
import re
import statistics

import numpy as np
import pytest

import benchmarks as bench
from benchmarks.__main__ import main as bench_main
from benchmarks import data as bench_data
from benchmarks import synthetic
from benchmarks.synthetic import JSONL, METADATA, PARAMS

pytestmark = pytest.mark.slow  # benchmarks: `python -m pytest -q -m slow`

LINES, N_SAMPLES = 3000, 500
LABELS = [
    "HF datasets, first run (JSON to Arrow)",
    "HF datasets, cached",
    "ours, first run (index built)",
    "ours, cached",
    "ours, packed, cached",
]


@pytest.fixture(scope="module")
def split(tmp_path_factory, llama_tokenizer_path):
    """A tiny synthetic split in WORKDIR/data, as the benchmark writes it; returns (workdir, info)."""
    workdir = tmp_path_factory.mktemp("bench-data")
    info = synthetic.ensure_split(workdir / "data", LINES, llama_tokenizer_path)
    return workdir, info


def _lines(workdir):
    return (workdir / "data" / JSONL).read_text().splitlines(keepends=True)


def _metadata(workdir):
    return json.loads((workdir / "data" / METADATA).read_text())


def _next_fit_rows(lengths, max_len):
    """Rows of greedy packing in order: a row is closed when the next sample does not fit."""
    rows, used = 0, max_len
    for n in lengths:
        if used + n > max_len:
            rows, used = rows + 1, 0
        used += n
    return rows


# ---------------------------------------------------------------------------------------------
# The synthetic split


def test_synthetic_split_follows_the_v2_layout(split):
    workdir, info = split
    lines = _lines(workdir)
    text = (workdir / "data" / METADATA).read_text()
    meta = json.loads(text)
    assert text == json.dumps(meta, indent=2)  # as json.dump(..., indent=2) writes it, like the real file
    entries, index_map, stats = meta["metadata"], meta["problem_index_map"], meta["stats"]
    assert len(lines) == len(entries) == LINES == info["lines"]

    numbers, instructions = {}, {}
    for line, entry in zip(lines, entries):
        record = json.loads(line)
        assert line == json.dumps(record) + "\n"
        assert list(record) == ["instruction", "input", "output", "task_id", "is_correct", "metadata"]
        m = re.fullmatch(r"(\d+_[A-V]\. [A-Z][a-z]+ [A-Z][a-z]+)_(correct|incorrect)_(\d+)", record["task_id"])
        assert m, record["task_id"]
        assert m[1] == entry["problem_id"] and record["is_correct"] == entry["is_correct"] == (m[2] == "correct")
        assert record["input"] == "" and record["output"] and record["instruction"]
        assert record["metadata"]["source"] == "code_contests" and isinstance(record["metadata"]["has_tests"], bool)
        assert record["metadata"]["difficulty"] == entry["difficulty"] and 0 <= entry["difficulty"] <= 28
        numbers.setdefault((m[1], m[2]), []).append(int(m[3]))
        instructions.setdefault(m[1], set()).add(record["instruction"])
    # Solutions are numbered from 0 within their problem and kind; a problem has one description.
    assert all(sorted(found) == list(range(len(found))) for found in numbers.values())
    assert all(len(found) == 1 for found in instructions.values())

    seen = []
    for name, problem in index_map.items():
        for kind in ("correct", "incorrect"):
            indices, lengths = problem[f"{kind}_indices"], problem[f"{kind}_token_lengths"]
            assert len(lengths) == len(indices)
            for i, n in zip(indices, lengths):
                expected = {"is_correct": kind == "correct", "difficulty": problem["difficulty"], "problem_id": name}
                assert entries[i] == expected
                assert n == len(json.loads(lines[i])["output"].split())  # the solution's tokens: one a word
            seen += indices
    assert sorted(seen) == list(range(LINES))  # every line once, under its own problem

    n_correct = sum(e["is_correct"] for e in entries)
    assert stats["total"] == LINES and stats["correct"] == n_correct == info["correct"]
    assert stats["incorrect"] == LINES - n_correct and stats["n_problems"] == len(index_map) == info["problems"]
    assert sum(stats["difficulty_dist"].values()) == LINES
    assert 0.3 < n_correct / LINES < 0.7


def test_synthetic_lengths_are_set_in_tokens(split, llama_tokenizer_path):
    from ref_tuning.data import tokenize_sample
    from ref_tuning.models import sheared_llama_tokenizer

    workdir, _ = split
    tok = sheared_llama_tokenizer(str(llama_tokenizer_path))
    lengths = []
    for line in random.Random(0).sample(_lines(workdir), 300):
        record = json.loads(line)
        tokens, _ = tokenize_sample(tok, record)
        planned = len(record["instruction"].split()) + len(record["output"].split()) + synthetic.TEMPLATE_TOKENS
        assert abs(len(tokens) - planned) <= 1, record["task_id"]
        lengths.append(len(tokens))
    # Loose bounds: 50 problems only; the full-size plan is checked tightly below.
    assert 1200 < statistics.mean(lengths) < 1800
    assert 0.08 < sum(n > 2048 for n in lengths) / len(lengths) < 0.35


def test_full_size_plan_has_the_real_data_lengths_and_fill():
    plan = synthetic.make_plan(synthetic.REAL_LINES)
    assert len(plan.line_problem) == synthetic.REAL_LINES and len(plan.prompt) == synthetic.REAL_PROBLEMS
    assert 0.45 < plan.is_correct.mean() < 0.49
    assert plan.solution.max() <= synthetic.SOLUTION_MAX
    lengths = plan.templated()
    assert 1400 < lengths.mean() < 1600
    assert 0.15 < (lengths > 2048).mean() < 0.25
    # 200K correct lines drawn, those of <= 2048 tokens kept in file order, as the dataset holds them.
    drawn = np.sort(np.random.default_rng(0).choice(np.flatnonzero(plan.is_correct), 200_000, replace=False))
    kept = [n for n in lengths[drawn].tolist() if n <= 2048]
    assert 0.71 < sum(kept) / (_next_fit_rows(kept, 2048) * 2048) < 0.75
    pad = {b: sum(kept) / bench_data.pad_layout(kept, b, seed=0)[1] for b in (4, 8)}
    assert 0.69 < pad[4] < 0.74 and 0.62 < pad[8] < 0.68, pad


def test_the_split_is_reused_while_its_parameters_match(tmp_path, llama_tokenizer_path):
    data_dir = tmp_path / "data"
    first = synthetic.ensure_split(data_dir, 200, llama_tokenizer_path)
    stamp = (data_dir / JSONL).stat().st_mtime_ns
    assert synthetic.ensure_split(data_dir, 200, llama_tokenizer_path) == first
    assert (data_dir / JSONL).stat().st_mtime_ns == stamp
    # Another line count, or a file changed since, and the split is written again.
    assert synthetic.ensure_split(data_dir, 300, llama_tokenizer_path)["lines"] == 300
    assert len(_lines(tmp_path)) == 300
    with open(data_dir / JSONL, "ab") as f:
        f.write(b"\n")
    assert synthetic.read_split_info(data_dir) == {}
    synthetic.ensure_split(data_dir, 300, llama_tokenizer_path)
    assert len(_lines(tmp_path)) == 300 and synthetic.read_split_info(data_dir)["lines"] == 300
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([JSONL, METADATA, PARAMS])


# ---------------------------------------------------------------------------------------------
# The methods


def test_hf_and_ours_keep_the_same_share_of_the_drawn_samples(split, llama_tokenizer_path):
    """The two draws differ (each its own random generator), but keep about as many samples of <= 2048 tokens."""
    workdir, _ = split
    counts = {}
    (workdir / "logs").mkdir(exist_ok=True)
    for m in bench_data.methods(workdir, llama_tokenizer_path, N_SAMPLES, ["hf-first", "ours-first"]):
        m.before()
        wall, peak_kib, rc = bench.run_child(m.cmd, workdir / "logs" / f"{m.key}.log")
        assert rc == 0 and wall > 0 and peak_kib > 0, bench.tail(workdir / "logs" / f"{m.key}.log")
        counts[m.key] = int(bench_data.built(workdir / "logs" / f"{m.key}.log").split()[1])
    assert 0.6 * N_SAMPLES < counts["hf-first"] < N_SAMPLES and 0.6 * N_SAMPLES < counts["ours-first"] < N_SAMPLES
    assert abs(counts["hf-first"] - counts["ours-first"]) < 0.1 * N_SAMPLES, counts


def test_a_first_run_starts_without_its_cache_or_sidecars(split, llama_tokenizer_path):
    workdir, info = split
    data_dir, cache, hf_cache = workdir / "data", workdir / "cache", workdir / "hf-cache"
    for d in (cache, hf_cache):
        d.mkdir(exist_ok=True)
        (d / "x").write_bytes(b"x")
    (data_dir / "train.index").write_bytes(b"x")
    methods = {m.key: m for m in bench_data.methods(workdir, llama_tokenizer_path, N_SAMPLES, bench_data.KEYS)}
    assert list(methods) == bench_data.KEYS and [m.label for m in methods.values()] == LABELS
    methods["ours-cached"].before()  # a cached run keeps them
    assert (cache / "x").is_file() and (hf_cache / "x").is_file() and (data_dir / "train.index").is_file()
    methods["hf-first"].before()
    assert not hf_cache.exists() and (cache / "x").is_file()
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([JSONL, METADATA, PARAMS])
    methods["ours-first"].before()
    assert not cache.exists()
    assert synthetic.read_split_info(data_dir) == info


def test_pad_layout_counts_each_batch_at_its_longest_sample():
    lengths = [5, 1, 1, 1, 9, 2, 3]
    assert bench_data.pad_layout(lengths, 1, seed=0) == (7, sum(lengths))
    assert bench_data.pad_layout(lengths, 7, seed=0) == (7, 7 * 9)
    assert bench_data.pad_layout(lengths, 8, seed=0) == (7, 7 * 9)  # a partial batch counts its own rows
    # Batches of 2 in a shuffled order: the same order for a seed, slots between the bounds.
    rows, slots = bench_data.pad_layout(lengths, 2, seed=4)
    assert bench_data.pad_layout(lengths, 2, seed=4) == (rows, slots)
    assert sum(lengths) < slots < 7 * 9
    assert {bench_data.pad_layout(lengths, 2, seed)[1] for seed in range(20)} != {slots}  # the seed matters


def test_a_missing_tokenizer_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="the LLaMA-2 tokenizer is not there; pass --tokenizer PATH"):
        bench_main(["data", "--workdir", str(tmp_path), "--tokenizer", str(tmp_path / "none.model")])
    assert not (tmp_path / "data").exists()
    # The default: $REF_TUNING_LLAMA_TOKENIZER, else the model's own inside the checkout.
    monkeypatch.delenv(bench.TOKENIZER_ENV, raising=False)
    if not bench.DEFAULT_TOKENIZER.is_file():
        with pytest.raises(SystemExit, match="storage/models/ref-sheared-llama-2.7b/raw/tokenizer.model"):
            bench.tokenizer_path(None)
    monkeypatch.setenv(bench.TOKENIZER_ENV, str(tmp_path / "env.model"))
    with pytest.raises(SystemExit, match="env.model: the LLaMA-2 tokenizer is not there"):
        bench.tokenizer_path(None)


# ---------------------------------------------------------------------------------------------
# The whole subcommand


def _rows(text):
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_data_bench_prints_the_table_and_the_fill_table(tmp_path, capsys, llama_tokenizer_path):
    argv = ["data", "--workdir", str(tmp_path), "--lines", str(LINES), "--n-samples", str(N_SAMPLES)]
    assert bench_main(argv + ["--repeats", "1", "--tokenizer", str(llama_tokenizer_path)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    methods, fills = rows[2:7], rows[9:]
    assert [row.split("|")[1].strip() for row in methods] == LABELS
    for row in methods:
        wall, runs, rss, ratio = (float(re.sub(r"\s.*", "", cell.strip())) for cell in row.split("|")[2:6])
        assert wall > 0 and runs == 1 and rss > 0 and ratio > 0, row
    assert f"{LINES:,} lines" in out and f"drawn: {N_SAMPLES:,} correct samples" in out

    built_line = out.split("- built (last run): ")[1].splitlines()[0]
    counts = {label.strip(): int(n) for label, n in re.findall(r"([^:;]+): (?:samples|packs) (\d+)", built_line)}
    assert list(counts) == LABELS
    assert counts[LABELS[0]] == counts[LABELS[1]] and counts[LABELS[2]] == counts[LABELS[3]]  # caches give the same
    assert 0 < counts[LABELS[4]] < counts[LABELS[3]]  # packs: fewer rows than samples

    kept = int(re.search(r"layout of the ([\d,]+) kept samples", rows[7])[1].replace(",", ""))
    assert kept == counts[LABELS[3]]  # the samples ours kept, in every layout
    assert [row.split("|")[1].strip() for row in fills] == [
        "padded to the batch maximum (batch 4, shuffled)",
        "torchtune's in-order packing at 2048",
        "ours: best-fit packing at 2048",
        "bound: the fewest rows any packing needs",
    ]
    cells = [[float(c.strip().replace(",", "")) for c in row.split("|")[2:5]] for row in fills]
    tokens = {round(fill * slots) for _, slots, fill in cells}
    assert max(tokens) - min(tokens) <= 0.001 * max(tokens)  # the same real tokens in every layout
    assert all(0 < fill <= 1 and n_rows > 0 for n_rows, _, fill in cells)
    assert cells[0][0] == kept and cells[2][2] >= cells[1][2]  # best fit never does worse than in order here
    assert cells[3][0] <= cells[2][0] and cells[3][2] >= cells[2][2]  # nor better than the bound
    # The split stays for reuse, and the caches; nothing else.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data", "hf-cache", "logs"]
