"""Batches: dynamic padding to the batch's own longest sample, or packing several samples per row."""

from __future__ import annotations

import torch

from templates import IGNORE_INDEX


def collate(samples: list[dict], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` with pad_id and `labels` with -100.

    The attention mask comes from each sample's real length, never from `input_ids != pad_id`:
    the pad id is often a real token (Qwen pads with <|endoftext|>, or with eos when no pad exists).
    An empty list gives one masked-out dummy row, so a process whose share of a batch is empty
    still runs forward/backward and joins the gradient collectives with a zero contribution.
    """
    if not samples:
        return _dummy(pad_id)
    lengths = [len(s["input_ids"]) for s in samples]
    width = _round_up(max(lengths), pad_to_multiple_of)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    source = torch.full((len(samples), width), -1, dtype=torch.long)
    for row, (s, n) in enumerate(zip(samples, lengths)):
        input_ids[row, :n] = torch.as_tensor(s["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(s["labels"], dtype=torch.long)
        source[row, :n] = s.get("source", -1)
    attention_mask = (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).long()
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "real_tokens": torch.tensor(sum(lengths)), **_ids(samples, source)}


def collate_packed(samples: list[dict], pad_id: int, max_len: int, pad_to_multiple_of: int | None = None,
                   mask_4d: bool = True) -> dict[str, torch.Tensor]:
    """Pack the samples into as few rows of at most max_len tokens as first-fit-decreasing finds.

    position_ids restart at 0 for each sample, each sample's first label is -100 (it would be
    predicted from the previous sample's last token), and attention never crosses samples: a
    block-diagonal causal mask in 4D (additive, 0 or -inf), or, for flash-attention kernels
    (mask_4d=False), no mask and the restarting position_ids, from which transformers finds the
    sample boundaries itself.
    """
    if not samples:
        return _dummy(pad_id)
    rows: list[list[dict]] = []
    room: list[int] = []
    for s in sorted(samples, key=lambda s: -len(s["input_ids"])):
        n = len(s["input_ids"])
        i = next((r for r, free in enumerate(room) if free >= n), None)
        if i is None:
            rows.append([])
            room.append(max_len)
            i = len(rows) - 1
        rows[i].append(s)
        room[i] -= n
    width = _round_up(max(max_len - free for free in room), pad_to_multiple_of)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # which sample each position holds
    source = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, s in enumerate(row):
            n = len(s["input_ids"])
            input_ids[r, at:at + n] = torch.as_tensor(s["input_ids"])
            labels[r, at:at + n] = torch.as_tensor(s["labels"])
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = k
            source[r, at:at + n] = s.get("source", -1)
            at += n
        # padding: each pad position is its own segment (attends to itself only: no empty softmax row)
        segment[r, at:] = torch.arange(len(row), len(row) + width - at)
        position_ids[r, at:] = torch.arange(width - at)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "real_tokens": torch.tensor(sum(len(s["input_ids"]) for s in samples)), **_ids(samples, source)}
    if mask_4d:
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        allowed = causal[None] & (segment[:, :, None] == segment[:, None, :])
        batch["attention_mask"] = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(
            ~allowed, torch.finfo(torch.float32).min)[:, None]
    return batch


def _dummy(pad_id: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.full((1, 1), pad_id, dtype=torch.long),
            "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.ones((1, 1), dtype=torch.long), "real_tokens": torch.tensor(0),
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
