"""Supervised fine-tuning of a causal LM, as one explicit loop on accelerate (+ DeepSpeed).

    python train_loop.py                      # one process; set breakpoints anywhere
    accelerate launch train_loop.py ...       # DDP or DeepSpeed, as the accelerate config says
    python train_loop.py my_run.yaml [--flag value ...]   # flags from a YAML/JSON file, CLI overrides

With no arguments it fine-tunes a tiny Qwen2-architecture model on data/sample_belle.jsonl.
Read it top to bottom: arguments, setup, data, model, optimizer, then the loop.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

import generate
import plot_metrics
import sft_data
import templates
from collate import collate, collate_packed
from templates import IGNORE_INDEX

REPO = Path(__file__).resolve().parent
log = logging.getLogger("sft")


# =============================================================================================
# Arguments (names as in transformers.TrainingArguments where one exists)
# =============================================================================================

@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "HF model directory or hub id; default: a tiny Qwen2 model built from a config (random init)"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "default: the model's; for the tiny model, assets/tiny-qwen-tokenizer"})
    template: str = field(default="qwen2.5", metadata={
        "help": "chat template: qwen2.5 | llama3 | tokenizer (the one the tokenizer carries)"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "system prompt for conversations without one (default: the template's own, if any)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run code shipped with the model"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager | sdpa | flash_attention_2"})


@dataclass
class DataArguments:
    train_files: list[str] = field(default_factory=lambda: [str(REPO / "data" / "sample_belle.jsonl")], metadata={
        "help": "one or more .json/.jsonl/.parquet files"})
    validation_files: list[str] | None = field(default=None, metadata={
        "help": "held-out data, evaluated every --eval_steps and at the end (default run: data/sample_belle_eval.jsonl)"})
    validation_split_percentage: float = field(default=0.0, metadata={
        "help": "hold out this percentage of the training samples as validation data instead"})
    max_len: int = field(default=2048, metadata={"help": "truncate samples to this many tokens (keeps the start)"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for tokenization"})
    preprocessing_cache_dir: str | None = field(default=None, metadata={
        "help": "where tokenized data is cached (default: $SFT_CACHE or ~/.cache/sft-loop)"})
    skip_invalid_samples: bool = field(default=False, metadata={"help": "skip bad records instead of stopping"})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "pad batch width to a multiple (8 on GPUs)"})
    group_by_length: bool = field(default=False, metadata={
        "help": "put samples of similar length in the same step (within a shuffled window), so padding nearly vanishes"})
    packing: bool = field(default=False, metadata={
        "help": "pack the samples of each micro-batch into rows of up to --max_len tokens; attention stays within samples"})


@dataclass
class TrainArguments:
    output_dir: str = "output"
    overwrite_output_dir: bool = False
    per_device_train_batch_size: int | None = field(default=None, metadata={
        "help": "default: 8, or 32 for the built-in tiny model"})
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = field(default=None, metadata={
        "help": "default: 3e-3 for the built-in tiny model, 2e-5 for a pretrained one"})
    optim: str = field(default="adamw_torch", metadata={"help": "adamw_torch | sgd (plain SGD: linear, for exactness checks)"})
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    # 0.95 as in nanoGPT and the Llama/Qwen pretraining recipes: Adam's second moment forgets old
    # gradients sooner, which keeps steps stable when the gradient scale changes (and the tiny model
    # forms its copying circuit in markedly fewer steps than with transformers' 0.999).
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm; 0 turns it off"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "linear | cosine | constant"})
    # A short warmup by default: Adam's first updates rest on moment estimates from few gradients.
    warmup_ratio: float = 0.03
    warmup_steps: int = field(default=0, metadata={"help": "overrides warmup_ratio when > 0"})
    num_train_epochs: float = 3.0
    max_steps: int = field(default=-1, metadata={"help": "overrides num_train_epochs when > 0"})
    seed: int = 42
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision; default: as the accelerate config says, else on where the GPU has it"})
    gradient_checkpointing: bool = False
    chunked_ce: str = field(default="auto", metadata={
        "help": "compute the LM head and cross-entropy in chunks of tokens, so the full [tokens x vocab] logits never "
                "exist: auto (on for vocabularies of 32k+), true, false"})
    ce_chunk_size: int = field(default=2048, metadata={"help": "tokens per chunk for --chunked_ce"})
    logging_steps: int = 1
    eval_steps: int | None = field(default=None, metadata={"help": "evaluate every N steps (default: --save_steps)"})
    max_eval_generations: int = field(default=100, metadata={
        "help": "held-out exact match: greedy replies to the last turn of up to N validation samples (0: off)"})
    sample_prompts: str | None = field(default=None, metadata={
        "help": "file of prompts (.txt lines, or conversations) to print replies for at each evaluation; "
                "default: the first validation samples"})
    num_sample_prompts: int = 3
    max_new_tokens: int = field(default=64, metadata={"help": "length bound for generations during training"})
    report_to: str = field(default="jsonl", metadata={
        "help": "tensorboard | wandb | jsonl | none (output_dir/metrics.jsonl is always written)"})
    plot: bool = field(default=True, metadata={"help": "draw output_dir/metrics.png at the end"})
    save_steps: int = field(default=0, metadata={"help": "save a checkpoint every N optimizer steps (0: only at the end)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "a checkpoint directory, or 'true' for the latest in output_dir"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "0 keeps data loading in this process (debuggable)"})
    save_total_limit: int | None = field(default=None, metadata={"help": "keep only the last K checkpoints"})
    skip_nonfinite_steps: bool = field(default=False, metadata={
        "help": "skip an optimizer step whose loss or gradient norm is NaN/inf instead of stopping"})
    log_sample_ids: bool = field(default=False, metadata={
        "help": "append the ids (row numbers in the training files) of each step's samples to output_dir/sample_ids.jsonl"})


def config_file_args(path: str) -> list[str]:
    """A YAML/JSON config file as command-line arguments, so flags given after it override it."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: config file {path} not found")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        cfg = yaml.safe_load(p.read_text())
    else:
        cfg = json.loads(p.read_text())
    if not isinstance(cfg, dict):
        raise SystemExit(f"error: {path} must hold a mapping of flag names to values")
    args = []
    for k, v in cfg.items():
        if v is None:
            continue
        args.append(f"--{k}")
        args.extend(str(x) for x in v) if isinstance(v, list) else args.append(str(v))
    return args


