"""python -m engine train --config FILE.yaml [--resume [CKPT] | --no-resume] [--set key=value ...] [--export DIR]

--export DIR writes the model of the latest checkpoint (or --resume CKPT) to DIR and stops, so a
run can be evaluated while it is still training.

Works the same under `accelerate launch` and `torchrun` (see engine/train.py)."""
from __future__ import annotations

import argparse
import json
import sys

import yaml


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a Flamingo model (or a vision tower, mode: contrastive; or the resampler on records' labels, mode: token_probe) from a YAML config",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the training YAML (see configs/)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", nargs="?", const="latest", default="latest",
                   help="a checkpoint dir to resume from (default: the run dir's latest checkpoint, if any)")
    g.add_argument("--no-resume", action="store_true", help="start over even if the run dir has checkpoints")
    p.add_argument("--precompute-only", action="store_true",
                   help="compute the frozen vision features of every media file into the cache, then stop")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="write the model of the latest checkpoint (or --resume CKPT) to DIR, loadable with --model DIR, and stop")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set run.max_steps=10 (the value is read as YAML)")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def run(args) -> int:
    from ..train import train
    from ..train_config import load_train_config

    cfg = load_train_config(args.config, parse_overrides(args.set))
    resume: str | bool = False if args.no_resume else (True if args.resume == "latest" else args.resume)
    if args.export:
        from ..train import export_checkpoint

        step = export_checkpoint(cfg, args.export, resume)
        print(f"exported step {step} to {args.export}", file=sys.stderr)
        return 0
    last = train(cfg, resume=resume, precompute_only=args.precompute_only)
    if last:
        print(json.dumps({k: v for k, v in last.items() if k.startswith("loss") or k in ("step", "lr")}), file=sys.stderr)
    return 0
