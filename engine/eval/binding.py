"""Do the visual tokens say *which* thing is where? A diagnostic on the two-object position scenes
of `vqa.test.jsonl` ("Is the cat on the left or on the right?": a cat and one other concept, side
by side or one above the other):

    python -m engine.eval.binding --model assets/model

- tower_readout: with no training at all, which of the scene's two concepts lies on the first side
  (left, or top) is read from the frozen tower's feature grid: each concept's prototype (its mean
  tower feature over up to `--renders` of its training pictures in `pairs.train.jsonl`) is
  compared with every cell, and the concept whose similarity sits further towards the first side
  is said to be there. Chance 0.5. High means the tower binds what to where.
- swap: the scene's feature grid mirrored along the axis the two things lie on, so that they trade
  places while each stays what it is. `tower` and `tokens` are how far the grid and the visual
  tokens move under that swap, divided by how far they move when the scene is replaced by the
  next scene (mean relative distances). A ratio near 0 means the representation does not change
  when the two things swap places: the LM reading it cannot tell which is on the left.
- token_readout: whether the visual tokens say it. For each concept, the scene's tokens are
  weighted by how much each looks like the concept's own tokens (those of its pictures), as a
  query for it would gather them, and a linear readout fitted on the scenes of `--fit` (the
  training file's position scenes) says whether it is on the first side. Chance 0.5.

`python -m engine.eval.where` asks whether the LM says where things are. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import templates as T
from ..token_probe import gather_like
from .datasets import read_jsonl
from .probe import softmax_probe
from .scoring import MediaBank


def position_scenes(items: list[dict]) -> list[dict]:
    """The position questions' scenes: {media, first, second, axis}, `first` being the concept on
    the left (axis x) or at the top (axis y), as the corpus records list them."""
    out = []
    for it in items:
        axis = T.position_axis(it.get("question", ""), it.get("answers", []))
        concepts = it.get("concepts") or []
        if it.get("qtype") == "position" and axis and len(concepts) == 2 and it.get("media"):
            out.append({"media": it["media"][0], "first": concepts[0], "second": concepts[1], "axis": axis})
    return out


def square_grid(features: torch.Tensor) -> torch.Tensor:
    """(..., S, d) features of a square feature map -> (..., side, side, d), rows top to bottom."""
    side = math.isqrt(features.shape[-2])
    if side * side != features.shape[-2]:
        raise ValueError(f"the tower's {features.shape[-2]} positions are not a square grid")
    return features.unflatten(-2, (side, side))


def first_side_score(grid: torch.Tensor, proto_a: torch.Tensor, proto_b: torch.Tensor, axis: str) -> float:
    """How far concept a's likeness, relative to b's, lies towards the first side (left or top) of
    a (side, side, d) grid: > 0 when a is nearer the first side. Prototypes are (d,) vectors in
    the grid's space, already centred like the grid."""
    diff = F.cosine_similarity(grid, proto_a, dim=-1) - F.cosine_similarity(grid, proto_b, dim=-1)
    profile = diff.mean(0) if axis == "x" else diff.mean(1)  # per column, or per row
    centred = torch.arange(len(profile), dtype=profile.dtype) - (len(profile) - 1) / 2
    return float(-(profile * centred).sum())


def tower_readout(grids: torch.Tensor, scenes: list[dict], prototypes: dict[str, torch.Tensor]) -> float:
    """Share of scenes whose first concept the parameter-free readout puts on the first side.
    grids: (N, side, side, d) tower features of the scenes."""
    centre = grids.flatten(0, 2).mean(0)
    right = sum(first_side_score(g - centre, prototypes[s["first"]] - centre, prototypes[s["second"]] - centre,
                                 s["axis"]) > 0 for g, s in zip(grids, scenes))
    return right / len(scenes)


def swapped(grids: torch.Tensor, scenes: list[dict]) -> torch.Tensor:
    """(N, side, side, d) grids mirrored along each scene's axis: its two things trade places."""
    return torch.stack([g.flip(1 if s["axis"] == "x" else 0) for g, s in zip(grids, scenes)])


