"""What a checkpoint costs as the model grows: the time and peak memory of one save and of one resume,
per engine, so that --save_steps can be planned.

    python -m bench.checkpoint_cost                          # bench (4.5M) and 0.5B shapes, ZeRO-2 and ZeRO-3
    python -m bench.checkpoint_cost --shapes bench 0.1b --configs cpu_zero2.yaml cpu_fsdp2.yaml

Each measurement is an `accelerate launch` of this file (2 processes on CPU, gloo): it builds the
shape's model with random weights (nothing downloaded), prepares it with the engine, takes one AdamW
step (so the optimizer state exists), and saves with checkpoints.save_checkpoint, the loop's own save
(whole model.safetensors gathered on the first process, plus every process's training state). A
second launch builds the same and resumes with checkpoints.resume (the plain-data check of every file,
then the engine's load). Peak memory is each process's resident memory, sampled every 5 ms during
the save or resume; the table gives the largest over processes, and how much it rose above what the
process held before. Output: a table; with --jsonl FILE also one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Qwen2 shapes: the bench model's width and depth (bench/run.py; a 6,400-token vocabulary here, 4.5M
# parameters), a 0.1B, and Qwen2.5-0.5B's (tied embeddings, as there).
SHAPES = {
    "bench": dict(vocab_size=6400, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
    "0.1b": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
}


class PeakRSS:
    """The highest resident memory of this process while inside the block, sampled every 5 ms."""

    def __enter__(self):
        import psutil

        self.proc, self.done = psutil.Process(), threading.Event()
        self.before = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def worker(shape: str, mode: str, run_dir: str) -> None:
    import torch
    import transformers
    from accelerate.utils import gather_object, set_seed

    from sftloop import checkpoints, runtime
    import train_loop
    from sftloop.args import parse_args

    _, _, args = parse_args(["--output_dir", run_dir, "--per_device_train_batch_size", "1", "--overwrite_output_dir",
                             "true", "--learning_rate", "1e-4"])
    accelerator = runtime.make_accelerator(args)
    set_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-qwen-tokenizer")
    config = transformers.Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=512)
    model = transformers.Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model, optimizer = accelerator.prepare(model, train_loop.make_optimizer(model, args))
    ids = torch.randint(0, config.vocab_size, (1, 64), device=accelerator.device)
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = {"global_step": 1, "epoch": 0, "global_batch_size": accelerator.num_processes, "seed": 42,
             "data_order": "bench", "args": {}}
    accelerator.wait_for_everyone()
    began = time.perf_counter()
    with PeakRSS() as mem:
        if mode == "save":
            checkpoints.save_checkpoint(accelerator, model, tokenizer, args, state)
        else:
            checkpoints.resume(accelerator, str(Path(run_dir) / "checkpoint-1"), accelerator.num_processes, 42,
                               lambda epoch: "bench")
        accelerator.wait_for_everyone()
    seconds = time.perf_counter() - began
    mems = gather_object([(mem.peak, mem.peak - mem.before)])
    if accelerator.is_main_process:
        size = sum(f.stat().st_size for f in (Path(run_dir) / "checkpoint-1").rglob("*") if f.is_file())
        print("RESULT " + json.dumps({
            "shape": shape, "params": params, "engine": runtime.describe(accelerator), "what": mode,
            "seconds": round(seconds, 2), "peak_rss_gb": round(max(m[0] for m in mems) / 2**30, 2),
            "rise_gb": round(max(m[1] for m in mems) / 2**30, 2), "checkpoint_gb": round(size / 2**30, 3)}))
    del model, optimizer  # as the loop does: CPU process groups can abort at exit while these hold them
    gc.collect()
    accelerator.end_training()


def measure(config: str, shape: str, mode: str, run_dir: str) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / config),
           "--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 2) // 2)), "-m", "bench.checkpoint_cost", "--worker", shape, mode,
           run_dir]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{config} {shape} {mode} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return {"config": config, **json.loads(lines[-1][7:])}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["bench", "0.5b"], choices=list(SHAPES))
    ap.add_argument("--configs", nargs="+", default=["cpu_zero2.yaml", "cpu_zero3.yaml"])
    ap.add_argument("--jsonl", default=os.devnull, help="append each measurement to this file as a JSON line")
    a = ap.parse_args()
    rows = []
    with open(a.jsonl, "a") as log:
        for shape in a.shapes:
            for config in a.configs:
                with tempfile.TemporaryDirectory() as d:
                    for mode in ("save", "resume"):
                        rows.append(measure(config, shape, mode, d))
                        log.write(json.dumps(rows[-1]) + "\n")
                        log.flush()
                        r = rows[-1]
                        print(f"{shape:>6} {r['params'] / 1e6:8.1f}M  {config:<22} {mode:<6} {r['seconds']:7.2f} s  "
                              f"peak {r['peak_rss_gb']:6.2f} GB (+{r['rise_gb']:.2f})  checkpoint {r['checkpoint_gb']:.3f} GB",
                              flush=True)


if __name__ == "__main__":
    main()
