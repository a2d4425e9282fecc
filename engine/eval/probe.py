"""Linear probes: is a property of the pictures (e.g. the background colour) readable from the
frozen tower's features, and still readable from the visual tokens the LM sees?

    python -m engine.eval.probe --model assets/model --data corpus/recognize.test.jsonl --field background

Each item's first media file gives two vectors: the tower's features mean-pooled over positions
(as RICES uses them) and the resampler's visual tokens mean-pooled over latents. A softmax
regression is fitted on the first `--train` items and scored on the rest. Prints JSON. When the
tower's accuracy is high and the tokens' is at the majority rate, the resampler drops the
property before the LM can read it.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .datasets import read_jsonl
from .scoring import MediaBank


def softmax_probe(x: torch.Tensor, y: torch.Tensor, n_train: int, steps: int = 300,
                  weight_decay: float = 1e-3, lr: float = 1e-2) -> float:
    """(N, D) features, (N,) class ids -> held-out accuracy of a softmax regression fitted on the
    first n_train rows (features standardised with the training rows' statistics)."""
    if not 0 < n_train < len(x):
        raise ValueError(f"n_train must be in (0, {len(x)}), got {n_train}")
    x = x.float()
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    n_classes = int(y.max()) + 1
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + weight_decay * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((x[n_train:] @ w + b).argmax(1) == y[n_train:]).float().mean())


@torch.inference_mode()
def probe_features(model, paths: list[str], progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Media files -> ((P, d_vision) tower features mean-pooled over frames and positions, as
    RICES pools them; (P, d) visual tokens mean-pooled over latents), one tower pass per file."""
    bank = MediaBank(model)
    tower: list[torch.Tensor | None] = [None] * len(paths)
    tokens: list[torch.Tensor | None] = [None] * len(paths)
    bar = tqdm(total=len(paths), desc="probe features", unit="item", disable=not progress)
    for idx, pixels in bank.pixel_batches(paths):
        features = model.vision(pixels.to(device=bank.device, dtype=bank.dtype))  # (b, T, S, d_v)
        visual = model.resample(features[:, None])[:, 0]                           # (b, R, d)
        for j, f, v in zip(idx, features.float().mean(dim=(1, 2)).cpu(), visual.float().mean(1).cpu()):
            tower[j], tokens[j] = f, v
        bar.update(len(idx))
    bar.close()
    return torch.stack(tower), torch.stack(tokens)


def run_probe(model, items: list[dict], field: str, n_train: int, progress: bool = True) -> dict:
    items = [it for it in items if it.get(field) is not None]
    if len(items) <= n_train:
        raise ValueError(f"{len(items)} items have {field!r}; more than --train {n_train} are needed")
    labels = [str(it[field]) for it in items]
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    tower, tokens = probe_features(model, [it["media"][0] for it in items], progress)
    held_out = Counter(labels[n_train:])
    return {
        "field": field, "classes": len(classes), "train": n_train, "test": len(items) - n_train,
        "tower_features": round(softmax_probe(tower, y, n_train), 4),
        "visual_tokens": round(softmax_probe(tokens, y, n_train), 4),
        "majority": round(max(held_out.values()) / (len(items) - n_train), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.eval.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/model", help="a saved model folder (default assets/model)")
    p.add_argument("--data", default="corpus/recognize.test.jsonl", help="a corpus JSONL file whose items have --field")
    p.add_argument("--field", default="background", help="the item property to read (default background)")
    p.add_argument("--limit", type=int, default=1500, help="items to use (default 1500)")
    p.add_argument("--train", type=int, default=1000, help="items the probe is fitted on (default 1000)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from ..model import FlamingoModel
    from ..stdio import stdout_to_stderr

    try:
        items = read_jsonl(args.data)[: args.limit]
        with stdout_to_stderr():  # stdout holds the JSON result alone
            model = FlamingoModel.from_pretrained(args.model).eval()
        result = run_probe(model, items, args.field, args.train, progress=not args.no_progress)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"model": args.model, "data": args.data, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
