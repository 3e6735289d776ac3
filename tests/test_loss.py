"""One loss path: token_loss and loss_weights run on every path (plain, chunked, packed, evaluation),
and the chunked path gives the logits the model's own forward gives, post-processing and precision
included, for architectures that change their logits after the LM head."""

import logging

import pytest
import torch
import torch.nn.functional as F
import transformers

from sftloop import lm_logits
import train_loop
from collate import collate
from helpers import REPO, metrics, train

VOCAB = 151936  # Qwen2.5's


def small(kind, seed=0):
    """Tiny random models of architectures that do something after their LM head."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if kind == "gemma2":  # final_logit_softcapping: tanh after the head
        cfg = transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=3.0, attn_logit_softcapping=50.0)
        cfg._attn_implementation = "eager"
        return transformers.Gemma2ForCausalLM(cfg)
    if kind == "cohere":  # logit_scale: logits multiplied after the head
        return transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.125))
    if kind == "granite":  # logits_scaling: logits divided after the head
        return transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, logits_scaling=8.0))
    if kind == "qwen3-moe":  # a mixture of experts: fused experts and a router in every layer
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**common, num_experts=8, num_experts_per_tok=2,
                                                                            moe_intermediate_size=32))
    raise ValueError(kind)


@pytest.fixture(scope="module")
def batch(samples, qwen_tok):
    return collate(samples, pad_id=qwen_tok.pad_token_id)


def loss_and_grads(kind, batch, chunk):
    model = small(kind)
    loss = train_loop.batch_loss(model, batch, chunk).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_loss(kind, batch):
    """What the model's own full forward gives: every logit, then cross-entropy over the targets."""
    with torch.no_grad():
        logits = small(kind)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def assert_same(a, b):
    (loss_a, g_a), (loss_b, g_b) = a, b
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for k in g_a:
        torch.testing.assert_close(g_b[k], g_a[k], rtol=1e-4, atol=1e-6 * g_a[k].abs().max().item())


@pytest.mark.parametrize("kind", ["llama", *(pytest.param(k, marks=pytest.mark.slow)
                                              for k in ("gemma2", "cohere", "granite", "qwen3-moe"))])
def test_chunked_loss_and_gradients_equal_the_plain_ones(kind, batch):
    plain = loss_and_grads(kind, batch, None)
    assert plain[0].item() == pytest.approx(reference_loss(kind, batch).item(), rel=1e-5)
    assert_same(plain, loss_and_grads(kind, batch, 37))  # a chunk size that does not divide the targets
    model = small(kind)  # the model is whole afterwards: its forward gives logits
    assert model(input_ids=batch["input_ids"][:1, :4]).logits.shape[-1] == VOCAB


def down_weight_first_reply(batch, where):
    """The README's recipe: the first reply of each conversation counts half."""
    starts = where & ~torch.nn.functional.pad(where, (1, 0))[:, :-1]  # first position of each reply
    reply = starts.cumsum(dim=1)  # 1 in the first reply, 2 in the second, ...
    return torch.where(reply == 1, 0.5, 1.0)[where]


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_a_custom_weighted_loss_holds_on_the_plain_and_the_chunked_path(kind, batch, monkeypatch):
    unweighted = loss_and_grads(kind, batch, None)
    monkeypatch.setattr(train_loop, "loss_weights", down_weight_first_reply)
    weighted = loss_and_grads(kind, batch, None)
    assert weighted[0].item() < 0.95 * unweighted[0].item()
    assert_same(weighted, loss_and_grads(kind, batch, 37))


def z_loss(logits, targets):
    """Cross-entropy plus PaLM's z-loss, which keeps the softmax normaliser near 1."""
    logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="none") + 1e-2 * torch.logsumexp(logits, dim=-1) ** 2


def test_a_custom_token_loss_holds_on_both_paths(batch, monkeypatch):
    """Editing token_loss (here: adding a z-loss) changes plain and chunked runs alike."""
    plain = loss_and_grads("llama", batch, None)
    monkeypatch.setattr(train_loop, "token_loss", z_loss)
    with_z = loss_and_grads("llama", batch, None)
    assert with_z[0].item() > plain[0].item() + 100  # about 1.4 more per target token
    assert_same(with_z, loss_and_grads("llama", batch, 37))


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_both_paths_run_the_head_in_the_same_precision_under_bf16_autocast(kind, batch):
    """accelerate's autocast wraps the model's forward; both paths go through it, so both compute the
    logits in bf16 (a head in fp32 on one path would differ by far more than this)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        results = {}
        for chunk in (None, 37):
            model = accelerator.prepare(small(kind))
            with torch.no_grad():
                results[chunk] = train_loop.batch_loss(model, batch, chunk).sum().item()
    finally:
        AcceleratorState._reset_state(True)
    fp32 = train_loop.batch_loss(small(kind), batch, None).sum().item()
    assert results[37] == pytest.approx(results[None], rel=1e-5)
    assert abs(results[None] - fp32) > 20 * abs(results[37] - results[None])  # bf16 really was in use


class ChunkArgs:
    chunked_ce, ce_chunk_mb, ce_chunk_size = "auto", 1024, None


def test_chunk_size_comes_from_a_memory_budget(samples, caplog):
    caplog.set_level(logging.INFO, logger="sft")
    size = lm_logits.chunk_size(small("gemma2"), ChunkArgs, sharded=False, sample=samples[0], pad_id=0)
    assert size == 1024 * 2**20 // (VOCAB * 8)  # fp32 logits and their gradient in 1 GiB
    assert "chunked cross-entropy: 883 target tokens a chunk" in caplog.text


def test_a_model_whose_chunked_logits_would_differ_is_not_chunked(samples, caplog, monkeypatch):
    """Were the head applied without what the model does after it (softcapping), the check at start
    catches it and the loop computes the logits whole, saying so once."""
    caplog.set_level(logging.INFO, logger="sft")
    monkeypatch.setattr(lm_logits, "head_logits", lambda model, hidden: model.get_output_embeddings()(hidden))
    assert lm_logits.chunk_size(small("gemma2"), ChunkArgs, sharded=False, sample=samples[0], pad_id=0) is None
    assert "chunked cross-entropy is off: for Gemma2ForCausalLM its logits differ" in caplog.text
    assert lm_logits.chunk_size(small("llama"), ChunkArgs, sharded=False, sample=samples[0], pad_id=0) == 883  # no post-processing


def test_a_gemma2_run_logs_the_same_loss_chunked_or_not(tmp_path, sft_cache, qwen_tokenizer_dir):
    """The issue's measurement: Gemma 2 with softcapping on Qwen's vocabulary, one step of 8
    conversations. Also: Gemma 2 loads with its own attention (eager), no flag needed."""
    model_dir = tmp_path / "gemma2"
    small("gemma2").save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("".join((REPO / "data" / "sample_belle_eval.jsonl").read_text().splitlines(keepends=True)[:8]))
    out = {}
    for chunked in ("false", "true"):
        out[chunked] = tmp_path / chunked
        train(["--output_dir", out[chunked], "--model_name_or_path", model_dir, "--tokenizer_name_or_path",
               qwen_tokenizer_dir, "--max_steps", 1, "--chunked_ce", chunked, "--train_files", data,
               "--validation_files", data], sft_cache)
    for key in ("loss", "eval_loss"):
        a = [m[key] for m in metrics(out["false"]) if key in m]
        b = [m[key] for m in metrics(out["true"]) if key in m]
        assert len(a) >= 1 and b == pytest.approx(a, rel=1e-5), key
