"""Conversations -> chat-template text -> token ids and labels.

Three record shapes are accepted (detected per record) and mapped to OpenAI-style messages:
  Belle/ShareGPT  {"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"system", "value": ...}]}
  OpenAI          {"messages": [{"role": ..., "content": ...}]}
  Alpaca          {"instruction": ..., "input": ..., "output": ...}

A conversation is rendered to one string, tokenized once, and the characters of each assistant
reply (its content plus the end-of-turn token that closes it) are mapped to tokens through the
offset mapping. So `input_ids` are exactly what `tokenizer.apply_chat_template` gives at inference,
and `labels` are -100 everywhere except the assistant's replies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np

IGNORE_INDEX = -100
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's chat template, as in its tokenizer_config.json.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Meta-Llama-3-Instruct's chat template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

ROLES = {
    "human": "user", "user": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "system": "system",
}


class DataError(ValueError):
    """A record that cannot be turned into a training conversation; the message says why."""


def _turn(role, content, where: str) -> dict:
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise DataError(f"{where}: unknown role {role!r} (expected one of {sorted(ROLES)})")
    if not isinstance(content, str):
        raise DataError(f"{where}: content must be a string, got {type(content).__name__}")
    return {"role": ROLES[role.lower()], "content": content}


def to_messages(record: dict) -> list[dict]:
    """Map a Belle/ShareGPT, OpenAI or Alpaca record to [{"role", "content"}] with roles
    system/user/assistant. Raises DataError with a readable reason for anything else."""
    if not isinstance(record, dict):
        raise DataError(f"record must be a JSON object, got {type(record).__name__}")
    if record.get("conversations") is not None:
        turns, role_key, content_key, key = record["conversations"], "from", "value", "conversations"
    elif record.get("messages") is not None:
        turns, role_key, content_key, key = record["messages"], "role", "content", "messages"
    elif record.get("instruction") is not None and record.get("output") is not None:
        user = record["instruction"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}" if isinstance(user, str) else user
        messages = [_turn("user", user, "instruction"), _turn("assistant", record["output"], "output")]
        if record.get("system"):
            messages.insert(0, _turn("system", record["system"], "system"))
        return _validated(messages)
    else:
        keys = sorted(k for k, v in record.items() if v is not None)
        raise DataError(f"no conversation found: expected a 'conversations' list, a 'messages' list or "
                        f"'instruction'/'output' fields, got keys {keys}")
    if not isinstance(turns, list):
        raise DataError(f"'{key}' must be a list of turns, got {type(turns).__name__}")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"{key}[{i}] must be an object with '{role_key}' and '{content_key}'")
        messages.append(_turn(t.get(role_key), t.get(content_key), f"{key}[{i}]"))
    return _validated(messages)


def _validated(messages: list[dict]) -> list[dict]:
    if not messages:
        raise DataError("empty conversation")
    first = next((m for m in messages if m["role"] != "system"), None)
    if first is None or not any(m["role"] == "assistant" for m in messages):
        raise DataError("conversation has no assistant turn: nothing to train on")
    if first["role"] != "user":
        raise DataError("conversation starts with the assistant: the first non-system turn must be the user's")
    return messages


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Give a conversation without a system turn the configured one (None: the template's default)."""
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


# Renderers: (text, [(start, end) character spans that are trained]). They reproduce the jinja
# templates above exactly (tests check it), at a fraction of the cost of rendering prefixes.

def _render_qwen25(messages):
    if messages[0]["role"] == "system":
        text, rest = f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n", messages[1:]
    else:
        text, rest = f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n", messages
    parts, spans, pos = [text], [], len(text)
    for m in rest:
        head = f"<|im_start|>{m['role']}\n"
        body = f"{m['content']}<|im_end|>"
        if m["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        parts.append(head + body + "\n")
        pos += len(head) + len(body) + 1
    return "".join(parts), spans


def _render_llama3(messages, bos="<|begin_of_text|>"):
    parts, spans, pos = [bos], [], len(bos)
    for m in messages:
        head = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        body = m["content"].strip() + "<|eot_id|>"
        if m["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        parts.append(head + body)
        pos += len(head) + len(body)
    return "".join(parts), spans


def _render_with_tokenizer(messages, tokenizer):
    """Any HF chat template: an assistant reply is what rendering messages[:i+1] adds to rendering
    messages[:i] with the generation prompt, up to the end of the last special token in it."""
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    text = render(messages)
    specials = [t for t in tokenizer.all_special_tokens if t]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], gen=True), render(messages[: i + 1])
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise DataError("the tokenizer's chat template does not render conversations as growing prefixes "
                            "(it rewrites earlier turns), so assistant replies cannot be located; use a built-in --template")
        reply = upto[len(prompt):]
        stop = max((reply.rfind(s) + len(s) for s in specials if s in reply), default=len(reply))
        spans.append((len(prompt), len(prompt) + stop))
    return text, spans


def _render_tokenizer_template(messages, tokenizer):
    if tokenizer is None or not tokenizer.chat_template:
        raise ValueError("--template tokenizer needs a tokenizer that carries a chat_template")
    return _render_with_tokenizer(messages, tokenizer)


