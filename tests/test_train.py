"""The loop, end to end: real tiny Qwen2 model, real files, real accelerate/DeepSpeed on CPU."""

import json
import os
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
    p = train(["--output_dir", out, "--max_steps", 40, "--save_steps", 20, "--validation_files", EVAL], sft_cache)
    loss = losses(out)
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(36, 41)) / 5
    assert last < first - 1.5, (first, last)
    evals = [m for m in metrics(out) if "eval_loss" in m]
    assert [m["step"] for m in evals] == list(range(0, 41, 4))  # before training, every 10% by default
    assert evals[10]["eval_loss"] < evals[5]["eval_loss"] < evals[0]["eval_loss"]
    # off a terminal: a progress line every 5% instead of a progress bar, and no noise from the libraries
    assert "step 2/40 (5%): loss " in p.stderr and "step 40/40 (100%)" in p.stderr and "it/s" not in p.stderr
    assert p.stderr.startswith(f"{p.stderr[:8]} INFO 1 process, no distributed backend, global batch 32")
    for noise in ("Removed shared tensor", "generated new fontManager", "Setting accelerator to CPU", "[RANK 0]"):
        assert noise not in p.stderr, noise
    # every file with the user's umask (safetensors alone would write 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(f.stat().st_mode & 0o777) for f in out.rglob("*") if f.is_file()} == {oct(0o666 & ~umask)}

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


# Plain DDP and DeepSpeed splits are compared in test_exactness (SPLITS); this is the chunked loss path.
@pytest.mark.parametrize("config, per_device, accum, engine, extra", [
    ("cpu_ddp.yaml", 4, 1, "DDP over gloo", ["--chunked_ce", "true", "--ce_chunk_size", 16]),
], ids=["ddp-chunked"])
def test_two_processes_on_cpu_match_single_process(tmp_path, sft_cache, reference_run, config, per_device, accum, engine,
                                                   extra):
    """DDP 4x1x2, the loss computed a chunk of tokens at a time, has the global batch of the 8x1x1 reference run."""
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


def one_line_error(args, cache) -> str:
    p = train(args, cache, check=False)
    assert p.returncode != 0 and p.stderr.count("\n") == 1 and "usage" not in p.stderr, p.stderr
    return p.stderr.strip()


def test_bad_flag_is_a_clear_error(tmp_path, sft_cache):
    assert one_line_error(["--lr_scheduler_type", "wavy"], sft_cache).startswith(
        "error: argument --lr_scheduler_type: invalid choice: 'wavy' (choose from")
    assert one_line_error(["--learning_rate", "fast"], sft_cache) == (
        "error: argument --learning_rate: invalid float value: 'fast' (python train_loop.py --help lists the flags)")
    # no abbreviations: a prefix of a flag is an unknown flag, not that flag
    assert one_line_error(["--learning_rat", "1e-3"], sft_cache) == (
        "error: unknown flag --learning_rat; did you mean --learning_rate?")
    assert one_line_error(["--lerning-rate", "1e-3"], sft_cache) == (
        "error: unknown flag --lerning-rate; did you mean --learning_rate?")
    assert one_line_error(["--frobnicate"], sft_cache) == (
        "error: unknown flag --frobnicate (python train_loop.py --help lists the flags)")
    p = run_cmd([sys.executable, "train_loop.py", "--output_dir", tmp_path / "o2", "--train_files", tmp_path / "none.jsonl"],
                sft_cache, check=False)
    assert p.returncode != 0 and "none.jsonl: no such file" in p.stderr and "Traceback" not in p.stderr


def test_help_groups_every_flag_with_its_help_and_default_once():
    from sftloop import args

    p = run_cmd([sys.executable, "train_loop.py", "--help"], REPO / ".no-cache", check=True)
    text = p.stdout
    assert text.startswith("usage: python train_loop.py [run.yaml] [--flag value ...]\n\nSupervised fine-tuning")
    assert "accelerate launch" in text and "README.md" in text
    headings = [h + ":" for h in args.HEADINGS]
    assert [line for line in text.splitlines() if line in headings] == headings
    parser = args.make_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        assert action.help.count("default") <= 1, action.help
        assert action in [a for g in parser._action_groups if g.title in args.HEADINGS for a in g._group_actions], action.dest
    assert str(REPO) not in text  # no path of this clone
    no_plot = next(a for a in parser._actions if a.option_strings == ["--no_plot"])
    assert no_plot.help == "turn --plot off"


def test_cpu_threads_note_under_accelerate_launch(monkeypatch):
    import types

    from sftloop import runtime

    fake = types.SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert runtime.idle_cores_note(fake) == (
            "each of the 2 processes computes with 1 CPU thread (accelerate launch's default on a CPU), so 6 of this "
            "machine's 8 cores are idle; pass --num_cpu_threads_per_process 4 to accelerate launch")
        torch.set_num_threads(4)
        assert runtime.idle_cores_note(fake) is None
    finally:
        torch.set_num_threads(threads)


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


def test_flags_page_is_current():
    """docs/flags.md is --help as a page; regenerate it with python -m sftloop.args > docs/flags.md."""
    from sftloop import args

    assert (REPO / "docs" / "flags.md").read_text() == args.flags_page()


def test_torch_compile_gives_the_eager_losses(tmp_path, sft_cache):
    """--torch_compile (each decoder layer through inductor) trains as eager does: the same loss at
    every step of a short run, to 1e-4 relative (the compiled kernels sum in another order)."""
    args = ["--train_files", REPO / "data" / "sample_belle_eval.jsonl", "--max_steps", 4,
            "--per_device_train_batch_size", 8, "--eval_steps", 0]
    train(["--output_dir", tmp_path / "eager", *args], sft_cache)
    train(["--output_dir", tmp_path / "compiled", *args, "--torch_compile"], sft_cache)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_liger_kernel_without_cuda_or_the_package_is_one_line(tmp_path, sft_cache):
    p = train(["--output_dir", tmp_path / "o", "--use_liger_kernel", "--max_steps", 1], sft_cache, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    said = [line for line in p.stderr.splitlines() if "--use_liger_kernel" in line]
    assert said == ["error: --use_liger_kernel needs a CUDA GPU (its kernels are Triton), which this run has not"
                    + ("" if _has("liger_kernel") else " and the liger-kernel package (pip install liger-kernel)")]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_save_strategy_no_trains_and_saves_nothing(tmp_path, sft_cache):
    p = train(["--output_dir", tmp_path / "o", "--train_files", REPO / "data" / "sample_belle_eval.jsonl",
               "--max_steps", 2, "--eval_steps", 0, "--save_strategy", "no", "--plot", "false"], sft_cache)
    assert sorted(f.name for f in (tmp_path / "o").iterdir()) == ["metrics.jsonl"]
    assert sorted(losses(tmp_path / "o")) == [1, 2] and "--save_strategy no: nothing saved" in p.stderr
