"""Never lose a run, never fail on bad input without saying where."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftloop import sft_data, sources
from helpers import REPO, launch, max_diff, metrics_lines, quick, run_cmd, start, train, wait_for, weights

GOOD = {"conversations": [{"from": "human", "value": "hi"}, {"from": "assistant", "value": "hello"}]}
GOOD_LINE = json.dumps(GOOD)


def prepare(path, tok, cache, **kw):
    corpus = sft_data.load_corpus([{"spec": str(path)}], tok, template="qwen2.5", max_len=2048, system_prompt=None,
                                  cache_dir=cache, **kw)
    return sft_data.first_samples(corpus)


# --- 1. bad data -----------------------------------------------------------------------------

BAD_LINES = {
    "invalid JSON": (b'{"conversations": [}', r"invalid JSON"),
    "not an object": (b"[1, 2]", r"record must be a JSON object, got list"),
    "no conversation key": (b'{"text": "hello"}', r"no conversation found: expected a 'conversations' list"),
    "unknown role": (b'{"conversations": [{"from": "robot", "value": "x"}, {"from": "assistant", "value": "y"}]}',
                     r"conversations\[0\]: unknown role 'robot'"),
    "value not a string": (b'{"conversations": [{"from": "human", "value": 42}, {"from": "assistant", "value": "y"}]}',
                           r"conversations\[0\]: content must be a string, got int"),
    "empty conversation": (b'{"conversations": []}', r"empty conversation"),
    "no assistant turn": (b'{"conversations": [{"from": "human", "value": "q"}]}', r"conversation has no assistant turn"),
    "starts with assistant": (b'{"conversations": [{"from": "assistant", "value": "a"}, {"from": "human", "value": "q"}]}',
                              r"conversation starts with the assistant"),
    "not UTF-8": (b'{"conversations": [{"from": "human", "value": "\xff\xfe"}, {"from": "assistant", "value": "a"}]}',
                  r"bytes that are not UTF-8"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_each_kind_of_bad_record_is_named_with_file_and_line(tmp_path, tiny_tok, kind):
    line, message = BAD_LINES[kind]
    f = tmp_path / "data.jsonl"
    f.write_bytes(b"\n".join([GOOD_LINE.encode(), GOOD_LINE.encode(), line, GOOD_LINE.encode()]) + b"\n")
    with pytest.raises(sources.DataProblems, match=rf"1 problem\(s\) in the data:\n  {f}:3: {message}"):
        prepare(f, tiny_tok, tmp_path / "cache")
    # --skip_invalid_samples: the other records are kept, the bad one counted
    ds = prepare(f, tiny_tok, tmp_path / "cache", skip_invalid=True)
    assert [s["sample_id"] for s in ds] == [0, 1, 3]


def test_truncated_last_line(tmp_path, tiny_tok):
    f = tmp_path / "data.jsonl"
    f.write_text(GOOD_LINE + "\n" + GOOD_LINE[:25])
    with pytest.raises(sources.DataProblems, match=rf"{f}:2: invalid JSON \(truncated last line\?\)"):
        prepare(f, tiny_tok, tmp_path / "cache")


def test_bad_record_in_a_json_array_is_named_by_index(tmp_path, tiny_tok):
    f = tmp_path / "data.json"
    f.write_text(json.dumps([GOOD, {"messages": [{"role": "user", "content": "q"}]}]))
    with pytest.raises(sources.DataProblems, match=rf"{f}: record 1: conversation has no assistant turn"):
        prepare(f, tiny_tok, tmp_path / "cache")


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "empty file"),
    ("blank.jsonl", "\n\n", "no records"),
    ("data.csv", "a,b\n", "unsupported extension '.csv'"),
    ("missing.jsonl", None, "no such file"),
])
def test_file_level_problems(tmp_path, tiny_tok, name, content, message):
    f = tmp_path / name
    if content is not None:
        f.write_text(content)
    with pytest.raises(sources.DataProblems, match=f"{name}: {message}"):
        prepare(f, tiny_tok, tmp_path / "cache")


def test_the_run_lists_the_first_20_problems_and_the_total_without_a_traceback(tmp_path, sft_cache):
    f = tmp_path / "data.jsonl"
    f.write_text("".join((GOOD_LINE if i % 3 else '{"text": "x"}') + "\n" for i in range(75)))
    p = train(["--output_dir", tmp_path / "o", "--train_files", f], sft_cache, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "25 problem(s) in the data:" in p.stderr and f"{f}:1: no conversation found" in p.stderr
    assert "... and 5 more" in p.stderr and f"{f}:58:" in p.stderr and f"{f}:61:" not in p.stderr
    assert "--skip_invalid_samples" in p.stderr
    p = train(["--output_dir", tmp_path / "o2", "--train_files", f, "--skip_invalid_samples", "--max_steps", 1],
              sft_cache)
    assert "Skipped 25 invalid train record(s) of 75" in p.stderr


# --- 2. crash-safe checkpoints ----------------------------------------------------------------

def test_a_run_killed_while_saving_keeps_the_previous_checkpoint_and_resumes_exactly(tmp_path, sft_cache):
    args = ["--max_steps", 6, "--save_steps", 2, "--per_device_train_batch_size", 4, "--save_total_limit", 2]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(["--output_dir", full, *args], sft_cache)
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # limit 2

    p = start([sys.executable, "train_loop.py", "--output_dir", cut, *quick(args)], sft_cache)
    wait_for(lambda: (cut / ".tmp-checkpoint-4").exists(), p, interval=0.001)  # the step-4 save has begun (ms)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (cut / "checkpoint-2" / "checkpoint_complete").is_file()
    assert not (cut / "checkpoint-4").exists()
    r = train(["--output_dir", cut, *args, "--resume_from_checkpoint", "true"], sft_cache)
    assert "checkpoint-2 at step 2" in r.stderr
    assert not list(cut.glob(".tmp-checkpoint-*"))  # the partial save was cleared
    assert max_diff(weights(cut), weights(full)) == 0.0


def test_a_directory_without_the_completion_marker_is_never_resumed(tmp_path, sft_cache):
    out = tmp_path / "o"
    train(["--output_dir", out, "--max_steps", 2, "--save_steps", 1], sft_cache)
    (out / "checkpoint-2" / "checkpoint_complete").unlink()
    r = train(["--output_dir", out, "--max_steps", 2, "--resume_from_checkpoint", "true"], sft_cache)
    assert "checkpoint-1 at step 1" in r.stderr
    (out / "checkpoint-2" / "checkpoint_complete").unlink()  # that run rewrote checkpoint-2 whole
    r = train(["--output_dir", out, "--max_steps", 2, "--resume_from_checkpoint", out / "checkpoint-2"], sft_cache,
              check=False)
    assert r.returncode != 0 and "is not a complete checkpoint" in r.stderr


# --- 3. preemption ----------------------------------------------------------------------------

def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path, sft_cache):
    args = ["--max_steps", 40, "--per_device_train_batch_size", 4]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(["--output_dir", full, *args], sft_cache)
    p = start([sys.executable, "train_loop.py", "--output_dir", cut, *quick(args)], sft_cache)
    wait_for(lambda: metrics_lines(cut) >= 3, p)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 0
    assert time.time() - t0 < 30
    ckpts = list(cut.glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "checkpoint_complete").is_file()
    step = int(ckpts[0].name.split("-")[1])
    assert 3 <= step < 40 and not (cut / "model.safetensors").exists()
    train(["--output_dir", cut, *args, "--resume_from_checkpoint", "true"], sft_cache)
    assert max_diff(weights(cut), weights(full)) == 0.0


def test_sigterm_under_accelerate_launch_stops_every_process_after_a_checkpoint(tmp_path, sft_cache):
    """Kubernetes-style: the signal goes to the launcher, which forwards it to each process."""
    args = ["--max_steps", 300, "--per_device_train_batch_size", 4]
    out = tmp_path / "o"
    p = start([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/cpu_ddp.yaml",
               "train_loop.py", "--output_dir", out, *quick(args)], sft_cache)
    wait_for(lambda: metrics_lines(out) >= 3, p)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    log = p.stdout.read()
    assert log.count("SIGTERM: stopped after step") == 2  # both processes, after the same step
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "checkpoint_complete").is_file()
    step = int(ckpts[0].name.split("-")[1])
    r = launch("cpu_ddp.yaml", ["--output_dir", out, *args, "--max_steps", step + 2, "--resume_from_checkpoint", "true"],
               sft_cache)
    assert f"at step {step}" in r.stderr and (out / "model.safetensors").is_file()


# --- 4. non-finite loss or gradient ----------------------------------------------------------

@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory, tiny_tok):
    """A model whose embedding of <|box_start|> is NaN: exactly the samples containing it go non-finite."""
    import transformers

    config = transformers.Qwen2Config(vocab_size=832, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                                      eos_token_id=tiny_tok.eos_token_id, pad_token_id=tiny_tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[tiny_tok.convert_tokens_to_ids("<|box_start|>")] = float("nan")
    out = tmp_path_factory.mktemp("poisoned") / "model"
    model.save_pretrained(out)
    tiny_tok.save_pretrained(out)
    return out


def poisoned_data(path, bad_lines):
    with open(path, "w") as f:
        for i in range(1, 17):
            q = "look at <|box_start|> here" if i in bad_lines else f"question {i}"
            f.write(json.dumps({"conversations": [{"from": "human", "value": q},
                                                  {"from": "assistant", "value": f"answer {i}"}]}) + "\n")
    return path


def test_nonfinite_loss_stops_naming_the_step_and_samples_without_saving(tmp_path, sft_cache, poisoned_model):
    data = poisoned_data(tmp_path / "d.jsonl", {7})
    out = tmp_path / "o"
    p = train(["--output_dir", out, "--model_name_or_path", poisoned_model, "--train_files", data, "--max_steps", 4,
               "--per_device_train_batch_size", 4, "--save_steps", 1, "--learning_rate", 1e-3], sft_cache, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "non-finite loss at step" in p.stderr and f"{data}:7" in p.stderr
    step = int(p.stderr.split("non-finite loss at step ")[1].split()[0])
    assert (out / f"checkpoint-{step - 1}").exists() or step == 1
    assert not (out / f"checkpoint-{step}").exists() and not (out / "model.safetensors").exists()


def test_skip_nonfinite_steps_skips_and_counts(tmp_path, sft_cache, poisoned_model):
    data = poisoned_data(tmp_path / "d.jsonl", {3, 11})
    out = tmp_path / "o"
    p = train(["--output_dir", out, "--model_name_or_path", poisoned_model, "--train_files", data, "--max_steps", 4,
               "--per_device_train_batch_size", 4, "--learning_rate", 1e-3, "--skip_nonfinite_steps"], sft_cache)
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    skipped = [r["step"] for r in rows if r["loss"] is None]
    assert 1 <= len(skipped) <= 2 and rows[-1]["skipped_steps"] == len(skipped)
    assert "step skipped" in p.stderr
    # only the poisoned embedding row is not finite; no skipped step spread NaN into the weights
    w = weights(out)
    bad_rows = (~torch.isfinite(w["model.embed_tokens.weight"])).any(dim=1).nonzero().flatten().tolist()
    assert len(bad_rows) == 1
    assert all(torch.isfinite(v).all() for k, v in w.items() if k != "model.embed_tokens.weight")


# --- 5. trust ---------------------------------------------------------------------------------

class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


def test_training_state_with_arbitrary_pickle_is_refused(tmp_path, sft_cache):
    out = tmp_path / "o"
    train(["--output_dir", out, "--max_steps", 2, "--save_steps", 1], sft_cache)
    Payload.marker = tmp_path / "pwned"
    state = out / "checkpoint-2" / "training_state"
    torch.save({"x": Payload()}, state / "random_states_0.pkl")
    r = train(["--output_dir", out, "--max_steps", 3, "--resume_from_checkpoint", "true"], sft_cache, check=False)
    assert r.returncode != 0 and "refusing to resume" in r.stderr
    assert not Payload.marker.exists()


def test_model_weights_only_from_safetensors(tmp_path, sft_cache, poisoned_model):
    d = tmp_path / "m"
    shutil.copytree(poisoned_model, d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    r = train(["--output_dir", tmp_path / "o", "--model_name_or_path", d, "--max_steps", 1], sft_cache, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "safetensors" in r.stderr


@pytest.mark.parametrize("flags, expected", [([], False), (["--trust_remote_code", "true"], True)])
def test_trust_remote_code_reaches_every_from_pretrained_and_is_off_by_default(monkeypatch, flags, expected):
    from sftloop import loading
    from sftloop.args import parse_args

    seen = []

    def from_pretrained(path, **kw):
        seen.append(kw.get("trust_remote_code"))
        raise OSError("stop here")

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    model_args, _, _ = parse_args(["--model_name_or_path", "some/model", *flags])
    with pytest.raises(OSError):
        loading.load_tokenizer(model_args)
    with pytest.raises(SystemExit):
        loading.load_pretrained(model_args)
    assert seen == [expected, expected]


# --- 6. configuration mistakes, caught before training -----------------------------------------

def test_deepspeed_config_that_disagrees_with_the_flags(tmp_path, sft_cache):
    cfg = tmp_path / "ds.yaml"
    cfg.write_text((REPO / "configs" / "cpu_zero2.yaml").read_text().replace(
        "  zero_stage: 2", "  zero_stage: 2\n  gradient_accumulation_steps: 4"))
    r = run_cmd([sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg, "train_loop.py",
                 "--output_dir", tmp_path / "o", "--gradient_accumulation_steps", "2"], sft_cache, check=False)
    assert r.returncode != 0
    message = "error: the DeepSpeed config sets gradient_accumulation_steps=4 but the flags ask for 2"
    assert r.stderr.count(message) == 1 and f"\n{message}" in "\n" + r.stderr  # once, on a line of its own


@pytest.mark.parametrize("flags, message", [
    (["--max_len", 100000], "--max_len 100000 is beyond the model's 4096 positions"),
    (["--template", "llama3"], "--template llama3 needs the token '<|begin_of_text|>'"),
    pytest.param(["--bf16", "true"], "asks for bf16, but this machine has no GPU with bf16 support",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine trains in bf16")),
    (["--sample_prompts", REPO / "README.md"], "expected a .txt file (one message a line) or a .jsonl/.json file"),
])
def test_configuration_mistakes(tmp_path, sft_cache, flags, message):
    r = train(["--output_dir", tmp_path / "o", *flags], sft_cache, check=False)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_output_dir_not_writable(tmp_path, sft_cache):
    (tmp_path / "file").write_text("")
    r = train(["--output_dir", tmp_path / "file" / "out"], sft_cache, check=False)
    assert r.returncode != 0 and "is not writable" in r.stderr and "Traceback" not in r.stderr


# --- 7. SIGTERM at any moment, and the logs after a resume ---------------------------------------

def start_logged(args, cache, log_path):
    """Start train_loop.py with its output going to a file that the test can read while it runs."""
    env = {**os.environ, "SFT_CACHE": str(cache), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    f = open(log_path, "w")
    return subprocess.Popen([sys.executable, "train_loop.py", *map(str, args)], cwd=REPO, env=env, stdout=f,
                            stderr=subprocess.STDOUT, text=True)


def sigterm_when(p, predicate, delay=0.0):
    wait_for(predicate, p, timeout=300, interval=0.002)  # some moments last only milliseconds
    time.sleep(delay)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 0
    return time.time() - t0


def test_the_cache_index_appears_only_once_its_arrow_files_are_whole(tmp_path, tiny_tok, monkeypatch):
    """A run stopped while tokenizing (SIGTERM, a kill) leaves Arrow files but no index, so the next
    run tokenizes again instead of reading a part; when the index appears, its files hold every row."""
    import datasets

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join([GOOD_LINE] * 30) + "\n")
    cache = tmp_path / "cache"
    real_map = datasets.Dataset.map

    def stopped_after_writing(self, *a, **kw):
        real_map(self, *a, **kw)
        raise KeyboardInterrupt  # the process ends after the Arrow file, before the index

    monkeypatch.setattr(datasets.Dataset, "map", stopped_after_writing)
    with pytest.raises(KeyboardInterrupt):
        prepare(data, tiny_tok, cache)
    assert list(cache.glob("tokenized-*.arrow")) and not list(cache.glob("tokenized-*.json"))
    monkeypatch.setattr(datasets.Dataset, "map", real_map)
    rows_when_indexed, real_replace = [], os.replace

    def replace(src, dst):
        if Path(dst).name.startswith("tokenized-") and str(dst).endswith(".json"):
            files = json.loads(Path(src).read_text())["files"]
            rows_when_indexed.append(sum(datasets.Dataset.from_file(str(cache / f)).num_rows for f in files))
        return real_replace(src, dst)

    monkeypatch.setattr(sft_data.os, "replace", replace)
    assert len(prepare(data, tiny_tok, cache)) == 30
    assert rows_when_indexed == [30]


@pytest.mark.slow
def test_sigterm_during_tokenization_exits_cleanly(tmp_path):
    cache, out, log = tmp_path / "fresh-cache", tmp_path / "o", tmp_path / "log"
    p = start_logged(["--output_dir", out, "--max_eval_generations", 0], cache, log)
    sigterm_when(p, lambda: (cache / "hf-datasets").exists())  # reading the data file has begun
    text = log.read_text()
    assert "SIGTERM before training began: stopped; nothing was trained, so nothing is saved" in text
    assert "Traceback" not in text and not list(out.glob("checkpoint-*"))
    assert not list(cache.glob("tokenized-*.arrow"))  # no half-written cache file is left to be trusted


def test_sigterm_during_the_first_evaluation_exits_cleanly(tmp_path, sft_cache):
    out, log = tmp_path / "o", tmp_path / "log"
    # the untrained model's 100 replies run to 256 tokens: over 10 s of generate calls, 8 replies each
    p = start_logged(["--output_dir", out, "--max_eval_generations", 100, "--max_new_tokens", 256], sft_cache, log)
    took = sigterm_when(p, lambda: "model: Qwen2ForCausalLM" in log.read_text(), delay=1.0)
    text = log.read_text()
    assert "SIGTERM before training began" in text and "Traceback" not in text and took < 10
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


def test_sigterm_during_an_evaluation_in_training_checkpoints_that_step(tmp_path, sft_cache):
    out, log = tmp_path / "o", tmp_path / "log"
    p = start_logged(["--output_dir", out, "--max_steps", 50, "--eval_steps", 3, "--max_eval_generations", 100,
                      "--max_new_tokens", 256], sft_cache, log)
    # the step-3 record is written just before the step-3 evaluation begins
    took = sigterm_when(p, lambda: metrics_lines(out) >= 2 and any(
        json.loads(line).get("step") == 3 for line in open(out / "metrics.jsonl")))
    assert "SIGTERM: stopped after step 3 with a checkpoint" in log.read_text() and took < 10
    assert not [m for m in map(json.loads, open(out / "metrics.jsonl")) if "eval_loss" in m and m["step"] == 3]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert (out / "checkpoint-3" / "checkpoint_complete").is_file()


def test_main_restores_the_sigterm_handler(tmp_path, sft_cache, monkeypatch):
    """An in-process main() (pdb.runcall, a notebook) leaves its host's SIGTERM handling as it was."""
    import train_loop
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("SFT_CACHE", str(sft_cache))
    before = signal.getsignal(signal.SIGTERM)
    try:
        train_loop.main(["--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--max_eval_generations", "0"])
        with pytest.raises(SystemExit):  # an error on the way out restores it too
            train_loop.main(["--output_dir", str(tmp_path / "o"), "--max_steps", "1"])
    finally:
        AcceleratorState._reset_state(True)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_resume_drops_what_was_logged_after_its_checkpoint(tmp_path, sft_cache):
    out = tmp_path / "o"
    args = ["--output_dir", out, "--max_steps", 6, "--save_steps", 2, "--eval_steps", 2, "--per_device_train_batch_size",
            4, "--log_sample_ids", "--max_eval_generations", 2]
    train(args, sft_cache)
    train([*args, "--resume_from_checkpoint", out / "checkpoint-2"], sft_cache)
    for name in ("metrics.jsonl", "generations.jsonl", "sample_ids.jsonl"):
        steps = [json.loads(line)["step"] for line in open(out / name)]
        assert steps == sorted(steps), name  # the plot never doubles back
    train_steps = [m["step"] for m in map(json.loads, open(out / "metrics.jsonl")) if "loss" in m]
    assert train_steps == [1, 2, 3, 4, 5, 6]


