"""The fast tier's end-to-end runs (pytest -m "not slow"): one process, two processes under
accelerate launch, and a run killed with SIGKILL that resumes bitwise. A few steps each; the full
suite proves each property at length."""

import sys

import pytest

from helpers import launch, losses, max_diff, start, train, uneven_data, wait_for, weights

ARGS = ["--max_steps", 4, "--save_steps", 2, "--per_device_train_batch_size", 4, "--eval_steps", 0,
        "--max_eval_generations", 0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return uneven_data(tmp_path_factory.mktemp("smoke") / "d.jsonl", 24)


@pytest.mark.smoke
def test_one_process_trains_and_writes_a_model(tmp_path, sft_cache, data):
    train(["--output_dir", tmp_path / "o", "--train_files", data, *ARGS], sft_cache)
    assert weights(tmp_path / "o") and sorted(losses(tmp_path / "o")) == [1, 2, 3, 4]


@pytest.mark.smoke
@pytest.mark.distributed
def test_two_processes_under_accelerate_launch(tmp_path, sft_cache, data):
    p = launch("cpu_ddp.yaml", ["--output_dir", tmp_path / "o", "--train_files", data, *ARGS,
                                "--per_device_train_batch_size", 2], sft_cache)
    assert "2 processes, DDP over gloo" in p.stderr and weights(tmp_path / "o")


@pytest.mark.smoke
def test_sigkill_then_resume_is_bitwise(tmp_path, sft_cache, data):
    """A constant learning rate, so the killed run (told to go on far longer) and the reference
    follow the same schedule; resumed from its last checkpoint, it ends with the same weights."""
    args = ["--train_files", data, *ARGS, "--lr_scheduler_type", "constant", "--warmup_ratio", 0, "--max_steps", 6]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(["--output_dir", full, *args], sft_cache)
    p = start([sys.executable, "train_loop.py", "--output_dir", cut, *args, "--max_steps", 400], sft_cache)
    wait_for((cut / "checkpoint-2").exists, p, interval=0.005)
    p.kill()
    p.wait()
    train(["--output_dir", cut, *args, "--resume_from_checkpoint", "true"], sft_cache)
    assert max_diff(weights(cut), weights(full)) == 0.0
    assert losses(cut) == losses(full)
