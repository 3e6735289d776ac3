"""Storage the processes must share, proven at start instead of assumed.

Every process writes its checkpoint shards (DeepSpeed, FSDP) into output_dir, and the first process
alone renames and marks a checkpoint complete; the tokenized cache is written once and memory-mapped
by all. On several machines both hold only when the directories are on storage all nodes share (NFS,
Lustre, a cloud filesystem mounted at the same path). The first process writes a probe file with a
random name; every process looks for it, and the nodes that cannot see it are named."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from sftloop import runtime


def unseen_by(accelerator: Accelerator, directory: Path, what: str) -> tuple[str, list[str]]:
    """(the first process's node, the nodes whose processes do not see what it writes into
    `directory`); a collective: every process calls it."""
    message = [None, None, runtime.node_name()]  # [probe name, error, the writer's node]
    if accelerator.is_main_process:
        name = f".storage-probe-{secrets.token_hex(8)}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(name)
            message[0] = name
        except OSError as e:
            message[1] = f"error: {what} {directory} is not writable: {e.strerror}"
    broadcast_object_list(message)  # every process learns the name, or the error, and stops with it
    name, error, writer = message
    if error:
        raise SystemExit(error)
    probe = directory / name
    deadline = time.monotonic() + 2.0  # a network filesystem may show a new file a moment late
    seen = probe.is_file()
    while not seen and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = probe.is_file()
    answers = gather_object([(runtime.node_name(), seen)])  # once gathered, every process has looked
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    accelerator.wait_for_everyone()  # no process goes on to find the probe in output_dir
    return writer, sorted({node for node, ok in answers if not ok})


def require_shared_dirs(accelerator: Accelerator, output_dir: str, cache_dir: Path, cache_on_each_node: bool) -> bool:
    """Stop, naming the nodes, unless every process sees the same output_dir, and the same cache
    unless --cache_on_each_node. Returns whether the cache is shared (tokenize once in all) or not
    (once on each node)."""
    if accelerator.num_processes == 1:
        return True
    first, missing = unseen_by(accelerator, Path(output_dir), "output directory")
    if missing:
        raise SystemExit(
            f"error: --output_dir {output_dir} is not the same directory on every node: {', '.join(missing)} cannot "
            f"see what {first} writes there. Every process writes its part of a checkpoint there and resuming reads "
            "them all: put --output_dir on storage every node mounts at the same path (NFS, Lustre, a cloud "
            "filesystem)")
    first, missing = unseen_by(accelerator, cache_dir, "preprocessing cache")
    if missing and not cache_on_each_node:
        raise SystemExit(
            f"error: the preprocessing cache {cache_dir} is not the same directory on every node: {', '.join(missing)} "
            f"cannot see what {first} writes there. Point --preprocessing_cache_dir (or $SFT_CACHE) at storage every "
            "node shares (tokenized once in all), or pass --cache_on_each_node true to tokenize once on each node "
            "into its own local cache")
    return not missing