@dataclass(frozen=True)
class Template:
    """A chat template, declared once. Adding one is an entry in TEMPLATES plus its parity test."""
    jinja: str | None  # saved with the trained model for inference; None: the tokenizer's own
    render: Callable  # (messages, tokenizer) -> (text, trained character spans), equal to the jinja's text
    special_tokens: tuple[str, ...] = ()  # the tokenizer must have them
    end_of_turn: str | None = None  # the token closing a reply; None: found by rendering a probe


TEMPLATES = {
    "qwen2.5": Template(QWEN25_CHAT_TEMPLATE, lambda messages, tokenizer: _render_qwen25(messages),
                        ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "llama3": Template(LLAMA3_CHAT_TEMPLATE, lambda messages, tokenizer: _render_llama3(
                           messages, bos=getattr(tokenizer, "bos_token", None) or "<|begin_of_text|>"),
                       ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    "tokenizer": Template(None, _render_tokenizer_template),  # any HF template the tokenizer carries
}


def render(messages: list[dict], template: str = "qwen2.5", tokenizer=None) -> tuple[str, list[tuple[int, int]]]:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {tuple(TEMPLATES)}")
    return TEMPLATES[template].render(messages, tokenizer)


def chat_template_for(template: str, tokenizer, system_prompt: str | None = None) -> str:
    """The jinja template to save with the trained model, so inference renders as training did,
    the --system_prompt included (given to conversations that bring no system turn)."""
    base = TEMPLATES[template].jinja or tokenizer.chat_template
    if system_prompt is None:
        return base
    # A JSON string is a valid jinja string literal (same escapes).
    default = json.dumps({"role": "system", "content": system_prompt}, ensure_ascii=False)
    return ("{%- if not messages or messages[0]['role'] != 'system' %}{%- set messages = [" + default
            + "] + messages %}{%- endif %}" + base)


def end_of_turn(template: str, tokenizer) -> str:
    """The token that closes an assistant reply in this template: what training teaches the model
    to emit last, so generation must stop there (it is not always the tokenizer's eos)."""
    if TEMPLATES[template].end_of_turn:
        return TEMPLATES[template].end_of_turn
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    text, spans = render(probe, template, tokenizer)
    reply = text[spans[-1][0]:spans[-1][1]]
    found = [(reply.rfind(t), t) for t in tokenizer.all_special_tokens if t and t in reply]
    return max(found)[1] if found else tokenizer.eos_token


def _labels(enc, spans) -> list[int]:
    """A token is trained when all its characters lie in an assistant span. A token that straddles
    the span's start (a reply starting with a newline merges with the header's) holds a header
    character, so it stays masked.

    Tokens follow the text in order, so each span's trained tokens are one run, found from the
    tokens at its two ends (a few lookups) rather than from every token's offsets."""
    ids = enc.ids
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        if b <= a:
            continue
        first, last = enc.char_to_token(a), enc.char_to_token(b - 1)
        if first is None or last is None:  # a character no token holds: take every token's offsets
            return _labels_from_offsets(ids, enc.offsets, spans)
        while first <= last and enc.token_to_chars(first)[0] < a:
            first += 1
        # the last character's bytes may go on into the next tokens (byte-level BPE splits characters)
        while last + 1 < len(ids) and a <= enc.token_to_chars(last + 1)[0] and enc.token_to_chars(last + 1)[1] <= b:
            last += 1
        while last >= first and enc.token_to_chars(last)[1] > b:
            last -= 1
        labels[first:last + 1] = ids[first:last + 1]
    return labels


def _labels_from_offsets(input_ids: list[int], offsets, spans) -> list[int]:
    ids = np.asarray(input_ids, dtype=np.int64)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    keep = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        keep |= (off[:, 0] >= a) & (off[:, 1] <= b)
    return np.where(keep, ids, IGNORE_INDEX).tolist()


def encode_many(conversations: list[list[dict]], tokenizer, template: str = "qwen2.5", max_len: int | None = None,
                system_prompt: str | None = None) -> dict[str, list]:
    """Batched encode: one call into the (Rust) tokenizer for all rendered texts. "truncated" says
    which conversations were longer than max_len (and cut to their first max_len tokens)."""
    rendered = [render(with_system_prompt(m, system_prompt), template, tokenizer) for m in conversations]
    # The Rust tokenizer itself, as transformers calls it, without turning every encoding into
    # Python lists of offsets and masks first (that conversion cost more than the tokenizing).
    encodings = tokenizer.backend_tokenizer.encode_batch([t for t, _ in rendered], add_special_tokens=False)
    out = {"input_ids": [], "labels": [], "truncated": []}
    for enc, (_, spans) in zip(encodings, rendered):
        ids, labels = enc.ids, _labels(enc, spans)
        out["truncated"].append(max_len is not None and len(ids) > max_len)
        if max_len is not None:  # keep the start: the system prompt and first turns
            ids, labels = ids[:max_len], labels[:max_len]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def encode(messages: list[dict], tokenizer, template: str = "qwen2.5", max_len: int | None = None,
           system_prompt: str | None = None) -> dict[str, list[int]]:
    """{"input_ids", "labels"} for one conversation; input_ids equal apply_chat_template's."""
    enc = encode_many([messages], tokenizer, template, max_len, system_prompt)
    return {"input_ids": enc["input_ids"][0], "labels": enc["labels"][0]}
