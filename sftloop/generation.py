"""Replies from a model, rendered with its chat template: what evaluation and chat.py share. Only
torch here, so chat.py does not import the training stack (accelerate, DeepSpeed)."""

from __future__ import annotations

import json
import re

import torch


def prompt_ids(tokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_reply(reply: str) -> dict:
    """A generated reply as an assistant message: the <tool_call> blocks (Qwen's and Hermes' form,
    {"name", "arguments"} as JSON) become tool_calls, the rest is the content. A block that is not
    such JSON stays in the content, as text."""
    calls, bad = [], False
    for body in TOOL_CALL.findall(reply):
        try:
            call = json.loads(body)
            calls.append({"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}})
        except (json.JSONDecodeError, KeyError, TypeError):
            bad = True
    if bad or not calls:
        return {"role": "assistant", "content": reply}
    return {"role": "assistant", "content": TOOL_CALL.sub("", reply).strip(), "tool_calls": calls}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, synced_gpus: bool = False,
             temperature: float = 0.0, top_p: float = 1.0, streamer=None) -> list[str]:
    """Greedy (temperature 0) or sampled replies to several prompts in one generate call (a streamer
    takes one prompt). Prompts are padded on the left, so every reply starts at the same position.
    A reply stops at the model's generation_config eos, which the loop sets to the template's
    end-of-turn token (e.g. <|im_end|>); generate pads it while others go on, and decoding drops
    both, as special tokens."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                         synced_gpus=synced_gpus, streamer=streamer, **sampling)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
