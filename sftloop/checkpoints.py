"""Checkpoints: the output directory, saving (an HF model directory plus the training state, renamed
into place when complete), the final model, and resuming (only from complete, plain-data state)."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from sftloop import adapters, runtime
from sftloop.common import first_line

log = logging.getLogger("sft")

def resume_target(args) -> Path | None:
    """The checkpoint the run would resume from, if any; a SystemExit with the reason where the run
    would refuse its output directory. Reads only (the pre-flight check asks it too)."""
    out = Path(args.output_dir)
    resume = args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("false", "none", ""):
        resume = None
    if resume is not None and resume.lower() in ("true", "latest"):
        resume = latest_checkpoint(out)
        if resume is None:
            raise SystemExit(f"error: --resume_from_checkpoint true, but {out} holds no complete checkpoint")
    elif resume is not None and not (Path(resume) / COMPLETE).is_file():
        raise SystemExit(f"error: {resume} is not a complete checkpoint (no {COMPLETE} marker)")
    # a check's report alone does not make a directory used
    used = out.exists() and any(f.name != CHECK_REPORT for f in out.iterdir())
    if resume is None and used and not args.overwrite_output_dir:
        hint = ("pass --resume_from_checkpoint true to continue it" if latest_checkpoint(out)
                else "choose another --output_dir")
        raise SystemExit(f"error: output directory {out} is not empty; {hint}, or --overwrite_output_dir to start over")
    return None if resume is None else Path(resume)


def prepare_output_dir(args, accelerator: Accelerator) -> str | None:
    """The checkpoint to resume from, if any; refuses to write into a used directory otherwise."""
    out = Path(args.output_dir)
    resume = resume_target(args)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            if args.overwrite_output_dir and resume is None and out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write-test").write_text("")
            (out / ".write-test").unlink()
        except OSError as e:
            raise SystemExit(f"error: output directory {out} is not writable: {e.strerror}") from None
    accelerator.wait_for_everyone()
    return None if resume is None else str(resume)


COMPLETE = "checkpoint_complete"  # written last: a checkpoint without it is never resumed from
CHECK_REPORT = "check.json"  # what --check writes into output_dir


def complete_checkpoints(out: Path) -> list[Path]:
    done = [p for p in out.glob("checkpoint-*") if p.name[11:].isdigit() and (p / COMPLETE).is_file()]
    return sorted(done, key=lambda p: int(p.name[11:]))


def latest_checkpoint(out: Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1] if done else None


def write_model_dir(model, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """An HF model directory (or, for a peft model, the adapter only: adapter_model.safetensors +
    adapter_config.json) with the tokenizer: every model directory the run writes is written here."""
    model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
    with_users_umask(directory)


def save_hf_model(accelerator: Accelerator, model, tokenizer, directory: Path) -> None:
    # Every rank must call get_state_dict: under ZeRO-3 it gathers the shards with a collective.
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        # DeepSpeed hands back tied weights (lm_head = embeddings) as two tensors; store one, as HF does.
        for target, source in (getattr(unwrapped, "all_tied_weights_keys", None) or {}).items():
            if source in state_dict:
                state_dict.pop(target, None)
        write_model_dir(unwrapped, tokenizer, directory, state_dict)
        if adapters.is_adapter(unwrapped):
            adapters.check_saved(directory)


def with_users_umask(directory: Path) -> None:
    """safetensors writes its files with mode 0600 (through a temporary file); give every file the
    mode the user's umask gives the rest, so a shared run directory stays readable as they chose."""
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(directory).rglob("*"):
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def save_base_model(accelerator: Accelerator, model, tokenizer, args) -> str:
    """The built-in tiny model's initial weights, the base its LoRA adapters apply to (a pretrained
    model's base is its own directory). The first process saves alone: safe under ZeRO-3 because the
    model is not partitioned yet (built by its constructor, before accelerator.prepare) and
    save_pretrained gathers nothing."""
    path = Path(args.output_dir) / "base_model"
    if accelerator.is_main_process:
        write_model_dir(model, tokenizer, path)
    accelerator.wait_for_everyone()
    return str(path.resolve())


