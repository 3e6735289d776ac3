"""Tool-calling conversations for a real chat model (SmolLM2-135M-Instruct, bench/tools.py): a
request that needs one of two functions, the call with its arguments taken from the request, the
function's result, and the answer built from it (OpenAI format, with the record's `tools`).

    python data/make_tool_data.py    # writes data/tools_train.jsonl and data/tools_eval.jsonl

The held-out requests name cities and amounts the training set never shows, so a right call
there is not a memorised one."""

import json
import random
from pathlib import Path

DIR = Path(__file__).resolve().parent
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "convert_currency", "description": "Convert US dollars to a currency",
                                      "parameters": {"type": "object", "properties": {
                                          "amount": {"type": "number"}, "to": {"type": "string"}},
                                          "required": ["amount", "to"]}}},
]
TRAIN_CITIES = """Paris London Berlin Madrid Rome Vienna Prague Warsaw Lisbon Dublin Oslo Stockholm Helsinki Athens
Cairo Nairobi Lagos Tokyo Seoul Beijing Delhi Mumbai Bangkok Jakarta Manila Sydney Auckland Toronto Chicago Denver
Boston Miami Seattle Lima Bogota Santiago Havana Quito Dakar Accra""".split()
EVAL_CITIES = "Zurich Budapest Hanoi Montreal Caracas Tunis Riga Osaka Perth Kigali".split()
CURRENCIES = ["EUR", "JPY", "GBP", "CHF", "CAD", "INR", "CNY", "BRL"]
WEATHER_ASKS = ["What is the weather in {}?", "How warm is it in {} right now?", "Is it raining in {}?",
                "Tell me the weather for {}.", "What's it like outside in {} today?"]
MONEY_ASKS = ["Convert {} dollars to {}.", "How much is {} USD in {}?", "What are {} US dollars in {}?",
              "Change {} dollars into {}, please."]
SKIES = ["sunny", "cloudy", "rainy", "windy", "foggy"]


def call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def weather(rng: random.Random, city: str) -> dict:
    temp, sky = rng.randint(-5, 35), rng.choice(SKIES)
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": rng.choice(WEATHER_ASKS).format(city)},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": city})]},
        {"role": "tool", "content": json.dumps({"temp_c": temp, "sky": sky})},
        {"role": "assistant", "content": f"It is {temp} °C and {sky} in {city}."}]}


def money(rng: random.Random, amount: int, to: str) -> dict:
    result = round(amount * rng.uniform(0.5, 150), 2)
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": rng.choice(MONEY_ASKS).format(amount, to)},
        {"role": "assistant", "content": "", "tool_calls": [call("convert_currency", {"amount": amount, "to": to})]},
        {"role": "tool", "content": json.dumps({"result": result})},
        {"role": "assistant", "content": f"{amount} US dollars are {result} {to}."}]}


def main() -> None:
    rng = random.Random(0)
    amounts = rng.sample(range(2, 1000), 400)
    train_amounts, eval_amounts = amounts[:370], amounts[370:]
    train = [weather(rng, rng.choice(TRAIN_CITIES)) if i % 2 else money(rng, rng.choice(train_amounts),
                                                                          rng.choice(CURRENCIES)) for i in range(600)]
    held_out = [weather(rng, c) for c in EVAL_CITIES for _ in range(2)] + \
               [money(rng, a, rng.choice(CURRENCIES)) for a in eval_amounts[:20]]
    for name, rows in (("tools_train.jsonl", train), ("tools_eval.jsonl", held_out)):
        (DIR / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":
    main()
