"""How long --check takes, and what it says, for a Qwen2.5-0.5B-shaped model (the published config,
random weights, the real Qwen2.5 tokenizer built offline) on the default data, on this machine.

    python -m bench.check [--out DIR]     # the figure in docs/check.md

The model is built once into the cache ($SFT_CACHE or ~/.cache/sft-loop); the check runs as a user
runs it, a fresh `python train_loop.py ... --check`, timed from the outside."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sftloop.common import REPO, cache_root

# Qwen/Qwen2.5-0.5B's config.json
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
                  rope_theta=1000000.0, rms_norm_eps=1e-6)


def model_dir() -> Path:
    out = cache_root() / "qwen2.5-0.5b-shaped"
    if not (out / "model.safetensors").is_file():
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        from tools import build_tokenizers

        tok = AutoTokenizer.from_pretrained(build_tokenizers.qwen25_tokenizer_dir())
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B, eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id))
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output_dir of the checked run (default: a temporary one)")
    args = parser.parse_args()
    model = model_dir()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-check-")) / "run"
    cmd = [sys.executable, "train_loop.py", "--model_name_or_path", str(model), "--output_dir", str(out), "--check"]
    began = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - began
    print(p.stdout.split("\nsample ")[0])
    if p.returncode not in (0, 1):
        raise SystemExit(p.stderr[-4000:])
    numbers = json.loads((out / "check.json").read_text())["numbers"]
    print(f"\n{' '.join(cmd[1:])}\nwall time {took:.0f} s (the check itself {numbers['check_seconds']:.0f} s); "
          f"estimated run {numbers['eta_seconds'] / 3600:.1f} h")


if __name__ == "__main__":
    main()
