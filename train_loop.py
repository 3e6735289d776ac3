"""Supervised fine-tuning of a causal LM, as one explicit loop on accelerate (+ DeepSpeed).

    python train_loop.py                      # one process; set breakpoints anywhere
    accelerate launch train_loop.py ...       # DDP, DeepSpeed or FSDP2, as the accelerate config says
    python train_loop.py my_run.yaml [--flag value ...]   # flags from a YAML/JSON file, CLI overrides

With no arguments it fine-tunes a tiny Qwen2-architecture model on data/sample_belle.jsonl.
This file holds what a researcher changes, in the order a step uses it: the model, the loss, the
optimizer and schedule, one optimizer step, and the loop (train), then its set-up and its end.
Beside it at the top: batches.py (which samples form a step), collate.py (padding, packing),
templates.py (chat templates and which tokens train), chat.py. The infrastructure is the package
sftloop/ (its __init__ lists the modules, one job each).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from accelerate.utils import set_seed

import batches
from collate import collate, to_device
from sftloop import (adapters, checkpoints, evaluation, lm_logits, loading, logs, packing, plot_metrics, preflight, router,
                     runtime, sft_data, storage)
from sftloop.args import parse_args

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


def batch_loss(model, batch: dict, chunk_size: int | None = None, router_logits: list | None = None) -> torch.Tensor:
    """The weighted loss of each target token of one micro-batch, in the order of where's True
    positions (the caller sums and normalises). router_logits (a list): a mixture-of-experts model's
    router logits from the same forward are added to it, for its balancing loss."""
    where = lm_logits.target_positions(batch["labels"])
    if chunk_size:  # the LM head a chunk at a time: [tokens x vocab] logits never exist at once
        losses = lm_logits.chunk_by_chunk(model, runtime.unwrapped(model), batch, where, chunk_size, token_loss,
                                          router_logits)
    else:
        losses = token_loss(lm_logits.all_at_once(model, batch, where, router_logits),
                            lm_logits.targets_at(batch["labels"], where))
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

@dataclass
class StepResult:
    """What one optimizer step gives the loop: its numbers summed over processes (step_sums' and
    "stop", whether any process got SIGTERM), this process's per-token losses, the step's target
    tokens and gradient norm; `skipped` says why a step was not applied (a non-finite loss or
    gradient norm), else None."""
    sums: dict
    token_losses: list[torch.Tensor]
    target_tokens: float
    grad_norm: float = float("nan")
    skipped: str | None = None


def train_step(model, optimizer, micro_batches: list[dict], accelerator, args, loss_fn, num_sources: int = 1,
               moe: router.Router | None = None) -> StepResult:
    """One optimizer step over this process's micro-batches; the weights are left as they were when a
    loss or the gradient norm is not finite (under DeepSpeed, which updates inside backward, a
    non-finite gradient norm is found only after the update: the loop then stops without saving).
    For a mixture-of-experts model (moe) its router's balancing loss is added, balanced over the
    step's global batch. The step waits for the host once, at its end (twice under DeepSpeed)."""
    world, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    # Normalise by the target tokens of the whole optimizer step, over all micro-batches and
    # processes, so the gradient is that of one big batch however it is split. accelerate (or
    # DeepSpeed) divides by the accumulation steps and DDP/DeepSpeed average over processes;
    # multiplying by both undoes that. Counted and summed on the device: no wait for the host.
    # (The router's balancing loss is normalised by the step's real tokens, summed with them.)
    targets = sum(lm_logits.num_targets(b["labels"]) for b in micro_batches).double()
    tokens = sum(b["token_mask"].sum() for b in micro_batches).double()
    step_targets, step_tokens = runtime.summed(accelerator, torch.stack([targets, tokens]))
    scale = (world * accumulation / step_targets.clamp(min=1)).float()
    balance = router.Balance(moe, accelerator, step_tokens) if moe else None
    loss_sum, token_losses = torch.zeros((), device=accelerator.device), []

    def agreed(grad_norm) -> dict:
        """The step's numbers summed over processes, with whether any process saw a non-finite loss
        and whether any got SIGTERM: the one wait for the host."""
        balancing = balance.loss if balance else 0.0
        return runtime.reduce_sums(accelerator, {
            **step_sums(loss_sum, micro_batches), **(balance.load() if balance else {}), "target_tokens": targets,
            "stop": float(runtime.stop_requested_here()), "grad_norm": grad_norm / world,  # the same on all
            "nonfinite_loss": (~torch.isfinite(loss_sum + balancing)).double(),
            **({"by_source": logs.source_sums(token_losses, micro_batches, num_sources)} if num_sources > 1 else {})})

    for i, batch in enumerate(micro_batches):
        # accumulate(): DDP skips the gradient all-reduce, and DeepSpeed is told this is not a step
        # boundary, on all but the last micro-batch.
        with accelerator.accumulate(model):
            routed = [] if balance else None
            losses = loss_fn(model, batch, router_logits=routed)
            micro_loss = losses.sum()
            loss_sum += micro_loss.detach()
            token_losses.append(losses.detach())
            step_loss = micro_loss * scale
            if balance:  # counted and logged even at weight 0
                balancing = balance.micro_batch_loss(routed, batch["token_mask"])
                if moe.coef:  # normalised over the step already: only the averaging is undone
                    step_loss = step_loss + moe.coef * world * accumulation * balancing
            if i == len(micro_batches) - 1 and runtime.is_deepspeed(accelerator):
                # DeepSpeed updates the weights inside the last backward: all processes decide before
                # it whether any of them saw a non-finite loss.
                sums = agreed(torch.full((), float("nan"), device=accelerator.device))
                if sums.pop("nonfinite_loss") > 0:
                    optimizer.zero_grad(set_to_none=True)
                    return StepResult(sums, [], sums.pop("target_tokens"), sums.pop("grad_norm"), skipped="loss")
            accelerator.backward(step_loss)
    # DeepSpeed clipped inside its step (gradient_clipping); elsewhere this clips, before the step.
    norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    norm = torch.as_tensor(float("nan") if norm is None else norm).to(accelerator.device, torch.float64)
    sums = agreed(norm)
    bad_loss, target_tokens, grad_norm = sums.pop("nonfinite_loss") > 0, sums.pop("target_tokens"), sums.pop("grad_norm")
    skipped = "loss" if bad_loss else None if math.isfinite(grad_norm) else "gradient norm"
    if skipped and not runtime.is_deepspeed(accelerator):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(sums, [], target_tokens, grad_norm, skipped)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if skipped:  # DeepSpeed: already applied
        return StepResult(sums, [], target_tokens, grad_norm, f"{skipped} (under DeepSpeed the update was already applied)")
    return StepResult(sums, token_losses, target_tokens, grad_norm)


