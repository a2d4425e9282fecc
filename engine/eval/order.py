"""Does the model see frame order? Compares the visual tokens of each clip with those of the same
clip played backwards.

    python -m engine.eval.order --model assets/model --data corpus/video_qa.test.jsonl --limit 20

Reversal turns every motion of the corpus into its opposite, so a model that can tell which way
things move must give a clip and its reversal different visual tokens. Prints JSON: the mean
cosine similarity of a clip's flattened visual tokens with its reversal's (`reversed`) and, for
scale, with the next clip's (`other_clip`). The resampler without time embeddings is blind to
order (its latents attend to a set of frame tokens), and `reversed` is then 1.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from .datasets import read_jsonl
from .scoring import MediaBank


@torch.inference_mode()
def order_similarity(model, paths: list[str]) -> dict:
    """Video files (at least 2) -> {"reversed": mean cosine(tokens(clip), tokens(clip reversed)),
    "other_clip": mean cosine(tokens(clip i), tokens(clip i + 1)), "n": number of clips}."""
    if len(paths) < 2:
        raise ValueError(f"order_similarity needs at least 2 clips, got {len(paths)}")
    bank = MediaBank(model)
    forward: list[torch.Tensor | None] = [None] * len(paths)
    backward: list[torch.Tensor | None] = [None] * len(paths)
    for idx, pixels in bank.pixel_batches(paths):
        if pixels.shape[1] < 2:
            raise ValueError(f"{paths[idx[0]]} has one frame: a still picture has no order")
        features = model.vision(pixels.to(device=bank.device, dtype=bank.dtype))  # (b, T, S, d_v)
        tokens = model.resample(features[:, None])[:, 0].flatten(1).float().cpu()  # (b, R*d)
        reversed_ = model.resample(features.flip(1)[:, None])[:, 0].flatten(1).float().cpu()
        for j, t, r in zip(idx, tokens, reversed_):
            forward[j], backward[j] = t, r
    fwd, bwd = torch.stack(forward), torch.stack(backward)
    return {"reversed": float(F.cosine_similarity(fwd, bwd, dim=1).mean()),
            "other_clip": float(F.cosine_similarity(fwd[:-1], fwd[1:], dim=1).mean()), "n": len(paths)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.eval.order", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/model", help="a saved model folder (default assets/model)")
    p.add_argument("--data", default="corpus/video_qa.test.jsonl", help="a corpus JSONL file of videos")
    p.add_argument("--limit", type=int, default=20, help="clips to use (default 20)")
    args = p.parse_args(argv)
    from ..model import FlamingoModel
    from ..stdio import stdout_to_stderr

    try:
        paths = [it["media"][0] for it in read_jsonl(args.data)[: args.limit]]
        with stdout_to_stderr():  # stdout holds the JSON result alone
            model = FlamingoModel.from_pretrained(args.model).eval()
        result = order_similarity(model, paths)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    print(json.dumps({"model": args.model, "data": args.data, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
