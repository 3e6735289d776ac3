"""Data: local files -> validated conversations -> cached token ids and labels -> global batches."""

from __future__ import annotations

import hashlib
import json
import logging
import os
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


def _scan_json(path: Path) -> list[str]:
    """Find the bad records of a JSON/JSONL file in plain Python, to say which line is wrong."""
    raw = path.read_bytes()
    problems = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return [f"{path}:{line}: bytes that are not UTF-8 (byte offset {e.start})"]
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            return [f"{path}:{e.lineno}: invalid JSON: {e.msg}"]
        where = [f"{path}: record {i}" for i in range(len(records))]
    else:
        lines = text.splitlines()
        records, where = [], []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                last = n == len(lines) and not text.endswith("\n")
                problems.append(f"{path}:{n}: invalid JSON{' (truncated last line?)' if last else ''}: {e.msg}")
                continue
            where.append(f"{path}:{n}")
    for w, r in zip(where, records):
        try:
            templates.to_messages(r)
        except DataError as e:
            problems.append(f"{w}: {e}")
    return problems


def _row_locations(path: Path) -> list[str]:
    """Row index -> 'file:line' (JSONL: blank lines are not rows) or 'file: record i'."""
    if path.suffix.lower() == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [f"{path}:{n}" for n, line in enumerate(lines, 1) if line.strip()]
    return []


def load_records(paths: list[Path], cache_dir: Path) -> datasets.Dataset:
    """All files as one datasets.Dataset, each row tagged with its file and row index."""
    parts = []
    for i, p in enumerate(paths):
        try:
            ds = datasets.load_dataset(EXTENSIONS[p.suffix.lower()], data_files=str(p), split="train",
                                       cache_dir=str(cache_dir / "hf-datasets"))
        except Exception as e:  # the library's message names no line: find the bad one ourselves
            problems = _scan_json(p) if EXTENSIONS[p.suffix.lower()] == "json" else []
            if not problems:
                problems = [f"{p}: could not be read: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
            raise DataProblems(_report(problems)) from None
        if len(ds) == 0:
            raise DataProblems(f"{p}: no records")
        ds = ds.add_column("_file", [i] * len(ds)).add_column("_row", list(range(len(ds))))
        parts.append(ds)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _report(problems: list[str]) -> str:
    shown = "\n  ".join(problems[:MAX_REPORTED])
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    return f"{len(problems)} problem(s) in the data:\n  {shown}{more}"


# ---------------------------------------------------------------------------------------------
# Tokenizing, once, cached on disk
# ---------------------------------------------------------------------------------------------

def _encode_batch(batch, tokenizer, template, max_len, system_prompt):
    n = len(batch["_row"])
    rows = [{k: batch[k][i] for k in batch} for i in range(n)]
    convs, errors = [], []
    for r in rows:
        try:
            convs.append(templates.to_messages(r))
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


def _fingerprint(paths, tokenizer, template, max_len, system_prompt) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([template, max_len, system_prompt, templates.chat_template_for(template, tokenizer, system_prompt)]).encode())
    for src in (templates.__file__, __file__):  # a change to the labelling code invalidates the cache
        h.update(Path(src).read_bytes())
    return h.hexdigest()[:16]


def prepare_dataset(files: list[str], tokenizer, *, template: str, max_len: int, system_prompt: str | None,
                    cache_dir: Path, num_proc: int | None = None, skip_invalid: bool = False,
                    what: str = "train") -> datasets.Dataset:
    """Validated, tokenized, cached dataset with columns input_ids, labels, length, num_targets, sample_id."""
    paths = check_files(files)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    raw = load_records(paths, cache_dir)
    key = _fingerprint(paths, tokenizer, template, max_len, system_prompt)
    cache_file = cache_dir / f"tokenized-{what}-{key}.arrow"
    ds = raw.map(
        _encode_batch, batched=True, batch_size=1000, num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=[c for c in raw.column_names if c not in ("_file", "_row")],
        fn_kwargs=dict(tokenizer=tokenizer, template=template, max_len=max_len, system_prompt=system_prompt),
        cache_file_name=str(cache_file), load_from_cache_file=True, desc=f"Tokenizing {what} data",
    )
    bad = [i for i, e in enumerate(ds["error"]) if e]
    if bad:
        locations = {}
        problems = []
        for i in bad:
            f, r = ds[i]["_file"], ds[i]["_row"]
            if f not in locations:
                locations[f] = _row_locations(paths[f])
            where = locations[f][r] if r < len(locations[f]) else f"{paths[f]}: record {r}"
            problems.append(f"{where}: {ds[i]['error']}")
        if not skip_invalid:
            raise DataProblems(_report(problems) + "\n(pass --skip_invalid_samples to skip such records)")
        log.warning("Skipping %d invalid %s record(s) (--skip_invalid_samples); first: %s", len(bad), what, problems[0])
    ds = ds.add_column("sample_id", list(range(len(ds))))
    n_invalid = len(bad)
    ds = ds.filter(lambda e, t: not e and t > 0, input_columns=["error", "num_targets"])
    dropped = len(raw) - n_invalid - len(ds)
    if dropped:
        log.warning("Dropped %d of %d %s sample(s) with no trainable token left after truncation to max_len=%d",
                    dropped, len(raw), what, max_len)
    if len(ds) == 0:
        raise DataProblems(f"no usable {what} samples in {', '.join(files)}")
    return ds.remove_columns(["error", "_file", "_row"])


# ---------------------------------------------------------------------------------------------
# Which samples go into which optimizer step
# ---------------------------------------------------------------------------------------------

def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """A global shuffle that depends on the seed and the epoch only."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    return -(-num_samples // global_batch_size)


def step_micro_batches(order: np.ndarray, step_in_epoch: int, global_batch_size: int, rank: int,
                       world_size: int, accum_steps: int) -> list[list[int]]:
    """This process's micro-batches (sample indices) for one optimizer step.

    The global batch is fixed first (a slice of the epoch's order) and only then dealt out, so the
    samples in step k never depend on how the global batch is split across processes and
    accumulation steps. The last global batch of an epoch may be short; it is dealt round-robin and
    a micro-batch can be empty (the collator then gives a dummy row with no targets).
    """
    batch = order[step_in_epoch * global_batch_size:(step_in_epoch + 1) * global_batch_size]
    slots = world_size * accum_steps
    # slot s = (micro-batch m, rank r) with s = m * world_size + r; sample j goes to slot j % slots
    mine = [[] for _ in range(accum_steps)]
    for j, idx in enumerate(batch.tolist()):
        s = j % slots
        if s % world_size == rank:
            mine[s // world_size].append(idx)
    return mine
