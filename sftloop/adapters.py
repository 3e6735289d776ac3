"""LoRA (and DoRA, rsLoRA, QLoRA) adapters through peft: wrapping the model, saving an adapter that
is never empty, and merging it into the full-precision base weights, verified before it is written."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from sftloop.common import first_line

log = logging.getLogger("sft")
ADAPTER_FILE = "adapter_model.safetensors"


def check_flags(model_args) -> None:
    """Before anything loads: the packages and hardware the LoRA flags need."""
    if model_args.load_in_4bit and not model_args.use_peft:
        raise SystemExit("error: --load_in_4bit (QLoRA) trains an adapter on a 4-bit base: pass --use_peft too")
    if model_args.use_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise SystemExit("error: --use_peft needs the peft package: pip install peft") from None
    if model_args.load_in_4bit:
        if not torch.cuda.is_available():
            raise SystemExit("error: --load_in_4bit (QLoRA) needs a CUDA GPU and this machine has none; on a CPU, "
                             "train LoRA in full precision (--use_peft without --load_in_4bit)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit("error: --load_in_4bit needs the bitsandbytes package: pip install bitsandbytes") from None
        if model_args.model_name_or_path is None:
            raise SystemExit("error: --load_in_4bit quantizes a pretrained model: pass --model_name_or_path")


def wrap(model, model_args, gradient_checkpointing: bool, base_path: str | None):
    """The model with a fresh LoRA adapter; only the adapter (and --lora_modules_to_save) trains."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if model_args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed layers need an input that requires grad
    targets = model_args.lora_target_modules
    config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets,
                        modules_to_save=model_args.lora_modules_to_save, use_dora=model_args.use_dora,
                        use_rslora=model_args.use_rslora, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.peft_config["default"].base_model_name_or_path = base_path  # where chat.py and the merge find the base
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d alpha=%d on %s: %.2fM trainable parameters of %.2fM (%.2f%%)", model_args.lora_r,
             model_args.lora_alpha, ", ".join(sorted(model.peft_config["default"].target_modules)), trainable / 1e6,
             total / 1e6, 100 * trainable / total)
    return model


def check_targets(model, model_args) -> None:
    """Every module the LoRA flags name exists in the model (else: say which ones do)."""
    targets = model_args.lora_target_modules
    named = [name for name, _ in model.named_modules() if name]
    for wanted in (targets if targets != ["all-linear"] else []) + (model_args.lora_modules_to_save or []):
        if not any(n == wanted or n.endswith("." + wanted) for n in named):
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            flag = "--lora_target_modules" if wanted in targets else "--lora_modules_to_save"
            raise SystemExit(f"error: {flag} names {wanted!r}, which {type(model).__name__} does not have; its linear "
                             f"layers are {', '.join(linear)} (or pass all-linear)")


def is_adapter(model) -> bool:
    return hasattr(model, "peft_config")


def check_saved(directory: Path) -> None:
    """The adapter just written (adapter_model.safetensors + adapter_config.json, from the gathered
    state dict) is non-empty, before the checkpoint can be marked complete."""
    saved = load_file(str(directory / ADAPTER_FILE))
    empty = [k for k, v in saved.items() if v.numel() == 0]
    if not saved or empty:
        raise SystemExit(f"error: the adapter written to {directory} is empty ({len(saved)} tensors, empty: "
                         f"{empty[:3]}); the run stops before marking it complete")


def merge(adapter_dir: Path, tokenizer, batches: list[dict], checked_on: str, tolerance: float = 1e-4):
    """The adapter merged into its base model reloaded in fp32 (for QLoRA: the unquantized weights),
    if its logits on `batches` (`checked_on` says which samples, for the log) equal the adapter
    model's within tolerance x the largest logit; else None, with a warning."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_path = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"error: cannot merge the adapter in {adapter_dir}: its base model {base_path!r} cannot be "
                         f"loaded ({first_line(e)}); the adapter itself is saved") from None
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    inputs = [{k: b[k].cpu() for k in ("input_ids", "attention_mask") if k in b} for b in batches]
    with torch.no_grad():
        before = [model(**b).logits for b in inputs]
        merged = model.merge_and_unload()
        after = [merged(**b).logits for b in inputs]
    diff = max(((a - b).abs().max().item() for a, b in zip(before, after)), default=0.0)
    scale = max((a.abs().max().item() for a in before), default=1.0)
    if diff > tolerance * max(scale, 1.0):
        log.warning("the merged model's logits differ from the adapter's by %.3g (tolerance %.3g): not writing it; "
                    "the adapter is in the output directory", diff, tolerance * max(scale, 1.0))
        return None
    log.info("merged model verified: logits within %.2g of the adapter model's on %s", diff, checked_on)
    return merged
