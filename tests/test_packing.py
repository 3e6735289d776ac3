"""--packing is exact on every architecture it allows and refused on the others (sftloop/packing.py).

Tiny random models of the architectures people fine-tune, their samples longer than the sliding
window or attention chunk: each token's log-probability of its next token, packed as collate_packed
packs (rows, restarting positions, padding, no mask) equals the sample's alone, under eager, sdpa
and flex attention; the loss and every gradient equal the padded batch's (eager and sdpa: flex
attention has no backward on CPU). The architectures that would let samples see each other are
refused: by their config or modules, and by the probe that runs the model, which alone finds
gpt-oss's leak."""

import pytest
import torch
import transformers as T

import train_loop
from collate import collate, collate_packed, pack_rows, packs_into_one_row
from helpers import TINY_TOKENIZER, max_diff, random_samples, tiny_model_dir, train, weights
from sftloop import packing

WINDOW = 8  # sliding window and attention chunk, in tokens: every sample below is longer
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

ALLOWED = {
    "qwen2.5": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**COMMON)),
    "llama3": lambda: T.LlamaForCausalLM(T.LlamaConfig(**COMMON, rope_theta=500000.0)),
    "mistral (sliding window)": lambda: T.MistralForCausalLM(T.MistralConfig(**COMMON, sliding_window=WINDOW)),
    "gemma2 (sliding + full)": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**COMMON, sliding_window=WINDOW)),
    "gemma3 (sliding + full)": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, sliding_window=WINDOW, sliding_window_pattern=2)),
    "qwen3-moe": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                                                 moe_intermediate_size=32)),
    "llama4 (chunked attention)": lambda: T.Llama4ForCausalLM(T.Llama4TextConfig(
        **COMMON, attention_chunk_size=WINDOW, intermediate_size_mlp=128, num_local_experts=2)),
}
REFUSED = {  # what the refusal names (None: nothing in the config or modules shows it; the probe finds it)
    "qwen3.5 (gated deltanet + full)": (lambda: T.Qwen3_5ForCausalLM(T.Qwen3_5TextConfig(
        **{**COMMON, "num_hidden_layers": 4}, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, full_attention_interval=2)), "layer 0 is linear_attention (linear_attn: Qwen3_5GatedDeltaNet)"),
    "mamba": (lambda: T.MambaForCausalLM(T.MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8)),
              "layer 0 is linear_attention (mixer: MambaMixer)"),
    "lfm2 (short convolution)": (lambda: T.Lfm2ForCausalLM(T.Lfm2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["conv", "full_attention"])), "layer 0 is conv (conv: Lfm2ShortConv)"),
    # gpt-oss (5.24) builds its masks without the position_ids: its sliding and full layers span the row
    "gpt-oss": (lambda: T.GptOssForCausalLM(T.GptOssConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                           sliding_window=WINDOW)), None),
}
# Every allowed architecture under eager and sdpa (Gemma 2's logit softcapping has no sdpa kernel in
# transformers), and flex attention on Gemma 3, whose sliding and full layers hold both kinds of mask:
# on a CPU flex attention is compiled first (about 30 s), for each new mask again.
GRADIENT_CASES = [(a, k) for a in ALLOWED for k in ("eager", "sdpa") if (a, k) != ("gemma2 (sliding + full)", "sdpa")]
LOG_PROB_CASES = GRADIENT_CASES + [pytest.param("gemma3 (sliding + full)", "flex_attention", marks=pytest.mark.slow)]


def model_of(build, attn="sdpa"):
    torch.manual_seed(0)
    model = build().float()
    model.config._attn_implementation = attn
    return model


def samples(lengths=(40, 30, 13, 3), seed=1):
    return random_samples(lengths, seed)


def next_token_log_probs(model, batch):
    with torch.no_grad():
        lp = model(**{k: batch[k] for k in batch if k not in ("labels", "real_tokens")}, use_cache=False).logits.log_softmax(-1)
    return lp[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0]


