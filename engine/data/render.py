"""Drawing the corpus's pictures: cut-outs placed on coloured backgrounds, multi-object scenes
with known layouts, simple coloured shapes, and short videos of one object moving.

Every function takes a ``random.Random`` and is a pure function of it, so a record is the same
whichever worker draws it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224

# Named background colours: distinct at a glance and easy words for a small LM.  No black:
# much clip art is black line work.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 48, 49),
    "green": (60, 170, 75),
    "blue": (52, 108, 214),
    "yellow": (245, 215, 60),
    "orange": (243, 142, 38),
    "purple": (135, 76, 190),
    "pink": (245, 160, 200),
    "brown": (135, 90, 55),
    "gray": (150, 150, 150),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star")
MOTIONS = ("right", "left", "up", "down", "grow", "shrink", "appear", "disappear")


def jitter_colour(rng: random.Random, rgb: tuple[int, int, int], amount: int = 10
                  ) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb)


def mean_colour(cutout: Image.Image) -> np.ndarray:
    a = np.asarray(cutout)
    m = a[..., 3] > 0
    return a[..., :3][m].reshape(-1, 3).mean(axis=0) if m.any() else np.zeros(3)


def pick_background(rng: random.Random, cutouts: list[Image.Image],
                    exclude: tuple[str, ...] = ()) -> str:
    """A background colour name that contrasts with every object's average colour."""
    means = [mean_colour(c) for c in cutouts]
    names = [n for n in COLOURS if n not in exclude]
    rng.shuffle(names)
    best, best_d = names[0], -1.0
    for n in names:
        d = min((float(np.linalg.norm(np.array(COLOURS[n]) - m)) for m in means), default=999)
        if d >= 90:
            return n
        if d > best_d:
            best, best_d = n, d
    return best


def canvas(rng: random.Random, colour: str) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), jitter_colour(rng, COLOURS[colour]))


@dataclass
class Placement:
    """Where an object went: centre (x, y) and size in pixels, turn in degrees, mirrored."""
    x: float
    y: float
    size: float
    angle: float = 0.0
    flip: bool = False


def transform(cutout: Image.Image, size: float, angle: float = 0.0, flip: bool = False
              ) -> Image.Image:
    """The cut-out scaled so its longer side is ``size`` px, mirrored and turned."""
    w, h = cutout.size
    s = max(1.0, size) / max(w, h)
    im = cutout.convert("RGBa").resize((max(1, round(w * s)), max(1, round(h * s))),
                                       Image.BICUBIC)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if abs(angle) > 0.5:
        im = im.rotate(angle, resample=Image.BICUBIC, expand=True)
    return im.convert("RGBA")


def paste(bg: Image.Image, cutout: Image.Image, p: Placement, opacity: float = 1.0) -> None:
    im = transform(cutout, p.size, p.angle, p.flip)
    if opacity < 1.0:
        a = np.asarray(im).copy()
        a[..., 3] = (a[..., 3].astype(np.float32) * opacity).astype(np.uint8)
        im = Image.fromarray(a, "RGBA")
    bg.paste(im, (round(p.x - im.width / 2), round(p.y - im.height / 2)), im)


# ------------------------------------------------------------------------------------------
# single objects


def random_placement(rng: random.Random, lo: float = 0.45, hi: float = 0.85,
                     max_angle: float = 25.0) -> Placement:
    size = rng.uniform(lo, hi) * SIZE
    margin = size * 0.48
    x = rng.uniform(margin, SIZE - margin)
    y = rng.uniform(margin, SIZE - margin)
    angle = 0.0 if rng.random() < 0.35 else rng.uniform(-max_angle, max_angle)
    return Placement(x, y, size, angle, rng.random() < 0.5)


def render_object(rng: random.Random, cutout: Image.Image, colour: str | None = None
                  ) -> tuple[Image.Image, str, Placement]:
    """One object, randomly scaled / placed / turned / mirrored, on a plain background."""
    colour = colour or pick_background(rng, [cutout])
    bg = canvas(rng, colour)
    p = random_placement(rng)
    paste(bg, cutout, p)
    return bg, colour, p


# ------------------------------------------------------------------------------------------
# scenes


def _boxes_overlap(a: Placement, b: Placement, slack: float = 0.92) -> bool:
    return (abs(a.x - b.x) < (a.size + b.size) / 2 * slack
            and abs(a.y - b.y) < (a.size + b.size) / 2 * slack)


