"""Tool calls and reasoning: read from every shape, rendered token-exact as the official Qwen2.5
and Qwen3 templates render them, each assistant turn trained once exactly as it is generated."""

import copy
import json

import pytest

import templates
from agent_data import AGENT, WEATHER, call
from helpers import launch, losses, train, trained_text
from templates import DataError


def conversation(name):
    return templates.to_conversation(copy.deepcopy(AGENT[name]))


def as_generated(tok, messages, tools, turn):
    """(prompt ids, reply ids) of assistant turn `turn` at inference with the official template:
    the history rendered with the generation prompt, and what rendering the turn adds, up to <|im_end|>."""
    prompt = tok.apply_chat_template(messages[:turn], tools=tools, tokenize=False, add_generation_prompt=True)
    upto = tok.apply_chat_template(messages[: turn + 1], tools=tools, tokenize=False)
    assert upto.startswith(prompt)
    reply = upto[len(prompt): upto.index("<|im_end|>", len(prompt)) + len("<|im_end|>")]
    return tok(prompt, add_special_tokens=False)["input_ids"], tok(reply, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["one_call", "two_calls_text_args_content", "plain_multi_turn"])
def test_qwen25_with_tools_is_token_exact_and_trains_each_turn_as_generated(qwen_tok, name):
    conv = conversation(name)
    enc = templates.encode(conv, qwen_tok)
    official = qwen_tok.apply_chat_template(conv.messages, tools=conv.tools, tokenize=True, return_dict=False)
    assert enc["input_ids"] == official
    assert templates.encode(conv, qwen_tok, template="tokenizer") == enc
    turns = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
    expected = []
    for t in turns:
        prompt, reply = as_generated(qwen_tok, conv.messages, conv.tools, t)
        assert enc["input_ids"][:len(prompt) + len(reply)] == prompt + reply  # the history as rendered then
        expected.append(qwen_tok.decode(reply))
    assert trained_text(qwen_tok, enc) == expected
    if conv.tools:  # the tools block reaches the template; tool calls are trained, tool responses never
        text = qwen_tok.decode(enc["input_ids"])
        assert "<tools>\n" + json.dumps(conv.tools[0], ensure_ascii=False) in text
        assert all("<tool_response>" not in r and "<tools>" not in r for r in expected)
        assert any("<tool_call>" in r for r in expected)


@pytest.mark.parametrize("name", list(AGENT))
def test_qwen3_one_sample_per_query_each_turn_trained_once_as_generated(qwen3_tok, name):
    """Qwen3's template drops the reasoning of turns before the last user query, so a conversation
    becomes one sample per user query (and a turn rendered otherwise once later turns follow it,
    one of its own): each sample is the official render of a prefix of the conversation, and each
    assistant turn is trained in exactly one sample, with its reasoning, as generated."""
    conv = conversation(name)
    made = templates.samples(conv, "qwen3", qwen3_tok)
    assert made == templates.samples(conv, "tokenizer", qwen3_tok)  # the tokenizer's own template: the same
    enc = templates.encode_many([conv], qwen3_tok, template="qwen3")
    assert enc["conversation"] == [0] * len(made)
    renders = [qwen3_tok.apply_chat_template(conv.messages[:k], tools=conv.tools, tokenize=False)
               for k in range(1, len(conv.messages) + 1)]
    trained = []
    for (text, _), ids, labels in zip(made, enc["input_ids"], enc["labels"]):
        assert text in renders
        assert ids == qwen3_tok(text, add_special_tokens=False)["input_ids"]
        trained += trained_text(qwen3_tok, {"input_ids": ids, "labels": labels})
    turns = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
    expected = [qwen3_tok.decode(as_generated(qwen3_tok, conv.messages, conv.tools, t)[1]) for t in turns]
    assert trained == expected
    queries = sum(m["role"] == "user" for m in conv.messages)
    assert len(made) >= queries
    if name == "reasoning_multi_query":
        assert len(made) == queries == 3
        assert trained[0] == "<think>\n17*3 = 51.\n</think>\n\n51<|im_end|>"
        assert trained[2] == "<think>\nThe tool says 60.\n</think>\n\n60<|im_end|>"  # inline <think> read as reasoning


def test_train_on_turns_last_trains_only_the_turns_after_the_last_query_in_one_sample(qwen3_tok, qwen_tok):
    conv = conversation("reasoning_multi_query")
    made = templates.samples(conv, "qwen3", qwen3_tok, turns="last")
    assert len(made) == 1
    text, spans = made[0]
    assert text == qwen3_tok.apply_chat_template(conv.messages, tools=conv.tools, tokenize=False)
    assert [text[a:b] for a, b in spans] == ["<think>\n\n</think>\n\nYou're welcome.<|im_end|>"]
    plain = templates.samples(conversation("plain_multi_turn"), "qwen2.5", qwen_tok, turns="last")
    assert [plain[0][0][a:b] for a, b in plain[0][1]] == ["Goodbye.<|im_end|>"]


