"""One corpus record at a time: given the shared build context and a record's index, draw its
media, write them under ``media/``, and return its JSON object.

A record is a pure function of (seed, kind, index), so records can be drawn by any worker in any
order and the corpus is still the same.  Kinds and the files they go to:

========== ========================== =====================================================
kind       file                       what
========== ========================== =====================================================
pairs      pairs.train.jsonl          one object, one caption
places     places.train.jsonl         one smaller object in one of 9 places, labelled with it
interleaved interleaved.train.jsonl   2-5 images: naming (often made-up names), captions, VQA
naming     naming.train.jsonl         few-shot naming episodes: 2-5 concepts, 3-9 images
videos     videos.train.jsonl         one object moving / growing / appearing, captioned
vqa        vqa.train.jsonl            scenes of 1-5 objects or shapes with a question
classify   classify.test.jsonl        renders of held-out concepts, with their label
captions   captions.test.jsonl        held-out renders with reference captions
vqa_test   vqa.test.jsonl             new scenes; qtype count / colour / position
video_qa   video_qa.test.jsonl        new videos; which way does it move?
recognize  recognize.test.jsonl       new renders of training concepts (with reference captions)
places_test places.test.jsonl         new place-labelled renders (any concept)
========== ========================== =====================================================
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from . import render as R
from . import templates as T
from .names import is_plural, nonce_words, with_article

FILES = {
    "pairs": "pairs.train.jsonl",
    "places": "places.train.jsonl",
    "interleaved": "interleaved.train.jsonl",
    "naming": "naming.train.jsonl",
    "videos": "videos.train.jsonl",
    "vqa": "vqa.train.jsonl",
    "classify": "classify.test.jsonl",
    "captions": "captions.test.jsonl",
    "vqa_test": "vqa.test.jsonl",
    "video_qa": "video_qa.test.jsonl",
    "recognize": "recognize.test.jsonl",
    "places_test": "places.test.jsonl",
}
TRAIN_KINDS = ("pairs", "places", "interleaved", "naming", "videos", "vqa")
TEST_KINDS = ("classify", "captions", "vqa_test", "video_qa", "recognize", "places_test")
NONCE_DOC_FRACTION = 0.6  # naming documents whose names are all made up
MIXED_DOC_FRACTION = 0.1  # ... some made up, some real (the rest: all real)
# Documents (with real names) whose last picture shows a concept the document has not shown. If
# the last picture always repeated an earlier concept, copying a name from the context would
# always be right in training, and a model so trained names a support example's concept
# instead of the pictured one (70% of 4-shot captions did, before these documents existed).
NEW_LAST_FRACTION = 0.35
VIDEO_FPS = 8.0


@dataclass
class Context:
    """What every worker needs to draw any record."""
    out_dir: Path
    cutout_dir: Path
    seed: int
    labels: dict[str, str]            # concept id -> label
    sources: dict[str, list[str]]     # concept id -> cut-out keys
    train_ids: list[str]
    heldout_ids: list[str]
    classify_renders: int = 10
    caption_renders: int = 3

    @property
    def all_ids(self) -> list[str]:
        return sorted(self.train_ids + self.heldout_ids)


# ------------------------------------------------------------------------------------------
# helpers


def rng_for(seed: int, *parts) -> random.Random:
    h = hashlib.sha256(":".join(map(str, (seed,) + parts)).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


@functools.lru_cache(maxsize=64)
def _permutation(seed: int, kind: str, epoch: int, pool: tuple[str, ...]) -> tuple[str, ...]:
    p = list(pool)
    rng_for(seed, "perm", kind, epoch).shuffle(p)
    return tuple(p)


def balanced(ctx: Context, kind: str, i: int, pool: list[str]) -> str:
    """The i-th concept of a stream that visits every concept of ``pool`` once per epoch."""
    n = len(pool)
    return _permutation(ctx.seed, kind, i // n, tuple(pool))[i % n]


@functools.lru_cache(maxsize=3000)
def _load_cutout(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGBA")


def cutout(ctx: Context, rng: random.Random, cid: str, avoid: str | None = None
           ) -> tuple[Image.Image, str]:
    """A random cut-out of concept ``cid`` (a different one from ``avoid`` when it can)."""
    keys = ctx.sources[cid]
    choices = [k for k in keys if k != avoid] or keys
    key = rng.choice(choices)
    return _load_cutout(str(ctx.cutout_dir / f"{key}.png")), key


def other(rng: random.Random, pool: list[str], *exclude: str) -> str:
    rest = [c for c in pool if c not in exclude]
    return rng.choice(rest or pool)


class Media:
    """Names and writes the media files of one record."""

    def __init__(self, ctx: Context, kind: str, i: int):
        self.ctx, self.kind, self.i, self.paths = ctx, kind, i, []

    def _rel(self, ext: str) -> str:
        return f"media/{self.kind}/{self.i // 1000:03d}/{self.i:06d}_{len(self.paths)}.{ext}"

    def image(self, im: Image.Image) -> str:
        rel = self._rel("png")
        R.write_png(im, self.ctx.out_dir / rel)
        self.paths.append(rel)
        return rel

    def video(self, frames: list[Image.Image]) -> str:
        rel = self._rel("mp4")
        R.write_mp4(frames, self.ctx.out_dir / rel, VIDEO_FPS)
        self.paths.append(rel)
        return rel


# ------------------------------------------------------------------------------------------
# scenes with a question


def vqa_scene(ctx: Context, rng: random.Random, pool: list[str], qtype: str,
              main: str | None = None) -> dict:
    """Draw a scene and ask about it.  Returns image, question, answers, qtype, concepts."""
    main = main or rng.choice(pool)
    if qtype == "count":
        for _ in range(20):  # "How many grapes" is ambiguous: count single things
            if not is_plural(ctx.labels[main]):
                break
            main = rng.choice(pool)
        k = rng.randint(1, 4)
        d = rng.choice([0, 0, 1, 2]) if k <= 3 else 0
        distractor = other(rng, pool, main)
        cids = [main] * k + [distractor] * d
        places = R.scatter(rng, len(cids), 0.2, 0.32 if len(cids) > 2 else 0.4)
        cuts = [cutout(ctx, rng, c)[0] for c in cids]
        colour = R.pick_background(rng, cuts)
        img = R.render_scene(rng, list(zip(cuts, places)), colour)
        return dict(image=img, question=T.how_many(ctx.labels[main]), answers=T.count_answers(k),
                    qtype="count", concepts=sorted(set(cids)))
    if qtype == "colour":
        cids = [main] if rng.random() < 0.6 else [main, other(rng, pool, main)]
        cuts = [cutout(ctx, rng, c)[0] for c in cids]
        colour = R.pick_background(rng, cuts)
        if len(cids) == 1:
            bg, _, _ = R.render_object(rng, cuts[0], colour)
        else:
            bg = R.render_scene(rng, list(zip(cuts, R.scatter(rng, 2, 0.3, 0.42))), colour)
        return dict(image=bg, question=T.BACKGROUND_QUESTION, answers=[colour],
                    qtype="colour", concepts=cids)
    if qtype == "shape_colour":
        bg_colour = rng.choice(["white", "gray", "white", "yellow", "pink"])
        n = rng.randint(1, 3)
        shapes = rng.sample(R.SHAPES, n)
        colours = rng.sample([c for c in R.COLOURS if c != bg_colour and c != "white"], n)
        img = R.canvas(rng, bg_colour)
        draw = ImageDraw.Draw(img)
        for shape, colour, p in zip(shapes, colours, R.scatter(rng, n, 0.22, 0.36)):
            R.draw_shape(draw, shape, p, R.jitter_colour(rng, R.COLOURS[colour], 8))
        j = rng.randrange(n)
        return dict(image=img, question=f"What colour is the {shapes[j]}?", answers=[colours[j]],
                    qtype="colour", concepts=[])
    if qtype == "position":
        b = other(rng, pool, main)
        axis = rng.choice("xy")
        first, second = (main, b) if rng.random() < 0.5 else (b, main)
        pa, pb = R.side_by_side(rng, axis)
        cuts = [cutout(ctx, rng, first)[0], cutout(ctx, rng, second)[0]]
        colour = R.pick_background(rng, cuts)
        img = R.render_scene(rng, [(cuts[0], pa), (cuts[1], pb)], colour)
        sides = T.SIDES[axis]
        side_of = {first: sides[0], second: sides[1]}
        style = rng.random()
        if style < 0.45:
            q, answers = T.where_qa(ctx.labels[main], side_of[main])
        elif style < 0.75:
            q, answers = T.which_side_qa(ctx.labels[main], side_of[main], axis)
        else:
            side = rng.choice(sides)
            who = first if side == sides[0] else second
            q, answers = T.what_is_at_qa(side, axis, ctx.labels[who])
        return dict(image=img, question=q, answers=answers, qtype="position",
                    concepts=[first, second])
    if qtype == "what":
        cut, _ = cutout(ctx, rng, main)
        img, _, _ = R.render_object(rng, cut)
        q = rng.choice(["What is this?", "What is in the picture?", "What is shown here?"])
        return dict(image=img, question=q, answers=[ctx.labels[main]], qtype="what",
                    concepts=[main])
    if qtype == "exists":
        present = rng.random() < 0.5
        asked = main if present else other(rng, pool, main)
        shown = [main] if present else [other(rng, pool, main, asked)]
        if rng.random() < 0.5:
            shown.append(other(rng, pool, *shown, asked))
        cuts = [cutout(ctx, rng, c)[0] for c in shown]
        colour = R.pick_background(rng, cuts)
        img = R.render_scene(rng, list(zip(cuts, R.scatter(rng, len(cuts), 0.28, 0.42))), colour)
        return dict(image=img, question=f"Is there {with_article(ctx.labels[asked])} in the "
                    f"picture?", answers=["yes" if present else "no"], qtype="exists",
                    concepts=shown)
    raise ValueError(f"unknown question type {qtype!r}")


TRAIN_QTYPES = [("count", 0.3), ("colour", 0.15), ("shape_colour", 0.1), ("position", 0.25),
                ("what", 0.12), ("exists", 0.08)]
TEST_QTYPES = [("count", 0.4), ("colour", 0.25), ("shape_colour", 0.1), ("position", 0.25)]


def _weighted(rng: random.Random, table: list[tuple[str, float]]) -> str:
    names, weights = zip(*table)
    return rng.choices(names, weights)[0]


# ------------------------------------------------------------------------------------------
# train records


def make_pairs(ctx: Context, i: int) -> dict:
    rng = rng_for(ctx.seed, "pairs", i)
    cid = balanced(ctx, "pairs", i, ctx.train_ids)
    cut, _ = cutout(ctx, rng, cid)
    img, colour, _ = R.render_object(rng, cut)
    m = Media(ctx, "pairs", i)
    m.image(img)
    cap = T.caption(rng, ctx.labels[cid], colour)
    return {"media": m.paths, "text": T.chunk(cap), "concept_id": cid, "label": ctx.labels[cid],
            "background": colour}


def _placed_record(ctx: Context, rng: random.Random, kind: str, i: int, cid: str) -> dict:
    """One smaller object near the centre of one cell of a 3 x 3 grid, labelled with the cell
    ("top left" ... "bottom right"): labels for teaching the visual tokens where a thing is, which
    the tower's cells (what is in each, not where) leave to the resampler's spatial embeddings."""
    cut, _ = cutout(ctx, rng, cid)
    column, row = rng.randrange(3), rng.randrange(3)
    # cell centres at 0.2 / 0.5 / 0.8 of the side: clearly apart, the object (at most 0.36) inside
    x, y = ((0.2 + 0.3 * k + rng.uniform(-0.03, 0.03)) * R.SIZE for k in (column, row))
    p = R.Placement(x, y, rng.uniform(0.26, 0.36) * R.SIZE, rng.uniform(-10, 10), rng.random() < 0.5)
    colour = R.pick_background(rng, [cut])
    m = Media(ctx, kind, i)
    m.image(R.render_scene(rng, [(cut, p)], colour))
    return {"media": m.paths, "text": T.chunk(T.place_caption(ctx.labels[cid], column, row)),
            "concept_id": cid, "label": ctx.labels[cid], "background": colour,
            "place": T.PLACES[column, row][0]}


def make_places(ctx: Context, i: int) -> dict:
    return _placed_record(ctx, rng_for(ctx.seed, "places", i), "places", i,
                          balanced(ctx, "places", i, ctx.train_ids))


def _doc_plan(rng: random.Random) -> tuple[str, int, str, bool]:
    """An interleaved document's style, number of images, names ("made_up", "mixed" or "real";
    documents of other styles use real ones) and whether its last picture shows a new concept
    (only with real names: a made-up one could not be known)."""
    style = rng.choices(["naming", "captions", "vqa"], [0.6, 0.2, 0.2])[0]
    n = rng.choices([2, 3, 4, 5], [1, 3, 3, 3])[0] if style == "naming" else rng.randint(2, 4)
    mode = rng.random()
    names = "real"
    if style == "naming" and mode < NONCE_DOC_FRACTION + MIXED_DOC_FRACTION:
        names = "made_up" if mode < NONCE_DOC_FRACTION else "mixed"
    return style, n, names, names == "real" and rng.random() < NEW_LAST_FRACTION


def _doc_sequence(rng: random.Random, n: int, new_last: bool = False) -> list[int]:
    """Concept slots for a document of n images: the last repeats an earlier one (the answer is
    in the context), or with new_last is one the document has not shown (the model must look)."""
    k = 1 if n == 2 else rng.randint(2, min(3, n - 1))
    first = list(range(k)) + [rng.randrange(k) for _ in range(n - 1 - k)]
    rng.shuffle(first)
    return first + [k if new_last else rng.choice(first)]


def _naming_chunks(ctx: Context, rng: random.Random, m: Media, cids: list[str], seq: list[str],
                   name_kind: str) -> tuple[list[str], list[str]]:
    """Render ``seq`` (concept ids, each in ``cids``) as naming chunks, one sentence template for
    the whole document; returns the chunks and the name given to each of ``cids``."""
    made_up = nonce_words(rng, len(cids), avoid=set(ctx.labels.values()))
    if name_kind == "made_up":
        names = made_up
    elif name_kind == "mixed":
        names = [w if rng.random() < 0.5 else ctx.labels[c] for w, c in zip(made_up, cids)]
    else:
        names = [ctx.labels[c] for c in cids]
    template = rng.choice(T.NAMING_QA) if rng.random() < 0.25 else rng.choice(T.NAMING)
    last_key: dict[str, str] = {}
    chunks = []
    for cid in seq:
        cut, key = cutout(ctx, rng, cid, avoid=last_key.get(cid))
        last_key[cid] = key
        img, _, _ = R.render_object(rng, cut)
        m.image(img)
        chunks.append(T.chunk(T.naming(template, names[cids.index(cid)])))
    return chunks, names


def make_interleaved(ctx: Context, i: int) -> dict:
    rng = rng_for(ctx.seed, "interleaved", i)
    style, n, name_kind, new_last = _doc_plan(rng)
    m = Media(ctx, "interleaved", i)
    slots = _doc_sequence(rng, n, new_last)
    first = balanced(ctx, "interleaved", i, ctx.train_ids)
    cids = [first]
    while len(cids) < max(slots) + 1:
        cids.append(other(rng, ctx.train_ids, *cids))
    seq = [cids[s] for s in slots]
    out: dict = {"doc": style, "concepts": seq, "new_last": new_last}
    chunks = []
    if style == "naming":
        chunks, names = _naming_chunks(ctx, rng, m, cids, seq, name_kind)
        out["names"] = {nm: c for nm, c in zip(names, cids)}
        out["nonce"] = [nm != ctx.labels[c] for nm, c in zip(names, cids)]
    elif style == "captions":
        for cid in seq:
            cut, _ = cutout(ctx, rng, cid)
            img, colour, _ = R.render_object(rng, cut)
            m.image(img)
            chunks.append(T.chunk(T.caption(rng, ctx.labels[cid], colour)))
    else:
        qtype = rng.choice(["count", "colour", "position", "what"])
        for cid in seq:
            s = vqa_scene(ctx, rng, ctx.train_ids, qtype, main=cid)
            m.image(s["image"])
            chunks.append(T.chunk(T.qa(s["question"], s["answers"][0])))
        out["qtype"] = qtype
    return {"media": m.paths, "text": "".join(chunks), **out}


def make_naming(ctx: Context, i: int) -> dict:
    """A naming document shaped like a few-shot classification prompt: 2-5 concepts, 2-8 named
    pictures spread as evenly as possible over them in random order (each concept at least
    once), then one more picture of one of them. The interleaved documents stop at 5 pictures
    and 3 concepts; the evaluation's 8-shot, 5-way prompts hold 9 pictures of 5."""
    rng = rng_for(ctx.seed, "naming", i)
    way = rng.randint(2, 5)
    shots = rng.randint(way, 8)
    cids = [balanced(ctx, "naming", i, ctx.train_ids)]
    while len(cids) < way:
        cids.append(other(rng, ctx.train_ids, *cids))
    support = [cids[j % way] for j in range(shots)]
    rng.shuffle(support)
    seq = support + [rng.choice(cids)]
    mode = rng.random()
    name_kind = ("made_up" if mode < NONCE_DOC_FRACTION else
                 "mixed" if mode < NONCE_DOC_FRACTION + MIXED_DOC_FRACTION else "real")
    m = Media(ctx, "naming", i)
    chunks, names = _naming_chunks(ctx, rng, m, cids, seq, name_kind)
    return {"media": m.paths, "text": "".join(chunks), "doc": "naming", "concepts": seq,
            "new_last": False, "names": {nm: c for nm, c in zip(names, cids)},
            "nonce": [nm != ctx.labels[c] for nm, c in zip(names, cids)]}


