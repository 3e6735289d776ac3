"""Draw a run's losses (whole, per training source, per validation set), its learning rate, its
held-out exact match and, for a mixture-of-experts model, its router's balancing loss and expert
load, from its metrics.jsonl.

    python -m sftloop.plot_metrics output/            # writes output/metrics.png
"""

import json
import sys
from pathlib import Path


def series(rows: list[dict], key: str) -> list[tuple]:
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]


def plot(run_dir) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    keys = sorted({k for r in rows for k in r})
    sources = [k for k in keys if k.startswith("train/") and k.endswith("/loss")]
    sets = [k for k in keys if k.startswith("eval/") and k.endswith("/loss")]
    matches = ["eval_exact_match"] * ("eval_exact_match" in keys) + [k for k in keys if k.endswith("/exact_match")]
    routed = "router_aux_loss" in keys
    panels = 1 + bool(matches) + routed
    fig, axes = plt.subplots(panels, 1, figsize=(8, 4.5 + 2.5 * (panels - 1)), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [2] + [1] * (panels - 1)})
    loss_ax = axes[0][0]
    if series(rows, "loss"):
        loss_ax.plot(*zip(*series(rows, "loss")), label="train loss", lw=1)
    for k in sources:
        loss_ax.plot(*zip(*series(rows, k)), lw=0.8, alpha=0.8, label=k)
    if series(rows, "eval_loss"):
        loss_ax.plot(*zip(*series(rows, "eval_loss")), "o-", label="eval loss")
    for k in sets:
        loss_ax.plot(*zip(*series(rows, k)), "s--", ms=3, lw=0.8, label=k)
    loss_ax.set_ylabel("loss (token-weighted)")
    lr_ax = loss_ax.twinx()
    if series(rows, "lr"):
        lr_ax.plot(*zip(*series(rows, "lr")), color="gray", ls="--", lw=1, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    handles = loss_ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    loss_ax.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize="small")
    loss_ax.set_title(str(run_dir))
    if matches:
        em_ax = axes[1][0]
        for k in matches:
            em_ax.plot(*zip(*[(s, 100 * v) for s, v in series(rows, k)]), "o-", ms=3,
                       label="held-out exact match" if k == "eval_exact_match" else k)
        em_ax.set_ylabel("exact match (%)")
        em_ax.set_ylim(-2, 102)
        em_ax.legend(loc="lower right", fontsize="small")
    if routed:  # the balancing loss (top_k when perfectly balanced), and the busiest and idlest expert's share
        router_ax = axes[-1][0]
        router_ax.plot(*zip(*series(rows, "router_aux_loss")), lw=1, label="router balancing loss")
        router_ax.set_ylabel("balancing loss")
        share_ax = router_ax.twinx()
        for k, style, label in (("expert_share_max", "-", "busiest expert's share"),
                                ("expert_share_min", "--", "idlest expert's share")):
            share_ax.plot(*zip(*series(rows, k)), ls=style, color="tab:red", lw=0.8, label=label)
        share_ax.set_ylabel("share of a layer's selections")
        handles = router_ax.get_legend_handles_labels()[0] + share_ax.get_legend_handles_labels()[0]
        router_ax.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize="small")
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m sftloop.plot_metrics RUN_DIR   (a directory with metrics.jsonl)")
    run = Path(sys.argv[1])
    if not run.is_dir():
        raise SystemExit(f"error: {run}: no such directory")
    if not (run / "metrics.jsonl").is_file():
        raise SystemExit(f"error: {run} holds no metrics.jsonl (a run writes it in its --output_dir)")
    print(plot(run))
