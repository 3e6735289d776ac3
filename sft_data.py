"""Data: local files -> validated conversations -> token ids and labels, cached on disk
(which samples form each step is batches.py's job)."""

from __future__ import annotations

import codecs
import hashlib
import inspect
import json
import logging
import os
from functools import partial
from pathlib import Path

import datasets
import numpy as np

import templates
from templates import IGNORE_INDEX, DataError

log = logging.getLogger("sft")
EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
MAX_REPORTED = 20


class DataProblems(Exception):
    """Problems found in the user's data files; the message lists where and what."""


# ---------------------------------------------------------------------------------------------
# Reading and checking files
# ---------------------------------------------------------------------------------------------

def check_files(files: list[str]) -> list[Path]:
    paths = []
    for f in files:
        p = Path(f)
        if not p.exists():
            raise DataProblems(f"{f}: no such file")
        if not p.is_file():
            raise DataProblems(f"{f}: not a file")
        if p.suffix.lower() not in EXTENSIONS:
            raise DataProblems(f"{f}: unsupported extension {p.suffix!r}; use .json, .jsonl or .parquet")
        if p.stat().st_size == 0:
            raise DataProblems(f"{f}: empty file")
        paths.append(p)
    return paths


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


def _row_locations(path: Path) -> list[str]:
    """Row index -> 'file:line' for JSONL (blank lines are not rows), 'file: record i' otherwise."""
    if path.suffix.lower() != ".jsonl":
        return []
    lines = path.read_bytes().split(b"\n")
    return [f"{path}:{n}" for n, line in enumerate(lines, 1) if line.strip()]


def locate(paths: list[Path], file_idx: int, row: int, cache: dict | None = None) -> str:
    cache = {} if cache is None else cache
    if file_idx not in cache:
        cache[file_idx] = _row_locations(paths[file_idx])
    rows = cache[file_idx]
    return rows[row] if row < len(rows) else f"{paths[file_idx]}: record {row}"


