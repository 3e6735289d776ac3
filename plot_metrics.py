"""Draw train/eval loss and the learning rate of a run from its metrics.jsonl.

    python plot_metrics.py output/            # writes output/metrics.png
"""

import json
import sys
from pathlib import Path


def plot(run_dir) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    lrs = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    fig, loss_ax = plt.subplots(figsize=(8, 4.5))
    if train:
        loss_ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        loss_ax.plot(*zip(*evals), "o-", label="eval loss")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("loss (token-weighted)")
    lr_ax = loss_ax.twinx()
    if lrs:
        lr_ax.plot(*zip(*lrs), color="gray", ls="--", lw=1, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    handles = loss_ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    loss_ax.legend(handles, [h.get_label() for h in handles], loc="upper right")
    loss_ax.set_title(str(run_dir))
    fig.tight_layout()
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "metrics.jsonl").is_file():
        raise SystemExit("usage: python plot_metrics.py RUN_DIR   (a directory with metrics.jsonl)")
    print(plot(sys.argv[1]))
