"""Supervised fine-tuning of a causal LM, as one explicit loop on accelerate (+ DeepSpeed).

    python train_loop.py                      # one process; set breakpoints anywhere
    accelerate launch train_loop.py ...       # DDP, DeepSpeed or FSDP2, as the accelerate config says
    python train_loop.py my_run.yaml [--flag value ...]   # flags from a YAML/JSON file, CLI overrides

With no arguments it fine-tunes a tiny Qwen2-architecture model on data/sample_belle.jsonl.
This file holds what a researcher changes, in the order a step uses it: the model, the loss, the
optimizer and schedule, one optimizer step, and the loop (main). Everything around it lives in flat
modules with one job each: args.py (flags), runtime.py (processes, SIGTERM), sft_data.py (files to
tokens), batches.py (which samples form a step), lm_logits.py (logits at the target positions),
evaluation.py, checkpoints.py, storage.py (directories every node must share), logs.py, loading.py.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import adapters
import batches
import checkpoints
import evaluation
import lm_logits
import loading
import logs
import plot_metrics
import runtime
import sft_data
import storage
from args import parse_args
from collate import collate

log = logging.getLogger("sft")


# =============================================================================================
# The model
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


def load_model(model_args, tokenizer, max_len: int, end_of_turn: int) -> transformers.PreTrainedModel:
    if model_args.model_name_or_path is None:
        model = tiny_qwen2(len(tokenizer), tokenizer)
    else:
        model = loading.load_pretrained(model_args)
    loading.fit_to_tokenizer(model, tokenizer, max_len, end_of_turn)
    return model


# =============================================================================================
# The loss: every path (plain, chunked, packed, evaluation) goes through these three functions
# =============================================================================================

def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss of each target token: logits [N, vocab] at the N target positions, targets [N].

    Called on every path, whole or a chunk of tokens at a time, so an edit here holds everywhere."""
    return F.cross_entropy(logits.float(), targets, reduction="none")  # fp32: bf16 loses too much over 150k logits


def loss_weights(batch: dict, where: torch.Tensor) -> torch.Tensor | None:
    """A weight for each target token's loss, in the order of where's True positions (row-major);
    None weighs every token 1. `where` [batch, seq] marks the positions that predict a trained token."""
    return None


def batch_loss(model, batch: dict, chunk_size: int | None = None) -> torch.Tensor:
    """The weighted loss of each target token of one micro-batch, in the order of where's True
    positions (the caller sums and normalises)."""
    where = lm_logits.target_positions(batch["labels"])
    if chunk_size:  # the LM head a chunk at a time: [tokens x vocab] logits never exist at once
        losses = lm_logits.chunk_by_chunk(model, runtime.unwrapped(model), batch, where, chunk_size, token_loss)
    else:
        losses = token_loss(lm_logits.all_at_once(model, batch, where), lm_logits.targets_at(batch["labels"], where))
    weights = loss_weights(batch, where)
    return losses if weights is None else losses * weights


# =============================================================================================
# Optimizer and learning-rate schedule
# =============================================================================================

def make_optimizer(model, args) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapter only
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]  # biases and norms
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon)


def learning_rate_at(step: int, total_steps: int, args) -> float:
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
# One optimizer step
# =============================================================================================

def train_step(model, optimizer, micro_batches: list[dict], accelerator, args, loss_fn) -> dict:
    """One optimizer step over this process's micro-batches.

    Returns this process's loss sum, each micro-batch's token losses and the gradient norm, or, when a
    loss or the gradient norm is not finite, {"nonfinite": what} with the weights left as they were."""
    world, gas = accelerator.num_processes, args.gradient_accumulation_steps
    # Normalise by the target tokens of the whole optimizer step, over all micro-batches and
    # processes, so the gradient is that of one big batch however it is split. accelerate (or
    # DeepSpeed) divides by the accumulation steps and DDP/DeepSpeed average over processes;
    # multiplying by both undoes that.
    step_targets = runtime.reduce_sums(accelerator, {"t": sum(lm_logits.num_targets(b["labels"]) for b in micro_batches)})
    scale = world * gas / max(1.0, step_targets["t"])
    loss_sum, token_losses = torch.zeros((), device=accelerator.device), []
    for i, batch in enumerate(micro_batches):
        # accumulate(): DDP skips the gradient all-reduce, and DeepSpeed is told this is not a step
        # boundary, on all but the last micro-batch.
        with accelerator.accumulate(model):
            losses = loss_fn(model, batch)
            micro_loss = losses.sum()
            loss_sum += micro_loss.detach()
            token_losses.append(losses.detach())
            if i == len(micro_batches) - 1:
                # All processes decide together, before the last backward (inside which DeepSpeed
                # updates the weights), whether any of them saw a non-finite loss.
                if runtime.reduce_sums(accelerator, {"bad": float(not torch.isfinite(loss_sum))})["bad"] > 0:
                    optimizer.zero_grad(set_to_none=True)
                    return {"nonfinite": "loss"}
            accelerator.backward(micro_loss * scale)
    # DeepSpeed clipped inside its step (gradient_clipping); elsewhere this clips, before the step.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    deepspeed = runtime.is_deepspeed(accelerator)
    if not math.isfinite(grad_norm) and not deepspeed:
        optimizer.zero_grad(set_to_none=True)
        return {"nonfinite": "gradient norm"}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(grad_norm):  # DeepSpeed: already applied; the run stops without saving
        return {"nonfinite": "gradient norm (under DeepSpeed the update was already applied)"}
    return {"loss_sum": loss_sum, "token_losses": token_losses, "grad_norm": grad_norm}


