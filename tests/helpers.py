"""Running the real entry points in subprocesses, as a user would."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def run_cmd(args, cache, timeout=600, check=True, env_extra=None):
    """Run a command from the repo root with the test cache; return the CompletedProcess."""
    env = {**os.environ, "SFT_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           **(env_extra or {})}
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-8000:]}")
    return p


def quick(args, plot=False):
    """Runs on the default data evaluate on its held-out set; greedy generation there is the slow
    part, so tests that do not look at it turn it off. A run in a subprocess also skips the plot
    unless it asks for it (matplotlib costs each new process a second of CPU; in the test process
    it is imported once, and test_eval looks at the plot)."""
    args = [str(a) for a in args]
    args = args if "--max_eval_generations" in args else args + ["--max_eval_generations", "0"]
    return args if plot or "--plot" in args else args + ["--plot", "false"]


def train(args, cache, check=True, env_extra=None, subprocess_=False, **kw):
    """`python train_loop.py ARGS`, run in this process through train_loop.main as python would run
    it, minus the interpreter's start-up (several seconds a run on 2 cores): the environment and the
    working directory as run_cmd sets them, stdout and stderr captured (the log lines too), a
    user's error (SystemExit with a message) printed to stderr with exit status 1. Returns what
    run_cmd returns. subprocess_=True runs a real subprocess instead."""
    if subprocess_:
        return run_cmd([sys.executable, "train_loop.py", *quick(args)], cache, check=check, env_extra=env_extra, **kw)
    import contextlib
    import io
    import logging

    import train_loop
    from accelerate.state import AcceleratorState, GradientState
    from sftloop import runtime

    argv = quick(args, plot=True)
    env = {"SFT_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **(env_extra or {})}
    saved_env, cwd = {k: os.environ.get(k) for k in env}, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handler = logging.StreamHandler(err)  # what logs.setup's basicConfig would install in a fresh process
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers, code = [handler], 0
    os.environ.update(env)
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), runtime.errors_said_once():
            train_loop.main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            err.write(e.code + "\n")
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        root.handlers, root.level = saved_handlers, saved_level
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        import gc

        gc.collect()
    p = subprocess.CompletedProcess([sys.executable, "train_loop.py", *argv], code, out.getvalue(), err.getvalue())
    if check and p.returncode != 0:
        raise AssertionError(f"train_loop.py {' '.join(argv)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-8000:]}")
    return p


TINY_TOKENIZER = REPO / "assets" / "tiny-qwen-tokenizer"


def random_samples(lengths, seed=1, vocab=256):
    """Samples of random token ids of these lengths: the first 4 tokens a prompt (label -100), the rest trained."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * min(n, 4) + ids[4:]})
    return out


def tiny_model_dir(tmp_path, build, name="model"):
    """A tiny random model, build(), saved as a model directory with the tiny tokenizer's vocabulary
    (744 tokens: embeddings of 768) and its special tokens, for --model_name_or_path."""
    import torch

    torch.manual_seed(0)
    model = build()
    model.resize_token_embeddings(768)
    model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id = 724, 722, None
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def launch(config, args, cache, launcher_flags=(), script="train_loop.py", **kw):
    return run_cmd([sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/{config}",
                    *launcher_flags, str(script), *quick(args)], cache, **kw)


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def max_diff(a, b):
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metrics(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def metrics_lines(out):
    """How many records metrics.jsonl holds so far (0 before the first), for tests that wait on a run."""
    try:
        return sum(1 for _ in open(out / "metrics.jsonl"))
    except FileNotFoundError:
        return 0


def losses(out):
    """step -> logged loss (the last record of a step wins: a killed run may have logged it first)."""
    return {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}

def start(args, cache, **popen):
    """Start a command in the background, output captured (for tests that signal it)."""
    env = {**os.environ, "SFT_CACHE": str(cache), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(a) for a in args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def wait_for(predicate, proc, timeout=300, interval=0.05):
    """Poll every `interval` s (on 2 cores a tighter loop takes CPU from the run it waits for)."""
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended first:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(interval)


WORDS = "apple banana cherry river mountain cloud stone green blue red cat dog fish bird tree house".split()


def uneven_data(path, n):
    """Replies of 1 to ~120 words, so micro-batches hold very different numbers of target tokens."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            reply = " ".join(rng.choices(WORDS, k=1 if i % 2 else rng.randint(40, 120)))
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"Say something {i}"},
                                                  {"from": "assistant", "value": reply}]}) + "\n")
    return path


# (where, per-device batch, accumulation): where is 'python' or an accelerate config in configs/
SPLITS = {
    "8x1x1": ("python", 8, 1),
    "2x4x1": ("python", 2, 4),
    "4x1x2-ddp": ("cpu_ddp.yaml", 4, 1),
    "2x2x2-zero2": ("cpu_zero2.yaml", 2, 2),
    "2x2x2-zero3": ("cpu_zero3.yaml", 2, 2),
    "2x2x2-fsdp2": ("cpu_fsdp2.yaml", 2, 2),
}


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_cmd(config, rank, port, args, nodes=2, processes=2, launcher_flags=()):
    """One node's `accelerate launch` of a run over `nodes` nodes on this machine (as a cluster would,
    with machine_rank and the main node's address)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/{config}",
            "--num_machines", str(nodes), "--num_processes", str(processes), "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--rdzv_conf", "timeout=60",
            "--deepspeed_multinode_launcher", "standard", *launcher_flags, "train_loop.py", *quick(args)]


def start_nodes(config, args, cache, node_args=None, node_cache=None, **kw):
    """Start nodes 0 and 1 of a two-node run; node_args/node_cache: {rank: ...} to give one node other
    flags (appended) or another cache directory."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        cmd = node_cmd(config, rank, port, [*args, *(node_args or {}).get(rank, [])], **kw)
        procs.append(start(cmd, (node_cache or {}).get(rank, cache), start_new_session=True))
    return procs


def finish(procs, timeout=600):
    """Wait for every node; returns [(returncode, output)]."""
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=timeout)
        out.append((p.returncode, text))
    return out


def two_nodes(config, args, cache, check=True, **kw):
    results = finish(start_nodes(config, args, cache, **kw))
    if check:
        for rank, (code, text) in enumerate(results):
            assert code == 0, f"node {rank} exited {code}\n{text[-6000:]}"
    return results


def trained_text(tok, enc):
    """Decode each run of consecutive trained tokens separately (labels -100 are untrained)."""
    runs, cur = [], []
    for i, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs
