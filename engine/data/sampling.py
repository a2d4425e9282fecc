"""From a Record to a training sequence, as the paper samples each kind of data; labels; batches.

* interleaved (M3W): a random subsequence of ``max_tokens`` (256) tokens of the document, and
  up to the first ``max_images`` (5) images whose markers fall inside it; later markers in the
  window are removed with their images, so markers and media always match one to one. The
  window is drawn among those holding at least one image when the document has one (a window
  without images trains nothing: text before the first image carries no label).
* pairs (ALIGN/LTIP): ``<image>caption<EOC>``, cut to ``max_tokens``.
* video (VTP): the same, the media being a video sampled into T frames (elsewhere).

Labels are the input ids with -100 on padding, on ``<image>`` tokens and on every token before
the first ``<image>``; the model shifts them (position i predicts label i+1). With
``mask_new_words``, also -100 on the first mention, within the sampled sequence, of each made-up
word a record introduces (``Record.new_words``): no model can predict a name it has never seen,
and in the naming episodes those tokens carried over half of the loss (2.9 nats a token against
1.4 for a name shown before, measured on the built-in model), noise that drowned the signal of
the names that can be read from the context. With ``answers_only``, labels fall only on the
answers ("Question: q Answer: a<EOC>": the tokens of " a<EOC>"), as VQA fine-tuning usually does:
a question names the things in the picture, and its tokens outnumber a one-word answer's
many times over.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..tokens import bos_prefix
from .readers import EOC_TOKEN, MEDIA_TOKEN, Record

IGNORE = -100


@dataclass
class Sample:
    input_ids: list[int]
    media: list[Path]
    no_loss: list[bool] | None = None  # per token: left out of the labels (new words' first mentions, non-answers)


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
                 seed: int = 0, add_bos: bool | None = None, mask_new_words: bool = False,
                 answers_only: bool = False):
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        if (mask_new_words or answers_only) and not getattr(tokenizer, "is_fast", False):
            raise ValueError("mask_new_words and answers_only need a fast tokenizer (character offsets of each token)")
        self.tokenizer, self.media_token_id, self.kind = tokenizer, media_token_id, kind
        self.max_tokens, self.max_images = max_tokens, max_images
        self.mask_new_words, self.answers_only = mask_new_words, answers_only
        if add_bos is None:  # auto: as the tokenizer itself does on a plain encode
            self.bos = bos_prefix(tokenizer)
        else:
            bos = getattr(tokenizer, "bos_token_id", None)
            self.bos = [bos] if (add_bos and bos is not None) else []
        self.rng = random.Random(seed)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, record: Record) -> Sample:
        masking = (self.mask_new_words and bool(record.new_words)) or self.answers_only
        enc = self.tokenizer(record.text, add_special_tokens=False, return_offsets_mapping=masking)
        ids = enc["input_ids"]
        n_markers = sum(1 for t in ids if t == self.media_token_id)
        if n_markers != len(record.media):
            raise ValueError(f"record has {len(record.media)} media but its text tokenises to {n_markers} markers: {record.text[:80]!r}")
        if self.kind == "interleaved":
            window = window_positions(ids, self.media_token_id, self.rng, self.max_tokens)
        else:
            window = range(min(len(ids), self.max_tokens))
        kept = cap_positions(ids, window, self.media_token_id, self.max_images)
        first = sum(1 for t in ids[:window.start] if t == self.media_token_id)  # media before the window
        n_media = sum(1 for p in kept if ids[p] == self.media_token_id)
        media = list(record.media[first:first + n_media])
        no_loss = None
        if masking:
            offsets = [enc["offset_mapping"][p] for p in kept]
            no_loss = first_mentions(offsets, record.text, record.new_words if self.mask_new_words else ())
            if self.answers_only:
                no_loss = [a or b for a, b in zip(no_loss, outside_answers(offsets, record.text))]
        out = [ids[p] for p in kept]
        bos = self.bos if out[:1] != self.bos else []  # a record may already start with it
        if no_loss is not None:
            no_loss = [False] * len(bos) + no_loss
        return Sample(bos + out, media, no_loss)

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        st = state["rng"]
        self.rng.setstate((st[0], tuple(st[1]), st[2]))


def window_positions(ids: list[int], media_token_id: int, rng: random.Random, max_tokens: int = 256) -> range:
    """A random `max_tokens` window of a document, among those holding an image when it has one."""
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
    return range(start, min(n, start + max_tokens))


def cap_positions(ids: list[int], positions, media_token_id: int, max_images: int) -> list[int]:
    """`positions` without the markers after the first `max_images` of them."""
    out, kept = [], 0
    for p in positions:
        if ids[p] == media_token_id:
            if kept >= max_images:
                continue
            kept += 1
        out.append(p)
    return out


def sample_window(ids: list[int], media: list, media_token_id: int, rng: random.Random, max_tokens: int = 256,
                  max_images: int = 5) -> tuple[list[int], list]:
    """A random `max_tokens` window of a document, with up to its first `max_images` images."""
    window = window_positions(ids, media_token_id, rng, max_tokens)
    first = sum(1 for t in ids[:window.start] if t == media_token_id)  # media before the window
    return cap_images([ids[p] for p in window], media[first:], media_token_id, max_images)


def cap_images(ids: list[int], media: list, media_token_id: int, max_images: int) -> tuple[list[int], list]:
    """Keeps the first `max_images` markers of `ids` (and as many media, in order); removes the
    markers after them. `media` starts at the first marker of `ids`."""
    kept = cap_positions(ids, range(len(ids)), media_token_id, max_images)
    out = [ids[p] for p in kept]
    return out, list(media[:sum(1 for t in out if t == media_token_id)])


def first_mentions(offsets: list[tuple[int, int]], text: str, words: tuple[str, ...]) -> list[bool]:
    """Per token (its character span in `text`): True on the tokens of each word's first whole-word
    occurrence among these tokens (a word whose earlier mention fell outside a sampled window is
    new to the window too)."""
    hit = [False] * len(offsets)
    for word in words:
        for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", text):
            inside = [i for i, (a, b) in enumerate(offsets) if a < m.end() and b > m.start()]
            if inside:
                for i in inside:
                    hit[i] = True
                break
    return hit


ANSWER = re.compile(rf"Answer:(.*?)({re.escape(EOC_TOKEN)}|{re.escape(MEDIA_TOKEN)}|$)", re.DOTALL)


def outside_answers(offsets: list[tuple[int, int]], text: str) -> list[bool]:
    """Per token (its character span in `text`): True unless it is part of an answer, the text
    after an "Answer:" up to and including the chunk's <EOC> (not a following <image>)."""
    spans = [(m.start(1), m.end(2) if m.group(2) == EOC_TOKEN else m.end(1)) for m in ANSWER.finditer(text)]
    return [not any(a < end and b > start for start, end in spans) for a, b in offsets]


def make_labels(input_ids: list[int], media_token_id: int, no_loss: list[bool] | None = None) -> list[int]:
    """-100 on <image> tokens, everything before the first <image> and the `no_loss` tokens; the
    ids elsewhere."""
    labels, seen = [], False
    for i, t in enumerate(input_ids):
        if t == media_token_id:
            seen = True
            labels.append(IGNORE)
        else:
            labels.append(t if seen and not (no_loss and no_loss[i]) else IGNORE)
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
        labels[i, :n] = torch.tensor(make_labels(s.input_ids, media_token_id, s.no_loss))
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
