"""Evaluation: held-out loss and perplexity, greedy replies with the training template (held-out
exact match, sample generations printed during training), made by sftloop.generation, as chat.py's.

Prompts are rendered exactly as in training (the chat template up to the assistant header), and
generation stops at the template's end-of-turn token, which training taught the model to emit."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

import templates
from collate import collate, to_device
from sftloop import lm_logits, logs, runtime, sft_data
from sftloop.generation import generate, prompt_ids
from templates import IGNORE_INDEX

log = logging.getLogger("sft")


# --- cases: (prompt ids, expected reply) ---------------------------------------------------------

def case_from_row(input_ids: list[int], labels: list[int], tokenizer, end_of_turn_id: int) -> tuple[list[int], str] | None:
    """A tokenized training sample as (prompt ids, expected reply): the prompt is everything before
    the last trained run (the last assistant reply), the expected reply is that run without its
    end-of-turn token. None if the sample has no complete trained run (e.g. it was truncated)."""
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    if not trained or input_ids[trained[-1]] != end_of_turn_id:
        return None
    end = trained[-1]
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return input_ids[:start], tokenizer.decode(input_ids[start:end])


def cases_from_file(path: str, tokenizer, end_of_turn_id: int) -> list[tuple[list[int], str | None]]:
    """Prompts from a .txt file (one user message a line) or a JSON Lines file (.jsonl, or .json
    with a record a line, as Belle's) of records of any shape, whose last assistant turn, if there
    is one, is the expected reply: the whole turn as the template renders it (reasoning, content,
    tool calls), without its end-of-turn token. A record's tools are rendered in the prompt."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: --sample_prompts {path}: no such file")
    if p.suffix not in (".txt", ".jsonl", ".json"):
        raise SystemExit(f"error: --sample_prompts {path}: expected a .txt file (one message a line) or a "
                         ".jsonl/.json file (one record a line)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: --sample_prompts {path}: bytes that are not UTF-8 (byte offset {e.start})") from None
    if p.suffix == ".txt":
        convs = [templates.Conversation([{"role": "user", "content": x}]) for x in lines if x.strip()]
    else:
        convs = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    convs.append(templates.to_conversation(json.loads(line)))
                except ValueError as e:
                    raise SystemExit(f"error: {p}:{n}: {e}") from None
    end = tokenizer.convert_ids_to_tokens(end_of_turn_id)
    cases = []
    for conv in convs:
        msgs, expected = conv.messages, None
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
            prompt = tokenizer.apply_chat_template(msgs, tools=conv.tools, add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(conv.messages, tools=conv.tools, tokenize=False)
            reply = full[len(prompt):] if full.startswith(prompt) else conv.messages[-1]["content"]
            expected = reply.split(end)[0] if end else reply
        cases.append((prompt_ids(tokenizer, msgs, conv.tools), expected))
    return cases


def held_out_cases(eval_sets: dict, tokenizer, args, end_of_turn_id: int):
    """({set name: exact-match cases from its first samples}, sample-generation prompts)."""
    eval_cases = {}
    for name, dataset in eval_sets.items():
        if args.max_eval_generations > 0:
            rows = dataset.select(range(min(len(dataset), args.max_eval_generations)))
            eval_cases[name] = [c for c in (case_from_row(i, lab, tokenizer, end_of_turn_id)
                                            for i, lab in zip(rows["input_ids"], rows["labels"])) if c is not None]
    if args.sample_prompts:
        sample_cases = cases_from_file(args.sample_prompts, tokenizer, end_of_turn_id)[: args.num_sample_prompts]
    else:
        sample_cases = [c for cases in eval_cases.values() for c in cases][: args.num_sample_prompts]
    return eval_cases, sample_cases


# --- replies --------------------------------------------------------------------------------------

def reply_batches(cases, batch_size: int) -> list[list[int]]:
    """Which cases share a generate call: batch_size at a time in order of prompt length."""
    by_length = sorted(range(len(cases)), key=lambda i: len(cases[i][0]))
    return [by_length[i:i + batch_size] for i in range(0, len(cases), batch_size)]


def run_cases(model, tokenizer, cases, accelerator, max_new_tokens: int, batch_size: int,
              synced_gpus: bool = False) -> list[dict] | None:
    """Greedy replies for all cases, batch_size prompts a generate call, gathered in order on every
    process (None if SIGTERM arrived meanwhile). The batches are made from all cases, prompts of
    similar length together (less padding), and dealt out to the processes in turn: each prompt is
    padded the same way however many processes share the work, so a reply does not depend on their
    number. Every process runs the same number of generate calls: under ZeRO-3 each forward gathers
    parameters collectively."""
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = reply_batches(cases, batch_size)
    mine = batches[rank::world]
    was_training = model.training
    model.eval()
    results = []
    for k in range(-(-len(batches) // world)):
        if runtime.stop_agreed(accelerator):
            model.train(was_training)
            return None
        batch = mine[k] if k < len(mine) else batches[0]  # a repeat keeps the collectives in step
        replies = generate(model, tokenizer, [cases[i][0] for i in batch], max_new_tokens, synced_gpus=synced_gpus)
        if k < len(mine):
            for i, got in zip(batch, replies):
                ids, expected = cases[i]
                results.append({"i": i, "prompt": tokenizer.decode(ids), "expected": expected, "reply": got,
                                "correct": expected is not None and got.strip() == expected.strip(),
                                "user": last_user_turn(tokenizer, ids)})
    model.train(was_training)
    return sorted(gather_object(results), key=lambda r: r["i"])


def last_user_turn(tokenizer, ids: list[int]) -> str:
    """The prompt's last user message, as text: the training template renders a probe message to show
    where a user turn's text starts and what follows it up to the reply."""
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], add_generation_prompt=True,
                                          tokenize=False)
    head, tail = probe.split("\x00", 1) if "\x00" in probe else ("", "")
    head = head[head.rfind(">") + 1:] if ">" in head else head  # the user header after the last special token
    text = tokenizer.decode(ids)
    start = text.rfind(head) + len(head) if head and head in text else max(0, len(text) - 200)
    return text[start:len(text) - len(tail)] if tail and text.endswith(tail) else text[start:]


def shown(text: str, tokenizer, limit: int = 240) -> str:
    """A message for the log: whitespace-only text summarised, long text cut in the middle, lines indented."""
    if not text.strip():
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return f"({n} token{'s' if n != 1 else ''} of whitespace)" if n else "(nothing)"
    if len(text) > limit:
        text = f"{text[:limit // 2]} [... {len(text) - limit} characters ...] {text[-limit // 2:]}"
    return text.replace("\n", "\n           ")


def exact_match(results: list[dict]) -> float:
    scored = [r for r in results if r["expected"] is not None]
    return sum(r["correct"] for r in scored) / max(1, len(scored))


# --- loss on held-out data, and one evaluation ------------------------------------------------------

@torch.no_grad()
def evaluate(model, dataset, batch_loss, args, data_args, accelerator, pad_id: int) -> dict | None:
    """The training loss (batch_loss, the loop's own) summed over the whole set, and its target
    tokens, across processes; None if SIGTERM arrived meanwhile."""
    model.eval()
    idx = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    bs = args.per_device_eval_batch_size
    batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]
    # every process runs the same number of forwards (ZeRO-3 gathers parameters collectively)
    n_batches = -(-len(dataset) // (bs * accelerator.num_processes))
    batches += [[] for _ in range(n_batches - len(batches))]
    loss_sum, tokens = torch.zeros((), device=accelerator.device), 0  # a tensor: no device sync per batch
    for b in batches:
        if runtime.stop_agreed(accelerator):
            model.train()
            return None
        batch = collate([dataset[i] for i in b], pad_id=pad_id, pad_to_multiple_of=data_args.pad_to_multiple_of)
        batch = to_device(batch, accelerator.device)
        loss_sum += batch_loss(model, batch).detach().sum()
        tokens += lm_logits.num_targets(batch["labels"])
    model.train()
    return runtime.reduce_sums(accelerator, {"loss_sum": loss_sum, "target_tokens": tokens})


def run_evaluation(model, tokenizer, eval_sets: dict, eval_cases: dict, sample_cases, step: int, batch_loss, args,
                   data_args, accelerator) -> dict | None:
    """Eval loss and perplexity, held-out exact match of greedy replies, and a few sample replies
    printed so the user sees the model learn to answer and to stop. With several validation sets,
    also each one's (eval/<name>/loss, eval/<name>/exact_match); eval_loss and eval_exact_match are
    then over all of them. None if SIGTERM cut it short."""
    synced = runtime.shards_parameters(accelerator)  # every process runs each forward: each holds a slice of the weights
    hf_model = runtime.unwrapped(model)  # generate() lives on the HF model (ZeRO-3's and FSDP's hooks are on it too)
    metrics, named = {"step": step}, len(eval_sets) > 1
    loss_sum, tokens = 0.0, 0.0
    for name, dataset in eval_sets.items():
        sums = evaluate(model, dataset, batch_loss, args, data_args, accelerator, tokenizer.pad_token_id)
        if sums is None:
            return None
        loss_sum, tokens = loss_sum + sums["loss_sum"], tokens + sums["target_tokens"]
        if named:
            metrics[f"eval/{name}/loss"] = sums["loss_sum"] / max(1.0, sums["target_tokens"])
    if eval_sets:
        metrics["eval_loss"] = loss_sum / max(1.0, tokens)
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    everything = []
    for name, cases in eval_cases.items():
        results = run_cases(hf_model, tokenizer, cases, accelerator, args.max_new_tokens,
                            args.per_device_eval_batch_size, synced)
        if results is None:
            return None
        everything += results
        if named and cases:
            metrics[f"eval/{name}/exact_match"] = exact_match(results)
    if everything:
        metrics["eval_exact_match"] = exact_match(everything)
    if sample_cases:
        samples = run_cases(hf_model, tokenizer, sample_cases, accelerator, args.max_new_tokens,
                            args.per_device_eval_batch_size, synced)
        if samples is None:
            return None
        if accelerator.is_main_process:
            logs.append_jsonl(Path(args.output_dir) / "generations.jsonl", [{"step": step, **r} for r in samples])
            for r in samples:
                verdict = "" if r["expected"] is None else " (right)" if r["correct"] else " (wrong)"
                lines = [f"[step {step}] user:  {shown(r['user'], tokenizer)}",
                         f"          reply: {shown(r['reply'], tokenizer)}{verdict}"]
                if r["expected"] is not None and not r["correct"]:
                    lines.append(f"       expected: {shown(r['expected'], tokenizer)}")
                tqdm.write("\n".join(lines))
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step"))
    logs.log_metrics(args, accelerator, metrics)
    return metrics


def merge_check_samples(train_set, eval_sets: dict, n: int = 4) -> tuple[list[dict], str]:
    """The samples the merged model's logits are checked on: held-out ones when there is a validation set."""
    if eval_sets:
        name, dataset = next(iter(eval_sets.items()))
        rows = dataset.select(range(min(n, len(dataset))))
        return ([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows],
                f"the first {len(rows)} samples of validation set {name}")
    return sft_data.first_samples(train_set, n), f"the first {n} training samples"
