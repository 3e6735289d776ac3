"""What a run writes for its user: output_dir/metrics.jsonl (always) and the --report_to tracker,
plus the numbers behind throughput and MFU."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import transformers


def append_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def log_metrics(args, accelerator, metrics: dict) -> None:
    """One record to output_dir/metrics.jsonl, and the numbers to the --report_to tracker."""
    if accelerator.is_main_process:
        append_jsonl(Path(args.output_dir) / "metrics.jsonl", [metrics])
    if args.report_to in ("tensorboard", "wandb"):
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"},
                        step=metrics["step"])


def tracker_config(*dataclasses) -> dict:
    """Flat scalar config for trackers (TensorBoard's hparams take no lists or None)."""
    flat = {}
    for dc in dataclasses:
        for k, v in asdict(dc).items():
            flat[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def flops_per_token(model, max_len: int) -> float:
    """Training FLOPs per token, for MFU: 6 per parameter (forward and backward) plus attention's
    12 x layers x width x context (taken as max_len, an upper bound)."""
    cfg = model.config
    return 6 * sum(p.numel() for p in model.parameters()) + 12 * cfg.num_hidden_layers * cfg.hidden_size * max_len


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, for MFU; None where unknown (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12)):
        if key in name:
            return flops
    return None


def setup(accelerator) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
