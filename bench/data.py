"""Data at scale: tokenization throughput and memory, warm start, two processes on one cache.

    python -m bench.data --sizes 250000 1000000      # about an hour on 2 CPU cores, most of it tokenizing

For each size, on a Belle-like corpus from bench/make_corpus.py and the real Qwen2.5 tokenizer:
raw       the batched Rust tokenizer alone on the rendered conversations (20,000 of them), one
          core (TOKENIZERS_PARALLELISM=false) and both: the floor for preprocessing.
cold      sft_data.load_corpus on an empty cache with 1 and 2 workers: conversations/s, and the
          peak memory of the tokenizing processes, resident (RSS, which counts the memory-mapped
          Arrow pages the process touched) and anonymous (RssAnon: what the process itself holds).
warm      train_loop.py on the warm cache (tiny model, Qwen2.5 tokenizer, one step): seconds from
          the process start to the first optimizer step, the data part of it, and the memory of the
          data plan every process holds.
2 procs   the same under accelerate launch with 2 processes: no tokenization, no new cache file,
          and the anonymous memory of each process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def peak_memory(proc: subprocess.Popen, every: float = 0.2) -> dict:
    """Sample a process and its children until it ends: the peak of their summed RSS and RssAnon (MB)."""
    peak = {"rss_mb": 0.0, "anon_mb": 0.0}

    def sample():
        while proc.poll() is None:
            try:
                procs = [psutil.Process(proc.pid)]
                procs += procs[0].children(recursive=True)
                rss = anon = 0
                for p in procs:
                    with open(f"/proc/{p.pid}/status") as f:
                        for line in f:
                            if line.startswith("VmRSS:"):
                                rss += int(line.split()[1])
                            elif line.startswith("RssAnon:"):
                                anon += int(line.split()[1])
                peak["rss_mb"] = max(peak["rss_mb"], rss / 1024)
                peak["anon_mb"] = max(peak["anon_mb"], anon / 1024)
            except (psutil.Error, OSError):
                pass
            time.sleep(every)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    return peak


def anon_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("RssAnon:")) / 1024


def ranks(proc: subprocess.Popen) -> list[int]:
    """The training processes: the run itself, or under accelerate launch its children running train_loop.py."""
    me = psutil.Process(proc.pid)
    return [p.pid for p in [me, *me.children(recursive=True)] if "train_loop.py" in " ".join(p.cmdline())
            and "accelerate" not in " ".join(p.cmdline())]


PREPARE = """
import sys, time, json
from pathlib import Path
from transformers import AutoTokenizer
from tools import build_tokenizers
from sftloop import sft_data
tok = AutoTokenizer.from_pretrained(build_tokenizers.qwen25_tokenizer_dir())
t = time.perf_counter()
c = sft_data.load_corpus([{{"spec": {data!r}}}], tok, template="qwen2.5", max_len=2048, system_prompt=None,
                         cache_dir=Path({cache!r}), num_proc={workers})
print(json.dumps({{"seconds": time.perf_counter() - t, "rows": len(c.dataset)}}))
"""

RAW = """
import sys, time, json
from transformers import AutoTokenizer
from tools import build_tokenizers
import templates
tok = AutoTokenizer.from_pretrained(build_tokenizers.qwen25_tokenizer_dir())
lines = [json.loads(l) for _, l in zip(range({n}), open({data!r}, encoding="utf-8"))]
texts = [templates.render(templates.to_messages(r), "qwen2.5", tok)[0] for r in lines]
t = time.perf_counter()
tok(texts, add_special_tokens=False, return_attention_mask=False)
raw = time.perf_counter() - t
t = time.perf_counter()
templates.encode_many([templates.to_messages(r) for r in lines], tok, "qwen2.5", 2048)
print(json.dumps({{"raw": len(texts) / raw, "encode_many": len(texts) / (time.perf_counter() - t)}}))
"""


def python(code: str, env: dict | None = None) -> tuple[dict, dict]:
    """Run code in a fresh interpreter; (its JSON line, its peak memory)."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    peak = peak_memory(proc)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"bench step failed:\n{code}")
    return json.loads(out.strip().splitlines()[-1]), peak


