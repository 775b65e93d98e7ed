"""python -m ref_tuning.convert: exact round trips, the HF layout, verify, atomic outputs, bad input.

Inputs are built at test time: a tiny Sheared-LLaMA-family HF directory (two `.bin` shards, index,
config.json), copied into `tmp_path` by the tests that damage it, and, for the SIGKILL tests, a model
big enough (174 MB in fp32) that writing it takes a measurable fraction of a second. Expected values
are read with `torch.load(weights_only=True)`, `safetensors` and `transformers`, not with the code
under test, wherever that is possible.
"""

import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchtune.models import convert_weights

from ref_tuning import atomic, convert
from ref_tuning.checksums import SUMS_FILE, damaged as damaged_files, file_sha256
from ref_tuning.hf_checkpoint import (
    CheckpointError,
    expected_hf_shapes,
    load_hf_state_dict,
    save_hf_checkpoint,
)
from ref_tuning.demo import write_tiny_checkpoint
from ref_tuning.models import hf_llama_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512  # with the demo's tiny shape: 2 layers, embed 128, 2.1 MB in fp32
SHARD1, SHARD2 = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
INDEX = "pytorch_model.bin.index.json"
# Big enough that the subprocess spends a measurable time writing (about 174 MB in fp32).
BIG_MODEL = dict(
    vocab_size=32_000, num_layers=4, num_heads=4, num_kv_heads=4, embed_dim=512, intermediate_dim=1376, max_seq_len=128
)


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """The tiny fp32 HF directory (written by the demo's code); never modified by a test."""
    out = write_tiny_checkpoint(tmp_path_factory.mktemp("convert") / "src", VOCAB)
    assert sorted(p.name for p in out.glob("*.bin")) == [SHARD1, SHARD2]
    assert not (out / "tokenizer.model").exists()  # `verify` then uses fixed ids, no tokenizer needed
    return out


@pytest.fixture(scope="module")
def bf16_dir(src, tmp_path_factory) -> Path:
    """`src` cast to bf16 by `hf-to-hf --dtype bf16`."""
    out = tmp_path_factory.mktemp("convert_bf16") / "bf16"
    assert convert.main(["hf-to-hf", str(src), str(out), "--dtype", "bf16", "--no-progress"]) == 0
    return out


@pytest.fixture()
def damaged(src, tmp_path) -> Path:
    """A private copy of `src` that a test may break, without its checksums, as the hub's directories come: what
    the readers' own checks find (test_a_damaged_shard_of_a_directory_we_wrote_is_named: the checksums')."""
    copy = Path(shutil.copytree(src, tmp_path / "damaged"))
    (copy / SUMS_FILE).unlink()
    return copy


