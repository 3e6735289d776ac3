"""The loop, end to end: real tiny Qwen2 model, real files, real accelerate/DeepSpeed on CPU."""

import json
import shutil
import sys

import pytest
import torch

from helpers import REPO, launch, losses, max_diff, metrics, run_cmd, train, weights

EVAL = REPO / "data" / "sample_belle_eval.jsonl"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, sft_cache):
    """Single process, whole global batch of 8 in one micro-batch, 2 steps."""
    out = tmp_path_factory.mktemp("ref") / "out"
    train(["--output_dir", out, "--max_steps", 2, "--per_device_train_batch_size", 8], sft_cache)
    return out


def test_short_run_lowers_loss_and_saves_a_loadable_hf_model(tmp_path, sft_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import templates

    out = tmp_path / "out"
    train(["--output_dir", out, "--max_steps", 40, "--save_steps", 20, "--validation_files", EVAL], sft_cache)
    loss = losses(out)
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(36, 41)) / 5
    assert last < first - 1.5, (first, last)
    evals = [m for m in metrics(out) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 20, 40]  # before training, at each save, at the end
    assert evals[2]["eval_loss"] < evals[1]["eval_loss"] < evals[0]["eval_loss"]

    for d in (out, out / "checkpoint-20", out / "checkpoint-40"):
        assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    assert (out / "checkpoint-40" / "trainer_state.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == templates.QWEN25_CHAT_TEMPLATE
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    # the saved weights are the trained ones, not the initial ones
    assert max_diff(weights(out), weights(out / "checkpoint-20")) > 0
    assert torch.equal(model.model.embed_tokens.weight, weights(out)["model.embed_tokens.weight"])


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path, sft_cache):
    args = ["--max_steps", 6, "--save_steps", 3, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(["--output_dir", full, *args], sft_cache)
    train(["--output_dir", cut, *args], sft_cache)
    # forget everything after step 3, then continue from the latest checkpoint
    shutil.rmtree(cut / "checkpoint-6")
    (cut / "model.safetensors").unlink()
    kept = [m for m in metrics(cut) if m["step"] <= 3]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
    p = train(["--output_dir", cut, *args, "--resume_from_checkpoint", "true"], sft_cache)
    assert "resumed from" in p.stderr and "checkpoint-3 at step 3" in p.stderr
    assert max_diff(weights(full), weights(cut)) == 0.0
    assert losses(cut) == losses(full)


@pytest.mark.parametrize("config, per_device, accum, engine, extra", [
    ("cpu_ddp.yaml", 4, 1, "DDP over gloo", []),
    ("cpu_zero2.yaml", 2, 2, "DeepSpeed ZeRO-2", []),
    ("cpu_ddp.yaml", 4, 1, "DDP over gloo", ["--chunked_ce", "true", "--ce_chunk_size", 16]),  # the chunked loss path
], ids=["ddp", "zero2", "ddp-chunked"])
def test_two_processes_on_cpu_match_single_process(tmp_path, sft_cache, reference_run, config, per_device, accum, engine,
                                                   extra):
    """DDP 4x1x2 and DeepSpeed ZeRO-2 2x2x2 have the global batch of the 8x1x1 reference run."""
    out = tmp_path / "out"
    p = launch(config, ["--output_dir", out, "--max_steps", 2, "--per_device_train_batch_size", per_device,
                        "--gradient_accumulation_steps", accum, *extra], sft_cache)
    assert f"2 processes, {engine}, global batch 8" in p.stderr
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    assert max_diff(weights(out), weights(reference_run)) < 5e-5
    ref = losses(reference_run)
    assert all(abs(ref[s] - l) < 1e-5 * ref[s] for s, l in losses(out).items())


def test_refuses_a_used_output_dir_without_a_traceback(tmp_path, sft_cache):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    p = train(["--output_dir", out, "--max_steps", 1], sft_cache, check=False)
    assert p.returncode != 0
    assert f"output directory {out} is not empty" in p.stderr and "Traceback" not in p.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_yaml_config_file_with_command_line_override(tmp_path, sft_cache, reference_run):
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "out"
    cfg.write_text(f"output_dir: {out}\nmax_steps: 5\nper_device_train_batch_size: 8\n"
                   f"train_files:\n  - {REPO / 'data' / 'sample_belle.jsonl'}\n")
    train([cfg, "--max_steps", 2], sft_cache)
    assert sorted(losses(out)) == [1, 2]
    assert max_diff(weights(out), weights(reference_run)) == 0.0


def test_bad_flag_is_a_clear_error(tmp_path, sft_cache):
    p = train(["--output_dir", tmp_path / "o", "--lr_scheduler_type", "wavy"], sft_cache, check=False)
    assert p.returncode != 0 and "invalid choice: 'wavy'" in p.stderr
    p = run_cmd([sys.executable, "train_loop.py", "--output_dir", tmp_path / "o2", "--train_files", tmp_path / "none.jsonl"],
                sft_cache, check=False)
    assert p.returncode != 0 and "none.jsonl: no such file" in p.stderr and "Traceback" not in p.stderr


def test_plain_python_run_calls_loss_and_collator_in_this_process(tmp_path, sft_cache, monkeypatch):
    """What makes a breakpoint in the loss or the collator work: no worker processes, no launcher."""
    import train_loop
    from accelerate.state import AcceleratorState

    import batches

    calls = {"loss": 0, "collate": 0}
    real_loss, real_collate = train_loop.token_loss, batches.collate

    def loss(*a, **k):
        calls["loss"] += 1
        return real_loss(*a, **k)

    def collate(*a, **k):
        calls["collate"] += 1
        return real_collate(*a, **k)

    monkeypatch.setattr(train_loop, "token_loss", loss)
    monkeypatch.setattr(batches, "collate", collate)
    monkeypatch.setenv("SFT_CACHE", str(sft_cache))
    try:
        # training data without a held-out set: only the training steps call the loss and the collator
        train_loop.main(["--output_dir", str(tmp_path / "o"), "--max_steps", "2", "--gradient_accumulation_steps", "2",
                         "--train_files", str(REPO / "data" / "sample_belle_eval.jsonl")])
    finally:
        AcceleratorState._reset_state(True)
    assert calls == {"loss": 4, "collate": 4}
