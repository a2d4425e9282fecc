"""Media decoding: image files and short videos to RGB PIL images.

Everything that reads a user's or a corpus's media file goes through here, so that one place
decides which formats are accepted and what a broken file looks like to the user: a
:class:`MediaError` naming the file and the problem.  Turning images into tensors is not done
here (see ``engine/vision.py``).

* Images: PNG (alpha composited on white), JPEG (EXIF orientation applied), WebP, BMP, TIFF,
  GIF (first frame).  Oversized images (decompression bombs) are refused before decoding.
* Videos: mp4 / webm / avi / mov / mkv / m4v through OpenCV, and animated GIF / WebP / PNG
  (OpenCV first where it can, Pillow otherwise).  A video is sampled into a fixed number of
  frames (the centres of equal segments of the clip) or at a fixed rate.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MediaError",
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "VideoClip",
    "media_kind",
    "load_image",
    "load_video",
    "load_media",
    "content_hash",
]

PathLike = Union[str, os.PathLike]
PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".jpe", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"}
# Extensions whose files may hold one picture or an animation; decided by counting frames.
_MAYBE_ANIMATED_EXTS = {".gif", ".webp", ".png"}

DEFAULT_MAX_PIXELS = 64_000_000


class MediaError(ValueError):
    """A media file that cannot be used; the message names the file and says why."""


# --------------------------------------------------------------------------------------------
# helpers


def _describe(source: PathOrBytes) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of uploaded data>"
    name = getattr(source, "name", None)
    return f"'{name}'" if isinstance(name, str) else "<uploaded data>"


def _check_file(path: PathLike) -> Path:
    p = Path(os.fspath(path))
    if not p.exists():
        raise MediaError(f"Media file {_describe(path)} does not exist.")
    if p.is_dir():
        raise MediaError(f"Media path {_describe(path)} is a folder, not a file.")
    try:
        size = p.stat().st_size
    except OSError as exc:  # permissions and the like
        raise MediaError(f"Media file {_describe(path)} cannot be read: {exc.strerror}.") from exc
    if size == 0:
        raise MediaError(f"Media file {_describe(path)} is empty (0 bytes).")
    return p


def _as_fileobj(source: PathOrBytes) -> BinaryIO | str:
    """What Image.open accepts; raises MediaError for missing/empty input."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise MediaError("The uploaded media is empty (0 bytes).")
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        return str(_check_file(source))
    return source  # a file-like object


def _open_pil(source: PathOrBytes, max_pixels: int) -> Image.Image:
    what = _describe(source)
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below decides; Pillow still refuses > 2x its limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(_as_fileobj(source))
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"Image {what} is too large to decode safely ({exc}).") from exc
    except UnidentifiedImageError as exc:
        raise MediaError(f"{what} is not an image file Pillow can read "
                         f"(unknown or corrupt format).") from exc
    except OSError as exc:
        raise MediaError(f"Image {what} cannot be read: {exc}.") from exc
    w, h = im.size
    if w <= 0 or h <= 0:
        raise MediaError(f"Image {what} has no pixels ({w}x{h}).")
    if w * h > max_pixels:
        raise MediaError(f"Image {what} is too large: {w}x{h} = {w * h:,} pixels "
                         f"(limit {max_pixels:,}); refusing a possible decompression bomb.")
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparent areas become white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.astype("uint8"), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def _n_frames(im: Image.Image) -> int:
    try:
        return int(getattr(im, "n_frames", 1) or 1)
    except Exception:  # a broken animation: treat as a still picture
        return 1


# --------------------------------------------------------------------------------------------
# kind


