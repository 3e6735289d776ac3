"""Data: sources (files, directories, saved or hub datasets) -> checked conversations -> token ids
and labels, cached on disk -> a Corpus: the tokenized rows and, for each source, the rows it may
draw and how many it draws per epoch (which samples form each step is batches.py's job).

A source is written `PATH[:WEIGHT]`. A weight with a decimal point is a share of the source per
epoch (0.5: half of it, drawn anew each epoch; 2.0: all of it twice); an integer is a count of
samples per epoch (repeating the source if it holds fewer). No weight: each sample once."""

from __future__ import annotations

import codecs
import hashlib
import inspect
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

import templates
from templates import IGNORE_INDEX, DataError

log = logging.getLogger("sft")
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


@dataclass
class Corpus:
    """The tokenized rows of every source, one after the other, and the plan drawn from them."""
    dataset: datasets.Dataset     # columns input_ids, labels, length, num_targets, truncated, error
    sources: list[Source]
    rows: list[np.ndarray]        # per source: the usable rows (indices into dataset)
    counts: list[int]             # per source: samples drawn each epoch
    origins: list                 # every file (Path) or dataset (str), in row order
    origin_starts: np.ndarray     # first row of each origin
    source_starts: np.ndarray     # first row of each source
    lengths: np.ndarray           # tokens of every row (for --group_by_length)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def samples_per_epoch(self) -> int:
        return sum(self.counts)


# ---------------------------------------------------------------------------------------------
# Sources: what the user named, and where its records are
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


def samples_for(weight: str | None, available: int) -> int:
    """How many samples a source gives each epoch (see the module docstring)."""
    if weight is None:
        return available
    if "." in weight:
        return int(round(float(weight) * available))
    return int(weight)


def read_mixture_file(path: str) -> tuple[list[dict], list[dict]]:
    """A YAML/JSON mixture file: {train_files: [...], validation_files: [...]} or a list (training
    sources only). Entries are 'path[:weight]' strings or {path, weight, name} mappings; relative
    paths are taken from the mixture file's directory."""
    p = Path(path)
    if not p.is_file():
        raise DataProblems(f"--dataset_mixture {path}: no such file")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
        elif p.suffix == ".json":
            cfg = json.loads(p.read_text(encoding="utf-8"))
        else:
            raise DataProblems(f"--dataset_mixture {path}: expected a .yaml, .yml or .json file")
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
# Reading one origin (a file or a dataset)
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
    except Exception as e:
        if kind != "json":
            first = str(e).splitlines()[0] if str(e) else ""
            raise DataProblems(f"{path}: could not be read: {type(e).__name__}: {first}") from None
        texts, errors = _json_records(path)
        ds = datasets.Dataset.from_dict({"_raw": texts, "_read_error": errors})
    if len(ds) == 0:
        raise DataProblems(f"{path}: no records")
    return ds


