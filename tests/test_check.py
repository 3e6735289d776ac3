"""--check: the pre-flight check. A healthy run passes with every section; each fatal class is caught
with its own message; nothing is written into the run's directory but check.json."""

import dataclasses
import json
import signal
import sys

import pytest
import torch
from transformers import AutoTokenizer

from helpers import REPO, launch, start, train, uneven_data, wait_for

SECTIONS = {"data", "template", "loss", "memory", "time", "disk", "resume"}
SMALL = ["--max_steps", 4, "--per_device_train_batch_size", 4, "--eval_steps", 0, "--check_steps", 1]


def report(out):
    return json.loads((out / "check.json").read_text())


def fatal(out) -> list[str]:
    return [f["text"] for f in report(out)["findings"] if f["level"] == "fatal"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return uneven_data(tmp_path_factory.mktemp("check") / "d.jsonl", 24)


@pytest.mark.smoke
def test_the_default_runs_check_passes_and_writes_only_its_report(tmp_path, sft_cache):
    out = tmp_path / "o"
    p = train(["--output_dir", out, "--check"], sft_cache)
    r = report(out)
    assert r["fatal"] == 0 and {f["section"] for f in r["findings"]} == SECTIONS
    assert [f["level"] for f in r["findings"]] == sorted((f["level"] for f in r["findings"]),
                                                         key=("fatal", "warning", "fact").index)
    # what is trained, shown: the reply and its end of turn, nothing of the prompt
    assert r["samples"][0]["text"].endswith("<|im_start|>assistant\n[[1<|im_end|>]]\n")
    assert "gives the same tokens as the tokenizer's own template" in p.stdout
    assert "fits with" in p.stdout and "the run takes ~" in p.stdout
    n = r["numbers"]
    assert n["first_loss"] == pytest.approx(n["ln_vocab"], rel=0.1) and n["eta_seconds"] > 0
    assert n["checkpoint_bytes"] > 1e6 and n["peak_bytes"] > 1e8
    assert [f.name for f in out.iterdir()] == ["check.json"]  # no checkpoint, model or metrics
    assert not (tmp_path / ".o.check").exists()  # the scratch directory of the measurement is gone
    # the run itself then starts in that directory (the report alone does not make it used)
    train(["--output_dir", out, "--max_steps", 1, "--eval_steps", 0], sft_cache)
    assert (out / "model.safetensors").is_file()


def test_an_end_of_turn_never_trained_is_fatal(tmp_path, data, monkeypatch):
    """A template whose trained spans stop before its end-of-turn token: the model never learns to stop."""
    import templates

    t = templates.TEMPLATES["qwen2.5"]

    def short_spans(messages, tools, tokenizer):
        text, spans = t.render(messages, tools, tokenizer)
        return text, {i: (a, b - len("<|im_end|>")) for i, (a, b) in spans.items()}

    monkeypatch.setitem(templates.TEMPLATES, "qwen2.5", dataclasses.replace(t, render=short_spans))
    out = tmp_path / "o"
    p = train(["--output_dir", out, "--train_files", data, "--check", *SMALL], tmp_path / "cache", check=False)
    assert p.returncode == 1 and "the check found 1 fatal problem" in p.stderr
    assert fatal(out) == ["the end-of-turn token '<|im_end|>' is never trained (0 of the 24 trained replies in the "
                          "first 24 samples end in '<|im_end|>'): the model will not learn to stop"]


def test_a_doubled_bos_is_fatal(tmp_path, sft_cache):
    """A tokenizer whose template opens with BOS, and data whose text brings another one."""
    tok = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-qwen-tokenizer")
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    tok.save_pretrained(tmp_path / "tok")
    d = tmp_path / "d.jsonl"
    d.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"<|endoftext|>Hello {i}"},
                                                       {"from": "assistant", "value": "Hi"}]}) + "\n" for i in range(8)))
    out = tmp_path / "o"
    train(["--output_dir", out, "--train_files", d, "--tokenizer_name_or_path", tmp_path / "tok", "--template",
           "tokenizer", "--check", *SMALL], sft_cache, check=False)
    assert fatal(out) == [f"doubled BOS: {d}:1 holds '<|endoftext|>' 2 times where the template puts it 1 time(s) "
                          "(the rest comes from the text of the data)"]


def test_samples_cut_by_max_len_get_the_runs_own_verdict(tmp_path, sft_cache, data):
    """One rule for the run and the check (sft_data.max_len_cuts): the same data stops both, with the
    same message, or lets both go on with the same count."""
    out, run = tmp_path / "o", ["--train_files", data, *SMALL]
    for max_len, said in [(16, "--max_len 16 cuts 24 of 24 train samples (100.00%): 24 lose every trained token"),
                          (48, "--max_len 48 cuts 12 of 24 train samples (50.00%): 0 lose every trained token "
                               "(left out), 12 the end of a trained reply")]:
        checked = train(["--output_dir", out, *run, "--max_len", max_len, "--check"], sft_cache, check=False)
        [finding] = fatal(out)
        ran = train(["--output_dir", tmp_path / f"run{max_len}", *run, "--max_len", max_len], sft_cache, check=False)
        assert checked.returncode == ran.returncode == 1 and said in finding and said in ran.stderr
        assert finding == "the run would stop here: " + ran.stderr.strip().splitlines()[-1][len("error: "):]
    train(["--output_dir", out, *run, "--max_len", 48, "--max_cut_share", 0.6, "--check"], sft_cache)
    r = report(out)
    assert r["numbers"]["max_len_cuts"]["lost_end_of_reply"] == 12 and r["numbers"]["max_len_cuts"]["first"]
    assert any(f["level"] == "warning" and f["text"].startswith("--max_len 48 cuts 12 of 24") for f in r["findings"])
    ran = train(["--output_dir", tmp_path / "goes_on", *run, "--max_len", 48, "--max_cut_share", 0.6], sft_cache)
    assert "--max_len 48 cuts 12 of 24 train samples (50.00%)" in ran.stderr


