"""Sources: what the user named (files, directories, saved or hub datasets, mixture files), read
into records with an address for every error (file:line, or record index), and the problems found
reported together. No tokenizer here: sft_data.py turns these records into tokens.

A source is written `PATH[:WEIGHT]`. A weight with a decimal point is a share of the source per
epoch (0.5: half of it, drawn anew each epoch; 2.0: all of it twice); an integer is a count of
samples per epoch (repeating the source if it holds fewer). No weight: each sample once."""

from __future__ import annotations

import codecs
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from sftloop.common import first_line, read_config

EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


MAX_REPORTED = 20


class DataProblems(Exception):
    """Problems found in the user's data; the message lists where and what."""


@dataclass
class Source:
    """One entry of --train_files / --validation_files / --dataset_mixture."""
    spec: str                     # as the user wrote it
    name: str                     # in metric names: train/<name>/loss, eval/<name>/loss
    weight: str | None = None     # as written: "0.5", "2.0", "1000"; None: each sample once
    origins: list = field(default_factory=list)  # files (Path) or dataset (str), in row order


# ---------------------------------------------------------------------------------------------
# What the user named, and where its records are
# ---------------------------------------------------------------------------------------------

def parse_source(spec: str, what: str = "--train_files") -> tuple[str, str | None]:
    """'path:weight' -> (path, weight as written); a path that exists as written keeps its colons."""
    if ":" not in spec or Path(spec).exists():
        return spec, None
    path, weight = spec.rsplit(":", 1)
    try:
        value = float(weight)
    except ValueError:
        raise DataProblems(f"{what} {spec}: weight {weight!r} is not a number (write PATH:0.5 for half of it, "
                           "PATH:2.0 for twice, PATH:1000 for 1000 samples)") from None
    if not math.isfinite(value) or value <= 0:
        raise DataProblems(f"{what} {spec}: weight {weight!r} must be a positive number")
    if re.fullmatch(r"\d+", weight.strip()) is None and "." not in weight:
        raise DataProblems(f"{what} {spec}: weight {weight!r}: write a share with a decimal point (1e3 -> 1000.0) "
                           "or a count as an integer")
    return path, weight.strip()


def read_mixture_file(path: str) -> tuple[list[dict], list[dict]]:
    """A YAML/JSON mixture file: {train_files: [...], validation_files: [...]} or a list (training
    sources only). Entries are 'path[:weight]' strings or {path, weight, name} mappings; relative
    paths are taken from the mixture file's directory."""
    p = Path(path)
    if not p.is_file():
        raise DataProblems(f"--dataset_mixture {path}: no such file")
    if p.suffix not in (".yaml", ".yml", ".json"):
        raise DataProblems(f"--dataset_mixture {path}: expected a .yaml, .yml or .json file")
    try:
        cfg = read_config(p)
    except (ValueError, ImportError) as e:
        raise DataProblems(f"--dataset_mixture {path}: could not be read: {e}") from None
    if isinstance(cfg, list):
        cfg = {"train_files": cfg}
    if not isinstance(cfg, dict) or not cfg.get("train_files") or set(cfg) - {"train_files", "validation_files"}:
        raise DataProblems(f"--dataset_mixture {path}: expected a list of sources, or a mapping with train_files "
                           "(and optionally validation_files)")

    def entries(key: str) -> list[dict]:
        out = []
        for i, e in enumerate(cfg.get(key) or []):
            if isinstance(e, str):
                e = {"spec": e}
            elif isinstance(e, dict) and "path" in e and set(e) <= {"path", "weight", "name"}:
                spec = str(e["path"]) + (f":{e['weight']}" if e.get("weight") is not None else "")
                e = {"spec": spec, "name": e.get("name")}
            else:
                raise DataProblems(f"--dataset_mixture {path}: {key}[{i}]: expected 'path[:weight]' or a mapping with "
                                   f"path and optionally weight and name, got {e!r}")
            local = Path(parse_source(e["spec"])[0]).expanduser()
            if not local.is_absolute() and (p.parent / local).exists():
                e["spec"] = str(p.parent / e["spec"])
            out.append(e)
        return out

    return entries("train_files"), entries("validation_files")


def _data_files(directory: Path) -> list[Path]:
    return sorted(f for f in directory.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS
                  and not any(part.startswith(".") for part in f.relative_to(directory).parts))


def _is_saved_dataset(directory: Path) -> bool:
    return (directory / "dataset_info.json").is_file() or (directory / "dataset_dict.json").is_file()


