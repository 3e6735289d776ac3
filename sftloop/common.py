"""Small facts and helpers every part uses, each declared once: the repository root, the cache
root, reading a YAML/JSON file, and the first line of an error for a one-line message."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    """Where tokenized data, built tokenizers and models are cached: $SFT_CACHE or ~/.cache/sft-loop."""
    return Path(os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft-loop"))


def read_config(path: Path):
    """The content of a .yaml/.yml or .json file (UTF-8); ValueError saying why it cannot be read."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({first_line(e)})") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    raise ValueError(f"{path}: expected a .yaml, .yml or .json file")


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line (libraries append pages of context)."""
    text = str(error)
    return text.splitlines()[0][:limit] if text else type(error).__name__
