"""Running the real entry points in subprocesses, as a user would."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cmd(args, cache, timeout=600, check=True, env_extra=None):
    """Run a command from the repo root with the test cache; return the CompletedProcess."""
    env = {**os.environ, "SFT_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           **(env_extra or {})}
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-8000:]}")
    return p


def train(args, cache, **kw):
    return run_cmd([sys.executable, "train_loop.py", *map(str, args)], cache, **kw)


def launch(config, args, cache, **kw):
    return run_cmd([sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/{config}",
                    "train_loop.py", *map(str, args)], cache, **kw)