def make_videos(ctx: Context, i: int) -> dict:
    rng = rng_for(ctx.seed, "videos", i)
    cid = balanced(ctx, "videos", i, ctx.train_ids)
    motion = R.MOTIONS[i % len(R.MOTIONS)] if rng.random() < 0.5 else rng.choice(R.MOTIONS)
    return _video_record(ctx, rng, "videos", i, cid, motion, train=True)


def _video_record(ctx, rng, kind, i, cid, motion, train):
    cut, _ = cutout(ctx, rng, cid)
    colour = R.pick_background(rng, [cut])
    n_frames = rng.choice([8, 12, 16])
    frames = R.motion_frames(rng, cut, motion, n_frames, colour)
    m = Media(ctx, kind, i)
    m.video(frames)
    label = ctx.labels[cid]
    rec = {"media": m.paths}
    if train:
        rec["text"] = T.chunk(T.motion_caption(rng, label, motion))
    else:
        choices = ["left", "right", "up", "down"]
        rec.update(question=T.motion_question(label),
                   answers=[T.DIRECTION_ANSWER[motion]], choices=choices)
    rec.update(motion=motion, label=label, concept_id=cid, frames=n_frames, fps=VIDEO_FPS)
    return rec


def make_vqa(ctx: Context, i: int) -> dict:
    rng = rng_for(ctx.seed, "vqa", i)
    qtype = _weighted(rng, TRAIN_QTYPES)
    s = vqa_scene(ctx, rng, ctx.train_ids, qtype, main=balanced(ctx, "vqa", i, ctx.train_ids))
    m = Media(ctx, "vqa", i)
    m.image(s["image"])
    return {"media": m.paths, "text": T.chunk(T.qa(s["question"], s["answers"][0])),
            "question": s["question"], "answers": s["answers"], "qtype": s["qtype"],
            "concepts": s["concepts"]}


