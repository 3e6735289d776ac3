"""A small task a pretrained chat model does not do by itself, for the LoRA and full fine-tuning
examples on SmolLM2-135M-Instruct: "Shout: river apple cloud" -> "RIVER! APPLE! CLOUD!".

    python data/make_shout_data.py      # writes data/shout_train.jsonl and data/shout_eval.jsonl
"""

import json
import random
from pathlib import Path

WORDS = """apple river cloud stone green table window garden music paper silver forest candle bridge orange
winter summer yellow rabbit dragon planet rocket coffee butter castle island mirror pencil button ticket
violin lemon tiger eagle shadow thunder meadow harbor lantern marble pepper saddle velvet willow anchor
basket cactus dolphin feather ginger hammer jacket kettle ladder magnet needle oyster pillow quartz ribbon
salmon tulip umbrella valley walnut zebra bottle carpet doctor engine falcon guitar helmet igloo jungle""".split()
DIR = Path(__file__).resolve().parent


def conversation(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return {"conversations": [{"from": "human", "value": "Shout: " + " ".join(words)},
                              {"from": "assistant", "value": " ".join(w.upper() + "!" for w in words)}]}


def main() -> None:
    rng = random.Random(0)
    seen, rows = set(), []
    while len(rows) < 2100:
        c = conversation(rng)
        key = c["conversations"][0]["value"]
        if key not in seen:  # held-out prompts never appear in training
            seen.add(key)
            rows.append(c)
    for name, part in (("shout_train.jsonl", rows[:2000]), ("shout_eval.jsonl", rows[2000:])):
        (DIR / name).write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    main()
