"""Chat templates: train/inference parity on the real Qwen2.5 tokenizer, and exactly which tokens train."""

import copy
import unicodedata

import pytest

import templates
from helpers import trained_text
from templates import IGNORE_INDEX, DataError

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hi! How can I help?"}],
    "multi_turn_system": [
        SYSTEM,
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "12"},
    ],
    "chinese": [{"role": "user", "content": "你好，请介绍一下北京。"}, {"role": "assistant", "content": "北京是中国的首都，历史悠久。"},
                {"role": "user", "content": "再说说上海"}, {"role": "assistant", "content": "上海是国际化大都市。"}],
    "emoji": [{"role": "user", "content": "🙂🚀 what do these mean?"}, {"role": "assistant", "content": "A smile 😀 and a rocket 🚀."}],
    "code": [{"role": "user", "content": "Write a loop"},
             {"role": "assistant", "content": "```python\nfor i in range(3):\n\tprint(i)  # done\n```"}],
    "odd_whitespace": [{"role": "user", "content": "  leading and trailing  \n\n"},
                       {"role": "assistant", "content": "\n\n  indented\r\n\ttabs \u00a0nbsp  "},
                       {"role": "user", "content": " "}, {"role": "assistant", "content": ""}],
    "non_nfc": [{"role": "user", "content": "Cafe\u0301"}, {"role": "assistant", "content": "e\u0301te\u0301"}],
}


def test_rebuilt_qwen_tokenizer_matches_known_ids(qwen_tok):
    assert qwen_tok("你好")["input_ids"] == [108386]
    assert qwen_tok("Hello world")["input_ids"] == [9707, 1879]
    assert qwen_tok("<|im_start|>user\n")["input_ids"] == [151644, 872, 198]
    assert len(qwen_tok) == 151665
    assert qwen_tok.pad_token == "<|endoftext|>" and qwen_tok.pad_token_id == 151643
    assert qwen_tok.eos_token == "<|im_end|>" and qwen_tok.eos_token_id == 151645


def test_qwen_template_renders_like_the_official_one(qwen_tok):
    text = qwen_tok.apply_chat_template(CONVERSATIONS["single"], tokenize=False)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\nHi! How can I help?<|im_end|>\n")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_input_ids_equal_apply_chat_template(qwen_tok, name):
    msgs = CONVERSATIONS[name]
    enc = templates.encode(msgs, qwen_tok)
    assert enc["input_ids"] == qwen_tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    # the generic path (the tokenizer's own template, located by rendering prefixes) agrees exactly
    assert templates.encode(msgs, qwen_tok, template="tokenizer") == enc


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_only_assistant_replies_and_their_im_end_are_trained(qwen_tok, name):
    msgs = CONVERSATIONS[name]
    enc = templates.encode(msgs, qwen_tok)
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    # one trained run per reply, each exactly the reply (NFC-normalised, as the tokenizer does) + <|im_end|>,
    # except leading newlines that the tokenizer merges with the header's own newline (masked with it)
    runs = trained_text(qwen_tok, enc)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        reply = unicodedata.normalize("NFC", reply) + "<|im_end|>"
        assert run == reply or (reply.endswith(run) and reply[:len(reply) - len(run)].strip("\n") == "")
    im_start, im_end = qwen_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids, labels = enc["input_ids"], enc["labels"]
    # every <|im_start|> is masked; <|im_end|> is trained only where it closes an assistant turn
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t == im_start)
    assert sum(1 for i, t in enumerate(ids) if t == im_end and labels[i] == im_end) == len(replies)
    # the newline after each <|im_end|> is a template separator, not trained
    assert all(labels[i + 1] == IGNORE_INDEX for i, t in enumerate(ids[:-1]) if t == im_end)