def test_a_batch_that_does_not_fit_in_memory_is_fatal_with_the_levers(tmp_path, sft_cache, data):
    out = tmp_path / "o"
    train(["--output_dir", out, "--train_files", data, "--check_device_memory_gb", 0.05, "--check", *SMALL],
          sft_cache, check=False)
    [finding] = [f for f in report(out)["findings"] if f["level"] == "fatal"]
    assert "will run out at step" in finding["text"] and "of 51.2 MiB (--check_device_memory_gb)" in finding["text"]
    assert "--gradient_checkpointing saves" in finding["fix"] and "--use_peft (LoRA)" in finding["fix"]


def test_a_disk_too_small_for_the_checkpoints_is_fatal(tmp_path, sft_cache, data):
    out = tmp_path / "o"
    train(["--output_dir", out, "--train_files", data, "--save_steps", 1, "--check_free_disk_gb", 0.02, "--check",
           *SMALL], sft_cache, check=False)
    [finding] = [f for f in report(out)["findings"] if f["level"] == "fatal"]
    assert finding["text"].startswith("4 checkpoint(s) of ") and "the disk fills before the run ends" in finding["text"]
    assert finding["fix"] == "--save_total_limit 2 fits"


def test_a_non_finite_loss_is_fatal_with_the_samples_named(tmp_path, sft_cache, data, tiny_tok):
    import train_loop

    model = train_loop.tiny_qwen2(len(tiny_tok), tiny_tok)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    tiny_tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "o"
    train(["--output_dir", out, "--train_files", data, "--model_name_or_path", tmp_path / "m", "--check", *SMALL],
          sft_cache, check=False)
    [said] = fatal(out)
    assert "not finite, on the samples" in said and f"{data}:" in said


def test_resuming_is_reported_and_a_refused_resume_is_fatal(tmp_path, sft_cache, data):
    out = tmp_path / "o"
    train(["--output_dir", out, "--train_files", data, "--save_steps", 2, *SMALL[:-2]], sft_cache)
    train(["--output_dir", out, "--train_files", data, "--check", "--resume_from_checkpoint", "true", *SMALL],
          sft_cache)
    assert any("continues" in f["text"] and "checkpoint-4 at step 4" in f["text"] for f in report(out)["findings"])
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-4").is_dir()  # left as they were
    train(["--output_dir", out, "--train_files", data, "--check", "--resume_from_checkpoint", "true", *SMALL,
           "--per_device_train_batch_size", 2], sft_cache, check=False)
    [said] = fatal(out)
    assert said.startswith("resuming would stop: ") and "global batch 4" in said
    train(["--output_dir", out, "--train_files", data, "--check", *SMALL], sft_cache, check=False)
    [said] = fatal(out)
    assert said.startswith("the run would stop: output directory") and "is not empty" in said


def test_sigterm_during_a_check_leaves_nothing_behind(tmp_path, sft_cache):
    out = tmp_path / "o"
    p = start([sys.executable, "train_loop.py", "--output_dir", out, "--check", "--check_steps", 100000,
               "--max_steps", 100000], sft_cache)
    wait_for((tmp_path / ".o.check").exists, p, interval=0.01)  # the set-up has begun
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    assert not (tmp_path / ".o.check").exists() and not out.exists()


@pytest.mark.distributed
def test_a_check_under_accelerate_launch_with_packing(tmp_path, sft_cache, data):
    out = tmp_path / "o"
    p = launch("cpu_ddp.yaml", ["--output_dir", out, "--train_files", data, "--packing", "--check", *SMALL], sft_cache)
    r = report(out)
    assert r["fatal"] == 0 and "--packing keeps samples apart in Qwen2ForCausalLM (sdpa attention)" in p.stdout
    assert r["numbers"]["packing_max_logprob_diff"] <= r["numbers"]["packing_tolerance"] < 1e-3
    assert p.stdout.count("Pre-flight check") == 1  # printed once, by the first process


def test_the_check_of_a_real_pretrained_chat_model(tmp_path, sft_cache, smollm2_dir):
    """SmolLM2-135M-Instruct with its own template: every section, and a first loss far below a
    uniform guess (it already answers much of this)."""
    out = tmp_path / "o"
    p = train(["--output_dir", out, "--model_name_or_path", smollm2_dir, "--template",
               "tokenizer", "--train_files", REPO / "data" / "shout_train.jsonl", "--check", *SMALL], sft_cache)
    r = report(out)
    assert r["fatal"] == 0 and {f["section"] for f in r["findings"]} == SECTIONS, p.stdout
    assert r["numbers"]["first_loss"] < 0.5 * r["numbers"]["ln_vocab"]
    assert "rendered by the tokenizer's own chat template" in p.stdout
