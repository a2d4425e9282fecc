"""Fixtures for the app's tests (store, service, browser). Loaded with
``pytest_plugins = ["conftest_app"]`` from the app's test modules."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.store import MediaInput, Store


class MediaFactory:
    """Writes small test files: images, videos, and broken ones."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._n = 0

    def _name(self, stem: str, ext: str) -> Path:
        self._n += 1
        return self.folder / f"{stem}-{self._n}{ext}"

    def image(self, color: tuple[int, int, int] = (200, 30, 30), size: int = 32, ext: str = ".png") -> Path:
        path = self._name("image", ext)
        Image.new("RGB", (size, size), color).save(path)
        return path

    def video(self, frames: int = 12, ext: str = ".webm", fourcc: str = "VP80") -> Path:
        import cv2

        path = self._name("video", ext)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 8, (64, 48))
        for i in range(frames):
            frame = np.zeros((48, 64, 3), np.uint8)
            frame[:, :, i % 3] = 40 + 10 * i
            writer.write(frame)
        writer.release()
        return path

    @staticmethod
    def stored(path: Path, kind: str = "image") -> MediaInput:
        """`path` as the store takes it."""
        return MediaInput(str(path), kind, path.name)

    def corrupt_image(self) -> Path:
        path = self._name("corrupt", ".png")
        good = self.image().read_bytes()
        path.write_bytes(good[:20] + b"\x00garbage" * 10)
        return path

    def text_file(self) -> Path:
        path = self._name("notes", ".txt")
        path.write_text("not an image at all\n")
        return path

    def empty_video(self) -> Path:
        path = self._name("empty", ".mp4")
        path.write_bytes(b"")
        return path

    def garbage_video(self) -> Path:
        path = self._name("garbage", ".mp4")
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13\x37" * 500)
        return path

    def big_file(self, megabytes: float) -> Path:
        path = self._name("big", ".png")
        Image.new("RGB", (16, 16)).save(path)
        with open(path, "ab") as fh:
            fh.write(b"\x00" * int(megabytes * 1024 * 1024))
        return path


@pytest.fixture
def media(tmp_path: Path) -> MediaFactory:
    return MediaFactory(tmp_path / "inputs")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    s = Store(data_dir)
    yield s
    s.close()


@pytest.fixture(scope="session")
def tiny_engine():
    """The real chat engine around the in-process tiny random-weight Flamingo (no downloads)."""
    from engine.chat import ChatEngine
    from engine.testing import tiny_model

    logging.getLogger("app").setLevel(logging.INFO)
    return ChatEngine(tiny_model())