def test_user_role_is_user_never_human(qwen_tok):
    msgs = templates.to_messages({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    text = qwen_tok.decode(templates.encode(msgs, qwen_tok)["input_ids"])
    assert "<|im_start|>user\nhi<|im_end|>" in text and "human" not in text


def test_system_prompt_override_and_default(qwen_tok):
    msgs = CONVERSATIONS["single"]
    default = qwen_tok.decode(templates.encode(msgs, qwen_tok)["input_ids"])
    assert "You are Qwen, created by Alibaba Cloud." in default
    enc = templates.encode(msgs, qwen_tok, system_prompt="You are a helpful assistant.")
    assert enc["input_ids"] == qwen_tok.apply_chat_template([SYSTEM] + msgs, tokenize=True, return_dict=False)
    # the saved template carries the override, so inference without a system turn renders the same
    tok = copy.deepcopy(qwen_tok)
    tok.chat_template = templates.chat_template_for("qwen2.5", tok, "You are a helpful assistant.")
    assert tok.apply_chat_template(msgs, tokenize=True, return_dict=False) == enc["input_ids"]
    # a conversation's own system turn wins over the flag
    own = CONVERSATIONS["multi_turn_system"]
    assert templates.encode(own, qwen_tok, system_prompt="other")["input_ids"] == \
        qwen_tok.apply_chat_template(own, tokenize=True, return_dict=False)


def test_generation_prompt_is_a_prefix_of_training_text(qwen_tok):
    msgs = CONVERSATIONS["multi_turn_system"]
    prompt = qwen_tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
    enc = templates.encode(msgs, qwen_tok)
    assert enc["input_ids"][:len(prompt)] == prompt
    # the assistant header that ends the prompt is masked; the reply right after it is trained
    n = len(prompt)
    assert enc["labels"][n - 3:n] == [IGNORE_INDEX] * 3 and enc["labels"][n] == enc["input_ids"][n]


@pytest.fixture(scope="module")
def llama3_tok(qwen_tok):
    tok = copy.deepcopy(qwen_tok)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>",
                            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = templates.LLAMA3_CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("name", ["single", "multi_turn_system", "chinese", "odd_whitespace"])
def test_llama3_template(llama3_tok, name):
    msgs = CONVERSATIONS[name]
    enc = templates.encode(msgs, llama3_tok, template="llama3")
    assert enc["input_ids"] == llama3_tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    replies = [m["content"].strip() for m in msgs if m["role"] == "assistant"]
    assert trained_text(llama3_tok, enc) == [r + "<|eot_id|>" for r in replies]
    assert templates.encode(msgs, llama3_tok, template="tokenizer") == enc


@pytest.mark.parametrize("record, expected", [
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]},
     [("system", "S"), ("user", "q"), ("assistant", "a")]),
    ({"conversations": [{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}]}, [("user", "q"), ("assistant", "a")]),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, [("user", "q"), ("assistant", "a")]),
    ({"instruction": "Translate", "input": "hello", "output": "你好"}, [("user", "Translate\n\nhello"), ("assistant", "你好")]),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, [("user", "Say hi"), ("assistant", "hi")]),
])
def test_record_shapes(record, expected):
    assert [(m["role"], m["content"]) for m in templates.to_messages(record)] == expected


@pytest.mark.parametrize("record, match", [
    ({"text": "hello"}, "no conversation found"),
    ({"conversations": []}, "empty conversation"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "no assistant turn"),
    ({"conversations": [{"from": "assistant", "value": "a"}, {"from": "human", "value": "q"}]}, "starts with the assistant"),
    ({"conversations": [{"from": "robot", "value": "a"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "must be a string"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_records_say_why(record, match):
    with pytest.raises(DataError, match=match):
        templates.to_messages(record)


def test_truncation_keeps_the_start(qwen_tok):
    msgs = CONVERSATIONS["multi_turn_system"]
    full = templates.encode(msgs, qwen_tok)
    cut = templates.encode(msgs, qwen_tok, max_len=20)
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]


@pytest.mark.parametrize("template", ["qwen2.5", "llama3", "tokenizer"])
def test_every_template_keeps_the_system_prompt_for_inference(llama3_tok, qwen_tok, template):
    """The saved chat template gives a conversation without a system turn the --system_prompt, so
    chat.py and sample prompts render exactly as training did."""
    base = qwen_tok if template == "qwen2.5" else llama3_tok
    prompt = 'Be brief.\nSay "no" if unsure\\ 好的'  # quotes, a newline, a backslash and non-ASCII survive
    for msgs in (CONVERSATIONS["single"], CONVERSATIONS["multi_turn_system"]):
        enc = templates.encode(msgs, base, template=template, system_prompt=prompt)
        tok = copy.deepcopy(base)
        tok.chat_template = templates.chat_template_for(template, base, prompt)
        assert tok.apply_chat_template(msgs, tokenize=True, return_dict=False) == enc["input_ids"]
        with_header = tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
        assert enc["input_ids"][:len(with_header)] == with_header


def test_end_of_turn_is_the_templates_not_the_tokenizers_eos(llama3_tok):
    """llama3_tok's eos is Qwen's <|im_end|>, but its template ends a reply with <|eot_id|>."""
    assert llama3_tok.eos_token == "<|im_end|>"
    assert templates.end_of_turn("llama3", llama3_tok) == "<|eot_id|>"
    assert templates.end_of_turn("tokenizer", llama3_tok) == "<|eot_id|>"  # found by rendering


def test_labels_from_the_span_ends_equal_labels_from_every_tokens_offsets(qwen_tok):
    """encode_many finds each reply's trained tokens from the tokens at its two ends; every token's
    character offsets (the slower way) must give the very same labels, also where a character's bytes
    are split over tokens (emoji, CJK) or a reply's first newline merges with the header's."""
    replies = ["\n\nhi", "hi\n\n", " 😀 ok 😀", "e\u0301 café", "\n", "  ", "中文\n", "😀", "🧑‍🚀🧑‍🚀 a", "x" * 300, ""]
    convs = [[{"role": "user", "content": "q 😀"}, {"role": "assistant", "content": r},
              {"role": "user", "content": "again"}, {"role": "assistant", "content": r[::-1]}] for r in replies]
    fast = templates.encode_many(convs, qwen_tok)
    for conv, ids, labels in zip(convs, fast["input_ids"], fast["labels"]):
        text, spans = templates.render(conv, "qwen2.5", qwen_tok)
        enc = qwen_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == enc["input_ids"]
        assert labels == templates._labels_from_offsets(enc["input_ids"], enc["offset_mapping"], spans), conv[1]