def test_reasoning_on_a_template_without_a_place_for_it_is_an_error_or_inlined_or_dropped(qwen_tok):
    conv = conversation("reasoning_multi_query")
    with pytest.raises(DataError, match=r"messages\[1\] has reasoning .* template 'qwen2.5' has no place for it.*"
                                        r"--reasoning inline .* --reasoning drop"):
        templates.samples(conv, "qwen2.5", qwen_tok)
    (text, spans), = templates.samples(conv, "qwen2.5", qwen_tok, reasoning="inline")
    assert text[spans[0][0]:spans[0][1]] == "<think>\n17*3 = 51.\n</think>\n\n51<|im_end|>"
    (text, spans), = templates.samples(conv, "qwen2.5", qwen_tok, reasoning="drop")
    assert text[spans[0][0]:spans[0][1]] == "51<|im_end|>" and "17*3 = 51." not in text


def test_tool_data_on_a_template_without_tools_is_an_error(qwen_tok):
    with pytest.raises(DataError, match="template 'llama3' has no place for them"):
        templates.samples(conversation("one_call"), "llama3", qwen_tok)


def test_sharegpt_function_call_and_observation_turns_read_as_openai_tool_calls(qwen_tok):
    openai = conversation("one_call")
    sharegpt = {"tools": json.dumps([WEATHER]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "{\"temp\": 21}"},
        {"from": "gpt", "value": "It is 21 °C in Paris."}]}
    assert templates.encode(templates.to_conversation(sharegpt), qwen_tok) == templates.encode(openai, qwen_tok)


@pytest.mark.parametrize("record, match", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                                                      "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}]},
     r"messages\[1\]\.tool_calls\[0\]: a tool call with no function name"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                                      "tool_calls": [call("f", None)]}]},
     r"tool_calls\[0\]: arguments must be an object or the JSON text of one, got NoneType"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                                      "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}]},
     r"arguments must be an object or the JSON text of one, got list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                                      "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     r"its arguments is not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "1"}, {"role": "assistant", "content": "a"}]},
     r"messages\[1\]: a tool turn with no assistant tool call before it"),
    ({"tools": {"name": "f"}, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     r"tools: must be a list of function schemas"),
    ({"tools": ["f"], "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     r"tools: must be a list of function schemas"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nhmm, 51"}]},
     r"messages\[1\]: the reply opens a <think> block it never closes"),
])
def test_bad_tool_and_reasoning_records_say_what_and_where(record, match):
    with pytest.raises(DataError, match=match):
        templates.to_conversation(record)


def test_tool_records_read_from_a_file_are_rendered_as_written(tmp_path, qwen_tok):
    """Arrow's JSON reader gives objects of the same keys one column order, so a tool schema written
    {"function": {"parameters": ..., "name": ...}} would render with its keys reordered; records
    with such objects are read as written."""
    from sftloop import sft_data

    reordered = {"function": {"parameters": WEATHER["function"]["parameters"], "name": "get_weather",
                              "description": "Current weather in a city"}, "type": "function"}
    records = [AGENT["one_call"], {**AGENT["one_call"], "tools": [reordered]}]
    f = tmp_path / "agent.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    corpus = sft_data.load_corpus([{"spec": str(f)}], qwen_tok, template="qwen2.5", max_len=4096, system_prompt=None,
                                  cache_dir=tmp_path / "cache")
    got = [s["input_ids"] for s in sft_data.first_samples(corpus)]
    assert got == [templates.encode(templates.to_conversation(r), qwen_tok)["input_ids"] for r in records]
    assert '{"function": {"parameters": ' in qwen_tok.decode(got[1])


def test_the_cache_key_and_the_resume_fingerprint_cover_the_rendering_flags(tmp_path, qwen_tok):
    """--reasoning inline or drop gives as many samples in the same order, but other tokens: they
    are tokenized apart, and a checkpoint of one refuses a resume with the other."""
    import batches
    from sftloop import sft_data

    f = tmp_path / "agent.jsonl"
    f.write_text(json.dumps(AGENT["reasoning_multi_query"]) + "\n")
    corpora = {mode: sft_data.load_corpus([{"spec": str(f)}], qwen_tok, template="qwen2.5", max_len=4096,
                                          system_prompt=None, cache_dir=tmp_path / "cache", reasoning=mode)
               for mode in ("inline", "drop")}
    inline, drop = (sft_data.first_samples(c)[0]["input_ids"] for c in corpora.values())
    assert inline != drop and len(inline) > len(drop)
    assert batches.order_fingerprint(corpora["inline"], 1, 0, 1, False, False) != \
        batches.order_fingerprint(corpora["drop"], 1, 0, 1, False, False)


