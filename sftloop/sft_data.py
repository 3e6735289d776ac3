"""Records to tokens, cached, and the corpus they form: sources (sftloop/sources.py reads and checks
them) -> token ids and labels (templates.py), cached on disk once per file -> a Corpus: the
tokenized rows and, for each source, the rows it may draw and how many it draws per epoch, from its
weight (sources.py's docstring). Which samples form each step is batches.py's job."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

import templates
from sftloop import loading, logs, runtime
from sftloop.common import cache_root
from sftloop.sources import MAX_REPORTED, DataProblems, Source, report_problems, load_records, locate, read_mixture_file, resolve_all
from templates import IGNORE_INDEX, DataError

log = logging.getLogger("sft")


@dataclass(frozen=True)
class Corpus:
    """The tokenized rows of every source, one after the other, and the plan drawn from them.
    Made whole by load_corpus (hold_out makes a new one), never changed afterwards."""
    dataset: datasets.Dataset     # columns input_ids, labels, length, num_targets, truncated, error, record, part
    sources: list[Source]
    rows: list[np.ndarray]        # per source: the usable rows (indices into dataset)
    counts: list[int]             # per source: samples drawn each epoch (plan_counts)
    origin_starts: np.ndarray     # first row of each origin (file or dataset), in row order
    source_starts: np.ndarray     # first row of each source, and the number of rows last
    lengths: np.ndarray           # tokens of every row (for --group_by_length)
    settings: str = ""            # the hash of what decided the tokens but the data (the cache key's part)
    tokenized_now: tuple = ()     # (origin, records, seconds) of each origin tokenized by this load (not cached)
    cut: dict = dataclasses.field(default_factory=dict)  # what --max_len cut (max_len_cuts), for the log and --check

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def origins(self) -> list:
        return [o for s in self.sources for o in s.origins]

    def samples_per_epoch(self) -> int:
        return sum(self.counts)


def samples_for(weight: str | None, available: int) -> int:
    """How many samples a source gives each epoch (see the module docstring)."""
    if weight is None:
        return available
    if "." in weight:
        return int(round(float(weight) * available))
    return int(weight)


# ---------------------------------------------------------------------------------------------
# Tokenizing, once per origin, cached on disk
# ---------------------------------------------------------------------------------------------

def _encode_batch(batch, indices, tokenizer, template, max_len, system_prompt, reasoning, turns):
    """Records to samples: each record gives one or more rows (templates.samples), or one row with
    its error; "record" is the record's index in its origin (for file:line), "part" the sample's
    index among its record's."""
    n = len(next(iter(batch.values())))
    fields = [k for k in batch if k not in ("_raw", "_read_error")]
    raws, read_errors = batch.get("_raw", [None] * n), batch.get("_read_error", [None] * n)
    rendered, rows = [], []  # rows: (record, part, error) of each output row
    for i, (raw, read_error) in enumerate(zip(raws, read_errors)):
        try:
            if read_error:
                raise DataError(read_error)
            record = json.loads(raw) if raw else {k: batch[k][i] for k in fields}
            made = templates.samples(templates.to_conversation(record), template, tokenizer, system_prompt,
                                     reasoning, turns)
        except DataError as e:
            rows.append((indices[i], 0, str(e)))
            continue
        rendered += made
        rows += [(indices[i], part, "") for part in range(len(made))]
    enc = templates.encode_rendered(rendered, tokenizer, max_len) if rendered else {}
    it = iter(zip(enc.get("input_ids", []), enc.get("labels", []), enc.get("truncated", [])))
    out = {"input_ids": [], "labels": [], "length": [], "num_targets": [], "truncated": [], "error": [],
           "record": [], "part": []}
    for record, part, error in rows:
        ids, labels, cut = next(it) if not error else ([], [], False)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        # position 0 is never predicted (nothing precedes it), so it is not a target
        out["num_targets"].append(int(np.count_nonzero(np.asarray(labels[1:]) != IGNORE_INDEX)) if labels else 0)
        out["truncated"].append(cut)
        out["error"].append(error)
        out["record"].append(record)
        out["part"].append(part)
    return out


