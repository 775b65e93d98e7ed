import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The real LLaMA-2 tokenizer lies beside the checkout, never inside it.
LLAMA_TOKENIZER = Path(
    os.environ.get("REF_TUNING_LLAMA_TOKENIZER", PROJECT_ROOT.parent / "shared" / "assets" / "llama2-tokenizer.model")
)


@pytest.fixture(scope="session")
def llama_tokenizer_path() -> Path:
    if not LLAMA_TOKENIZER.is_file():
        pytest.skip(f"the real LLaMA-2 tokenizer is not at {LLAMA_TOKENIZER} (set REF_TUNING_LLAMA_TOKENIZER)")
    return LLAMA_TOKENIZER


@pytest.fixture(scope="session")
def demo_tokenizer_path(tmp_path_factory) -> Path:
    """A small SentencePiece model with LLaMA-2's settings, trained on the shipped demo problems
    (always available, unlike the real tokenizer)."""
    from ref_tuning.demo import read_problems, train_tokenizer

    return train_tokenizer(read_problems("train"), tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")
