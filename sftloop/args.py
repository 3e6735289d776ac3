"""The flags: three dataclasses parsed by transformers.HfArgumentParser (names as in TrainingArguments,
peft and TRL where one exists), from the command line and/or a YAML/JSON config file."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_type_hints

from transformers import HfArgumentParser

import templates
from sftloop.common import REPO, read_config

SAMPLE_TRAIN = REPO / "data" / "sample_belle.jsonl"
SAMPLE_EVAL = REPO / "data" / "sample_belle_eval.jsonl"


# --help shows each flag under its field's "group", the headings in this order.
MODEL, LORA, DATA, TRAINING = "model", "LoRA and QLoRA (peft)", "data", "training"
EVALUATION, OUTPUT, SPEED, NODES = "evaluation", "checkpoints and output", "speed and memory", "several processes and nodes"
CHECK = "the pre-flight check (docs/check.md)"
HEADINGS = (MODEL, LORA, DATA, TRAINING, EVALUATION, OUTPUT, SPEED, NODES, CHECK)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"group": MODEL, 
        "help": "HF model directory or hub id; default: a tiny Qwen2 model built from a config (random init)"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"group": MODEL, 
        "help": "default: the model's; for the tiny model, assets/tiny-qwen-tokenizer"})
    template: str = field(default="qwen2.5", metadata={"group": MODEL, "choices": list(templates.TEMPLATES), "help":
                          "chat template: " + " | ".join(templates.TEMPLATES) + " (the one the tokenizer carries)"})
    system_prompt: str | None = field(default=None, metadata={"group": MODEL, 
        "help": "system prompt for conversations without one (default: the template's own, if any)"})
    trust_remote_code: bool = field(default=False, metadata={"group": MODEL, "help": "run code shipped with the model"})
    attn_implementation: str | None = field(default=None, metadata={"group": MODEL, 
        "help": "eager | sdpa | flex_attention | flash_attention_2 | ...; default: the model's own choice (sdpa), "
                "but with --packing on a GPU flash_attention_2 where flash-attn is installed, else flex_attention"})
    # LoRA and QLoRA through peft, with the names TRL and peft users know
    use_peft: bool = field(default=False, metadata={"group": LORA, "help": "train a LoRA adapter instead of all the weights"})
    lora_r: int = field(default=16, metadata={"group": LORA, "help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"group": LORA, "help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float | None = field(default=None, metadata={"group": LORA,
        "help": "dropout on the LoRA input (default: 0.05; 0 where LoRA reaches a mixture-of-experts model's fused "
                "expert weights, which peft adapts without dropout)"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"group": LORA, 
        "help": "module names to adapt (e.g. q_proj v_proj), or all-linear (every linear layer but the LM head)"})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={"group": LORA, 
        "help": "modules trained whole and saved with the adapter (e.g. embed_tokens lm_head for new tokens)"})
    use_dora: bool = field(default=False, metadata={"group": LORA, "help": "weight-decomposed LoRA (DoRA)"})
    use_rslora: bool = field(default=False, metadata={"group": LORA, "help": "rank-stabilised scaling: alpha / sqrt(r)"})
    load_in_4bit: bool = field(default=False, metadata={"group": LORA, 
        "help": "QLoRA: the base model in 4-bit NF4 with double quantization, bf16 compute (CUDA + bitsandbytes)"})
    merge_adapter: bool = field(default=True, metadata={"group": LORA, 
        "help": "also write the adapter merged into the base weights (fp32, verified) to output_dir/merged"})


@dataclass
class DataArguments:
    train_files: list[str] | None = field(default=None, metadata={"group": DATA, 
        "help": "sources, each PATH[:WEIGHT]: a .json/.jsonl/.parquet file, a directory of such files, a directory "
                "written by save_to_disk, or a dataset id; WEIGHT 0.5 = half of it per epoch, 2.0 = twice, "
                "1000 = 1000 samples (default: data/sample_belle.jsonl)"})
    dataset_mixture: str | None = field(default=None, metadata={"group": DATA, 
        "help": "a YAML/JSON file listing the training sources (and optionally validation_files), for long lists; "
                "see docs/data.md"})
    validation_files: list[str] | None = field(default=None, metadata={"group": DATA, 
        "help": "held-out sources, each evaluated as a named set every --eval_steps and at the end "
                "(default run: data/sample_belle_eval.jsonl)"})
    validation_split_percentage: float = field(default=0.0, metadata={"group": DATA, 
        "help": "hold out this percentage of the training samples as validation data instead"})
    max_len: int = field(default=2048, metadata={"group": DATA, "help": "the longest sample, in tokens (see --truncation)"})
    truncation: Literal["keep_start", "drop"] = field(default="keep_start", metadata={"group": DATA, 
        "help": "a sample longer than --max_len: keep_start (its first max_len tokens) or drop (leave it out: "
                "no reply cut mid-sentence); either way the count is reported"})
    max_cut_share: float = field(default=0.05, metadata={"group": DATA,
        "help": "stop (and --check is fatal) when --max_len cuts more than this share of the samples: every trained token "
                "(such a sample is left out) or the end of a trained reply (trained up to the cut); each is counted, "
                "the first named by file:line (docs/data.md)"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"group": DATA, "help": "processes for tokenization"})
    preprocessing_cache_dir: str | None = field(default=None, metadata={"group": DATA, 
        "help": "where tokenized data is cached (default: $SFT_CACHE or ~/.cache/sft-loop)"})
    cache_on_each_node: bool = field(default=False, metadata={"group": NODES, 
        "help": "several nodes whose cache directories are node-local disks: tokenize once on each node into "
                "its own cache (without it, a cache the nodes do not share is an error)"})
    skip_invalid_samples: bool = field(default=False, metadata={"group": DATA,
        "help": "skip malformed records instead of stopping (samples --max_len cuts: --max_cut_share)"})
    train_on_turns: Literal["all", "last"] = field(default="all", metadata={"group": DATA,
        "help": "all: every assistant turn is trained once (a template that rewrites earlier turns, as Qwen3's, "
                "makes one sample per user query); last: only the turns after the last user query (one sample)"})
    reasoning: Literal["keep", "inline", "drop"] = field(default="keep", metadata={"group": DATA,
        "help": "reasoning in the data (reasoning_content, or a reply opening with <think>): keep (rendered by the "
                "template; an error for one with no place for it), inline (<think> text before the reply) or drop"})
    dump_samples: str | None = field(default=None, metadata={"group": DATA,
        "help": "write every training sample as the loop gets it (source, input_ids, labels) to this .jsonl file "
                "and exit without training"})
    pad_to_multiple_of: int | None = field(default=None, metadata={"group": SPEED, "help": "pad batch width to a multiple (8 on GPUs)"})
    group_by_length: bool = field(default=False, metadata={"group": SPEED, 
        "help": "put samples of similar length in the same step (within a shuffled window), so padding nearly vanishes"})
    packing: bool = field(default=False, metadata={"group": SPEED, 
        "help": "no padding between samples: each micro-batch's samples one after the other (one row with flash or "
                "flex attention, rows as wide as the longest sample with sdpa/eager), each attention layer kept within "
                "each sample; a model whose layers would let samples see each other is refused "
                "(docs/training.md#packing)"})


@dataclass
class TrainArguments:
    output_dir: str = field(default="output", metadata={"group": OUTPUT, 
        "help": "where checkpoints, the final model, metrics.jsonl and the plot go"})
    overwrite_output_dir: bool = field(default=False, metadata={"group": OUTPUT, 
        "help": "use an output_dir that holds files already (it is emptied first)"})
    per_device_train_batch_size: int | None = field(default=None, metadata={"group": TRAINING, 
        "help": "samples per micro-batch per process (default: 8, or 32 for the built-in tiny model)"})
    per_device_eval_batch_size: int = field(default=8, metadata={"group": EVALUATION, "help": "samples per evaluation batch per process, for the held-out loss and for greedy replies"})
    gradient_accumulation_steps: int = field(default=1, metadata={"group": TRAINING, "help": "micro-batches per optimizer step"})
    learning_rate: float | None = field(default=None, metadata={"group": TRAINING, 
        "help": "peak learning rate (default: 3e-3 for the built-in tiny model, 2e-5 for a pretrained one)"})
    optim: Literal["adamw_torch", "sgd"] = field(default="adamw_torch", metadata={"group": TRAINING, 
        "help": "adamw_torch | sgd (plain SGD: linear, for exactness checks)"})
    weight_decay: float = field(default=0.0, metadata={"group": TRAINING, "help": "AdamW weight decay, on matrices only"})
    adam_beta1: float = field(default=0.9, metadata={"group": TRAINING, "help": "AdamW beta1"})
    # 0.95 as in nanoGPT and the Llama/Qwen pretraining recipes: Adam's second moment forgets old
    # gradients sooner, which keeps steps stable when the gradient scale changes (and the tiny model
    # forms its copying circuit in markedly fewer steps than with transformers' 0.999).
    adam_beta2: float = field(default=0.95, metadata={"group": TRAINING, "help": "AdamW beta2 (transformers uses 0.999)"})
    adam_epsilon: float = field(default=1e-8, metadata={"group": TRAINING, "help": "AdamW epsilon"})
    router_aux_loss_coef: float | None = field(default=None, metadata={"group": TRAINING,
        "help": "the weight of a mixture-of-experts model's router balancing loss, balanced over the global batch "
                "(default: the model config's router_aux_loss_coef; 0 turns it off, the experts' load is still logged)"})
    max_grad_norm: float = field(default=1.0, metadata={"group": TRAINING, "help": "clip the global gradient norm; 0 turns it off"})
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = field(default="cosine", metadata={"group": TRAINING, 
        "help": "linear | cosine | constant, after the warmup"})
    # A short warmup by default: Adam's first updates rest on moment estimates from few gradients.
    warmup_ratio: float = field(default=0.03, metadata={"group": TRAINING, "help": "linear warmup over this share of the steps"})
    warmup_steps: int = field(default=0, metadata={"group": TRAINING, "help": "linear warmup steps; overrides --warmup_ratio when > 0"})
    num_train_epochs: float = field(default=3.0, metadata={"group": TRAINING, "help": "passes over the training data (or mixture)"})
    max_steps: int = field(default=-1, metadata={"group": TRAINING, "help": "optimizer steps; overrides --num_train_epochs when > 0"})
    seed: int = field(default=42, metadata={"group": TRAINING, "help": "initialisation, data order and mixture draws"})
    bf16: bool | None = field(default=None, metadata={"group": SPEED, 
        "help": "bf16 mixed precision; default: as the accelerate config says, else on where the GPU has it"})
    gradient_checkpointing: bool = field(default=False, metadata={"group": SPEED, 
        "help": "recompute activations in backward: less memory, about a third more compute"})
    torch_compile: bool = field(default=False, metadata={"group": SPEED,
        "help": "compile each decoder layer with torch.compile (the first steps wait for the compiler); one process or DDP"})
    use_liger_kernel: bool = field(default=False, metadata={"group": SPEED,
        "help": "Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) in the model; not its fused cross-entropy, so the loss "
                "stays the loop's own (CUDA and the liger-kernel package)"})
    chunked_ce: Literal["auto", "true", "false"] = field(default="auto", metadata={"group": SPEED, 
        "help": "apply the LM head and the loss to a chunk of target tokens at a time, so the full [tokens x vocab] "
                "logits never exist: auto (on for vocabularies of 32k+), true, false"})
    ce_chunk_mb: int = field(default=1024, metadata={"group": SPEED, 
        "help": "memory for one chunk's fp32 logits and their gradient; sets the tokens per chunk from the vocabulary"})
    ce_chunk_size: int | None = field(default=None, metadata={"group": SPEED, 
        "help": "tokens per chunk, overriding --ce_chunk_mb"})
    logging_steps: int = field(default=1, metadata={"group": OUTPUT, "help": "write a metrics.jsonl record every N optimizer steps"})
    eval_steps: int | None = field(default=None, metadata={"group": EVALUATION, 
        "help": "evaluate every N optimizer steps, and always before and after training (default: every 10%% of the "
                "run; 0: only before and after)"})
    max_eval_generations: int = field(default=100, metadata={"group": EVALUATION, 
        "help": "held-out exact match: greedy replies to the last turn of up to N validation samples (0: off)"})
    sample_prompts: str | None = field(default=None, metadata={"group": EVALUATION, 
        "help": "file of prompts (.txt lines, or conversations) to print replies for at each evaluation; "
                "default: the first validation samples"})
    num_sample_prompts: int = field(default=3, metadata={"group": EVALUATION, "help": "how many sample replies to print at each evaluation"})
    max_new_tokens: int = field(default=64, metadata={"group": EVALUATION, "help": "length bound for generations during training"})
    report_to: Literal["tensorboard", "wandb", "jsonl", "none"] = field(default="jsonl", metadata={"group": OUTPUT, 
        "help": "tensorboard | wandb | jsonl | none (output_dir/metrics.jsonl is always written)"})
    plot: bool = field(default=True, metadata={"group": OUTPUT, "help": "draw output_dir/metrics.png at the end"})
    disable_tqdm: bool | None = field(default=None, metadata={"group": OUTPUT, 
        "help": "no progress bar; instead a log line every 5%% of the run (default: so when the output is not a "
                "terminal, e.g. a log file or Slurm)"})
    save_steps: int = field(default=0, metadata={"group": OUTPUT, "help": "save a checkpoint every N optimizer steps (0: only at the end)"})
    save_strategy: Literal["steps", "no"] = field(default="steps", metadata={"group": OUTPUT,
        "help": "steps: checkpoints (--save_steps, the last step, SIGTERM) and the final model; no: nothing is saved "
                "(a run to measure, as bench/gpu.py's)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"group": OUTPUT, 
        "help": "a checkpoint directory, or 'true' for the latest in output_dir"})
    dataloader_num_workers: int = field(default=0, metadata={"group": SPEED, "help": "0 keeps data loading in this process (debuggable)"})
    save_total_limit: int | None = field(default=None, metadata={"group": OUTPUT, "help": "keep only the last K checkpoints"})
    skip_nonfinite_steps: bool = field(default=False, metadata={"group": TRAINING, 
        "help": "skip an optimizer step whose loss or gradient norm is NaN/inf instead of stopping"})
    log_sample_ids: bool = field(default=False, metadata={"group": OUTPUT, 
        "help": "append the ids (row numbers in the training files) of each step's samples to output_dir/sample_ids.jsonl"})
    ddp_timeout: int = field(default=1800, metadata={"group": NODES, 
        "help": "seconds a collective waits for the other processes before the run stops (a node died or hangs)"})
    check: bool = field(default=False, metadata={"group": CHECK,
        "help": "run the set-up and the first batches of this run without training it, and report (fatal first) what it "
                "trains, whether it fits in memory and on disk, how long it takes; writes output_dir/check.json"})
    check_samples: int = field(default=2, metadata={"group": CHECK,
        "help": "training samples shown with their trained tokens marked"})
    check_steps: int = field(default=3, metadata={"group": CHECK, "help": "steps timed for the estimate of the run's time"})
    check_device_memory_gb: float | None = field(default=None, metadata={"group": CHECK,
        "help": "the memory to fit in (default: the GPU's, or this machine's RAM)"})
    check_free_disk_gb: float | None = field(default=None, metadata={"group": CHECK,
        "help": "the free space for checkpoints and the model (default: measured where output_dir is)"})


def config_file_args(path: str) -> list[str]:
    """A YAML/JSON config file as command-line arguments, so flags given after it override it."""
    if not Path(path).is_file():
        raise SystemExit(f"error: config file {path} not found")
    try:
        cfg = read_config(Path(path))
    except ValueError as e:
        raise SystemExit(f"error: config file {e}") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"error: {path} must hold a mapping of flag names to values")
    args = []
    for k, v in cfg.items():
        if v is None:
            continue
        args.append(f"--{k}")
        args.extend(str(x) for x in v) if isinstance(v, list) else args.append(str(v))
    return args


DESCRIPTION = """Supervised fine-tuning of a causal LM on conversations, trained on the assistant's replies only.

  python train_loop.py [FLAGS]                          one process (CPU or one GPU); breakpoints work
  accelerate launch [--config_file C] train_loop.py [FLAGS]   DDP, DeepSpeed or FSDP2, as the accelerate config says
  python train_loop.py run.yaml [FLAGS]                 flags from a YAML/JSON file; later flags override it