def parse_args(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = config_file_args(argv[0]) + argv[1:]
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    if args.optim not in ("adamw_torch", "sgd"):
        parser.error(f"--optim must be adamw_torch or sgd, not {args.optim!r}")
    if args.lr_scheduler_type not in ("linear", "cosine", "constant"):
        parser.error(f"--lr_scheduler_type must be linear, cosine or constant, not {args.lr_scheduler_type!r}")
    if model_args.template not in templates.TEMPLATES:
        parser.error(f"--template must be one of {templates.TEMPLATES}, not {model_args.template!r}")
    tiny = model_args.model_name_or_path is None
    # The built-in tiny model learns the sample tasks from 50,000 to 80,000 samples seen; a bigger batch
    # costs a CPU less per sample than more steps do.
    if args.per_device_train_batch_size is None:
        args.per_device_train_batch_size = 32 if tiny else 8
    if args.learning_rate is None:
        args.learning_rate = 3e-3 if tiny else 2e-5
    for name, value in [("per_device_train_batch_size", args.per_device_train_batch_size),
                        ("per_device_eval_batch_size", args.per_device_eval_batch_size),
                        ("gradient_accumulation_steps", args.gradient_accumulation_steps), ("max_len", data_args.max_len)]:
        if value < 1:
            parser.error(f"--{name} must be at least 1")
    if args.chunked_ce not in ("auto", "true", "false"):
        parser.error(f"--chunked_ce must be auto, true or false, not {args.chunked_ce!r}")
    if args.report_to not in ("tensorboard", "wandb", "jsonl", "none"):
        parser.error(f"--report_to must be tensorboard, wandb, jsonl or none, not {args.report_to!r}")
    if args.eval_steps is None:
        args.eval_steps = args.save_steps
    default_train = DataArguments().train_files
    if data_args.train_files == default_train and not data_args.validation_files and not data_args.validation_split_percentage:
        # the default run measures what it learns on held-out conversations of the same tasks
        data_args.validation_files = [str(REPO / "data" / "sample_belle_eval.jsonl")]
    return model_args, data_args, args


# =============================================================================================
# The pieces a researcher changes: model, loss, schedule
# =============================================================================================

def tiny_qwen2(vocab_size: int, tokenizer) -> transformers.PreTrainedModel:
    """A half-million-parameter Qwen2 (same architecture as Qwen2.5), randomly initialised."""
    # Two layers are the fewest that can copy from the context (a previous-token head feeding an
    # induction head), which every sample task needs; on a CPU this size learns them faster per
    # second than a wider or deeper model. GQA (8 query heads, 4 key/value heads) as in Qwen2.5.
    config = transformers.Qwen2Config(
        vocab_size=-(-vocab_size // 64) * 64, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    # The constructor, not from_config: under ZeRO-3, from_config initialises inside deepspeed.zero.Init,
    # which draws different random weights than one process does; the engine partitions this model later.
    return transformers.Qwen2ForCausalLM(config)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropies over target tokens; the caller normalises."""
    logits = logits[:, :-1].float()  # fp32 log-softmax: bf16 loses too much over a 150k vocab
    targets = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_token_loss_sum(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                           chunk_size: int) -> torch.Tensor:
    """token_loss_sum over the final hidden states, applying the LM head chunk by chunk: only one
    chunk of logits exists at a time, in forward and (recomputed) in backward. Qwen's vocabulary
    is 151,936: 8 x 2048 tokens of fp32 logits would be about 10 GB."""
    hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX  # only target positions need logits at all
    hidden, targets = hidden[keep], targets[keep]

    def chunk_loss(h, t):
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, targets.numel(), chunk_size):
        total = total + torch.utils.checkpoint.checkpoint(
            chunk_loss, hidden[i:i + chunk_size], targets[i:i + chunk_size], use_reentrant=False)
    return total


@contextmanager
def hidden_states_out(model):
    """While active, the model's output "logits" are its final hidden states: the LM head is
    applied by the loss, in chunks. The head module stays in place (its weights, their names in
    checkpoints, DeepSpeed's handling of them); only its forward is bypassed."""
    head = model.get_output_embeddings()
    head.forward = lambda h: h
    try:
        yield head
    finally:
        del head.forward  # back to the class's forward


def forward_loss(model, batch: dict, chunk_size: int | None) -> torch.Tensor:
    """Sum of token losses of one micro-batch (the model is called without labels)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if not chunk_size:
        return token_loss_sum(model(**inputs).logits, batch["labels"])
    with hidden_states_out(unwrapped(model)) as head:
        hidden = model(**inputs).logits
    # Same precision for the head as inside the model (bf16 under mixed precision, else as is).
    low = hidden.dtype in (torch.bfloat16, torch.float16)
    with torch.autocast(hidden.device.type, dtype=hidden.dtype, enabled=low):
        return chunked_token_loss_sum(hidden, head, batch["labels"], chunk_size)


def unwrapped(model):
    while hasattr(model, "module"):  # DDP and DeepSpeed wrap the model
        model = model.module
    return model


def num_targets(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def make_optimizer(model, args: TrainArguments) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases and norms
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon)


def flops_per_token(model, max_len: int) -> float:
    """Training FLOPs per token, for MFU: 6 per parameter (forward and backward) plus attention's
    12 x layers x width x context (taken as max_len, an upper bound)."""
    cfg = model.config
    return 6 * sum(p.numel() for p in model.parameters()) + 12 * cfg.num_hidden_layers * cfg.hidden_size * max_len


def learning_rate_at(step: int, total_steps: int, args: TrainArguments) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then linear/cosine decay to 0 or constant."""
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)
    if step < warmup:
        return args.learning_rate * (step + 1) / warmup
    if args.lr_scheduler_type == "constant":
        return args.learning_rate
    progress = (step - warmup) / max(1, total_steps - warmup)
    if args.lr_scheduler_type == "linear":
        return args.learning_rate * max(0.0, 1.0 - progress)
    return args.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# =============================================================================================
# Setup helpers
# =============================================================================================

def make_accelerator(args: TrainArguments) -> Accelerator:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "LOCAL_RANK" in os.environ or world_size > 1
    kwargs_handlers, cpu = [], False
    if launched and not torch.cuda.is_available():
        # Without CUDA the default backend is not gloo, and accelerate then sees one process per rank.
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
        # A multi-GPU config on a CPU-only machine starts the processes but leaves them unconnected
        # (distributed type NO) unless accelerate is told it is on CPU.
        cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    if args.bf16 is None:
        mixed = None  # the accelerate config (ACCELERATE_MIXED_PRECISION) decides, else bf16 where supported
        if "ACCELERATE_MIXED_PRECISION" not in os.environ and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            mixed = "bf16"
    else:
        mixed = "bf16" if args.bf16 else "no"
    asked = mixed or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if asked == "bf16" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        source = "--bf16 true" if args.bf16 else "the accelerate config (mixed_precision: bf16)"
        raise SystemExit(f"error: {source} asks for bf16, but this machine has no GPU with bf16 support; "
                         "pass --bf16 false or use a config with mixed_precision: 'no'")
    trackers = args.report_to if args.report_to in ("tensorboard", "wandb") else None
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=mixed,
                              kwargs_handlers=kwargs_handlers, cpu=cpu, log_with=trackers,
                              project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                                  logging_dir=str(Path(args.output_dir) / "runs")))
    if world_size > 1 and (accelerator.num_processes != world_size or accelerator.distributed_type == DistributedType.NO):
        raise SystemExit(f"error: launched {world_size} processes, but accelerate set up {accelerator.num_processes} "
                         f"({accelerator.distributed_type.value}); they would train separately. On CPU use "
                         "configs/cpu_ddp.yaml or configs/cpu_zero2.yaml")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if args.skip_nonfinite_steps:
            raise SystemExit("error: --skip_nonfinite_steps is not available under DeepSpeed, whose engine applies the "
                             "update inside backward; without it a non-finite step stops the run before any bad save")
        configure_deepspeed(accelerator, args)
    return accelerator


def configure_deepspeed(accelerator: Accelerator, args: TrainArguments) -> None:
    """Our flags are the source of truth; a DeepSpeed config that says otherwise is an error."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
              "gradient_accumulation_steps": args.gradient_accumulation_steps,
              "gradient_clipping": float(args.max_grad_norm)}
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise SystemExit(f"error: the DeepSpeed config sets {key}={ds[key]} but the flags ask for {value}; "
                             f"set it to \"auto\" in the DeepSpeed config or pass the same value")
        ds[key] = value
    ds["train_batch_size"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # Without it a ZeRO-3 save writes an empty state dict.
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def load_tokenizer(model_args: ModelArguments):
    path = model_args.tokenizer_name_or_path or model_args.model_name_or_path or str(REPO / "assets" / "tiny-qwen-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("Tokenizer has no pad token: padding with eos %r (padding is masked out, so this is safe)",
                 tokenizer.eos_token)
    for tok in templates.TEMPLATE_SPECIAL_TOKENS.get(model_args.template, ()):
        if tok not in tokenizer.get_vocab():
            raise SystemExit(f"error: --template {model_args.template} needs the token {tok!r}, which the tokenizer "
                             f"at {path} does not have; choose a template that matches the tokenizer")
    tokenizer.chat_template = templates.chat_template_for(model_args.template, tokenizer, model_args.system_prompt)
    return tokenizer


def load_model(model_args: ModelArguments, tokenizer, max_len: int):
    if model_args.model_name_or_path is None:
        model = tiny_qwen2(len(tokenizer), tokenizer)
    else:
        try:  # weights only from safetensors: a pickle (.bin) can run code when loaded
            model = AutoModelForCausalLM.from_pretrained(
                model_args.model_name_or_path, dtype=torch.float32, use_safetensors=True,
                trust_remote_code=model_args.trust_remote_code, attn_implementation=model_args.attn_implementation)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot load a model with safetensors weights from "
                             f"{model_args.model_name_or_path}: {str(e).splitlines()[0]}") from None
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_len > positions:
        raise SystemExit(f"error: --max_len {max_len} is beyond the model's {positions} positions")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    # Generation must stop where training taught the model to stop.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def prepare_output_dir(args: TrainArguments, accelerator: Accelerator) -> str | None:
    """The checkpoint to resume from, if any; refuses to write into a used directory otherwise."""
    out = Path(args.output_dir)
    resume = args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("false", "none", ""):
        resume = None
    if resume is not None and resume.lower() in ("true", "latest"):
        resume = latest_checkpoint(out)
        if resume is None:
            raise SystemExit(f"error: --resume_from_checkpoint true, but {out} holds no complete checkpoint")
    elif resume is not None and not (Path(resume) / COMPLETE).is_file():
        raise SystemExit(f"error: {resume} is not a complete checkpoint (no {COMPLETE} marker)")
    if resume is None and out.exists() and any(out.iterdir()) and not args.overwrite_output_dir:
        hint = ("pass --resume_from_checkpoint true to continue it" if latest_checkpoint(out)
                else "choose another --output_dir")
        raise SystemExit(f"error: output directory {out} is not empty; {hint}, or --overwrite_output_dir to start over")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            if args.overwrite_output_dir and resume is None and out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write-test").write_text("")
            (out / ".write-test").unlink()
        except OSError as e:
            raise SystemExit(f"error: output directory {out} is not writable: {e.strerror}") from None
    accelerator.wait_for_everyone()
    return None if resume is None else str(resume)


COMPLETE = "checkpoint_complete"  # written last: a checkpoint without it is never resumed from


def complete_checkpoints(out: Path) -> list[Path]:
    done = [p for p in out.glob("checkpoint-*") if p.name[11:].isdigit() and (p / COMPLETE).is_file()]
    return sorted(done, key=lambda p: int(p.name[11:]))


def latest_checkpoint(out: Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1] if done else None


# =============================================================================================
# Checkpoints: an HF model directory + the training state, renamed into place when complete
# =============================================================================================

def save_hf_model(accelerator: Accelerator, model, tokenizer, directory: Path) -> None:
    # Every rank must call get_state_dict: under ZeRO-3 it gathers the shards with a collective.
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        # DeepSpeed hands back tied weights (lm_head = embeddings) as two tensors; store one, as HF does.
        for target, source in (getattr(unwrapped, "all_tied_weights_keys", None) or {}).items():
            if source in state_dict:
                state_dict.pop(target, None)
        unwrapped.save_pretrained(directory, state_dict=state_dict)
        tokenizer.save_pretrained(directory)


def save_checkpoint(accelerator: Accelerator, model, tokenizer, args: TrainArguments, state: dict) -> Path:
    """Write into a temporary directory, mark it complete, then rename it into place: a run killed
    mid-save leaves the previous checkpoints intact and no directory that looks finished."""
    out = Path(args.output_dir)
    final = out / f"checkpoint-{state['global_step']}"
    tmp = out / f".tmp-checkpoint-{state['global_step']}"
    if accelerator.is_main_process:
        for stale in out.glob(".tmp-checkpoint-*"):  # left by a run killed while saving
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    save_hf_model(accelerator, model, tokenizer, tmp)
    accelerator.save_state(str(tmp / "training_state"))  # optimizer, RNG, DeepSpeed shards
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (tmp / COMPLETE).write_text("")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if args.save_total_limit:
            for old in complete_checkpoints(out)[:-args.save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_final_model(accelerator: Accelerator, model, tokenizer, out: Path) -> None:
    """The final model at the top of output_dir, each file moved into place only once all are written."""
    tmp = out / ".tmp-final"
    save_hf_model(accelerator, model, tokenizer, tmp)
    if accelerator.is_main_process:
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        tmp.rmdir()
    accelerator.wait_for_everyone()


def check_state_is_plain_data(state_dir: Path) -> None:
    """Refuse training state that would unpickle anything beyond tensors and plain data.

    accelerate loads its own files with torch.load(weights_only=True); DeepSpeed loads its shards
    with weights_only=False, so every file is first proven loadable with weights_only=True, allowing
    only DeepSpeed's plain record types besides."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    allowed = list(TORCH_SAFE_GLOBALS)
    try:  # plain enums and records (no code) that DeepSpeed stores in its optimizer shards
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    except ImportError:
        pass
    for f in sorted(state_dir.rglob("*")):
        if f.suffix in (".pt", ".bin", ".pkl"):
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                what = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
                raise SystemExit(f"error: refusing to resume from {f}: it holds more than tensors and plain data "
                                 f"({what.group(1) if what else str(e).splitlines()[0][:200]})") from None


# =============================================================================================
# Batches
# =============================================================================================

def collate_fn(data_args: DataArguments, pad_id: int, attn: str):
    if data_args.packing:
        return partial(collate_packed, pad_id=pad_id, max_len=data_args.max_len,
                       pad_to_multiple_of=data_args.pad_to_multiple_of, mask_4d="flash" not in attn)
    return partial(collate, pad_id=pad_id, pad_to_multiple_of=data_args.pad_to_multiple_of)


def step_loader(dataset, args: TrainArguments, data_args: DataArguments, accelerator: Accelerator, pad_id: int,
                epoch: int, first_step: int, num_steps: int, attn: str = "sdpa"):
    """Yields, for each optimizer step of this epoch from first_step on, this process's list of
    gradient_accumulation_steps collated micro-batches."""
    world, gas = accelerator.num_processes, args.gradient_accumulation_steps
    global_batch = args.per_device_train_batch_size * gas * world
    lengths = dataset["length"] if data_args.group_by_length else None
    order = sft_data.epoch_order(len(dataset), args.seed, epoch, global_batch, lengths)
    micro_batches = [mb for step in range(first_step, num_steps)
                     for mb in sft_data.step_micro_batches(order, step, global_batch, accelerator.process_index, world, gas)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=micro_batches, num_workers=args.dataloader_num_workers,
                                         collate_fn=collate_fn(data_args, pad_id, attn))
    it = iter(loader)
    for _ in range(first_step, num_steps):
        yield [next(it) for _ in range(gas)]


# =============================================================================================
# One optimizer step, and stopping (non-finite steps, SIGTERM)
# =============================================================================================

def train_step(model, optimizer, micro_batches: list[dict], accelerator: Accelerator, args: TrainArguments,
               chunk_size: int | None) -> dict:
    """One optimizer step over this process's micro-batches.

    Returns this process's loss sum and the step's global target count, or, when a loss or the
    gradient norm is not finite, {"nonfinite": what} with the weights left as they were."""
    world, gas = accelerator.num_processes, args.gradient_accumulation_steps
    # Normalise by the target tokens of the whole optimizer step, over all micro-batches and
    # processes, so the gradient is that of one big batch however it is split. accelerate (or
    # DeepSpeed) divides by the accumulation steps and DDP/DeepSpeed average over processes;
    # multiplying by both undoes that.
    step_targets = accelerator.reduce(sum(num_targets(b["labels"]) for b in micro_batches), "sum")
    scale = world * gas / step_targets.clamp(min=1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        # accumulate(): DDP skips the gradient all-reduce, and DeepSpeed is told this is not a step
        # boundary, on all but the last micro-batch.
        with accelerator.accumulate(model):
            micro_loss = forward_loss(model, batch, chunk_size)
            loss_sum += micro_loss.detach()
            if i == len(micro_batches) - 1:
                # All processes decide together, before the last backward (inside which DeepSpeed
                # updates the weights), whether any of them saw a non-finite loss.
                if accelerator.reduce((~torch.isfinite(loss_sum)).float(), "sum") > 0:
                    optimizer.zero_grad(set_to_none=True)
                    return {"nonfinite": "loss"}
            accelerator.backward(micro_loss * scale)
    # DeepSpeed clipped inside its step (gradient_clipping); elsewhere this clips, before the step.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    if not math.isfinite(grad_norm) and accelerator.distributed_type != DistributedType.DEEPSPEED:
        optimizer.zero_grad(set_to_none=True)
        return {"nonfinite": "gradient norm"}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(grad_norm):  # DeepSpeed: already applied; the run stops without saving
        return {"nonfinite": "gradient norm (under DeepSpeed the update was already applied)"}
    return {"loss_sum": loss_sum, "targets": step_targets, "grad_norm": grad_norm}


def step_sample_ids(micro_batches: list[dict]) -> list[int]:
    """The ids of this step's samples on all processes (a collective: every process calls it)."""
    ids = [i for b in micro_batches for i in b["sample_id"].tolist()]
    return sorted(i for part in gather_object([ids]) for i in part)


def describe_samples(dataset, micro_batches: list[dict], paths: list[Path]) -> str:
    """Where this step's samples come from (file:line), gathered from all processes."""
    ids = set(step_sample_ids(micro_batches))
    rows = dataset.filter(lambda sid: sid in ids, input_columns=["sample_id"])
    locations = {}
    return ", ".join(sft_data.locate(paths, f, r, locations) for f, r in zip(rows["_file"], rows["_row"]))


# SIGTERM (Slurm, Kubernetes) asks for a checkpoint and a clean exit after the current step.
STOP_REQUESTED = False


def request_stop(signum, frame) -> None:
    global STOP_REQUESTED
    STOP_REQUESTED = True


# =============================================================================================
# Evaluation and metrics
# =============================================================================================

@torch.no_grad()
def evaluate(model, dataset, args: TrainArguments, data_args: DataArguments, accelerator: Accelerator, pad_id: int,
             chunk_size: int | None = None) -> float:
    """Token-weighted mean loss over the whole set, across processes."""
    model.eval()
    idx = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    bs = args.per_device_eval_batch_size
    batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]
    # every process runs the same number of forwards (ZeRO-3 gathers parameters collectively)
    n_batches = -(-len(dataset) // (bs * accelerator.num_processes))
    batches += [[] for _ in range(n_batches - len(batches))]
    loss_sum = torch.zeros((), device=accelerator.device)
    tokens = torch.zeros((), device=accelerator.device)
    for b in batches:
        batch = collate([dataset[i] for i in b], pad_id=pad_id, pad_to_multiple_of=data_args.pad_to_multiple_of)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss_sum += forward_loss(model, batch, chunk_size)
        tokens += num_targets(batch["labels"])
    model.train()
    return (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(tokens, "sum").clamp(min=1)).item()


def log_metrics(args: TrainArguments, accelerator: Accelerator, metrics: dict) -> None:
    """One record to output_dir/metrics.jsonl, and the numbers to the --report_to tracker."""
    if accelerator.is_main_process:
        with open(Path(args.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
    if args.report_to in ("tensorboard", "wandb"):
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"},
                        step=metrics["step"])


def run_evaluation(model, tokenizer, eval_set, eval_cases, sample_cases, step: int, args: TrainArguments,
                   data_args: DataArguments, accelerator: Accelerator, chunk_size: int | None) -> dict:
    """Eval loss and perplexity, held-out exact match of greedy replies, and a few sample replies
    printed so the user sees the model learn to answer and to stop."""
    synced = is_zero3(accelerator)
    metrics = {"step": step}
    if eval_set is not None:
        metrics["eval_loss"] = evaluate(model, eval_set, args, data_args, accelerator, tokenizer.pad_token_id, chunk_size)
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    if eval_cases:
        # generate() lives on the HF model, not on the DDP/DeepSpeed wrapper (ZeRO-3's hooks are on the model)
        results = generate.run_cases(unwrapped(model), tokenizer, eval_cases, accelerator, args.max_new_tokens, synced)
        metrics["eval_exact_match"] = generate.exact_match(results)
    if sample_cases:
        samples = generate.run_cases(unwrapped(model), tokenizer, sample_cases, accelerator, args.max_new_tokens, synced)
        if accelerator.is_main_process:
            with open(Path(args.output_dir) / "generations.jsonl", "a") as f:
                for r in samples:
                    f.write(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n")
            for r in samples:
                expected = f"   (expected {r['expected']!r})" if r["expected"] is not None else ""
                tqdm.write(f"[step {step}] ...{r['prompt'][-60:]!r}\n    -> {r['reply']!r}{expected}")
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step"))
    log_metrics(args, accelerator, metrics)
    return metrics


def held_out_cases(eval_set, tokenizer, args: TrainArguments):
    """(exact-match cases from the validation samples, sample-generation prompts)."""
    eval_cases = []
    if eval_set is not None and args.max_eval_generations > 0:
        rows = eval_set.select(range(min(len(eval_set), args.max_eval_generations)))
        eval_cases = [c for c in (generate.case_from_row(i, l, tokenizer) for i, l in zip(rows["input_ids"], rows["labels"]))
                      if c is not None]
    if args.sample_prompts:
        sample_cases = generate.cases_from_file(args.sample_prompts, tokenizer)[: args.num_sample_prompts]
    else:
        sample_cases = eval_cases[: args.num_sample_prompts]
    return eval_cases, sample_cases


def tracker_config(*dataclasses) -> dict:
    """Flat scalar config for trackers (TensorBoard's hparams take no lists or None)."""
    flat = {}
    for dc in dataclasses:
        for k, v in asdict(dc).items():
            flat[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def loss_chunk_size(model, args: TrainArguments, accelerator: Accelerator) -> int | None:
    """Chunked cross-entropy where it helps (large vocabularies), not under ZeRO-3, whose partitioned
    LM head is only whole inside the head's own forward."""
    if args.chunked_ce == "false" or is_zero3(accelerator):
        return None
    vocab = model.get_output_embeddings().weight.shape[0]
    return args.ce_chunk_size if args.chunked_ce == "true" or vocab >= 32_000 else None


def peak_flops(accelerator: Accelerator) -> float | None:
    """Dense bf16 peak of the GPU, for MFU; None where unknown (CPUs, other GPUs)."""
    if accelerator.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(accelerator.device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12)):
        if key in name:
            return flops
    return None


def is_zero3(accelerator: Accelerator) -> bool:
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)


# =============================================================================================
# Main
# =============================================================================================

def main(argv: list[str] | None = None) -> None:
    model_args, data_args, args = parse_args(argv)

    # --- setup ------------------------------------------------------------------------------
    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    resume_dir = prepare_output_dir(args, accelerator)
    set_seed(args.seed)
    world, gas = accelerator.num_processes, args.gradient_accumulation_steps
    global_batch = args.per_device_train_batch_size * gas * world
    log.info("%d process(es) (%s), global batch %d = %d per device x %d accumulation x %d processes",
             world, accelerator.distributed_type.value, global_batch, args.per_device_train_batch_size, gas, world)

    # --- data -------------------------------------------------------------------------------
    tokenizer = load_tokenizer(model_args)
    cache_dir = Path(data_args.preprocessing_cache_dir or os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft-loop"))
    prep = partial(sft_data.prepare_dataset, tokenizer=tokenizer, template=model_args.template,
                   max_len=data_args.max_len, system_prompt=model_args.system_prompt, cache_dir=cache_dir,
                   num_proc=data_args.preprocessing_num_workers, skip_invalid=data_args.skip_invalid_samples)
    with accelerator.main_process_first():  # tokenize once; the other processes read the cache
        try:
            train_set = prep(data_args.train_files, what="train")
            eval_set = prep(data_args.validation_files, what="validation") if data_args.validation_files else None
        except sft_data.DataProblems as e:
            raise SystemExit(f"error: {e}") from None
    if data_args.validation_split_percentage and eval_set is None:
        split = train_set.train_test_split(test_size=data_args.validation_split_percentage / 100, seed=args.seed)
        train_set, eval_set = split["train"], split["test"]
    eval_cases, sample_cases = held_out_cases(eval_set, tokenizer, args)
    steps_per_epoch = sft_data.steps_per_epoch(len(train_set), global_batch)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    log.info("%d training samples, %d steps per epoch, %d optimizer steps", len(train_set), steps_per_epoch, total_steps)

    # --- model and optimizer ----------------------------------------------------------------
    model = load_model(model_args, tokenizer, data_args.max_len)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    log.info("model: %s, %.2fM parameters", type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6)
    flops = flops_per_token(model, data_args.max_len)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, args))
    chunk_size = loss_chunk_size(unwrapped(model), args, accelerator)
    attn = unwrapped(model).config._attn_implementation or "eager"
    peak = peak_flops(accelerator)

    global_step = 0
    if resume_dir is not None:
        check_state_is_plain_data(Path(resume_dir) / "training_state")  # on every rank: no rank waits on a failed one
        accelerator.load_state(str(Path(resume_dir) / "training_state"))
        state = json.loads((Path(resume_dir) / "trainer_state.json").read_text())
        if state["global_batch_size"] != global_batch or state["seed"] != args.seed:
            raise SystemExit(f"error: {resume_dir} was trained with global batch {state['global_batch_size']} and seed "
                             f"{state['seed']}; resuming needs the same (now {global_batch}, {args.seed})")
        global_step = state["global_step"]
        log.info("resumed from %s at step %d", resume_dir, global_step)

    # --- the loop ---------------------------------------------------------------------------
    accelerator.init_trackers("sft-loop", config=tracker_config(model_args, data_args, args))
    if global_step == 0 and (eval_set is not None or sample_cases):
        run_evaluation(model, tokenizer, eval_set, eval_cases, sample_cases, 0, args, data_args, accelerator,
                       chunk_size)  # before training
    model.train()
    bar = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_main_process, desc="train")
    signal.signal(signal.SIGTERM, request_stop)
    skipped_steps = state.get("skipped_steps", 0) if resume_dir is not None else 0
    stopped = False
    last_time = time.perf_counter()
    while global_step < total_steps and not stopped:
        epoch, first = divmod(global_step, steps_per_epoch)
        last = min(steps_per_epoch, first + total_steps - global_step)
        for micro_batches in step_loader(train_set, args, data_args, accelerator, tokenizer.pad_token_id, epoch, first,
                                         last, attn):
            lr = learning_rate_at(global_step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in micro_batches]
            result = train_step(model, optimizer, micro_batches, accelerator, args, chunk_size)
            global_step += 1

            if "nonfinite" in result:
                where = describe_samples(train_set, micro_batches, [Path(f) for f in data_args.train_files])
                msg = f"non-finite {result['nonfinite']} at step {global_step} (samples: {where})"
                if not args.skip_nonfinite_steps or "DeepSpeed" in result["nonfinite"]:
                    last_good = latest_checkpoint(Path(args.output_dir))
                    raise SystemExit(f"error: {msg}; stopped without saving these weights (last checkpoint: "
                                     f"{last_good or 'none'}). Lower the learning rate, check those samples, or pass "
                                     "--skip_nonfinite_steps")
                skipped_steps += 1
                log.warning("%s: step skipped (%d so far)", msg, skipped_steps)
            # One collective for the logged numbers and for agreeing to stop on SIGTERM.
            local = [result.get("loss_sum", torch.tensor(float("nan"))).to(accelerator.device),
                     sum(b["real_tokens"] for b in micro_batches).float(),
                     torch.tensor(float(STOP_REQUESTED), device=accelerator.device),
                     torch.tensor(float(sum(b["input_ids"].numel() for b in micro_batches)), device=accelerator.device)]
            loss_sum, tokens, stop, padded = accelerator.reduce(torch.stack(local), "sum").tolist()
            loss = loss_sum / max(1.0, float(result["targets"])) if "targets" in result else None
            grad_norm = result.get("grad_norm")
            # the whole step, data loading and collation included
            now = time.perf_counter()
            dt, last_time = now - last_time, now
            bar.update(1)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}", tok_s=f"{tokens / dt:.0f}")
            if args.log_sample_ids:
                ids = step_sample_ids(micro_batches)
                if accelerator.is_main_process:
                    with open(Path(args.output_dir) / "sample_ids.jsonl", "a") as f:
                        f.write(json.dumps({"step": global_step, "sample_ids": ids}) + "\n")
            if global_step % args.logging_steps == 0 or global_step == total_steps:
                log_metrics(args, accelerator, {
                    "step": global_step, "epoch": global_step / steps_per_epoch, "samples_seen": global_step * global_batch,
                    "loss": loss, "lr": lr, "grad_norm": grad_norm, "target_tokens": int(result.get("targets", 0)),
                    "tokens_per_s": tokens / dt, "target_tokens_per_s": float(result.get("targets", 0)) / dt,
                    "padding_efficiency": tokens / padded, "skipped_steps": skipped_steps, "step_time": dt,
                    **({"mfu": tokens / dt * flops / (peak * world)} if peak else {})})

            stopped = stop = stop > 0
            is_last = global_step == total_steps
            evaluating = eval_set is not None or sample_cases
            if evaluating and not stop and (is_last or (args.eval_steps and global_step % args.eval_steps == 0)):
                run_evaluation(model, tokenizer, eval_set, eval_cases, sample_cases, global_step, args, data_args,
                               accelerator, chunk_size)
            if stop or is_last or (args.save_steps and global_step % args.save_steps == 0):
                state = {"global_step": global_step, "epoch": global_step // steps_per_epoch,
                         "step_in_epoch": global_step % steps_per_epoch, "samples_seen": global_step * global_batch,
                         "global_batch_size": global_batch, "seed": args.seed, "total_steps": total_steps,
                         "skipped_steps": skipped_steps,
                         "args": {**asdict(model_args), **asdict(data_args), **asdict(args)}}
                ckpt = save_checkpoint(accelerator, model, tokenizer, args, state)
                log.info("saved %s", ckpt)
            if stop:
                log.warning("SIGTERM: stopped after step %d with a checkpoint; resume with --resume_from_checkpoint true",
                            global_step)
                break
            last_time = time.perf_counter()  # evaluation and saving are not part of the next step's time
    bar.close()

    # --- the final model, in HF format at the top of output_dir -------------------------------
    if not stopped:
        save_final_model(accelerator, model, tokenizer, Path(args.output_dir))
        log.info("model written to %s%s", args.output_dir,
                 f" ({skipped_steps} non-finite steps skipped)" if skipped_steps else "")
        if args.plot and accelerator.is_main_process:
            log.info("plot: %s", plot_metrics.plot(args.output_dir))
    # CPU DDP can hang at exit while the model and optimizer still hold process-group resources.
    del model, optimizer
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
