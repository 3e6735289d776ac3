"""Whether packed samples stay apart in this model, decided before the first step (docs/training.md#packing).

collate_packed puts a micro-batch's samples one after the other, position_ids restarting with each,
and no attention mask; transformers then builds each attention layer's own mask (causal, sliding
window, chunked) within each sample, and flash attention takes the boundaries as cu_seq_lens. What
cannot keep samples apart that way is refused: a layer that carries state along the sequence
(linear attention, state-space and convolution layers), a kernel that does not take the
boundaries, and on a GPU a kernel that would need a dense [row x row] mask (`refusal`, read from the
model's config and modules). A model whose code builds its masks without the position_ids shows
only when it runs: `probe` runs it on samples packed into one row and on the same samples padded,
and compares each token's log-probability."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from collate import collate, collate_packed, to_device
from sftloop import runtime
from sftloop.common import first_line
from sftloop.lm_logits import model_inputs

log = logging.getLogger("sft")

# Layer types (config.layer_types) whose masks transformers builds within each sample from position_ids.
KEPT_APART = ("full_attention", "sliding_attention", "chunked_attention")
# Attention kernels that take the samples' boundaries: from position_ids (eager, sdpa, flex) or cu_seq_lens (flash).
KERNELS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
# The probe's samples and their length: a leak shows from a sample's first token, and the logits
# ([samples x tokens x vocabulary]) stay small.
PROBE_SAMPLES, PROBE_TOKENS = 4, 128


def gpu_kernel(asked: str | None, packing: bool, device) -> str | None:
    """The attention kernel to load: --attn_implementation, else for a packed run on a GPU one that
    takes the samples' boundaries without a dense mask (flash attention's variable-length kernel
    where the flash-attn package is installed, else flex attention's block-sparse mask)."""
    if asked or not packing or device.type != "cuda":
        return asked
    kernel = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"
    log.info("--packing on a GPU: attention by %s (it takes the packed samples' boundaries without a dense mask; "
             "--attn_implementation chooses another)", kernel)
    return kernel


def refusal(model, device_type: str) -> str | None:
    """Why packed samples would not stay apart in this model, read from its config and modules; None
    where they do (the probe then checks it by running the model)."""
    name, attn = type(model).__name__, model.config._attn_implementation or "eager"
    if attn not in KERNELS and "flash" not in attn:
        return f"attention kernel {attn} is not known to take packed samples' boundaries ({', '.join(KERNELS)} are)"
    if device_type == "cuda" and attn in ("sdpa", "eager"):
        return (f"{attn} attention keeps packed samples apart on a GPU only through a dense [row x row] mask per row "
                "(4 GiB at 32k tokens); pass --attn_implementation flex_attention, or flash_attention_2 with the "
                "flash-attn package")
    layers = decoder_layers(model)
    for i, kind in enumerate(getattr(model.config.get_text_config(), "layer_types", None) or []):
        if kind not in KEPT_APART:
            return (f"{name}'s layer {i} is {kind} ({mixer(layers, i)}): it carries its state from one sample into "
                    "the next in a packed row")
    for where, m in model.named_modules():
        if isinstance(m, torch.nn.Conv1d) and m.kernel_size[0] > 1 or isinstance(m, torch.nn.RNNBase):
            return (f"{name}'s {where} ({type(m).__name__}) mixes neighbouring tokens, across the boundary between "
                    "packed samples")
    return None


INSTEAD = "Train without --packing (--group_by_length keeps the padding low)"


def require_layers_apart(model, device_type: str) -> None:
    """Stop the run, before the data are read, where the model's layers or kernel would let packed
    samples see each other."""
    if why := refusal(model, device_type):
        raise SystemExit(f"error: --packing would not keep samples apart: {why}. {INSTEAD}")


def require_samples_apart(model, samples: list[dict], pad_id: int, device) -> Probe:
    """Stop the run, before the first step, where the probe finds packed samples seeing each other;
    else log what it measured and return it (--check reports it)."""
    probed = probe(model, samples, pad_id, device)
    if probed.leaks:
        raise SystemExit(f"error: --packing lets samples see each other in {type(runtime.unwrapped(model)).__name__}: "
                         f"{probed}. {INSTEAD}")
    log.info("--packing keeps samples apart: %s", probed)
    return probed


@dataclass
class Probe:
    """Samples packed into one row against the same samples padded, one per row: the largest
    difference of a token's log-probability of its next token."""
    max_diff: float   # over the samples after the first in the row
    noise: float      # over the row's first sample, which nothing precedes: the kernels' rounding alone
    tolerance: float  # max(a floor for the compute dtype, 4 x noise)
    samples: int
    tokens: int
    dtype: str
    layer: str = ""   # where a leak begins: the first decoder layer whose output differs
    error: str = ""   # the model's own refusal of the packed batch (its first line)

    @property
    def leaks(self) -> bool:
        return bool(self.error) or self.max_diff > self.tolerance

    def __str__(self) -> str:
        if self.error:
            return f"its forward refuses {self.samples} samples packed into one row: {self.error}"
        where = f"; it begins at {self.layer}" if self.layer else ""
        return (f"packed and unpacked log-probabilities of {self.samples} samples ({self.tokens} tokens, {self.dtype}) "
                f"differ by up to {self.max_diff:.2g} (tolerance {self.tolerance:.2g}; rounding alone "
                f"{self.noise:.2g}){where}")