def save_checkpoint(accelerator: Accelerator, model, tokenizer, args, state: dict) -> Path:
    """Write into a temporary directory, mark it complete, then rename it into place: a run killed
    mid-save leaves the previous checkpoints intact and no directory that looks finished."""
    began = time.perf_counter()
    out = Path(args.output_dir)
    final = out / f"checkpoint-{state['global_step']}"
    tmp = out / f".tmp-checkpoint-{state['global_step']}"
    if accelerator.is_main_process:
        for stale in out.glob(".tmp-checkpoint-*"):  # left by a run killed while saving
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    save_hf_model(accelerator, model, tokenizer, tmp)
    accelerator.save_state(str(tmp / "training_state"))  # optimizer, RNG, DeepSpeed shards
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with_users_umask(tmp / "training_state")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (tmp / COMPLETE).write_text("")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if args.save_total_limit:
            for old in complete_checkpoints(out)[:-args.save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    log.info("saved %s in %.1f s", final, time.perf_counter() - began)
    return final


def save_final_model(accelerator: Accelerator, model, tokenizer, out: Path) -> None:
    """The final model at the top of output_dir, each file moved into place only once all are written."""
    tmp = out / ".tmp-final"
    save_hf_model(accelerator, model, tokenizer, tmp)
    if accelerator.is_main_process:
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        tmp.rmdir()
    accelerator.wait_for_everyone()


def check_state_is_plain_data(state_dir: Path) -> None:
    """Refuse training state that would unpickle anything beyond tensors and plain data.

    accelerate loads its own files with torch.load(weights_only=True); DeepSpeed loads its shards
    with weights_only=False, so every file is first proven loadable with weights_only=True, allowing
    only DeepSpeed's plain record types besides."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    allowed = list(TORCH_SAFE_GLOBALS)
    try:  # plain enums and records (no code) that DeepSpeed stores in its optimizer shards
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    except ImportError:
        pass
    for f in sorted(state_dir.rglob("*")):
        if f.suffix in (".pt", ".bin", ".pkl"):
            _load_plain(f, f, allowed)
        elif f.name == ".metadata":  # FSDP's torch.distributed.checkpoint: read with pickle.load, then torch.load
            _check_dcp_checkpoint(f, allowed)


def _load_plain(source, f: Path, allowed: list) -> None:
    try:
        with torch.serialization.safe_globals(allowed):
            torch.load(source, map_location="cpu", weights_only=True, **({"mmap": True} if source is f else {}))
    except Exception as e:
        what = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise SystemExit(f"error: refusing to resume from {f}: it holds more than tensors and plain data "
                         f"({what.group(1) if what else first_line(e)})") from None


class _DcpMetadata(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint index and nothing else: its record types, sizes, dtypes, paths."""

    def find_class(self, module: str, name: str):
        record = module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
        if (record and (name[0].isupper() or name in ("_StorageInfo", "_MEM_FORMAT_ENCODING"))) \
                or (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")) \
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def _check_dcp_checkpoint(meta_file: Path, allowed: list) -> None:
    """The index, then every non-tensor item (which torch.distributed.checkpoint loads with
    weights_only=False), each proven plain as above; tensors are stored as raw bytes."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    try:
        with open(meta_file, "rb") as fh:
            metadata = _DcpMetadata(fh).load()
    except Exception as e:
        raise SystemExit(f"error: refusing to resume from {meta_file}: it holds more than a checkpoint index "
                         f"({first_line(e)})") from None
    for index, where in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            f = meta_file.parent / where.relative_path
            with open(f, "rb") as fh:
                fh.seek(where.offset)
                _load_plain(io.BytesIO(fh.read(where.length)), f, allowed)


def resume(accelerator: Accelerator, resume_dir: str, global_batch: int, seed: int, data_order,
           use_peft: bool = False) -> dict:
    """Load weights, optimizer and RNG state from a complete checkpoint; its trainer_state.json.
    data_order(epoch) is the fingerprint of that epoch's sample order as the data and code now give it."""
    state = resumable(resume_dir, global_batch, seed, data_order, use_peft, runtime.engine(accelerator))
    accelerator.load_state(str(Path(resume_dir) / "training_state"))
    return state


def resumable(resume_dir, global_batch: int, seed: int, data_order, use_peft: bool, now_engine: str) -> dict:
    """The checkpoint's trainer_state.json if this run can continue it, else a SystemExit saying why
    (reads only: the pre-flight check asks it too)."""
    ckpt = Path(resume_dir)
    check_state_is_plain_data(ckpt / "training_state")  # on every rank: no rank waits on a failed one
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state["global_batch_size"] != global_batch or state["seed"] != seed:
        raise SystemExit(f"error: {ckpt} was trained with global batch {state['global_batch_size']} and seed "
                         f"{state['seed']}; resuming needs the same (now {global_batch}, {seed})")
    now = data_order(state["epoch"])
    trained_with = bool(state.get("args", {}).get("use_peft", False))
    if trained_with != use_peft:
        raise SystemExit(f"error: {ckpt} was trained {'with' if trained_with else 'without'} --use_peft (a LoRA "
                         f"adapter); resume it {'with' if trained_with else 'without'} --use_peft and the same LoRA flags")
    if state.get("data_order", now) != now:
        raise SystemExit(f"error: {ckpt} was trained with another order of samples (data order {state['data_order']}, "
                         f"now {now}): the data, --group_by_length, --packing or the batch order code (batches.py) "
                         "changed, so resuming would not continue the same data. Restore them, or start a new run "
                         f"from its weights: --model_name_or_path {ckpt}")
    saved_by = engine_of(ckpt / "training_state")
    if saved_by != now_engine:
        raise SystemExit(f"error: {ckpt} holds training state written under {runtime.ENGINES[saved_by]}, which "
                         f"{runtime.ENGINES[now_engine]} cannot load. Resume it with the accelerate config it was trained with, "
                         "or start a new run "
                         f"from its weights (its model.safetensors): --model_name_or_path {ckpt} (the optimizer "
                         "state starts afresh)")
    return state


def engine_of(state_dir: Path) -> str:
    """Which engine wrote a checkpoint's training state, from its files: DeepSpeed keeps its shards in
    pytorch_model/, FSDP in pytorch_model_fsdp_0/; one process and DDP write model.safetensors."""
    if (state_dir / "pytorch_model").is_dir():
        return "deepspeed"
    if (state_dir / "pytorch_model_fsdp_0").is_dir():
        return "fsdp"
    return "plain"


LOGS = ("metrics.jsonl", "generations.jsonl", "sample_ids.jsonl")


def forget_steps_after(out: Path, step: int) -> None:
    """On resume: drop what a killed run logged past its last checkpoint, so each step is logged once
    (each file is rewritten beside and renamed over, never left half-written)."""
    for name in LOGS:
        f = out / name
        if not f.is_file():
            continue
        lines = f.read_text().splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) < len(lines):
            tmp = out / f".{name}.tmp"
            tmp.write_text("".join(kept))
            os.replace(tmp, f)
