"""A mixture-of-experts model against a dense one of the same active parameters, trained by the loop
on a CPU: step time, target tokens per second and peak memory.

    python -m bench.moe [--steps 12] [--layers 4] [--hidden 512]

The MoE model has Qwen3-30B-A3B's routing (128 experts, 8 chosen per token, each expert 0.375 x the
hidden size wide, as 768 of 2048) at a few layers and a smaller width (heads of 64); the dense one is
Qwen3 with an MLP 8 experts wide (intermediate 8 x 0.375 x hidden), so a token meets as many MLP
weights in both. Both use the tiny tokenizer (744 tokens), so the
LM head does not hide the layers' cost. Each runs as `python train_loop.py` in a process of its own
(peak resident memory from /usr/bin/time), per-device batch 8, the first two steps not timed, with
the router's balancing loss on (the model's own weight, 0.001) and off."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(where: Path, layers: int, hidden: int) -> dict[str, Path]:
    code = f"""
import torch, transformers
torch.manual_seed(0)
common = dict(vocab_size=768, hidden_size={hidden}, num_hidden_layers={layers}, num_attention_heads={hidden} // 64,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, eos_token_id=724, pad_token_id=722,
              bos_token_id=None, tie_word_embeddings=True)
expert = int(0.375 * {hidden})
moe = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**common, intermediate_size=8 * expert,
    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=expert))
dense = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, intermediate_size=8 * expert))
for name, model in (("moe", moe), ("dense", dense)):
    model.save_pretrained({str(where)!r} + "/" + name)
    print(name, sum(p.numel() for p in model.parameters()))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO).stdout
    sizes = dict(line.split() for line in out.splitlines() if line.split()[0] in ("moe", "dense"))
    return {name: (where / name, int(n)) for name, n in sizes.items()}


def run(model_dir: Path, out: Path, steps: int, extra: list[str]) -> dict:
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "train_loop.py", "--model_name_or_path", str(model_dir),
           "--tokenizer_name_or_path", str(REPO / "assets" / "tiny-qwen-tokenizer"), "--output_dir", str(out),
           "--max_steps", str(steps), "--per_device_train_batch_size", "8", "--eval_steps", "0",
           "--max_eval_generations", "0", "--save_strategy", "no", "--plot", "false", "--learning_rate", "1e-4", *extra]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if '"step_time"' in x][2:]
    t = sum(r["step_time"] for r in rows)
    return {"step_s": t / len(rows), "target_tokens_per_s": sum(r["target_tokens"] for r in rows) / t,
            "tokens_per_s": sum(r["real_tokens"] for r in rows) / t,
            "peak_rss_gib": int(p.stderr.strip().splitlines()[-1]) / 2**20,
            "router_aux_loss": rows[-1].get("router_aux_loss"), "expert_share_max": rows[-1].get("expert_share_max")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        models = build(work, args.layers, args.hidden)
        results = []
        for name, (model_dir, params), extra in [("dense, the same active parameters", models["dense"], []),
                                                  ("MoE, balancing loss on (0.001)", models["moe"], []),
                                                  ("MoE, balancing loss off", models["moe"], ["--router_aux_loss_coef", "0"])]:
            r = run(model_dir, work / f"out{len(results)}", args.steps, extra)
            results.append({"model": name, "parameters_m": params / 1e6, **r})
            print(json.dumps(results[-1]), flush=True)
    base = results[0]
    print(f"\n{args.layers} layers, hidden {args.hidden}, per-device batch 8, {args.steps - 2} timed steps\n")
    print("| model | parameters | step time | target tokens/s | vs dense | peak memory (resident) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['parameters_m']:.1f}M | {r['step_s']:.3f} s | {r['target_tokens_per_s']:,.0f} | "
              f"{r['target_tokens_per_s'] / base['target_tokens_per_s']:.2f}x | {r['peak_rss_gib']:.2f} GiB |")


if __name__ == "__main__":
    main()
