"""The whole pipeline on a tiny model, on CPU, with no downloads:

    python -m ref_tuning.demo [--tokenizer path/to/llama2/tokenizer.model]

Makes `storage/demo/` laid out like the real storage (a tiny Sheared-LLaMA-family HF checkpoint in two
`.bin` shards, a tokenizer, a processed CodeContests split from the problems shipped in
`ref_tuning/demo_data/`), runs the real recipe with `tune run --nproc_per_node 2`, full fine-tuning and then
LoRA, reloads each result with `transformers`, prints the validation loss before and after, and the report of
each against the base, memorization section included.
"""

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from tqdm import tqdm

from ref_tuning.hf_checkpoint import save_hf_checkpoint, tune_to_hf
from ref_tuning.data import codecontests_dataset
from ref_tuning.models import TINY_SHEARED_LLAMA, hf_llama_config, sheared_llama_tokenizer, tiny_sheared_llama
from ref_tuning.prepare import prepare_split
from ref_tuning.report import run_report

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
TINY_CONFIG = "configs/tiny_cpu.yaml"
MAX_SEQ_LEN = TINY_SHEARED_LLAMA["max_seq_len"]
DEMO_VOCAB_SIZE = 1024
# The LoRA run: adapters on q/k/v/o as in configs/ref_tuning_lora.yaml, at the tiny model's learning rate.
LORA_OVERRIDES = [
    "model._component_=ref_tuning.models.lora_tiny_sheared_llama",
    "model.lora_attn_modules=[q_proj,k_proj,v_proj,output_proj]",
    "model.apply_lora_to_mlp=false",
    "model.lora_rank=16",
    "model.lora_alpha=32",
]


def read_problems(split: str) -> List[Dict[str, Any]]:
    """The raw CodeContests rows shipped with the project."""
    with open(DEMO_DATA / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _training_text(problems: List[Dict[str, Any]]) -> Iterator[str]:
    # One sentence per line of text: newlines never enter the vocabulary and fall back to the
    # byte piece <0x0A>, as in LLaMA-2's tokenizer, so a prompt's tokens stay a prefix of the sample's.
    for p in problems:
        yield from p["description"].splitlines()
        for source in p["solutions"]["solution"] + p["incorrect_solutions"]["solution"]:
            yield from source.splitlines()


def train_tokenizer(problems: List[Dict[str, Any]], out_path: Path, vocab_size: int = DEMO_VOCAB_SIZE) -> Path:
    """A SentencePiece BPE model with LLaMA-2's settings (ids unk 0, bos 1, eos 2; byte fallback)."""
    import sentencepiece as spm

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as model_file:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_text(problems),
            model_writer=model_file,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=2,
            minloglevel=2,
        )
    return out_path


# The HF side files of a LLaMA-2 checkpoint, for the checkpoints the demo and the benchmarks write.
_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
HF_SIDE_FILES = {
    "tokenizer_config.json": dict(
        tokenizer_class="LlamaTokenizer", **_SPECIAL_TOKENS, add_bos_token=True, add_eos_token=False
    ),
    "special_tokens_map.json": _SPECIAL_TOKENS,
    "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
}


def write_tiny_checkpoint(
    out_dir: Path, vocab_size: int, tokenizer_path: Optional[Path] = None, seed: int = 0, **sizes: int
) -> Path:
    """A randomly initialized tiny model (`sizes` override `TINY_SHEARED_LLAMA`'s) as an HF directory in
    two `.bin` shards, like the real one."""
    torch.manual_seed(seed)
    args = dict(TINY_SHEARED_LLAMA, vocab_size=vocab_size, **sizes)
    config = hf_llama_config(**args)
    hf_sd = tune_to_hf(tiny_sheared_llama(**args).state_dict(), config)
    # lm_head (last) in the second shard, everything else in the first: the hub layout of the 2.7B.
    nbytes = {name: t.numel() * t.element_size() for name, t in hf_sd.items()}
    save_hf_checkpoint(hf_sd, out_dir, config, max_shard_size=sum(nbytes.values()) - nbytes["lm_head.weight"])
    if tokenizer_path is not None:
        shutil.copy2(tokenizer_path, out_dir / "tokenizer.model")
    for name, content in HF_SIDE_FILES.items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    return out_dir


def make_demo_assets(root: Path, tokenizer: Optional[Path] = None, seed: int = 0) -> Dict[str, Path]:
    """Tokenizer, tiny checkpoint and processed train/valid splits under `root`; returns their paths."""
    paths = {  # where the real storage keeps them (see configs/tiny_cpu.yaml)
        "model": root / "models" / "tiny-sheared-llama" / "raw",
        "data": root / "datasets" / "codecontests" / "processed",
        "output": root / "checkpoints" / "ref-tuning" / "tiny-demo",
    }
    root.mkdir(parents=True, exist_ok=True)
    staging = root / ".tokenizer.model"
    if tokenizer is None:
        train_tokenizer(read_problems("train"), staging)
        vocab_size = DEMO_VOCAB_SIZE
    else:
        shutil.copy2(tokenizer, staging)
        vocab_size = sheared_llama_tokenizer(str(staging)).vocab_size
    for split in ("train", "valid"):  # the shipped raw rows, prepared as real ones are
        raw = [DEMO_DATA / f"{split}.jsonl"]
        prepare_split(raw, paths["data"], split, staging, max_seq_len=MAX_SEQ_LEN, progress=False)
    write_tiny_checkpoint(paths["model"], vocab_size, staging, seed=seed)
    staging.unlink()
    paths["tokenizer"] = paths["model"] / "tokenizer.model"
    paths["vocab_size"] = vocab_size
    return paths


