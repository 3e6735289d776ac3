"""Exactness, proven on CPU with real DDP, DeepSpeed ZeRO-2 and ZeRO-3, and FSDP2: the same global
batch gives the same model however it is split; resume is exact; ZeRO-3 and FSDP2 saves are whole.
"""

import json
import shutil
import signal
import sys

import pytest
import torch

from helpers import SPLITS, launch, losses, max_diff, start, train, uneven_data, wait_for, weights

def sample_ids(out):
    """The last record for each step (a killed run may have logged a step it did not checkpoint)."""
    return {r["step"]: r["sample_ids"] for r in map(json.loads, open(out / "sample_ids.jsonl"))}


def run(split, out, data, cache, extra=()):
    """split = (where, per_device, accumulation): where is 'python' or an accelerate config in configs/."""
    where, per_device, accum = split
    args = ["--output_dir", out, "--train_files", data, "--per_device_train_batch_size", per_device,
            "--gradient_accumulation_steps", accum, "--log_sample_ids", *extra]
    return train(args, cache) if where == "python" else launch(where, args, cache)


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory, sft_cache):
    """The initial model (0 steps is not a run; a step with lr 0 leaves the weights as they were)."""
    out = tmp_path_factory.mktemp("init") / "out"
    data = uneven_data(out.parent / "d.jsonl", 17)
    train(["--output_dir", out, "--train_files", data, "--max_steps", 1, "--learning_rate", 0, "--optim", "sgd"], sft_cache)
    return weights(out)


def test_every_split_of_the_global_batch_gives_the_same_model(tmp_path, sft_cache, init_weights):
    """17 samples, global batch 8: steps of 8, 8 and 1 sample. In the last step most micro-batches
    are empty, and under 2x2x2 one process gets no sample at all: no NaN, no stalled collective.
    Plain SGD keeps the update linear in the gradient, so weight differences measure gradient
    differences. Clipping acts in every step (each engine clips its own way), and as it would hide a
    gradient wrong by a factor, the logged norm before clipping is compared too. The learning rate
    is large so that the weight change stays well above float32's resolution for weights near 1."""
    data = uneven_data(tmp_path / "d.jsonl", 17)
    clip = 0.05
    extra = ["--max_steps", 3, "--save_steps", 1, "--optim", "sgd", "--learning_rate", 10.0,
             "--lr_scheduler_type", "constant", "--max_grad_norm", clip]
    outs = {}
    for name, split in SPLITS.items():
        outs[name] = tmp_path / name
        run(split, outs[name], data, sft_cache, extra)
    ref = outs["8x1x1"]
    change = max_diff(weights(ref), init_weights)
    assert change > 1e-3

    def grad_norms(out):
        return {m["step"]: m["grad_norm"] for m in map(json.loads, open(out / "metrics.jsonl")) if "grad_norm" in m}

    assert len(grad_norms(ref)) == 3 and all(g > clip for g in grad_norms(ref).values())  # clipping acts every step
    for name, out in outs.items():
        assert sample_ids(out) == sample_ids(ref), name
        for d in ("checkpoint-1", "checkpoint-2", "."):  # ZeRO-3's intermediate and final saves are whole
            w = weights(out / d)
            assert all(torch.isfinite(t).all() for t in w.values()), (name, d)
            assert max_diff(w, weights(ref / d)) <= 1e-5 * change, (name, d)
        for step, loss in losses(ref).items():
            assert losses(out)[step] == pytest.approx(loss, rel=1e-6), (name, step)
        for step, norm in grad_norms(ref).items():
            assert grad_norms(out)[step] == pytest.approx(norm, rel=1e-5), (name, step)


