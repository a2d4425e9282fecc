"""Content-addressed media files: ``media/<sha[:2]>/<sha256><ext>``.

Files are written once (copy to a temporary name, then an atomic rename) and never changed,
so any number of turns and examples can share one file.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def normalized_ext(name: str) -> str:
    """The lower-case extension of `name` (with the dot), or "" when it has none."""
    ext = Path(name).suffix.lower()
    return ext if ext.isascii() and len(ext) <= 8 and ext[1:].isalnum() else ""


class BlobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha: str, ext: str) -> Path:
        return self.root / sha[:2] / f"{sha}{ext}"

    def put(self, src: str | Path, sha: str, ext: str) -> Path:
        """Copy `src` in under its hash; a file already there is kept as is."""
        dest = self.path_for(sha, ext)
        if dest.exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".incoming-")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("stored media %s (%d bytes)", dest.name, dest.stat().st_size)
        return dest

    def remove(self, sha: str, ext: str) -> None:
        path = self.path_for(sha, ext)
        try:
            path.unlink()
            log.info("removed media %s", path.name)
        except FileNotFoundError:
            pass
        _remove_if_empty(path.parent)

    def files(self) -> list[Path]:
        return [p for p in self.root.glob("*/*") if p.is_file()]


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