def test_the_default_run_finds_its_held_out_set_by_a_relative_path(monkeypatch):
    import train_loop

    monkeypatch.chdir(REPO)
    _, data_args, _ = train_loop.parse_args(["--train_files", "data/sample_belle.jsonl"])
    assert data_args.validation_files == [str(REPO / "data" / "sample_belle_eval.jsonl")]


def test_generation_stops_at_the_templates_end_of_turn_when_eos_differs(tmp_path, sft_cache, tiny_tok):
    """A tokenizer whose eos is <|endoftext|>: generation and exact match use the template's <|im_end|>,
    so no held-out case is dropped, and the log says so."""
    tok_dir = tmp_path / "tok"
    tiny_tok.save_pretrained(tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|endoftext|>"}))
    out = tmp_path / "o"
    p = train(["--output_dir", out, "--tokenizer_name_or_path", tok_dir, "--max_steps", 1,
               "--max_eval_generations", 3, "--max_new_tokens", 4], sft_cache)
    assert "end of turn: '<|im_end|>' (not the tokenizer's eos '<|endoftext|>')" in p.stderr
    assert all("eval_exact_match" in m for m in map(json.loads, open(out / "metrics.jsonl")) if "eval_loss" in m)
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(out).eos_token_id == tiny_tok.convert_tokens_to_ids("<|im_end|>")


def test_template_tokenizer_without_a_chat_template_is_a_clear_error(tmp_path, sft_cache, tiny_tok):
    tok_dir = tmp_path / "tok"
    tiny_tok.save_pretrained(tok_dir)
    (tok_dir / "chat_template.jinja").unlink()
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = train(["--output_dir", tmp_path / "o", "--tokenizer_name_or_path", tok_dir, "--template", "tokenizer"], sft_cache,
              check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "error: --template tokenizer needs a tokenizer that carries a chat_template" in r.stderr


def test_a_process_that_hangs_ends_the_run_at_ddp_timeout_naming_the_step_and_phase(tmp_path, sft_cache):
    """A deadlock injected for the test: process 1 never enters checkpoint-2's save (it sleeps, as a
    process stuck outside a collective does). Process 0 waits there --ddp_timeout seconds, then the
    run ends with one line saying where it waited, instead of holding the machines forever."""
    hang = tmp_path / "hang_on_save.py"
    hang.write_text(
        "import os, signal, time\n"
        "import train_loop\n"
        "from sftloop import checkpoints, runtime\n"
        "real_save = checkpoints.save_checkpoint\n"
        "def save(accelerator, model, tokenizer, args, state):\n"
        "    if os.environ['RANK'] == '1' and state['global_step'] == 2:\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ended by the launcher's SIGTERM, not its SIGKILL 30 s later\n"
        "        time.sleep(3600)\n"
        "    return real_save(accelerator, model, tokenizer, args, state)\n"
        "checkpoints.save_checkpoint = save\n"
        "with runtime.errors_said_once():\n"
        "    train_loop.main()\n")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"q {i}"},
                                                          {"from": "assistant", "value": f"a {i}"}]}) + "\n"
                            for i in range(16)))
    began = time.monotonic()
    r = launch("cpu_ddp.yaml", ["--output_dir", tmp_path / "o", "--train_files", data, "--max_steps", 4,
                                "--save_steps", 1, "--per_device_train_batch_size", 2, "--ddp_timeout", 20],
               sft_cache, script=hang, check=False,
               env_extra={"PYTHONPATH": str(REPO)})
    assert r.returncode != 0
    assert ("waited 20 s (--ddp_timeout) for the other processes at saving checkpoint-2 and gave up: another process "
            "hung or died") in r.stderr, r.stderr[-4000:]
    assert "The last complete checkpoint is " in r.stderr and "checkpoint-1" in r.stderr
    assert time.monotonic() - began < 300, r.stderr[-4000:]
    print(time.monotonic() - began)
