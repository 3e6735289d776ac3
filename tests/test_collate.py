"""The collator: dynamic padding, masks from real lengths, -100 labels."""

import torch

from collate import collate
from templates import IGNORE_INDEX


def test_pads_to_longest_with_ignored_labels():
    b = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for k, t in b.items() if k != "token_mask")
    assert b["token_mask"].tolist() == [[True, True, True], [True, False, False]]  # a real token: what a router counts


def test_pad_id_that_is_also_a_real_token_stays_attended():
    # Qwen pads with <|endoftext|>, which can also occur in text; the mask must come from lengths
    pad = 151643
    b = collate([{"input_ids": [1, pad, 2, pad], "labels": [-100, pad, 2, pad]}, {"input_ids": [3], "labels": [3]}],
                pad_id=pad)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert b["labels"][0].tolist() == [-100, pad, 2, pad]  # real pad-id tokens keep their labels
    assert b["labels"][1].tolist() == [3, -100, -100, -100]


def test_pad_to_multiple_of():
    b = collate([{"input_ids": list(range(9)), "labels": list(range(9))}], pad_id=0, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (1, 16)
    assert b["attention_mask"].sum().item() == 9
    assert (b["labels"][0, 9:] == IGNORE_INDEX).all()


def test_empty_share_gives_a_dummy_row_without_targets():
    b = collate([], pad_id=7)
    assert b["input_ids"].tolist() == [[7]] and b["labels"].tolist() == [[IGNORE_INDEX]]
    assert b["attention_mask"].tolist() == [[1]]


def test_each_target_token_keeps_its_source_padded_or_packed():
    """Per-source losses read each target token's source from the batch: packing must carry it
    through exactly as padding does (the same targets counted for each source)."""
    from collate import collate_packed
    from sftloop import lm_logits, logs

    samples = [{"input_ids": list(range(10, 10 + n)), "labels": [-100] * 2 + list(range(12, 10 + n)), "sample_id": i,
                "source": i % 3} for i, n in enumerate([5, 9, 3, 7, 4])]
    plain = collate(samples, pad_id=0)
    packed = collate_packed(samples, pad_id=0)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]
    counts = [logs.source_sums([torch.zeros(int(lm_logits.num_targets(b["labels"])))], [b], 3) for b in (plain, packed)]
    assert torch.equal(counts[0], counts[1])
    assert counts[0][1].tolist() == [3 + 5, 7 + 2, 1]
