"""The GPU benchmark, one command: the loop against transformers.Trainer on Qwen2.5-0.5B- and
1.5B-shaped models (their published configs, random weights, the real Qwen2.5 tokenizer built
offline), Belle-like data (bench/make_corpus.py), bf16, one GPU.

    python -m bench.gpu [--out DIR] [--budget_s 480]     # on the GPU machine: about 8 minutes
    python -m bench.gpu --dry_run                          # here, on a CPU, tiny shapes (CI runs it)

On a machine without `datasets` it first installs the bundle of tools/gpu_bundle.py (.whl/, carried
with the working tree) into /tmp/site. Each case is a real `train_loop.py` run (`--save_strategy no`,
a fixed number of steps, the first two not timed) in a process of its own, stopped at its share of
the time budget; a case that runs out of GPU memory is reported with the memory it asked for, and the
others still run. Writes gpu.json and gpu.md (a table: target tokens/s, MFU against the GPU's bf16
peak, peak allocated memory, step time) to --out."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/site")

SHAPES = {  # the published configs (config.json of Qwen/Qwen2.5-0.5B and -1.5B)
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
}
TINY = {"tiny": dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)}


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cases(gpu: bool) -> list[tuple[str, list[str], str | None]]:
    """(name, flags, accelerate config or None), the same for every shape; CUDA-only ones on a GPU."""
    # Packing takes the samples' boundaries from the attention kernel: sdpa rows on a CPU; on a GPU
    # (where sdpa would need a dense mask and is refused) flex attention, and flash attention's
    # variable-length kernel where the package is installed.
    packed = [("packing (flex attention)", ["--packing", "--attn_implementation", "flex_attention"], None)] if gpu \
        else [("packing (sdpa)", ["--packing"], None)]
    out = [("padding", [], None), ("group_by_length", ["--group_by_length"], None), *packed,
           ("whole-logit cross-entropy", ["--chunked_ce", "false"], None),
           ("gradient checkpointing", ["--gradient_checkpointing"], None),
           ("LoRA", ["--use_peft", "--merge_adapter", "false"], None),
           ("DeepSpeed ZeRO-2, 1 process", [], "zero2")]
    if gpu:
        out += [("torch.compile", ["--torch_compile"], None)]
        if has("flash_attn"):
            out.append(("packing (flash-attention varlen)", ["--packing", "--attn_implementation", "flash_attention_2"],
                        None))
        if has("liger_kernel"):
            out.append(("Liger kernels", ["--use_liger_kernel"], None))
        if has("bitsandbytes"):
            out.append(("QLoRA (4-bit base)", ["--use_peft", "--load_in_4bit", "--merge_adapter", "false"], None))
    return out


def install_bundle() -> dict:
    """The environment for the cases: the carried wheels on PYTHONPATH where this machine lacks them."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if not has("datasets") and wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
    if SITE.is_dir():
        env["PYTHONPATH"] = f"{SITE}:{env.get('PYTHONPATH', '')}"
    return env


def prepare(work: Path, env: dict, shapes: dict, samples: int) -> tuple[dict, Path]:
    """The model directories (bf16 safetensors) and the data, made once in a process of their own."""
    code = f"""
import json, torch, transformers
from tools import build_tokenizers
tok = transformers.AutoTokenizer.from_pretrained(build_tokenizers.qwen25_tokenizer_dir())
for name, shape in json.loads({json.dumps(json.dumps(shapes))}).items():
    out = {str(work)!r} + "/model-" + name
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**shape, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
"""
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
    data = work / "belle.jsonl"
    subprocess.run([sys.executable, "-m", "bench.make_corpus", str(samples), str(data)], check=True, env=env, cwd=REPO,
                   capture_output=True)
    return {name: work / f"model-{name}" for name in shapes}, data


def run_case(model: Path, data: Path, out: Path, flags: list[str], config: str | None, size: dict, budget: float,
             env: dict, gpu: bool) -> dict:
    args = ["--model_name_or_path", str(model), "--template", "qwen2.5", "--train_files", str(data),
            "--output_dir", str(out), "--max_steps", str(size["steps"]), "--per_device_train_batch_size",
            str(size["batch"]), "--max_len", str(size["max_len"]), "--truncation", "drop", "--eval_steps", "0", "--max_eval_generations", "0", "--save_strategy", "no",
            "--plot", "false", "--learning_rate", "1e-5", *(["--bf16", "true"] if gpu else []), *flags]
    cmd = [*deepspeed_launch(gpu), "train_loop.py", *args] if config else [sys.executable, "train_loop.py", *args]
    began, stopped = time.perf_counter(), None
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=budget)
        if p.returncode != 0:
            oom = re.search(r"(?:CUDA )?out of memory\.? Tried to allocate ([\d.]+ [GM]iB)", p.stderr)
            stopped = f"out of GPU memory (asked for {oom.group(1)})" if oom else \
                f"failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:300]}"
    except subprocess.TimeoutExpired:
        stopped = f"stopped at its budget of {budget:.0f} s"
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")] if (out / "metrics.jsonl").is_file() else []
    rows = [r for r in rows if "step_time" in r][2:]  # the first two steps warm up (and compile)
    result = {"seconds": round(time.perf_counter() - began, 1), "timed_steps": len(rows), "stopped": stopped}
    if rows:
        t = sum(r["step_time"] for r in rows)
        result.update(target_tokens_per_s=sum(r["target_tokens"] for r in rows) / t, step_s=t / len(rows),
                      mfu=sum(r["mfu"] for r in rows) / len(rows) if all("mfu" in r for r in rows) else None,
                      peak_memory_gb=max(r["peak_memory_gb"] for r in rows) if "peak_memory_gb" in rows[0] else None,
                      padding_efficiency=sum(r["padding_efficiency"] for r in rows) / len(rows))
    return result