def _settings_hash(tokenizer, template, max_len, system_prompt, reasoning, turns) -> str:
    """Everything but the data that decides the tokenized result (the tokenizer is serialised
    once per call: Qwen's is 11 MB)."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([template, max_len, system_prompt, reasoning, turns,
                         templates.chat_template_for(template, tokenizer, system_prompt)]).encode())
    # A change to the labelling code invalidates the cache; other edits (reading, reporting, the
    # batch order in batches.py) do not re-tokenize.
    h.update(Path(templates.__file__).read_bytes())
    h.update(inspect.getsource(_encode_batch).encode())
    return h.hexdigest()


def _file_key(path: Path, settings: str) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{settings}".encode()).hexdigest()[:16]


def tokenized(origin, settings: str, cache_dir: Path, num_proc: int | None, encode) -> tuple[datasets.Dataset, float | None]:
    """The tokenized rows of one origin, from the cache when there, and the seconds tokenizing took
    (None: read from the cache).

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
            return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), None
    if records is None:
        records = load_records(origin, cache_dir)
    label = origin.name if isinstance(origin, Path) else origin
    workers = num_proc if num_proc and num_proc > 1 and len(records) >= 2 * num_proc else None
    began = time.perf_counter()
    out = records.map(encode, batched=True, with_indices=True, batch_size=1000, num_proc=workers,
                      remove_columns=records.column_names,
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
    return out, seconds


def column(dataset: datasets.Dataset, name: str, dtype=None) -> np.ndarray:
    """One column as numpy, from Arrow in one go (no Python object per row)."""
    col = dataset.data.column(name)
    arr = col.to_numpy() if col.num_chunks != 1 else col.chunk(0).to_numpy(zero_copy_only=False)
    return arr.astype(dtype) if dtype is not None else arr


# ---------------------------------------------------------------------------------------------
# A corpus: sources tokenized, checked, and planned
# ---------------------------------------------------------------------------------------------

def load_corpus(entries: list[dict], tokenizer, *, template: str, max_len: int, system_prompt: str | None,
                cache_dir: Path, num_proc: int | None = None, skip_invalid: bool = False, truncation: str = "keep_start",
                max_cut_share: float = 0.05, reasoning: str = "keep", turns: str = "all", what: str = "train",
                flag: str = "--train_files") -> Corpus:
    """Every source tokenized (or read from the cache), bad records reported (or skipped), and for
    each source the rows that may be drawn and how many are drawn per epoch."""
    sources = resolve_all(entries, flag)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings_hash(tokenizer, template, max_len, system_prompt, reasoning, turns)
    encode = partial(_encode_batch, tokenizer=tokenizer, template=template, max_len=max_len, system_prompt=system_prompt,
                     reasoning=reasoning, turns=turns)
    parts, origins, origin_starts, source_starts, start, fresh = [], [], [], [], 0, []
    for s in sources:
        source_starts.append(start)
        for o in s.origins:
            part, seconds = tokenized(o, settings, cache_dir, num_proc, encode)
            parts.append(part)
            if seconds is not None:
                fresh.append((str(o), len(part), seconds))
            origins.append(o)
            origin_starts.append(start)
            start += len(parts[-1])
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    origin_starts, source_starts = np.asarray(origin_starts), np.asarray(source_starts + [start])

    bad = np.flatnonzero(pc.not_equal(dataset.data.column("error"), "").to_numpy(zero_copy_only=False))
    if len(bad):
        errors = dataset.data.column("error").take(bad[:MAX_REPORTED]).to_pylist()
        places = _places(dataset, origins, origin_starts, bad[:MAX_REPORTED])
        problems = [f"{where}: {e}" for where, e in zip(places, errors)]
        if not skip_invalid:
            raise DataProblems(report_problems(problems, len(bad)) + "\n(pass --skip_invalid_samples to skip such records)")
        log.warning("Skipped %d invalid %s record(s) of %d (--skip_invalid_samples); the first: %s",
                    len(bad), what, len(dataset), problems[0])
    truncated = column(dataset, "truncated", bool)
    usable = column(dataset, "num_targets") > 0
    usable[bad] = False
    conversations = int(np.count_nonzero((column(dataset, "part") == 0) & usable))
    if int(usable.sum()) != conversations:
        log.info("%d %s conversations became %d samples (--template %s renders earlier turns differently as a "
                 "conversation grows, so each user query's turns are a sample of their own: every turn trained once, "
                 "as generated)", conversations, what, int(usable.sum()), template)
    cut = max_len_cuts(dataset, usable, truncated, max_len, truncation, max_cut_share, what,
                       partial(_places, dataset, origins, origin_starts))
    long = truncated if truncation == "drop" else truncated & usable
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
    return Corpus(dataset=dataset, sources=sources, rows=rows, counts=plan_counts(sources, rows, flag),
                  origin_starts=origin_starts, source_starts=source_starts, lengths=column(dataset, "length", np.int32),
                  settings=settings, tokenized_now=tuple(fresh), cut=cut)


def max_len_cuts(dataset: datasets.Dataset, usable: np.ndarray, truncated: np.ndarray, max_len: int, truncation: str,
                 max_cut_share: float, what: str, places) -> dict:
    """The one rule for samples --max_len cuts (docs/data.md#truncation). Under
    --truncation keep_start a sample longer than max_len keeps its first max_len tokens, which can
    cost it every trained token (it would train nothing: left out here, from `usable`) or the end of
    a trained reply (its end-of-turn token: kept, trained up to the cut). Both are counted, with the
    first places, in the log and for --check; when they are more than max_cut_share of the samples
    the run stops. (--truncation drop leaves out every longer sample, counted by the caller.)"""
    none = np.zeros(0, dtype=np.int64)
    if truncation == "drop":  # every longer sample is left out whole (the caller counts them): none is cut
        left_out = lost_end = none
    else:
        left_out = np.flatnonzero(~usable & truncated)  # num_targets 0 within max_len (errors are never truncated)
        kept = np.flatnonzero(usable & truncated)
        # a truncated sample is max_len tokens long: its last label says whether the cut fell inside a reply
        last = pc.list_element(dataset.data.column("labels").take(kept), max_len - 1).to_numpy(zero_copy_only=False) \
            if len(kept) else none
        lost_end = kept[last != IGNORE_INDEX]
    samples = int(usable.sum()) + len(left_out)
    share = (len(left_out) + len(lost_end)) / max(1, samples)
    first = list(places(np.concatenate([left_out, lost_end])[:MAX_REPORTED])) if share else []
    said = (f"--max_len {max_len} cuts {len(left_out) + len(lost_end)} of {samples} {what} samples ({share:.2%}): "
            f"{len(left_out)} lose every trained token (left out), {len(lost_end)} the end of a trained reply (trained "
            f"up to the cut); the first: {', '.join(first[:3])}")
    cut = {"samples": samples, "left_out": len(left_out), "lost_end_of_reply": len(lost_end), "share": round(share, 6),
           "max_cut_share": max_cut_share, "first": first, "said": said if share else ""}
    if share > max_cut_share:
        raise DataProblems(f"{said}. That is more than --max_cut_share {max_cut_share}: raise --max_len, pass "
                           "--truncation drop to leave out every sample longer than it (no reply cut), or raise "
                           "--max_cut_share to train on the rest")
    if share:
        log.warning("%s (up to --max_cut_share %s goes on)", said, max_cut_share)
    return cut


def plan_counts(sources: list[Source], rows: list[np.ndarray], flag: str = "--train_files") -> list[int]:
    """How many samples each source gives per epoch, from its weight and usable rows (said in the log)."""
    counts = [samples_for(s.weight, len(r)) for s, r in zip(sources, rows)]
    for s, r, n in zip(sources, rows, counts):
        if n == 0:
            raise DataProblems(f"{flag} {s.spec}: weight {s.weight} of {len(r)} usable sample(s) gives 0 samples")
        if s.weight is not None and "." not in s.weight and n > len(r):
            log.warning("%s: %d samples asked for but it holds %d usable: it repeats (%.2f passes per epoch)",
                        s.spec, n, len(r), n / len(r))
    if len(sources) > 1 or sources[0].weight is not None:
        total = sum(counts)
        log.info("mixture, per epoch: %s", "; ".join(
            f"{s.name} {n} of {len(r)} ({n / total:.1%})" for s, r, n in zip(sources, rows, counts)))
    return counts


def hold_out(corpus: Corpus, percentage: float, seed: int) -> tuple[Corpus, datasets.Dataset]:
    """--validation_split_percentage: a seeded share of every source's usable rows leaves training
    and becomes the validation set. Returns (the training corpus, re-planned on what is left, and
    the validation set)."""
    rng = np.random.default_rng([seed, 7])
    held, kept = [], []
    for k, r in enumerate(corpus.rows):
        n = int(round(len(r) * percentage / 100))
        if n >= len(r):
            raise DataProblems(f"--validation_split_percentage {percentage} leaves no training sample of "
                               f"{corpus.sources[k].spec}")
        pick = np.zeros(len(r), dtype=bool)
        pick[rng.permutation(len(r))[:n]] = True
        held.append(r[pick])
        kept.append(r[~pick])
    training = dataclasses.replace(corpus, rows=kept, counts=plan_counts(corpus.sources, kept))
    return training, corpus.dataset.select(np.sort(np.concatenate(held)))


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


def _places(dataset: datasets.Dataset, origins: list, origin_starts: np.ndarray, rows) -> list[str]:
    records = dataset.data.column("record").take(np.asarray(rows, dtype=np.int64)).to_pylist()
    return locate(origins, origin_starts, rows, records)


def describe(corpus: Corpus, sample_ids: list[int]) -> str:
    """Where these samples come from (file:line), for error messages."""
    return ", ".join(_places(corpus.dataset, corpus.origins, corpus.origin_starts, sample_ids))


def records_at(corpus: Corpus, rows: list[int], cache_dir: Path) -> list[dict]:
    """The records (as read from their files) the samples at these rows were made from."""
    origins, out = corpus.origins, []
    numbers = corpus.dataset.data.column("record").take(np.asarray(rows, dtype=np.int64)).to_pylist()
    for row, number in zip(rows, numbers):
        records = load_records(origins[int(np.searchsorted(corpus.origin_starts, row, side="right")) - 1], cache_dir)
        record = records[int(number)]
        out.append(json.loads(record["_raw"]) if record.get("_raw") else
                   {k: v for k, v in record.items() if k not in ("_raw", "_read_error")})
    return out


def dump(corpus: Corpus, path: str) -> int:
    """--dump_samples: every usable training sample (each once, in source order) as a JSON line
    {"source": where its record is, "input_ids", "labels"}. Returns how many."""
    rows = np.concatenate(corpus.rows)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, len(rows), 1000):
            chunk = rows[start:start + 1000].tolist()
            cols = corpus.dataset[chunk]
            for where, ids, labels in zip(_places(corpus.dataset, corpus.origins, corpus.origin_starts, chunk),
                                          cols["input_ids"], cols["labels"]):
                f.write(json.dumps({"source": str(where), "input_ids": ids, "labels": labels}) + "\n")
    os.replace(tmp, p)
    return len(rows)


