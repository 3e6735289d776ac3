"""The project's own tool-calling and reasoning conversations (OpenAI form), for tests."""
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                          "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
       "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}

def call(name, args, as_text=False):
    import json
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args) if as_text else args}}

AGENT = {
    "one_call": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21 °C in Paris."}]},
    "two_calls_text_args_content": {"tools": [WEATHER, ADD], "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Oslo and Rome, and 2+3?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", {"city": "Oslo", "unit": "c"}, True),
                                                                         call("get_weather", {"city": "Rome"}, True)]},
        {"role": "tool", "content": "4"}, {"role": "tool", "content": "19"},
        {"role": "assistant", "content": None, "tool_calls": [call("add", {"a": 2, "b": 3})]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "Oslo 4, Rome 19; 2+3=5."}]},
    "reasoning_multi_query": {"tools": [ADD], "messages": [
        {"role": "user", "content": "What is 17*3?"},
        {"role": "assistant", "content": "51", "reasoning_content": "17*3 = 51."},
        {"role": "user", "content": "Add 9 to it."},
        {"role": "assistant", "content": "", "reasoning_content": "Use the tool.", "tool_calls": [call("add", {"a": 51, "b": 9})]},
        {"role": "tool", "content": "60"},
        {"role": "assistant", "content": "<think>\nThe tool says 60.\n</think>\n\n60"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."}]},
    "plain_multi_turn": {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
}
