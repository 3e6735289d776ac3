"""Loading the tokenizer (with the training chat template) and a pretrained model, and fitting the
model to them (positions, vocabulary, where generation stops)."""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import templates
from sftloop.common import REPO, first_line

log = logging.getLogger("sft")


def tokenizer_path(model_args) -> str:
    return model_args.tokenizer_name_or_path or model_args.model_name_or_path or str(REPO / "assets" / "tiny-qwen-tokenizer")


def load_tokenizer(model_args):
    path = tokenizer_path(model_args)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("Tokenizer has no pad token: padding with eos %r (padding is masked out, so this is safe)",
                 tokenizer.eos_token)
    for tok in templates.TEMPLATES[model_args.template].special_tokens:
        if tok not in tokenizer.get_vocab():
            raise SystemExit(f"error: --template {model_args.template} needs the token {tok!r}, which the tokenizer "
                             f"at {path} does not have; choose a template that matches the tokenizer")
    tokenizer.chat_template = templates.chat_template_for(model_args.template, tokenizer, model_args.system_prompt)
    return tokenizer


def end_of_turn_id(model_args, tokenizer) -> int:
    """The template's end-of-turn token, which generation and exact match stop at (said in the log)."""
    try:
        token = templates.end_of_turn(model_args.template, tokenizer)
    except (templates.DataError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    note = "" if token == tokenizer.eos_token else f" (not the tokenizer's eos {tokenizer.eos_token!r})"
    log.info("end of turn: %r%s; generation and exact match stop there", token, note)
    return tokenizer.convert_tokens_to_ids(token)


def load_pretrained(model_args):
    # weights only from safetensors: a pickle (.bin) can run code when loaded; the attention kernel is
    # set_attention's (the same for the built-in model)
    extra, dtype = {}, torch.float32
    if model_args.load_in_4bit:  # QLoRA: the base in 4-bit NF4, the rest (norms, LM head) in bf16
        extra["quantization_config"], dtype = quantization_config(), torch.bfloat16
    try:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype,
                                                    use_safetensors=True, trust_remote_code=model_args.trust_remote_code,
                                                    **extra)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load a model with safetensors weights from "
                         f"{model_args.model_name_or_path}: {first_line(e, 1000)}") from None


def set_attention(model, kernel: str | None) -> None:
    """--attn_implementation (eager, sdpa, flex_attention, flash_attention_2, ...), or the model's own
    choice with None; a kernel this machine lacks is one line naming it."""
    if kernel is None or kernel == model.config._attn_implementation:
        return
    try:
        model.set_attn_implementation(kernel)
    except (ImportError, ValueError) as e:
        raise SystemExit(f"error: --attn_implementation {kernel}: {first_line(e, 300)}") from None


def quantization_config():
    """QLoRA's recipe: NF4 weights, double quantization of their scales, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def fit_to_tokenizer(model, tokenizer, max_len: int, end_of_turn: int) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_len > positions:
        raise SystemExit(f"error: --max_len {max_len} is beyond the model's {positions} positions")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    # Generation must stop where training taught the model to stop (saved with the model, for chat.py too).
    model.generation_config.eos_token_id = end_of_turn
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def speed_up(model, args, device, engine: str) -> None:
    """--use_liger_kernel and --torch_compile, applied to the model in place (its parameters, and so
    its checkpoints, stay as they are)."""
    if args.use_liger_kernel:
        missing = [] if device.type == "cuda" else ["a CUDA GPU (its kernels are Triton), which this run has not"]
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError:
            missing.append("the liger-kernel package (pip install liger-kernel)")
        if missing:
            raise SystemExit(f"error: --use_liger_kernel needs {' and '.join(missing)}")
        # Its fused linear cross-entropy would replace the loop's one loss (token_loss, loss_weights): left out.
        _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    if args.torch_compile:
        if engine != "plain":
            raise SystemExit("error: --torch_compile is tested with one process and DDP only; launch without DeepSpeed "
                             "or FSDP to use it")
        # Each layer, not the whole model: the chunked loss path calls the decoder and the head apart,
        # and every layer shares one compiled graph.
        layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
        for block in layers if layers is not None else [model]:
            block.compile()