def _sniff_video(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return (head[4:8] == b"ftyp"                                   # mp4 / mov / m4v
            or head[:4] == b"\x1a\x45\xdf\xa3"                    # webm / mkv
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI "))  # avi


def media_kind(path: PathLike) -> str:
    """'image' or 'video' for a file, by extension and, where that is ambiguous, by content.

    An animated GIF (or WebP/APNG) with more than one frame is a video; with one frame, an image.
    A file whose extension is unknown is sniffed.  Anything else raises :class:`MediaError`.
    """
    p = _check_file(path)
    ext = p.suffix.lower()
    if ext in VIDEO_EXTS:
        return "video"
    if ext in IMAGE_EXTS and ext not in _MAYBE_ANIMATED_EXTS:
        return "image"
    # ambiguous (GIF/WebP/PNG) or unknown extension: look inside
    try:
        with Image.open(p) as im:
            return "video" if _n_frames(im) > 1 else "image"
    except Exception:
        pass
    if _sniff_video(p):
        return "video"
    allowed = ", ".join(sorted(IMAGE_EXTS | VIDEO_EXTS))
    raise MediaError(f"{_describe(path)} is not a supported image or video "
                     f"(supported: {allowed}).")


# --------------------------------------------------------------------------------------------
# images


def load_image(path_or_bytes: PathOrBytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one image to RGB.

    Alpha is composited on white, JPEG EXIF orientation is applied, an animated file gives its
    first frame.  Missing, empty, corrupt, truncated or oversized input raises MediaError.
    """
    what = _describe(path_or_bytes)
    im = _open_pil(path_or_bytes, max_pixels)
    try:
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im) or im
        return _to_rgb(im)
    except MediaError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise MediaError(f"Image {what} is corrupt or truncated: {exc}.") from exc


# --------------------------------------------------------------------------------------------
# videos


@dataclass
class VideoClip:
    """Frames sampled from a video, in time order, with their times in seconds."""

    frames: list[Image.Image]
    timestamps: list[float]
    fps: float
    duration: float
    source: str
    total_frames: int = field(default=0)


def _segment_centres(n_total: int, n_pick: int) -> list[int]:
    """Indices of the centres of ``n_pick`` equal segments of ``n_total`` frames."""
    return [min(n_total - 1, int((i + 0.5) * n_total / n_pick)) for i in range(n_pick)]


def _sample_indices(n_total: int, times: list[float] | None, num_frames: int, fps: float | None,
                    max_frames: int, native_fps: float) -> list[int]:
    if fps is None:
        return _segment_centres(n_total, max(1, min(num_frames, max_frames)))
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if times is None:
        times = [i / native_fps for i in range(n_total)]
    duration = times[-1] + (1.0 / native_fps if native_fps > 0 else 0.0)
    wanted = [k / fps for k in range(max(1, math.ceil(duration * fps - 1e-9)))][:max_frames]
    out, j = [], 0
    for t in wanted:  # last frame shown at or before t
        while j + 1 < n_total and times[j + 1] <= t + 1e-9:
            j += 1
        out.append(j)
    return out


def _cv2():
    # Keep FFmpeg's own complaints about broken files off the user's terminal; we raise instead.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2

    return cv2


def _open_cv2(path: Path):
    cv2 = _cv2()
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        return None, 0, 0.0
    native_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    if not math.isfinite(native_fps) or native_fps <= 0 or native_fps > 1000:
        native_fps = 0.0
    n_prop = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    n_prop = int(n_prop) if math.isfinite(n_prop) and 0 < n_prop < 10_000_000 else 0
    return cap, n_prop, native_fps


def _grab_selected(path: Path, wanted: list[int]):
    """One decoding pass keeping only the frames whose index is in ``wanted``.

    Returns (frames by index, their timestamps in seconds, frames seen before stopping, reached
    the end of the stream)."""
    cv2 = _cv2()
    cap, _, _ = _open_cv2(path)
    if cap is None:
        return {}, {}, 0, True
    want, last = set(wanted), max(wanted)
    got, times, i = {}, {}, 0
    try:
        while i <= last:
            if not cap.grab():
                return got, times, i, True
            if i in want:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    return got, times, i, True
                got[i] = frame
                times[i] = float(cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0) / 1000.0
            i += 1
        return got, times, i, False
    finally:
        cap.release()


def _count_frames(path: Path) -> int:
    cap, _, _ = _open_cv2(path)
    if cap is None:
        return 0
    n = 0
    try:
        while cap.grab():
            n += 1
    finally:
        cap.release()
    return n


def _read_cv2(path: Path, num_frames: int, fps: float | None, max_frames: int):
    """Sampled frames (RGB PIL), timestamps, native fps and frame count via OpenCV.

    Never holds more than the sampled frames in memory.  Uses the container's frame count when
    it has one and re-reads once with the true count when that turns out wrong.  None when
    OpenCV cannot open the file or decode a single frame."""
    cap, n, native_fps = _open_cv2(path)
    if cap is None:
        return None
    cap.release()
    if n <= 0:
        n = _count_frames(path)
        if n == 0:
            return None
    for _attempt in range(2):
        rate = native_fps or 25.0
        idx = _sample_indices(n, None, num_frames, fps, max_frames, rate)
        got, times, seen, at_end = _grab_selected(path, sorted(set(idx)))
        if len(got) == len(set(idx)):
            break
        if seen == 0:
            return None
        n = seen  # the container over-counted: sample again over the frames that exist
    else:
        return None
    ts = [times[i] for i in idx]
    ordered = all(b >= a for a, b in zip(ts, ts[1:]))
    if not ordered or len(set(ts)) < len(set(idx)):  # container times unusable
        ts = [i / (native_fps or 25.0) for i in idx]
    if native_fps <= 0:
        span = ts[-1] - ts[0]
        native_fps = (idx[-1] - idx[0]) / span if span > 0 else 25.0
    frames = {i: Image.fromarray(got[i][:, :, ::-1].copy()) for i in set(idx)}  # BGR -> RGB
    return [frames[i] for i in idx], ts, native_fps, n


def _read_pil(path: Path, num_frames: int, fps: float | None, max_frames: int):
    """Like :func:`_read_cv2` through Pillow (animated GIF / WebP / PNG); decodes only the
    sampled frames to RGB.  None when Pillow cannot read the file."""
    try:
        im = _open_pil(path, DEFAULT_MAX_PIXELS)
    except MediaError:
        return None
    with im:
        times, t = [], 0.0
        try:
            for i in range(_n_frames(im)):
                im.seek(i)
                times.append(t)
                t += max(float(im.info.get("duration", 100) or 100), 10.0) / 1000.0
        except (OSError, EOFError, ValueError, struct.error):
            pass
        n = len(times)
        if n == 0:
            return None
        native_fps = n / t if t > 0 else 10.0
        idx = _sample_indices(n, times, num_frames, fps, max_frames, native_fps)
        decoded = {}
        try:
            for i in sorted(set(idx)):
                im.seek(i)
                decoded[i] = _to_rgb(im.copy())
        except (OSError, EOFError, ValueError, struct.error):
            return None
    return [decoded[i] for i in idx], [times[i] for i in idx], native_fps, n


def load_video(path: PathLike, num_frames: int = 8, fps: float | None = None,
               max_frames: int = 64) -> VideoClip:
    """Sample frames from a video file.

    Without ``fps``: ``num_frames`` frames at the centres of equal segments of the whole clip
    (a clip shorter than that repeats frames, so the count is always ``num_frames``).  With
    ``fps``: one frame every ``1/fps`` seconds from the start, at most ``max_frames``.
    Frames are RGB, in time order; ``timestamps`` are their times in seconds.
    """
    p = _check_file(path)
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    ext = p.suffix.lower()
    if ext in IMAGE_EXTS and ext not in _MAYBE_ANIMATED_EXTS:
        raise MediaError(f"{_describe(path)} is an image, not a video.")

    raw = None if ext in (".webp", ".png") else _read_cv2(p, num_frames, fps, max_frames)
    if raw is not None:  # OpenCV cannot animate WebP / APNG; Pillow reads those and odd GIFs
        frames, ts, native_fps, n = raw
    else:
        raw = _read_pil(p, num_frames, fps, max_frames)
        if raw is None:
            if ext in IMAGE_EXTS or ext in VIDEO_EXTS:
                raise MediaError(f"Video {_describe(path)} is broken or unreadable "
                                 f"(no frame could be decoded).")
            raise MediaError(f"{_describe(path)} is not a video file.")
        frames, ts, native_fps, n = raw
    if n == 1 and ext in IMAGE_EXTS:
        raise MediaError(f"{_describe(path)} is a still image (one frame), not a video.")
    duration = max(n / native_fps if native_fps > 0 else 0.0, ts[-1])
    return VideoClip(frames=frames, timestamps=[float(t) for t in ts], fps=float(native_fps),
                     duration=float(duration), source=str(path), total_frames=n)


# --------------------------------------------------------------------------------------------
# either


def load_media(path: PathLike, num_frames: int = 8) -> list[Image.Image]:
    """One media item as a list of frames: an image gives ``[img]``, a video its sampled frames."""
    if media_kind(path) == "video":
        return load_video(path, num_frames=num_frames).frames
    return [load_image(path)]


def content_hash(path_or_bytes: PathOrBytes) -> str:
    """SHA-256 hex digest of the file's bytes (for caches and content-addressed storage)."""
    h = hashlib.sha256()
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        h.update(path_or_bytes)
        return h.hexdigest()
    if isinstance(path_or_bytes, (str, os.PathLike)):
        p = Path(os.fspath(path_or_bytes))
        if not p.is_file():
            raise MediaError(f"Media file {_describe(path_or_bytes)} does not exist.")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    pos = path_or_bytes.tell() if hasattr(path_or_bytes, "tell") else None
    for chunk in iter(lambda: path_or_bytes.read(1 << 20), b""):
        h.update(chunk)
    if pos is not None and hasattr(path_or_bytes, "seek"):
        path_or_bytes.seek(pos)
    return h.hexdigest()
