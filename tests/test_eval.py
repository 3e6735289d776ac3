"""What a user sees of a run: eval loss and perplexity, generations, exact match, trackers, the plot, chat."""

import json
import re
import subprocess
import sys
import time

import pytest

from helpers import REPO, launch, metrics, train

@pytest.fixture(scope="module")
def short_run(tmp_path_factory, sft_cache):
    """The default run (default data, model, recipe and held-out set) shortened from 2,532 to 500
    steps, evaluated before, midway and after."""
    out = tmp_path_factory.mktemp("short") / "out"
    began = time.perf_counter()
    p = train(["--output_dir", out, *SHORT], sft_cache)
    return out, p, time.perf_counter() - began


SHORT = ["--max_steps", 500, "--eval_steps", 250, "--max_eval_generations", 100, "--report_to", "tensorboard"]


def test_eval_metrics_before_during_and_after(short_run):
    out, *_ = short_run
    evals = [m for m in metrics(out) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 250, 500]
    for m in evals:
        assert m["eval_perplexity"] == pytest.approx(2.718281828 ** m["eval_loss"], rel=1e-6)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 4.0
    train_rows = [m for m in metrics(out) if "loss" in m]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "target_tokens_per_s", "padding_efficiency", "epoch",
                "step", "samples_seen"):
        assert all(key in m for m in train_rows), key
    assert all(0 < m["padding_efficiency"] <= 1 for m in train_rows)
    assert train_rows[-1]["samples_seen"] == 500 * 32


def test_the_checks_estimate_of_the_run_is_within_a_factor_of_its_time(short_run, tmp_path, sft_cache):
    """--check on the same flags estimates the run's time (docs/check.md states the factor measured on
    the full default run); a tokenization the run did counts apart, as the check does."""
    _, p, took = short_run
    took -= sum(float(s) for s in re.findall(r"tokenized \S+: \d+ records in ([\d.]+) s", p.stderr))
    train(["--output_dir", tmp_path / "c", "--check", *SHORT], sft_cache)
    eta = json.loads((tmp_path / "c" / "check.json").read_text())["numbers"]["eta_seconds"]
    print(f"estimated {eta:.0f} s, took {took:.0f} s")
    assert took / 2 <= eta <= took * 2


def test_the_shortened_default_run_learns_to_answer_held_out_conversations(short_run):
    """Greedy replies to the last turn of the 100 held-out conversations, compared whole: the untrained
    model gets none right; 500 steps get some, more than 250 did (the full default run gets >= 90%)."""
    out, *_ = short_run
    em = [m["eval_exact_match"] for m in metrics(out) if "eval_loss" in m]
    assert em[0] <= 0.02
    assert em[-1] >= 0.1 and em[-1] > em[1]


def test_generations_are_printed_and_logged(short_run):
    out, p, _ = short_run
    gens = [json.loads(line) for line in open(out / "generations.jsonl")]
    assert sorted({g["step"] for g in gens}) == [0, 250, 500] and len(gens) == 9
    assert all(g["prompt"].endswith("<|im_start|>assistant\n") for g in gens)
    # the untrained model rambles to the length bound; the trained one stops at <|im_end|>
    first, last = [g for g in gens if g["step"] == 0], [g for g in gens if g["step"] == 500]
    assert sum(len(g["reply"]) for g in last) < sum(len(g["reply"]) for g in first)
    # printed as text: the last user turn whole (its second line indented), the reply, what was expected
    printed = p.stdout + p.stderr
    first = json.loads(open(REPO / "data" / "sample_belle_eval.jsonl").readline())["conversations"][-2]["value"]
    assert f"[step 500] user:  {first}".replace("\n", "\n           ") in printed
    assert "          reply: " in printed and "\\n" not in printed