def resolve(entry: dict, what: str) -> Source:
    """A source from the user's words: a file, a directory (save_to_disk's, or one of data files),
    or a dataset id for datasets.load_dataset."""
    spec = entry["spec"]
    path, weight = parse_source(spec, what)
    if weight is not None and what != "--train_files":
        raise DataProblems(f"{what} {spec}: weights apply to training sources only")
    p = Path(path).expanduser()
    looks_local = p.suffix.lower() in EXTENSIONS or path.startswith(("/", ".", "~")) or p.exists()
    name = entry.get("name") or (p.stem if p.is_file() else p.name if looks_local else path.replace("/", "_"))
    source = Source(spec=spec, name=str(name), weight=weight)
    if p.is_dir():
        if _is_saved_dataset(p):
            source.origins = [str(p)]
        else:
            source.origins = _data_files(p)
            if not source.origins:
                found = sorted(f.name for f in p.iterdir())[:8]
                raise DataProblems(f"{path}: a directory with no .json/.jsonl/.parquet files, and not one written by "
                                   f"datasets' save_to_disk (no dataset_info.json or dataset_dict.json); it holds: "
                                   f"{', '.join(found) or 'nothing'}")
            for f in source.origins:
                if f.stat().st_size == 0:
                    raise DataProblems(f"{f}: empty file")
    elif looks_local:
        check_files([path])
        source.origins = [p]
    else:
        source.origins = [path]  # a dataset id: read with datasets.load_dataset
    return source


def resolve_all(entries: list[dict], what: str) -> list[Source]:
    sources = [resolve(e, what) for e in entries]
    seen: dict[str, str] = {}
    for s in sources:
        for o in s.origins:
            key = str(Path(o).resolve()) if isinstance(o, Path) or Path(o).exists() else o
            if key in seen:
                raise DataProblems(f"{what}: {o} is named twice ({seen[key]} and {s.spec}); give it once, with a "
                                   "weight (PATH:2.0 repeats it)")
            seen[key] = s.spec
    names: dict[str, int] = {}
    for s in sources:  # names must differ: they key the metrics
        names[s.name] = names.get(s.name, 0) + 1
        if names[s.name] > 1:
            s.name = f"{s.name}_{names[s.name]}"
    return sources


def check_files(files: list[str]) -> list[Path]:
    paths = []
    for f in files:
        p = Path(f).expanduser()
        if not p.exists():
            raise DataProblems(f"{f}: no such file")
        if not p.is_file():
            raise DataProblems(f"{f}: not a file")
        if p.suffix.lower() not in EXTENSIONS:
            raise DataProblems(f"{f}: unsupported extension {p.suffix!r}; use .json, .jsonl or .parquet, a directory "
                               "of such files, or one written by datasets' save_to_disk")
        if p.stat().st_size == 0:
            raise DataProblems(f"{f}: empty file")
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------
# Reading one origin (a file or a dataset), with an address for every error
# ---------------------------------------------------------------------------------------------

def _json_records(path: Path) -> tuple[list[str], list[str]]:
    """Plain-Python reading of a JSON/JSONL file, for when the fast reader fails: each record as
    JSON text ("" if it could not be read) and the reason it could not be read ("" if fine). Rows
    are the file's non-blank lines (JSONL) or the array's records (JSON), as in the fast reader,
    so row numbers (and _row_locations) mean the same in both."""
    raw = path.read_bytes()
    if path.suffix.lower() == ".json" and raw.lstrip()[:1] == b"[":
        try:
            records = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataProblems(f"{path}:{line}: bytes that are not UTF-8 (byte offset {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataProblems(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        return [json.dumps(r) for r in records], [""] * len(records)
    lines = raw.split(b"\n")
    texts, errors = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
            json.loads(text)
        except UnicodeDecodeError as e:
            texts.append("")
            errors.append(f"bytes that are not UTF-8 (column {e.start + 1})")
            continue
        except json.JSONDecodeError as e:
            truncated = n == len(lines) and not raw.endswith(b"\n")
            texts.append("")
            errors.append(f"invalid JSON{' (truncated last line?)' if truncated else ''}: {e.msg} (column {e.colno})")
            continue
        texts.append(text)
        errors.append("")
    return texts, errors


def _is_utf8(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def load_file(path: Path, cache_dir: Path) -> datasets.Dataset:
    """One file's records as a datasets.Dataset.

    The fast (Arrow) reader is tried first. A file it cannot read (a bad line, a value whose type
    differs between records, bytes that are not UTF-8, ...) is read again in plain Python, keeping
    each record as JSON text, so the bad records can be named by line, and skipped if asked."""
    kind = EXTENSIONS[path.suffix.lower()]
    try:
        if kind == "json" and not _is_utf8(path):
            raise UnicodeError  # Arrow reads such bytes and fails later, when the text is used
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache_dir / "hf-datasets"))
        if kind == "json" and _holds_free_form_objects(ds.features):
            raise TypeError  # read each record as written instead
    except Exception as e:
        if kind != "json":
            first = first_line(e, 1000) if str(e) else ""
            raise DataProblems(f"{path}: could not be read: {type(e).__name__}: {first}") from None
        texts, errors = _json_records(path)
        ds = datasets.Dataset.from_dict({"_raw": texts, "_read_error": errors})
    if len(ds) == 0:
        raise DataProblems(f"{path}: no records")
    return ds


