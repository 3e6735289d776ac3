"""Side-by-side benchmarks, same data and same tiny Qwen2 model in one run; prints ratios.

    python -m bench.run                      # all three, a few minutes on 2 CPU cores
    python -m bench.run --only train|preprocess|memory [--steps 30 --per_device 8]
    python -m bench.run --only overhead --repeats 3   # our loop vs the bare loop alone, best of 3

train       target tokens/s of: our loop (plain, --group_by_length, --packing); transformers.Trainer
            with DataCollatorForSeq2Seq(padding="longest"), group_by_length off and on; the chapter's
            recipe (Trainer over samples statically padded to max_len); and a bare PyTorch
            forward/backward/step loop over the very batches our loop builds (the overhead floor).
preprocess  ours (templates.encode_many: render, one batched tokenizer call, labels from the tokens at each reply's two ends)
            vs the chapter's per-turn tokenization loop vs raw tokenizer(texts) on the same
            rendered strings (the floor), on the real Qwen2.5 tokenizer.
memory      peak memory of one loss step (LM head + cross-entropy, forward and backward) with
            chunked vs full logits, at Qwen2.5's vocabulary (151,936) and hidden size (1,536).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORDS = ("the a model data train token answer question because river mountain cloud stone green blue red cat dog "
         "fish bird tree house road light music paper window table chair bread milk sun moon star rain snow").split()
ZH = "我们 模型 数据 训练 问题 回答 因为 河流 高山 白云 石头 绿色 蓝色 红色 小猫 小狗 大树 房子 道路 音乐".split()


def belle_like(n: int, seed: int = 0) -> list[dict]:
    """Belle-shaped multi-turn conversations, a mix of short and long (about 40 to 1,500 tokens)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        long = rng.random() < 0.25
        turns = []
        for _ in range(rng.randint(1, 4)):
            pool = ZH if rng.random() < 0.5 else WORDS
            sep = "" if pool is ZH else " "
            q = sep.join(rng.choices(pool, k=rng.randint(5, 40)))
            a = sep.join(rng.choices(pool, k=rng.randint(150, 400) if long else rng.randint(5, 60)))
            turns += [{"from": "human", "value": q}, {"from": "assistant", "value": a}]
        out.append({"conversations": turns})
    return out


# ----------------------------------------------------------------------------------------------
# training throughput
# ----------------------------------------------------------------------------------------------

def bench_model(tok, where: Path) -> Path:
    """A 3M-parameter Qwen2 (width 256, 4 layers), saved once so every contender trains the same
    weights. Not the default tiny model (0.46M): on one that small, Python's per-step costs would
    weigh more than on any real model, and the comparison would say less."""
    import torch
    import transformers

    torch.manual_seed(42)
    config = transformers.Qwen2Config(
        vocab_size=-(-len(tok) // 64) * 64, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    transformers.Qwen2ForCausalLM(config).save_pretrained(where)
    tok.save_pretrained(where)
    return where


def load_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    # fp32 weights, as the loop loads them (bf16 comes from autocast, on both sides)
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)


def run_ours(data: Path, model_dir: Path, out: Path, steps: int, per_device: int, max_len: int, extra: list[str]) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "SFT_CACHE": str(out.parent / "cache")}
    cmd = [sys.executable, str(REPO / "train_loop.py"), "--output_dir", str(out), "--train_files", str(data),
           "--model_name_or_path", str(model_dir),
           "--max_steps", str(steps), "--per_device_train_batch_size", str(per_device), "--max_len", str(max_len),
           "--max_eval_generations", "0", "--plot", "false", *extra]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if '"step_time"' in x][2:]  # skip warm-up steps
    t = sum(r["step_time"] for r in rows)
    return {"target_tok_s": sum(r["target_tokens"] for r in rows) / t,
            "padding_eff": sum(r["padding_efficiency"] for r in rows) / len(rows)}


def tokenized(data: Path, tok, max_len: int, truncation: str = "keep_start"):
    from sftloop import sft_data

    with tempfile.TemporaryDirectory() as d:
        corpus = sft_data.load_corpus([{"spec": str(data)}], tok, template="qwen2.5", max_len=max_len,
                                      system_prompt=None, cache_dir=Path(d), truncation=truncation)
        return [{"input_ids": s["input_ids"], "labels": s["labels"]}
                for s in sft_data.first_samples(corpus)]


