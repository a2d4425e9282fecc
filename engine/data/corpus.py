"""The offline corpus builder (``python -m engine build-data``).

Steps, each logged:

1. scan the sources (Open Clip Art folders, Noto Color Emoji) into labelled concepts
   (:mod:`engine.data.sources`, labels from :mod:`engine.data.names`);
2. cut every candidate source out once (in parallel) and drop the unusable ones;
3. choose the concepts (at most ``max_concepts``) and hold out ~15% of them *by concept
   family* (all labels sharing a head noun: "tree", "palm tree", ...) for evaluation;
4. draw every record (in parallel, :mod:`engine.data.records`) and write the JSONL files;
5. write ``manifest.json``.

The result is a pure function of the seed and the sources: the same seed gives byte-identical
JSONL files and media.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from . import records as REC
from .names import singular, symbol_vocabulary
from .sources import (Concept, SourceError, check_sources, gather_concepts,
                      load_source_cutout, scan_clipart, scan_emoji)

log = logging.getLogger("engine.data.corpus")

__all__ = ["Sizes", "SIZES", "BuildConfig", "build_corpus", "CorpusError"]


class CorpusError(ValueError):
    """A user-fixable problem with the build (missing sources, unsafe output folder)."""


@dataclass(frozen=True)
class Sizes:
    pairs: int
    places: int
    interleaved: int
    naming: int
    videos: int
    vqa: int
    classify_renders: int   # renders per held-out concept in classify.test
    caption_renders: int    # renders per held-out concept in captions.test
    vqa_test: int
    video_qa: int
    recognize: int
    places_test: int


SIZES = {
    "small": Sizes(pairs=200, places=60, interleaved=60, naming=40, videos=24, vqa=100, classify_renders=3,
                   caption_renders=1, vqa_test=40, video_qa=16, recognize=40, places_test=18),
    "full": Sizes(pairs=30_000, places=6_000, interleaved=8_000, naming=4_000, videos=3_000, vqa=8_000, classify_renders=10,
                  caption_renders=3, vqa_test=1_500, video_qa=500, recognize=1_500, places_test=900),
}


@dataclass
class BuildConfig:
    out: Path
    seed: int = 0
    sizes: Sizes = SIZES["small"]
    clipart_dir: str | None = "/usr/share/openclipart/png"
    emoji_font: str | None = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
    emoji_chars: list[str] | None = None   # only these emoji (tests); None = all
    max_concepts: int = 700
    max_sources: int = 12                  # cut-outs kept per concept
    heldout_fraction: float = 0.15
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    progress: bool = True
    force: bool = False                    # write into a non-empty folder that is no corpus


# ------------------------------------------------------------------------------------------
# parallel map with progress


_WORKER_STATE: dict = {}


def _init_worker(state: dict) -> None:
    _WORKER_STATE.clear()
    _WORKER_STATE.update(state)


def _cutout_task(args):
    key, src = args
    st = _WORKER_STATE
    im = load_source_cutout(src, st["clipart_dir"], st["emoji_font"])
    if im is None:
        return key, False
    im.save(Path(st["cutout_dir"]) / f"{key}.png", compress_level=1)
    return key, True


def _record_task(args):
    kind, i = args
    return REC.MAKERS[kind](_WORKER_STATE["ctx"], i)


def _pmap(fn, items: list, state: dict, workers: int, desc: str, progress: bool):
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="rec", leave=False,
               mininterval=1.0)
    try:
        if workers <= 1 or len(items) < 8:
            _init_worker(state)
            for it in items:
                yield fn(it)
                bar.update()
            return
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp
        with ctx.Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
            for res in pool.imap(fn, items, chunksize=8):
                yield res
                bar.update()
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------
# steps


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()):
        if (out / "manifest.json").is_file():
            log.info("replacing the corpus in %s", out)
            shutil.rmtree(out / "media", ignore_errors=True)
            for name in list(REC.FILES.values()) + ["manifest.json"]:
                (out / name).unlink(missing_ok=True)
        elif not force:
            raise CorpusError(f"--out {out} is a non-empty folder that holds no corpus "
                              f"(no manifest.json); choose an empty or new folder.")
    out.mkdir(parents=True, exist_ok=True)


def _family(label: str) -> str:
    """Concepts sharing a head noun form one family ("palm tree", "tree")."""
    return singular(label.split()[-1])


def split_concepts(concepts: list[Concept], fraction: float, rng: random.Random
                   ) -> tuple[list[Concept], list[Concept]]:
    """(train, held-out): whole families go to held-out until ``fraction`` is reached."""
    fams: dict[str, list[Concept]] = {}
    for c in concepts:
        fams.setdefault(_family(c.label), []).append(c)
    names = sorted(fams)
    rng.shuffle(names)
    target = max(1, round(fraction * len(concepts)))
    held: list[Concept] = []
    for name in names:
        if len(held) >= target:
            break
        if len(held) + len(fams[name]) > target * 1.5 and held:
            continue  # a big family would overshoot: try smaller ones
        held.extend(fams[name])
    held_ids = {c.id for c in held}
    train = [c for c in concepts if c.id not in held_ids]
    if len(train) < 2:
        raise CorpusError(f"only {len(concepts)} usable concepts: need at least 3 "
                          f"(2 to train on, 1 held out).")
    return train, sorted(held, key=lambda c: c.id)


def _select(concepts: list[Concept], max_concepts: int, rng: random.Random) -> list[Concept]:
    """Prefer concepts with several pictures; fill the rest at random."""
    if len(concepts) <= max_concepts:
        return concepts
    order = list(concepts)
    rng.shuffle(order)
    order.sort(key=lambda c: -min(len(c.sources), 3))
    return sorted(order[:max_concepts], key=lambda c: c.id)


def _write_jsonl(path: Path, recs, stats: Counter) -> int:
    tmp = path.with_suffix(".jsonl.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            _tally(stats, r)
            n += 1
    tmp.replace(path)
    return n


def _tally(stats: Counter, r: dict) -> None:
    """What the manifest reports about the mix of records."""
    if "doc" in r:
        stats[f"doc:{r['doc']}"] += 1
        stats["new_last"] += bool(r.get("new_last"))
        if r["doc"] == "naming":
            stats["names"] += len(r["nonce"])
            stats["nonce_names"] += sum(r["nonce"])
    if "qtype" in r:
        stats[f"qtype:{r['qtype']}"] += 1
    if "motion" in r:
        stats[f"motion:{r['motion']}"] += 1


# ------------------------------------------------------------------------------------------
# the build


def build_corpus(cfg: BuildConfig) -> dict:
    """Build the corpus described by ``cfg`` into ``cfg.out``; returns the manifest."""
    t0 = time.time()
    out = Path(cfg.out)
    try:
        check_sources(cfg.clipart_dir, cfg.emoji_font)
    except SourceError as exc:
        raise CorpusError(str(exc)) from exc
    _prepare_out(out, cfg.force)
    rng = random.Random(cfg.seed)
    symbol_vocabulary()  # warm caches before workers fork

    # 1. scan
    clip = scan_clipart(cfg.clipart_dir) if cfg.clipart_dir else {}
    emo = scan_emoji(cfg.emoji_font, cfg.emoji_chars) if cfg.emoji_font else {}
    log.info("scanned sources: %d clip-art labels (%d files), %d emoji labels (%d emoji)",
             len(clip), sum(map(len, clip.values())), len(emo), sum(map(len, emo.values())))
    candidates = gather_concepts(clip, emo, random.Random(cfg.seed + 1), cfg.max_sources)

    cutout_dir = Path(tempfile.mkdtemp(prefix=".cutouts-", dir=out))
    try:
        # 2. cut-outs
        jobs = {s.key: s for c in candidates for s in c.sources}
        state = {"clipart_dir": cfg.clipart_dir, "emoji_font": cfg.emoji_font,
                 "cutout_dir": str(cutout_dir)}
        usable = {k for k, ok in _pmap(_cutout_task, sorted(jobs.items()), state, cfg.workers,
                                       "cut-outs", cfg.progress) if ok}
        concepts = []
        for c in candidates:
            keep = [s for s in c.sources if s.key in usable][: cfg.max_sources]
            if keep:
                concepts.append(Concept(c.id, c.label, keep))
        log.info("cut out %d of %d candidate pictures; %d concepts have at least one",
                 len(usable), len(jobs), len(concepts))

        # 3. concepts and the held-out split
        concepts = _select(concepts, cfg.max_concepts, rng)
        train, held = split_concepts(concepts, cfg.heldout_fraction, rng)
        log.info("%d concepts: %d for training, %d held out (%s...)", len(concepts), len(train),
                 len(held), ", ".join(c.label for c in held[:8]))

        # 4. records
        ctx = REC.Context(out_dir=out, cutout_dir=cutout_dir, seed=cfg.seed,
                          labels={c.id: c.label for c in concepts},
                          sources={c.id: [s.key for s in c.sources] for c in concepts},
                          train_ids=[c.id for c in train], heldout_ids=[c.id for c in held],
                          classify_renders=cfg.sizes.classify_renders,
                          caption_renders=cfg.sizes.caption_renders)
        counts, stats = {}, {}
        for kind in REC.TRAIN_KINDS + REC.TEST_KINDS:
            n = _count(cfg.sizes, kind, len(held))
            t = time.time()
            recs = _pmap(_record_task, [(kind, i) for i in range(n)], {"ctx": ctx},
                         cfg.workers, kind, cfg.progress)
            tally: Counter = Counter()
            counts[REC.FILES[kind]] = _write_jsonl(out / REC.FILES[kind], recs, tally)
            if tally:
                stats[REC.FILES[kind]] = dict(sorted(tally.items()))
            log.info("wrote %s: %d records in %.1f s", REC.FILES[kind], n, time.time() - t)
    finally:
        shutil.rmtree(cutout_dir, ignore_errors=True)

    # 5. manifest
    manifest = {
        "seed": cfg.seed,
        "counts": counts,
        "stats": stats,
        "n_concepts": len(concepts),
        "train_concepts": [c.to_json() for c in train],
        "heldout_concepts": [c.to_json() for c in held],
        "sizes": asdict(cfg.sizes),
        "sources": {"clipart_dir": cfg.clipart_dir, "emoji_font": cfg.emoji_font},
        "format": {"media_token": "<image>", "eoc_token": "<EOC>", "image_size": 224,
                   "video": "mp4 (mp4v), 8 fps, 8/12/16 frames"},
        "build_seconds": round(time.time() - t0, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    inter = stats.get(REC.FILES["interleaved"], {})
    if inter.get("names"):
        log.info("interleaved naming documents: %.0f%% of names are made-up words",
                 100 * inter["nonce_names"] / inter["names"])
    log.info("built corpus in %s: %s (%.0f s)", out,
             ", ".join(f"{k} {v}" for k, v in counts.items()), manifest["build_seconds"])
    return manifest


def _count(sizes: Sizes, kind: str, n_held: int) -> int:
    if kind == "classify":
        return sizes.classify_renders * n_held
    if kind == "captions":
        return sizes.caption_renders * n_held
    return getattr(sizes, kind)


def sizes_for(name: str, **overrides: int | None) -> Sizes:
    """A size preset with some counts replaced (None = keep the preset's)."""
    base = SIZES[name]
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
