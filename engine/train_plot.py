"""A run's curves from its metrics.jsonl as PNGs (matplotlib, Agg backend): the losses, and how
far each gated block's tanh gates have opened."""
from __future__ import annotations

import json
from pathlib import Path


def _rows(metrics: str | Path) -> list[dict]:
    metrics = Path(metrics)
    if not metrics.is_file():
        return []
    return [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    tmp = out.with_suffix(".tmp.png")  # written whole, then renamed: a reader never sees half a PNG
    fig.savefig(tmp)
    _pyplot().close(fig)
    tmp.replace(out)
    return out


def plot_metrics(metrics: str | Path, out: str | Path) -> Path | None:
    rows = _rows(metrics)
    if not rows:
        return None
    plt = _pyplot()

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
    return _save(fig, out)


def plot_gates(metrics: str | Path, out: str | Path) -> Path | None:
    """|tanh(gate)| of every gated block over the steps, attention and dense side by side, one
    line per decoder layer; None when the log has no gate values (runs from before they were
    logged, contrastive runs)."""
    rows = [r for r in _rows(metrics) if any(k.startswith("gate_") for k in r)]
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100, sharey=True)
    for ax, kind in zip(axes, ("attn", "ff")):
        keys = sorted({k for r in rows for k in r if k.startswith(f"gate_{kind}/")}, key=lambda k: int(k.split("/")[1]))
        for k in keys:
            xs, ys = zip(*[(r["step"], abs(r[k])) for r in rows if k in r])
            ax.plot(xs, ys, label=f"layer {k.split('/')[1]}")
        ax.set_title("cross-attention gates" if kind == "attn" else "dense gates")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("|tanh(gate)|")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, out)
