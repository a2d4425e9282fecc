"""Checking uploads before anything is stored: size, kind, and that they really decode."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from app.config import UploadLimits
from app.store import MediaInput
from engine.media import IMAGE_EXTS, MediaError, load_image, load_video, media_kind

log = logging.getLogger(__name__)


class InputRejected(ValueError):
    """An upload the app will not use; the message is meant for the user."""


def check_uploads(
    paths: Sequence[str | Path], limits: UploadLimits, num_frames: int = 8
) -> list[MediaInput]:
    """Every file checked, or InputRejected for the first bad one (nothing is stored here)."""
    if len(paths) > limits.max_files:
        raise InputRejected(f"Too many files ({len(paths)}); at most {limits.max_files} per message.")
    return [check_upload(Path(p), limits, num_frames) for p in paths]


def check_upload(path: Path, limits: UploadLimits, num_frames: int) -> MediaInput:
    name = path.name
    if not path.is_file():
        raise InputRejected(f"`{name}` could not be found on the server; please upload it again.")
    size = path.stat().st_size
    if size == 0:
        raise InputRejected(f"`{name}` is empty.")
    if size > limits.max_bytes:
        raise InputRejected(
            f"`{name}` is {size / 2**20:.1f} MB; the limit is {limits.max_mb:.0f} MB per file."
        )
    kind = _kind(path)
    _decode(path, kind, num_frames)
    return MediaInput(str(path), kind, name)


def _user_message(path: Path, exc: Exception) -> str:
    """The decoder's message without the server-side folder."""
    return str(exc).replace(str(path), path.name).strip()


def _kind(path: Path) -> str:
    try:
        return media_kind(str(path))
    except MediaError as exc:
        log.info("rejected %s: %s", path.name, exc)
        if path.suffix.lower() in IMAGE_EXTS:  # looks like an image: say what is wrong with it
            _decode(path, "image", 1)
        raise InputRejected(f"`{path.name}` cannot be used: {_user_message(path, exc)}") from exc


def _decode(path: Path, kind: str, num_frames: int) -> None:
    try:
        if kind == "image":
            load_image(str(path))
        else:
            load_video(str(path), num_frames)
    except Exception as exc:  # a decoder may raise anything on hostile bytes
        log.info("rejected %s: cannot decode %s: %s", path.name, kind, exc)
        raise InputRejected(
            f"`{path.name}` could not be read as {_article(kind)}: {_user_message(path, exc)}"
        ) from exc


def _article(kind: str) -> str:
    return "an image" if kind == "image" else "a video"
