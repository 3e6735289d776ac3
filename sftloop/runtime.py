"""The processes: the accelerator (DDP, DeepSpeed or FSDP2, as the accelerate config says), numbers
summed across processes, stopping cleanly on SIGTERM, and a clear end when another node is lost."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator, InitProcessGroupKwargs, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, ProjectConfiguration, gather_object

if not torch.cuda.is_available():
    # DeepSpeed's own setting: told it is on a CPU, it does not warn that it "was unable to detect" a GPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def make_accelerator(args) -> Accelerator:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "LOCAL_RANK" in os.environ or world_size > 1
    timeout = datetime.timedelta(seconds=args.ddp_timeout)  # a peer that died or hangs ends a collective then, not never
    kwargs_handlers, cpu = [InitProcessGroupKwargs(timeout=timeout)], False
    if launched and not torch.cuda.is_available():
        # Without CUDA the default backend is not gloo, and accelerate then sees one process per rank.
        kwargs_handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
        # A multi-GPU config on a CPU-only machine starts the processes but leaves them unconnected
        # (distributed type NO) unless accelerate is told it is on CPU.
        cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    if args.bf16 is None:
        mixed = None  # the accelerate config (ACCELERATE_MIXED_PRECISION) decides, else bf16 where supported
        if "ACCELERATE_MIXED_PRECISION" not in os.environ and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            mixed = "bf16"
    else:
        mixed = "bf16" if args.bf16 else "no"
    asked = mixed or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if asked == "bf16" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        source = "--bf16 true" if args.bf16 else "the accelerate config (mixed_precision: bf16)"
        raise SystemExit(f"error: {source} asks for bf16, but this machine has no GPU with bf16 support; "
                         "pass --bf16 false or use a config with mixed_precision: 'no'")
    trackers = args.report_to if args.report_to in ("tensorboard", "wandb") else None
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=mixed,
                              kwargs_handlers=kwargs_handlers, cpu=cpu, log_with=trackers,
                              project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                                  logging_dir=str(Path(args.output_dir) / "runs")))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate selects FSDP only on an accelerator device; torch's FSDP2 itself runs on CPU over
        # gloo, so on a CPU-only machine (tests, debugging) the processes are told here. Both shared
        # states are set: AcceleratorState copies PartialState's on every construction.
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise SystemExit("error: the accelerate config asks for FSDP version 1; this loop supports FSDP2: set "
                         "fsdp_version: 2 under fsdp_config (see configs/fsdp2.yaml)")
    if world_size > 1 and (accelerator.num_processes != world_size or accelerator.distributed_type == DistributedType.NO):
        raise SystemExit(f"error: launched {world_size} processes, but accelerate set up {accelerator.num_processes} "
                         f"({accelerator.distributed_type.value}); they would train separately. On CPU use "
                         "configs/cpu_ddp.yaml or configs/cpu_zero2.yaml")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if args.skip_nonfinite_steps:
            raise SystemExit("error: --skip_nonfinite_steps is not available under DeepSpeed, whose engine applies the "
                             "update inside backward; without it a non-finite step stops the run before any bad save")
        configure_deepspeed(accelerator, args)
    return accelerator


def configure_deepspeed(accelerator: Accelerator, args) -> None:
    """Our flags are the source of truth; a DeepSpeed config that says otherwise is an error."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
              "gradient_accumulation_steps": args.gradient_accumulation_steps,
              "gradient_clipping": float(args.max_grad_norm)}
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise SystemExit(f"error: the DeepSpeed config sets {key}={ds[key]} but the flags ask for {value}; "
                             f"set it to \"auto\" in the DeepSpeed config or pass the same value")
        ds[key] = value
    ds["train_batch_size"] = global_batch_size(args, accelerator.num_processes)
    zero = ds.setdefault("zero_optimization", {})
    if "optimizer" in offloaded(zero) and args.optim != "adamw_torch":
        # accelerate hands DeepSpeed its CPU Adam in place of whatever optimizer it is given.
        raise SystemExit(f"error: --optim {args.optim} with the optimizer offloaded to CPU memory: DeepSpeed updates "
                         "offloaded weights with its CPU Adam only; use --optim adamw_torch or a config without "
                         "offload_optimizer_device")
    if zero.get("stage") == 3:
        # Without it a ZeRO-3 save writes an empty state dict.
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def idle_cores_note(accelerator: Accelerator) -> str | None:
    """accelerate launch gives each process one CPU thread on a CPU-only machine unless told otherwise:
    then most cores idle, and training runs at a fraction of the speed python train_loop.py gets."""
    cores, world = os.cpu_count() or 1, accelerator.num_processes
    if "LOCAL_RANK" not in os.environ or accelerator.device.type != "cpu" or torch.get_num_threads() > 1 or cores <= world:
        return None
    return (f"each of the {world} processes computes with 1 CPU thread (accelerate launch's default on a CPU), so "
            f"{cores - world} of this machine's {cores} cores are idle; pass --num_cpu_threads_per_process "
            f"{max(1, cores // world)} to accelerate launch")