# ------------------------------------------------------------------------------------------
# test records


def make_classify(ctx: Context, i: int) -> dict:
    cid = ctx.heldout_ids[i // ctx.classify_renders]
    rng = rng_for(ctx.seed, "classify", i)
    cut, _ = cutout(ctx, rng, cid)
    img, _, _ = R.render_object(rng, cut)
    m = Media(ctx, "classify", i)
    m.image(img)
    return {"media": m.paths, "label": ctx.labels[cid], "concept_id": cid}


def make_captions(ctx: Context, i: int) -> dict:
    cid = ctx.heldout_ids[i // ctx.caption_renders]
    rng = rng_for(ctx.seed, "captions", i)
    cut, _ = cutout(ctx, rng, cid)
    img, colour, _ = R.render_object(rng, cut)
    m = Media(ctx, "captions", i)
    m.image(img)
    return {"media": m.paths, "captions": T.reference_captions(ctx.labels[cid], colour),
            "label": ctx.labels[cid], "concept_id": cid}


def make_vqa_test(ctx: Context, i: int) -> dict:
    rng = rng_for(ctx.seed, "vqa_test", i)
    s = vqa_scene(ctx, rng, ctx.all_ids, _weighted(rng, TEST_QTYPES))
    m = Media(ctx, "vqa_test", i)
    m.image(s["image"])
    held = set(ctx.heldout_ids)
    return {"media": m.paths, "question": s["question"], "answers": s["answers"],
            "qtype": s["qtype"], "concepts": s["concepts"],
            "heldout": any(c in held for c in s["concepts"])}


def make_video_qa(ctx: Context, i: int) -> dict:
    rng = rng_for(ctx.seed, "video_qa", i)
    cid = rng.choice(ctx.all_ids)
    motion = ("right", "left", "up", "down")[i % 4]
    rec = _video_record(ctx, rng, "video_qa", i, cid, motion, train=False)
    rec["heldout"] = cid in set(ctx.heldout_ids)
    return rec


def make_places_test(ctx: Context, i: int) -> dict:
    """New place-labelled renders (held-out concepts too): is where a thing is readable from the
    visual tokens (`python -m engine.eval.probe --field place`)?"""
    rng = rng_for(ctx.seed, "places_test", i)
    cid = rng.choice(ctx.all_ids)
    rec = _placed_record(ctx, rng, "places_test", i, cid)
    return {**rec, "heldout": cid in set(ctx.heldout_ids)}


def make_recognize(ctx: Context, i: int) -> dict:
    # a separate random stream from every training render: new placements / turns / colours
    rng = rng_for(ctx.seed, "recognize-unseen", i)
    cid = balanced(ctx, "recognize", i, ctx.train_ids)
    cut, _ = cutout(ctx, rng, cid)
    img, colour, _ = R.render_object(rng, cut)
    m = Media(ctx, "recognize", i)
    m.image(img)
    # reference captions too, so captioning can also be scored on concepts the model was
    # trained on (captions.test holds held-out concepts only, whose names it never saw)
    return {"media": m.paths, "label": ctx.labels[cid], "concept_id": cid,
            "captions": T.reference_captions(ctx.labels[cid], colour), "background": colour}


MAKERS = {
    "pairs": make_pairs, "places": make_places, "interleaved": make_interleaved, "naming": make_naming, "videos": make_videos,
    "vqa": make_vqa, "classify": make_classify, "captions": make_captions,
    "vqa_test": make_vqa_test, "video_qa": make_video_qa, "recognize": make_recognize,
    "places_test": make_places_test,
}
