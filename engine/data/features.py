"""A disk cache of the frozen vision tower's features, one file per media item.

The tower is frozen during Flamingo training, so its features for a media file never change:
compute them once (fp16 on disk, (T, S, d): T = 1 for an image, the sampled frames for a video)
and train from them through `model.resample`. Keys name the media file (absolute path + mtime +
size, or its content hash with ``key="content"``), the tower (a fingerprint of its weights, so an
adapted tower never reads stale features), the image size and the frame count.

Images use the fixed preprocessing of `images_to_tensor` at the tower's image size (a centre
crop and resize); videos are sampled with `load_video(path, num_frames)`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

from ..media import MediaError, content_hash, load_image, load_video, media_kind
from ..vision import VisionTower, images_to_tensor

log = logging.getLogger(__name__)


def tower_fingerprint(tower: VisionTower) -> str:
    h = hashlib.sha1(f"{type(tower).__name__}|{getattr(tower, 'name', '')}|{tower.image_size}|{tower.feature_dim}".encode())
    for name, t in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_pixels(path: str | Path, image_size: int, num_frames: int = 8, kind: str | None = None) -> torch.Tensor:
    """One media file -> (T, 3, H, W) pixels in [0, 1]; T = 1 for an image."""
    kind = kind or media_kind(path)
    frames = load_video(path, num_frames=num_frames).frames if kind == "video" else [load_image(path)]
    return images_to_tensor(frames, image_size)


class FeatureCache:
    def __init__(self, directory: str | Path, tower: VisionTower, num_frames: int = 8, key: str = "mtime",
                 batch_size: int = 32, device: torch.device | str = "cpu"):
        if key not in ("mtime", "content"):
            raise ValueError(f"feature cache key must be 'mtime' or 'content', got {key!r}")
        self.tower, self.num_frames, self.key_mode = tower, num_frames, key
        self.batch_size, self.device = batch_size, torch.device(device)
        self.fingerprint = tower_fingerprint(tower)
        self.dir = Path(directory) / self.fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    # ----- keys ---------------------------------------------------------------------------
    def key(self, path: str | Path) -> str:
        p = Path(path).resolve()
        if self.key_mode == "content":
            ident = content_hash(p)
        else:
            try:
                st = p.stat()
            except OSError as e:
                raise MediaError(f"Media file {p} does not exist.") from e
            ident = f"{p}|{st.st_mtime_ns}|{st.st_size}"
        return hashlib.sha1(f"{ident}|{self.tower.image_size}|{self.num_frames}".encode()).hexdigest()

    def file_for(self, path: str | Path) -> Path:
        k = self.key(path)
        return self.dir / k[:2] / f"{k}.safetensors"

    # ----- reading ------------------------------------------------------------------------
    def get(self, path: str | Path, kind: str | None = None) -> torch.Tensor:
        """(T, S, d) fp16 features of one media file; computed and stored on a miss."""
        f = self.file_for(path)
        if f.is_file():
            self.hits += 1
            return load_file(f)["features"]
        self.misses += 1
        feats = self._compute([(Path(path), kind)])[0]
        self._store(f, feats)
        return feats

    def get_many(self, paths: list[str | Path], kind: str | None = None) -> dict[Path, torch.Tensor | None]:
        """Features of several files; the misses are computed together in one tower call and
        stored. An unreadable file maps to None (logged)."""
        out: dict[Path, torch.Tensor | None] = {}
        todo: list[tuple[Path, torch.Tensor]] = []
        for p in dict.fromkeys(Path(x) for x in paths):
            try:
                f = self.file_for(p)
                if f.is_file():
                    self.hits += 1
                    out[p] = load_file(f)["features"]
                    continue
                todo.append((p, load_pixels(p, self.tower.image_size, self.num_frames, kind)))
            except (MediaError, OSError) as e:
                log.warning("unreadable media %s: %s", p, e)
                out[p] = None
        if todo:
            self.misses += len(todo)
            for (p, _), feats in zip(todo, self._encode([px for _, px in todo])):
                self._store(self.file_for(p), feats)
                out[p] = feats
        return out

    # ----- building -----------------------------------------------------------------------
    def missing(self, paths: Iterable[str | Path]) -> list[Path]:
        out, seen = [], set()
        for p in paths:
            p = Path(p)
            if p in seen:
                continue
            seen.add(p)
            try:
                if not self.file_for(p).is_file():
                    out.append(p)
            except MediaError:
                out.append(p)  # reported when computed
        return out

    def build(self, paths: Iterable[str | Path], kinds: dict | None = None, rank: int = 0, world: int = 1,
              progress: bool = True) -> dict:
        """Computes the features of every file not yet cached (this rank's share of them).
        Returns counts; unreadable files are logged and skipped (training skips their records)."""
        from tqdm.auto import tqdm

        todo = self.missing(paths)[rank::world]
        kinds = kinds or {}
        done = failed = 0
        bar = tqdm(total=len(todo), desc="vision features", unit="file", disable=not progress or not todo, dynamic_ncols=True)
        images, videos = [], []
        for p in todo:
            k = kinds.get(p) or kinds.get(str(p))
            (videos if k == "video" else images).append((p, k))
        for group, step in ((images, self.batch_size), (videos, max(1, self.batch_size // max(1, self.num_frames)))):
            for i in range(0, len(group), step):
                chunk = group[i : i + step]
                ok = []
                for item in chunk:
                    try:
                        ok.append((item, load_pixels(item[0], self.tower.image_size, self.num_frames, item[1])))
                    except (MediaError, OSError) as e:
                        failed += 1
                        log.warning("skipping unreadable media %s: %s", item[0], e)
                if ok:
                    for (p, _), feats in zip((o[0] for o in ok), self._encode([px for _, px in ok])):
                        self._store(self.file_for(p), feats)
                        done += 1
                bar.update(len(chunk))
        bar.close()
        return {"computed": done, "failed": failed, "cached": self.dir.as_posix()}

    def _compute(self, items: list[tuple[Path, str | None]]) -> list[torch.Tensor]:
        return self._encode([load_pixels(p, self.tower.image_size, self.num_frames, k) for p, k in items])

    @torch.no_grad()
    def _encode(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """A list of (T, 3, H, W) -> a list of (T, S, d) fp16, batched by frame count."""
        out: list[torch.Tensor | None] = [None] * len(pixels)
        by_t: dict[int, list[int]] = {}
        for i, px in enumerate(pixels):
            by_t.setdefault(px.shape[0], []).append(i)
        for idx in by_t.values():
            x = torch.stack([pixels[i] for i in idx]).to(self.device)  # (B, T, 3, H, W)
            feats = self.tower(x).to("cpu", torch.float16)
            for j, i in enumerate(idx):
                out[i] = feats[j].contiguous()
        return out  # type: ignore[return-value]

    def _store(self, f: Path, feats: torch.Tensor) -> None:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        save_file({"features": feats.to(torch.float16).contiguous()}, tmp)
        os.replace(tmp, f)
