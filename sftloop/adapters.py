"""LoRA (and DoRA, rsLoRA, QLoRA) adapters through peft: wrapping the model, saving an adapter that
is never empty, and merging it into the full-precision base weights, verified before it is written."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from sftloop import router
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
        if model_args.model_name_or_path and _experts_in(model_args):
            raise SystemExit(f"error: --load_in_4bit: {model_args.model_name_or_path} is a mixture-of-experts model, whose "
                             "experts transformers keeps as fused 3-D parameters, which bitsandbytes does not quantize: "
                             "most of the model would stay in 16 bits. Train LoRA on it without --load_in_4bit")
        if not torch.cuda.is_available():
            raise SystemExit("error: --load_in_4bit (QLoRA) needs a CUDA GPU and this machine has none; on a CPU, "
                             "train LoRA in full precision (--use_peft without --load_in_4bit)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit("error: --load_in_4bit needs the bitsandbytes package: pip install bitsandbytes") from None
        if model_args.model_name_or_path is None:
            raise SystemExit("error: --load_in_4bit quantizes a pretrained model: pass --model_name_or_path")


def _experts_in(model_args) -> int:
    """The expert count the model's config declares (0: not a mixture of experts), before it loads."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError):
        return 0  # the loading that follows says what is wrong with the path
    return router.expert_count(config)


def wrap(model, model_args, gradient_checkpointing: bool, base_path: str | None):
    """The model with a fresh LoRA adapter; only the adapter (and --lora_modules_to_save) trains."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if model_args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed layers need an input that requires grad
    targets = model_args.lora_target_modules
    # A mixture-of-experts model's experts are fused 3-D parameters (transformers 5), not linear layers:
    # peft reaches them as target_parameters, which all-linear adds by itself (with the router's weight).
    experts = fused_expert_parameters(model)
    fused = [t for t in targets if t in experts]
    modules = "all-linear" if targets == ["all-linear"] else [t for t in targets if t not in fused] or None
    dropout = model_args.lora_dropout
    if fused or (experts and modules == "all-linear"):  # peft's wrapper of a parameter takes no dropout
        if dropout:
            raise SystemExit(f"error: --lora_dropout {dropout}: LoRA on {type(model).__name__}'s fused expert weights "
                             f"({', '.join(sorted(experts))}) takes no dropout in peft; pass --lora_dropout 0 (the "
                             "default for such a model), or name only linear layers in --lora_target_modules")
        dropout = 0.0
    config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                        lora_dropout=0.05 if dropout is None else dropout,
                        target_modules=modules, target_parameters=fused or None,
                        modules_to_save=model_args.lora_modules_to_save, use_dora=model_args.use_dora,
                        use_rslora=model_args.use_rslora, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.peft_config["default"].base_model_name_or_path = base_path  # where chat.py and the merge find the base
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    adapted = model.peft_config["default"]
    parameters = f"; parameters {', '.join(sorted(adapted.target_parameters))}" if adapted.target_parameters else ""
    log.info("LoRA r=%d alpha=%d on %s%s: %.2fM trainable parameters of %.2fM (%.2f%%)", model_args.lora_r,
             model_args.lora_alpha, ", ".join(sorted(adapted.target_modules or [])) or "no linear layer", parameters,
             trainable / 1e6, total / 1e6, 100 * trainable / total)
    return model


def fused_expert_parameters(model) -> set[str]:
    """The names of a mixture-of-experts model's fused expert weights (3-D parameters, one slice per
    expert, such as gate_up_proj and down_proj), which LoRA reaches as parameters, not modules."""
    # (under ZeRO-3 a parameter may already be partitioned: DeepSpeed keeps its shape in ds_shape)
    return {name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if len(getattr(p, "ds_shape", p.shape)) == 3}


def check_targets(model, model_args) -> None:
    """Every module (or fused expert weight) the LoRA flags name exists in the model (else: say which
    ones do)."""
    targets, experts = model_args.lora_target_modules, fused_expert_parameters(model)
    named = [name for name, _ in model.named_modules() if name]
    for wanted in (targets if targets != ["all-linear"] else []) + (model_args.lora_modules_to_save or []):
        if not any(n == wanted or n.endswith("." + wanted) for n in named) and not (wanted in targets and wanted in experts):
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            also = f", its fused expert weights {', '.join(sorted(experts))}" if experts else ""
            flag = "--lora_target_modules" if wanted in targets else "--lora_modules_to_save"
            raise SystemExit(f"error: {flag} names {wanted!r}, which {type(model).__name__} does not have; its linear "
                             f"layers are {', '.join(linear)}{also} (or pass all-linear)")


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
