"""Which samples go into which optimizer step, and this process's micro-batches of it.

Where a step's samples are decided: `epoch_samples` draws each source's share of an epoch (the
counts come from the mixture weights, in sftloop/sft_data.py), `epoch_order` orders them,
`step_micro_batches` deals a step out (packing a micro-batch into rows is collate.py's). Edit them
to change how batches are formed (the tokenized data is cached apart from this file, so an edit
here never re-tokenizes)."""

from __future__ import annotations

import hashlib
from functools import partial

import numpy as np
import torch

from collate import collate, collate_packed, packs_into_one_row
from sftloop import runtime, sft_data


def epoch_samples(rows: list[np.ndarray], counts: list[int], seed: int, epoch: int) -> np.ndarray:
    """The rows one epoch trains on: from each source, counts[k] of its usable rows rows[k].

    A count below the source's size is a sample without replacement, drawn anew each epoch from the
    seed and the epoch; a count above it is whole passes over the source plus such a sample for the
    rest. The result is in source order; epoch_order shuffles it."""
    picked = []
    for k, (r, n) in enumerate(zip(rows, counts)):
        passes, rest = divmod(n, len(r))
        picked += [r] * passes
        if rest:
            rng = np.random.default_rng([seed, epoch, k, 1])
            picked.append(np.sort(r[rng.permutation(len(r))[:rest]]))
    return np.concatenate(picked)


def epoch_order(num_samples: int, seed: int, epoch: int, global_batch_size: int = 1,
                lengths: np.ndarray | None = None, window: int = 64) -> np.ndarray:
    """A global shuffle that depends on the seed and the epoch only.

    With lengths (--group_by_length): the shuffled order is cut into windows of `window` global
    batches, each window is sorted by length, cut into global batches, and the batches are shuffled,
    so the samples of a step have similar lengths (little padding) and the order still depends only
    on the seed, the epoch and the global batch size."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_samples)
    if lengths is None:
        return order
    lengths = np.asarray(lengths)
    span = window * global_batch_size
    for start in range(0, num_samples, span):
        part = order[start:start + span]
        order[start:start + span] = part[np.argsort(-lengths[part], kind="stable")]
    batches = [order[i:i + global_batch_size] for i in range(0, num_samples, global_batch_size)]
    # the short last batch stays last, so every other step keeps a full global batch
    full = batches[:-1] if len(batches[-1]) < global_batch_size else batches
    perm = rng.permutation(len(full))
    return np.concatenate([full[i] for i in perm] + batches[len(full):])


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    return -(-num_samples // global_batch_size)


def step_micro_batches(order: np.ndarray, step_in_epoch: int, global_batch_size: int, rank: int,
                       world_size: int, accum_steps: int) -> list[list[int]]:
    """This process's micro-batches (sample indices) for one optimizer step.

    The global batch is fixed first (a slice of the epoch's order) and only then dealt out, so the
    samples in step k never depend on how the global batch is split across processes and
    accumulation steps. It is cut into world_size x accum_steps contiguous, equal-as-possible
    slots (slot s = micro-batch s // world_size of rank s % world_size); the last global batch
    of an epoch may be short, so a slot can be empty (the collator then gives a dummy row).
    """
    batch = order[step_in_epoch * global_batch_size:(step_in_epoch + 1) * global_batch_size].tolist()
    slots = world_size * accum_steps
    n = len(batch)
    return [batch[s * n // slots:(s + 1) * n // slots] for s in range(rank, slots, world_size)]


def epoch_rows(corpus, seed: int, epoch: int, global_batch_size: int, group_by_length: bool) -> np.ndarray:
    """The epoch's rows, in the order the steps take them: a function of the data, the seed, the
    epoch and the global batch size only."""
    pool = epoch_samples(corpus.rows, corpus.counts, seed, epoch)
    lengths = corpus.lengths[pool] if group_by_length else None
    return pool[epoch_order(len(pool), seed, epoch, global_batch_size, lengths)]


def order_fingerprint(corpus, seed: int, epoch: int, global_batch_size: int, group_by_length: bool,
                      packing: bool) -> str:
    """A hash of an epoch's sample order, of how the samples were rendered (the template, the
    reasoning and turn flags, the labelling code) and of whether they are packed: recorded in each
    checkpoint, so that a resume whose batches would differ (an edited epoch_order, other data,
    weights or flags) is refused, not silently run."""
    order = epoch_rows(corpus, seed, epoch, global_batch_size, group_by_length)
    h = hashlib.sha256(np.asarray(order, dtype=np.int64).tobytes())
    h.update(corpus.settings.encode())
    if packing:  # (unpacked runs keep the fingerprints their checkpoints hold)
        h.update(b"packed")
    return h.hexdigest()[:16]


def collate_fn(data_args, pad_id: int, attn: str):
    if data_args.packing:
        return partial(collate_packed, pad_id=pad_id, one_row=packs_into_one_row(attn),
                       pad_to_multiple_of=data_args.pad_to_multiple_of)
    return partial(collate, pad_id=pad_id, pad_to_multiple_of=data_args.pad_to_multiple_of)


def _read_and_collate(rows: list[int], corpus, collate_rows):
    return collate_rows(sft_data.samples_at(corpus, rows))


def steps(corpus, args, data_args, rank: int, world: int, pad_id: int, start_step: int, end_step: int,
          attn: str = "sdpa"):
    """Yields (step, this process's micro-batches) for the optimizer steps start_step to end_step - 1
    of the run (0-based), across epoch boundaries."""
    per_epoch = steps_per_epoch(corpus.samples_per_epoch(), runtime.global_batch_size(args, world))
    step = start_step
    while step < end_step:
        epoch, in_epoch = divmod(step, per_epoch)
        for micro_batches in step_loader(corpus, args, data_args, rank, world, pad_id, epoch, in_epoch,
                                         min(per_epoch, in_epoch + end_step - step), attn):
            yield step, micro_batches
            step += 1


def step_loader(corpus, args, data_args, rank: int, world: int, pad_id: int, epoch: int, start_step: int,
                end_step: int, attn: str = "sdpa"):
    """Yields, for each optimizer step start_step to end_step - 1 of this epoch, this process's list
    of gradient_accumulation_steps collated micro-batches."""
    gas = args.gradient_accumulation_steps
    global_batch = runtime.global_batch_size(args, world)
    order = epoch_rows(corpus, args.seed, epoch, global_batch, data_args.group_by_length)
    # Dealt out step by step as the loader asks, not listed for the whole epoch up front.
    micro_batches = (mb for step in range(start_step, end_step)
                     for mb in step_micro_batches(order, step, global_batch, rank, world, gas))
    # The loader hands each micro-batch's row numbers to the collate function, which reads them in
    # one go. A generator of its own: a DataLoader draws its workers' seed from the global RNG
    # otherwise, so a resume (which makes a loader mid-epoch) would shift every later random draw,
    # such as dropout's.
    loader = torch.utils.data.DataLoader(range(len(corpus.dataset)), batch_sampler=micro_batches,
                                         num_workers=args.dataloader_num_workers,
                                         collate_fn=partial(_read_and_collate, corpus=corpus,
                                                            collate_rows=collate_fn(data_args, pad_id, attn)),
                                         generator=torch.Generator().manual_seed(args.seed))
    it = iter(loader)
    for _ in range(start_step, end_step):
        yield [next(it) for _ in range(gas)]
