"""The excess-loss preview with two references: how far tuning the reference changes the tokens Rho-1 selects
(overlap of the top-k sets, by position and difficulty, tokens entering and leaving), checked against the stores."""

import itertools
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from ref_tuning import preview as preview_module
from ref_tuning.demo import write_tiny_checkpoint
from ref_tuning.scoring import ScoreError, ScoreStore

from conftest import run_in_process

K = 0.6


@pytest.fixture(scope="module")
def stores(assets, tmp_path_factory):
    """Score stores of the same 24 valid samples by three tiny models: the tuned reference (the demo model), the
    base reference and the policy. Each model directory has its own copy of the tokenizer, as the real ones do."""
    root = tmp_path_factory.mktemp("overlap")
    models = {"tuned": assets["model"]}
    for seed, name in ((1, "base"), (2, "policy")):
        models[name] = write_tiny_checkpoint(root / name, assets["vocab_size"], assets["tokenizer"], seed=seed)
    paths = {}
    for name, model in models.items():
        paths[name] = root / f"{name}-scores"
        code, text = run_in_process(
            "score",
            [
                f"model_dir={model}",
                f"output_dir={paths[name]}",
                f"dataset.data_dir={assets['data']}",
                "device=cpu",
                "dtype=fp32",
                "store_dtype=float32",  # no float16 ties between excess losses: one top-k set
                "dataset.split=valid",
                "dataset.n_samples=24",
                "dataset.correct_ratio=0.5",
                "batch_size=4",
            ],
        )
        assert code == 0 and len(ScoreStore(paths[name])) == 24, text[-3000:]
    paths["root"] = root
    return paths


def direct_masks(stores, ref: str, names):
    """Rho-1's selection with reference `ref`, from the stores: top k of policy loss minus reference loss."""
    policy, reference = ScoreStore(stores["policy"]), ScoreStore(stores[ref])
    return preview_module.select_top({n: policy.losses(n) - reference.losses(n) for n in names}, K)


@pytest.fixture(scope="module")
def compared(stores):
    out = stores["root"] / "compared"
    result = preview_module.preview(stores["tuned"], stores["policy"], out, k=K, base=stores["base"], progress=False)
    return result, out


def test_overlap_equals_a_direct_computation_from_the_stores(stores, compared):
    result, out = compared
    difficulty = {s.task_id: s.difficulty for s in ScoreStore(stores["tuned"])}
    names = list(difficulty)
    tuned, base = direct_masks(stores, "tuned", names), direct_masks(stores, "base", names)
    as_set = lambda masks: {(n, i) for n, m in masks.items() for i in m.nonzero().flatten().tolist()}  # noqa: E731
    a, b = as_set(tuned), as_set(base)
    c = result["base_vs_tuned"]
    assert json.loads((out / "preview.json").read_text())["base_vs_tuned"] == c
    assert c["samples"] == 24 and c["left_out"] == {"tuned only": 0, "base only": 0}
    assert c["tokens"] == result["tokens"] and c["tuned"] == c["base"] == len(a) == round(K * c["tokens"])
    assert (c["both"], c["entering"], c["leaving"]) == (len(a & b), len(a - b), len(b - a))
    assert c["jaccard"] == pytest.approx(len(a & b) / len(a | b))
    assert c["tuned_also_base"] == pytest.approx(len(a & b) / len(a))
    assert 0 < c["jaccard"] < 1  # different models: some tokens change, most do not
    # The tuned reference's own preview is the one-reference preview of the same samples.
    assert result["selected"] == len(a) and result["shares"] == preview_module.shares(tuned, difficulty)
    text = (out / "preview.md").read_text()
    assert "## Base against tuned reference: how far tuning changes the selection" in text
    reading = (
        "**Reading:** An overlap near 1 means tuning the reference does not change what Rho-1 trains on; here the "
        f"Jaccard index is {c['jaccard']:.3f}: {1 - c['tuned_also_base']:.1%} of the tokens selected with the tuned"
    )
    assert reading in text
    assert (
        f"| all | {c['tokens']} | {c['base']} | {c['tuned']} | {c['both']} | {c['entering']} | {c['leaving']} |" in text
    )


