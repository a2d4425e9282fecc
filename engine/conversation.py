"""The conversation: what the app hands the engine, in plain data.

A conversation is an optional few-shot prefix (examples of media + text) followed by turns.
Media are file paths; the engine decodes and caches them by content hash.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Example:
    """One few-shot example: media items and the text that goes with them.

    `text` is what follows the media, e.g. "A red apple." or "Question: ... Answer: ...".
    """

    media: list[str]
    text: str


@dataclass
class Turn:
    role: Literal["user", "assistant"]
    text: str
    media: list[str] = field(default_factory=list)


@dataclass
class Conversation:
    examples: list[Example] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.1
    no_repeat_ngram_size: int = 4
    num_frames: int = 8  # frames sampled per video
    seed: int | None = None
