"""Mixture-of-experts models: the router's balancing loss, balanced over the global batch, included in
the step and logged with the experts' load (sftloop/router.py)."""

import json

import pytest
import torch
import transformers as T

import train_loop
from collate import collate, collate_packed
from helpers import REPO, TINY_TOKENIZER, max_diff, metrics, random_samples, tiny_model_dir, train, weights
from sftloop import router


def tiny_moe():
    """Qwen3-MoE with 8 experts, 2 chosen per token (as Qwen3-30B-A3B: 128 and 8)."""
    return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        max_position_embeddings=512))


def samples(lengths=(40, 30, 13, 3, 22), seed=1):
    return random_samples(lengths, seed)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def balancing_loss(model, batch, accelerator):
    """The loop's balancing loss of one micro-batch that is the whole step, and its gradient."""
    moe = router.of(model, None)
    balance = router.Balance(moe, accelerator, batch["token_mask"].sum().double())
    routed = []
    train_loop.batch_loss(model, batch, router_logits=routed)
    loss = balance.micro_batch_loss(routed, batch["token_mask"])
    gate = model.model.layers[0].mlp.gate.weight
    return loss.item(), torch.autograd.grad(loss, gate)[0]


def test_one_micro_batch_gives_the_models_own_balancing_loss_and_padding_never_counts(accelerator):
    """One process, one micro-batch: the loop's loss and its gradient are load_balancing_loss_func's
    (what the model returns as aux_loss, padding masked out), for a padded and a packed batch alike."""
    torch.manual_seed(0)
    model = tiny_moe()
    assert router.of(model, None) == router.Router(experts=8, top_k=2, coef=0.001)
    s = samples()
    padded = collate(s, pad_id=0)
    theirs = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], output_router_logits=True,
                   use_cache=False).aux_loss
    their_grad = torch.autograd.grad(theirs, model.model.layers[0].mlp.gate.weight)[0]
    for batch in (padded, collate_packed(s, pad_id=0), collate_packed(s, pad_id=0, one_row=True, pad_to_multiple_of=64)):
        ours, our_grad = balancing_loss(model, batch, accelerator)
        assert ours == pytest.approx(theirs.item(), rel=1e-5)
        assert (our_grad - their_grad).abs().max() <= 1e-5 * their_grad.abs().max()


def test_the_router_comes_from_the_config_and_a_coefficient_for_a_dense_model_is_one_line(tmp_path, sft_cache):
    torch.manual_seed(0)
    moe = tiny_moe()
    assert router.of(moe, 0.0) == router.Router(8, 2, 0.0)  # off: the load is still logged
    assert router.of(moe, 0.5).coef == 0.5
    assert router.of(T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=2)), None) is None
    p = train(["--output_dir", tmp_path / "o", "--max_steps", 1, "--router_aux_loss_coef", 0.5], sft_cache, check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        "error: --router_aux_loss_coef 0.5: Qwen2ForCausalLM has no router whose logits transformers returns (no "
        "router_aux_loss_coef and output_router_logits in its config)")
    p = train(["--output_dir", tmp_path / "o", "--max_steps", 1, "--router_aux_loss_coef", "often"], sft_cache, check=False)
    assert p.returncode == 1 and "--router_aux_loss_coef: invalid float value: 'often'" in p.stderr.strip().splitlines()[-1]


