"""RICES: retrieval-based in-context example selection.

For each query image, the k examples of a set whose media embed closest to it (cosine of the
engine's pooled vision embeddings). Embeddings are cached by content hash, so each file is
embedded once per process.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch

from app.store import ExampleRecord, MediaRecord

log = logging.getLogger(__name__)

Embedder = Callable[[str], torch.Tensor]


class ExampleSelector:
    def __init__(self, embed: Embedder):
        self._embed = embed
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def embedding(self, media: MediaRecord) -> torch.Tensor:
        with self._lock:
            cached = self._cache.get(media.sha256)
        if cached is not None:
            return cached
        vec = self._embed(str(media.path)).detach().float().flatten().cpu()
        vec = vec / vec.norm().clamp_min(1e-8)
        with self._lock:
            self._cache[media.sha256] = vec
        return vec

    def nearest(
        self, examples: Sequence[ExampleRecord], queries: Sequence[MediaRecord], k: int
    ) -> list[ExampleRecord]:
        """The union of each query's top-k, least similar first (the closest sits next to the query)."""
        if not examples or not queries or k <= 0:
            return list(examples)
        bank = torch.stack([self.embedding(e.media) for e in examples])
        best: dict[int, float] = {}
        for query in queries:
            sims = bank @ self.embedding(query)
            top = torch.topk(sims, min(k, len(examples)))
            for score, index in zip(top.values.tolist(), top.indices.tolist()):
                best[index] = max(score, best.get(index, -2.0))
        chosen = sorted(best, key=lambda i: best[i])
        log.info("RICES picked examples %s for %d query media", [examples[i].id for i in chosen], len(queries))
        return [examples[i] for i in chosen]