@pytest.mark.parametrize("arch, attn", LOG_PROB_CASES)
def test_each_tokens_log_probability_packed_equals_the_sample_alone(arch, attn):
    model = model_of(ALLOWED[arch], attn).eval()
    s, one_row = samples(), packs_into_one_row(attn)
    packed = collate_packed(s, pad_id=0, one_row=one_row, pad_to_multiple_of=16)
    lengths = [len(x["input_ids"]) for x in s]
    if not one_row:  # sdpa and eager: rows as wide as the longest sample (40: 48 with the padding), [40] [30 3] [13]
        assert packed["input_ids"].shape == (3, 48)
    lp = next_token_log_probs(model, packed)
    model.config._attn_implementation = "eager"  # the reference: each sample alone, unpadded, needs no mask at all
    width = packed["input_ids"].shape[1]
    for r, row in enumerate(pack_rows(lengths, None if one_row else max(lengths))):
        at = 0
        for i in row:
            n = len(s[i]["input_ids"])
            alone = next_token_log_probs(model, {"input_ids": torch.tensor([s[i]["input_ids"]])})[0]
            assert (lp[r, at:at + n - 1] - alone).abs().max() < 1e-5, (arch, attn, i)
            at += n
        assert at <= width


@pytest.mark.parametrize("arch, attn", GRADIENT_CASES)
def test_packed_loss_and_gradients_equal_the_padded_batchs(arch, attn):
    """Through the loop's own loss (train_loop.batch_loss: what every step calls); the refusal and the
    probe let the model pack."""
    s = samples()
    results = []
    for batch in (collate(s, pad_id=0), collate_packed(s, pad_id=0, one_row=packs_into_one_row(attn))):
        model = model_of(ALLOWED[arch], attn)
        loss = train_loop.batch_loss(model, batch).sum()
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (padded, g_padded), (packed, g_packed) = results
    assert packing.refusal(model, "cpu") is None and not packing.probe(model, s, 0, torch.device("cpu")).leaks
    assert packed == pytest.approx(padded, rel=1e-5)
    assert g_packed.keys() == g_padded.keys()
    for name in g_padded:  # to 1e-5 of each gradient's scale (float rounding is ~1e-7 of it)
        scale = g_padded[name].abs().max()
        assert (g_packed[name] - g_padded[name]).abs().max() <= 1e-5 * scale, (arch, attn, name)


@pytest.mark.parametrize("arch", REFUSED)
def test_architectures_that_would_leak_are_refused_by_their_layers_or_by_the_probe(arch):
    build, named = REFUSED[arch]
    model = model_of(build)
    why = packing.refusal(model, "cpu")
    assert (why is None) if named is None else (named in why)
    # The probe finds every one of them by running the model, and names where the leak begins.
    probed = packing.probe(model, samples(), 0, torch.device("cpu"))
    assert probed.leaks
    assert probed.error or "it begins at layer 0" in str(probed)


@pytest.mark.slow
def test_the_probe_tolerates_bf16_rounding_but_not_a_leak(smollm2_dir, monkeypatch):
    """A real pretrained model in bf16: packed and unpacked log-probabilities differ by rounding (up
    to ~0.1), which the probe measures on the row's first sample and tolerates; positions that run on
    across samples (a model that ignores the boundaries) move them by nats, which it does not."""
    model = T.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    tok = T.AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["The capital of France is Paris. It is known for the Eiffel Tower and for its food. " * 2,
             "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n", "Hello, how are you today?"]
    s = [{"input_ids": tok(t)["input_ids"], "labels": tok(t)["input_ids"]} for t in texts]
    probed = packing.probe(model, s, tok.pad_token_id, torch.device("cpu"))
    assert probed.dtype == "bfloat16" and not probed.leaks and 0 < probed.noise < probed.tolerance < 1

    def positions_run_on(*a, **k):  # samples in one row as one sequence: what a model blind to boundaries sees
        batch = collate_packed(*a, **k)
        return {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}

    monkeypatch.setattr(packing, "collate_packed", positions_run_on)
    probed = packing.probe(model, s, tok.pad_token_id, torch.device("cpu"))
    assert probed.leaks and probed.max_diff > 1.0


TINY = ["--tokenizer_name_or_path", TINY_TOKENIZER, "--max_len", 128, "--eval_steps", 0, "--max_eval_generations", 0]


