"""Conversations -> chat-template text -> token ids and labels.

Three record shapes are accepted (detected per record) and mapped to OpenAI-style messages, with
the record's `tools` (a list of function schemas) beside them:
  Belle/ShareGPT  {"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value": ...}],
                   "tools": [...] or its JSON text}
  OpenAI          {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...,
                                 "tool_calls": [...], "reasoning_content": ...}], "tools": [...]}
  Alpaca          {"instruction": ..., "input": ..., "output": ...}
Reasoning comes as `reasoning_content` or as a reply that opens with `<think>...</think>`; tool
call arguments as an object or the JSON text of one. All of it is normalised here (to_conversation).

A conversation becomes one or more samples (samples()): each is one rendered string, tokenized
once, whose trained characters (the replies of the assistant turns it trains, each up to and with
the end-of-turn token) are mapped to tokens through the offsets. A template that only appends
(Qwen2.5, Llama 3) gives one sample per conversation. One that rewrites earlier turns (Qwen3 drops
the reasoning of turns before the last user query) gives one per user query: the conversation up
to the next query, training the turns after this one, so every turn is trained once, rendered as
the model produces it at inference. `input_ids` are exactly what `tokenizer.apply_chat_template`
gives, and `labels` are -100 everywhere but the trained replies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np

IGNORE_INDEX = -100
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TURNS = ("all", "last")  # --train_on_turns
REASONING = ("keep", "inline", "drop")  # --reasoning

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

# Qwen3's chat template, as in its tokenizer_config.json: reasoning is rendered for the turns after
# the last user query only, so a conversation renders its earlier turns differently as it grows.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

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
    "tool": "tool", "observation": "tool", "function": "tool",
}
TOOL_CALL_ROLE = "function_call"  # ShareGPT tool data: an assistant turn whose value is the call(s) as JSON


class DataError(ValueError):
    """A record that cannot be turned into a training conversation; the message says why."""


@dataclass(frozen=True)
class Conversation:
    """OpenAI-style messages (roles system/user/assistant/tool; an assistant turn may carry
    `reasoning_content` and `tool_calls`) and the function schemas the template is given."""
    messages: list
    tools: list | None = None


def _json_text(value, what: str, where: str):
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: {what} is not valid JSON ({e})") from None


def _tool_calls(calls, where: str) -> list[dict]:
    """Calls as {"type": "function", "function": {"name", "arguments": object}}, from OpenAI's form,
    the bare {"name", "arguments"} form, or arguments written as JSON text."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: tool calls must be a list of calls, got {type(calls).__name__}")
    out = []
    for i, call in enumerate(calls):
        at = f"{where}[{i}]"
        if not isinstance(call, dict):
            raise DataError(f"{at}: a tool call must be an object, got {type(call).__name__}")
        fn = call["function"] if isinstance(call.get("function"), dict) else call
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{at}: a tool call with no function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            args = _json_text(args, "its arguments", at) if args.strip() else {}
        if not isinstance(args, dict):
            raise DataError(f"{at}: arguments must be an object or the JSON text of one, got {type(args).__name__}")
        out.append({"type": "function", "function": {"name": name, "arguments": args},
                    **({"id": call["id"]} if call.get("id") is not None else {})})
    return out


def _split_think(content: str, where: str) -> tuple[str | None, str]:
    """A reply that opens with <think>...</think>: (the reasoning, the rest), as Qwen3's template splits it."""
    if not content.lstrip().startswith("<think>"):
        return None, content
    if "</think>" not in content:
        raise DataError(f"{where}: the reply opens a <think> block it never closes")
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


def _turn(turn: dict, role_key: str, content_key: str, where: str) -> dict:
    role, content = turn.get(role_key), turn.get(content_key)
    if isinstance(role, str) and role.lower() == TOOL_CALL_ROLE:
        calls = _json_text(content, "the function call", where) if isinstance(content, str) else content
        return {"role": "assistant", "content": "", "tool_calls": _tool_calls(calls, where)}
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise DataError(f"{where}: unknown role {role!r} (expected one of {sorted(ROLES) + [TOOL_CALL_ROLE]})")
    role = ROLES[role.lower()]
    calls = turn.get("tool_calls") if role == "assistant" else None
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise DataError(f"{where}: content must be a string, got {type(content).__name__}")
    message = {"role": role, "content": content}
    if role == "assistant":
        reasoning = turn.get("reasoning_content")
        if reasoning is None:
            reasoning, message["content"] = _split_think(content, where)
        elif not isinstance(reasoning, str):
            raise DataError(f"{where}: reasoning_content must be a string, got {type(reasoning).__name__}")
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
    elif role == "tool":
        message.update({k: turn[k] for k in ("name", "tool_call_id") if turn.get(k) is not None})
    return message


