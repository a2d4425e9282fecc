"""Where the corpus's objects come from: Open Clip Art PNGs and Noto Color Emoji glyphs.

A *concept* is one English label ("cat", "light bulb") with one or more *sources* (clip-art
files and/or emoji) drawn as that thing.  Each source is turned once into a *cut-out*: an RGBA
picture cropped to the object, transparent around it, at most 192 px on its longer side, which
the renderer then scales, turns and places on backgrounds.

Nothing here installs anything: a missing source folder or font is a :class:`SourceError`
telling the user which Debian package to install.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .names import clean_clipart_name, clean_emoji_name

DEFAULT_CLIPART_DIR = "/usr/share/openclipart/png"
DEFAULT_EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CUTOUT_MAX_SIDE = 192
EMOJI_FONT_SIZE = 109  # the only size NotoColorEmoji's CBDT bitmaps render at
# Emoji blocks (Noto draws these); single code points only, no sequences or modifiers.
EMOJI_RANGES = [(0x2600, 0x27BF), (0x1F300, 0x1FAFF)]


class SourceError(ValueError):
    """A source folder or font that is missing or unusable (a user-fixable problem)."""


@dataclass(frozen=True)
class Source:
    kind: str  # "clipart" | "emoji"
    ref: str   # clip-art path relative to the clip-art root, or the emoji character

    @property
    def key(self) -> str:
        """A short stable name for cut-out files and the manifest."""
        raw = f"{self.kind}:{self.ref}".encode()
        return f"{self.kind[0]}{hashlib.sha1(raw).hexdigest()[:12]}"

    def describe(self) -> str:
        if self.kind == "emoji":
            return f"emoji U+{ord(self.ref):04X}"
        return f"clipart {self.ref}"


@dataclass
class Concept:
    id: str
    label: str
    sources: list[Source] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"id": self.id, "label": self.label,
                "sources": [s.describe() for s in self.sources]}


def concept_id(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


# ------------------------------------------------------------------------------------------
# scanning


def check_sources(clipart_dir: str | None, emoji_font: str | None) -> None:
    """Raise SourceError with an install hint when a requested source is absent."""
    if clipart_dir is None and emoji_font is None:
        raise SourceError("no sources: give --clipart-dir and/or --emoji-font "
                          "(both were 'none').")
    if clipart_dir is not None and not Path(clipart_dir).is_dir():
        raise SourceError(
            f"clip-art folder not found: {clipart_dir}\n"
            f"  install it with: apt-get install -y openclipart-png\n"
            f"  or pass --clipart-dir DIR (a folder of category sub-folders of PNGs), "
            f"or --clipart-dir none to build without clip art.")
    if emoji_font is not None and not Path(emoji_font).is_file():
        raise SourceError(
            f"emoji font not found: {emoji_font}\n"
            f"  install it with: apt-get install -y fonts-noto-color-emoji\n"
            f"  or pass --emoji-font PATH (NotoColorEmoji.ttf), or --emoji-font none "
            f"to build without emoji.")


def scan_clipart(root: str | os.PathLike) -> dict[str, list[str]]:
    """Label -> sorted clip-art paths (relative to root); symlinks and unnameable files
    are skipped, identical files kept once."""
    root = Path(root)
    by_label: dict[str, list[str]] = defaultdict(list)
    seen_sizes: dict[tuple[int, str], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(".png"):
                continue
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            rel = path.relative_to(root).as_posix()
            label = clean_clipart_name(rel)
            if label is None:
                continue
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size == 0:
                continue
            # exact duplicates (the package ships some files twice): same size and bytes
            digest = hashlib.sha1(path.read_bytes()).hexdigest()
            if (size, digest) in seen_sizes:
                continue
            seen_sizes[(size, digest)] = rel
            by_label[label].append(rel)
    return dict(by_label)


def _load_emoji_font(font_path: str) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(font_path, EMOJI_FONT_SIZE)
    except OSError as exc:
        raise SourceError(f"cannot load emoji font {font_path}: {exc} (Noto Color Emoji is a "
                          f"bitmap font that only loads at size {EMOJI_FONT_SIZE})") from exc


def render_emoji(char: str, font_path: str) -> Image.Image:
    """The emoji drawn by the colour font, RGBA on transparent, about 136x128 px."""
    font = _font_cache(font_path)
    im = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((8, 8), char, font=font, embedded_color=True)
    return im


_FONTS: dict[str, ImageFont.FreeTypeFont] = {}


def _font_cache(font_path: str) -> ImageFont.FreeTypeFont:
    if font_path not in _FONTS:
        _FONTS[font_path] = _load_emoji_font(font_path)
    return _FONTS[font_path]


def emoji_candidates() -> list[tuple[str, str]]:
    """(character, label) for every single-code-point emoji whose name makes a label."""
    import unicodedata

    out = []
    for lo, hi in EMOJI_RANGES:
        for cp in range(lo, hi + 1):
            name = unicodedata.name(chr(cp), "")
            label = clean_emoji_name(name) if name else None
            if label:
                out.append((chr(cp), label))
    return out


def scan_emoji(font_path: str, chars: list[str] | None = None) -> dict[str, list[str]]:
    """Label -> emoji characters the font really draws (missing glyphs are skipped)."""
    missing = render_emoji("\U0010FFFD", font_path).tobytes()  # the font's "no glyph" box
    cands = emoji_candidates()
    if chars is not None:
        wanted = set(chars)
        cands = [(c, lab) for c, lab in cands if c in wanted]
    by_label: dict[str, list[str]] = defaultdict(list)
    for ch, label in cands:
        im = render_emoji(ch, font_path)
        if im.getbbox() is None or im.tobytes() == missing:
            continue
        by_label[label].append(ch)
    return dict(by_label)


def gather_concepts(clipart: dict[str, list[str]], emoji: dict[str, list[str]],
                    rng: random.Random, max_sources: int) -> list[Concept]:
    """Merge clip-art and emoji sources by label; at most ``max_sources * 2`` candidates per
    concept (a random choice when there are more), emoji first, sorted by id."""
    from .names import singular

    labels = sorted(set(clipart) | set(emoji))
    # a plural label joins its singular when both exist ("books" -> "book", "eyes" -> "eye")
    def canonical(label: str) -> str:
        head, _, last = label.rpartition(" ")
        one = f"{head} {singular(last)}".strip()
        return one if one != label and one in labels else label
    clipart = _regroup(clipart, canonical)
    emoji = _regroup(emoji, canonical)
    labels = sorted(set(clipart) | set(emoji))
    concepts = []
    for label in labels:
        srcs = [Source("emoji", c) for c in emoji.get(label, [])]
        files = list(clipart.get(label, []))
        rng.shuffle(files)
        srcs += [Source("clipart", f) for f in files[: max_sources * 2]]
        concepts.append(Concept(concept_id(label), label, srcs))
    # two labels can share an id ("t-shirt" / "t shirt"): merge them
    merged: dict[str, Concept] = {}
    for c in concepts:
        if c.id in merged:
            merged[c.id].sources.extend(c.sources)
        else:
            merged[c.id] = c
    return sorted(merged.values(), key=lambda c: c.id)


def _regroup(by_label: dict[str, list[str]], canonical) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for label in sorted(by_label):
        out[canonical(label)].extend(by_label[label])
    return dict(out)


# ------------------------------------------------------------------------------------------
# cut-outs


def _to_rgba(im: Image.Image) -> Image.Image:
    if im.mode == "P" and "transparency" in im.info:
        return im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        return im.convert("RGBA")
    if im.mode in ("I;16", "I", "F"):
        im = im.point(lambda v: v / 256).convert("L")
    return im.convert("RGB").convert("RGBA")


def _key_out_background(a: np.ndarray) -> np.ndarray:
    """For an opaque picture on a flat backdrop, make the backdrop (connected to the border,
    the colour of the corners) transparent.  Pictures without a flat backdrop are kept."""
    import cv2

    rgb = np.ascontiguousarray(a[..., :3])
    h, w = rgb.shape[:2]
    corners = np.array([rgb[0, 0], rgb[0, -1], rgb[-1, 0], rgb[-1, -1]], dtype=np.int32)
    if np.abs(corners - corners[0]).max() > 24:
        return a  # no common backdrop colour: keep the whole picture (flags, photos)
    mask = np.zeros((h + 2, w + 2), np.uint8)
    flags = 4 | cv2.FLOODFILL_MASK_ONLY | cv2.FLOODFILL_FIXED_RANGE | (255 << 8)
    for x, y in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)):
        if mask[y + 1, x + 1] == 0:
            cv2.floodFill(rgb, mask, (x, y), 0, (12, 12, 12), (12, 12, 12), flags)
    bg = mask[1:-1, 1:-1] > 0
    if bg.mean() > 0.97:  # nothing but backdrop
        return a
    out = a.copy()
    out[bg, 3] = 0
    return out


def make_cutout(im: Image.Image, max_side: int = CUTOUT_MAX_SIDE) -> Image.Image | None:
    """Crop a picture to its object and shrink it; None when it is not a usable object
    (blank, a thin line, a sliver, or too small to see)."""
    a = np.array(_to_rgba(im))
    if a.size == 0:
        return None
    if a[..., 3].min() == 255:
        a = _key_out_background(a)
    a[a[..., 3] < 16, 3] = 0
    alpha = a[..., 3]
    ys, xs = np.nonzero(alpha)
    if len(xs) == 0:
        return None
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    w, h = x1 - x0, y1 - y0
    if max(w, h) < 24 or max(w, h) / max(1, min(w, h)) > 4.0:
        return None
    crop = a[y0:y1, x0:x1]
    opaque = crop[..., 3] > 0
    if opaque.mean() < 0.06:
        return None  # mostly empty: thin outlines, scattered dots
    colours = crop[..., :3][opaque].astype(np.float32)
    if colours.std(axis=0).max() < 6 and opaque.mean() > 0.9:
        return None  # a plain rectangle of one colour
    out = Image.fromarray(crop, "RGBA")
    scale = max_side / max(w, h)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        out = out.convert("RGBa").resize(size, Image.LANCZOS).convert("RGBA")
    return out


def load_source_cutout(src: Source, clipart_dir: str | None, emoji_font: str | None
                       ) -> Image.Image | None:
    """Decode one source into its cut-out (None when unusable)."""
    if src.kind == "emoji":
        if emoji_font is None:
            return None
        return make_cutout(render_emoji(src.ref, emoji_font))
    if clipart_dir is None:
        return None
    path = Path(clipart_dir) / src.ref
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.size[0] * im.size[1] > 40_000_000:
                return None
            im.load()
            return make_cutout(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