def test_by_position_and_difficulty_the_counts_sum_to_the_totals(compared):
    c = compared[0]["base_vs_tuned"]
    assert set(c["by"]) == {"position in the solution", "difficulty"}
    for title, groups in c["by"].items():
        for key in ("tokens", "tuned", "base", "both", "entering", "leaving"):
            assert sum(g[key] for g in groups.values()) == c[key], (title, key)
        for g in groups.values():
            assert g["entering"] == g["tuned"] - g["both"] and g["leaving"] == g["base"] - g["both"]
            assert g["jaccard"] == pytest.approx(g["both"] / (g["tuned"] + g["base"] - g["both"]) if g["tokens"] else 1)
    assert len(c["by"]["position in the solution"]) == preview_module.POSITION_BINS
    assert len(c["by"]["difficulty"]) > 1  # the demo's valid problems are of several difficulties


def runs(pieces, keep):
    """The text of each run of consecutive tokens where `keep` holds."""
    grouped = itertools.groupby(zip(pieces, keep), key=lambda pair: pair[1])
    return ["".join(p for p, _ in run) for kept, run in grouped if kept]


def test_entering_and_leaving_examples_are_exactly_the_tokens_in_one_selection_only(assets, stores, compared):
    result, out = compared
    store = ScoreStore(stores["tuned"])
    names = [s.task_id for s in store]
    tuned, base = direct_masks(stores, "tuned", names), direct_masks(stores, "base", names)
    changed = {n: int((tuned[n] ^ base[n]).sum()) for n in names}
    examples = result["base_vs_tuned"]["examples"]
    chosen = [e["task_id"] for e in examples]
    assert len(chosen) == min(4, sum(1 for n in names if changed[n]))
    assert min(changed[n] for n in chosen) >= max(changed[n] for n in names if n not in chosen)
    text = (out / "preview.md").read_text()
    tokenizer = preview_module.tt_config.instantiate(preview_module.OmegaConf.create(store.description["tokenizer"]))
    ds = preview_module.tt_config.instantiate(preview_module.OmegaConf.create(store.description["dataset"]), tokenizer)
    item = {int(line): i for i, line in enumerate(ds.lines.tolist())}
    for e in examples:
        name = e["task_id"]
        t, b = tuned[name], base[name]
        assert (e["entering"], e["leaving"], e["both"]) == (
            int((t & ~b).sum()),
            int((b & ~t).sum()),
            int((t & b).sum()),
        )
        sample = ds[item[store.sample(name).line]]
        ids = [x for x, label in zip(sample["tokens"][1:], sample["labels"][1:]) if label >= 0]
        pieces = preview_module._pieces(tokenizer, ids)
        block = re.search(rf"#### {re.escape(name)} \(.*?\n```\n(.*?)\n```", text, re.S).group(1)
        assert re.findall("⟪(.*?)⟫", block, re.S) == runs(pieces, (t & ~b).tolist())  # entering: tuned only
        assert re.findall("⟬(.*?)⟭", block, re.S) == runs(pieces, (b & ~t).tolist())  # leaving: base only
        assert re.findall("⟦(.*?)⟧", block, re.S) == runs(pieces, (t & b).tolist())
        assert re.sub("[⟪⟫⟬⟭⟦⟧]", "", block) == "".join(pieces)


def test_render_with_two_references_and_overlap_on_a_small_case():
    tuned, base = torch.tensor([True, True, False, False, True]), torch.tensor([True, False, True, False, False])
    assert preview_module.render(list("abcde"), tuned, base) == "⟦a⟧⟪b⟫⟬c⟭d⟪e⟫"
    c = preview_module.overlap({"s": tuned}, {"s": base}, {"s": 3})
    assert (c["tuned"], c["base"], c["both"], c["entering"], c["leaving"]) == (3, 2, 1, 2, 1)
    assert c["jaccard"] == 0.25 and c["tuned_also_base"] == pytest.approx(1 / 3)
    assert c["by"]["difficulty"] == {"3": {key: v for key, v in c.items() if key != "by"}}
    none = torch.zeros(5, dtype=torch.bool)
    assert preview_module.overlap({"s": none}, {"s": none}, {"s": 3})["jaccard"] == 1.0  # the same empty selection


