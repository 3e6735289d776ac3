"""Batches: each micro-batch padded to its own longest sample, or packed without padding between samples.

How wide a micro-batch becomes is decided here alone (`micro_batch_shape`); --check's memory and time
plan asks the same function."""

from __future__ import annotations

import torch

from templates import IGNORE_INDEX


def collate(samples: list[dict], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` with pad_id and `labels` with -100.

    The attention mask (and token_mask, a real sample's token, which every collator gives) comes from
    each sample's real length, never from `input_ids != pad_id`: the pad id is often a real token
    (Qwen pads with <|endoftext|>, or with eos when no pad exists).
    An empty list gives one masked-out dummy row, so a process whose share of a batch is empty
    still runs forward/backward and joins the gradient collectives with a zero contribution.
    """
    if not samples:
        return _dummy(pad_id)
    lengths = [len(s["input_ids"]) for s in samples]
    _, width = micro_batch_shape(lengths, False, False, pad_to_multiple_of)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    source = torch.full((len(samples), width), -1, dtype=torch.long)
    for row, (s, n) in enumerate(zip(samples, lengths)):
        input_ids[row, :n] = torch.as_tensor(s["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(s["labels"], dtype=torch.long)
        source[row, :n] = s.get("source", -1)
    attention_mask = (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).long()
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "token_mask": attention_mask.bool(), "real_tokens": torch.tensor(sum(lengths)), **_ids(samples, source)}


def collate_packed(samples: list[dict], pad_id: int, one_row: bool = False,
                   pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """The samples one after the other, without an attention mask (transformers' padding-free
    format): all in one row, or (one_row False) in as few rows as wide as the longest sample as
    `pack_rows` finds (see `packs_into_one_row` for which, when).

    position_ids restart at 0 with each sample. From them transformers builds every layer's own mask
    (causal, sliding window, chunked) within each sample (eager, sdpa and flex attention), and
    cu_seq_lens_q/k, the samples' boundaries over the flattened rows, send flash attention to its
    variable-length kernel. Each sample's first label is -100 (it would be predicted from the
    previous sample's last token). A row's padding is one more sample of its own, never trained and
    never attended to by a real one. Whether a model keeps packed samples apart this way is
    sftloop/packing.py's to decide, before the first step.
    """
    if not samples:
        return _dummy(pad_id)
    lengths = [len(s["input_ids"]) for s in samples]
    rows, width = _packed_layout(lengths, one_row, pad_to_multiple_of)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    source = torch.full((len(rows), width), -1, dtype=torch.long)
    token_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    starts = []  # where each sample (and each row's padding) begins in the flattened rows
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s, n = samples[i], lengths[i]
            starts.append(r * width + at)
            input_ids[r, at:at + n] = torch.as_tensor(s["input_ids"])
            labels[r, at:at + n] = torch.as_tensor(s["labels"])
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at:at + n] = torch.arange(n)
            source[r, at:at + n] = s.get("source", -1)
            at += n
        token_mask[r, :at] = True
        if at < width:
            starts.append(r * width + at)
            position_ids[r, at:] = torch.arange(width - at)
    cu_seq_lens = torch.tensor(starts + [len(rows) * width], dtype=torch.int32)
    longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())  # an int: the kernel wants it on the host
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest,
            "token_mask": token_mask, "real_tokens": torch.tensor(sum(lengths)), **_ids(samples, source)}


def pack_rows(lengths: list[int], row_tokens: int | None) -> list[list[int]]:
    """Which samples share a row (indices into lengths): first-fit decreasing into rows of at most
    row_tokens tokens (a longer sample gets a row of its own); None puts all in one row."""
    if row_tokens is None:
        return [sorted(range(len(lengths)), key=lambda i: -lengths[i])]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(row_tokens)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def packs_into_one_row(attn_implementation: str) -> bool:
    """Flash attention's variable-length kernel and flex attention's block-sparse mask cost what the
    samples cost, whatever the row holds: one row per micro-batch, no padding at all. For sdpa and
    eager transformers builds a dense [row x row] mask, which sdpa turns into a float copy kept for
    backward in every layer: rows as wide as the longest sample make the packed batch no wider than
    the padded one, with fewer rows (docs/training.md#packing)."""
    return "flash" in attn_implementation or attn_implementation == "flex_attention"


def micro_batch_shape(lengths: list[int], packing: bool, one_row: bool,
                      pad_to_multiple_of: int | None) -> tuple[int, int]:
    """(rows, width) of the micro-batch samples of these lengths make (one_row: see
    packs_into_one_row): the one rule for how wide a batch becomes, which the collators follow and
    --check's memory and time plan asks."""
    if not lengths:
        return 1, 1  # the dummy row
    if not packing:
        return len(lengths), _round_up(max(lengths), pad_to_multiple_of)
    rows, width = _packed_layout(lengths, one_row, pad_to_multiple_of)
    return len(rows), width


def _packed_layout(lengths: list[int], one_row: bool, pad_to_multiple_of: int | None):
    rows = pack_rows(lengths, None if one_row else max(lengths))
    return rows, _round_up(max(sum(lengths[i] for i in r) for r in rows), pad_to_multiple_of)


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on the device; plain numbers (the longest packed sample) stay on the host."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _dummy(pad_id: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.full((1, 1), pad_id, dtype=torch.long),
            "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.ones((1, 1), dtype=torch.long), "token_mask": torch.zeros((1, 1), dtype=torch.bool),
            "real_tokens": torch.tensor(0),
            "sample_id": torch.zeros((0,), dtype=torch.long), "source": torch.full((1, 1), -1, dtype=torch.long)}


def _ids(samples: list[dict], source: torch.Tensor) -> dict[str, torch.Tensor]:
    """Which records these are (for logs and error messages) and, per token, which source each
    comes from (for per-source losses), where the samples say."""
    out = {}
    if samples[0].get("sample_id") is not None:
        out["sample_id"] = torch.as_tensor([s["sample_id"] for s in samples], dtype=torch.long)
    if samples[0].get("source") is not None:
        out["source"] = source
    return out


def _round_up(n: int, multiple: int | None) -> int:
    return -(-n // multiple) * multiple if multiple else n