def _tools(record: dict) -> list | None:
    tools = record.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        tools = _json_text(tools, "tools", "tools")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"tools: must be a list of function schemas (objects), got {json.dumps(tools)[:80]}")
    return tools or None


def to_conversation(record: dict) -> Conversation:
    """Map a Belle/ShareGPT, OpenAI or Alpaca record to a Conversation. Raises DataError with a
    readable reason (and where in the record) for anything else."""
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
        turns = [{"from": "user", "value": user}, {"from": "assistant", "value": record["output"]}]
        messages = [_turn(t, "from", "value", name) for t, name in zip(turns, ("instruction", "output"))]
        if record.get("system"):
            messages.insert(0, _turn({"from": "system", "value": record["system"]}, "from", "value", "system"))
        return Conversation(_validated(messages, "messages"), _tools(record))
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
        messages.append(_turn(t, role_key, content_key, f"{key}[{i}]"))
    if key == "conversations" and isinstance(record.get("system"), str) and record["system"] and messages[:1] \
            and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": record["system"]})
    return Conversation(_validated(messages, key), _tools(record))


def to_messages(record: dict) -> list[dict]:
    """The messages of a record (to_conversation's, without the tools)."""
    return to_conversation(record).messages


def _validated(messages: list[dict], key: str) -> list[dict]:
    if not messages:
        raise DataError("empty conversation")
    first = next((m for m in messages if m["role"] != "system"), None)
    if first is None or not any(m["role"] == "assistant" for m in messages):
        raise DataError("conversation has no assistant turn: nothing to train on")
    if first["role"] != "user":
        raise DataError("conversation starts with the assistant: the first non-system turn must be the user's")
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            before = next((p for p in reversed(messages[:i]) if p["role"] != "tool"), None)
            if before is None or not before.get("tool_calls"):
                raise DataError(f"{key}[{i}]: a tool turn with no assistant tool call before it")
    return messages


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Give a conversation without a system turn the configured one (None: the template's default)."""
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


# ---------------------------------------------------------------------------------------------
# Renderers. They reproduce the jinja templates above exactly (tests check it), at a fraction of
# the cost of jinja. An appending template's renderer gives the text and each assistant turn's
# trained span (start, end); a rewriting one's gives the text only, and samples() locates the turns.
# ---------------------------------------------------------------------------------------------

def _tojson(value) -> str:
    return json.dumps(value, ensure_ascii=False)  # as transformers' tojson filter


QWEN_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                   "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                   "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                   "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")


def _qwen_tools_block(tools) -> str:
    return QWEN_TOOLS_HEAD + "".join("\n" + _tojson(t) for t in tools) + QWEN_TOOLS_TAIL


def _qwen_tool_call(call, arguments_as_text: bool) -> str:
    fn = call.get("function") or call
    args = fn["arguments"]
    args = args if arguments_as_text and isinstance(args, str) else _tojson(args)
    return '<tool_call>\n{"name": "' + fn["name"] + '", "arguments": ' + args + '}\n</tool_call>'


def _qwen_tool_turn(messages, i) -> str:
    first = i == 0 or messages[i - 1]["role"] != "tool"
    last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
    return (("<|im_start|>user" if first else "") + f"\n<tool_response>\n{messages[i]['content']}\n</tool_response>"
            + ("<|im_end|>\n" if last else ""))