With no flags it trains a tiny model on data/sample_belle.jsonl (a few minutes on a CPU).
README.md, then docs/: data.md (sources, mixtures), training.md (the flags that matter), lora.md,
checkpoints.md (resuming, preemption), distributed.md (several GPUs and nodes), changing-the-loop.md."""

ARGUMENTS = (ModelArguments, DataArguments, TrainArguments)


def heading_dataclasses() -> list[type]:
    """One dataclass per --help heading, made from the fields' "group" metadata: HfArgumentParser
    shows each dataclass's flags under its _argument_group_name."""
    by_heading = {heading: [] for heading in HEADINGS}
    for dc in ARGUMENTS:
        types = get_type_hints(dc)
        for f in dataclasses.fields(dc):
            metadata = {k: v for k, v in f.metadata.items() if k != "group"}
            default = ({"default": f.default} if f.default is not dataclasses.MISSING
                       else {"default_factory": f.default_factory})
            by_heading[f.metadata["group"]].append((f.name, types[f.name], field(metadata=metadata, **default)))
    return [dataclasses.make_dataclass(f"Flags{i}", spec, namespace={"_argument_group_name": heading})
            for i, (heading, spec) in enumerate(by_heading.items())]


def make_parser() -> HfArgumentParser:
    """The parser: exact flag names only (no abbreviations), one-line errors, --help grouped by
    heading with each default stated once."""
    import argparse

    parser = HfArgumentParser(heading_dataclasses(), description=DESCRIPTION,
                              usage="python train_loop.py [run.yaml] [--flag value ...]",
                              formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)

    def error(message: str):
        raise SystemExit(f"error: {message} (python train_loop.py --help lists the flags)")

    parser.error = error
    for action in parser._actions:
        if action.dest == "help":
            continue
        # shown under its one name: the --hyphen-spelling transformers adds still parses
        action.option_strings = action.option_strings[:1]
        if action.option_strings[0].startswith("--no_"):  # transformers' complement of a flag that defaults to on
            action.help = f"turn --{action.dest} off"
        elif action.help is not None and "default" not in action.help and action.default is not None:
            default = str(action.default).lower() if isinstance(action.default, bool) else action.default
            action.help += f" (default: {default})"
    return parser