def load_records(origin, cache_dir: Path) -> datasets.Dataset:
    """The records of a file, of a directory written by save_to_disk, or of a dataset id."""
    if isinstance(origin, Path):
        return load_file(origin, cache_dir)
    if Path(origin).is_dir():
        try:
            ds = datasets.load_from_disk(origin)
        except Exception as e:
            raise DataProblems(f"{origin}: not a dataset datasets can load from disk: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
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


def locate(origins: list, origin_starts: np.ndarray, rows, cache: dict | None = None) -> list[str]:
    """Global rows -> 'file:line' (JSONL), 'file: record i' (JSON, Parquet) or 'dataset: row i'."""
    cache = {} if cache is None else cache
    out = []
    for row in rows:
        k = int(np.searchsorted(origin_starts, row, side="right")) - 1
        origin, i = origins[k], int(row - origin_starts[k])
        if isinstance(origin, Path) and origin.suffix.lower() == ".jsonl":
            if k not in cache:
                cache[k] = _row_locations(origin)
            out.append(cache[k][i] if i < len(cache[k]) else f"{origin}: record {i}")
        else:
            out.append(f"{origin}: {'record' if isinstance(origin, Path) else 'row'} {i}")
    return out


def _report(problems: list[str], total: int) -> str:
    shown = "\n  ".join(problems)
    more = f"\n  ... and {total - len(problems)} more" if total > len(problems) else ""
    return f"{total} problem(s) in the data:\n  {shown}{more}"


# ---------------------------------------------------------------------------------------------
# Tokenizing, once per origin, cached on disk
# ---------------------------------------------------------------------------------------------

def _encode_batch(batch, tokenizer, template, max_len, system_prompt):
    n = len(next(iter(batch.values())))
    fields = [k for k in batch if k not in ("_raw", "_read_error")]
    raws, read_errors = batch.get("_raw", [None] * n), batch.get("_read_error", [None] * n)
    convs, errors = [], []
    for i, (raw, read_error) in enumerate(zip(raws, read_errors)):
        try:
            if read_error:
                raise DataError(read_error)
            record = json.loads(raw) if raw else {k: batch[k][i] for k in fields}
            convs.append(templates.to_messages(record))
            errors.append("")
        except DataError as e:
            convs.append(None)
            errors.append(str(e))
    ok = [c for c in convs if c is not None]
    enc = templates.encode_many(ok, tokenizer, template, max_len, system_prompt) if ok else {}
    it = iter(zip(enc.get("input_ids", []), enc.get("labels", []), enc.get("truncated", [])))
    out = {"input_ids": [], "labels": [], "length": [], "num_targets": [], "truncated": [], "error": errors}
    for c in convs:
        ids, labels, cut = next(it) if c is not None else ([], [], False)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        # position 0 is never predicted (nothing precedes it), so it is not a target
        out["num_targets"].append(int(np.count_nonzero(np.asarray(labels[1:]) != IGNORE_INDEX)) if labels else 0)
        out["truncated"].append(cut)
    return out


def _settings_hash(tokenizer, template, max_len, system_prompt) -> str:
    """Everything but the data that decides the tokenized result (the tokenizer is serialised
    once per call: Qwen's is 11 MB)."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([template, max_len, system_prompt, templates.chat_template_for(template, tokenizer, system_prompt)]).encode())
    # A change to the labelling code invalidates the cache; other edits (reading, reporting, the
    # batch order in batches.py) do not re-tokenize.
    h.update(Path(templates.__file__).read_bytes())
    h.update(inspect.getsource(_encode_batch).encode())
    return h.hexdigest()


def _file_key(path: Path, settings: str) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{settings}".encode()).hexdigest()[:16]


def tokenized(origin, settings: str, cache_dir: Path, num_proc: int | None, encode) -> datasets.Dataset:
    """The tokenized rows of one origin, from the cache when there.

    An index file names the Arrow files of a finished tokenization (one per worker), so a warm start
    memory-maps them without reading the source, and a run with another worker count still finds them."""
    if isinstance(origin, Path):
        key = _file_key(origin, settings)
        records = None
    else:  # a dataset: datasets fingerprints it (from its files or the hub revision)
        records = load_records(origin, cache_dir)
        key = hashlib.sha256(f"{records._fingerprint}|{settings}".encode()).hexdigest()[:16]
    index = cache_dir / f"tokenized-{key}.json"
    if index.is_file():
        files = json.loads(index.read_text())["files"]
        if all((cache_dir / f).is_file() for f in files):
            parts = [datasets.Dataset.from_file(str(cache_dir / f)) for f in files]
            return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if records is None:
        records = load_records(origin, cache_dir)
    label = origin.name if isinstance(origin, Path) else origin
    workers = num_proc if num_proc and num_proc > 1 and len(records) >= 2 * num_proc else None
    began = time.perf_counter()
    out = records.map(encode, batched=True, batch_size=1000, num_proc=workers, remove_columns=records.column_names,
                      cache_file_name=str(cache_dir / f"tokenized-{key}.arrow"), load_from_cache_file=False,
                      desc=f"Tokenizing {label}")
    seconds = time.perf_counter() - began
    log.info("tokenized %s: %d records in %.1f s (%.0f/s, %d worker%s), cached in %s", label, len(out), seconds,
             len(out) / seconds, workers or 1, "s" if workers else "", cache_dir)
    files = [Path(f["filename"]).name for f in out.cache_files]
    tmp = index.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"files": files, "origin": str(origin), "rows": len(out), "seconds": round(seconds, 2),
                               "process": int(os.environ.get("RANK", "0"))}))
    os.replace(tmp, index)  # the index appears only once every Arrow file is complete
    return out


def _column(dataset: datasets.Dataset, name: str, dtype=None) -> np.ndarray:
    """One column as numpy, from Arrow in one go (no Python object per row)."""
    col = dataset.data.column(name)
    arr = col.to_numpy() if col.num_chunks != 1 else col.chunk(0).to_numpy(zero_copy_only=False)
    return arr.astype(dtype) if dtype is not None else arr


# ---------------------------------------------------------------------------------------------
# A corpus: sources tokenized, checked, and planned
# ---------------------------------------------------------------------------------------------

def load_corpus(entries: list[dict], tokenizer, *, template: str, max_len: int, system_prompt: str | None,
                cache_dir: Path, num_proc: int | None = None, skip_invalid: bool = False, truncation: str = "keep_start",
                what: str = "train", flag: str = "--train_files") -> Corpus:
    """Every source tokenized (or read from the cache), bad records reported (or skipped), and for
    each source the rows that may be drawn and how many are drawn per epoch."""
    sources = resolve_all(entries, flag)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings_hash(tokenizer, template, max_len, system_prompt)
    encode = partial(_encode_batch, tokenizer=tokenizer, template=template, max_len=max_len, system_prompt=system_prompt)
    parts, origins, origin_starts, source_starts, start = [], [], [], [], 0
    for s in sources:
        source_starts.append(start)
        for o in s.origins:
            parts.append(tokenized(o, settings, cache_dir, num_proc, encode))
            origins.append(o)
            origin_starts.append(start)
            start += len(parts[-1])
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    origin_starts, source_starts = np.asarray(origin_starts), np.asarray(source_starts + [start])

    bad = np.flatnonzero(pc.not_equal(dataset.data.column("error"), "").to_numpy(zero_copy_only=False))
    if len(bad):
        errors = dataset.data.column("error").take(bad[:MAX_REPORTED]).to_pylist()
        places = locate(origins, origin_starts, bad[:MAX_REPORTED])
        problems = [f"{where}: {e}" for where, e in zip(places, errors)]
        if not skip_invalid:
            raise DataProblems(_report(problems, len(bad)) + "\n(pass --skip_invalid_samples to skip such records)")
        log.warning("Skipped %d invalid %s record(s) of %d (--skip_invalid_samples); the first: %s",
                    len(bad), what, len(dataset), problems[0])
    usable = _column(dataset, "num_targets") > 0
    usable[bad] = False
    no_targets = int(np.count_nonzero(~usable)) - len(bad)
    if no_targets:
        log.warning("Dropped %d of %d %s sample(s) with no trainable token left after truncation to max_len=%d",
                    no_targets, len(dataset), what, max_len)
    truncated = _column(dataset, "truncated", bool)
    long = truncated & usable
    if long.any():
        counts = [int(np.count_nonzero(long[a:b])) for a, b in zip(source_starts[:-1], source_starts[1:])]
        detail = f" ({', '.join(f'{s.name}: {n}' for s, n in zip(sources, counts) if n)})" if len(sources) > 1 else ""
        if truncation == "drop":
            usable &= ~truncated
            log.warning("Dropped %d %s sample(s) longer than max_len=%d (--truncation drop)%s", int(long.sum()), what,
                        max_len, detail)
        else:
            log.info("%d %s sample(s) longer than max_len=%d keep their first %d tokens (--truncation keep_start; "
                     "--truncation drop leaves them out)%s", int(long.sum()), what, max_len, max_len, detail)
    rows = []
    for s, a, b in zip(sources, source_starts[:-1], source_starts[1:]):
        rows.append(a + np.flatnonzero(usable[a:b]))
        if len(rows[-1]) == 0:
            raise DataProblems(f"{flag} {s.spec}: no usable {what} sample in it (of {b - a} record(s): invalid, too "
                               f"long for --truncation drop, or no trainable token within max_len={max_len})")
    corpus = Corpus(dataset=dataset, sources=sources, rows=rows, counts=[], origins=origins,
                    origin_starts=origin_starts, source_starts=source_starts,
                    lengths=_column(dataset, "length", np.int32))
    plan(corpus, flag)
    return corpus


def plan(corpus: Corpus, flag: str = "--train_files") -> None:
    """Set how many samples each source gives per epoch from its weight and usable rows, and say it."""
    corpus.counts = [samples_for(s.weight, len(r)) for s, r in zip(corpus.sources, corpus.rows)]
    for s, r, n in zip(corpus.sources, corpus.rows, corpus.counts):
        if n == 0:
            raise DataProblems(f"{flag} {s.spec}: weight {s.weight} of {len(r)} usable sample(s) gives 0 samples")
        if s.weight is not None and "." not in s.weight and n > len(r):
            log.warning("%s: %d samples asked for but it holds %d usable: it repeats (%.2f passes per epoch)",
                        s.spec, n, len(r), n / len(r))
    if len(corpus.sources) > 1 or corpus.sources[0].weight is not None:
        total = corpus.samples_per_epoch()
        log.info("mixture, per epoch: %s", "; ".join(
            f"{s.name} {n} of {len(r)} ({n / total:.1%})" for s, r, n in zip(corpus.sources, corpus.rows, corpus.counts)))


def hold_out(corpus: Corpus, percentage: float, seed: int) -> datasets.Dataset:
    """--validation_split_percentage: a seeded share of every source's usable rows leaves training
    (the mixture is then re-planned on what is left) and becomes the validation set."""
    rng = np.random.default_rng([seed, 7])
    held = []
    for k, r in enumerate(corpus.rows):
        n = int(round(len(r) * percentage / 100))
        if n >= len(r):
            raise DataProblems(f"--validation_split_percentage {percentage} leaves no training sample of "
                               f"{corpus.sources[k].spec}")
        pick = np.zeros(len(r), dtype=bool)
        pick[rng.permutation(len(r))[:n]] = True
        held.append(r[pick])
        corpus.rows[k] = r[~pick]
    plan(corpus)
    return corpus.dataset.select(np.sort(np.concatenate(held)))


def eval_dataset(corpus: Corpus, k: int) -> datasets.Dataset:
    """Source k's usable rows as a dataset of their own (a validation set)."""
    return corpus.dataset.select(corpus.rows[k])


def samples_at(corpus: Corpus, rows: list[int]) -> list[dict]:
    """The samples at these rows, read in one go from the memory-mapped data, each with its id
    (the row) and the index of its source, for logs and per-source metrics."""
    if not rows:
        return []
    cols = corpus.dataset[rows]
    sources = np.searchsorted(corpus.source_starts, rows, side="right") - 1
    return [{"input_ids": i, "labels": lab, "sample_id": r, "source": int(s)}
            for i, lab, r, s in zip(cols["input_ids"], cols["labels"], rows, sources)]


def first_samples(corpus: Corpus, n: int | None = None) -> list[dict]:
    """The first n usable samples (all with n None), in source order."""
    return samples_at(corpus, np.concatenate(corpus.rows)[:n].tolist())


def summary(corpus: Corpus) -> str:
    plan_mb = (sum(r.nbytes for r in corpus.rows) + corpus.lengths.nbytes) / 2**20
    files = {Path(f["filename"]).parent for f in corpus.dataset.cache_files}
    return (f"{len(corpus.dataset)} rows from {len(corpus.sources)} source(s), memory-mapped from "
            f"{', '.join(map(str, sorted(files))) or 'memory'}; the plan holds {plan_mb:.1f} MB in this process")


def describe(corpus: Corpus, sample_ids: list[int]) -> str:
    """Where these samples come from (file:line), for error messages."""
    return ", ".join(locate(corpus.origins, corpus.origin_starts, sample_ids))


def cache_dir_of(data_args) -> Path:
    return Path(data_args.preprocessing_cache_dir or os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft-loop"))


def load_splits(model_args, data_args, seed: int, tokenizer, accelerator, cache_shared: bool = True) -> tuple[Corpus, dict]:
    """(the training corpus, {name: validation dataset}), tokenized once: the first process
    tokenizes and caches, the others then read (memory-map) the same cache. With a cache on each
    node's own disk (cache_shared False) the first process of each node does so for its node."""
    load = partial(load_corpus, tokenizer=tokenizer, template=model_args.template, max_len=data_args.max_len,
                   system_prompt=model_args.system_prompt, cache_dir=cache_dir_of(data_args),
                   num_proc=data_args.preprocessing_num_workers, skip_invalid=data_args.skip_invalid_samples,
                   truncation=data_args.truncation)
    with accelerator.main_process_first() if cache_shared else accelerator.local_main_process_first():
        try:
            train_entries, eval_entries = [{"spec": f} for f in data_args.train_files or []], []
            if data_args.dataset_mixture:
                train_entries, eval_entries = read_mixture_file(data_args.dataset_mixture)
            eval_entries += [{"spec": f} for f in data_args.validation_files or []]
            train = load(train_entries)
            evals = {}
            if eval_entries:
                held = load(eval_entries, what="validation", flag="--validation_files")
                evals = {name: eval_dataset(held, k) for k, name in enumerate(held.names)}
            elif data_args.validation_split_percentage:
                evals = {"validation": hold_out(train, data_args.validation_split_percentage, seed)}
        except DataProblems as e:
            raise SystemExit(f"error: {e}") from None
    return train, evals
