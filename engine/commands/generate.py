"""python -m engine generate: one reply about some pictures or videos, printed on stdout.

    python -m engine generate --model default --media cat.jpg --prompt "What is this?"
    python -m engine generate --media a.png --media b.png --prompt "Compare <image> and <image>."

The prompt may hold `<image>` markers, one per --media in order; without any, all media go before
the prompt. A video counts as one media item (sampled into --num-frames frames). The reply is
streamed to stdout as it is generated; logs and errors go to stderr (exit 2 for a user's mistake).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..stdio import stdout_to_stderr

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="reply to a prompt about images/videos",
        description="Print the model's reply to a prompt about images or videos. The prompt may hold "
                    "<image> markers, one per --media in order; with none, all media go before the prompt.",
    )
    p.add_argument("--model", default="default", help="default (assets/model), tiny, a saved model folder or a Hugging Face id")
    p.add_argument("--media", action="append", default=[], metavar="PATH", help="an image or video file; repeat for several")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--max-new-tokens", type=_positive, default=64, metavar="N", help="longest reply in tokens (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA with bf16 when available), cpu or cuda")
    p.add_argument("--num-frames", type=_positive, default=8, metavar="T", help="frames sampled per video (default 8)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--no-repeat-ngram-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=None)
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from ..media import MediaError

    try:
        conversation, settings = _request(args)
        from ..chat import ChatEngine

        with stdout_to_stderr():  # libraries that print while loading (even from C/Rust) stay off stdout
            engine = ChatEngine.load(args.model, args.device)
        log.info("model: %s", engine.describe())
        stream = engine.stream(conversation, settings)
        _print_stream(stream)
    except (MediaError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("finished: %s, %d tokens", stream.finish_reason, len(stream.tokens))
    return 0


def _request(args):
    from ..conversation import Conversation, GenerationSettings, Turn
    from ..generation import check_settings
    from ..prompt import place_media

    for path in args.media:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"media file {path!r} does not exist" if not p.exists() else f"media path {path!r} is not a file")
    text = place_media(args.prompt, len(args.media), strict=True)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        num_frames=args.num_frames, seed=args.seed,
    )
    check_settings(settings)
    return Conversation(turns=[Turn("user", text, list(args.media))]), settings


def _print_stream(stream) -> None:
    """Writes the reply as it comes, without leading or trailing blanks, then a newline."""
    out, started, pending = sys.stdout, False, ""
    for delta in stream:
        if not started:
            delta = delta.lstrip()
            started = bool(delta)
        pending += delta
        keep = pending.rstrip()
        if keep:
            out.write(keep)
            out.flush()
            pending = pending[len(keep):]
    out.write("\n")
    out.flush()
