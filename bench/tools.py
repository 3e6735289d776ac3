"""A real chat model learns to call tools, on a CPU: SmolLM2-135M-Instruct (built offline, as in
bench/lora.py), fully fine-tuned on data/tools_train.jsonl (600 requests that need get_weather or
convert_currency, the call, its result, the answer) with the model's own answers to 80 other
requests replayed, then asked the 40 held-out requests of data/tools_eval.jsonl, whose cities and
amounts training never showed. A call is right when its function name and arguments are exactly
the expected ones. The knowledge questions of bench/lora.py check what it knew before.

    python -m bench.tools                 # before, train, after (docs/tools-and-reasoning.md has the figures)
    python -m bench.tools --steps 80

SmolLM2's own template has no place for tools, so the Qwen2.5 template (whose tool format is the
common Hermes one) renders them, with SmolLM2's own system prompt: its conversations without tools
render exactly as SmolLM2's template renders them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.lora import KNOWLEDGE, REPO, train_run

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
FLAGS = ["--template", "qwen2.5", "--system_prompt", SYSTEM]


def score(model_dir: Path, template_from_training: bool) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import templates
    from sftloop import generation

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not template_from_training:  # the base model, asked as the trained one will be
        tok.chat_template = templates.chat_template_for("qwen2.5", tok, SYSTEM)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    held_out = [json.loads(line) for line in open(REPO / "data" / "tools_eval.jsonl")]
    right = valid = 0
    examples = []
    for r in held_out:
        ids = generation.prompt_ids(tok, r["messages"][:1], r["tools"])
        reply, = generation.generate(model, tok, [ids], 48)
        calls = generation.parse_reply(reply).get("tool_calls", [])
        expected = r["messages"][1]["tool_calls"][0]["function"]
        valid += bool(calls)
        right += len(calls) == 1 and calls[0]["function"] == expected
        examples.append((r["messages"][0]["content"], reply))
    knew = [generation.generate(model, tok, [generation.prompt_ids(tok, [{"role": "user", "content": q}])], 48)[0]
            for q, _ in KNOWLEDGE]
    return {"right": right / len(held_out), "valid": valid / len(held_out), "examples": examples,
            "knowledge": [k.lower() in a.lower() for (_, k), a in zip(KNOWLEDGE, knew)], "answers": knew}


def main(args) -> None:
    import tempfile

    from tools import build_models

    model_dir = build_models.smollm2_dir()
    t0 = time.time()
    before = score(model_dir, template_from_training=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run = train_run(out, model_dir, [*FLAGS, "--learning_rate", args.lr], args.steps,
                        [str(REPO / "data" / "tools_train.jsonl"), str(REPO / "data" / "shout_replay.jsonl") + ":2.0"])
        after = score(out, template_from_training=True)
    right_before = [i for i, ok in enumerate(before["knowledge"]) if ok]
    print(f"\nfull fine-tuning (lr {args.lr}) of SmolLM2-135M-Instruct, {args.steps} steps of 8 conversations "
          f"(training {run['wall_s']:.0f} s, all {time.time() - t0:.0f} s)")
    print(f"{'model':26s} {'valid call':>10s} {'right call':>10s} {'knowledge kept':>15s}")
    for name, s in (("before", before), ("after", after)):
        kept = sum(s["knowledge"][i] for i in right_before)
        print(f"{name:26s} {s['valid']:10.0%} {s['right']:10.0%} {kept:>9d} of {len(right_before)}")
    for (ask, b), (_, a) in list(zip(before["examples"], after["examples"]))[:: len(before["examples"]) // 4]:
        print(f"  {ask}\n    before: {b[:100]!r}\n    after:  {a[:100]!r}")
    for (q, _), a, b in zip(KNOWLEDGE, before["answers"], after["answers"]):
        print(f"  {q}\n    before: {a[:90]!r}\n    after:  {b[:90]!r}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", default="1e-4")
    main(ap.parse_args())
