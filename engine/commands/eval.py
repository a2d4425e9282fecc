"""python -m engine eval --model M --task TASK [--shots 0,4,8] [--data DIR] --out FILE.json

Evaluates a model on one task and writes the report: FILE.json
({"model", "task", "results": [{"shots", "metric", "score", "n", ...}]}) and FILE.png beside it.

Tasks: caption (CIDEr, BLEU-4), vqa (VQA accuracy, majority-answer baseline per question type),
classify (N-way naming of new concepts from the support examples; raw and calibrated accuracy),
recognize (N-way naming of new renders of training concepts), video_qa (multiple choice by
likelihood), dialogue (questions asked in turn, answers fed back), text (the 50-prompt text-only
check against the bare LM). Every score comes with an image-blind control (blind_score: the
same prompts with every image replaced by a blank grey one).

Examples:
  python -m engine eval --model default --task classify --shots 0,4,8 --out runs/eval/classify.json
  python -m engine eval --model default --task caption --shots 0,4,8,16,32 --seeds 3 --limit 200 --out runs/eval/caption.json
  python -m engine eval --model PATH --task vqa --selection rices --out runs/eval/vqa_rices.json
  python -m engine eval --model default --task classify --shots 8 --limit 200 --orders 6 --out runs/eval/classify_orders.json
  python -m engine eval --model default --task text --out runs/eval/text.json
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger(__name__)

TASK_CHOICES = ("caption", "vqa", "classify", "video_qa", "recognize", "dialogue", "text")


def parse_shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shots expects comma-separated integers such as 0,4,8, got {text!r}") from None
    if not shots:
        raise argparse.ArgumentTypeError("--shots is empty")
    if any(k < 0 for k in shots):
        raise argparse.ArgumentTypeError(f"shot counts must be >= 0, got {text!r}")
    return sorted(set(shots))


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {v}")
        return v
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="default (assets/model), tiny (random, for tests) or a saved model folder")
    p.add_argument("--task", required=True, choices=TASK_CHOICES)
    p.add_argument("--shots", type=parse_shots, default=None,
                   help="comma-separated shot counts, 0-32 (default 0,4,8; recognize and text: 0)")
    p.add_argument("--data", default="corpus",
                   help="a corpus folder with *.test.jsonl (default: corpus), a .jsonl split, a COCO captions JSON, or a VQAv2 folder")
    p.add_argument("--out", required=True, help="the report JSON; the plot goes beside it (same name, .png)")
    p.add_argument("--seeds", type=_positive("--seeds"), default=3, help="random support draws per shot count (mean and std reported)")
    p.add_argument("--selection", choices=("random", "rices"), default="random",
                   help="support examples: random (seeded) or RICES (most similar by vision embedding, most similar last)")
    p.add_argument("--limit", type=_positive("--limit"), default=None, help="evaluate this many queries (a fixed random subset)")
    p.add_argument("--way", type=_positive("--way"), default=5, help="classes per classification episode (classify, recognize)")
    p.add_argument("--num-frames", type=_positive("--num-frames"), default=None, help="frames sampled per video (default: the model's max)")
    p.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=None, help="generation length (default per task)")
    p.add_argument("--turns", type=_positive("--turns"), default=3, help="dialogue: questions per dialogue")
    p.add_argument("--history", choices=("own", "reference"), default="own",
                   help="dialogue: feed back the model's own answers (default) or the reference answers")
    p.add_argument("--orders", type=_positive("--orders"), default=1,
                   help="classify, recognize: rank by the mean over this many orders of each episode's support "
                        "(the drawn order first, then shuffles; random selection only)")
    p.add_argument("--zero-shot-texts", type=int, default=2,
                   help="caption: text-only examples (captions without their pictures) before a 0-shot query, "
                        "the Flamingo paper's zero-shot prompt (default 2; 0: the picture alone)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a model on a task; writes a JSON report and a plot",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def load_model(spec: str, device: str = "auto"):
    """(model on its device, a name for it)."""
    from ..device import resolve

    placement = resolve(device)
    if spec == "tiny":
        from ..testing import tiny_model

        model, name = tiny_model(), "tiny (random weights, for tests)"
    else:
        from ..chat import load_model as load

        model, name = load(spec, placement.dtype)
    model.to(device=placement.device, dtype=placement.dtype)
    return model.eval(), name


def run(args) -> int:
    from ..eval.datasets import load_task_data
    from ..eval.report import write_report
    from ..eval.tasks import EvalSettings, default_shots, run_task

    shots = args.shots or default_shots(args.task)
    settings = EvalSettings(shots=shots, seeds=args.seeds, selection=args.selection, limit=args.limit, way=args.way,
                            num_frames=args.num_frames, max_new_tokens=args.max_new_tokens, turns=args.turns,
                            history=args.history, orders=args.orders, zero_shot_texts=args.zero_shot_texts,
                            progress=not args.no_progress)
    settings.check()
    items = None if args.task == "text" else load_task_data(args.task, args.data)  # bad data fails before the model loads
    started = time.time()
    model, name = load_model(args.model, args.device)
    out = run_task(args.task, model, items, settings)
    payload = {
        "model": args.model,
        "task": args.task,
        "results": out["results"],
        "model_name": name,
        "data": None if args.task == "text" else str(args.data),
        "settings": {"shots": shots, "seeds": args.seeds, "selection": args.selection, "limit": args.limit, "way": args.way,
                     "num_frames": args.num_frames, "max_new_tokens": args.max_new_tokens, "turns": args.turns,
                     "history": args.history, "orders": args.orders, "zero_shot_texts": args.zero_shot_texts},
        "info": {**out.get("info", {}), "seconds": round(time.time() - started, 1)},
        "samples": out.get("samples", []),
    }
    json_path, png = write_report(args.out, payload)
    for r in out["results"]:
        extra = "".join(f" {k}={r[k]:.4f}" for k in ("blind_score", "calibrated_score", "support_calibrated_score", "normalized_score", "chance") if isinstance(r.get(k), float))
        print(f"{args.task} shots={r['shots']} {r['metric']}={r['score']:.4f}{extra} (n={r['n']})", file=sys.stderr)
    print(f"wrote {json_path} and {png}", file=sys.stderr)
    return 0
