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