def test_identical_references_overlap_fully_through_the_command_line(stores):
    out = stores["root"] / "same"
    twin = copy_store(stores["tuned"], stores["root"] / "tuned-copy")  # the same store itself is refused (below)
    code, text = run_in_process(
        "preview",
        [
            str(stores["tuned"]),
            str(stores["policy"]),
            "--base",
            str(twin),
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert code == 0, text[-3000:]
    c = json.loads((out / "preview.json").read_text())["base_vs_tuned"]
    assert (c["jaccard"], c["tuned_also_base"], c["entering"], c["leaving"], c["examples"]) == (1.0, 1.0, 0, 0, [])
    assert c["both"] == c["tuned"] and all(g["jaccard"] == 1.0 for g in c["by"]["difficulty"].values())
    md = (out / "preview.md").read_text()
    assert (
        "here the Jaccard index is 1.000: 0.0% of the tokens" in md and "No token enters or leaves the selection" in md
    )
    assert "⟪" not in md and "⟬" not in md


def copy_store(src: Path, dst: Path, keep=lambda entry: True, edit=lambda description: None) -> Path:
    """A copy of a store with only the index lines `keep` accepts and its description edited in place."""
    shutil.copytree(src, dst)
    for idx in dst.glob("part-*.idx"):
        entries = [json.loads(line) for line in idx.read_text().splitlines()]
        idx.write_text("".join(json.dumps(e) + "\n" for e in entries if keep(e)))
    description = json.loads((dst / "scores.json").read_text())
    edit(description)
    (dst / "scores.json").write_text(json.dumps(description))
    return dst


def test_only_the_samples_of_both_stores_are_compared(stores, tmp_path):
    names = sorted(s.task_id for s in ScoreStore(stores["tuned"]))
    half = set(names[::2])
    base_half = copy_store(stores["base"], tmp_path / "base-half", keep=lambda e: e["task_id"] in half)
    result = preview_module.preview(stores["tuned"], stores["policy"], tmp_path / "p", k=K, base=base_half)
    c = result["base_vs_tuned"]
    assert result["samples"] == c["samples"] == len(half) and c["left_out"] == {"tuned only": 12, "base only": 0}
    tuned, base = direct_masks(stores, "tuned", sorted(half)), direct_masks(stores, "base", sorted(half))
    assert c["both"] == sum(int((tuned[n] & base[n]).sum()) for n in half)
    # No sample in common: refused.
    tuned_rest = copy_store(stores["tuned"], tmp_path / "tuned-rest", keep=lambda e: e["task_id"] not in half)
    with pytest.raises(ScoreError, match=r"--base .*base-half: shares no scored sample with .*tuned-rest \(12 and 12"):
        preview_module.preview(tuned_rest, stores["policy"], tmp_path / "q", k=K, base=base_half)
    assert not (tmp_path / "q").exists()


def test_stores_of_other_samples_or_another_tokenizer_are_refused(assets, stores, tmp_path):
    other_draw = copy_store(stores["base"], tmp_path / "seed7", edit=lambda d: d["dataset"].update(seed=7))
    code, text = run_in_process(
        "preview",
        [str(stores["tuned"]), str(stores["policy"]), "--base", str(other_draw), "--out", str(tmp_path / "o")],
    )
    errors = [line for line in text.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert "seed7: scored other samples than" in errors[0] and "dataset config differs in seed" in errors[0]
    # Another tokenizer file (the same one at another path is fine: each store names its model's copy).
    other_file = tmp_path / "other.model"
    other_file.write_bytes(Path(assets["tokenizer"]).read_bytes() + b"\0")
    other_tok = copy_store(stores["base"], tmp_path / "tok", edit=lambda d: d["tokenizer"].update(path=str(other_file)))
    with pytest.raises(ScoreError, match=r"scored other tokenizer than .* path: .* are different files"):
        preview_module.preview(stores["tuned"], stores["policy"], tmp_path / "o", base=other_tok)
    longer = copy_store(stores["base"], tmp_path / "len", edit=lambda d: d["tokenizer"].update(max_seq_len=4096))
    with pytest.raises(ScoreError, match=r"tokenizer config differs in max_seq_len\); score the base with"):
        preview_module.preview(stores["tuned"], stores["policy"], tmp_path / "o", base=longer)
    with pytest.raises(ScoreError, match="not a score store"):
        preview_module.preview(stores["tuned"], stores["policy"], tmp_path / "o", base=assets["model"])
    assert not (tmp_path / "o").exists()