def _render_qwen25(messages, tools):
    system = messages[0]["content"] if messages[0]["role"] == "system" else QWEN_DEFAULT_SYSTEM
    if tools:
        parts = [f"<|im_start|>system\n{system}\n\n{_qwen_tools_block(tools)}"]
    else:
        parts = [f"<|im_start|>system\n{system}<|im_end|>\n"]
    spans, pos = {}, len(parts[0])
    for i, m in enumerate(messages):
        if i == 0 and m["role"] == "system":
            continue
        if m["role"] == "tool":
            part = _qwen_tool_turn(messages, i)
        elif m["role"] == "assistant" and m.get("tool_calls"):
            head = "<|im_start|>assistant"
            body = (f"\n{m['content']}" if m["content"] else "") + "".join(
                "\n" + _qwen_tool_call(c, arguments_as_text=False) for c in m["tool_calls"]) + "<|im_end|>"
            part = head + body + "\n"
            spans[i] = (pos + len(head) + 1, pos + len(head) + len(body))  # after the "\n" the prompt ends with
        else:
            head, body = f"<|im_start|>{m['role']}\n", f"{m['content']}<|im_end|>"
            part = head + body + "\n"
            if m["role"] == "assistant":
                spans[i] = (pos + len(head), pos + len(head) + len(body))
        parts.append(part)
        pos += len(part)
    return "".join(parts), spans


def _render_qwen3(messages, tools, add_generation_prompt=False):
    parts = []
    if tools:
        system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
        parts.append(f"<|im_start|>system\n{system}{_qwen_tools_block(tools)}")
    elif messages[0]["role"] == "system":
        parts.append(f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n")
    last_query = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user" and not (
        messages[i]["content"].startswith("<tool_response>") and messages[i]["content"].endswith("</tool_response>"))),
        len(messages) - 1)
    for i, m in enumerate(messages):
        content, last = m["content"], i == len(messages) - 1
        if m["role"] == "user" or (m["role"] == "system" and i > 0):
            parts.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
        elif m["role"] == "assistant":
            reasoning = m.get("reasoning_content")
            if not isinstance(reasoning, str):
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
            if i > last_query and (last or reasoning):
                parts.append(f"<|im_start|>assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}")
            else:
                parts.append(f"<|im_start|>assistant\n{content}")
            for k, call in enumerate(m.get("tool_calls") or []):
                parts.append(("\n" if k or content else "") + _qwen_tool_call(call, arguments_as_text=True))
            parts.append("<|im_end|>\n")
        elif m["role"] == "tool":
            parts.append(_qwen_tool_turn(messages, i))
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _render_llama3(messages, bos="<|begin_of_text|>"):
    parts, spans, pos = [bos], {}, len(bos)
    for i, m in enumerate(messages):
        head = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        body = m["content"].strip() + "<|eot_id|>"
        if m["role"] == "assistant":
            spans[i] = (pos + len(head), pos + len(head) + len(body))
        parts.append(head + body)
        pos += len(head) + len(body)
    return "".join(parts), spans


def _render_tokenizer_template(messages, tools, tokenizer, add_generation_prompt=False):
    if tokenizer is None or not tokenizer.chat_template:
        raise ValueError("--template tokenizer needs a tokenizer that carries a chat_template")
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's own errors, and raise_exception() in templates that check their input
        raise DataError(f"the tokenizer's chat template failed on this conversation: {type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:300]}") from None


@dataclass(frozen=True)
class Template:
    """A chat template, declared once. Adding one is an entry in TEMPLATES plus its parity test."""
    jinja: str | None  # saved with the trained model for inference; None: the tokenizer's own
    # appends: (messages, tools, tokenizer) -> (text, {assistant turn index: trained span});
    # otherwise (messages, tools, tokenizer, add_generation_prompt) -> text. Equal to the jinja's text.
    render: Callable
    appends: bool  # a turn renders the same whatever follows it: one sample per conversation
    special_tokens: tuple[str, ...] = ()  # the tokenizer must have them
    end_of_turn: str | None = None  # the token closing a reply; None: found by rendering a probe
    tools: bool | None = None  # renders tools and tool calls (None: found by rendering a probe)
    reasoning: bool | None = None  # renders reasoning_content (None: found by rendering a probe)


