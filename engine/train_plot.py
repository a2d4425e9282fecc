"""The loss curve of a run, from its metrics.jsonl, as a PNG (matplotlib, Agg backend)."""
from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics: str | Path, out: str | Path) -> Path | None:
    metrics = Path(metrics)
    if not metrics.is_file():
        return None
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("loss/")})
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label="objective (weighted sum)" if k == "loss" else k[5:], lw=2 if k == "loss" else 1)
    for k in sorted({k for r in rows for k in r if k.startswith("hinge_")}):  # each hinge, unweighted, dotted
        xs, ys = zip(*[(r["step"], r[k]) for r in rows if k in r])
        ax.plot(xs, ys, label=k.replace("hinge_", "hinge ", 1), lw=1, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center")
    lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    if lr:  # the schedule beside the losses: warm-up, and a decay phase where there is one
        twin = ax.twinx()
        twin.plot(*zip(*lr), color="grey", ls="--", lw=1)
        twin.set_ylabel("learning rate (dashed)", color="grey")
        twin.set_ylim(bottom=0)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