def flags_page() -> str:
    """docs/flags.md: the --help text at a fixed width (a test fails when the page is stale).
    Regenerate it with: python -m sftloop.args > docs/flags.md"""
    import argparse

    parser = make_parser()
    parser.formatter_class = lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=100)
    return ("# Every flag\n\nGenerated from `python train_loop.py --help` (regenerate: `python -m sftloop.args > "
            "docs/flags.md`).\nWhich ones matter and why: [training.md](training.md).\n\n```text\n"
            + parser.format_help() + "```\n")


def flag_names() -> list[str]:
    return [f"--{f.name}" for dc in ARGUMENTS for f in dataclasses.fields(dc)]


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = config_file_args(argv[0]) + argv[1:]
    parser = make_parser()
    *parts, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    values = {k: v for part in parts for k, v in vars(part).items()}
    model_args, data_args, args = (dc(**{f.name: values[f.name] for f in dataclasses.fields(dc)}) for dc in ARGUMENTS)
    if unknown:
        import difflib

        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        if not flag.startswith("-"):
            raise SystemExit(f"error: unexpected value {flag!r} (every value follows its --flag; "
                             "python train_loop.py --help lists the flags)")
        close = difflib.get_close_matches(flag.split("=")[0].replace("-", "_"), flag_names(), n=2, cutoff=0.75)
        hint = f"; did you mean {' or '.join(close)}?" if close else " (python train_loop.py --help lists the flags)"
        raise SystemExit(f"error: unknown flag {flag.split('=')[0]}{hint}")
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
                        ("ce_chunk_mb", args.ce_chunk_mb), ("ce_chunk_size", args.ce_chunk_size or 1),
                        ("check_steps", args.check_steps)]:
        if value < 1:
            parser.error(f"--{name} must be at least 1")
    if data_args.dataset_mixture and data_args.train_files:
        parser.error("--dataset_mixture lists the training sources: pass it or --train_files, not both")
    if not data_args.dataset_mixture and not data_args.train_files:
        data_args.train_files = [str(SAMPLE_TRAIN)]
    on_sample_data = [Path(f).resolve() for f in data_args.train_files or []] == [SAMPLE_TRAIN]
    if on_sample_data and not data_args.validation_files and not data_args.validation_split_percentage:
        # the default run measures what it learns on held-out conversations of the same tasks
        data_args.validation_files = [str(SAMPLE_EVAL)]
    return model_args, data_args, args


if __name__ == "__main__":
    print(flags_page(), end="")