def run_trainer(rows, tok, model_dir: Path, steps: int, per_device: int, group_by_length: bool,
                static_len: int | None, gpu: bool = False) -> dict:
    """transformers.Trainer as a user would set it up; static_len pads every sample (the chapter);
    gpu: on the GPU in bf16 (bench/gpu.py), with its peak allocated memory."""
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    if static_len:  # the chapter: pad every sample to max_len, mask from input_ids != pad_id
        rows = [{"input_ids": r["input_ids"] + [tok.pad_token_id] * (static_len - len(r["input_ids"])),
                 "labels": r["labels"] + [-100] * (static_len - len(r["labels"]))} for r in rows]
        rows = [{**r, "attention_mask": [int(i != tok.pad_token_id) for i in r["input_ids"]]} for r in rows]
    ds = datasets.Dataset.from_list(rows)
    counted = {"targets": 0, "real": 0, "padded": 0}
    base = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def collator(features):
        batch = base(features)
        counted["targets"] += int((batch["labels"][:, 1:] != -100).sum())
        counted["real"] += sum(len(f["input_ids"]) for f in features) if not static_len else int(
            sum(sum(f["attention_mask"]) for f in features))
        counted["padded"] += batch["input_ids"].numel()
        return batch

    class Clock(TrainerCallback):  # time steps 3.. like ours, excluding warm-up
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                self.t0, self.c0 = time.perf_counter(), dict(counted)

        def on_train_end(self, args, state, control, **kw):
            self.t = time.perf_counter() - self.t0
            self.n = {k: counted[k] - self.c0[k] for k in counted}

    clock = Clock()
    model = load_model(model_dir)
    with tempfile.TemporaryDirectory() as d:
        targs = TrainingArguments(output_dir=d, per_device_train_batch_size=per_device, max_steps=steps,
                                  learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=10**9,
                                  train_sampling_strategy="group_by_length" if group_by_length else "random",
                                  dataloader_num_workers=0, use_cpu=not gpu, bf16=gpu,
                                  disable_tqdm=True, remove_unused_columns=False)
        Trainer(model=model, args=targs, train_dataset=ds, data_collator=collator, callbacks=[clock]).train()
    # the collator runs one batch ahead of the step; the count lag is one batch at both ends, so it cancels
    import torch

    return {"target_tok_s": clock.n["targets"] / clock.t, "padding_eff": clock.n["real"] / clock.n["padded"],
            **({"peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30} if gpu else {})}


def run_bare(rows, tok, model_dir: Path, steps: int, per_device: int) -> dict:
    """The floor for loop overhead: forward, loss, backward, clip, step over our very batches, nothing else."""
    import numpy as np
    import torch

    import batches
    from sftloop import lm_logits
    import train_loop
    from collate import collate

    order = batches.epoch_order(len(rows), 42, 0)
    steps_ = [collate([rows[i] for i in batches.step_micro_batches(order, s, per_device, 0, 1, 1)[0]],
                      pad_id=tok.pad_token_id) for s in range(steps)]
    model = load_model(model_dir).train()  # from_pretrained returns it in eval mode
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    targets, t0 = 0, None
    for s, b in enumerate(steps_):
        if s == 2:
            t0 = time.perf_counter()
        n = lm_logits.num_targets(b["labels"])
        loss = train_loop.batch_loss(model, b).sum() / n  # the same loss as ours, no loop around it
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s >= 2:
            targets += int(n)
    return {"target_tok_s": targets / (time.perf_counter() - t0),
            "padding_eff": float(np.mean([b["real_tokens"] / b["input_ids"].numel() for b in steps_[2:]]))}


def train_setup(args):
    """The bench data, its tokenized rows, the tokenizer and the saved model, in a fresh work dir."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-qwen-tokenizer")
    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    data = work / "belle_like.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in belle_like(args.samples)))
    return work, data, tokenized(data, tok, args.max_len), tok, bench_model(tok, work / "model")


def bench_overhead(args) -> dict:
    """Our loop against the bare loop only, alternating, best of --repeats: on a shared machine
    one run of either can differ by up to 15% from the next run of the same code, more than the
    overhead itself."""
    work, data, rows, tok, m = train_setup(args)
    best = {"bare": 0.0, "ours": 0.0}
    for r in range(args.repeats):
        bare = run_bare(rows, tok, m, args.steps, args.per_device)["target_tok_s"]
        ours = run_ours(data, m, work / f"ours{r}", args.steps, args.per_device, args.max_len, [])["target_tok_s"]
        print(f"  repeat {r + 1}: bare {bare:.0f}, ours {ours:.0f} target tok/s ({bare / ours - 1:+.1%})", flush=True)
        best = {"bare": max(best["bare"], bare), "ours": max(best["ours"], ours)}
    print(f"\nloop overhead, best of {args.repeats} ({args.steps} steps each): bare {best['bare']:.0f}, "
          f"ours {best['ours']:.0f} target tok/s: {best['bare'] / best['ours'] - 1:+.1%}")
    return best


def bench_train(args) -> dict:
    work, data, rows, tok, m = train_setup(args)
    runs = {
        "Trainer, padding=longest": lambda: run_trainer(rows, tok, m, args.steps, args.per_device, False, None),
        "Trainer, padding=longest, group_by_length":
            lambda: run_trainer(rows, tok, m, args.steps, args.per_device, True, None),
        "chapter recipe (Trainer, static padding)":
            lambda: run_trainer(rows, tok, m, args.chapter_steps, args.per_device, False, args.max_len),
        "bare PyTorch loop (same batches)": lambda: run_bare(rows, tok, m, args.steps, args.per_device),
        "ours": lambda: run_ours(data, m, work / "ours", args.steps, args.per_device, args.max_len, []),
        "ours --group_by_length":
            lambda: run_ours(data, m, work / "gbl", args.steps, args.per_device, args.max_len, ["--group_by_length"]),
        "ours --packing":
            lambda: run_ours(data, m, work / "pack", args.steps, args.per_device, args.max_len, ["--packing"]),
    }
    res = {}
    for name, fn in runs.items():
        res[name] = fn()
        print(f"  {name}: {res[name]['target_tok_s']:.0f} target tok/s", flush=True)
    base = res["Trainer, padding=longest"]["target_tok_s"]
    print(f"\ntraining throughput: tiny Qwen2 (3M), {args.per_device} samples/step, max_len {args.max_len}, "
          f"{args.steps} steps ({args.chapter_steps} for the chapter's recipe)")
    print(f"{'run':45s} {'target tok/s':>12s} {'vs Trainer':>10s} {'padding eff.':>12s}")
    for name, r in res.items():
        print(f"{name:45s} {r['target_tok_s']:12.0f} {r['target_tok_s'] / base:9.2f}x {r['padding_eff']:12.2f}")
    best = max(res[k]["target_tok_s"] for k in res if k.startswith("ours"))
    print(f"ours (best) / Trainer padding=longest: {best / base:.2f}x;  / chapter recipe: "
          f"{best / res['chapter recipe (Trainer, static padding)']['target_tok_s']:.1f}x;  "
          f"loop overhead vs bare loop (plain): "
          f"{res['bare PyTorch loop (same batches)']['target_tok_s'] / res['ours']['target_tok_s'] - 1:+.1%}")
    return res


# ----------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------

def chapter_preprocess(sources, tokenizer, max_len=2048, system_message="You are a helpful assistant."):
    """The chapter's loop (its logic as written, role 'human' and all): tokenizes every piece apart."""
    roles = {"human": "<|im_start|>human", "assistant": "<|im_start|>assistant"}
    im_start = tokenizer("<|im_start|>").input_ids
    im_end = tokenizer("<|im_end|>").input_ids
    ignore = tokenizer.pad_token_id
    nl_tokens = tokenizer("\n").input_ids
    _system = tokenizer("system").input_ids + nl_tokens
    input_ids, targets = [], []
    for source in sources:
        if source[0]["from"] != "human":
            source = source[1:]
        input_id, target = [], []
        system = im_start + _system + tokenizer(system_message).input_ids + im_end + nl_tokens
        input_id += system
        target += im_start + [ignore] * (len(system) - 3) + im_end + nl_tokens
        for sentence in source:
            role = roles[sentence["from"]]
            _input_id = tokenizer(role).input_ids + nl_tokens + tokenizer(sentence["value"]).input_ids + im_end + nl_tokens
            input_id += _input_id
            if role == "<|im_start|>human":
                _target = im_start + [ignore] * (len(_input_id) - 3) + im_end + nl_tokens
            else:
                _target = im_start + [ignore] * len(tokenizer(role).input_ids) + \
                    _input_id[len(tokenizer(role).input_ids) + 1:-2] + im_end + nl_tokens
            target += _target
        input_id += [tokenizer.pad_token_id] * (max_len - len(input_id))
        target += [ignore] * (max_len - len(target))
        input_ids.append(input_id[:max_len])
        targets.append(target[:max_len])
    return input_ids, targets


def bench_preprocess(args) -> dict:
    from transformers import AutoTokenizer

    from tools import build_tokenizers
    import templates

    tok = AutoTokenizer.from_pretrained(build_tokenizers.qwen25_tokenizer_dir())
    records = belle_like(args.pre_samples, seed=1)
    convs = [templates.to_messages(r) for r in records]
    texts = [templates.render(c)[0] for c in convs]

    def timed(fn, reps=3):
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    raw = timed(lambda: tok(texts, add_special_tokens=False))
    ours = timed(lambda: templates.encode_many(convs, tok, max_len=2048))
    chapter = timed(lambda: chapter_preprocess([r["conversations"] for r in records], tok), reps=1)
    n = len(records)
    print(f"\npreprocessing {n} Belle-like conversations, real Qwen2.5 tokenizer, one process")
    print(f"{'method':55s} {'conv/s':>8s}")
    for name, t in (("raw tokenizer(texts) on the rendered strings (floor)", raw),
                    ("ours: templates.encode_many (render, tokenize, labels)", ours),
                    ("chapter's per-turn tokenization loop", chapter)):
        print(f"{name:55s} {n / t:8.0f}")
    print(f"ours vs chapter: {chapter / ours:.1f}x faster;  ours vs raw tokenizer: {ours / raw:.2f}x the time")
    return {"raw_s": raw, "ours_s": ours, "chapter_s": chapter, "n": n}


# ----------------------------------------------------------------------------------------------
# loss-step memory
# ----------------------------------------------------------------------------------------------

MEMORY_CHILD = r"""
import resource, sys, torch, transformers
import train_loop
tokens, hidden, vocab, chunk = 4096, 1536, 151936, int(sys.argv[1])
torch.manual_seed(0)
# Qwen2.5-1.5B's width and vocabulary, one thin layer: the LM head and the loss dominate
config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=256, num_hidden_layers=1,
                                  num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
model = transformers.Qwen2ForCausalLM(config)
ids = torch.randint(0, vocab, (1, tokens))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = train_loop.batch_loss(model, batch, chunk or None).sum()
loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def bench_memory(args) -> dict:
    def peak(chunk):
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(chunk)], cwd=REPO, check=True,
                             capture_output=True, text=True)
        return int(out.stdout.strip().splitlines()[-1])

    chunk = 1024 * 2**20 // (151936 * 8)  # the default --ce_chunk_mb 1024 at this vocabulary: 883 tokens
    full, chunked = peak(0), peak(chunk)
    print("\nloss step (4,096 target tokens, hidden 1,536, vocab 151,936, fp32), growth of peak memory")
    print(f"full logits:            {full / 2**30:6.2f} GiB")
    print(f"chunked ({chunk} tokens):   {chunked / 2**30:6.2f} GiB   ({chunked / full:.1%} of full)")
    return {"full": full, "chunked": chunked}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["train", "overhead", "preprocess", "memory"])
    ap.add_argument("--repeats", type=int, default=3, help="for --only overhead")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--chapter_steps", type=int, default=8)
    ap.add_argument("--per_device", type=int, default=8)
    ap.add_argument("--max_len", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--pre_samples", type=int, default=2000)
    a = ap.parse_args()
    for name, fn in (("train", bench_train), ("preprocess", bench_preprocess), ("memory", bench_memory)):
        if a.only in (None, name):
            fn(a)
    if a.only == "overhead":
        bench_overhead(a)
