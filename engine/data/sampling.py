"""From a Record to a training sequence, as the paper samples each kind of data; labels; batches.

* interleaved (M3W): a random subsequence of ``max_tokens`` (256) tokens of the document, and
  up to the first ``max_images`` (5) images whose markers fall inside it; later markers in the
  window are removed with their images, so markers and media always match one to one. The
  window is drawn among those holding at least one image when the document has one (a window
  without images trains nothing: text before the first image carries no label).
* pairs (ALIGN/LTIP): ``<image>caption<EOC>``, cut to ``max_tokens``.
* video (VTP): the same, the media being a video sampled into T frames (elsewhere).

Labels are the input ids with -100 on padding, on ``<image>`` tokens and on every token before
the first ``<image>``; the model shifts them (position i predicts label i+1).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..tokens import bos_prefix
from .readers import Record

IGNORE = -100


@dataclass
class Sample:
    input_ids: list[int]
    media: list[Path]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L)
    media: list[list[Path]] = field(default_factory=list)  # per row, in marker order

    @property
    def num_media(self) -> int:
        return max((len(m) for m in self.media), default=0)


class SequenceSampler:
    """Tokenises records and samples them the paper's way. Holds its own RNG (state saved in
    checkpoints) so a resumed run draws the same windows."""

    def __init__(self, tokenizer, media_token_id: int, kind: str, max_tokens: int = 256, max_images: int = 5,
                 seed: int = 0, add_bos: bool | None = None):
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.tokenizer, self.media_token_id, self.kind = tokenizer, media_token_id, kind
        self.max_tokens, self.max_images = max_tokens, max_images
        if add_bos is None:  # auto: as the tokenizer itself does on a plain encode
            self.bos = bos_prefix(tokenizer)
        else:
            bos = getattr(tokenizer, "bos_token_id", None)
            self.bos = [bos] if (add_bos and bos is not None) else []
        self.rng = random.Random(seed)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, record: Record) -> Sample:
        ids = self.encode(record.text)
        n_markers = sum(1 for t in ids if t == self.media_token_id)
        if n_markers != len(record.media):
            raise ValueError(f"record has {len(record.media)} media but its text tokenises to {n_markers} markers: {record.text[:80]!r}")
        if self.kind == "interleaved":
            ids, media = sample_window(ids, record.media, self.media_token_id, self.rng, self.max_tokens, self.max_images)
        else:
            ids, media = truncate(ids, record.media, self.media_token_id, self.max_tokens, self.max_images)
        bos = self.bos if ids[:1] != self.bos else []  # a record may already start with it
        return Sample(bos + ids, media)

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        st = state["rng"]
        self.rng.setstate((st[0], tuple(st[1]), st[2]))


def sample_window(ids: list[int], media: list, media_token_id: int, rng: random.Random, max_tokens: int = 256,
                  max_images: int = 5) -> tuple[list[int], list]:
    """A random `max_tokens` window of a document, with up to its first `max_images` images."""
    n = len(ids)
    start = 0
    if n > max_tokens:
        last = n - max_tokens
        marks = [i for i, t in enumerate(ids) if t == media_token_id]
        # starts whose window [s, s + max_tokens) holds a marker: the union of [p - L + 1, p]
        valid: set[int] = set()
        for p in marks:
            valid.update(range(max(0, p - max_tokens + 1), min(p, last) + 1))
        start = rng.choice(sorted(valid)) if valid else rng.randint(0, last)
    window = ids[start : start + max_tokens]
    first = sum(1 for t in ids[:start] if t == media_token_id)  # media before the window
    return cap_images(window, media[first:], media_token_id, max_images)


def truncate(ids: list[int], media: list, media_token_id: int, max_tokens: int, max_images: int) -> tuple[list[int], list]:
    return cap_images(ids[:max_tokens], media, media_token_id, max_images)


def cap_images(ids: list[int], media: list, media_token_id: int, max_images: int) -> tuple[list[int], list]:
    """Keeps the first `max_images` markers of `ids` (and as many media, in order); removes the
    markers after them. `media` starts at the first marker of `ids`."""
    out, kept = [], 0
    for t in ids:
        if t == media_token_id:
            if kept >= max_images:
                continue
            kept += 1
        out.append(t)
    return out, list(media[:kept])


def make_labels(input_ids: list[int], media_token_id: int) -> list[int]:
    """-100 on <image> tokens and everything before the first <image>; the ids elsewhere."""
    labels, seen = [], False
    for t in input_ids:
        if t == media_token_id:
            seen = True
            labels.append(IGNORE)
        else:
            labels.append(t if seen else IGNORE)
    return labels


def collate(samples: list[Sample], pad_id: int, media_token_id: int) -> Batch:
    """Right-pads to the longest sequence; padding is masked out of attention and labels."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(make_labels(s.input_ids, media_token_id))
    return Batch(ids, mask, labels, [list(s.media) for s in samples])


def stack_media(per_row: list[list[torch.Tensor]], num_media: int) -> torch.Tensor:
    """Per-row lists of per-media tensors (T, ...) -> (B, N, T, ...), zero-padded where a row has
    fewer media (padding media are never attended: no marker points at them)."""
    example = next((m for row in per_row for m in row), None)
    if example is None:
        raise ValueError("no media in the batch")
    out = example.new_zeros((len(per_row), num_media, *example.shape))
    for i, row in enumerate(per_row):
        for j, m in enumerate(row):
            if m.shape != example.shape:
                raise ValueError(f"media of different shapes in one batch: {tuple(m.shape)} vs {tuple(example.shape)}")
            out[i, j] = m
    return out