def test_tensorboard_events_and_the_plot(short_run):
    out, *_ = short_run
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    png = out / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    subprocess.run([sys.executable, "-m", "sftloop.plot_metrics", str(out)], cwd=REPO, check=True, capture_output=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for where, message in ((out / "nope", f"error: {out / 'nope'}: no such directory"),
                           (out / "runs", f"error: {out / 'runs'} holds no metrics.jsonl")):
        p = subprocess.run([sys.executable, "-m", "sftloop.plot_metrics", str(where)], cwd=REPO, capture_output=True, text=True)
        assert p.returncode == 1 and p.stderr.startswith(message), p.stderr


def test_chat_streams_replies_with_the_training_template_and_stops(short_run):
    out, *_ = short_run
    # a trailing backslash continues the message on the next line, as the sample tasks need
    p = subprocess.run([sys.executable, "chat.py", str(out), "--max_new_tokens", "24"], cwd=REPO, capture_output=True,
                       text=True, input="Repeat after me:\\\nsun moon\nSay that again.\n/exit\n", timeout=120)
    assert p.returncode == 0, p.stderr
    replies = [line[len("model> "):] for line in p.stdout.splitlines() if line.startswith("model> ")]
    assert len(replies) == 2
    # the same greedy reply as evaluation.py gives for the same conversation, rendered with the saved template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftloop import generation

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    msgs = [{"role": "user", "content": "Repeat after me:\nsun moon"}]
    expected, = generation.generate(model, tok, [generation.prompt_ids(tok, msgs)], 24)
    assert replies[0].strip() == expected.strip()
    assert "<|im_end|>" not in p.stdout
    # --tools: a tool result without a call to answer is refused; a bad tools file is a clear error
    tools = out.parent / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "add", "parameters": {}}}]))
    p = subprocess.run([sys.executable, "chat.py", str(out), "--tools", str(tools), "--max_new_tokens", "4"], cwd=REPO,
                       capture_output=True, text=True, input="/tool 5\nhi\n/exit\n", timeout=120)
    assert p.returncode == 0 and "(no tool call to answer)" in p.stdout and p.stdout.count("model> ") == 1, p.stderr
    tools.write_text('{"name": "add"}')
    p = subprocess.run([sys.executable, "chat.py", str(out), "--tools", str(tools)], cwd=REPO, capture_output=True,
                       text=True, input="/exit\n", timeout=120)
    assert p.returncode == 1 and f"error: --tools {tools}: expected a JSON list of function schemas" in p.stderr


def test_sample_prompts_file_and_validation_split(tmp_path, sft_cache):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Repeat after me: cat dog\n请重复：小猫\n")
    out = tmp_path / "out"
    train(["--output_dir", out, "--max_steps", 4, "--validation_split_percentage", 10, "--sample_prompts", prompts,
           "--max_new_tokens", 8, "--max_eval_generations", 5, "--eval_steps", 0], sft_cache)
    gens = [json.loads(line) for line in open(out / "generations.jsonl")]
    assert [g["step"] for g in gens] == [0, 0, 4, 4]
    assert all(g["expected"] is None for g in gens)
    evals = [m for m in metrics(out) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 4]


def test_replies_generated_in_a_batch_are_those_generated_one_at_a_time(tiny_tok):
    """Prompts of different lengths, padded on the left in one generate call: each reply is the one
    its prompt gets alone, cut at the stop token even when others in the batch go on; evaluation's
    batches are the prompts in length order, made from the cases alone (the processes take them in
    turn, so how many there are does not change what is padded to what)."""
    import torch

    import train_loop
    from sftloop import evaluation, generation

    torch.manual_seed(0)
    model = train_loop.tiny_qwen2(len(tiny_tok), tiny_tok).eval()
    with torch.no_grad():  # freshly initialised, it says "\n" to every prompt, which would hide a padding mistake
        for w in model.parameters():
            if w.dim() > 1:
                w.normal_(0, 0.5)
    prompts = [generation.prompt_ids(tiny_tok, [{"role": "user", "content": text}])
               for text in ("hi", "Repeat after me: sun moon star", "请重复：小猫 小狗", "a b c d e f g h i j k")]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist() for p in prompts]
    # a stop token that prompt 1 first emits after a few others; the other prompts may go on
    k = next(k for k, t in enumerate(alone[1]) if k >= 2 and t not in alone[1][:k])
    model.generation_config.eos_token_id = alone[1][k]
    singles = [generation.generate(model, tiny_tok, [p], 12)[0] for p in prompts]
    assert generation.generate(model, tiny_tok, prompts, 12) == singles
    assert singles[1] == tiny_tok.decode(alone[1][:k + 1], skip_special_tokens=True)
    assert any(len(tiny_tok(r, add_special_tokens=False).input_ids) > k + 1 for r in singles)  # some went on
    cases = [(p, None) for p in prompts * 3]
    batches = evaluation.reply_batches(cases, 5)
    assert [len(b) for b in batches] == [5, 5, 2]
    lengths = [len(cases[i][0]) for b in batches for i in b]
    assert lengths == sorted(lengths) and sorted(i for b in batches for i in b) == list(range(12))


@pytest.mark.parametrize("config", ["cpu_ddp.yaml", "cpu_zero3.yaml"])
def test_eval_loss_is_token_weighted_across_processes(tmp_path, sft_cache, config):
    """Eval loss and exact match (greedy generation, under ZeRO-3 with synced processes) match one process."""
    args = ["--max_steps", 2, "--eval_steps", 2, "--per_device_eval_batch_size", 3, "--max_eval_generations", 4]
    one, two = tmp_path / "one", tmp_path / "two"
    train(["--output_dir", one, "--per_device_train_batch_size", 8, *args], sft_cache)
    launch(config, ["--output_dir", two, "--per_device_train_batch_size", 4, *args], sft_cache)
    e1 = [m for m in metrics(one) if "eval_loss" in m]
    e2 = [m for m in metrics(two) if "eval_loss" in m]
    assert [m["step"] for m in e1] == [m["step"] for m in e2] == [0, 2]
    for a, b in zip(e1, e2):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
        assert b["eval_exact_match"] == a["eval_exact_match"]
