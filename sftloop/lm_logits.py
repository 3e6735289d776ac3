"""The model's logits at the target positions of a batch: all at once, or a chunk of tokens at a time.

Both come from the model's own forward, so whatever a model does after its LM head (Gemma 2's
final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling, the next architecture's
idea) and the precision it runs in (accelerate's autocast wraps that forward) are the same on both
paths. The loss itself is train_loop.token_loss; this module decides where logits come from (and
how large a chunk may be), and counts the target tokens.
"""

from __future__ import annotations

import inspect
import logging

import torch
from transformers.modeling_outputs import MoeModelOutputWithPast

from collate import collate, to_device
from sftloop import runtime
from sftloop.common import first_line
from templates import IGNORE_INDEX

log = logging.getLogger("sft")
# A packed batch's sample boundaries (collate_packed) go to the model with it: flash attention's
# variable-length kernel reads cu_seq_lens_* and max_length_*, the other kernels ignore them.
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k")


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: position t predicts a trained token (labels[t + 1] is not -100)."""
    where = torch.zeros_like(labels, dtype=torch.bool)
    where[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return where


def num_targets(labels: torch.Tensor) -> torch.Tensor:
    """The trained tokens, as a tensor on the labels' device (counting needs no wait for the host)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def targets_at(labels: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The trained next tokens, in the order of `where`'s True positions (row-major)."""
    return labels[:, 1:][where[:, :-1]]


def model_inputs(batch: dict, router_logits: list | None = None) -> dict:
    # No cache: training never needs one, and with a cache transformers does not look for packed
    # samples in the position_ids (their masks would then span the whole row).
    asked = {"output_router_logits": True} if router_logits is not None else {}
    return {**{k: batch[k] for k in MODEL_INPUTS if k in batch}, "use_cache": False, **asked}


def _routed(out, router_logits: list | None):
    """The model's output, its router logits (when asked for) added to router_logits."""
    if router_logits is not None:
        router_logits.extend(out.router_logits)
    return out


def all_at_once(model, batch: dict, where: torch.Tensor, router_logits: list | None = None) -> torch.Tensor:
    """[targets, vocab]: transformers' logits_to_keep with a boolean mask applies the LM head (and
    what follows it) to the target positions only, so no logits exist for prompts or padding.
    router_logits (a list): a mixture-of-experts model's router logits, one [tokens, experts] tensor
    per MoE layer, are added to it."""
    if "logits_to_keep" in inspect.signature(_forward_of(model)).parameters:
        out = model(**model_inputs(batch, router_logits), logits_to_keep=where)
        return _routed(out, router_logits).logits
    return _routed(model(**model_inputs(batch, router_logits)), router_logits).logits[where]  # no logits_to_keep


def chunk_by_chunk(model, head_model, batch: dict, where: torch.Tensor, chunk_size: int, loss_fn,
                   router_logits: list | None = None) -> torch.Tensor:
    """loss_fn(logits, targets) per target token, computing the logits chunk_size tokens at a time:
    only one chunk of logits exists at once, in forward and (recomputed) in backward.

    `model` is what the loop calls (the DDP/DeepSpeed wrapper); `head_model` is the HF model inside it;
    router_logits as in all_at_once."""
    # The model's forward once, asking for no logits at all: its final hidden states only.
    out = _routed(model(**model_inputs(batch, router_logits), logits_to_keep=torch.zeros_like(where),
                        output_hidden_states=True), router_logits)
    hidden = out.hidden_states[-1][where]  # the last entry is the final-normed state the head reads
    targets = targets_at(batch["labels"], where)
    if targets.numel() == 0:  # the empty logits keep the LM head in the graph (DDP expects every gradient)
        return loss_fn(out.logits.reshape(0, out.logits.shape[-1]), targets)
    del out

    def chunk_losses(h, t):
        return loss_fn(head_logits(head_model, h), t)

    losses = [torch.utils.checkpoint.checkpoint(chunk_losses, hidden[i:i + chunk_size], targets[i:i + chunk_size],
                                                use_reentrant=False)
              for i in range(0, targets.numel(), chunk_size)]
    return torch.cat(losses)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for final hidden states [n, hidden] -> [n, vocab]: its own forward, with
    the decoder stack standing in by `hidden`, so the LM head and every step after it run as in a
    plain forward (checked against one by `keeps_the_models_logits`)."""
    decoder = model.get_decoder()
    own = decoder.__dict__.get("forward")  # an instance-level forward (a hook's wrapper) to put back
    # (the MoE output type: what a dense model reads of its decoder's output, and router_logits too)
    decoder.forward = lambda *a, **k: MoeModelOutputWithPast(last_hidden_state=hidden[None])
    try:
        dummy = torch.zeros((1, hidden.shape[0]), dtype=torch.long, device=hidden.device)
        return model(input_ids=dummy, use_cache=False).logits[0]
    finally:
        if own is None:
            del decoder.forward
        else:
            decoder.forward = own


@torch.no_grad()
def keeps_the_models_logits(model, batch: dict) -> tuple[bool, float]:
    """Whether the chunked path gives the logits the model's own forward gives, on one batch."""
    was_training = model.training
    model.eval()
    try:
        where = target_positions(batch["labels"])
        plain = all_at_once(model, batch, where).float()
        hidden = model(**model_inputs(batch), output_hidden_states=True).hidden_states[-1][where]
        chunked = head_logits(model, hidden).float()
    except Exception as e:  # an architecture whose forward does not fit the pattern
        log.info("chunked logits: not possible for %s (%s)", type(model).__name__, first_line(e))
        return False, float("inf")
    finally:
        model.train(was_training)
    if plain.shape != chunked.shape:
        return False, float("inf")
    diff = (plain - chunked).abs().max().item() if plain.numel() else 0.0
    scale = plain.abs().max().item() if plain.numel() else 1.0
    return diff <= 1e-3 * max(scale, 1.0), diff


def chunk_size(model, args, sharded: bool, sample: dict, pad_id: int) -> int | None:
    """Tokens per chunk for the chunked path, or None for all at once (said once in the log).
    `sample` (a training sample) checks that chunking keeps this model's logits."""
    vocab = model.get_output_embeddings().out_features  # not the (possibly partitioned) weight's shape
    if args.chunked_ce == "false" or (args.chunked_ce == "auto" and vocab < 32_000):
        return None
    if sharded:
        log.info("chunked cross-entropy is off under ZeRO-3 and FSDP (the LM head is gathered only inside the model's "
                 "own forward); logits are computed for the target positions only")
        return None
    device = next(model.parameters()).device
    probe = to_device(collate([sample], pad_id=pad_id), device)
    same, diff = keeps_the_models_logits(model, probe)
    if not same:
        log.warning("chunked cross-entropy is off: for %s its logits differ from the model's own forward (max abs "
                    "difference %.3g); logits are computed for the target positions only", type(model).__name__, diff)
        return None
    size = args.ce_chunk_size or max(1, args.ce_chunk_mb * 2**20 // (vocab * 4 * 2))
    log.info("chunked cross-entropy: %d target tokens a chunk (vocabulary %d%s)", size, vocab,
             "" if args.ce_chunk_size else f", --ce_chunk_mb {args.ce_chunk_mb}")
    return size


def _forward_of(model):
    model = runtime.unwrapped(model)
    if hasattr(model, "get_base_model"):  # a peft model passes its arguments on to the HF model inside
        model = model.get_base_model()
    return model.forward