def is_zero3(accelerator: Accelerator) -> bool:
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def offloaded(zero: dict) -> list[str]:
    """What a DeepSpeed zero_optimization section moves to CPU memory: 'optimizer', 'param', both or none."""
    return [what for what in ("optimizer", "param") if zero.get(f"offload_{what}", {}).get("device", "none") not in ("none", None)]


def shards_parameters(accelerator: Accelerator) -> bool:
    """ZeRO-3 or FSDP: each process holds a slice of every weight, gathered only inside the model's forward."""
    return is_zero3(accelerator) or accelerator.distributed_type == DistributedType.FSDP


# The engines that write training state, each its own format: the one table of their names.
ENGINES = {"deepspeed": "DeepSpeed", "fsdp": "FSDP", "plain": "one process or DDP"}


def engine(accelerator: Accelerator) -> str:
    """What wrote (or will read) the training state: a key of ENGINES."""
    kind = accelerator.distributed_type
    return "deepspeed" if kind == DistributedType.DEEPSPEED else "fsdp" if kind == DistributedType.FSDP else "plain"


@contextmanager
def without_zero3_partitioning(accelerator: Accelerator):
    """For work one process does alone on a model it loads itself (the adapter merge): inside, transformers
    and peft build, resize and merge plain models. accelerate registers its DeepSpeed config with
    transformers whatever zero3_init_flag says, and while it is registered from_pretrained partitions
    what it loads inside deepspeed.zero.Init and resize/merge gather parameters: collectives the other
    processes never join, so the process waits for them forever. (The alternative, every process
    loading the base partitioned and merging together, would gather the whole model on each anyway.)"""
    from transformers.integrations import is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config

    registered = accelerator.state.deepspeed_plugin.dschf if is_deepspeed_zero3_enabled() else None
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if registered is not None:
            set_hf_deepspeed_config(registered)


def unwrapped(model):
    while hasattr(model, "module"):  # DDP and DeepSpeed wrap the model
        model = model.module
    return model


