"""Packing on a CPU: the padding-free packing (collate_packed under sdpa: samples one after the other
in rows as wide as the micro-batch's longest sample, positions restarting, no mask) against what it
replaced (rows of up to --max_len with a block-diagonal fp32 4D mask), against --group_by_length and
against plain padding. Target tokens per second of a training step
(collation, forward, backward, AdamW) and the process's peak resident memory, at rows of 2k and 8k tokens.

    python -m bench.packing [--steps 6] [--sizes 2048:8 8192:32]

SIZE:N is --max_len and the samples a micro-batch holds (N samples of Belle-like conversations,
bench.run.belle_like, fill about two rows of SIZE tokens). Every contender trains the same model
(bench.run's 3M-parameter Qwen2, sdpa, fp32, chunked cross-entropy as the run chooses it) on the same
samples in the same number of steps (group_by_length in its own order), each in a process of its
own, so its peak memory is its own; the first step is not timed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("padding", "group_by_length", "packing before: rows of max_len, fp32 block mask", "packing")


def packed_before(samples: list[dict], pad_id: int, max_len: int) -> dict:
    """What collate_packed gave before: rows of up to max_len tokens (first-fit decreasing), an
    additive fp32 [rows, 1, W, W] mask, causal within each sample (a row's padding a sample of its
    own), and no boundaries."""
    import torch

    from collate import collate_packed, pack_rows

    rows = [collate_packed([samples[i] for i in row], pad_id, one_row=True)
            for row in pack_rows([len(s["input_ids"]) for s in samples], max_len)]
    width = max(r["input_ids"].shape[1] for r in rows)

    def stacked(key, fill):
        return torch.cat([torch.nn.functional.pad(r[key], (0, width - r[key].shape[1]), value=fill) for r in rows])

    batch = {"input_ids": stacked("input_ids", pad_id), "labels": stacked("labels", -100),
             "position_ids": stacked("position_ids", 0), "real_tokens": sum(r["real_tokens"] for r in rows)}
    segment = (batch["position_ids"] == 0).cumsum(-1)
    allowed = torch.tril(torch.ones(width, width, dtype=torch.bool))[None] & (segment[:, :, None] == segment[:, None, :])
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return {**batch, "attention_mask": mask[:, None]}


def one(contender: str, model_dir: Path, data: Path, max_len: int, per_device: int, steps: int) -> dict:
    """One contender's run, in this process."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    import batches
    import train_loop
    from bench.run import load_model, tokenized
    from collate import collate, collate_packed
    from sftloop import lm_logits

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = tokenized(data, tok, max_len)[:steps * per_device]
    order = np.arange(len(rows))
    if contender == "group_by_length":
        order = batches.epoch_order(len(rows), 0, 0, per_device, np.array([len(r["input_ids"]) for r in rows]))
    model = load_model(model_dir)
    chunk = lm_logits.chunk_size(model, argparse.Namespace(chunked_ce="auto", ce_chunk_size=None, ce_chunk_mb=1024),
                                 False, rows[0], tok.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    pad = tok.pad_token_id

    def make(samples):
        if contender == "packing":
            return collate_packed(samples, pad)  # sdpa: rows as wide as the longest sample
        return packed_before(samples, pad, max_len) if "before" in contender else collate(samples, pad)

    timed = targets = tokens = 0.0
    for step in range(steps):
        if step == 1:  # the peak from here: the model, its optimizer state and the first step's memory are held
            Path("/proc/self/clear_refs").write_text("5")
        began = time.perf_counter()
        batch = make([rows[i] for i in order[step * per_device:(step + 1) * per_device]])
        loss = train_loop.batch_loss(model, batch, chunk)
        n = lm_logits.num_targets(batch["labels"])
        (loss.sum() / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            timed += time.perf_counter() - began
            targets += float(n)
            tokens += batch["input_ids"].numel()
    peak = next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:")) * 1024
    return {"contender": contender, "max_len": max_len, "per_device": per_device, "timed_steps": steps - 1,
            "target_tokens_per_s": targets / timed, "peak_rss_gib": peak / 2**30,
            "tokens_per_micro_batch": tokens / (steps - 1), "rows_x_width": list(batch["input_ids"].shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sizes", nargs="+", default=["2048:8", "8192:32"])
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # contender model data max_len per_device (a child)
    args = parser.parse_args()
    if args.one:
        contender, model_dir, data, max_len, per_device = args.one
        print(json.dumps(one(contender, Path(model_dir), Path(data), int(max_len), int(per_device), args.steps)))
        return
    from transformers import AutoTokenizer

    from bench.run import belle_like, bench_model
    from tools import build_tokenizers

    results = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        tok = AutoTokenizer.from_pretrained(build_tokenizers.qwen25_tokenizer_dir())
        model_dir = bench_model(tok, work / "model")
        data = work / "belle.jsonl"
        data.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in belle_like(2000, seed=3)))
        for size in args.sizes:
            max_len, per_device = size.split(":")
            for contender in CONTENDERS:
                p = subprocess.run([sys.executable, "-m", "bench.packing", "--steps", str(args.steps), "--one",
                                    contender, str(model_dir), str(data), max_len, per_device],
                                   cwd=REPO, capture_output=True, text=True, check=True)
                results.append(json.loads(p.stdout.strip().splitlines()[-1]))
                r = results[-1]
                print(f"max_len {max_len:>5}, {per_device:>2} samples a step  {contender:30s} "
                      f"{r['target_tokens_per_s']:8.0f} target tokens/s  peak {r['peak_rss_gib']:5.2f} GiB  "
                      f"{r['tokens_per_micro_batch']:8.0f} tokens a micro-batch {r['rows_x_width']}", flush=True)
    base = {(r["max_len"], r["contender"]): r for r in results}
    print("\n| rows of | contender | target tokens/s | vs padding | peak memory (resident) | tokens a micro-batch |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        ref = base[(r["max_len"], "padding")]
        print(f"| {r['max_len']} | {r['contender']} | {r['target_tokens_per_s']:,.0f} | "
              f"{r['target_tokens_per_s'] / ref['target_tokens_per_s']:.2f}x | {r['peak_rss_gib']:.2f} GiB | "
              f"{r['tokens_per_micro_batch']:,.0f} |")


if __name__ == "__main__":
    main()