def validation_loss(model_dir: Path, data_dir: Path, tokenizer_path: Path, n_samples: int = 24) -> float:
    """Mean cross-entropy over the response tokens of `valid` samples, computed by `transformers`
    the way Rho-1 scores a reference: float32 logits, labels shifted by one, prompt masked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = sheared_llama_tokenizer(str(tokenizer_path))
    ds = codecontests_dataset(tokenizer, str(data_dir), "valid", n_samples, correct_ratio=1.0, max_seq_len=MAX_SEQ_LEN)
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in ds:
            tokens = torch.tensor([sample["tokens"]])
            labels = torch.tensor(sample["labels"][1:])
            logits = model(tokens).logits[0, :-1].float()
            keep = labels != CROSS_ENTROPY_IGNORE_IDX
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def tune_run_command(nproc: int, overrides: List[str]) -> List[str]:
    """The literal README command, run from the project root."""
    tune = shutil.which("tune") or str(Path(sys.executable).parent / "tune")
    return [tune, "run", "--nproc_per_node", str(nproc), "recipes/ref_finetune.py", "--config", TINY_CONFIG, *overrides]


def run_logged(command: List[str], log: Path, desc: str) -> None:
    """Run `command` with all its output in `log`, showing a progress bar of the training steps it reports."""
    log.write_text("$ " + " ".join(command) + "\n")
    with open(log, "a") as out, tqdm(desc=desc, unit="step", leave=False) as bar:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            time.sleep(0.5)
            with open(log, "rb") as f:  # the recipe's own bar, "training:  40%|...| 4/10 [...": its last state
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                steps = re.findall(rb"training:.*?(\d+)/(\d+) \[", f.read())
            if steps:
                bar.total, bar.n = int(steps[-1][1]), int(steps[-1][0])
                bar.refresh()
    if proc.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"{desc} failed (exit code {proc.returncode}); the last lines of {log}:\n{tail}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT / "storage" / "demo", help="where the assets go")
    parser.add_argument("--tokenizer", type=Path, help="a real LLaMA-2 tokenizer.model instead of a trained one")
    parser.add_argument("--nproc", type=int, default=2, help="processes for tune run")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. epochs=2")
    args = parser.parse_args(argv)
    if not (PROJECT_ROOT / "recipes" / "ref_finetune.py").is_file():
        sys.exit(
            f"{PROJECT_ROOT}/recipes/ref_finetune.py not found: run the demo from a source checkout "
            "installed with `pip install -e .`"
        )

    start = time.perf_counter()
    # The training logs hold the dataset's summaries; here they would repeat them.
    logging.getLogger("torchtune.utils._logging").setLevel(logging.WARNING)
    root = args.root.resolve()
    if root.exists():
        shutil.rmtree(root)
    paths = make_demo_assets(root, args.tokenizer)
    logs = root / "logs"
    logs.mkdir()
    print(f"demo assets in {root}: a tiny Sheared-LLaMA (vocabulary {paths['vocab_size']}) and CodeContests splits")
    before = validation_loss(paths["model"], paths["data"], paths["tokenizer"])

    overrides = [
        f"model.vocab_size={paths['vocab_size']}",
        f"tokenizer.path={paths['tokenizer']}",
        f"checkpointer.checkpoint_dir={paths['model']}",
        f"dataset.data_dir={paths['data']}",
        f"dataset_val.data_dir={paths['data']}",
        *args.overrides,
    ]
    lora_output = paths["output"].with_name(paths["output"].name + "-lora")
    for kind, output, extra in (("full", paths["output"], []), ("LoRA", lora_output, LORA_OVERRIDES)):
        command = tune_run_command(args.nproc, [*overrides, f"output_dir={output}", *extra])
        log = logs / f"train-{kind.lower()}.log"
        print(f"\n{kind} fine-tuning: tune {' '.join(command[1:7])} ... (the command and its output: {log})")
        run_logged(command, log, f"{kind} fine-tuning")
        final = output / "checkpoint_final"
        after = validation_loss(final, paths["data"], paths["tokenizer"])
        print(
            f"{kind}: validation loss (transformers, {final.relative_to(root)}): before {before:.4f}, after {after:.4f}"
        )
        # The Rho-1 view: held-out correct and incorrect solutions, and memorization, base against tuned.
        report_dir = output / "report-valid"
        options = dict(max_seq_len=MAX_SEQ_LEN, tokenizer=paths["tokenizer"], progress=False, n_samples=60)
        run_report(paths["model"], final, report_dir, paths["data"], "valid", correct_ratio=2 / 3, **options)
        report = (report_dir / "report.md").read_text()
        shown = [line for line in report.splitlines() if not line.startswith(("# ", "!["))]  # the file's title, figure
        print(re.sub(r"\n{3,}", "\n\n", "\n".join(shown)).strip())
        print(f"(report: {report_dir / 'report.md'})")
    print(f"\ndone in {time.perf_counter() - start:.0f} s; full logs in {logs}")


if __name__ == "__main__":
    main()