def summed(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor summed over all processes, left on the device (no wait for the host): for sums a
    step needs before its end (the target tokens, a router's expert counts); reduce_sums brings the
    step's numbers to the host once."""
    return accelerator.reduce(tensor, "sum")


def reduce_sums(accelerator: Accelerator, numbers: dict) -> dict:
    """Each number, or tensor of numbers, summed over all processes in one collective (every process
    must call it with the same names and shapes): numbers come back as floats, tensors as CPU tensors.
    The one reduction helper: every cross-process sum of the loop goes through it."""
    # float64 on the way (gloo and NCCL both take it), so token counts stay exact past 2^24
    parts = [torch.as_tensor(v, dtype=torch.float64).to(accelerator.device) for v in numbers.values()]
    total = summed(accelerator, torch.cat([p.reshape(-1) for p in parts])).cpu()
    out, at = {}, 0
    for name, part in zip(numbers, parts):
        piece, at = total[at:at + part.numel()], at + part.numel()
        out[name] = piece.item() if part.dim() == 0 else piece.reshape(part.shape)
    return out


def global_batch_size(args, world_size: int) -> int:
    """Samples per optimizer step over all processes: what split equivalence keeps fixed."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size


# --- SIGTERM (Slurm, Kubernetes): finish the step, checkpoint, exit 0 --------------------------

class Stopped(BaseException):
    """SIGTERM arrived before training began: nothing to save. A BaseException, as KeyboardInterrupt
    is, so that no library's `except Exception` swallows it."""


_state = {"stop": False, "training": False, "phase": "setting up"}


def phase(what: str) -> None:
    """Name what this process does now ("step 12", "saving checkpoint-12"): a collective that times
    out, or a peer that is lost, is then reported with where this process was waiting."""
    _state["phase"] = what


def _on_sigterm(signum, frame) -> None:
    _state["stop"] = True
    if not _state["training"]:
        raise Stopped  # tokenization or the first evaluation: leave at once, there is nothing to lose


@contextmanager
def sigterm_stops():
    """Within: SIGTERM before training ends the run at once (raises Stopped); during training it
    sets a flag that the loop (and evaluation, between batches) checks. The previous handler is
    restored on the way out, so an in-process main() leaves its host as it found it."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _state.update(stop=False, training=False, phase="setting up")
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _state.update(stop=False, training=False, phase="setting up")


def training_begins() -> None:
    """From now on SIGTERM only asks for a checkpoint and a clean exit after the current step."""
    _state["training"] = True


def stop_requested_here() -> bool:
    return _state["stop"]


def stop_agreed(accelerator: Accelerator) -> bool:
    """Whether any process got SIGTERM (a collective: every process calls it at the same point)."""
    return reduce_sums(accelerator, {"stop": float(_state["stop"])})["stop"] > 0


def describe(accelerator: Accelerator) -> str:
    n = accelerator.num_processes
    kind = accelerator.distributed_type
    backend = "gloo" if accelerator.device.type == "cpu" else "NCCL"
    if kind == DistributedType.NO:
        what = "no distributed backend"
    elif kind == DistributedType.DEEPSPEED:
        what = f"{ENGINES['deepspeed']} ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
        if moved := offloaded(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})):
            what += f", {' and '.join(moved)} offloaded to CPU memory"
    elif kind == DistributedType.FSDP:
        what = f"{ENGINES['fsdp']}{accelerator.state.fsdp_plugin.fsdp_version} over {backend}"
    else:
        what = f"DDP over {backend}"
    nodes = n // int(os.environ.get("LOCAL_WORLD_SIZE", n) or n)
    return f"{n} process{'es' if n > 1 else ''}{f' on {nodes} nodes' if nodes > 1 else ''}, {what}"


def node_name() -> str:
    """This process's node, as the launcher numbers it (machine_rank) and by host name."""
    return f"node {os.environ.get('GROUP_RANK', '0')} ({socket.gethostname()})"


def check_nodes_agree(accelerator: Accelerator) -> None:
    """Every node runs as many processes: nodes launched with configs whose num_processes disagree
    would otherwise train with a global batch no config asked for."""
    if accelerator.num_processes == 1:
        return
    counts = dict(gather_object([(node_name(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))]))
    if len(set(counts.values())) > 1:
        raise SystemExit("error: the nodes run different numbers of processes (" + ", ".join(
            f"{node}: {k}" for node, k in sorted(counts.items())) + "); launch every node with the same accelerate "
            "config (num_processes is the total over all machines, num_machines the number of nodes)")


# How gloo and NCCL say that a peer is gone (they raise plain RuntimeErrors as well as DistErrors).
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "gloo/transport", "ProcessGroupGloo",
             "ProcessGroupNCCL", "NCCL communicator")


@contextmanager
def lost_peers_explained(output_dir: str, latest_checkpoint, timeout_s: int):
    """A collective that fails because another process or node died (killed, out of memory, a
    machine lost), or that waited past --ddp_timeout for one that hangs, ends this process with one
    line that says so, where this process was (the phase), and the checkpoint to resume from,
    instead of a gloo/NCCL traceback from deep inside a collective."""
    try:
        yield
    except (RuntimeError, torch.distributed.DistError) as e:
        text = str(e)
        if not (isinstance(e, torch.distributed.DistError) or any(s in text for s in LOST_PEER)):
            raise
        ckpt = latest_checkpoint(Path(output_dir))
        said = text.splitlines()[0].split("] ", 1)[-1] if text.startswith("[") else text.splitlines()[0]  # no source path
        where = _state["phase"]
        if "timed out" in text.lower():
            what = (f"waited {timeout_s} s (--ddp_timeout) for the other processes at {where} and gave up: another "
                    "process hung or died")
        else:
            what = f"lost contact with another process at {where}: a node or process died or hung"
        raise SystemExit(f"error: {node_name()} {what} ({said[:160]}). The last complete checkpoint is "
                         f"{ckpt or 'none (nothing saved yet)'}; once every node is up again, resume with "
                         "--resume_from_checkpoint true") from None


def gathered_sample_ids(micro_batches: list[dict]) -> list[int]:
    """The ids of this step's samples on all processes (a collective: every process calls it)."""
    ids = [i for b in micro_batches for i in b["sample_id"].tolist()]
    return sorted(i for part in gather_object([ids]) for i in part)


@contextmanager
def errors_said_once():
    """A user's error (SystemExit with a message) is printed by the first process only, on a line
    of its own, instead of by every process at once. Another process prints it only if it is still
    alive a few seconds later: an error of its own, which the first process did not have."""
    try:
        yield
    except SystemExit as e:
        if not isinstance(e.code, str) or int(os.environ.get("RANK", "0")) == 0:
            raise
        time.sleep(5)  # the launcher ends every process once the first one has failed
        raise SystemExit(f"[process {os.environ['RANK']}] {e.code}") from None