def step_sums(result: dict, micro_batches: list[dict], num_sources: int = 1) -> dict:
    """This process's numbers for the step; each is summed over processes and logged under its
    name in metrics.jsonl (to log a new number, add a line). With several training sources, also
    each source's loss sum and target tokens (logged as train/<source>/loss)."""
    sums = {
        "loss_sum": result.get("loss_sum", float("nan")),
        "target_tokens": sum(lm_logits.num_targets(b["labels"]) for b in micro_batches),
        "real_tokens": sum(int(b["real_tokens"]) for b in micro_batches),
        "padded_tokens": sum(b["input_ids"].numel() for b in micro_batches),
    }
    if num_sources > 1:
        for k, v in lm_logits.sums_by_source(result.get("token_losses"), micro_batches, num_sources).items():
            sums[f"source/{k}"] = v
    return sums


def stop_on_nonfinite(result: dict, step: int, micro_batches, train_set, data_args, args) -> None:
    """Stop with the samples named, unless --skip_nonfinite_steps (never under DeepSpeed's applied update)."""
    where = sft_data.describe(train_set, runtime.gathered_sample_ids(micro_batches))
    msg = f"non-finite {result['nonfinite']} at step {step} (samples: {where})"
    if not args.skip_nonfinite_steps or "DeepSpeed" in result["nonfinite"]:
        raise SystemExit(f"error: {msg}; stopped without saving these weights (last checkpoint: "
                         f"{checkpoints.latest_checkpoint(Path(args.output_dir)) or 'none'}). Lower the learning "
                         "rate, check those samples, or pass --skip_nonfinite_steps")
    log.warning("%s: step skipped", msg)


def merge_check_samples(train_set, eval_sets: dict, n: int = 4) -> tuple[list[dict], str]:
    """The samples the merged model's logits are checked on: held-out ones when there is a validation set."""
    if eval_sets:
        name, dataset = next(iter(eval_sets.items()))
        rows = dataset.select(range(min(n, len(dataset))))
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], f"the first {len(rows)} of validation set {name}"
    return sft_data.first_samples(train_set, n), f"the first {n} training samples"


# =============================================================================================
# The loop
# =============================================================================================

def main(argv: list[str] | None = None) -> None:
    model_args, data_args, args = parse_args(argv)
    # SIGTERM handling installed before any long work, restored on the way out.
    with runtime.sigterm_stops(), runtime.lost_peers_explained(args.output_dir, checkpoints.latest_checkpoint,
                                                               args.ddp_timeout):
        try:
            train(model_args, data_args, args)
        except runtime.Stopped:
            log.warning("SIGTERM before training began: stopped; nothing was trained, so nothing is saved")