def test_a_moe_model_trains_with_its_balancing_loss_included_logged_and_checked(tmp_path, sft_cache):
    """Through the loop: router_aux_loss and the busiest and idlest expert's share in metrics.jsonl,
    the progress line and the plot; the loss changes the update (0 turns it off, the load still
    logged); chunked cross-entropy trains the same model; --check reports the router's load."""
    model_dir = tiny_model_dir(tmp_path, tiny_moe)
    args = ["--model_name_or_path", model_dir, "--tokenizer_name_or_path", TINY_TOKENIZER, "--max_len", 128,
            "--eval_steps", 0, "--max_eval_generations", 0, "--max_steps", 3, "--per_device_train_batch_size", 8,
            "--optim", "sgd", "--learning_rate", 0.5, "--lr_scheduler_type", "constant", "--warmup_steps", 0,
            "--disable_tqdm", "true"]
    p = train(["--output_dir", tmp_path / "on", *args, "--router_aux_loss_coef", 1.0], sft_cache)
    train(["--output_dir", tmp_path / "off", *args, "--router_aux_loss_coef", 0], sft_cache)
    chunked = train(["--output_dir", tmp_path / "chunked", *args, "--router_aux_loss_coef", 1.0, "--chunked_ce", "true",
                     "--ce_chunk_size", 16], sft_cache)
    assert "chunked cross-entropy: 16 target tokens a chunk" in chunked.stderr
    assert max_diff(weights(tmp_path / "chunked"), weights(tmp_path / "on")) < 1e-5  # the router's logits on both paths
    for run in ("on", "off"):
        logged = [m for m in metrics(tmp_path / run) if "loss" in m]
        assert len(logged) == 3 and all(1.0 < m["router_aux_loss"] < 8.0 for m in logged)
        assert all(0 <= m["expert_share_min"] <= 1 / 8 <= m["expert_share_max"] <= 1 for m in logged)
    assert "router_aux_loss" in p.stderr and (tmp_path / "on" / "metrics.png").is_file()
    on, off = weights(tmp_path / "on"), weights(tmp_path / "off")
    gate = "model.layers.0.mlp.gate.weight"
    assert (on[gate] - off[gate]).abs().max() > 1e-4  # the balancing loss moves the router
    check = train(["--output_dir", tmp_path / "check", *args, "--check", "--check_steps", 2], sft_cache, check=False)
    report = json.loads((tmp_path / "check" / "check.json").read_text())
    said = [f for f in report["findings"] if f["text"].startswith("router (8 experts, top 2, balancing loss x 0.001)")]
    assert len(said) == 1 and "the busiest expert took" in said[0]["text"], check.stdout
    assert len(report["numbers"]["router_aux_loss"]) >= 2


@pytest.mark.distributed
def test_a_moe_model_is_the_same_model_whatever_the_process_split_at_a_fixed_accumulation(tmp_path, sft_cache):
    """With the balancing loss on (weight 1, so that it shows), balanced over the global batch: at one
    micro-batch a step, one process of 8 samples = ZeRO-3 and FSDP2 with 2 processes of 4; at two
    micro-batches a step (each micro-batch's balancing counts the step's selections so far), one
    process of 4 x 2 = DDP and ZeRO-2 with 2 processes of 2 x 2. With it off, neither the split nor
    accumulation changes anything: 8 x 1 = 2 x 4 in one process = ZeRO-3 with 2 processes of 2 x 2.
    Different samples on each process route to different experts; no engine hangs. Plain SGD keeps
    the update linear in the gradient."""
    from helpers import launch, losses, uneven_data

    model_dir = tiny_model_dir(tmp_path, tiny_moe)
    data = uneven_data(tmp_path / "d.jsonl", 16)
    common = ["--model_name_or_path", model_dir, "--tokenizer_name_or_path", TINY_TOKENIZER, "--train_files", data,
              "--max_len", 256, "--max_steps", 2, "--optim", "sgd", "--learning_rate", 2.0, "--lr_scheduler_type",
              "constant", "--warmup_steps", 0, "--max_grad_norm", 0, "--eval_steps", 0]

    def run(name, where, per_device, accumulation, coef):
        out = tmp_path / name
        args = ["--output_dir", out, *common, "--per_device_train_batch_size", per_device,
                "--gradient_accumulation_steps", accumulation, "--router_aux_loss_coef", coef]
        train(args, sft_cache) if where == "python" else launch(where, args, sft_cache)
        return out

    start = weights(model_dir)  # as saved: transformers writes the fused experts one by one
    groups = [[run("8x1", "python", 8, 1, 1.0), run("4x1x2-zero3", "cpu_zero3.yaml", 4, 1, 1.0),
               run("4x1x2-fsdp2", "cpu_fsdp2.yaml", 4, 1, 1.0)],
              [run("4x2", "python", 4, 2, 1.0), run("2x2x2-ddp", "cpu_ddp.yaml", 2, 2, 1.0),
               run("2x2x2-zero2", "cpu_zero2.yaml", 2, 2, 1.0)],
              [run("8x1-off", "python", 8, 1, 0), run("2x4-off", "python", 2, 4, 0),
               run("2x2x2-zero3-off", "cpu_zero3.yaml", 2, 2, 0)]]
    for k, (ref, *others) in enumerate(groups):
        change = max_diff(weights(ref), start)
        assert change > 1e-2
        logged = {m["step"]: m for m in metrics(ref) if "loss" in m}
        for out in others:
            assert max_diff(weights(out), weights(ref)) <= 1e-5 * change, (out.name, ref.name)
            assert losses(out) == pytest.approx(losses(ref), rel=1e-6)
            for step, m in ((m["step"], m) for m in metrics(out) if "loss" in m):
                assert m["expert_share_max"] == pytest.approx(logged[step]["expert_share_max"], rel=1e-6)
                if k < 2:  # the same accumulation: the same balancing loss (the third group's is off, only logged)
                    assert m["router_aux_loss"] == pytest.approx(logged[step]["router_aux_loss"], rel=1e-5), out.name
    # the balancing over the step's micro-batches so far is another loss than over the whole step at once
    assert max_diff(weights(tmp_path / "4x2"), weights(tmp_path / "8x1")) > 1e-4