FREE_FORM = ("tools", "tool_calls", "arguments", "parameters")


def _holds_free_form_objects(features) -> bool:
    """Whether records hold free-form objects (tool schemas, call arguments) that Arrow stores as
    columns: it gives objects of the same keys one key order, so a schema written with "name" after
    "parameters" would come back reordered, and the template, which writes the object as JSON,
    would render another text than the one the model sees at inference."""
    def walk(f, name=""):
        if isinstance(f, dict):
            return any(k in FREE_FORM and not isinstance(v, datasets.Value) or walk(v, k) for k, v in f.items())
        if isinstance(f, (list, tuple)):
            return any(walk(v, name) for v in f)
        if isinstance(f, (datasets.Sequence, datasets.LargeList)):  # datasets.List is a Sequence
            return walk(f.feature, name)
        return False
    return walk(dict(features))


def load_records(origin, cache_dir: Path) -> datasets.Dataset:
    """The records of a file, of a directory written by save_to_disk, or of a dataset id."""
    if isinstance(origin, Path):
        return load_file(origin, cache_dir)
    if Path(origin).is_dir():
        try:
            ds = datasets.load_from_disk(origin)
        except Exception as e:
            raise DataProblems(f"{origin}: not a dataset datasets can load from disk: {type(e).__name__}: "
                               f"{first_line(e, 1000) if str(e) else ''}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataProblems(f"{origin}: a saved DatasetDict without a 'train' split (it has: {', '.join(ds)}); "
                                   f"name the split's directory, e.g. {Path(origin) / next(iter(ds))}")
            ds = ds["train"]
    else:
        try:
            ds = datasets.load_dataset(origin, split="train", cache_dir=str(cache_dir / "hf-datasets"))
        except Exception as e:
            reason = (str(e).splitlines() or [""])[0][:300]
            raise DataProblems(
                f"{origin}: not a local file or directory, and the dataset id could not be loaded ({type(e).__name__}: "
                f"{reason}). Offline? Pass a local copy instead: a file, a directory of .json/.jsonl/.parquet files, "
                f"or a directory written by save_to_disk (e.g. `huggingface-cli download --repo-type dataset {origin} "
                f"--local-dir DIR` on a machine online, then --train_files DIR)") from None
    if len(ds) == 0:
        raise DataProblems(f"{origin}: no records")
    return ds


def _row_locations(path: Path) -> list[str]:
    """Row index -> 'file:line' for JSONL (blank lines are not rows)."""
    lines = path.read_bytes().split(b"\n")
    return [f"{path}:{n}" for n, line in enumerate(lines, 1) if line.strip()]


def locate(origins: list, origin_starts: np.ndarray, rows, records, cache: dict | None = None) -> list[str]:
    """Global rows, with the index of each one's record in its origin, -> 'file:line' (JSONL),
    'file: record i' (JSON, Parquet) or 'dataset: row i'. (A record may make several rows.)"""
    cache = {} if cache is None else cache
    out = []
    for row, i in zip(rows, records):
        k = int(np.searchsorted(origin_starts, row, side="right")) - 1
        origin, i = origins[k], int(i)
        if isinstance(origin, Path) and origin.suffix.lower() == ".jsonl":
            if k not in cache:
                cache[k] = _row_locations(origin)
            out.append(cache[k][i] if i < len(cache[k]) else f"{origin}: record {i}")
        else:
            out.append(f"{origin}: {'record' if isinstance(origin, Path) else 'row'} {i}")
    return out


def report_problems(problems: list[str], total: int) -> str:
    shown = "\n  ".join(problems)
    more = f"\n  ... and {total - len(problems)} more" if total > len(problems) else ""
    return f"{total} problem(s) in the data:\n  {shown}{more}"
