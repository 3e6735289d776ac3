"""README's "Changing the loop": each recipe applied to a real run, the loss one under accelerate
launch with 2 processes too. A recipe is applied as a researcher would: a small edit of one
function (here by a wrapper script that replaces it, or by editing a copy of the file)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO, losses, max_diff, metrics, run_cmd, train, uneven_data, weights

RUNNER = """\
import math

import numpy as np
import torch
import torch.nn.functional as F

import batches
import train_loop

{recipe}
train_loop.main()
"""

WEIGHTED_LOSS = '''
def loss_weights(batch, where):
    starts = where & ~F.pad(where, (1, 0))[:, :-1]  # the first position of each reply
    reply = starts.cumsum(dim=1)                    # 1 in the first reply, 2 in the second, ...
    return torch.where(reply == 1, 0.5, 1.0)[where]
train_loop.loss_weights = loss_weights
'''

WSD_SCHEDULE = '''
def learning_rate_at(step, total_steps, args):
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    decay_from = int(0.8 * total_steps)  # warmup, stable, then a linear decay over the last 20%
    if step < warmup:
        return args.learning_rate * (step + 1) / warmup
    if step < decay_from:
        return args.learning_rate
    return args.learning_rate * (total_steps - step) / (total_steps - decay_from)
train_loop.learning_rate_at = learning_rate_at
'''

NEW_METRIC = '''
step_sums = train_loop.step_sums
train_loop.step_sums = lambda result, micro_batches, *more: {
    **step_sums(result, micro_batches, *more), "samples": sum(len(b["sample_id"]) for b in micro_batches)}
'''

# batches.epoch_order, edited in place: a curriculum, shortest conversations first in each epoch
# (--group_by_length hands it the lengths), ties in shuffled order.
CURRICULUM_OLD = """    if lengths is None:
        return order
"""
CURRICULUM_NEW = """    if lengths is None:
        return order
    return order[np.argsort(np.asarray(lengths)[order], kind="stable")]
"""


def runner(tmp_path, recipe):
    script = tmp_path / "run_recipe.py"
    script.write_text(RUNNER.format(recipe=textwrap.dedent(recipe)))
    return script


def run_script(script, args, cache, config=None):
    launcher = [] if config is None else ["-m", "accelerate.commands.launch", "--config_file", f"configs/{config}"]
    return run_cmd([sys.executable, *launcher, str(script), *map(str, args), "--max_eval_generations", "0"], cache,
                   env_extra={"PYTHONPATH": str(REPO)})  # the script lives outside the repo


def test_recipe_weighted_loss_one_and_two_processes(tmp_path, sft_cache):
    """Single-turn data: every trained token is in a first reply, so the first step's loss is exactly
    half the unweighted one, and 2 processes give the same model as 1."""
    data = uneven_data(tmp_path / "d.jsonl", 16)
    args = ["--train_files", data, "--max_steps", 2, "--optim", "sgd", "--learning_rate", 0.5,
            "--lr_scheduler_type", "constant", "--max_grad_norm", 0, "--per_device_train_batch_size", 8]  # no clipping
    script = runner(tmp_path, WEIGHTED_LOSS)
    train(["--output_dir", tmp_path / "plain", *args], sft_cache)
    run_script(script, ["--output_dir", tmp_path / "one", *args], sft_cache)
    args[args.index("--per_device_train_batch_size") + 1] = 4
    run_script(script, ["--output_dir", tmp_path / "two", *args], sft_cache, config="cpu_ddp.yaml")
    assert losses(tmp_path / "one")[1] == pytest.approx(0.5 * losses(tmp_path / "plain")[1], rel=1e-6)
    change = max_diff(weights(tmp_path / "one"), weights(tmp_path / "plain"))
    assert change > 1e-3  # half the gradient: another model
    assert max_diff(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-5 * change
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)


def test_recipes_learning_rate_schedule_and_new_logged_metric(tmp_path, sft_cache):
    script = runner(tmp_path, WSD_SCHEDULE + NEW_METRIC)
    data = uneven_data(tmp_path / "d.jsonl", 36)
    run_script(script, ["--output_dir", tmp_path / "o", "--train_files", data, "--max_steps", 10, "--warmup_steps", 2,
                        "--learning_rate", 1e-3, "--per_device_train_batch_size", 2], sft_cache, config="cpu_ddp.yaml")
    records = [m for m in metrics(tmp_path / "o") if "loss" in m]
    assert [m["lr"] for m in records] == pytest.approx([5e-4] + [1e-3] * 7 + [1e-3, 5e-4])
    # 36 samples in steps of 4: 9 steps an epoch, the 10th starts the next; summed over both processes
    assert [m["samples"] for m in records] == [4] * 10


def repo_copy(dest):
    """The code as a researcher's own clone would hold it (the data stays where it is)."""
    dest.mkdir()
    for f in REPO.glob("*.py"):
        shutil.copy(f, dest / f.name)
    for d in ("sftloop", "assets", "configs"):
        shutil.copytree(REPO / d, dest / d)
    return dest


@pytest.mark.slow
def test_recipe_batch_order_edit_does_not_retokenize_and_refuses_a_resume(tmp_path):
    cache = tmp_path / "cache"
    data = uneven_data(tmp_path / "d.jsonl", 40)
    args = ["--train_files", data, "--max_steps", 5, "--save_steps", 2, "--per_device_train_batch_size", 4,
            "--group_by_length", "--log_sample_ids", "--max_eval_generations", 0]
    train(["--output_dir", tmp_path / "before", *args], cache)
    tokenized = sorted(cache.glob("tokenized-*.arrow"))
    assert tokenized

    edited = repo_copy(tmp_path / "clone")
    src = (edited / "batches.py").read_text()
    assert CURRICULUM_OLD in src
    (edited / "batches.py").write_text(src.replace(CURRICULUM_OLD, CURRICULUM_NEW))
    env = {**os.environ, "SFT_CACHE": str(cache), "TQDM_DISABLE": "1"}

    def run_edited(*extra):
        return subprocess.run([sys.executable, "train_loop.py", *map(str, args), *map(str, extra)], cwd=edited, env=env,
                              capture_output=True, text=True, timeout=600)

    p = run_edited("--output_dir", tmp_path / "after")
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(cache.glob("tokenized-*.arrow")) == tokenized  # no second tokenization
    # the curriculum took effect: each step's padded width grows (shortest samples first)
    widths = [m["padded_tokens"] for m in metrics(tmp_path / "after") if "loss" in m]  # 4 rows x the longest
    ids = [json.loads(line)["sample_ids"] for line in open(tmp_path / "after" / "sample_ids.jsonl")]
    assert ids != [json.loads(line)["sample_ids"] for line in open(tmp_path / "before" / "sample_ids.jsonl")]
    assert widths == sorted(widths)

    # the edited order would not continue the first run: resuming it is refused, with the way out
    p = run_edited("--output_dir", tmp_path / "before", "--resume_from_checkpoint", "true", "--max_steps", 6)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "was trained with another order of samples" in p.stderr and "batches.py" in p.stderr