@pytest.mark.distributed
def test_lora_reaches_the_fused_experts_saves_them_whole_under_zero3_and_merges_them(tmp_path, sft_cache):
    """--use_peft's all-linear reaches the fused expert weights (gate_up_proj, down_proj) and the
    router's weight as peft target parameters, besides the attention's linear layers: one process and
    ZeRO-3 on two train the same adapter (the balancing loss on), saved whole; the verified merge
    changes the experts; chat.py answers from the merged model. Flags the experts cannot take are
    one line each."""
    import subprocess
    import sys

    from helpers import launch
    from safetensors.torch import load_file

    model_dir = tiny_model_dir(tmp_path, tiny_moe)
    args = ["--model_name_or_path", model_dir, "--tokenizer_name_or_path", TINY_TOKENIZER, "--max_len", 128,
            "--eval_steps", 0, "--max_eval_generations", 4, "--max_steps", 2, "--optim", "sgd", "--learning_rate", 1.0,
            "--lr_scheduler_type", "constant", "--warmup_steps", 0, "--use_peft", "--max_grad_norm", 0]
    p = train(["--output_dir", tmp_path / "one", *args, "--per_device_train_batch_size", 8], sft_cache)
    assert "parameters down_proj, gate.weight, gate_up_proj" in p.stderr and "merged model verified" in p.stderr
    launch("cpu_zero3.yaml", ["--output_dir", tmp_path / "zero3", *args, "--per_device_train_batch_size", 4], sft_cache)
    one, zero3 = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("one", "zero3"))
    assert one.keys() == zero3.keys() and sum("experts" in k for k in one) == 8  # lora_A and _B, 2 weights, 2 layers
    assert max((one[k] - zero3[k]).abs().max().item() for k in one) <= 1e-5 * max(v.abs().max().item() for v in one.values())
    base, merged = weights(model_dir), weights(tmp_path / "zero3" / "merged")
    assert (merged["model.layers.0.mlp.experts.3.down_proj.weight"] - base["model.layers.0.mlp.experts.3.down_proj.weight"]
            ).abs().max() > 1e-5  # LoRA B starts at 0: two steps move the merged expert by ~2e-4
    c = subprocess.run([sys.executable, "chat.py", str(tmp_path / "zero3" / "merged"), "--max_new_tokens", "4"],
                       cwd=REPO, capture_output=True, text=True, input="What is 1 plus 1?\n/exit\n", timeout=120)
    assert c.returncode == 0 and sum(line.startswith("model> ") for line in c.stdout.splitlines()) == 1, c.stderr[-2000:]
    for flags, said in [(["--lora_target_modules", "gate_up_proj", "experts_proj"],
                         "error: --lora_target_modules names 'experts_proj', which Qwen3MoeForCausalLM does not have; its "
                         "linear layers are k_proj, lm_head, o_proj, q_proj, v_proj, its fused expert weights "
                         "down_proj, gate_up_proj (or pass all-linear)"),
                        (["--lora_dropout", 0.1], "error: --lora_dropout 0.1: LoRA on Qwen3MoeForCausalLM's fused expert "
                                                  "weights (down_proj, gate_up_proj) takes no dropout in peft"),
                        (["--load_in_4bit"], f"error: --load_in_4bit: {model_dir} is a mixture-of-experts model")]:
        p = train(["--output_dir", tmp_path / "bad", *args, *flags], sft_cache, check=False)
        assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith(said), p.stderr[-1500:]
    p = train(["--output_dir", tmp_path / "experts_only", *args, "--lora_target_modules", "gate_up_proj", "down_proj",
               "--max_steps", 1], sft_cache)
    assert "LoRA r=16 alpha=32 on no linear layer; parameters down_proj, gate_up_proj" in p.stderr