def train(model_args, data_args, args) -> None:
    adapters.check_flags(model_args)
    accelerator = runtime.make_accelerator(args)
    logs.setup(accelerator, args)
    runtime.check_nodes_agree(accelerator)
    cache_shared = storage.check(accelerator, args.output_dir, sft_data.cache_dir_of(data_args), data_args.cache_on_each_node)
    resume_dir = checkpoints.prepare_output_dir(args, accelerator)
    set_seed(args.seed)
    world = accelerator.num_processes
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    log.info("%s, global batch %d = %d per device x %d accumulation x %d processes", runtime.describe(accelerator),
             global_batch, args.per_device_train_batch_size, args.gradient_accumulation_steps, world)
    if note := runtime.idle_cores_note(accelerator):
        log.warning(note)

    # --- data -------------------------------------------------------------------------------
    began = time.perf_counter()
    tokenizer = loading.load_tokenizer(model_args)
    end_of_turn = loading.end_of_turn_id(model_args, tokenizer)
    train_set, eval_sets = sft_data.load_splits(model_args, data_args, args.seed, tokenizer, accelerator, cache_shared)
    log.info("training data ready in %.1f s: %s", time.perf_counter() - began, sft_data.summary(train_set))
    eval_cases, sample_cases = evaluation.held_out_cases(eval_sets, tokenizer, args, end_of_turn)
    steps_per_epoch = batches.steps_per_epoch(train_set.samples_per_epoch(), global_batch)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    eval_every = args.eval_steps if args.eval_steps is not None else max(1, round(total_steps / 10))
    log.info("%d training samples per epoch, %d steps per epoch, %d optimizer steps%s", train_set.samples_per_epoch(),
             steps_per_epoch, total_steps, f", evaluating every {eval_every}" if eval_sets and eval_every else "")

    # --- model, optimizer, loss ---------------------------------------------------------------
    model = load_model(model_args, tokenizer, data_args.max_len, end_of_turn)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if model_args.use_peft:
        adapters.check_targets(model, model_args)
        base_path = model_args.model_name_or_path or checkpoints.save_base_model(accelerator, model, tokenizer, args)
        model = adapters.wrap(model, model_args, args.gradient_checkpointing, base_path)
    log.info("model: %s, %.2fM parameters", type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6)
    flops = logs.flops_per_token(model, data_args.max_len)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, args))
    pad_id, attn = tokenizer.pad_token_id, runtime.unwrapped(model).config._attn_implementation or "eager"
    loss_fn = partial(batch_loss, chunk_size=lm_logits.chunk_size(runtime.unwrapped(model), args,
                                                                  runtime.shards_parameters(accelerator),
                                                                  sft_data.first_samples(train_set, 1)[0], pad_id))

    def data_order(epoch: int) -> str:
        return batches.order_fingerprint(train_set, args.seed, epoch, global_batch, data_args.group_by_length)

    global_step, skipped_steps = 0, 0
    if resume_dir is not None:
        resuming = time.perf_counter()
        state = checkpoints.resume(accelerator, resume_dir, global_batch, args.seed, data_order, model_args.use_peft)
        global_step, skipped_steps = state["global_step"], state.get("skipped_steps", 0)
        if accelerator.is_main_process:
            checkpoints.forget_steps_after(Path(args.output_dir), global_step)
        log.info("resumed from %s at step %d (loaded in %.1f s)", resume_dir, global_step, time.perf_counter() - resuming)

    # --- the loop ---------------------------------------------------------------------------
    accelerator.init_trackers("sft-loop", config=logs.tracker_config(model_args, data_args, args))
    evaluating = bool(eval_sets) or bool(sample_cases)
    if global_step == 0 and evaluating:  # before training
        evaluation.run_evaluation(model, tokenizer, eval_sets, eval_cases, sample_cases, 0, loss_fn, args, data_args,
                                  accelerator)
    runtime.training_begins()
    model.train()
    # Off a terminal (a log file, Slurm) a progress bar writes a line per update: log every 5% instead.
    bar_off = logs.bars_off(args)
    bar = tqdm(total=total_steps, initial=global_step, disable=bar_off or not accelerator.is_main_process, desc="train")
    progress = logs.Progress(total_steps, global_step, every=max(1, total_steps // 20)) if bar_off else None
    peak = logs.peak_flops(accelerator.device)
    stopped, by_source = False, {}  # by_source: per-source loss sums since the last log line
    last_time = time.perf_counter()
    while global_step < total_steps and not stopped:
        epoch, first = divmod(global_step, steps_per_epoch)
        last = min(steps_per_epoch, first + total_steps - global_step)
        for micro_batches in batches.step_loader(train_set, args, data_args, accelerator.process_index, world, pad_id,
                                                 epoch, first, last, attn):
            lr = learning_rate_at(global_step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in micro_batches]
            runtime.phase(f"step {global_step + 1}")
            result = train_step(model, optimizer, micro_batches, accelerator, args, loss_fn)
            global_step += 1
            if "nonfinite" in result:
                stop_on_nonfinite(result, global_step, micro_batches, train_set, data_args, args)
                skipped_steps += 1
            # One collective for every logged sum and for agreeing to stop on SIGTERM.
            sums = runtime.reduce_sums(accelerator, {**step_sums(result, micro_batches, len(train_set.sources)),
                                                     "stop": float(runtime.stop_requested_here())})
            stopped = sums.pop("stop") > 0
            by_source = logs.add_source_sums(by_source, sums)
            now = time.perf_counter()  # the whole step, data loading and collation included
            dt, last_time = now - last_time, now
            loss = sums["loss_sum"] / max(1.0, sums["target_tokens"]) if "nonfinite" not in result else None
            bar.update(1)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{result['grad_norm']:.2f}",
                                tok_s=f"{sums['real_tokens'] / dt:.0f}")
            if progress is not None:
                progress.step(global_step, loss, lr, sums["real_tokens"] / dt)
            if args.log_sample_ids:
                ids = runtime.gathered_sample_ids(micro_batches)
                if accelerator.is_main_process:
                    logs.append_jsonl(Path(args.output_dir) / "sample_ids.jsonl", [{"step": global_step, "sample_ids": ids}])
            if global_step % args.logging_steps == 0 or global_step == total_steps:
                logs.log_metrics(args, accelerator, {
                    "step": global_step, "epoch": global_step / steps_per_epoch, "samples_seen": global_step * global_batch,
                    "loss": loss, "lr": lr, "grad_norm": result.get("grad_norm"), **sums,
                    "tokens_per_s": sums["real_tokens"] / dt, "target_tokens_per_s": sums["target_tokens"] / dt,
                    "padding_efficiency": sums["real_tokens"] / sums["padded_tokens"], "skipped_steps": skipped_steps,
                    "step_time": dt, **({"mfu": sums["real_tokens"] / dt * flops / (peak * world)} if peak else {}),
                    **logs.source_losses(by_source, train_set.names)})
                by_source = {}

            is_last = global_step == total_steps
            if evaluating and not stopped and (is_last or (eval_every and global_step % eval_every == 0)):
                runtime.phase(f"the evaluation at step {global_step}")
                stopped = evaluation.run_evaluation(model, tokenizer, eval_sets, eval_cases, sample_cases, global_step,
                                                    loss_fn, args, data_args, accelerator) is None  # None: SIGTERM
            if stopped or is_last or (args.save_steps and global_step % args.save_steps == 0):
                state = {"global_step": global_step, "epoch": global_step // steps_per_epoch,
                         "step_in_epoch": global_step % steps_per_epoch, "samples_seen": global_step * global_batch,
                         "global_batch_size": global_batch, "seed": args.seed, "total_steps": total_steps,
                         "skipped_steps": skipped_steps, "data_order": data_order(global_step // steps_per_epoch),
                         "args": {**asdict(model_args), **asdict(data_args), **asdict(args)}}
                saving = time.perf_counter()
                runtime.phase(f"saving checkpoint-{global_step}")
                path = checkpoints.save_checkpoint(accelerator, model, tokenizer, args, state)
                log.info("saved %s in %.1f s", path, time.perf_counter() - saving)
            if stopped:
                log.warning("SIGTERM: stopped after step %d with a checkpoint; resume with --resume_from_checkpoint true",
                            global_step)
                break
            last_time = time.perf_counter()  # evaluation and saving are not part of the next step's time
    bar.close()

    # --- the final model, in HF format at the top of output_dir -------------------------------
    if not stopped:
        runtime.phase("writing the final model")
        checkpoints.save_final_model(accelerator, model, tokenizer, Path(args.output_dir))
        log.info("%s written to %s%s", "adapter" if model_args.use_peft else "model", args.output_dir,
                 f" ({skipped_steps} non-finite steps skipped)" if skipped_steps else "")
        if model_args.use_peft and model_args.merge_adapter:
            runtime.phase("the adapter merge (done by process 0 alone)")
            # The first process merges alone, so nothing in it may be a collective (see the helper).
            with runtime.without_zero3_partitioning(accelerator):
                if accelerator.is_main_process:
                    checked_on, where = merge_check_samples(train_set, eval_sets)
                    adapters.merge(Path(args.output_dir), Path(args.output_dir) / "merged", tokenizer,
                                   [collate([s], pad_id=pad_id) for s in checked_on], where)
        accelerator.wait_for_everyone()
        if args.plot and accelerator.is_main_process:
            log.info("plot: %s", plot_metrics.plot(args.output_dir))
    # CPU DDP can hang at exit while the model and optimizer still hold process-group resources.
    del model, optimizer
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    with runtime.errors_said_once():
        main()