TEMPLATES = {
    "qwen2.5": Template(QWEN25_CHAT_TEMPLATE, lambda messages, tools, tokenizer: _render_qwen25(messages, tools),
                        True, ("<|im_start|>", "<|im_end|>"), "<|im_end|>", tools=True, reasoning=False),
    "qwen3": Template(QWEN3_CHAT_TEMPLATE, lambda messages, tools, tokenizer, gen=False: _render_qwen3(messages, tools, gen),
                      False, ("<|im_start|>", "<|im_end|>", "<think>", "</think>"), "<|im_end|>", tools=True, reasoning=True),
    "llama3": Template(LLAMA3_CHAT_TEMPLATE, lambda messages, tools, tokenizer: _render_llama3(
                           messages, bos=getattr(tokenizer, "bos_token", None) or "<|begin_of_text|>"),
                       True, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>",
                       tools=False, reasoning=False),
    "tokenizer": Template(None, _render_tokenizer_template, False),  # any HF template the tokenizer carries
}


def _template(template: str) -> Template:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {tuple(TEMPLATES)}")
    return TEMPLATES[template]


_PROBE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe_tool_x7", "parameters": {}}}]


def abilities(template: str, tokenizer) -> tuple[bool, bool]:
    """(renders tools and tool calls, renders reasoning): declared, or seen by rendering a probe."""
    t = _template(template)
    if t.tools is not None:
        return t.tools, t.reasoning
    key = (template, tokenizer.chat_template if tokenizer is not None else None)
    if key not in _ABILITIES:
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "probe_call_q3", "arguments": {}}}]}
        try:
            tools_seen = "probe_tool_x7" in t.render(_PROBE, _PROBE_TOOLS, tokenizer) and \
                "probe_call_q3" in t.render(_PROBE[:1] + [call], None, tokenizer)
        except DataError:
            tools_seen = False
        try:
            thought = [_PROBE[0], {**_PROBE[1], "reasoning_content": "probe_thought_z5"}]
            thinks = "probe_thought_z5" in t.render(thought, None, tokenizer)
        except DataError:
            thinks = False
        _ABILITIES[key] = (tools_seen, thinks)
    return _ABILITIES[key]


_ABILITIES: dict = {}  # (template, tokenizer, its chat template) -> abilities, end of turn: found once


def prepared(conv: Conversation, template: str, tokenizer, system_prompt, reasoning: str) -> Conversation:
    """The conversation as the template gets it: the system prompt given, the reasoning kept,
    inlined or dropped (--reasoning), tool data refused by a template with no place for it."""
    messages = with_system_prompt(conv.messages, system_prompt)
    tools_ok, reasoning_ok = abilities(template, tokenizer)
    thinking = [i for i, m in enumerate(messages) if m.get("reasoning_content")]
    if thinking and reasoning == "drop":
        messages = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]
    elif thinking and reasoning == "inline":
        messages = [{**{k: v for k, v in m.items() if k != "reasoning_content"},
                     "content": f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}"}
                    if m.get("reasoning_content") else m for m in messages]
    elif thinking and not reasoning_ok:
        raise DataError(f"messages[{thinking[0]}] has reasoning (reasoning_content or a <think> block) and template "
                        f"{template!r} has no place for it: use a template that renders reasoning (--template qwen3, "
                        "or --template tokenizer with such a template), or say what to do with it: --reasoning inline "
                        "(trained as <think> text before the reply) or --reasoning drop")
    uses_tools = conv.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if uses_tools and not tools_ok:
        raise DataError(f"the conversation has tools, tool calls or tool turns and template {template!r} has no "
                        "place for them: use --template qwen2.5, qwen3, or tokenizer with a template that renders tools")
    return Conversation(messages, conv.tools)


def _located(messages, tools, turn: int, text: str, render, eot: str) -> tuple[int, int] | None:
    """Where assistant turn `turn` is in `text` (a render of messages[:end], end > turn), if it is
    there exactly as at inference: after the history as rendered then, with the generation prompt,
    and the reply as the model produces it (rendered as the last turn), up to the end-of-turn token."""
    prompt = render(messages[:turn], tools, True)
    if not text.startswith(prompt):
        return None
    end = text.find(eot, len(prompt))
    alone = render(messages[: turn + 1], tools, False)
    if end < 0 or alone[len(prompt): end + len(eot)] != text[len(prompt): end + len(eot)] or not alone.startswith(prompt):
        return None
    return len(prompt), end + len(eot)


