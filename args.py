"""The flags: three dataclasses parsed by transformers.HfArgumentParser (names as in TrainingArguments,
peft and TRL where one exists), from the command line and/or a YAML/JSON config file."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser

REPO = Path(__file__).resolve().parent
SAMPLE_TRAIN = REPO / "data" / "sample_belle.jsonl"
SAMPLE_EVAL = REPO / "data" / "sample_belle_eval.jsonl"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "HF model directory or hub id; default: a tiny Qwen2 model built from a config (random init)"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "default: the model's; for the tiny model, assets/tiny-qwen-tokenizer"})
    template: Literal["qwen2.5", "llama3", "tokenizer"] = field(default="qwen2.5", metadata={
        "help": "chat template: qwen2.5 | llama3 | tokenizer (the one the tokenizer carries)"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "system prompt for conversations without one (default: the template's own, if any)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run code shipped with the model"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "eager | sdpa | flash_attention_2 | ...; default: the model's own choice"})
    # LoRA and QLoRA through peft, with the names TRL and peft users know
    use_peft: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of all the weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "module names to adapt (e.g. q_proj v_proj), or all-linear (every linear layer but the LM head)"})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "modules trained whole and saved with the adapter (e.g. embed_tokens lm_head for new tokens)"})
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling: alpha / sqrt(r)"})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: the base model in 4-bit NF4 with double quantization, bf16 compute (CUDA + bitsandbytes)"})
    merge_adapter: bool = field(default=True, metadata={
        "help": "also write the adapter merged into the base weights (fp32, verified) to output_dir/merged"})


@dataclass
class DataArguments:
    train_files: list[str] = field(default_factory=lambda: [str(SAMPLE_TRAIN)], metadata={
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
    optim: Literal["adamw_torch", "sgd"] = field(default="adamw_torch", metadata={
        "help": "adamw_torch | sgd (plain SGD: linear, for exactness checks)"})
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    # 0.95 as in nanoGPT and the Llama/Qwen pretraining recipes: Adam's second moment forgets old
    # gradients sooner, which keeps steps stable when the gradient scale changes (and the tiny model
    # forms its copying circuit in markedly fewer steps than with transformers' 0.999).
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm; 0 turns it off"})
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = field(default="cosine", metadata={
        "help": "linear | cosine | constant, after the warmup"})
    # A short warmup by default: Adam's first updates rest on moment estimates from few gradients.
    warmup_ratio: float = 0.03
    warmup_steps: int = field(default=0, metadata={"help": "overrides warmup_ratio when > 0"})
    num_train_epochs: float = 3.0
    max_steps: int = field(default=-1, metadata={"help": "overrides num_train_epochs when > 0"})
    seed: int = 42
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision; default: as the accelerate config says, else on where the GPU has it"})
    gradient_checkpointing: bool = False
    chunked_ce: Literal["auto", "true", "false"] = field(default="auto", metadata={
        "help": "apply the LM head and the loss to a chunk of target tokens at a time, so the full [tokens x vocab] "
                "logits never exist: auto (on for vocabularies of 32k+), true, false"})
    ce_chunk_mb: int = field(default=1024, metadata={
        "help": "memory for one chunk's fp32 logits and their gradient; sets the tokens per chunk from the vocabulary"})
    ce_chunk_size: int | None = field(default=None, metadata={
        "help": "tokens per chunk, overriding --ce_chunk_mb"})
    logging_steps: int = 1
    eval_steps: int | None = field(default=None, metadata={"help": "evaluate every N steps (default: --save_steps)"})
    max_eval_generations: int = field(default=100, metadata={
        "help": "held-out exact match: greedy replies to the last turn of up to N validation samples (0: off)"})
    sample_prompts: str | None = field(default=None, metadata={
        "help": "file of prompts (.txt lines, or conversations) to print replies for at each evaluation; "
                "default: the first validation samples"})
    num_sample_prompts: int = 3
    max_new_tokens: int = field(default=64, metadata={"help": "length bound for generations during training"})
    report_to: Literal["tensorboard", "wandb", "jsonl", "none"] = field(default="jsonl", metadata={
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


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = config_file_args(argv[0]) + argv[1:]
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    tiny = model_args.model_name_or_path is None
    # The built-in tiny model learns the sample tasks from 50,000 to 80,000 samples seen; a bigger batch
    # costs a CPU less per sample than more steps do.
    if args.per_device_train_batch_size is None:
        args.per_device_train_batch_size = 32 if tiny else 8
    if args.learning_rate is None:
        args.learning_rate = 3e-3 if tiny else 2e-5
    for name, value in [("per_device_train_batch_size", args.per_device_train_batch_size),
                        ("per_device_eval_batch_size", args.per_device_eval_batch_size),
                        ("gradient_accumulation_steps", args.gradient_accumulation_steps), ("max_len", data_args.max_len),
                        ("ce_chunk_mb", args.ce_chunk_mb), ("ce_chunk_size", args.ce_chunk_size or 1)]:
        if value < 1:
            parser.error(f"--{name} must be at least 1")
    if args.eval_steps is None:
        args.eval_steps = args.save_steps
    on_sample_data = [Path(f).resolve() for f in data_args.train_files] == [SAMPLE_TRAIN]
    if on_sample_data and not data_args.validation_files and not data_args.validation_split_percentage:
        # the default run measures what it learns on held-out conversations of the same tasks
        data_args.validation_files = [str(SAMPLE_EVAL)]
    return model_args, data_args, args