def test_adamw_splits_agree(tmp_path, sft_cache):
    """With AdamW too (its update is sign-like where a gradient is ~0, so the bound is on lr, not on the change)."""
    data = uneven_data(tmp_path / "d.jsonl", 17)
    extra = ["--max_steps", 3, "--learning_rate", 1e-3]
    for name in ("8x1x1", "2x4x1", "2x2x2-zero3"):
        run(SPLITS[name], tmp_path / name, data, sft_cache, extra)
    for name in ("2x4x1", "2x2x2-zero3"):
        assert max_diff(weights(tmp_path / name), weights(tmp_path / "8x1x1")) < 5e-2 * 1e-3
        for step, loss in losses(tmp_path / "8x1x1").items():
            assert losses(tmp_path / name)[step] == pytest.approx(loss, rel=1e-5)


def kill_after_checkpoint(cmd, ckpt, cache):
    """Start a run and SIGKILL it as soon as `ckpt` is complete (renamed into place)."""
    p = start(cmd, cache)
    wait_for(ckpt.exists, p)
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_resume_after_sigkill_is_bitwise_exact_across_an_epoch_boundary(tmp_path, sft_cache):
    """20 samples, global batch 8: 3 steps per epoch. Stop after step 2 (mid-epoch), resume to step 5."""
    data = uneven_data(tmp_path / "d.jsonl", 20)
    args = ["--train_files", data, "--max_steps", 5, "--save_steps", 2, "--per_device_train_batch_size", 4,
            "--gradient_accumulation_steps", 2, "--log_sample_ids"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(["--output_dir", full, *args], sft_cache)
    kill_after_checkpoint([sys.executable, "train_loop.py", "--output_dir", str(cut), *map(str, args)],
                          cut / "checkpoint-2", sft_cache)
    assert not (cut / "model.safetensors").exists()
    p = train(["--output_dir", cut, *args, "--resume_from_checkpoint", "true"], sft_cache)
    assert "checkpoint-2 at step 2" in p.stderr
    assert max_diff(weights(cut), weights(full)) == 0.0
    assert {s: l for s, l in losses(cut).items() if s > 2} == {s: l for s, l in losses(full).items() if s > 2}
    ids = sample_ids(cut)
    assert ids == sample_ids(full)
    # no sample replayed or skipped: each epoch (steps 1-3, then 4-6) sees every sample once
    assert sorted(i for s in (1, 2, 3) for i in ids[s]) == list(range(20))
    assert len(set(ids[4] + ids[5])) == 16


def test_deepspeed_resume_is_exact(tmp_path, sft_cache):
    data = uneven_data(tmp_path / "d.jsonl", 20)
    args = ["--train_files", data, "--max_steps", 4, "--save_steps", 2, "--per_device_train_batch_size", 2,
            "--gradient_accumulation_steps", 2, "--log_sample_ids"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch("cpu_zero2.yaml", ["--output_dir", full, *args], sft_cache)
    shutil.copytree(full / "checkpoint-2", cut / "checkpoint-2")
    launch("cpu_zero2.yaml", ["--output_dir", cut, *args, "--resume_from_checkpoint", "true"], sft_cache)
    assert max_diff(weights(cut), weights(full)) <= 1e-6
    assert {s: l for s, l in losses(cut).items()} == {s: l for s, l in losses(full).items() if s > 2}
    assert {s: i for s, i in sample_ids(cut).items()} == {s: i for s, i in sample_ids(full).items() if s > 2}


def test_resume_on_another_number_of_processes_continues_with_the_same_samples(tmp_path, sft_cache):
    """Saved by one process (8x1x1), resumed by two DDP processes (4x1x2): same global batch."""
    data = uneven_data(tmp_path / "d.jsonl", 20)
    args = ["--train_files", data, "--max_steps", 4, "--save_steps", 2, "--log_sample_ids"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(["--output_dir", full, "--per_device_train_batch_size", 8, *args], sft_cache)
    launch("cpu_ddp.yaml", ["--output_dir", cut, "--per_device_train_batch_size", 4, *args,
                            "--resume_from_checkpoint", full / "checkpoint-2"], sft_cache)
    assert sample_ids(cut) == {s: i for s, i in sample_ids(full).items() if s > 2}
    for step, loss in losses(cut).items():
        assert loss == pytest.approx(losses(full)[step], rel=1e-5)
    assert max_diff(weights(cut), weights(full)) < 5e-5
