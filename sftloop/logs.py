"""What a run writes for its user: a step's report (progress bar or lines, metrics.jsonl, the
--report_to tracker, sample_ids.jsonl), per-source losses, and the numbers behind throughput and MFU."""

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
from tqdm.auto import tqdm

from sftloop import lm_logits, runtime


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


class StepReport:
    """Where a step's numbers go, all from one call per step: the progress bar (on a terminal) or a
    progress line every 5% (in a log file), sample_ids.jsonl (--log_sample_ids), and every
    --logging_steps a metrics.jsonl record and the tracker, with per-source losses over the window."""

    def __init__(self, total_steps: int, start_step: int, steps_per_epoch: int, global_batch: int,
                 source_names: list[str], flops_per_token: float, args, accelerator):
        self.total, self.steps_per_epoch, self.global_batch = total_steps, steps_per_epoch, global_batch
        self.names, self.flops, self.args, self.accelerator = source_names, flops_per_token, args, accelerator
        off = bars_off(args)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=off or not accelerator.is_main_process,
                        desc="train")
        self.progress = Progress(total_steps, start_step, every=max(1, total_steps // 20)) if off else None
        self.peak = peak_flops(accelerator.device)
        self.by_source = None  # [2, sources]: loss sums and target tokens since the last metrics record
        self.clock = time.perf_counter()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def step(self, step: int, result, micro_batches: list[dict], lr: float, skipped_steps: int) -> bool:
        """Report one step from its numbers, summed over processes by train_step (in the wait for the
        host that also agrees on stopping). Returns whether any process got SIGTERM."""
        summed = dict(result.sums)
        stopped = summed.pop("stop") > 0
        if result.skipped is not None:
            summed["loss_sum"] = float("nan")  # the step was not applied
        window = summed.pop("by_source", None)
        if window is not None and result.skipped is None:
            self.by_source = window if self.by_source is None else self.by_source + window
        now = time.perf_counter()  # the whole step, data loading and collation included
        dt, self.clock = now - self.clock, now
        loss = summed["loss_sum"] / max(1.0, result.target_tokens) if result.skipped is None else None
        self.bar.update(1)
        balancing = summed.get("router_aux_loss")  # a mixture-of-experts model's router
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{result.grad_norm:.2f}",
                                 tok_s=f"{summed['real_tokens'] / dt:.0f}",
                                 **({"router": f"{balancing:.3f}"} if balancing is not None else {}))
        if self.progress is not None:
            self.progress.step(step, loss, lr, summed["real_tokens"] / dt, balancing)
        if self.args.log_sample_ids:
            ids = runtime.gathered_sample_ids(micro_batches)
            if self.accelerator.is_main_process:
                append_jsonl(Path(self.args.output_dir) / "sample_ids.jsonl", [{"step": step, "sample_ids": ids}])
        if step % self.args.logging_steps == 0 or step == self.total:
            log_metrics(self.args, self.accelerator, {
                "step": step, "epoch": step / self.steps_per_epoch, "samples_seen": step * self.global_batch,
                "loss": loss, "lr": lr, "grad_norm": result.grad_norm, **summed, "target_tokens": result.target_tokens,
                "tokens_per_s": summed["real_tokens"] / dt, "target_tokens_per_s": result.target_tokens / dt,
                "padding_efficiency": summed["real_tokens"] / summed["padded_tokens"], "skipped_steps": skipped_steps,
                "step_time": dt,
                **({"mfu": summed["real_tokens"] / dt * self.flops / (self.peak * self.accelerator.num_processes)}
                   if self.peak else {}),
                # the allocator's own count (no wait for the device): the most this process's GPU held
                **({"peak_memory_gb": torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30}
                   if self.accelerator.device.type == "cuda" else {}),
                **source_losses(self.by_source, self.names)})
            self.by_source = None
        return stopped

    def close(self) -> None:
        self.bar.close()


def source_sums(token_losses: list[torch.Tensor], micro_batches: list[dict], num_sources: int) -> torch.Tensor:
    """[2, sources]: each source's loss sum and target tokens in these micro-batches, from each
    batch's per-token source ids; zeros for a step without losses (skipped)."""
    sums = torch.zeros(2, num_sources, dtype=torch.float64, device=micro_batches[0]["labels"].device)
    for b, losses in zip(micro_batches, token_losses):
        src = b["source"][lm_logits.target_positions(b["labels"])]
        sums[0].index_add_(0, src, losses.double())
        sums[1].index_add_(0, src, torch.ones_like(src, dtype=torch.float64))
    return sums


def source_losses(window: torch.Tensor | None, names: list[str]) -> dict:
    """train/<name>/loss: each source's token-weighted loss over the steps since the last log line
    (a source with no tokens there is left out), and train/<name>/target_tokens."""
    if window is None:
        return {}
    return {key: value for k, name in enumerate(names) if window[1, k] > 0
            for key, value in ((f"train/{name}/loss", (window[0, k] / window[1, k]).item()),
                               (f"train/{name}/target_tokens", window[1, k].item()))}


class Progress:
    """Progress as log lines, for output that is not a terminal: one every `every` steps."""

    def __init__(self, total: int, start: int, every: int):
        self.total, self.start, self.every, self.began = total, start, every, time.perf_counter()

    def step(self, step: int, loss: float | None, lr: float, tokens_per_s: float, balancing: float | None = None) -> None:
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.began
        left = elapsed / max(1, step - self.start) * (self.total - step)
        loss_text = f"loss {loss:.4f}" if loss is not None else "step skipped"
        if loss is not None and balancing is not None:
            loss_text += f", router_aux_loss {balancing:.4f}"
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