def test_the_loop_trains_gemma3_packed_as_unpacked(tmp_path, sft_cache):
    """Gemma 3 with a window of 16 tokens, shorter than most samples: with the old block mask its
    packed run's weights differed from the unpacked run's by 118% of the change (issue #30)."""
    config = T.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 3, "max_position_embeddings": 512},
                                sliding_window=16, sliding_window_pattern=2)
    model_dir = tiny_model_dir(tmp_path, lambda: T.Gemma3ForCausalLM(config))
    args = ["--model_name_or_path", model_dir, *TINY, "--max_steps", 2, "--per_device_train_batch_size", 24,
            "--optim", "sgd", "--learning_rate", 1.0, "--lr_scheduler_type", "constant", "--warmup_steps", 0]
    train(["--output_dir", tmp_path / "plain", *args], sft_cache)
    p = train(["--output_dir", tmp_path / "packed", *args, "--packing"], sft_cache)
    assert "--packing keeps samples apart" in p.stderr
    start = T.AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    plain, packed = weights(tmp_path / "plain"), weights(tmp_path / "packed")
    change = max_diff(plain, {k: start[k] for k in plain})
    assert change > 1e-2 and max_diff(packed, plain) < 1e-4 * change, (change, max_diff(packed, plain))


@pytest.mark.parametrize("arch, said", [("qwen3.5 (gated deltanet + full)", "Qwen3_5ForCausalLM's layer 0 is linear_attention"),
                                        ("gpt-oss", "lets samples see each other in GptOssForCausalLM")])
def test_the_loop_refuses_packing_a_model_that_would_leak_in_one_line(tmp_path, sft_cache, arch, said):
    model_dir = tiny_model_dir(tmp_path, REFUSED[arch][0])
    p = train(["--output_dir", tmp_path / "o", "--model_name_or_path", model_dir, *TINY, "--max_steps", 1, "--packing"],
              sft_cache, check=False)
    assert p.returncode == 1 and said in p.stderr and "--group_by_length" in p.stderr
    assert "step 1" not in p.stderr and not (tmp_path / "o" / "metrics.jsonl").exists()


def test_the_check_reports_a_leak_as_fatal_naming_the_architecture_and_the_layer(tmp_path, sft_cache):
    """--check on gpt-oss with --packing: the run's own refusal, with the probe's difference and the
    first layer where samples meet, is a fatal finding."""
    import json

    model_dir = tiny_model_dir(tmp_path, REFUSED["gpt-oss"][0])
    p = train(["--output_dir", tmp_path / "o", "--model_name_or_path", model_dir, *TINY, "--packing", "--check"],
              sft_cache, check=False)
    report = json.loads((tmp_path / "o" / "check.json").read_text())
    fatal = [f["text"] for f in report["findings"] if f["level"] == "fatal"]
    assert p.returncode == 1 and len(fatal) == 1
    assert "GptOssForCausalLM" in fatal[0] and "it begins at layer 0 (sliding_attention" in fatal[0]


def test_a_resume_that_turns_packing_on_or_off_is_refused(tmp_path, sft_cache):
    run = ["--output_dir", tmp_path / "o", "--save_steps", 1, "--eval_steps", 0, "--per_device_train_batch_size", 4]
    train([*run, "--max_steps", 2, "--packing"], sft_cache)
    resume = [*run, "--max_steps", 3, "--resume_from_checkpoint", "true"]
    p = train(resume, sft_cache, check=False)
    assert p.returncode == 1 and "--group_by_length, --packing or the batch order code" in p.stderr
    train([*resume, "--packing"], sft_cache)  # as it was trained: it goes on


def test_a_kernel_that_is_not_installed_is_one_line(tmp_path, sft_cache):
    p = train(["--output_dir", tmp_path / "o", "--max_steps", 1, "--attn_implementation", "flash_attention_2"],
              sft_cache, check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("error: --attn_implementation flash_attention_2: FlashAttention2")


def test_on_a_gpu_packing_takes_a_kernel_without_a_dense_mask():
    """The choice, read without a GPU: --attn_implementation wins; a packed run on CUDA gets flash
    attention where flash-attn is installed, else flex attention; sdpa and eager there are refused."""
    import importlib.util

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    flash = importlib.util.find_spec("flash_attn") is not None
    assert packing.gpu_kernel(None, True, cuda) == ("flash_attention_2" if flash else "flex_attention")
    assert packing.gpu_kernel("sdpa", True, cuda) == "sdpa" and packing.gpu_kernel(None, True, cpu) is None
    assert packing.gpu_kernel(None, False, cuda) is None
    model = model_of(ALLOWED["qwen2.5"], "sdpa")
    assert "dense [row x row] mask" in packing.refusal(model, "cuda") and packing.refusal(model, "cpu") is None
    model.config._attn_implementation = "flex_attention"
    assert packing.refusal(model, "cuda") is None
    model.config._attn_implementation = "paged|sdpa"
    assert "not known to take packed samples' boundaries" in packing.refusal(model, "cpu")