def test_exact_match_expects_the_whole_turn_the_model_must_produce(tmp_path, qwen_tok, qwen3_tok):
    """Held-out rows and --sample_prompts records: the expected reply of a tool-call turn is the
    call as the template writes it, of a reasoning turn its <think> block too; the prompt holds the tools."""
    from sftloop import evaluation

    end = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    record = {**AGENT["one_call"], "messages": AGENT["one_call"]["messages"][:2]}  # ends with the call
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps(record) + "\n")
    (ids, expected), = evaluation.cases_from_file(str(f), qwen_tok, end)
    assert expected == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    prompt = qwen_tok.decode(ids)
    assert "<tools>" in prompt and prompt.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    enc = templates.encode_many([conversation("reasoning_multi_query")], qwen3_tok, template="qwen3")
    cases = [evaluation.case_from_row(i, lab, qwen3_tok, end) for i, lab in zip(enc["input_ids"], enc["labels"])]
    assert [c[1] for c in cases] == ["<think>\n17*3 = 51.\n</think>\n\n51", "<think>\nThe tool says 60.\n</think>\n\n60",
                                     "<think>\n\n</think>\n\nYou're welcome."]


def test_a_generated_reply_reads_back_as_tool_calls():
    from sftloop.generation import parse_reply

    reply = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n' \
            '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert parse_reply(reply) == {"role": "assistant", "content": "Checking.", "tool_calls": [
        call("get_weather", {"city": "Oslo"}), call("add", {"a": 1, "b": 2})]}
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    assert parse_reply(broken) == {"role": "assistant", "content": broken}  # kept as text, not half-read
    assert parse_reply("51") == {"role": "assistant", "content": "51"}


@pytest.mark.slow
def test_dump_samples_writes_what_the_loop_trains_and_trains_nothing(tmp_path, sft_cache, qwen3_tok):
    """Through the loop's own data path: file:line of each sample, one per query for Qwen3, bad
    records named, nothing written but the dump."""
    data = tmp_path / "agent.jsonl"
    data.write_text("".join(json.dumps(AGENT[n]) + "\n" for n in AGENT))
    tok_dir = qwen3_tok.name_or_path
    out, dump = tmp_path / "out", tmp_path / "dump.jsonl"
    p = train(["--output_dir", out, "--train_files", data, "--tokenizer_name_or_path", tok_dir, "--template", "qwen3",
               "--dump_samples", dump], sft_cache)
    rows = [json.loads(line) for line in open(dump)]
    assert not out.exists()
    expected = [(f"{data}:{k + 1}", ids, labels) for k, n in enumerate(AGENT)
                for ids, labels in zip(*(lambda e: (e["input_ids"], e["labels"]))(
                    templates.encode_many([conversation(n)], qwen3_tok, template="qwen3")))]
    assert [(r["source"], r["input_ids"], r["labels"]) for r in rows] == expected
    assert "4 train conversations became 10 samples" in p.stderr
    # the same data on Qwen2.5: the reasoning record is named, with the way out
    p = train(["--output_dir", out, "--train_files", data, "--tokenizer_name_or_path", qwen3_tok.name_or_path,
               "--dump_samples", dump], sft_cache, check=False)
    assert p.returncode == 1 and f"{data}:3: messages[1] has reasoning" in p.stderr and not out.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_agent_data_on_two_processes_trains_and_resumes_the_expanded_samples_as_one_process_does(tmp_path, sft_cache,
                                                                                                 qwen3_tok):
    """Qwen3 agent conversations, one sample per query: an epoch of one process draws each expanded
    sample once; its step-2 checkpoint resumed under accelerate launch with 2 processes (grouped by
    length and packed, as it was trained) goes on with the same samples and the same losses."""
    data = tmp_path / "agent.jsonl"
    data.write_text("".join(json.dumps(AGENT[n]) + "\n" for n in AGENT for _ in range(2)))  # 20 samples
    args = ["--train_files", data, "--tokenizer_name_or_path", qwen3_tok.name_or_path, "--template", "qwen3",
            "--max_steps", 5, "--save_steps", 2, "--optim", "sgd", "--learning_rate", 0.5, "--log_sample_ids",
            "--group_by_length", "--packing"]
    one, two = tmp_path / "one", tmp_path / "two"
    p = train(["--output_dir", one, "--per_device_train_batch_size", 4, *args], sft_cache)
    assert "8 train conversations became 20 samples" in p.stderr
    ids = {r["step"]: r["sample_ids"] for r in map(json.loads, open(one / "sample_ids.jsonl"))}
    assert sorted(i for step in ids.values() for i in step) == list(range(20))
    launch("cpu_ddp.yaml", ["--output_dir", two, "--per_device_train_batch_size", 2, *args,
                            "--resume_from_checkpoint", one / "checkpoint-2"], sft_cache)
    resumed = {r["step"]: r["sample_ids"] for r in map(json.loads, open(two / "sample_ids.jsonl"))}
    assert resumed == {s: i for s, i in ids.items() if s > 2}
    assert losses(two) == pytest.approx({s: v for s, v in losses(one).items() if s > 2}, rel=1e-5)
