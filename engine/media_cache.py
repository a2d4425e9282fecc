"""Media files -> visual tokens, cached by content hash.

`MediaEncoder.encode(path, num_frames)` decodes an image or samples a video (engine.media), runs
the frozen vision tower and the Perceiver Resampler, and keeps the result in a bounded LRU keyed by
the file's SHA-256 (and the number of frames for a video), so a picture sent again, in the same
or another conversation, costs nothing. A video is one media item of T frames (T = num_frames,
at most the resampler's max_frames: longer requests are sampled down).

`MediaEncoder.embedding(path)` is the mean-pooled frozen feature vector (for RICES example
selection); it has its own, larger LRU because it is small and asked for in bulk.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import media as media_io
from .device import Placement
from .vision import images_to_tensor

log = logging.getLogger(__name__)

EMBEDDING_FRAMES = 8  # frames of a video pooled into its embedding


@dataclass
class MediaItem:
    """One encoded media item."""

    key: tuple[str, int]  # (content hash, frames)
    kind: str  # "image" or "video"
    visual: torch.Tensor  # (R, d) resampled tokens, on the model's device
    pooled: torch.Tensor  # (d_vision,) mean of the frozen features, float32 on CPU
    timestamps: list[float] = field(default_factory=list)  # seconds, one per frame

    @property
    def num_frames(self) -> int:
        return self.key[1]

    @property
    def nbytes(self) -> int:
        return self.visual.numel() * self.visual.element_size() + self.pooled.numel() * 4


class LRUCache:
    """A thread-safe LRU bounded by entry count and total bytes (`size(value)`)."""

    def __init__(self, max_items: int, max_bytes: int | None = None, size=lambda v: 0):
        self.max_items = max(0, int(max_items))
        self.max_bytes = max_bytes
        self._size = size
        self._data: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key, value) -> None:
        if self.max_items == 0:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            self._data[key] = value
            self._bytes += self._size(value)
            while len(self._data) > self.max_items or (self.max_bytes is not None and self._bytes > self.max_bytes and len(self._data) > 1):
                _, evicted = self._data.popitem(last=False)
                self._bytes -= self._size(evicted)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def stats(self) -> dict:
        return {"items": len(self._data), "bytes": self._bytes, "hits": self.hits, "misses": self.misses}


class FileHasher:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) so a conversation's history
    is not re-read every turn."""

    def __init__(self, max_items: int = 4096):
        self._memo = LRUCache(max_items)

    def __call__(self, path: str | os.PathLike) -> str:
        p = Path(os.fspath(path))
        try:
            st = p.stat()
        except OSError:
            return media_io.content_hash(p)  # raises the MediaError that names the problem
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        digest = self._memo.get(key)
        if digest is None:
            digest = media_io.content_hash(p)
            self._memo.put(key, digest)
        return digest


class MediaEncoder:
    """Decodes, encodes and caches media for one model. Thread-safe."""

    def __init__(self, model, placement: Placement, cache_size: int = 256, cache_bytes: int = 512 << 20, embedding_cache_size: int = 8192):
        self.model = model
        self.placement = placement
        self.max_frames = int(model.config.resampler.max_frames)
        self.items = LRUCache(cache_size, cache_bytes, size=lambda item: item.nbytes)
        self.embeddings = LRUCache(embedding_cache_size if cache_size else 0)
        self.hash = FileHasher()

    def frames_for(self, num_frames: int) -> int:
        return max(1, min(int(num_frames), self.max_frames))

    # -- decoding --
    def _load(self, path, num_frames: int) -> tuple[str, list, list[float]]:
        kind = media_io.media_kind(path)
        if kind == "video":
            clip = media_io.load_video(path, num_frames=num_frames)
            if not clip.frames:
                raise media_io.MediaError(f"Video '{path}' gave no frames.")
            return kind, clip.frames, list(clip.timestamps)
        return kind, [media_io.load_image(path)], [0.0]

    def _features(self, frames) -> torch.Tensor:
        """PIL frames -> (1, T, S, d_vision) frozen features."""
        pixels = images_to_tensor(frames, self.model.vision.image_size)  # (T, 3, H, W)
        pixels = pixels.to(device=self.placement.device, dtype=self.placement.dtype)
        with torch.no_grad():
            return self.model.vision(pixels[None])

    # -- public --
    def encode(self, path, num_frames: int = 8) -> MediaItem:
        """The visual tokens of one media file (an image, or a video sampled into T frames)."""
        digest = self.hash(path)
        frames_wanted = self.frames_for(num_frames)
        if num_frames > self.max_frames:
            log.debug("asked for %d frames; the resampler takes at most %d", num_frames, self.max_frames)
        item = self.items.get((digest, frames_wanted))
        if item is None and frames_wanted != 1:
            item = self.items.get((digest, 1))  # an image is cached as one frame, whatever was asked
            item = item if item is not None and item.kind == "image" else None
        if item is not None:
            return item
        kind, frames, timestamps = self._load(path, frames_wanted)
        features = self._features(frames)  # (1, T, S, d)
        with torch.no_grad():
            visual = self.model.resample(features[:, None])[0, 0]  # (R, d)
        pooled = features.float().mean(dim=(0, 1, 2)).cpu()
        item = MediaItem((digest, len(frames)), kind, visual, pooled, timestamps)
        self.items.put(item.key, item)
        if kind == "image" or len(frames) == self.frames_for(EMBEDDING_FRAMES):
            self.embeddings.put(digest, pooled)  # the same vector `embedding` would compute
        return item

    def embedding(self, path) -> torch.Tensor:
        """(d_vision,) mean-pooled frozen features, float32 on CPU (a video: over EMBEDDING_FRAMES frames)."""
        digest = self.hash(path)
        pooled = self.embeddings.get(digest)
        if pooled is None:
            _, frames, _ = self._load(path, self.frames_for(EMBEDDING_FRAMES))
            pooled = self._features(frames).float().mean(dim=(0, 1, 2)).cpu()
            self.embeddings.put(digest, pooled)
        return pooled

    def clear(self) -> None:
        self.items.clear()
        self.embeddings.clear()