def train_until_first_step(cmd: list[str], out: Path, cache: Path) -> dict:
    """Start a run; seconds from the start to "training data ready", to the model loaded and to the
    first optimizer step's record, and each training process's anonymous memory once its data is ready."""
    env = {**os.environ, "TQDM_DISABLE": "1", "SFT_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        now = time.perf_counter() - began
        if "training data ready" in line and "data_ready_s" not in seen:
            seen["data_ready_s"], seen["data_log"] = now, line.split(" INFO ")[-1].strip()
            time.sleep(1.0)  # the other process reads the cache a moment later
            seen["anon_mb_at_data_ready"] = sorted(round(anon_mb(pid)) for pid in ranks(proc))
        if "INFO model: " in line:
            seen["model_loaded_s"], seen["model_log"] = now, line.split(" INFO ")[-1].strip()
        if "INFO step 1/" in line:  # the progress line logged right after the first optimizer step
            seen["first_step_s"] = now
    proc.wait()
    if proc.returncode != 0 or "first_step_s" not in seen:
        raise SystemExit(f"run failed:\n{''.join(lines)[-3000:]}")
    seen["first_step_without_model_s"] = seen["first_step_s"] - (seen["model_loaded_s"] - seen["data_ready_s"])
    seen["tokenized_again"] = any("tokenized " in line for line in lines)
    return seen


def bench_size(n: int, workdir: Path, workers: list[int], warm_only: bool = False) -> dict:
    from bench import make_corpus

    data = workdir / f"belle_{n}.jsonl"
    if not data.is_file():
        print(f"writing {data} ...", flush=True)
        make_corpus.write(n, str(data))
    result = {"conversations": n, "file_mb": data.stat().st_size / 1e6}
    for label, env in (("1 core", {"TOKENIZERS_PARALLELISM": "false"}), ("2 cores", {})) * (not warm_only):
        r, _ = python(RAW.format(repo=str(REPO), data=str(data), n=20000), env)
        result[f"raw_per_s ({label})"] = r["raw"]
        result[f"encode_many_per_s ({label})"] = r["encode_many"]
    for w in workers * (not warm_only):
        cache = workdir / f"cache-{n}-{w}"
        shutil.rmtree(cache, ignore_errors=True)
        r, peak = python(PREPARE.format(repo=str(REPO), data=str(data), cache=str(cache), workers=w))
        result[f"cold_{w}w"] = {"seconds": r["seconds"], "per_s": n / r["seconds"], **peak}
        print(json.dumps({n: result[f"cold_{w}w"]}), flush=True)
        if w != workers[-1]:
            shutil.rmtree(cache)
    cache = workdir / f"cache-{n}-{workers[-1]}"
    r, peak = python(PREPARE.format(repo=str(REPO), data=str(data), cache=str(cache), workers=1))
    result["warm_load_corpus"] = {"seconds": r["seconds"], **peak}
    result["cache_gb"] = sum(f.stat().st_size for f in cache.iterdir()) / 1e9

    from tools import build_tokenizers

    qwen = build_tokenizers.qwen25_tokenizer_dir()
    args = ["--train_files", str(data), "--tokenizer_name_or_path", str(qwen), "--preprocessing_cache_dir", str(cache),
            "--max_steps", "1", "--max_eval_generations", "0", "--plot", "false", "--per_device_train_batch_size", "4",
            "--max_len", "2048"]
    for label, launcher in (("1 process", [sys.executable, "train_loop.py"]),
                            ("2 processes", [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                             "configs/cpu_ddp.yaml", "train_loop.py"])):
        out = workdir / f"out-{n}-{label[0]}"
        shutil.rmtree(out, ignore_errors=True)
        files = sorted(cache.iterdir())
        result[f"warm_train ({label})"] = train_until_first_step([*launcher, *args, "--output_dir", str(out)], out, cache)
        result[f"warm_train ({label})"]["new_cache_files"] = len(sorted(cache.iterdir())) - len(files)
        print(json.dumps({n: {label: result[f"warm_train ({label})"]}}), flush=True)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[250000, 1000000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dir", default="/tmp/sft-bench-data", help="corpora, caches and runs (GBs at 1M)")
    ap.add_argument("--warm_only", action="store_true", help="only the warm parts, on the caches an earlier run left")
    ap.add_argument("--tokenizer_threads_off", action="store_true",
                    help="cold runs with TOKENIZERS_PARALLELISM=false (one thread per worker)")
    a = ap.parse_args()
    workdir = Path(a.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    if a.tokenizer_threads_off:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    results = [bench_size(n, workdir, a.workers, a.warm_only) for n in a.sizes]
    print(json.dumps(results, indent=1))