def scatter(rng: random.Random, n: int, lo: float = 0.22, hi: float = 0.34,
            region: tuple[float, float, float, float] = (0, 0, SIZE, SIZE)) -> list[Placement]:
    """``n`` non-overlapping placements inside ``region`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = region
    for shrink in (1.0, 0.85, 0.7, 0.55, 0.45):
        out: list[Placement] = []
        for _ in range(400):
            if len(out) == n:
                break
            size = rng.uniform(lo, hi) * SIZE * shrink
            m = size / 2 + 2
            if x1 - x0 <= 2 * m or y1 - y0 <= 2 * m:
                continue
            p = Placement(rng.uniform(x0 + m, x1 - m), rng.uniform(y0 + m, y1 - m), size,
                          0.0 if rng.random() < 0.5 else rng.uniform(-15, 15),
                          rng.random() < 0.5)
            if all(not _boxes_overlap(p, q) for q in out):
                out.append(p)
        if len(out) == n:
            return out
    raise RuntimeError(f"could not place {n} objects")  # not reached for n <= 6


def render_scene(rng: random.Random, items: list[tuple[Image.Image, Placement]],
                 colour: str) -> Image.Image:
    bg = canvas(rng, colour)
    for cutout, p in items:
        paste(bg, cutout, p)
    return bg


def side_by_side(rng: random.Random, axis: str) -> tuple[Placement, Placement]:
    """Two placements clearly apart: first left & second right (axis 'x'), or first top &
    second bottom (axis 'y')."""
    size_a, size_b = (rng.uniform(0.3, 0.42) * SIZE for _ in range(2))
    across_a, across_b = (rng.uniform(0.3, 0.7) * SIZE for _ in range(2))
    near = rng.uniform(0.2, 0.3) * SIZE
    far = rng.uniform(0.7, 0.8) * SIZE
    mk = (lambda along, across, s: Placement(along, across, s, rng.uniform(-10, 10),
                                             rng.random() < 0.5)) if axis == "x" else \
        (lambda along, across, s: Placement(across, along, s, rng.uniform(-10, 10),
                                            rng.random() < 0.5))
    return mk(near, across_a, size_a), mk(far, across_b, size_b)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, p: Placement,
               fill: tuple[int, int, int]) -> None:
    r = p.size / 2
    x, y = p.x, p.y
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        pts = [(-r, -r), (r, -r), (r, r), (-r, r)]
        draw.polygon(_turn(pts, p.angle, x, y), fill=fill)
    elif shape == "triangle":
        pts = [(0, -r), (r * 0.95, r * 0.75), (-r * 0.95, r * 0.75)]
        draw.polygon(_turn(pts, p.angle, x, y), fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = math.pi / 5 * k - math.pi / 2
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        draw.polygon(_turn(pts, p.angle, x, y), fill=fill)
    else:
        raise ValueError(shape)


def _turn(pts, angle, cx, cy):
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in pts]


# ------------------------------------------------------------------------------------------
# videos


def motion_frames(rng: random.Random, cutout: Image.Image, motion: str, n_frames: int,
                  colour: str) -> list[Image.Image]:
    """``n_frames`` frames of one object doing ``motion`` (see MOTIONS) on a still background."""
    base = canvas(rng, colour)
    size = rng.uniform(0.3, 0.45) * SIZE
    angle = 0.0 if rng.random() < 0.5 else rng.uniform(-12, 12)
    flip = rng.random() < 0.5
    cx, cy = rng.uniform(0.4, 0.6) * SIZE, rng.uniform(0.4, 0.6) * SIZE
    start, end = rng.uniform(0.16, 0.26) * SIZE, rng.uniform(0.74, 0.84) * SIZE
    small, big = rng.uniform(0.15, 0.22) * SIZE, rng.uniform(0.7, 0.85) * SIZE
    cut = rng.randint(max(1, n_frames // 3), max(1, n_frames - n_frames // 3))
    frames = []
    for i in range(n_frames):
        t = i / (n_frames - 1)
        x, y, s, visible = cx, cy, size, True
        if motion in ("right", "left"):
            x = start + (end - start) * (t if motion == "right" else 1 - t)
        elif motion in ("down", "up"):
            y = start + (end - start) * (t if motion == "down" else 1 - t)
        elif motion in ("grow", "shrink"):
            s = small + (big - small) * (t if motion == "grow" else 1 - t)
        elif motion == "appear":
            visible = i >= cut
        elif motion == "disappear":
            visible = i < cut
        elif motion != "still":
            raise ValueError(f"unknown motion {motion!r}")
        frame = base.copy()
        if visible:
            paste(frame, cutout, Placement(x, y, s, angle, flip))
        frames.append(frame)
    return frames


def write_png(im: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "PNG", compress_level=4)


def write_mp4(frames: list[Image.Image], path: Path, fps: float = 8.0) -> None:
    """An mp4 (MPEG-4 part 2, 'mp4v') that OpenCV and engine.media.load_video read back."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = frames[0].size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write mp4 video {path}")
    try:
        for f in frames:
            writer.write(np.asarray(f.convert("RGB"))[:, :, ::-1].copy())
    finally:
        writer.release()