def relative_move(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of |a - b| / |a|, each row flattened."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    return float(((a - b).norm(dim=1) / a.norm(dim=1).clamp(min=1e-6)).mean())


def swap_ratio(x: torch.Tensor, x_swapped: torch.Tensor) -> float:
    """How far a representation moves when each scene's two things swap places, over how far it
    moves to the next scene's. x, x_swapped: (N, ...) with N >= 2."""
    return relative_move(x, x_swapped) / relative_move(x, x.roll(1, dims=0))


@torch.no_grad()
def tower_grids(model, paths: list[str], desc: str, progress: bool = True) -> torch.Tensor:
    """(P, S, d) frozen tower features of pictures (their first frame), one tower pass per file."""
    bank = MediaBank(model)
    out: list[torch.Tensor | None] = [None] * len(paths)
    bar = tqdm(total=len(paths), desc=desc, unit="picture", disable=not progress)
    for idx, pixels in bank.pixel_batches(paths):
        features = model.vision(pixels.to(device=bank.device, dtype=bank.dtype))  # (b, T, S, d)
        for j, f in zip(idx, features[:, 0].float().cpu()):
            out[j] = f
        bar.update(len(idx))
    bar.close()
    return torch.stack(out)


def concept_pictures(pairs: list[dict], concepts: set[str], renders: int) -> dict[str, list[str]]:
    """Up to `renders` picture paths of each wanted concept, from records with a `concept_id`."""
    out: dict[str, list[str]] = defaultdict(list)
    for it in pairs:
        c = it.get("concept_id")
        if c in concepts and len(out[c]) < renders and it.get("media"):
            out[c].append(it["media"][0])
    return out


def token_readout(fit_tokens: torch.Tensor, fit_scenes: list[dict], test_tokens: torch.Tensor,
                  test_scenes: list[dict], own_tokens: dict[str, torch.Tensor]) -> float:
    """Share of the test scenes' concepts a linear readout, fitted on the fit scenes, puts on the
    right side (first or second) from what `gather_like` gathers for them (the scene's tokens
    weighted by their likeness to the concept's own). Chance 0.5: a concept is
    as often first as second, so the readout must find the side in the tokens that look like it."""
    rows, first = [], []
    for tokens, scenes in ((fit_tokens, fit_scenes), (test_tokens, test_scenes)):
        for t, s in zip(tokens, scenes):
            for concept, is_first in ((s["first"], 1), (s["second"], 0)):
                rows.append(gather_like(t[None], own_tokens[concept][None])[0])
                first.append(is_first)
    with torch.enable_grad():
        return softmax_probe(torch.stack(rows), torch.tensor(first), 2 * len(fit_scenes))


@torch.no_grad()  # not inference_mode: token_readout fits a probe on these tensors
def run_binding(model, items: list[dict], pairs: list[dict], renders: int = 8, fit_items: list[dict] = (),
                progress: bool = True) -> dict:
    """The readouts and swap ratios on `items`' position scenes; with `fit_items` (other position
    scenes, e.g. the training file's) also the visual tokens' readout fitted on those."""
    scenes, fit = position_scenes(items), position_scenes(fit_items)
    pictures = concept_pictures(pairs, {c for s in scenes + fit for c in (s["first"], s["second"])}, renders)
    scenes, fit = ([s for s in x if pictures.get(s["first"]) and pictures.get(s["second"])] for x in (scenes, fit))
    if len(scenes) < 2:
        raise ValueError("need at least two position scenes whose concepts have pictures in the pairs file")
    flat = [p for ps in pictures.values() for p in ps]
    feats = square_grid(tower_grids(model, flat, "concept pictures", progress))  # (P, side, side, d)
    concept_grids, at = {}, 0
    for c, ps in pictures.items():
        concept_grids[c], at = feats[at:at + len(ps)], at + len(ps)
    prototypes = {c: g.mean(dim=(0, 1, 2)) for c, g in concept_grids.items()}
    grids = square_grid(tower_grids(model, [s["media"] for s in scenes], "scenes", progress))

    def tokens(g: torch.Tensor) -> torch.Tensor:  # (N, side, side, d) -> (N, R, dim)
        x = g.flatten(1, 2)[:, None, None].to(model.resampler.latents.dtype)  # (N, M=1, T=1, S, d)
        return torch.cat([model.resample(x[i:i + 64])[:, 0] for i in range(0, len(x), 64)]).float()

    scene_tokens, turned = tokens(grids), swapped(grids, scenes)
    out = {"scenes": len(scenes), "tower_readout": round(tower_readout(grids, scenes, prototypes), 4), "chance": 0.5,
           "swap": {"tower": round(swap_ratio(grids, turned), 4), "tokens": round(swap_ratio(scene_tokens, tokens(turned)), 4)}}
    if fit:
        fit_tokens = tokens(square_grid(tower_grids(model, [s["media"] for s in fit], "fit scenes", progress)))
        own = {c: tokens(g).mean(0) for c, g in concept_grids.items()}  # (R, dim) each
        out["token_readout"] = round(token_readout(fit_tokens, fit, scene_tokens, scenes, own), 4)
        out["fit_scenes"] = len(fit)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.eval.binding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/model", help="a saved model folder (default assets/model)")
    p.add_argument("--vqa", default="corpus/vqa.test.jsonl", help="scene questions with qtype and concepts")
    p.add_argument("--pairs", default="corpus/pairs.train.jsonl", help="pictures with concept_id (the prototypes)")
    p.add_argument("--fit", default="corpus/vqa.position.train.jsonl",
                   help="position scenes the tokens' readout is fitted on ('' to skip it)")
    p.add_argument("--renders", type=int, default=8, help="pictures per concept prototype (default 8)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from ..model import FlamingoModel
    from ..stdio import stdout_to_stderr

    try:
        items, pairs = read_jsonl(args.vqa), read_jsonl(args.pairs)
        fit_items = read_jsonl(args.fit) if args.fit else []
        with stdout_to_stderr():  # stdout holds the JSON result alone
            model = FlamingoModel.from_pretrained(args.model).eval()
        result = run_binding(model, items, pairs, args.renders, fit_items, progress=not args.no_progress)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"model": args.model, "vqa": args.vqa, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