def step_sums(loss_sum: torch.Tensor, micro_batches: list[dict]) -> dict:
    """This process's numbers for the step, on the device; each is summed over processes and logged
    under its name in metrics.jsonl (to log a new number, add a line)."""
    return {
        "loss_sum": loss_sum,
        "real_tokens": sum(b["real_tokens"] for b in micro_batches),
        "padded_tokens": sum(b["input_ids"].numel() for b in micro_batches),
    }


def handle_nonfinite_step(result: StepResult, step: int, micro_batches, train_set, args) -> None:
    """Stop with the samples named, or with --skip_nonfinite_steps (refused under DeepSpeed) go on."""
    where = sft_data.describe(train_set, runtime.gathered_sample_ids(micro_batches))
    msg = f"non-finite {result.skipped} at step {step} (samples: {where})"
    if not args.skip_nonfinite_steps:
        raise SystemExit(f"error: {msg}; stopped without saving these weights (last checkpoint: "
                         f"{checkpoints.latest_checkpoint(Path(args.output_dir)) or 'none'}). Lower the learning "
                         "rate, check those samples, or pass --skip_nonfinite_steps")
    log.warning("%s: step skipped", msg)


# =============================================================================================
# The loop
# =============================================================================================

def main(argv: list[str] | None = None) -> None:
    model_args, data_args, args = parse_args(argv)
    if data_args.dump_samples:
        return sft_data.dump_samples(model_args, data_args, args)
    # SIGTERM handling installed before any long work, restored on the way out.
    with runtime.sigterm_stops(), runtime.lost_peers_explained(args.output_dir, checkpoints.latest_checkpoint,
                                                               args.ddp_timeout):
        try:
            if args.check:  # the set-up and first batches of this run, reported on; nothing trained
                return preflight.check(model_args, data_args, args, setup, train_step)
            train(model_args, data_args, args)
        except runtime.Stopped:
            log.warning("SIGTERM before training began: stopped; nothing was trained, so nothing is saved")


