"""Plain records the store hands out (frozen dataclasses, safe to pass between threads)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


class NotFound(LookupError):
    """A session, turn, example set or example that does not exist (any more)."""


class Conflict(ValueError):
    """A change that would break a uniqueness rule, e.g. two example sets with one name."""


@dataclass(frozen=True)
class MediaInput:
    """A validated file to be stored: where it is now, what it is, what the user called it."""

    path: str
    kind: str  # "image" | "video"
    orig_name: str = ""


@dataclass(frozen=True)
class MediaRecord:
    sha256: str
    kind: str
    ext: str
    size: int
    orig_name: str
    path: Path


@dataclass(frozen=True)
class SessionInfo:
    id: str
    title: str
    example_set_id: int | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class TurnRecord:
    id: int
    position: int
    role: str
    text: str
    status: str
    media: list[MediaRecord] = field(default_factory=list)
    error: str | None = None
    finish_reason: str | None = None
    dropped_turns: int = 0
    prefix: list[dict] | None = None


@dataclass(frozen=True)
class ReplyRecord:
    """What the service saves when a reply ends."""

    text: str
    status: str  # "complete" | "stopped" | "failed"
    error: str | None = None
    finish_reason: str | None = None
    dropped_turns: int = 0
    prefix: list[dict] | None = None


@dataclass(frozen=True)
class ExampleSetInfo:
    id: int
    name: str
    size: int


@dataclass(frozen=True)
class ExampleRecord:
    id: int
    set_id: int
    position: int
    text: str
    media: MediaRecord
