"""What a run writes for its user: output_dir/metrics.jsonl (always) and the --report_to tracker,
plus the numbers behind throughput and MFU."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import datasets
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


def add_source_sums(window: dict, sums: dict) -> dict:
    """Move the per-source sums out of a step's sums (they are not logged raw) into the window's."""
    for k in [k for k in sums if k.startswith("source/")]:
        window[k] = window.get(k, 0.0) + sums.pop(k)
    return window


def source_losses(window: dict, names: list[str]) -> dict:
    """train/<name>/loss: each source's token-weighted loss over the steps since the last log line
    (a source with no tokens there is left out), and train/<name>/target_tokens."""
    out = {}
    for k, name in enumerate(names):
        tokens = window.get(f"source/target_tokens/{k}", 0.0)
        if tokens > 0:
            out[f"train/{name}/loss"] = window[f"source/loss_sum/{k}"] / tokens
            out[f"train/{name}/target_tokens"] = tokens
    return out


class Progress:
    """Progress as log lines, for output that is not a terminal: one every `every` steps."""

    def __init__(self, total: int, start: int, every: int):
        self.total, self.start, self.every, self.began = total, start, every, time.perf_counter()

    def step(self, step: int, loss: float | None, lr: float, tokens_per_s: float) -> None:
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.began
        left = elapsed / max(1, step - self.start) * (self.total - step)
        loss_text = f"loss {loss:.4f}" if loss is not None else "step skipped"
        logging.getLogger("sft").info("step %d/%d (%.0f%%): %s, lr %.2e, %.0f tokens/s, %s elapsed, %s left", step,
                                      self.total, 100 * step / self.total, loss_text, lr, tokens_per_s,
                                      _duration(elapsed), _duration(left))


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


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


def bars_off(args) -> bool:
    """Progress bars only on a terminal: in a log file (Slurm, nohup) each update would be a line."""
    return args.disable_tqdm if args.disable_tqdm is not None else not sys.stderr.isatty()


def setup(accelerator, args) -> None:
    """Our own messages at INFO on the main process; the libraries' at WARNING and above only (their
    INFO lines, such as accelerate's per-file save messages or matplotlib's font cache, are noise)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    logging.getLogger("sft").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    if bars_off(args):  # the libraries' own switches; tokenizing and saving are logged as lines instead
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    # accelerate's save_state stores a tied LM head once and warns that it did; from_pretrained ties
    # it again from the embeddings (the tests reload every saved model). Any other removal still warns.
    logging.getLogger("accelerate.utils.other").addFilter(
        lambda record: "Removed shared tensor {'lm_head.weight'} while saving" not in record.getMessage())
    # DeepSpeed's ZeRO calls a torch collective that torch has deprecated: nothing a user can change.
    warnings.filterwarnings("ignore", message=r"`torch.distributed.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
