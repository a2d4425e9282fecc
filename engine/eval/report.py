"""The evaluation report: the contract JSON

    {"model": ..., "task": ..., "results": [{"shots": k, "metric": name, "score": x, "n": count,
     ...extra: "std", "stderr", "seeds", "blind_score", "calibrated_score", "chance", ...}, ...], ...}

and a shots-vs-score plot beside it (FILE.png): one panel per metric, error bars = the spread
(std) over seeds, the image-blind control dashed, the calibrated score dotted, the vision-only
prototypes (tower features, visual tokens) dash-dotted, the exact-copy
ceiling dotted, chance and majority baselines as grey lines.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path


def _clean(x):
    """JSON without NaN/Infinity (they are not JSON): None instead."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: str | Path, payload: dict) -> Path:
    """Writes atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(_clean(payload), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def plot_path(json_path: str | Path) -> Path:
    p = Path(json_path)
    return p.with_suffix(".png") if p.suffix else p.with_name(p.name + ".png")


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x)) else None


# The curves of a panel: (score key, its spread over seeds or None, line style, legend label).
CURVES = (
    ("score", "std", {"marker": "o"}, "model"),
    ("first_order_score", None, {"marker": ".", "linestyle": ":", "color": "tab:gray"}, "model, drawn order alone"),
    ("calibrated_score", "calibrated_std", {"marker": "s", "linestyle": ":"}, "calibrated"),
    ("support_calibrated_score", None, {"marker": "P", "linestyle": ":", "color": "tab:cyan"}, "calibrated by the support"),
    ("blind_score", "blind_std", {"marker": "x", "linestyle": "--", "color": "tab:red"}, "image-blind"),
    ("prototype_score", None, {"marker": "d", "linestyle": "-.", "color": "tab:purple"}, "vision-only prototype"),
    ("token_prototype_score", None, {"marker": "v", "linestyle": "-.", "color": "tab:brown"}, "visual-token prototype"),
    ("copy_score", None, {"marker": "*", "linestyle": ":", "color": "tab:olive"}, "query = copy of an example"),
    ("reference_score", None, {"marker": "^", "linestyle": "--", "color": "tab:green"}, "bare LM"),
)


def plot_results(payload: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    results = payload.get("results", [])
    metrics = list(dict.fromkeys(r["metric"] for r in results))
    n = max(1, len(metrics))
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rows = sorted((r for r in results if r["metric"] == metric), key=lambda r: r["shots"])
        xs = [r["shots"] for r in rows]

        def series(key, std_key=None):
            ys = [_num(r.get(key)) for r in rows]
            errs = [(_num(r.get(std_key)) or 0.0) if std_key else 0.0 for r in rows]
            pts = [(x, y, e) for x, y, e in zip(xs, ys, errs) if y is not None]
            return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]

        for key, std_key, style, label in CURVES:
            x, y, e = series(key, std_key)
            if x and std_key:
                ax.errorbar(x, y, yerr=e, capsize=4, label=label, **style)
            elif x:
                ax.plot(x, y, label=label, **style)
        for key, label in (("chance", "chance"), ("majority_baseline", "majority answer")):
            vals = [_num(r.get(key)) for r in rows if _num(r.get(key)) is not None]
            if vals:
                ax.axhline(sum(vals) / len(vals), color="grey", linestyle="-." if key == "chance" else ":", linewidth=1, label=label)
        ax.set_title(metric)
        ax.set_xlabel("shots")
        ax.set_ylabel(metric)
        if xs:
            ax.set_xticks(sorted(set(xs)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{payload.get('task', '')} — {payload.get('model', '')}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(json_path: str | Path, payload: dict) -> tuple[Path, Path]:
    """The JSON at `json_path` and the plot beside it (same name, .png)."""
    out = write_json(json_path, payload)
    png = plot_results(payload, plot_path(out))
    return out, png


# The controls shown beside a score in the summary table, in this order ("_score"/"_rate" dropped).
TABLE_CONTROLS = ("first_order_score", "blind_score", "calibrated_score", "support_calibrated_score", "normalized_score", "prototype_score", "token_prototype_score", "copy_score", "majority_baseline", "reference_score", "chance",
                  "named_rate", "blind_named_rate", "support_copy_rate", "support_shows_rate")


def _control_name(key: str) -> str:
    return key.removesuffix("_score").removesuffix("_rate")


def summary_table(folder: str | Path) -> str:
    """A markdown table of every report (*.json) in `folder`, one row per (report, shots, metric),
    the score with its standard error over queries where the report has one (`± stderr`):
    the table of the model card, written by `python -m engine.eval.report assets/model/eval`.
    A file that is not a JSON object is skipped with a warning (the folder may hold other output)."""
    lines = ["| task | shots | metric | score | n | controls |", "|---|---|---|---|---|---|"]
    for path in sorted(Path(folder).glob("*.json")):
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            print(f"warning: skipped {path}: not JSON ({e})", file=sys.stderr)
            continue
        for r in payload.get("results", []) if isinstance(payload, dict) else []:
            controls = ", ".join(f"{_control_name(k)} {r[k]:.3f}" for k in TABLE_CONTROLS if _num(r.get(k)) is not None)
            score = f"{r['score']:.3f}" + (f" ± {r['stderr']:.3f}" if _num(r.get("stderr")) is not None else "")
            lines.append(f"| {path.stem} | {r['shots']} | {r['metric']} | {score} | {r['n']} | {controls} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.eval.report",
                                     description="Print the markdown summary table of a folder of evaluation reports.")
    parser.add_argument("folder", nargs="?", default="assets/model/eval")
    print(summary_table(parser.parse_args().folder))
