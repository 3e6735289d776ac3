"""--check: a run's real set-up and first batches, without training the run. Findings on the data,
what is trained, the template, memory, time, disk, the first loss and resuming, fatal first, on one
screen and in output_dir/check.json (docs/check.md). Nothing goes into the run's directory but
check.json: the set-up's files and the measured checkpoint go to a scratch directory beside it (the
same disk), removed at the end, even when SIGTERM or Ctrl-C cuts the check short."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

import batches
import templates
from collate import micro_batch_shape, packs_into_one_row, to_device
from sftloop import checkpoints, evaluation, lm_logits, loading, runtime, sft_data

GiB = 2**30
SECTIONS = ("set-up", "data", "template", "loss", "memory", "time", "disk", "resume")
LEVELS = ("fatal", "warning", "fact")


@dataclass
class Finding:
    level: str    # fatal | warning | fact
    section: str  # one of SECTIONS
    text: str     # one line, with the number
    fix: str = ""  # the way out, for fatal findings and warnings


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)  # the measured figures behind the findings (check.json)
    samples: list[dict] = field(default_factory=list)

    def add(self, level: str, section: str, text: str, fix: str = "") -> None:
        self.findings.append(Finding(level, section, text, fix))


def check(model_args, data_args, args, setup, train_step) -> None:
    """Run the set-up and a few steps of this run (setup and train_step are train_loop's own), report,
    and exit non-zero when a finding is fatal."""
    began, out = time.perf_counter(), Path(args.output_dir)
    scratch = out.parent / f".{out.name}.check"
    trial = dataclasses.replace(args, output_dir=str(scratch), overwrite_output_dir=True, resume_from_checkpoint=None,
                                report_to="none", plot=False)
    report, run, main = Report(), None, int(os.environ.get("RANK", "0")) == 0
    try:
        try:
            run = setup(model_args, data_args, trial)
        except SystemExit as e:  # the run would refuse this configuration: the same message, as a finding
            report.add("fatal", "set-up", f"the run would stop here: {_message(e)}", "see the message")
        if run is not None:
            setup_s = time.perf_counter() - began - sum(s for *_, s in run.train_set.tokenized_now)
            data_section(report, run, data_args, args)
            template_section(report, run, model_args, data_args)
            first = first_step(run, data_args)
            loss_section(report, run, model_args, data_args, first)
            eval_s = measure_evaluation(run, data_args, trial)  # before any update, as at the run's first evaluation
            widths = planned_widths(run, data_args)  # every micro-batch of the run, from the sample lengths
            memory_section(report, run, model_args, data_args, args, train_step, widths)
            time_section(report, run, data_args, args, train_step, trial, setup_s, eval_s, widths)
            disk_section(report, run, model_args, args, trial, scratch)
        resume_section(report, run, model_args, data_args, args)
    finally:
        if main:
            shutil.rmtree(scratch, ignore_errors=True)
    if main:
        report.numbers["check_seconds"] = round(time.perf_counter() - began, 1)
        where = write(report, out)
        show(report, where)
    fatal = sum(f.level == "fatal" for f in report.findings)
    if fatal:
        raise SystemExit(f"error: the check found {fatal} fatal problem(s), listed above and in {out / 'check.json'}")


def _message(e: SystemExit) -> str:
    text = str(e.code) if e.code is not None else "exited"
    return text[len("error: "):] if text.startswith("error: ") else text


# ---------------------------------------------------------------------------------------------
# The data, and what is trained
# ---------------------------------------------------------------------------------------------

def data_section(report: Report, run, data_args, args) -> None:
    corpus, tok = run.train_set, run.tokenizer
    columns = {c: sft_data.column(corpus.dataset, c) for c in ("part", "truncated", "num_targets", "error")}
    error = columns["error"] != ""
    usable = np.zeros(len(corpus.dataset), dtype=bool)
    usable[np.concatenate(corpus.rows)] = True
    for k, source in enumerate(corpus.sources):
        a, b = corpus.source_starts[k], corpus.source_starts[k + 1]
        read, bad = int(np.count_nonzero(columns["part"][a:b] == 0)), np.flatnonzero(error[a:b]) + a
        rejected = f", {len(bad)} rejected (first: {sft_data.describe(corpus, bad[:3].tolist())})" if len(bad) else ""
        made = int(usable[a:b].sum())
        expanded = f", which became {made} samples" if made > read - len(bad) else f", {made} samples"
        report.add("warning" if len(bad) else "fact", "data",
                   f"{source.spec}: {read} conversations read{rejected}{expanded}; {corpus.counts[k]} drawn per epoch",
                   "fix or drop the rejected records (skipped now: --skip_invalid_samples)" if len(bad) else "")
    lengths = corpus.lengths[usable]
    p50, p90, p99 = (int(x) for x in np.percentile(lengths, [50, 90, 99]))
    trained = float(columns["num_targets"][usable].sum() / max(1, lengths.sum()))
    report.add("fact", "data", f"sample length in tokens (after --max_len {data_args.max_len}): median {p50}, 90% {p90}, "
               f"99% {p99}, longest {int(lengths.max())}; {trained:.1%} of the tokens are trained")
    # What --max_len cuts: counted by the rule the run applies (sft_data.max_len_cuts), which would have
    # stopped the set-up above --max_cut_share (reported then as the run's refusal).
    cut = corpus.cut
    longer = int(np.count_nonzero(usable & columns["truncated"]))
    report.numbers.update(samples=int(usable.sum()), cut_samples=longer, lost_end_of_turn=cut["lost_end_of_reply"],
                          lost_every_trained_token=cut["left_out"], trained_token_share=round(trained, 4), max_len_cuts=cut)
    if cut["share"]:
        report.add("warning", "data", f"{cut['said']} (up to --max_cut_share {cut['max_cut_share']} goes on)",
                   "raise --max_len, or --truncation drop to leave out every sample longer than it")
    else:
        report.add("fact", "data", f"--max_len {data_args.max_len} cuts no trained token"
                   + (f" ({longer} longer samples lose only untrained tokens)" if longer else ""))
    if run.eval_sets:
        report.add("fact", "data", "validation: " + ", ".join(f"{name} {len(d)} samples" for name, d in run.eval_sets.items()))
    rows = np.concatenate(corpus.rows)[:args.check_samples].tolist()
    for row, sample in zip(rows, sft_data.samples_at(corpus, rows)):
        report.samples.append({"source": sft_data.describe(corpus, [row]), "input_ids": sample["input_ids"],
                               "labels": sample["labels"], "text": marked(tok, sample["input_ids"], sample["labels"]),
                               "coloured": marked(tok, sample["input_ids"], sample["labels"], colour=True)})


def marked(tokenizer, ids: list[int], labels: list[int], colour: bool = False) -> str:
    """The sample as text, its trained tokens in [[ ]] (or green on a terminal)."""
    parts, i = [], 0
    while i < len(ids):
        trained, j = labels[i] != templates.IGNORE_INDEX, i
        while j < len(ids) and (labels[j] != templates.IGNORE_INDEX) == trained:
            j += 1
        text = tokenizer.decode(ids[i:j])
        parts.append((f"\x1b[1;32m{text}\x1b[0m" if colour else f"[[{text}]]") if trained else text)
        i = j
    return "".join(parts)


def template_section(report: Report, run, model_args, data_args) -> None:
    """Every trained reply ends in the end-of-turn token generation stops at; the rendering is the
    tokenizer's own template's; BOS appears as often as the template puts it."""
    tok, corpus = run.tokenizer, run.train_set
    eot = templates.end_of_turn(model_args.template, tok)
    eot_id = tok.convert_tokens_to_ids(eot)
    rows = np.concatenate(corpus.rows)[:64].tolist()
    replies = ending = 0
    for s in sft_data.samples_at(corpus, rows):
        labels = np.asarray(s["labels"])
        trained = labels != templates.IGNORE_INDEX
        ends = np.flatnonzero(trained & ~np.append(trained[1:], False))  # the last token of each trained run
        if len(s["input_ids"]) == data_args.max_len and len(ends) and ends[-1] == len(labels) - 1:
            ends = ends[:-1]  # cut by --max_len (the data section counts those)
        replies += len(ends)
        ending += int(np.count_nonzero(labels[ends] == eot_id))
    said = f"{ending} of the {replies} trained replies in the first {len(rows)} samples end in {eot!r}"
    if replies and not ending:
        report.add("fatal", "template", f"the end-of-turn token {eot!r} is never trained ({said}): the model will not "
                   "learn to stop", f"the template's trained spans must end with {eot!r} (templates.py)")
    elif ending < replies:
        report.add("warning", "template", said, f"the template's trained spans should end with {eot!r} (templates.py)")
    else:
        report.add("fact", "template", f"{said}, the token generation stops at")
    stops = runtime.unwrapped(run.model).generation_config.eos_token_id
    if eot_id not in (stops if isinstance(stops, list) else [stops]):
        report.add("fatal", "template", f"the saved generation_config stops at {stops}, not at {eot!r} ({eot_id})",
                   "loading.fit_to_tokenizer sets it; do not change it")
    if run.pad_id == eot_id:
        report.add("fact", "template", f"the pad token is {eot!r} too: labels come from the template's spans, not from "
                   "the pad id, so the end of turn is still trained")
    own = AutoTokenizer.from_pretrained(loading.tokenizer_path(model_args),
                                        trust_remote_code=model_args.trust_remote_code).chat_template
    records = _first_records(corpus, model_args, data_args, tok)
    if model_args.template == "tokenizer":
        report.add("fact", "template", "rendered by the tokenizer's own chat template (--template tokenizer)")
    elif not own:
        report.add("fact", "template", f"the tokenizer has no chat template of its own; the saved model carries "
                   f"--template {model_args.template}'s")
    else:
        differ = []
        for where, row, conv in records:
            ours = sft_data.samples_at(corpus, [row])[0]["input_ids"]
            try:
                text = tok.apply_chat_template(conv.messages, tools=conv.tools, chat_template=own, tokenize=False)
            except Exception as e:  # jinja raises what the template author wrote
                differ.append(f"{where}: the tokenizer's own template fails on it ({e})")
                continue
            theirs = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids[:len(ours)]
            if theirs != ours:
                i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                differ.append(f"{where}: token {i} differs: ours {tok.decode(ours[max(0, i - 8):i + 8])!r}, "
                              f"the tokenizer's {tok.decode(theirs[max(0, i - 8):i + 8])!r}")
        if differ:
            report.add("warning", "template", f"--template {model_args.template} renders {len(differ)} of the first "
                       f"{len(records)} conversations unlike the tokenizer's own template: {differ[0]}",
                       "--template tokenizer trains in the model's own format (the saved model carries the training "
                       "template either way)")
        else:
            report.add("fact", "template", f"--template {model_args.template} gives the same tokens as the tokenizer's "
                       f"own template on the first {len(records)} conversations")
    bos = tok.bos_token
    if not bos:
        report.add("fact", "template", "the tokenizer has no BOS token (nothing to double)")
        return
    for where, row, conv in records:
        count = sft_data.samples_at(corpus, [row])[0]["input_ids"].count(tok.bos_token_id)
        blank = [{**m, "content": "x"} if isinstance(m.get("content"), str) else m for m in conv.messages]
        meant = templates.samples(templates.Conversation(blank, conv.tools), model_args.template, tok, None, "keep",
                                  data_args.train_on_turns)[-1][0].count(bos)
        if count > meant:
            report.add("fatal", "template", f"doubled BOS: {where} holds {bos!r} {count} times where the template puts it "
                       f"{meant} time(s) (the rest comes from the text of the data)",
                       f"remove {bos!r} from the data: the template adds it")
            return
    report.add("fact", "template", f"BOS {bos!r} appears as often as the template puts it (first {len(records)} samples)")


def _first_records(corpus, model_args, data_args, tokenizer, n: int = 3) -> list[tuple]:
    """(where, the row of its last sample, the conversation as the template gets it) for the first n
    records: the last sample of a record holds its whole conversation."""
    rows = np.concatenate(corpus.rows)[:256]
    numbers = corpus.dataset.data.column("record").take(rows).to_pylist()
    origins = np.searchsorted(corpus.origin_starts, rows, side="right")
    last = {}
    for row, key in zip(rows.tolist(), zip(origins.tolist(), numbers)):
        last[key] = row
    picked = list(last.values())[:n]
    records = sft_data.records_at(corpus, picked, sft_data.cache_dir_of(data_args))
    return [(sft_data.describe(corpus, [row]), row,
             templates.prepared(templates.to_conversation(r), model_args.template, tokenizer, model_args.system_prompt,
                                data_args.reasoning)) for row, r in zip(picked, records)]


# ---------------------------------------------------------------------------------------------
# The first loss, memory, time and disk: measured on the real model and engine
# ---------------------------------------------------------------------------------------------

def first_step(run, data_args) -> list[dict]:
    """This process's micro-batches of the run's first step, on the device."""
    acc = run.accelerator
    _, micro_batches = next(batches.steps(run.train_set, run.args, data_args, acc.process_index, acc.num_processes,
                                          run.pad_id, 0, 1, run.attn_implementation))
    return [to_device(b, acc.device) for b in micro_batches]


def _loss_sums(run, micro_batches: list[dict]) -> tuple[float, float]:
    with torch.no_grad():
        loss = sum((run.loss_fn(run.model, b).sum() for b in micro_batches), torch.zeros((), device=run.accelerator.device))
    sums = runtime.reduce_sums(run.accelerator, {"loss": loss, "targets": sum(lm_logits.num_targets(b["labels"])
                                                                             for b in micro_batches)})
    return sums["loss"], sums["targets"]


def loss_section(report: Report, run, model_args, data_args, first: list[dict]) -> None:
    """The first step's loss before any update, against ln(vocabulary): what a model that knows nothing gives."""
    loss_sum, targets = _loss_sums(run, first)
    loss, vocab = loss_sum / max(1.0, targets), runtime.unwrapped(run.model).get_output_embeddings().out_features
    uniform = math.log(vocab)
    report.numbers.update(first_loss=loss, ln_vocab=uniform)
    said = f"first loss {loss:.4f} per target token ({int(targets)} tokens of step 1; ln(vocabulary) = {uniform:.2f})"
    where = sft_data.describe(run.train_set, runtime.gathered_sample_ids(first))
    if not math.isfinite(loss):
        report.add("fatal", "loss", f"{said}: not finite, on the samples {where}",
                   "check the model's weights (a NaN in them) and those samples")
    elif loss < 1e-6:
        report.add("fatal", "loss", f"{said}: nothing to learn (samples {where})", "check the labels (--dump_samples)")
    elif model_args.model_name_or_path is None and abs(loss - uniform) > 0.25 * uniform:
        report.add("warning", "loss", f"{said}: a freshly initialised model should start near ln(vocabulary)",
                   "check the initialisation (tiny_qwen2)")
    elif loss > 1.1 * uniform:
        report.add("warning", "loss", f"{said}: worse than a uniform guess", "is the tokenizer the model's own?")
    else:
        report.add("fact", "loss", said)
    if data_args.packing:  # measured by the set-up before the first step (it refuses a leak: a fatal finding then)
        probed = run.packing_probe
        report.numbers.update(packing_max_logprob_diff=probed.max_diff, packing_tolerance=probed.tolerance)
        report.add("fact", "loss", f"--packing keeps samples apart in {type(runtime.unwrapped(run.model)).__name__} "
                   f"({run.attn_implementation} attention): {probed}")


def planned_widths(run, data_args) -> np.ndarray:
    """Tokens (padding included) of every micro-batch of the run: [step, process, micro-batch], from
    the sample lengths, dealt out by batches.py and laid out by collate.py as the run will."""
    corpus, args, world = run.train_set, run.args, run.accelerator.num_processes
    gas, total, per_epoch = args.gradient_accumulation_steps, run.total_steps, run.steps_per_epoch
    one_row = packs_into_one_row(run.attn_implementation)
    widths = np.zeros((total, world, gas), dtype=np.int64)
    for epoch in range(-(-total // per_epoch)):
        order = batches.epoch_rows(corpus, args.seed, epoch, run.global_batch, data_args.group_by_length)
        for k in range(min(per_epoch, total - epoch * per_epoch)):
            for rank in range(world):
                for m, rows in enumerate(batches.step_micro_batches(order, k, run.global_batch, rank, world, gas)):
                    if rows:
                        n, width = micro_batch_shape(corpus.lengths[rows].tolist(), data_args.packing, one_row,
                                                     data_args.pad_to_multiple_of)
                        widths[epoch * per_epoch + k, rank, m] = n * width
    return widths


def _rows_of(run, data_args, step: int, rank: int, micro: int) -> list[int]:
    epoch, k = divmod(step, run.steps_per_epoch)
    order = batches.epoch_rows(run.train_set, run.args.seed, epoch, run.global_batch, data_args.group_by_length)
    return batches.step_micro_batches(order, k, run.global_batch, rank, run.accelerator.num_processes,
                                      run.args.gradient_accumulation_steps)[micro]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _start_peak(device) -> int:
    """Start measuring the peak; returns the memory in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size starts again from now
    except OSError:
        pass
    return _status("VmRSS")


def _peak(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    import resource

    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_section(report: Report, run, model_args, data_args, args, train_step, widths: np.ndarray) -> None:
    """One optimizer step on the run's largest micro-batch (the weights it changes are never saved)."""
    acc, device = run.accelerator, run.accelerator.device
    step, rank, micro = np.unravel_index(int(np.argmax(widths)), widths.shape)
    rows = _rows_of(run, data_args, int(step), int(rank), int(micro))
    worst = batches.collate_fn(data_args, run.pad_id, run.attn_implementation)(sft_data.samples_at(run.train_set, rows))
    worst = to_device(worst, device)
    shape = "x".join(map(str, worst["input_ids"].shape))
    # What backward keeps of the forward (activations), counted tensor by tensor as autograd saves them:
    # the same on any device, and unlike a process's resident size not hidden by memory it freed before.
    saved, weights_at = {}, {p.data_ptr() for p in run.model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights_at:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    _start_peak(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(run.model, run.optimizer, [worst] * args.gradient_accumulation_steps, acc, args, run.loss_fn,
                   moe=run.moe)
    peak = _peak(device)
    if device.type == "cuda":
        budget, what = torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)
    else:  # the processes of this machine share its memory
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / local
        what = "this machine's memory" + (f" / {local} processes" if local > 1 else "")
    if args.check_device_memory_gb:
        budget, what = args.check_device_memory_gb * GiB, "--check_device_memory_gb"
    model = runtime.unwrapped(run.model)
    params = list(model.parameters())
    weights = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
    grads, adam = trainable * 4, (trainable * 8 if args.optim == "adamw_torch" else 0)
    activations = sum(saved.values()) / args.gradient_accumulation_steps  # of one micro-batch
    report.numbers.update(peak_bytes=peak, memory_budget_bytes=int(budget), largest_micro_batch=shape,
                          largest_at_step=int(step) + 1, weights_bytes=weights, activation_bytes=activations)
    said = (f"the largest micro-batch ({shape} tokens, step {int(step) + 1}) peaks at {_bytes(peak)} "
            f"({'allocated' if device.type == 'cuda' else 'resident'}) of {_bytes(budget)} ({what})")
    if peak <= budget:
        report.add("fact", "memory", f"{said}: fits with {_bytes((budget - peak))} to spare")
        return
    # What each lever would save, computed for this model from the measured step (activations) and
    # the sizes of the weights, gradients and Adam state; largest first.
    levers, layers, b = [], getattr(model.config, "num_hidden_layers", 1), args.per_device_train_batch_size
    if not args.gradient_checkpointing:
        levers.append(("--gradient_checkpointing", activations * (layers - 1) / max(1, layers)))
    if b > 1:
        levers.append((f"--per_device_train_batch_size {b // 2} --gradient_accumulation_steps "
                       f"{2 * args.gradient_accumulation_steps} (the same global batch)", activations / 2))
    if run.loss_fn.keywords.get("chunk_size") is None and not runtime.shards_parameters(acc):
        logits = worst["input_ids"].numel() * model.get_output_embeddings().out_features * 4 * 2  # fp32, and its grad
        levers.append(("--chunked_ce true", logits - args.ce_chunk_mb * 2**20))
    if not runtime.shards_parameters(acc):
        levers.append(("ZeRO-3 over 8 GPUs (configs/)", (weights + grads + adam) * 7 / 8))
    levers.append(("offloading the optimizer state (ZeRO offload)", adam))
    if not model_args.use_peft:
        levers.append(("--use_peft (LoRA)", grads + adam))
    levers = [f"{what} saves ~{_bytes(saved)}" for what, saved in sorted(levers, key=lambda x: -x[1]) if saved > 0]
    report.add("fatal", "memory", f"{said}: will run out at step {int(step) + 1}, where the largest batch comes",
               "; ".join(levers))


def _evaluations(run) -> int:
    if not run.evaluating:
        return 0
    steps = {s for s in range(1, run.total_steps + 1) if run.eval_every and s % run.eval_every == 0}
    return 1 + len(steps | {run.total_steps})


def _saves(run, args) -> int:
    """The checkpoints the run writes (the final model besides), none with --save_strategy no."""
    if args.save_strategy == "no":
        return 0
    return len({s for s in range(1, run.total_steps + 1) if args.save_steps and s % args.save_steps == 0}
               | {run.total_steps})


def time_section(report: Report, run, data_args, args, train_step, trial, setup_s: float,
                 eval_s: tuple[float, float], widths: np.ndarray) -> None:
    """A few real steps give seconds per padded token; the run's planned batches give its total."""
    acc, device = run.accelerator, run.accelerator.device
    # --check_steps steps, and more while they last under 3 s (a fast step is noisy), all processes
    # stopping together; reading and collating the batches counts, as in the loop.
    tokens, timed, began, steps = 0, 0, time.perf_counter(), []
    for _, micro_batches in batches.steps(run.train_set, args, data_args, acc.process_index, acc.num_processes,
                                          run.pad_id, 0, min(max(args.check_steps, 100), run.total_steps),
                                          run.attn_implementation):
        micro_batches = [to_device(b, device) for b in micro_batches]
        result = train_step(run.model, run.optimizer, micro_batches, acc, args, run.loss_fn, moe=run.moe)
        tokens, timed, targets = tokens + sum(b["input_ids"].numel() for b in micro_batches), timed + 1, result.target_tokens
        steps.append(result.sums)
        if timed >= args.check_steps and runtime.reduce_sums(acc, {"late": float(time.perf_counter() - began > 3)})["late"]:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    per_token = seconds / max(1, tokens)
    # a step lasts as long as its slowest process
    train_s = float(widths.sum(axis=2).max(axis=1).sum()) * per_token
    evals = _evaluations(run)
    first_eval_s, later_eval_s = eval_s
    eval_s = first_eval_s + later_eval_s * (evals - 1) if evals else 0.0
    began = time.perf_counter()
    ckpt = checkpoints.save_checkpoint(acc, run.model, run.tokenizer, trial, run.checkpoint_state(0))
    save_s = time.perf_counter() - began
    report.numbers.update(checkpoint_dir=str(ckpt), save_seconds=save_s)
    saves = _saves(run, args)
    writes = saves + 1 if saves else 0  # the checkpoints and the final model; nothing under --save_strategy no
    total = setup_s + train_s + eval_s + save_s * writes
    saved = f"{saves} checkpoint(s) + the final model at {save_s:.1f} s each" if saves else "nothing saved"
    report.numbers.update(step_seconds=seconds / timed, timed_steps=timed,
                          tokens_per_s=tokens / max(seconds, 1e-9), eta_seconds=round(total, 1),
                          train_seconds=round(train_s, 1), eval_seconds=round(eval_s, 1), setup_seconds=round(setup_s, 1))
    if run.moe:
        router_finding(report, run, steps)
    report.add("fact", "time", f"{run.total_steps} steps: ~{_duration(train_s)} at {tokens / max(seconds, 1e-9):,.0f} "
               f"tokens/s ({seconds / timed:.2f} s a step over {timed} steps, "
               f"{targets:.0f} trained tokens in the last timed one); {evals} evaluations ~{_duration(eval_s)}; "
               f"{saved}; set-up {setup_s:.0f} s: "
               f"the run takes ~{_duration(total)}")


def router_finding(report: Report, run, steps: list[dict]) -> None:
    """A mixture-of-experts model's router over the timed steps: its balancing loss and the busiest and
    idlest expert's share of a layer's selections; a router that sends a layer's tokens to few
    experts (the busiest at 4x its even share or more, or an expert with none) is a warning."""
    moe = run.moe
    busiest, idlest = max(s["expert_share_max"] for s in steps), min(s["expert_share_min"] for s in steps)
    balancing = [s["router_aux_loss"] for s in steps]
    report.numbers.update(router_aux_loss=balancing, expert_share_max=busiest, expert_share_min=idlest)
    said = (f"router ({moe.experts} experts, top {moe.top_k}, balancing loss x {moe.coef:g}): over {len(steps)} steps "
            f"the busiest expert took {busiest:.1%} of a layer's selections, the idlest {idlest:.1%} (even: "
            f"{1 / moe.experts:.1%}); balancing loss {balancing[0]:.3f} -> {balancing[-1]:.3f} ({moe.top_k} when even)")
    if busiest >= 4 / moe.experts or idlest == 0:
        report.add("warning", "loss", f"{said}: the router sends a layer's tokens to few experts",
                   "keep the balancing loss on (--router_aux_loss_coef, default the model's own), or raise it")
    else:
        report.add("fact", "loss", said)


def measure_evaluation(run, data_args, trial) -> tuple[float, float]:
    """Seconds for the first evaluation and for each later one: the held-out loss on a few batches,
    scaled to the whole sets, and one generate call a process, whose time per new token scales to
    every batch. A call runs as many tokens as its batch's longest reply: the untrained model's run
    to --max_new_tokens; a trained one's about as long as the longest expected reply of the batch."""
    acc, args, tok, loss_s = run.accelerator, run.args, run.tokenizer, 0.0
    for dataset in run.eval_sets.values():
        n = min(len(dataset), 2 * args.per_device_eval_batch_size * acc.num_processes)
        began = time.perf_counter()
        evaluation.evaluate(run.model, dataset.select(range(n)), run.loss_fn, trial, data_args, acc, run.pad_id)
        loss_s += (time.perf_counter() - began) * len(dataset) / max(1, n)
    sets = [cs for cs in [*run.eval_cases.values(), list(run.sample_cases)] if cs]
    if not sets:
        return loss_s, loss_s
    bs, world = args.per_device_eval_batch_size, acc.num_processes
    tried = sets[0][:bs * world]
    began = time.perf_counter()
    replies = evaluation.run_cases(runtime.unwrapped(run.model), tok, tried, acc, args.max_new_tokens, bs,
                                   runtime.shards_parameters(acc)) or []
    took = time.perf_counter() - began
    steps = min(args.max_new_tokens, max((len(tok(r["reply"]).input_ids) + 1 for r in replies), default=1))
    untrained = trained = 0.0
    for cases in sets:
        batches = evaluation.reply_batches(cases, bs)
        untrained += took * -(-len(batches) // world)  # the processes' calls run side by side
        length = [args.max_new_tokens if e is None else min(args.max_new_tokens, len(tok(e).input_ids) + 1)
                  for _, e in cases]
        trained += max(sum(max(length[i] for i in b) for b in batches[k::world]) for k in range(world)) * took / steps
    return loss_s + untrained, loss_s + trained


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def disk_section(report: Report, run, model_args, args, trial, scratch: Path) -> None:
    """The measured checkpoint's size x the checkpoints kept, plus the final model, against the free space."""
    if not run.accelerator.is_main_process:
        return
    ckpt = Path(report.numbers["checkpoint_dir"])
    one = _size(ckpt)
    model = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file() and f.name not in
                ("trainer_state.json", checkpoints.COMPLETE))
    extra = _size(scratch / "base_model") if (scratch / "base_model").is_dir() else 0
    if model_args.use_peft and model_args.merge_adapter:  # the merged model, in fp32
        extra += sum(p.numel() for n, p in runtime.unwrapped(run.model).named_parameters() if "lora_" not in n) * 4
    saves = _saves(run, args)
    if not saves:
        return report.add("fact", "disk", f"--save_strategy no: the run writes no checkpoint (one is {_bytes(one)}) "
                          "and no model")
    kept = min(saves, args.save_total_limit) if args.save_total_limit else saves
    need = kept * one + model + extra
    where = next(p for p in [Path(args.output_dir).resolve(), *Path(args.output_dir).resolve().parents] if p.exists())
    free = args.check_free_disk_gb * GiB if args.check_free_disk_gb is not None else shutil.disk_usage(where).free
    report.numbers.update(checkpoint_bytes=one, disk_needed_bytes=need, disk_free_bytes=int(free))
    said = (f"{kept} checkpoint(s) of {_bytes(one)} + the final model {_bytes((model + extra))} = "
            f"{_bytes(need)}; {_bytes(free)} free"
            f"{' (--check_free_disk_gb)' if args.check_free_disk_gb is not None else f' at {where}'}")
    if need <= free:
        report.add("fact", "disk", said)
        return
    fits = int((free - model - extra) // one) if one else 0
    fix = (f"--save_total_limit {fits} fits" if fits >= 1 else "free some space or choose another --output_dir")
    report.add("fatal", "disk", f"{said}: the disk fills before the run ends", fix)


def resume_section(report: Report, run, model_args, data_args, args) -> None:
    """Whether the token cache was ready, and what --resume_from_checkpoint true would continue."""
    if run is not None:
        fresh = run.train_set.tokenized_now
        if fresh:
            records, seconds = sum(n for _, n, _ in fresh), sum(s for *_, s in fresh)
            report.add("fact", "resume", f"tokenized {records} records now in {seconds:.1f} s "
                       f"({records / max(seconds, 1e-9):,.0f}/s); the run reads them from the cache")
        else:
            report.add("fact", "resume", "the token cache is ready: the run reads every source from it")
    out = Path(args.output_dir)
    try:
        target = checkpoints.resume_target(args)
    except SystemExit as e:
        report.add("fatal", "resume", f"the run would stop: {_message(e)}", "see the message")
        return
    latest = checkpoints.latest_checkpoint(out) if out.is_dir() else None
    if target is None:
        if latest is not None and args.overwrite_output_dir:
            report.add("warning", "resume", f"--overwrite_output_dir deletes {out}, which holds {latest.name}",
                       "--resume_from_checkpoint true continues it instead")
        else:
            report.add("fact", "resume", f"{out} holds no run: a new one starts there")
        return
    if run is None:
        return
    try:
        state = checkpoints.resumable(target, run.global_batch, args.seed, run.data_order, model_args.use_peft,
                                      runtime.engine(run.accelerator))
    except SystemExit as e:
        report.add("fatal", "resume", f"resuming would stop: {_message(e)}", "see the message")
        return
    report.add("fact", "resume", f"--resume_from_checkpoint continues {target} at step {state['global_step']} of "
               f"{run.total_steps}, global batch {run.global_batch}, the same data order")


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def _bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def ordered(report: Report) -> list[Finding]:
    return sorted(report.findings, key=lambda f: (LEVELS.index(f.level), SECTIONS.index(f.section)))


def write(report: Report, out: Path) -> Path | None:
    """check.json in output_dir, renamed into place whole; None where it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        path, tmp = out / checkpoints.CHECK_REPORT, out / f".{checkpoints.CHECK_REPORT}.tmp{os.getpid()}"
        tmp.write_text(json.dumps({"fatal": sum(f.level == "fatal" for f in report.findings),
                                   "warnings": sum(f.level == "warning" for f in report.findings),
                                   "findings": [dataclasses.asdict(f) for f in ordered(report)],
                                   "numbers": report.numbers,
                                   "samples": [{k: s[k] for k in ("source", "text", "input_ids", "labels")}
                                               for s in report.samples]}, indent=1, ensure_ascii=False))
        os.replace(tmp, path)
        return path
    except OSError:
        return None


def show(report: Report, path: Path | None) -> None:
    colour = sys.stdout.isatty()
    lines = [f"Pre-flight check ({report.numbers['check_seconds']:.0f} s): fatal first, then warnings, then facts"]
    for f in ordered(report):
        tag = {"fatal": "FATAL", "warning": "WARN ", "fact": "  ok "}[f.level]
        lines.append(f"{tag} {f.section:<8} {f.text}")
        if f.fix:
            lines.append(f"{'':15}-> {f.fix}")
    for s in report.samples:
        lines.append(f"\nsample {s['source']}, trained tokens {'in green' if colour else 'in [[ ]]'}:")
        lines.append(s["coloured"] if colour else s["text"])
    lines.append(f"\n(written to {path})" if path else "\n(check.json could not be written)")
    print("\n".join(lines), flush=True)
