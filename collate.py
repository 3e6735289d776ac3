"""Dynamic padding: a batch is padded to its own longest sample, not to --max_len."""

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
        return {"input_ids": torch.full((1, 1), pad_id, dtype=torch.long),
                "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
                "attention_mask": torch.ones((1, 1), dtype=torch.long), "sample_id": torch.zeros((0,), dtype=torch.long)}
    lengths = [len(s["input_ids"]) for s in samples]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (s, n) in enumerate(zip(samples, lengths)):
        input_ids[row, :n] = torch.as_tensor(s["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(s["labels"], dtype=torch.long)
    attention_mask = (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).long()
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if samples[0].get("sample_id") is not None:  # which records these are, for logs and error messages
        batch["sample_id"] = torch.as_tensor([s["sample_id"] for s in samples], dtype=torch.long)
    return batch