def load_file(path: Path, file_idx: int, cache_dir: Path) -> datasets.Dataset:
    """One file as a datasets.Dataset, each row tagged with its file and row index.

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
    return ds.add_column("_file", [file_idx] * len(ds)).add_column("_row", list(range(len(ds))))


def _report(problems: list[str]) -> str:
    shown = "\n  ".join(problems[:MAX_REPORTED])
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    return f"{len(problems)} problem(s) in the data:\n  {shown}{more}"


# ---------------------------------------------------------------------------------------------
# Tokenizing, once, cached on disk
# ---------------------------------------------------------------------------------------------

def _encode_batch(batch, tokenizer, template, max_len, system_prompt):
    n = len(batch["_row"])
    fields = [k for k in batch if k not in ("_raw", "_read_error", "_file", "_row")]
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
    enc = templates.encode_many(ok, tokenizer, template, max_len, system_prompt) if ok else {"input_ids": [], "labels": []}
    it = iter(zip(enc["input_ids"], enc["labels"]))
    out = {"input_ids": [], "labels": [], "length": [], "num_targets": [], "error": errors}
    for c in convs:
        ids, labels = next(it) if c is not None else ([], [])
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        # position 0 is never predicted (nothing precedes it), so it is not a target
        out["num_targets"].append(int(np.count_nonzero(np.asarray(labels[1:]) != IGNORE_INDEX)) if labels else 0)
    return out


def _settings_hash(tokenizer, template, max_len, system_prompt) -> str:
    """Everything but the file that decides the tokenized result (the tokenizer is serialised
    once per call: Qwen's is 11 MB)."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([template, max_len, system_prompt, templates.chat_template_for(template, tokenizer, system_prompt)]).encode())
    # A change to the labelling code invalidates the cache; other edits (reading, reporting, the
    # batch order in batches.py) do not re-tokenize.
    h.update(Path(templates.__file__).read_bytes())
    h.update(inspect.getsource(_encode_batch).encode())
    return h.hexdigest()


def _fingerprint(path: Path, settings: str) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{settings}".encode()).hexdigest()[:16]


def prepare_dataset(files: list[str], tokenizer, *, template: str, max_len: int, system_prompt: str | None,
                    cache_dir: Path, num_proc: int | None = None, skip_invalid: bool = False,
                    what: str = "train") -> datasets.Dataset:
    """Validated, tokenized, cached dataset with columns input_ids, labels, length, num_targets, sample_id,
    and _file/_row (which file and row each sample came from, for messages)."""
    paths = check_files(files)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings_hash(tokenizer, template, max_len, system_prompt)
    parts = []
    for i, p in enumerate(paths):
        # Each file is tokenized (and cached) on its own: files of different record shapes have
        # different columns, and only the tokenized columns are common to all.
        raw = load_file(p, i, cache_dir)
        key = _fingerprint(p, settings)
        parts.append(raw.map(
            _encode_batch, batched=True, batch_size=1000, num_proc=num_proc if num_proc and num_proc > 1 else None,
            remove_columns=[c for c in raw.column_names if c not in ("_file", "_row")],
            fn_kwargs=dict(tokenizer=tokenizer, template=template, max_len=max_len, system_prompt=system_prompt),
            cache_file_name=str(cache_dir / f"tokenized-{key}.arrow"), load_from_cache_file=True,
            desc=f"Tokenizing {p.name}",
        ))
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    n_total = len(ds)
    bad = [i for i, e in enumerate(ds["error"]) if e]
    if bad:
        locations = {}
        rows = ds.select(bad)  # three columns read once, not every bad row's whole record three times
        problems = [f"{locate(paths, f, r, locations)}: {e}" for f, r, e in zip(rows["_file"], rows["_row"], rows["error"])]
        if not skip_invalid:
            raise DataProblems(_report(problems) + "\n(pass --skip_invalid_samples to skip such records)")
        log.warning("Skipped %d invalid %s record(s) of %d (--skip_invalid_samples); the first: %s",
                    len(bad), what, n_total, problems[0])
    ds = ds.add_column("sample_id", list(range(n_total)))
    ds = ds.filter(lambda e, t: not e and t > 0, input_columns=["error", "num_targets"])
    dropped = n_total - len(bad) - len(ds)
    if dropped:
        log.warning("Dropped %d of %d %s sample(s) with no trainable token left after truncation to max_len=%d",
                    dropped, n_total, what, max_len)
    if len(ds) == 0:
        raise DataProblems(f"no usable {what} samples in {', '.join(files)}")
    return ds.remove_columns(["error"])


def load_splits(model_args, data_args, seed: int, tokenizer, accelerator):
    """(training set, validation set or None), tokenized once: the first process tokenizes and
    caches, the others then read the cache."""
    cache_dir = Path(data_args.preprocessing_cache_dir or os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft-loop"))
    prep = partial(prepare_dataset, tokenizer=tokenizer, template=model_args.template, max_len=data_args.max_len,
                   system_prompt=model_args.system_prompt, cache_dir=cache_dir,
                   num_proc=data_args.preprocessing_num_workers, skip_invalid=data_args.skip_invalid_samples)
    with accelerator.main_process_first():
        try:
            train_set = prep(data_args.train_files, what="train")
            eval_set = prep(data_args.validation_files, what="validation") if data_args.validation_files else None
        except DataProblems as e:
            raise SystemExit(f"error: {e}") from None
    if data_args.validation_split_percentage and eval_set is None:
        split = train_set.train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        train_set, eval_set = split["train"], split["test"]
    return train_set, eval_set


def describe(dataset, sample_ids: list[int], files: list[str]) -> str:
    """Where these samples come from (file:line), for error messages."""
    ids = set(sample_ids)
    rows = dataset.filter(lambda sid: sid in ids, input_columns=["sample_id"])
    paths, locations = [Path(f) for f in files], {}
    return ", ".join(locate(paths, f, r, locations) for f, r in zip(rows["_file"], rows["_row"]))