def run_main(capsys, *args) -> Tuple[int, str, str]:
    capsys.readouterr()
    rc = convert.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def torch_load_dir(hf_dir: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a `.bin` HF directory, read by torch itself (weights only)."""
    index = json.loads((hf_dir / INDEX).read_text())
    sd = {}
    for file_name in sorted(set(index["weight_map"].values())):
        sd.update(torch.load(hf_dir / file_name, weights_only=True))
    assert sd.keys() == index["weight_map"].keys()
    return sd


def assert_same_tensors(got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def hidden_entries(parent: Path) -> List[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def dir_digest(path: Path) -> Dict[str, str]:
    return {p.name: hashlib.blake2b(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def rewrite_shard(hf_dir: Path, file_name: str, edit) -> None:
    """Load a shard with torch, let `edit` change the dict, save it back with torch.save."""
    sd = torch.load(hf_dir / file_name, weights_only=True)
    edit(sd)
    torch.save(sd, hf_dir / file_name)


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------------------------
# 1. Round trips


def test_hf_to_tune_to_hf_round_trip_is_bit_identical(src, tmp_path, capsys):
    pt, back = tmp_path / "model.pt", tmp_path / "back"
    rc, out, err = run_main(capsys, "hf-to-tune", src, pt, "--no-progress")
    assert (rc, err) == (0, "") and f"wrote {pt}" in out
    rc, out, err = run_main(capsys, "tune-to-hf", pt, back, "--config", src, "--no-progress")
    assert (rc, err) == (0, "") and f"wrote {back}" in out
    original = load_hf_state_dict(src)
    assert_same_tensors(load_hf_state_dict(back), original)
    assert all(t.dtype == torch.float32 for t in original.values())
    assert_same_tensors(torch_load_dir(back), torch_load_dir(src))  # torch reads the same


def test_bf16_to_fp32_to_bf16_is_bit_identical(src, bf16_dir, tmp_path, capsys):
    source = load_hf_state_dict(src)
    bf16 = load_hf_state_dict(bf16_dir)
    assert_same_tensors(bf16, {k: v.to(torch.bfloat16) for k, v in source.items()})

    fp32_dir, again = tmp_path / "fp32", tmp_path / "bf16_again"
    assert run_main(capsys, "hf-to-hf", bf16_dir, fp32_dir, "--dtype", "fp32", "--no-progress")[0] == 0
    assert_same_tensors(load_hf_state_dict(fp32_dir), {k: v.float() for k, v in bf16.items()})
    assert json.loads((fp32_dir / "config.json").read_text())["torch_dtype"] == "float32"

    assert run_main(capsys, "hf-to-hf", fp32_dir, again, "--dtype", "bf16", "--no-progress")[0] == 0
    assert_same_tensors(load_hf_state_dict(again), bf16)
    assert_same_tensors(torch_load_dir(again), torch_load_dir(bf16_dir))


def test_hf_to_tune_file_is_torchtunes_own_conversion(src, tmp_path):
    pt = convert.hf_to_tune_file(src, tmp_path / "model.pt")
    got = torch.load(pt, weights_only=True)
    config = json.loads((src / "config.json").read_text())
    expected = convert_weights.hf_to_tune(
        torch_load_dir(src),
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        dim=config["hidden_size"],
    )
    assert_same_tensors(got, expected)
    assert "tok_embeddings.weight" in got and "output.weight" in got  # torchtune's names

    bf16 = convert.hf_to_tune_file(src, tmp_path / "model_bf16.pt", dtype=torch.bfloat16)
    assert_same_tensors(torch.load(bf16, weights_only=True), {k: v.to(torch.bfloat16) for k, v in expected.items()})


# ---------------------------------------------------------------------------------------------
# 2. Output layout


def test_hf_to_hf_default_layout(src, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert run_main(capsys, "hf-to-hf", src, out, "--no-progress")[0] == 0
    weights = sorted(p.name for p in out.iterdir() if "model" in p.name)
    assert weights == ["pytorch_model-00001-of-00001.bin", INDEX]  # 2 MB is far below the default 5GB
    index = json.loads((out / INDEX).read_text())
    written = torch_load_dir(out)
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in written.values())
    assert list(index["weight_map"]) == list(expected_hf_shapes(json.loads((src / "config.json").read_text())))
    assert_same_tensors(written, torch_load_dir(src))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert hidden_entries(tmp_path) == []

    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.float32
    assert_same_tensors({k: v for k, v in model.state_dict().items() if k in written}, written)


@pytest.mark.parametrize("command", ["hf-to-hf", "hf-to-tune"])
def test_views_and_transposed_tensors_in_the_source_convert_correctly(damaged, tmp_path, capsys, command):
    """Tensors the source stores as views (offset into a storage, transposed) cannot be byte-copied."""

    def as_views(sd):
        for i, (name, t) in enumerate(sorted(sd.items())):
            if t.dim() == 2 and i % 2:
                sd[name] = t.t().contiguous().t()  # same values, column-major storage
            elif t.dim() == 1:
                sd[name] = torch.cat([torch.zeros(3), t])[3:]  # a view at offset 3 of a larger storage

    expected = torch_load_dir(damaged)
    rewrite_shard(damaged, SHARD1, as_views)
    stored = torch.load(damaged / SHARD1, weights_only=True)
    assert any(not t.is_contiguous() for t in stored.values()) and any(t.storage_offset() for t in stored.values())
    out = tmp_path / ("out.pt" if command == "hf-to-tune" else "out")
    assert run_main(capsys, command, damaged, out, "--no-progress")[0] == 0
    if command == "hf-to-hf":
        written = torch_load_dir(out)
        assert_same_tensors(written, expected)
        # Each tensor alone in its storage, as in the hub's files: no bytes of the larger storage written.
        assert all(t.is_contiguous() and t.untyped_storage().nbytes() == nbytes(t) for t in written.values())
    else:
        config = json.loads((damaged / "config.json").read_text())
        heads = config["num_attention_heads"]
        assert_same_tensors(
            torch.load(out, weights_only=True),
            convert_weights.hf_to_tune(expected, num_heads=heads, num_kv_heads=heads, dim=config["hidden_size"]),
        )


def test_max_shard_size_is_honoured(src, tmp_path, capsys):
    source = torch_load_dir(src)
    counts = {}
    for limit, size in (("400KB", 400_000), ("100KB", 100_000)):
        out = tmp_path / limit
        assert run_main(capsys, "hf-to-hf", src, out, "--max-shard-size", limit, "--no-progress")[0] == 0
        index = json.loads((out / INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
        assert sorted(p.name for p in out.glob("*.bin")) == files
        assert all(re.fullmatch(rf"pytorch_model-\d{{5}}-of-{len(files):05d}\.bin", f) for f in files)
        assert [int(f[14:19]) for f in files] == list(range(1, len(files) + 1))
        for f in files:
            shard = torch.load(out / f, weights_only=True)
            assert set(shard) == {k for k, v in index["weight_map"].items() if v == f}
            total = sum(nbytes(t) for t in shard.values())
            assert total <= size or len(shard) == 1, (limit, f, total)
        assert_same_tensors(torch_load_dir(out), source)
        counts[limit] = len(files)
    assert 1 < counts["400KB"] < counts["100KB"]


def test_safetensors_layout(src, tmp_path, capsys):
    out = tmp_path / "st"
    rc, _, err = run_main(capsys, "hf-to-hf", src, out, "--safetensors", "--max-shard-size", "500KB", "--no-progress")
    assert (rc, err) == (0, "")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and sorted(p.name for p in out.glob("model*.safetensors")) == files
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    assert not list(out.glob("*.bin")) and not (out / INDEX).exists()
    written = {}
    for f in files:
        shard = load_file(out / f)
        assert set(shard) == {k for k, v in index["weight_map"].items() if v == f}
        written.update(shard)
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in written.values())
    assert_same_tensors(written, torch_load_dir(src))

    # And back: safetensors shards, and a single model.safetensors as some hub models ship, as input.
    single = Path(shutil.copytree(src, tmp_path / "single", ignore=shutil.ignore_patterns("pytorch_model*", SUMS_FILE)))
    save_file(written, single / "model.safetensors", metadata={"format": "pt"})
    for source in (out, single):
        back = tmp_path / f"{source.name}_back"
        assert run_main(capsys, "hf-to-hf", source, back, "--no-progress")[0] == 0
        assert_same_tensors(torch_load_dir(back), torch_load_dir(src))


def test_bf16_output_states_its_dtype_and_loads_in_transformers(bf16_dir):
    from transformers import AutoModelForCausalLM

    config = json.loads((bf16_dir / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    written = torch_load_dir(bf16_dir)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype="auto")
    assert model.dtype == torch.bfloat16
    assert_same_tensors({k: v for k, v in model.state_dict().items() if k in written}, written)


def test_side_files_are_copied_when_present(damaged, tmp_path, capsys):
    (damaged / "tokenizer.model").write_bytes(b"\x00dummy sentencepiece model\xff")
    (damaged / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2, "max_length": 77}')
    assert not (damaged / "tokenizer.json").exists()
    out = tmp_path / "out"
    assert run_main(capsys, "hf-to-hf", damaged, out, "--no-progress")[0] == 0
    for name in ("tokenizer.model", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (damaged / name).read_bytes(), name
    assert not (out / "tokenizer.json").exists()  # absent in the source: not invented

    pt, back = tmp_path / "m.pt", tmp_path / "back"  # tune-to-hf takes them from --config
    assert run_main(capsys, "hf-to-tune", damaged, pt, "--no-progress")[0] == 0
    assert run_main(capsys, "tune-to-hf", pt, back, "--config", damaged, "--no-progress")[0] == 0
    assert (back / "tokenizer.model").read_bytes() == (damaged / "tokenizer.model").read_bytes()
    assert (back / "generation_config.json").read_bytes() == (damaged / "generation_config.json").read_bytes()


# ---------------------------------------------------------------------------------------------
# 3. verify


def test_verify_fp32(src, capsys):
    diff = convert.verify(src)
    assert 0 <= diff <= 1e-5
    rc, out, _ = run_main(capsys, "verify", src)
    assert rc == 0 and "OK" in out and str(src) in out
    rc, out, _ = run_main(capsys, "verify", src, "--atol", "-1")  # no difference passes a negative tolerance
    assert rc == 1 and "MISMATCH" in out


def test_verify_bf16(bf16_dir, capsys):
    assert 0 <= convert.verify(bf16_dir) <= 1e-5
    rc, out, _ = run_main(capsys, "verify", bf16_dir)
    assert rc == 0 and "OK" in out


# ---------------------------------------------------------------------------------------------
# 4. Atomic outputs


@pytest.mark.parametrize("command", ["hf-to-hf", "hf-to-tune"])
def test_existing_output_needs_overwrite(src, tmp_path, capsys, command):
    out = tmp_path / ("out" if command == "hf-to-hf" else "out.pt")
    assert run_main(capsys, command, src, out, "--no-progress")[0] == 0
    before = dir_digest(out) if out.is_dir() else out.read_bytes()

    rc, _, err = run_main(capsys, command, src, out, "--dtype", "bf16", "--no-progress")
    assert rc == 2 and err.startswith("error: ")
    assert str(out) in err and "already exists" in err and "--overwrite" in err
    assert (dir_digest(out) if out.is_dir() else out.read_bytes()) == before

    rc, _, err = run_main(capsys, command, src, out, "--dtype", "bf16", "--overwrite", "--no-progress")
    assert (rc, err) == (0, "")
    written = torch_load_dir(out) if out.is_dir() else torch.load(out, weights_only=True)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert hidden_entries(tmp_path) == []


def _convert_in_fork(args: List[str], log: Path, file_size_limit: int = 0) -> multiprocessing.Process:
    """`python -m ref_tuning.convert ARGS` in a forked child (it starts with this process's imports: seconds
    less than a fresh interpreter), its stderr into `log`; with `file_size_limit`, no file it writes can grow
    past that many bytes, as on a full disk."""

    def child() -> None:
        torch.set_num_threads(1)  # the parent's OpenMP threads do not exist in a fork: joining them would hang
        with open(log, "wb") as f:
            os.dup2(f.fileno(), 2)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        if file_size_limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
        os._exit(convert.main(args))

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    return proc


def _convert_then_kill(args: List[str], out: Path, log: Path, kill_at_bytes: int) -> Tuple[int, int]:
    """Run the conversion ARGS writing `out` and SIGKILL it once its temporary output holds `kill_at_bytes`
    bytes (or at once if that output is gone, renamed to `out`). Progress, not the clock, picks the moment:
    how long the write takes depends on the machine's load. Returns the pid and the exit status (-9 if killed)."""
    tmp_glob = f".{out.name}.tmp-*-{{pid}}-*"
    proc = _convert_in_fork(args, log)
    try:
        deadline, seen = time.monotonic() + 120, False
        while proc.is_alive():
            assert time.monotonic() < deadline, "not done writing after 120 s"
            tmps = list(out.parent.glob(tmp_glob.format(pid=proc.pid)))
            try:
                written = sum(f.stat().st_size for f in tmps[0].iterdir()) if tmps else -1
            except FileNotFoundError:  # renamed or removed while we looked
                written = kill_at_bytes
            seen = seen or written >= 0
            if written >= kill_at_bytes or (seen and not tmps):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.0005)
        proc.join(timeout=120)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if not seen:
        pytest.fail(f"exited with {proc.exitcode} before its temporary output was seen: {log.read_text()}")
    return proc.pid, proc.exitcode


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Tuple[Path, int]:
    """A 174 MB fp32 HF directory in two shards, and its size in bytes."""
    root = tmp_path_factory.mktemp("convert_big")
    config = hf_llama_config(**BIG_MODEL)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in expected_hf_shapes(config).items()}
    total = sum(map(nbytes, sd.values()))
    save_hf_checkpoint(sd, root / "src", config, max_shard_size=total // 2)
    del sd
    yield root / "src", total
    shutil.rmtree(root, ignore_errors=True)  # 174 MB: don't keep it among pytest's old temp dirs


def _kill_points(total: int, seed: int, n: int) -> List[int]:
    """n random moments of a write of `total` bytes, one in each n-th of it; the last n-th ends when
    every byte of the shards is written, before the index, config.json and the final rename."""
    rng = random.Random(seed)
    return [int(total * rng.uniform(i / n, (i + 1) / n)) for i in range(n)]


def test_sigkill_leaves_no_output(big, tmp_path):
    big_src, total = big
    out = tmp_path / "out"
    args = ["hf-to-hf", str(big_src), str(out), "--no-progress"]
    mid_write = 0
    for i, at in enumerate(_kill_points(total, seed=1, n=4)):
        pid, rc = _convert_then_kill(args, out, tmp_path / f"{i}.log", kill_at_bytes=at)
        assert rc in (0, -signal.SIGKILL), (rc, (tmp_path / f"{i}.log").read_text())
        if out.exists():  # the kill came after the final rename: then the output is complete
            assert hidden_entries(tmp_path) == []
            assert_same_tensors(load_hf_state_dict(out), load_hf_state_dict(big_src))
            shutil.rmtree(out)
            continue
        assert rc == -signal.SIGKILL, f"exited 0 at {at} bytes without writing {out}"
        mid_write += 1
        # Only this process's temporary folder is left: the earlier ones were removed by this run.
        left = hidden_entries(tmp_path)
        assert left and all(re.fullmatch(rf"\.out\.tmp-.+-{pid}-[0-9a-f]+", n) for n in left), left
    assert mid_write >= 2, f"only {mid_write} of 4 kills landed during the write"

    convert.hf_to_hf_dir(big_src, out, progress=False)  # a later successful conversion cleans up
    assert hidden_entries(tmp_path) == []
    assert_same_tensors(load_hf_state_dict(out), load_hf_state_dict(big_src))


def test_sigkill_during_overwrite_keeps_the_old_version(big, tmp_path):
    big_src, total = big
    out = tmp_path / "out"
    convert.hf_to_hf_dir(big_src, out, progress=False)  # the older complete conversion, fp32
    old = dir_digest(out)
    args = ["hf-to-hf", str(big_src), str(out), "--dtype", "bf16", "--overwrite", "--no-progress"]
    mid_write = 0
    for i, at in enumerate(_kill_points(total // 2, seed=2, n=3)):  # bf16: half the bytes
        pid, rc = _convert_then_kill(args, out, tmp_path / f"{i}.log", kill_at_bytes=at)
        assert rc in (0, -signal.SIGKILL), (rc, (tmp_path / f"{i}.log").read_text())
        assert out.is_dir(), f"kill {i} at {at} bytes left no {out}: {hidden_entries(tmp_path)}"
        if dir_digest(out) != old:  # the kill came after the final rename: the new version, complete
            assert {t.dtype for t in torch_load_dir(out).values()} == {torch.bfloat16}
            convert.hf_to_hf_dir(big_src, out, overwrite=True, progress=False)  # the old one again
            assert dir_digest(out) == old
            continue
        assert rc == -signal.SIGKILL, f"exited 0 at {at} bytes without replacing {out}"
        mid_write += 1
        left = hidden_entries(tmp_path)
        assert any(re.fullmatch(rf"\.out\.tmp-.+-{pid}-[0-9a-f]+", n) for n in left) and not [
            n for n in left if ".old-" in n
        ], left
    assert mid_write >= 2, f"only {mid_write} of 3 kills landed during the write"
    assert_same_tensors(load_hf_state_dict(out), load_hf_state_dict(big_src))  # still loads, same values

    convert.hf_to_hf_dir(big_src, out, dtype=torch.bfloat16, overwrite=True, progress=False)
    assert hidden_entries(tmp_path) == []  # stale temporaries of the killed processes removed
    assert {t.dtype for t in torch_load_dir(out).values()} == {torch.bfloat16}


class _Died(BaseException):
    """Stands for the process dying (as under SIGKILL) at a chosen point; no `except Exception` stops it."""


def _die_once_the_old_version_is_aside(monkeypatch, out: Path) -> None:
    """Make `os.replace` raise `_Died` right after it moves `out` aside (the first of two renames)."""
    real_replace = os.replace

    def replace(source, target, *args, **kwargs):
        real_replace(source, target, *args, **kwargs)
        if Path(source) == out:
            raise _Died()

    monkeypatch.setattr(os, "replace", replace)


def test_death_between_the_two_renames_of_an_overwrite(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert.hf_to_hf_dir(src, out, progress=False)
    old = load_hf_state_dict(out)
    _die_once_the_old_version_is_aside(monkeypatch, out)
    try:
        convert.hf_to_hf_dir(src, out, dtype=torch.bfloat16, overwrite=True, progress=False)
    except _Died:
        pass
    monkeypatch.undo()
    assert out.is_dir(), f"{out} is gone; left: {hidden_entries(tmp_path)}"
    now = load_hf_state_dict(out)  # the old version or the new one, complete either way
    assert_same_tensors(
        now, old if now[next(iter(now))].dtype == torch.float32 else {k: v.to(torch.bfloat16) for k, v in old.items()}
    )


def test_without_an_atomic_swap_a_death_between_renames_is_repaired_by_the_next_write(src, tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing, the old version is moved aside, then replaced;
    a death in between leaves it aside, and the next write to the target puts it back first."""
    out = tmp_path / "out"
    convert.hf_to_hf_dir(src, out, progress=False)
    old = load_hf_state_dict(out)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    _die_once_the_old_version_is_aside(monkeypatch, out)
    with pytest.raises(_Died):
        convert.hf_to_hf_dir(src, out, dtype=torch.bfloat16, overwrite=True, progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert_same_tensors(load_hf_state_dict(aside), old)

    monkeypatch.setattr(atomic, "_alive", lambda pid: False)  # as if that writer had died
    with pytest.raises(FileExistsError, match="already exists"):
        convert.hf_to_hf_dir(src, out, progress=False)  # no --overwrite: the old version is back
    assert_same_tensors(load_hf_state_dict(out), old)
    assert hidden_entries(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 5. Bad input: each refused with exit 2 and an error naming the file or key


def assert_refused(capsys, hf_dir: Path, tmp_path: Path, *patterns: str) -> str:
    """hf-to-hf of `hf_dir` exits 2, prints one `error:` line matching every pattern, writes nothing."""
    out = tmp_path / "refused_out"
    rc, stdout, err = run_main(capsys, "hf-to-hf", hf_dir, out, "--no-progress")
    assert rc == 2, (rc, stdout, err)
    assert err.startswith("error: ") and stdout == ""
    for pattern in patterns:
        assert re.search(pattern, err), (pattern, err)
    assert not out.exists() and not [n for n in hidden_entries(tmp_path) if n.startswith(".refused_out")]
    return err


def test_missing_shard(damaged, tmp_path, capsys):
    (damaged / SHARD2).unlink()
    assert_refused(capsys, damaged, tmp_path, re.escape(str(damaged / SHARD2)), "missing", re.escape(INDEX))
    with pytest.raises(CheckpointError, match=rf"{re.escape(SHARD2)}: listed in {re.escape(INDEX)} but missing"):
        convert.hf_to_tune_file(damaged, tmp_path / "x.pt")


def test_index_lists_a_key_in_a_file_that_does_not_hold_it(damaged, tmp_path, capsys):
    edit_json(damaged / INDEX, lambda d: d["weight_map"].update({"lm_head.weight": SHARD1}))
    assert_refused(capsys, damaged, tmp_path, "'lm_head.weight'", "disagree", SHARD1)


def test_file_holds_a_key_the_index_does_not_list(damaged, tmp_path, capsys):
    key = "model.layers.1.mlp.up_proj.weight"
    edit_json(damaged / INDEX, lambda d: d["weight_map"].pop(key))
    assert_refused(capsys, damaged, tmp_path, f"'{re.escape(key)}'", "disagree", SHARD1)


def test_missing_parameter(damaged, tmp_path, capsys):
    key = "model.layers.1.mlp.up_proj.weight"
    rewrite_shard(damaged, SHARD1, lambda sd: sd.pop(key))
    edit_json(damaged / INDEX, lambda d: d["weight_map"].pop(key))
    assert_refused(capsys, damaged, tmp_path, "missing", f"'{re.escape(key)}'")


def test_unexpected_parameter(damaged, tmp_path, capsys):
    key = "model.layers.0.mlp.extra_proj.weight"
    rewrite_shard(damaged, SHARD2, lambda sd: sd.update({key: torch.zeros(4, 4)}))
    edit_json(damaged / INDEX, lambda d: d["weight_map"].update({key: SHARD2}))
    assert_refused(capsys, damaged, tmp_path, "unexpected", f"'{re.escape(key)}'")


def test_shape_that_contradicts_config(damaged, tmp_path, capsys):
    edit_json(damaged / "config.json", lambda c: c.update(intermediate_size=320))
    assert_refused(
        capsys,
        damaged,
        tmp_path,
        re.escape("'model.layers.0.mlp.down_proj.weight' has shape (128, 352) but config.json implies (128, 320)"),
    )


def test_heads_that_do_not_divide_hidden_size(damaged, tmp_path, capsys):
    edit_json(damaged / "config.json", lambda c: c.update(num_attention_heads=3, num_key_value_heads=3))
    assert_refused(
        capsys,
        damaged,
        tmp_path,
        re.escape(str(damaged / "config.json")),
        "num_attention_heads=3 does not divide hidden_size=128",
    )


def _central_directory(data: bytes) -> Dict[str, int]:
    """Record name (after the archive folder) -> offset of its central-directory entry."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        pos = zf.start_dir
    entries = {}
    while data[pos : pos + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        entries[data[pos + 46 : pos + 46 + name_len].decode().split("/", 1)[1]] = pos
        pos += 46 + name_len + extra_len + comment_len
    assert "data.pkl" in entries and "data/1" in entries
    return entries


def _corrupt(kind: str, data: bytes) -> bytes:
    b = bytearray(data)
    entries = _central_directory(data)
    middle = sorted(entries.values())[len(entries) // 2]
    if kind == "truncated":
        return bytes(b[: len(b) // 2])
    if kind == "random_bytes":
        return random.Random(0).randbytes(len(b))
    if kind == "data_pkl":  # bytes in the middle of the pickle
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            info = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        b[start + info.file_size // 2 : start + info.file_size // 2 + 16] = b"\xaa" * 16
    elif kind == "central_directory":  # the middle entry of the central directory loses its signature
        b[middle : middle + 8] = b"\xde\xad\xbe\xef\x00\x11\x22\x33"
    elif kind == "central_directory_name":  # bytes inside the middle entry's file name
        b[middle + 46 + 5 : middle + 46 + 9] = b"\xff\xfe\xfd\xfc"
    elif kind == "local_header_offset_past_end":  # data/1's entry points past the end of the file
        b[entries["data/1"] + 42 : entries["data/1"] + 46] = struct.pack("<I", len(b) - 10)
    else:
        raise AssertionError(kind)
    return bytes(b)


# Damage torch.load does not detect, so neither do we: it checks no CRC-32 (a flipped bit in tensor
# data loads as it is), and a record whose zip entry points at another record's data reads that data.
@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "random_bytes",
        "data_pkl",
        "central_directory",
        "central_directory_name",
        "local_header_offset_past_end",
    ],
)
def test_corrupt_bin_is_named(damaged, tmp_path, capsys, kind):
    path = damaged / SHARD1
    rewrite_shard(damaged, SHARD1, lambda sd: None)  # as torch.save writes it, like the hub's shards
    path.write_bytes(_corrupt(kind, path.read_bytes()))
    assert_refused(capsys, damaged, tmp_path, re.escape(str(path)), "truncated or corrupt")


def test_corrupt_safetensors_is_named(src, tmp_path, capsys):
    st = tmp_path / "st"
    assert run_main(capsys, "hf-to-hf", src, st, "--safetensors", "--max-shard-size", "1MB", "--no-progress")[0] == 0
    shard = sorted(st.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    (st / SUMS_FILE).unlink()  # what safetensors' reader says
    assert_refused(capsys, st, tmp_path, re.escape(str(shard)), "truncated or corrupt")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_every_weight_file_we_write_has_its_sha256_recorded_in_sha256sum_format(src, tmp_path, capsys, fmt):
    out = tmp_path / "out"
    flags = ["--safetensors"] * (fmt == "safetensors")
    assert run_main(capsys, "hf-to-hf", src, out, "--max-shard-size", "1MB", *flags, "--no-progress")[0] == 0
    lines = (out / SUMS_FILE).read_text().splitlines()
    shards = sorted(p.name for p in out.glob(f"*.{fmt}"))
    assert len(shards) > 1 and lines == [f"{file_sha256(out / name)}  {name}" for name in shards]
    if shutil.which("sha256sum"):  # the coreutils tool reads it as its own
        subprocess.run(["sha256sum", "--check", "--quiet", SUMS_FILE], cwd=out, check=True)


@pytest.mark.parametrize("command", ["hf-to-hf", "hf-to-tune", "verify"])
def test_a_damaged_shard_of_a_directory_we_wrote_is_named(src, tmp_path, capsys, command):
    """A flipped byte inside a tensor's data: torch.load reads it as another weight (0.0096 -> -157.6)."""
    ours = Path(shutil.copytree(src, tmp_path / "ours"))
    data = bytearray((ours / SHARD1).read_bytes())
    data[len(data) // 2] ^= 0x80
    (ours / SHARD1).write_bytes(data)
    assert torch.load(ours / SHARD1, weights_only=True)  # torch reads it without a word
    out = tmp_path / ("out.pt" if command == "hf-to-tune" else "out")
    rc, stdout, err = run_main(capsys, command, ours, *([out, "--no-progress"] if command != "verify" else []))
    assert rc == 2 and err.count("error:") == 1 and not out.exists(), (rc, stdout, err)
    assert f"{ours / SHARD1}: damaged: its sha256 is not the one recorded in {ours / SUMS_FILE}" in err
    (ours / SHARD1).unlink()
    assert (
        damaged_files(ours)
        == f"{ours / SHARD1}: listed in {ours / SUMS_FILE} but missing; copy the directory again from its source"
    )


def test_a_bin_of_something_else_than_named_tensors_is_refused(damaged, tmp_path, capsys):
    torch.save([torch.zeros(3)], damaged / SHARD1)
    assert_refused(capsys, damaged, tmp_path, re.escape(str(damaged / SHARD1)), "expected a dict of parameter name")


class _RunsCode:
    """Pickled as a call of os.system: unpickling it runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pickle_that_would_run_code_is_refused(damaged, tmp_path, capsys):
    marker = tmp_path / "pwned_marker"
    payload = _RunsCode(f"touch {shlex.quote(str(marker))}")
    rewrite_shard(damaged, SHARD1, lambda sd: sd.update({"model.norm.weight": payload}))
    err = assert_refused(capsys, damaged, tmp_path, "refused", re.escape(str(damaged / SHARD1)))
    assert "system" in err
    for command in (["hf-to-tune", damaged, tmp_path / "x.pt"], ["verify", damaged]):
        rc, _, err = run_main(capsys, *command)
        assert rc == 2 and "refused" in err and SHARD1 in err
    assert not marker.exists(), "the pickle's code ran"
    # The control: the payload is real, an unrestricted unpickler does run it.
    torch.load(damaged / SHARD1, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["hf-to-hf", "hf-to-tune", "hf-to-hf --safetensors"])
def test_a_failed_write_is_an_error_naming_the_file_and_leaves_nothing(src, tmp_path, command):
    """A write that fails part way (here at a file-size limit, as at a full disk) ends in one error
    line naming the file, and leaves no output and no temporary files."""
    out = tmp_path / ("out.pt" if command == "hf-to-tune" else "out")
    limit = 500_000  # bytes per file: less than the weights of `src`
    log = tmp_path.parent / f"{tmp_path.name}.log"  # outside tmp_path, which must stay empty
    proc = _convert_in_fork([*command.split(), str(src), str(out), "--no-progress"], log, file_size_limit=limit)
    proc.join(timeout=120)
    stderr = log.read_text()
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert proc.exitcode == 2 and len(errors) == 1, stderr
    assert re.fullmatch(
        r"error: \S*/\.out(\.pt)?\.tmp-\S+-\d+-[0-9a-f]+\S*: writing failed \(.+\); [\d.]+ GB free on its "
        r"file system",
        errors[0],
    ), errors[0]
    assert not out.exists() and hidden_entries(tmp_path) == []


def test_tune_to_hf_with_an_unknown_parameter(src, tmp_path, capsys):
    pt = convert.hf_to_tune_file(src, tmp_path / "model.pt")
    sd = torch.load(pt, weights_only=True)
    sd["layers.0.attn.bogus_proj.weight"] = torch.zeros(8, 8)
    torch.save(sd, pt)
    out = tmp_path / "out"
    rc, stdout, err = run_main(capsys, "tune-to-hf", pt, out, "--config", src, "--no-progress")
    assert rc == 2 and stdout == ""
    assert err.startswith("error: ") and "'layers.0.attn.bogus_proj.weight'" in err
    assert not out.exists()
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.bogus_proj\.weight' cannot be converted"):
        convert.tune_to_hf_dir(pt, out, src)


@pytest.mark.parametrize("where", ["the source itself", "a folder that contains it", "a folder inside it"])
def test_an_output_that_is_contains_or_lies_inside_the_source_is_refused(src, tmp_path, capsys, where):
    source = Path(shutil.copytree(src, tmp_path / "models" / "src"))
    before = dir_digest(source)
    out = {
        "the source itself": source,
        "a folder that contains it": tmp_path / "models",
        "a folder inside it": source / "bf16",
    }[where]
    for command in (["hf-to-hf", source, out, "--dtype", "bf16"], ["hf-to-tune", source, out]):
        rc, _, err = run_main(capsys, *command, "--overwrite", "--no-progress")
        assert rc == 2 and "writing it would destroy the input" in err, err
    assert dir_digest(source) == before and sorted(p.name for p in (tmp_path / "models").iterdir()) == ["src"]


def test_a_config_of_another_architecture_is_refused(src, tmp_path, capsys):
    source = Path(shutil.copytree(src, tmp_path / "src"))
    edit_json(source / "config.json", lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    rc, _, err = run_main(capsys, "hf-to-hf", source, tmp_path / "out", "--no-progress")
    assert rc == 2 and "describes a gpt2 model (GPT2LMHeadModel), not a LLaMA-family one" in err, err
    assert not (tmp_path / "out").exists()


def test_tune_to_hf_names_a_directory_source_and_a_config_of_another_shape(src, tmp_path, capsys):
    rc, _, err = run_main(capsys, "tune-to-hf", src, tmp_path / "a", "--config", src, "--no-progress")
    assert rc == 2 and "a directory; tune-to-hf reads one torchtune state-dict file (.pt)" in err, err
    pt = tmp_path / "model.pt"
    assert run_main(capsys, "hf-to-tune", src, pt, "--no-progress")[0] == 0
    other = Path(shutil.copytree(src, tmp_path / "other"))
    edit_json(other / "config.json", lambda c: c.update(hidden_size=c["hidden_size"] * 2))
    rc, _, err = run_main(capsys, "tune-to-hf", pt, tmp_path / "b", "--config", other, "--no-progress")
    assert rc == 2 and "its weights are not of the shape" in err and "give --config the HF directory" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