def cache_dir_of(data_args) -> Path:
    return Path(data_args.preprocessing_cache_dir) if data_args.preprocessing_cache_dir else cache_root()


def load_splits(model_args, data_args, seed: int, tokenizer, accelerator, cache_shared: bool = True) -> tuple[Corpus, dict]:
    """(the training corpus, {name: validation dataset}), tokenized once: the first process
    tokenizes and caches, the others then read (memory-map) the same cache. With a cache on each
    node's own disk (cache_shared False) the first process of each node does so for its node."""
    load = partial(load_corpus, tokenizer=tokenizer, template=model_args.template, max_len=data_args.max_len,
                   system_prompt=model_args.system_prompt, cache_dir=cache_dir_of(data_args),
                   num_proc=data_args.preprocessing_num_workers, skip_invalid=data_args.skip_invalid_samples,
                   truncation=data_args.truncation, max_cut_share=data_args.max_cut_share, reasoning=data_args.reasoning,
                   turns=data_args.train_on_turns)
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
                train, evals["validation"] = hold_out(train, data_args.validation_split_percentage, seed)
        except DataProblems as e:
            raise SystemExit(f"error: {e}") from None
    return train, evals


def dump_samples(model_args, data_args, args) -> None:
    """--dump_samples: the training samples as the loop gets them (sources, mixture, cache,
    truncation, one sample per query), written out; nothing trained, no output_dir."""
    accelerator = runtime.make_accelerator(args)
    logs.setup(accelerator, args)
    tokenizer = loading.load_tokenizer(model_args)
    train_set, _ = load_splits(model_args, data_args, args.seed, tokenizer, accelerator)
    if accelerator.is_main_process:
        n = dump(train_set, data_args.dump_samples)
        log.info("%d training samples written to %s; nothing trained", n, data_args.dump_samples)
    accelerator.end_training()