def samples(conv: Conversation | list, template: str = "qwen2.5", tokenizer=None, system_prompt: str | None = None,
            reasoning: str = "keep", turns: str = "all") -> list[tuple[str, list[tuple[int, int]]]]:
    """The samples a conversation becomes: [(text, trained character spans)] (module docstring).
    turns="last" trains only the assistant turns after the last user query (one sample)."""
    conv = conv if isinstance(conv, Conversation) else Conversation(conv)
    t = _template(template)
    conv = prepared(conv, template, tokenizer, system_prompt, reasoning)
    messages, tools = conv.messages, conv.tools
    queries = [i for i, m in enumerate(messages) if m["role"] == "user"]
    todo = [i for i, m in enumerate(messages) if m["role"] == "assistant" and (turns == "all" or i > queries[-1])]
    if t.appends:
        text, spans = t.render(messages, tools, tokenizer)
        return [(text, [spans[i] for i in todo])]
    def render(msgs, tools, add_generation_prompt):
        return t.render(msgs, tools or None, tokenizer, add_generation_prompt)

    eot = end_of_turn(template, tokenizer)
    out = []
    while todo:
        first = todo[0]
        # the longest sample that holds `first` as at inference: the whole conversation, up to the
        # next user query, or up to `first` itself (a turn rendered otherwise once later turns follow)
        for end in dict.fromkeys((len(messages), next((q for q in queries if q > first), len(messages)), first + 1)):
            text = render(messages[:end], tools, False)
            spans = []
            for turn in (i for i in todo if i < end):
                span = _located(messages, tools, turn, text, render, eot)
                if span is None:
                    break
                spans.append(span)
            if spans:
                break
        else:
            raise DataError(f"messages[{first}]: the chat template does not render this assistant turn after its "
                            "history with the generation prompt, so its reply cannot be located")
        out.append((text, spans))
        todo = todo[len(spans):]
    return out


def render(messages: list[dict], template: str = "qwen2.5", tokenizer=None, tools=None) -> tuple[str, list[tuple[int, int]]]:
    """The text of a whole conversation and its trained spans, for a template that renders it as one sample."""
    out = samples(Conversation(messages, tools), template, tokenizer)
    if len(out) != 1:
        raise ValueError(f"template {template!r} makes {len(out)} samples of this conversation; use samples()")
    return out[0]


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
    t = _template(template)
    if t.end_of_turn:
        return t.end_of_turn
    key = ("end_of_turn", template, tokenizer.chat_template, tuple(tokenizer.all_special_tokens))
    if key not in _ABILITIES:
        prompt, text = t.render(_PROBE[:1], None, tokenizer, True), t.render(_PROBE, None, tokenizer, False)
        reply = text[len(prompt):] if text.startswith(prompt) else text
        found = [(reply.rfind(s), s) for s in tokenizer.all_special_tokens if s and s in reply]
        _ABILITIES[key] = max(found)[1] if found else tokenizer.eos_token
    return _ABILITIES[key]

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


def encode_rendered(rendered: list[tuple[str, list]], tokenizer, max_len: int | None = None) -> dict[str, list]:
    """Rendered samples to token ids and labels, in one call into the (Rust) tokenizer. "truncated"
    says which samples were longer than max_len (and cut to their first max_len tokens)."""
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


def encode_many(conversations: list, tokenizer, template: str = "qwen2.5", max_len: int | None = None,
                system_prompt: str | None = None, reasoning: str = "keep", turns: str = "all") -> dict[str, list]:
    """Conversations (Conversation or a list of messages) to samples, tokenized in one batch;
    "conversation" says which conversation each sample comes from."""
    rendered, owner = [], []
    for k, conv in enumerate(conversations):
        made = samples(conv, template, tokenizer, system_prompt, reasoning, turns)
        rendered += made
        owner += [k] * len(made)
    return {**encode_rendered(rendered, tokenizer, max_len), "conversation": owner}


def encode(conversation, tokenizer, template: str = "qwen2.5", max_len: int | None = None,
           system_prompt: str | None = None, reasoning: str = "keep", turns: str = "all") -> dict[str, list[int]]:
    """{"input_ids", "labels"} for a conversation that is one sample; input_ids equal apply_chat_template's."""
    enc = encode_many([conversation], tokenizer, template, max_len, system_prompt, reasoning, turns)
    if len(enc["input_ids"]) != 1:
        raise ValueError(f"template {template!r} makes {len(enc['input_ids'])} samples of this conversation; "
                         "use encode_many")
    return {"input_ids": enc["input_ids"][0], "labels": enc["labels"][0]}
