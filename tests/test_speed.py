"""The speed features change how the work is laid out, never the result."""

import pytest
import torch

import batches
import train_loop
from collate import collate, collate_packed, micro_batch_shape, packs_into_one_row
from helpers import REPO, losses, max_diff, metrics, train, weights


def test_packing_layout():
    """Samples one after the other (first-fit decreasing into rows as wide as the longest sample, or
    one row), positions restarting with each sample and with a row's padding, each sample's first
    label -100, no mask, and the boundaries over the flattened rows for flash attention's
    variable-length kernel."""
    s = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]},
         {"input_ids": [6, 7, 8, 9], "labels": [-100, 7, 8, 9]}, {"input_ids": [10], "labels": [10]}]
    b = collate_packed(s, pad_id=0)
    assert b["input_ids"].tolist() == [[6, 7, 8, 9], [1, 2, 3, 10], [4, 5, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    assert b["labels"].tolist() == [[-100, 7, 8, 9], [-100, 2, 3, -100], [-100, 5, -100, -100]]
    assert "attention_mask" not in b
    assert b["cu_seq_lens_q"].tolist() == b["cu_seq_lens_k"].tolist() == [0, 4, 7, 8, 10, 12]  # 10: row 3's padding
    assert b["max_length_q"] == b["max_length_k"] == 4
    one = collate_packed(s, pad_id=0, one_row=True, pad_to_multiple_of=8)  # flash and flex: one row
    assert one["input_ids"].tolist() == [[6, 7, 8, 9, 1, 2, 3, 4, 5, 10, 0, 0, 0, 0, 0, 0]]
    assert one["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 4, 5]]
    assert one["cu_seq_lens_q"].tolist() == [0, 4, 7, 9, 10, 16] and one["max_length_q"] == 6
    for lengths, one_row, pad in [([3, 2, 4], False, None), ([3, 2, 4], True, 8), ([9, 1, 5, 5, 3], False, 4)]:
        rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
        assert tuple(collate_packed(rows, 0, one_row, pad)["input_ids"].shape) == \
            micro_batch_shape(lengths, True, one_row, pad)
        assert tuple(collate(rows, 0, pad)["input_ids"].shape) == micro_batch_shape(lengths, False, one_row, pad)


def test_packed_rows_follow_the_attention_kernel():
    """Flash and flex attention take any row at the cost of its samples: one row. sdpa and eager get a
    dense [row x row] mask from transformers: rows as wide as the longest sample, so never wider than
    the padded batch, and fewer."""
    assert packs_into_one_row("flash_attention_2") and packs_into_one_row("flex_attention")
    assert not packs_into_one_row("sdpa") and not packs_into_one_row("eager")
    lengths = [40, 30, 13, 3, 9, 22]
    packed, padded = micro_batch_shape(lengths, True, False, None), micro_batch_shape(lengths, False, False, None)
    assert packed[1] == padded[1] == 40 and packed[0] == 3 < padded[0]


def test_group_by_length_keeps_composition_split_independent_and_groups_lengths():
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (203,), generator=rng).tolist()
    gb = 8
    order = batches.epoch_order(203, 3, 0, gb, lengths)
    assert sorted(order.tolist()) == list(range(203))
    # similar lengths in a step: far less spread than in a plain shuffled step
    def spread(o):
        steps = [o[i:i + gb] for i in range(0, 200, gb)]
        return sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in steps)
    assert spread(order.tolist()) < 0.25 * spread(batches.epoch_order(203, 3, 0).tolist())
    # and the steps' samples still do not depend on the split
    def sets(per_device, accum, world):
        out = []
        for step in range(batches.steps_per_epoch(203, gb)):
            mbs = [batches.step_micro_batches(order, step, gb, r, world, accum) for r in range(world)]
            out.append(sorted(i for rank in mbs for mb in rank for i in mb))
        return out
    assert sets(8, 1, 1) == sets(2, 2, 2) == sets(1, 4, 2)


def test_packing_and_chunked_loss_give_the_same_run(tmp_path, sft_cache):
    args = ["--max_steps", 3, "--optim", "sgd", "--learning_rate", 0.5, "--lr_scheduler_type", "constant",
            "--log_sample_ids"]
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    train(["--output_dir", plain, *args], sft_cache)
    train(["--output_dir", fast, *args, "--packing", "--max_len", 512, "--chunked_ce", "true", "--ce_chunk_size", 16],
          sft_cache)
    assert max_diff(weights(fast), weights(plain)) < 1e-5
    for step, loss in losses(plain).items():
        assert losses(fast)[step] == pytest.approx(loss, rel=1e-5)
    # under sdpa the packed rows are no wider than the longest sample: never more padding than padded
    eff = lambda out: [m["padding_efficiency"] for m in metrics(out) if "padding_efficiency" in m]  # noqa: E731
    assert all(f >= p for f, p in zip(eff(fast), eff(plain))) and sum(eff(fast)) > sum(eff(plain))


def test_group_by_length_run_pads_less(tmp_path, sft_cache):
    plain, grouped = tmp_path / "plain", tmp_path / "grouped"
    train(["--output_dir", plain, "--max_steps", 20], sft_cache)
    train(["--output_dir", grouped, "--max_steps", 20, "--group_by_length"], sft_cache)
    eff = lambda out: sum(m["padding_efficiency"] for m in metrics(out) if "padding_efficiency" in m) / 20
    assert eff(grouped) > eff(plain) + 0.05


def test_a_step_waits_for_the_host_once(tmp_path, sft_cache, monkeypatch):
    """Every number of a step stays on the device until the step's one reduction (runtime.reduce_sums:
    the losses and token counts to log, whether any process saw a non-finite loss or gradient norm,
    whether any got SIGTERM). Counted through a hook on every way a tensor reaches the host (item,
    tolist, cpu, numpy, float(), int(), bool(), index) called from the project's code while a step
    and its report run; a reduction counts as one, whatever it does inside."""
    import sys

    from sftloop import logs, runtime

    ours = tuple(str(REPO / f) for f in ("train_loop.py", "sftloop", "batches.py", "collate.py", "templates.py"))
    state = {"depth": 0, "syncs": 0, "steps": 0}

    def hook(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, **k):
            if state["depth"] and sys._getframe(1).f_code.co_filename.startswith(ours):
                state["syncs"] += 1
            return original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        hook(name)

    def inside_a_step(fn, step=False):
        def run(*a, **k):
            state["depth"] += 1
            state["steps"] += step
            try:
                return fn(*a, **k)
            finally:
                state["depth"] -= 1
        return run

    reduce_sums = runtime.reduce_sums

    def one_sync(*a, **k):
        state["syncs"] += bool(state["depth"])
        depth, state["depth"] = state["depth"], 0
        try:
            return reduce_sums(*a, **k)
        finally:
            state["depth"] = depth

    monkeypatch.setattr(runtime, "reduce_sums", one_sync)
    monkeypatch.setattr(train_loop, "train_step", inside_a_step(train_loop.train_step, step=True))
    monkeypatch.setattr(logs.StepReport, "step", inside_a_step(logs.StepReport.step))
    train(["--output_dir", tmp_path / "o", "--max_steps", 5, "--per_device_train_batch_size", 4,
           "--gradient_accumulation_steps", 2, "--eval_steps", 0], sft_cache)
    assert state["steps"] == 5 and state["syncs"] == 5