def deepspeed_launch(gpu: bool) -> list[str]:
    """ZeRO-2 on one process: the CPU config for the dry run, the repository's GPU config (bf16) on a GPU."""
    config = "accelerate_config.yaml" if gpu else "configs/cpu_zero2.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--config_file",
            str(REPO / config)]


def run_trainer(model: Path, data: Path, size: dict, budget: float, env: dict, gpu: bool) -> dict:
    """transformers.Trainer on the same samples (tokenized by the loop's own code), as bench/run.py sets it up."""
    code = f"""
import json
from pathlib import Path
from transformers import AutoTokenizer
from bench import run
tok = AutoTokenizer.from_pretrained({str(model)!r})
rows = run.tokenized(Path({str(data)!r}), tok, {size["max_len"]}, truncation="drop")
print(json.dumps(run.run_trainer(rows, tok, Path({str(model)!r}), {size["steps"]}, {size["batch"]}, False, None, gpu={gpu})))
"""
    began = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=budget)
    except subprocess.TimeoutExpired:
        return {"stopped": f"stopped at its budget of {budget:.0f} s", "seconds": round(time.perf_counter() - began, 1)}
    if p.returncode != 0:
        oom = re.search(r"out of memory\.? Tried to allocate ([\d.]+ [GM]iB)", p.stderr)
        return {"stopped": f"out of GPU memory (asked for {oom.group(1)})" if oom else
                f"failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:300]}", "seconds": round(time.perf_counter() - began, 1)}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return {"target_tokens_per_s": out["target_tok_s"], "padding_efficiency": out["padding_eff"],
            "peak_memory_gb": out.get("peak_memory_gb"), "seconds": round(time.perf_counter() - began, 1),
            "stopped": None}


def table(results: list[dict], device: str, size: dict) -> str:
    lines = [f"Benchmark on {device}: per-device batch {size['batch']}, --max_len {size['max_len']}, "
             f"Belle-like data; {size['steps'] - 2} steps timed after two warm-up steps", "",
             "| model | case | target tokens/s | vs Trainer | MFU | peak allocated | step | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = next((b for b in results if b["shape"] == r["shape"] and b["case"] == "transformers.Trainer"), {})
        ratio = (f"{r['target_tokens_per_s'] / base['target_tokens_per_s']:.2f}x"
                 if r.get("target_tokens_per_s") and base.get("target_tokens_per_s") else "")
        cell = lambda k, f: f.format(r[k]) if r.get(k) is not None else ""  # noqa: E731
        lines.append(f"| {r['shape']} | {r['case']} | {cell('target_tokens_per_s', '{:,.0f}')} | {ratio} | "
                     f"{cell('mfu', '{:.1%}')} | {cell('peak_memory_gb', '{:.1f} GiB')} | {cell('step_s', '{:.3f} s')} | "
                     f"{r.get('stopped') or ''} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/bench-gpu")
    parser.add_argument("--dry_run", action="store_true", help="tiny shapes on a CPU: the script works end to end")
    parser.add_argument("--budget_s", type=float, default=None, help="the whole benchmark's time (480 s; dry run 300 s)")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    began = time.perf_counter()
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = install_bundle()
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("SFT_CACHE", str(work / "cache"))
    device = torch.cuda.get_device_name(0) if gpu else "CPU (dry run)"
    shapes = SHAPES if gpu else TINY
    # the dry run only shows that every case works: short samples, so a CPU gets through it quickly
    size = {"steps": args.steps, "batch": 8, "max_len": 2048} if gpu else {"steps": 4, "batch": 2, "max_len": 128}
    budget_s = args.budget_s or (480 if gpu else 300)
    models, data = prepare(work, env, shapes, 2000 if gpu else 200)
    todo = [(shape, name, flags, config) for shape in shapes for name, flags, config in cases(gpu)]
    todo += [(shape, "transformers.Trainer", None, None) for shape in shapes]
    results = []
    for k, (shape, name, flags, config) in enumerate(todo):
        left = budget_s - (time.perf_counter() - began)
        budget = max(10.0, left / (len(todo) - k))  # an even share of what is left
        if flags is None:
            r = run_trainer(models[shape], data, size, budget, env, gpu)
        else:
            r = run_case(models[shape], data, work / f"run-{k}", flags, config, size, budget, env, gpu)
        results.append({"shape": shape, "case": name, **r})
        print(f"{shape:5} {name:40} {r.get('target_tokens_per_s', 0):>10,.0f} target tokens/s  "
              f"{r.get('stopped') or ''}", flush=True)
    (out / "gpu.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "results": results}, indent=1))
    (out / "gpu.md").write_text(table(results, device, size))
    print(table(results, device, size))
    print(f"{time.perf_counter() - began:.0f} s in all; written to {out}/gpu.json and gpu.md")


if __name__ == "__main__":
    main()