def train(model_args, data_args, args) -> None:
    run = setup(model_args, data_args, args)
    accelerator, model, optimizer, train_set = run.accelerator, run.model, run.optimizer, run.train_set
    step, stopped = run.start_step, False
    if step == 0 and run.evaluating:  # before training
        run.evaluate(step=0)
    runtime.training_begins()
    model.train()
    report = logs.StepReport(run.total_steps, step, run.steps_per_epoch, run.global_batch, train_set.names,
                             run.flops_per_token, args, accelerator)
    for step, micro_batches in batches.steps(train_set, args, data_args, accelerator.process_index,
                                             accelerator.num_processes, run.pad_id, run.start_step, run.total_steps,
                                             run.attn_implementation):
        lr = learning_rate_at(step, run.total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [to_device(b, accelerator.device) for b in micro_batches]
        runtime.phase(f"step {step + 1}")
        result = train_step(model, optimizer, micro_batches, accelerator, args, run.loss_fn, len(train_set.names), run.moe)
        step += 1
        if result.skipped:
            handle_nonfinite_step(result, step, micro_batches, train_set, args)
            run.skipped_steps += 1
        stopped = report.step(step, result, micro_batches, lr, run.skipped_steps)
        is_last = step == run.total_steps
        if run.evaluating and not stopped and (is_last or (run.eval_every and step % run.eval_every == 0)):
            runtime.phase(f"the evaluation at step {step}")
            stopped = run.evaluate(step=step) is None  # None: SIGTERM
        if args.save_strategy == "steps" and (stopped or is_last or (args.save_steps and step % args.save_steps == 0)):
            runtime.phase(f"saving checkpoint-{step}")
            checkpoints.save_checkpoint(accelerator, model, run.tokenizer, args, run.checkpoint_state(step))
        if stopped:
            log.warning("SIGTERM: stopped after step %d with a checkpoint; resume with --resume_from_checkpoint true",
                        step)
            break
        report.restart_clock()  # evaluation and saving are not part of the next step's time
    report.close()
    if not stopped:
        finish(run)
    # CPU DDP can hang at exit while the model and optimizer still hold process-group resources.
    del model, optimizer, run
    gc.collect()
    accelerator.end_training()


# =============================================================================================
# Set-up and the end of a run
# =============================================================================================

@dataclass
class Run:
    """Everything the loop works with, made by setup()."""
    accelerator: object
    tokenizer: object
    train_set: object
    eval_sets: dict
    model: object
    optimizer: torch.optim.Optimizer
    loss_fn: object
    evaluate: object  # evaluate(step=N): eval loss, exact match, sample replies; None if SIGTERM cut it short
    eval_cases: dict  # {validation set: [(prompt ids, expected reply)]} for exact match
    sample_cases: list  # the prompts whose replies are printed at each evaluation
    evaluating: bool
    checkpoint_state: object  # checkpoint_state(step): what trainer_state.json records
    data_order: object  # data_order(epoch): the fingerprint of that epoch's batches, which a resume must match
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    pad_id: int
    attn_implementation: str
    packing_probe: object  # packing.Probe with --packing: packed against unpacked log-probabilities, before step 1
    moe: router.Router | None  # a mixture-of-experts model's router: its balancing loss and expert load
    flops_per_token: float
    use_peft: bool
    merge_adapter: bool
    args: object
    start_step: int = 0
    skipped_steps: int = 0


def setup(model_args, data_args, args) -> Run:
    """The processes, the data, the model, optimizer and loss, and the state to resume from."""
    adapters.check_flags(model_args)
    accelerator = runtime.make_accelerator(args)
    logs.setup(accelerator, args)
    runtime.check_nodes_agree(accelerator)
    cache_shared = storage.require_shared_dirs(accelerator, args.output_dir, sft_data.cache_dir_of(data_args),
                                               data_args.cache_on_each_node)
    resume_dir = checkpoints.prepare_output_dir(args, accelerator)
    set_seed(args.seed)
    world = accelerator.num_processes
    global_batch = runtime.global_batch_size(args, world)
    log.info("%s, global batch %d = %d per device x %d accumulation x %d processes", runtime.describe(accelerator),
             global_batch, args.per_device_train_batch_size, args.gradient_accumulation_steps, world)
    if note := runtime.idle_cores_note(accelerator):
        log.warning(note)

    tokenizer = loading.load_tokenizer(model_args)
    end_of_turn = loading.end_of_turn_id(model_args, tokenizer)
    # The model before the data, so that a model packing would train wrongly stops the run before a long tokenization.
    model = load_model(model_args, tokenizer, data_args.max_len, end_of_turn)
    loading.set_attention(model, packing.gpu_kernel(model_args.attn_implementation, data_args.packing, accelerator.device))
    if data_args.packing:
        packing.require_layers_apart(model, accelerator.device.type)
    moe = router.of(model, args.router_aux_loss_coef)

    began = time.perf_counter()
    train_set, eval_sets = sft_data.load_splits(model_args, data_args, args.seed, tokenizer, accelerator, cache_shared)
    log.info("training data ready in %.1f s: %s", time.perf_counter() - began, sft_data.summary(train_set))
    eval_cases, sample_cases = evaluation.held_out_cases(eval_sets, tokenizer, args, end_of_turn)
    steps_per_epoch = batches.steps_per_epoch(train_set.samples_per_epoch(), global_batch)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    eval_every = args.eval_steps if args.eval_steps is not None else max(1, round(total_steps / 10))
    log.info("%d training samples per epoch, %d steps per epoch, %d optimizer steps%s", train_set.samples_per_epoch(),
             steps_per_epoch, total_steps, f", evaluating every {eval_every}" if eval_sets and eval_every else "")

    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    loading.speed_up(model, args, accelerator.device, runtime.engine(accelerator))  # --use_liger_kernel, --torch_compile
    if model_args.use_peft:
        adapters.check_targets(model, model_args)
        base_path = model_args.model_name_or_path or checkpoints.save_base_model(accelerator, model, tokenizer, args)
        model = adapters.wrap(model, model_args, args.gradient_checkpointing, base_path)
    log.info("model: %s, %.2fM parameters", type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6)
    flops = logs.flops_per_token(model, data_args.max_len)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, args))
    hf_model, pad_id = runtime.unwrapped(model), tokenizer.pad_token_id
    chunk = lm_logits.chunk_size(hf_model, args, runtime.shards_parameters(accelerator),
                                 sft_data.first_samples(train_set, 1)[0], pad_id)
    loss_fn = partial(batch_loss, chunk_size=chunk)
    probed = None
    if data_args.packing:  # the model run on the first training samples, packed and not
        probed = packing.require_samples_apart(model, sft_data.first_samples(train_set, packing.PROBE_SAMPLES), pad_id,
                                               accelerator.device)

    def data_order(epoch: int) -> str:
        return batches.order_fingerprint(train_set, args.seed, epoch, global_batch, data_args.group_by_length,
                                         data_args.packing)

    def checkpoint_state(step: int) -> dict:
        return {"global_step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                "samples_seen": step * global_batch, "global_batch_size": global_batch, "seed": args.seed,
                "total_steps": total_steps, "skipped_steps": run.skipped_steps,
                "data_order": data_order(step // steps_per_epoch),
                "args": {**asdict(model_args), **asdict(data_args), **asdict(args)}}

    run = Run(accelerator, tokenizer, train_set, eval_sets, model, optimizer, loss_fn,
              evaluate=partial(evaluation.run_evaluation, model, tokenizer, eval_sets, eval_cases, sample_cases,
                               batch_loss=loss_fn, args=args, data_args=data_args, accelerator=accelerator),
              eval_cases=eval_cases, sample_cases=sample_cases,
              evaluating=bool(eval_sets) or bool(sample_cases), checkpoint_state=checkpoint_state, data_order=data_order,
              global_batch=global_batch, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
              eval_every=eval_every, pad_id=pad_id, attn_implementation=hf_model.config._attn_implementation or "eager",
              packing_probe=probed, moe=moe, flops_per_token=flops, use_peft=model_args.use_peft,
              merge_adapter=model_args.merge_adapter, args=args)
    if resume_dir is not None:
        resuming = time.perf_counter()
        state = checkpoints.resume(accelerator, resume_dir, global_batch, args.seed, data_order, model_args.use_peft)
        run.start_step, run.skipped_steps = state["global_step"], state.get("skipped_steps", 0)
        if accelerator.is_main_process:
            checkpoints.forget_steps_after(Path(args.output_dir), run.start_step)
        log.info("resumed from %s at step %d (loaded in %.1f s)", resume_dir, run.start_step,
                 time.perf_counter() - resuming)
    accelerator.init_trackers("sft-loop", config=logs.tracker_config(model_args, data_args, args))
    return run


def finish(run: Run) -> None:
    """The final model in HF format at the top of output_dir; for LoRA the verified merge beside it."""
    accelerator, args, out = run.accelerator, run.args, Path(run.args.output_dir)
    if args.save_strategy == "no":
        return log.warning("--save_strategy no: nothing saved")
    runtime.phase("writing the final model")
    checkpoints.save_final_model(accelerator, run.model, run.tokenizer, out)
    log.info("%s written to %s%s", "adapter" if run.use_peft else "model", out,
             f" ({run.skipped_steps} non-finite steps skipped)" if run.skipped_steps else "")
    if run.use_peft and run.merge_adapter:
        runtime.phase("the adapter merge (done by process 0 alone)")
        # The first process merges alone, so nothing in it may be a collective (see the helper).
        with runtime.without_zero3_partitioning(accelerator):
            if accelerator.is_main_process:
                samples, which = evaluation.merge_check_samples(run.train_set, run.eval_sets)
                merged = adapters.merge(out, run.tokenizer, [collate([s], pad_id=run.pad_id) for s in samples], which)
                if merged is not None:
                    checkpoints.write_model_dir(merged, run.tokenizer, out / "merged")
                    log.info("merged model written to %s", out / "merged")
    accelerator.wait_for_everyone()
    if args.plot and accelerator.is_main_process:
        log.info("plot: %s", plot_metrics.plot(args.output_dir))


if __name__ == "__main__":
    with runtime.errors_said_once():
        main()