@torch.no_grad()
def probe(model, samples: list[dict], pad_id: int, device) -> Probe:
    """Run the model on the first PROBE_SAMPLES samples (at least 2, each cut to PROBE_TOKENS) packed
    into one row and padded, and compare. Every process calls it with the same samples: under ZeRO-3
    each forward gathers the weights with the other processes."""
    hf = runtime.unwrapped(model)
    samples = samples * 2 if len(samples) == 1 else samples  # a corpus of one sample: packed with itself
    samples = sorted(({"input_ids": s["input_ids"][:PROBE_TOKENS], "labels": s["labels"][:PROBE_TOKENS]}
                      for s in samples[:PROBE_SAMPLES]), key=lambda s: -len(s["input_ids"]))  # the longest first: the rounding's gauge
    packed = to_device(collate_packed(samples, pad_id, one_row=True), device)
    padded = to_device(collate(samples, pad_id), device)
    was_training = hf.training
    hf.eval()
    try:
        lp_padded, dtype = _log_probs(hf, padded)
        dtype_name = str(dtype).split(".")[-1]
        try:
            lp_packed, _ = _log_probs(hf, packed)
        except (ValueError, RuntimeError, NotImplementedError) as e:  # e.g. a linear-attention layer without its kernels
            return Probe(float("inf"), 0.0, 0.0, len(samples), sum(len(s["input_ids"]) for s in samples), dtype_name,
                         error=first_line(e, 300))
        diffs, at = [], 0
        for k, s in enumerate(samples):
            n = len(s["input_ids"])
            diffs.append((lp_packed[0, at:at + n - 1] - lp_padded[k, :n - 1]).abs().max().item() if n > 1 else 0.0)
            at += n
        # fp32 rounding moves a log-probability by ~1e-6 here, 16-bit by ~0.1 (SmolLM2-135M, docs/training.md)
        floor = 2e-5 if dtype == torch.float32 else 5e-2
        result = Probe(max(diffs[1:]), diffs[0], max(floor, 4 * diffs[0]), len(samples), at, dtype_name)
        if result.leaks:
            result.layer = _first_differing_layer(hf, packed, padded, [len(s["input_ids"]) for s in samples], floor)
    finally:
        hf.train(was_training)
    return result


def _log_probs(model, batch: dict) -> tuple[torch.Tensor, torch.dtype]:
    """[rows, width - 1]: each position's log-probability of the next token in its row; the logits' dtype."""
    logits = model(**model_inputs(batch)).logits[:, :-1]
    picked = logits.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return picked.float() - logits.float().logsumexp(-1), logits.dtype


def _first_differing_layer(model, packed: dict, padded: dict, lengths: list[int], floor: float) -> str:
    """The first decoder layer whose output differs (relative to its scale) on the samples after the
    first, beyond what it differs on the first: where the leak begins."""
    hp = model(**model_inputs(packed), output_hidden_states=True).hidden_states
    hu = model(**model_inputs(padded), output_hidden_states=True).hidden_states
    layers = decoder_layers(model)
    for j in range(1, min(len(hp), len(layers) + 1)):
        rel, at = [], 0
        for k, n in enumerate(lengths):
            alone = hu[j][k, :n].float()
            rel.append(((hp[j][0, at:at + n].float() - alone).abs().max() / alone.abs().max().clamp(min=1e-6)).item())
            at += n
        if max(rel[1:]) > max(floor, 4 * rel[0]):
            return f"layer {j - 1} ({mixer(layers, j - 1)})"
    return ""


def decoder_layers(model) -> list:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model
    layers = getattr(base.get_decoder(), "layers", None) if hasattr(base, "get_decoder") else None
    return list(layers) if layers is not None else []


def mixer(layers: list, i: int) -> str:
    """What mixes tokens in decoder layer i: its attention (or linear attention, state-space,
    convolution) module's name and class, with the layer type where the config gives one."""
    if i >= len(layers):
        return "?"
    layer = layers[i]
    kind = getattr(layer, "layer_type", None) or getattr(getattr(layer, "self_attn", None), "layer_type", None)
    parts = [f"{n}: {type(m).__name__}" for n, m in layer.named_children()
             if any(w in n.lower() for w in ("attn", "attention", "mixer", "mamba", "conv", "recurrent", "linear"))
             and "norm" not in n.lower()]
    return ", ".join(([kind] if kind else []) + (parts or [type(layer).__name__]))
