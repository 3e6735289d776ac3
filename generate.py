"""Replies from a model, with the prompt rendered exactly as in training (the chat template up to
the assistant header): sample generations and held-out exact-match accuracy during training, and
the reply function chat.py uses."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import templates
from templates import IGNORE_INDEX


def case_from_row(input_ids: list[int], labels: list[int], tokenizer) -> tuple[list[int], str] | None:
    """A tokenized training sample as (prompt ids, expected reply): the prompt is everything before
    the last trained run (the last assistant reply), the expected reply is that run without its
    end-of-turn token. None if the sample has no complete trained run (e.g. it was truncated)."""
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    if not trained or input_ids[trained[-1]] != tokenizer.eos_token_id:
        return None
    end = trained[-1]
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return input_ids[:start], tokenizer.decode(input_ids[start:end])


def cases_from_file(path: str, tokenizer) -> list[tuple[list[int], str | None]]:
    """Prompts from a .txt file (one user message a line) or a JSON Lines file (.jsonl, or .json
    with a record a line, as Belle's) of records of any shape, whose last assistant turn, if there
    is one, is the expected reply."""
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
        convs = [[{"role": "user", "content": x}] for x in lines if x.strip()]
    else:
        convs = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    convs.append(templates.to_messages(json.loads(line)))
                except ValueError as e:
                    raise SystemExit(f"error: {p}:{n}: {e}") from None
    cases = []
    for msgs in convs:
        expected = None
        if msgs[-1]["role"] == "assistant":
            msgs, expected = msgs[:-1], msgs[-1]["content"]
        cases.append((prompt_ids(tokenizer, msgs), expected))
    return cases


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


@torch.no_grad()
def generate_reply(model, tokenizer, ids: list[int], max_new_tokens: int, synced_gpus: bool = False,
                   temperature: float = 0.0, top_p: float = 1.0, streamer=None) -> str:
    """Greedy (temperature 0) or sampled reply; stops at the end-of-turn token (the tokenizer's
    eos, e.g. <|im_end|>), which training taught the model to emit."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         synced_gpus=synced_gpus, streamer=streamer, **sampling)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def run_cases(model, tokenizer, cases, accelerator, max_new_tokens: int, synced_gpus: bool = False) -> list[dict]:
    """Greedy replies for all cases, shared among processes, gathered in order on every process.
    Every process runs the same number of generate calls: under ZeRO-3 each forward gathers
    parameters collectively."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(len(cases)))[rank::world]
    was_training = model.training
    model.eval()
    results = []
    for k in range(-(-len(cases) // world)):
        i = mine[k] if k < len(mine) else 0  # a repeat keeps the collectives in step
        ids, expected = cases[i]
        got = generate_reply(model, tokenizer, ids, max_new_tokens, synced_gpus=synced_gpus)
        if k < len(mine):
            results.append({"i": i, "prompt": tokenizer.decode(ids), "expected": expected, "reply": got,
                            "correct": expected is not None and got.strip() == expected.strip()})
    model.train(was_training)
    return sorted(gather_object(results), key=lambda r: r["i"])


def exact_match(results: list[dict]) -> float:
    scored = [r for r in results if r["expected"] is not None]
    return sum(r["correct"] for r in scored) / max(1, len(scored))
