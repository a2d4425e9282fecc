"""python -m engine build-data: build the offline training / evaluation corpus."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_CLIPART_DIR = "/usr/share/openclipart/png"
DEFAULT_EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"

log = logging.getLogger("engine.data.corpus")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def _path_or_none(text: str) -> str | None:
    return None if text.lower() == "none" else text


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "build-data", help="build the offline training/evaluation corpus",
        description="Build the offline corpus from Debian's openclipart-png and "
                    "fonts-noto-color-emoji: image-text pairs, interleaved few-shot documents, "
                    "captioned videos and VQA scenes for training, plus held-out evaluation "
                    "files (classify, captions, vqa, video_qa, recognize) and manifest.json. "
                    "Deterministic given --seed.")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder (created; an existing corpus there is replaced)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", choices=("small", "full"), default="small",
                   help="preset record counts: small = a few hundred records (minutes), "
                        "full = ~30k pairs, 6k place-labelled pictures, 8k documents, 4k naming episodes, 3k videos, 8k VQA (~10 minutes); default small")
    counts = p.add_argument_group("explicit counts (override --size)")
    for name, what in (("pairs", "image-text pairs"), ("places", "pictures labelled with where the object is"),
                       ("interleaved", "interleaved documents"),
                       ("naming", "few-shot naming episodes (3-9 pictures)"),
                       ("videos", "captioned videos"), ("vqa", "VQA training scenes"),
                       ("vqa-test", "VQA test questions"), ("video-qa", "video test questions"),
                       ("recognize", "recognition test images"),
                       ("places-test", "place-labelled test images"),
                       ("classify-renders", "test renders per held-out concept (classify)"),
                       ("caption-renders", "test renders per held-out concept (captions)")):
        counts.add_argument(f"--{name}", type=_positive, default=None, metavar="N", help=what)
    p.add_argument("--clipart-dir", type=_path_or_none, default=DEFAULT_CLIPART_DIR,
                   metavar="DIR", help="Open Clip Art PNG folder (apt-get install "
                                       "openclipart-png), or 'none'; default %(default)s")
    p.add_argument("--emoji-font", type=_path_or_none, default=DEFAULT_EMOJI_FONT,
                   metavar="PATH", help="NotoColorEmoji.ttf (apt-get install "
                                        "fonts-noto-color-emoji), or 'none'; default %(default)s")
    p.add_argument("--max-concepts", type=_positive, default=700, metavar="N",
                   help="keep at most N concepts (labels); default 700")
    p.add_argument("--heldout-fraction", type=float, default=0.15, metavar="F",
                   help="fraction of concepts held out for evaluation, by concept; default 0.15")
    p.add_argument("--workers", type=_positive, default=None, metavar="N",
                   help="worker processes (default: min(2, CPUs))")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are only drawn on a terminal anyway)")
    p.add_argument("--force", action="store_true",
                   help="allow writing into a non-empty folder that holds no corpus")
    return p


def run(args: argparse.Namespace) -> int:
    from engine.data.corpus import BuildConfig, CorpusError, build_corpus, sizes_for

    if not 0.0 < args.heldout_fraction < 1.0:
        print(f"error: --heldout-fraction must be between 0 and 1, got {args.heldout_fraction}",
              file=sys.stderr)
        return 2
    sizes = sizes_for(args.size, pairs=args.pairs, places=args.places, interleaved=args.interleaved, naming=args.naming,
                      videos=args.videos, vqa=args.vqa, vqa_test=args.vqa_test,
                      video_qa=args.video_qa, recognize=args.recognize, places_test=args.places_test,
                      classify_renders=args.classify_renders,
                      caption_renders=args.caption_renders)
    cfg = BuildConfig(out=args.out, seed=args.seed, sizes=sizes, clipart_dir=args.clipart_dir,
                      emoji_font=args.emoji_font, max_concepts=args.max_concepts or 700,
                      heldout_fraction=args.heldout_fraction,
                      progress=not args.no_progress and sys.stderr.isatty(),
                      force=args.force)
    if args.workers:
        cfg.workers = args.workers
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        manifest = build_corpus(cfg)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(manifest["counts"].values())
    print(f"built {total} records ({manifest['n_concepts']} concepts) in {args.out} "
          f"in {manifest['build_seconds']:.0f} s")
    return 0
