"""The database tables (SQLAlchemy 2.0 declarative ORM).

sessions 1─* turns *─* media (through turn_media, ordered)
example_sets 1─* examples *─1 media
Deleting a session deletes its turns and their media links (ON DELETE CASCADE); media rows and
files that nothing references any more are removed by ``Store.remove_orphans``.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class MediaRow(Base):
    __tablename__ = "media"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # "image" | "video"
    ext: Mapped[str] = mapped_column(String(8))
    size: Mapped[int] = mapped_column(Integer)
    orig_name: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SessionRow(Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    title: Mapped[str] = mapped_column(String(200))
    example_set_id: Mapped[int | None] = mapped_column(
        ForeignKey("example_sets.id", ondelete="SET NULL"), default=None
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    turns: Mapped[list[TurnRow]] = relationship(
        back_populates="session",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="TurnRow.position",
    )


class TurnRow(Base):
    __tablename__ = "turns"
    __table_args__ = (UniqueConstraint("session_id", "position"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))  # "user" | "assistant"
    text: Mapped[str] = mapped_column(Text, default="")
    # user turns: "complete"; replies: "complete" | "stopped" | "failed"
    status: Mapped[str] = mapped_column(String(16), default="complete")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    finish_reason: Mapped[str | None] = mapped_column(String(16), default=None)
    dropped_turns: Mapped[int] = mapped_column(Integer, default=0)
    prefix_json: Mapped[str | None] = mapped_column(Text, default=None)  # examples in the prompt
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    session: Mapped[SessionRow] = relationship(back_populates="turns")
    media_links: Mapped[list[TurnMediaRow]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="TurnMediaRow.position"
    )


class TurnMediaRow(Base):
    __tablename__ = "turn_media"

    turn_id: Mapped[int] = mapped_column(
        ForeignKey("turns.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    media_sha: Mapped[str] = mapped_column(ForeignKey("media.sha256", ondelete="RESTRICT"))

    media: Mapped[MediaRow] = relationship(lazy="joined")


Index("ix_turn_media_sha", TurnMediaRow.media_sha)


class ExampleSetRow(Base):
    __tablename__ = "example_sets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    examples: Mapped[list[ExampleRow]] = relationship(
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="(ExampleRow.position, ExampleRow.id)",
    )


class ExampleRow(Base):
    __tablename__ = "examples"
    __table_args__ = {"sqlite_autoincrement": True}  # ids are never reused

    id: Mapped[int] = mapped_column(primary_key=True)
    set_id: Mapped[int] = mapped_column(ForeignKey("example_sets.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text, default="")
    media_sha: Mapped[str] = mapped_column(ForeignKey("media.sha256", ondelete="RESTRICT"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    media: Mapped[MediaRow] = relationship(lazy="joined")


Index("ix_examples_set", ExampleRow.set_id, ExampleRow.position)
Index("ix_examples_sha", ExampleRow.media_sha)
Index("ix_turns_session", TurnRow.session_id, TurnRow.position)


class MetaRow(Base):
    """Key/value facts about the database itself (schema version)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
