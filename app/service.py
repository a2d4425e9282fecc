"""The chat service: the one thing the UI talks to.

It owns the store and the chat engine. A message is checked, committed as a user turn, and
only then generated for; the reply is committed when it ends, whatever way it ends (complete,
stopped, failed). Every outcome reaches the caller as a ``ReplyUpdate``, never as an exception,
so a bad upload is a message in the chat and the next message works.
"""
from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from app import zipio
from app.config import ChatOptions, UploadLimits, clamp_settings
from app.intake import InputRejected, check_upload, check_uploads
from app.rices import ExampleSelector
from app.store import (
    ExampleRecord,
    ExampleSetInfo,
    MediaInput,
    NotFound,
    ReplyRecord,
    SessionInfo,
    Store,
    TurnRecord,
)
from engine.conversation import Conversation, Example, Turn
from engine.media import MediaError

log = logging.getLogger(__name__)

ENDED = ("complete", "stopped", "failed", "rejected")


@dataclass(frozen=True)
class ReplyUpdate:
    """One step of a reply. `status`: "accepted" (the user turn is stored), "streaming" (text so
    far), then one of "complete", "stopped", "failed" (reply stored) or "rejected" (nothing stored;
    `error` says why)."""

    session_id: str | None
    status: str
    text: str = ""
    error: str | None = None
    prefix: list[dict] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status in ENDED


@dataclass(frozen=True)
class SessionView:
    info: SessionInfo
    turns: list[TurnRecord]


def _rejected(session_id: str | None, message: str) -> ReplyUpdate:
    return ReplyUpdate(session_id, "rejected", error=message)


def title_from(text: str, media: Sequence[MediaInput]) -> str:
    words = " ".join(text.split())
    if words:
        return words if len(words) <= 48 else words[:47].rstrip() + "…"
    kinds = {m.kind for m in media}
    return "Video chat" if kinds == {"video"} else "Image chat"


def _in_prompt(turn: TurnRecord) -> bool:
    return turn.role == "user" or (turn.status in ("complete", "stopped") and bool(turn.text.strip()))


def _prefix_entry(example: ExampleRecord) -> dict:
    return {"example_id": example.id, "text": example.text, "kind": example.media.kind,
            "media": example.media.sha256, "name": example.media.orig_name}


def _query_media(turns: Sequence[TurnRecord]) -> list:
    """RICES queries: the media of the newest user turn that has any."""
    for turn in reversed(turns):
        if turn.role == "user" and turn.media:
            return list(turn.media)
    return []


class ChatService:
    def __init__(self, store: Store, engine, limits: UploadLimits = UploadLimits()):
        self.store = store
        self.engine = engine
        self.limits = limits
        self.selector = ExampleSelector(engine.embed_media)
        self._runs: dict[str, threading.Event] = {}
        self._runs_lock = threading.Lock()

    @property
    def exports_dir(self) -> Path:
        return self.store.data_dir / "exports"

    def _workdir(self) -> tempfile.TemporaryDirectory:
        root = self.store.data_dir / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(dir=root)

    # ---- model ------------------------------------------------------------------------------

    def model_status(self) -> str:
        d = self.engine.describe()
        return (
            f"Model: {d['model']} · device: {d['device']} · dtype: {d['dtype']} · "
            f"frozen params: {d['frozen_params']:,} · trainable params: {d['trainable_params']:,}"
        )

    # ---- sessions ---------------------------------------------------------------------------

    def list_sessions(self) -> list[SessionInfo]:
        return self.store.list_sessions()

    def open_session(self, session_id: str) -> SessionView:
        return SessionView(self.store.get_session(session_id), self.store.turns(session_id))

    def rename_session(self, session_id: str, title: str) -> SessionInfo:
        title = " ".join(title.split())[:200]
        if not title:
            raise ValueError("A session needs a name.")
        return self.store.rename_session(session_id, title)

    def delete_session(self, session_id: str) -> None:
        self.stop(session_id)
        self.store.delete_session(session_id)
        forget = getattr(self.engine, "forget", None)
        if forget is not None:
            forget(session_id)

    def export_session(self, session_id: str) -> Path:
        view = self.open_session(session_id)
        path = zipio.write_session(self.exports_dir, view.info, view.turns)
        log.info("exported session %s to %s", session_id, path)
        return path

    # ---- runs (one reply at a time per session) ---------------------------------------------

    def _begin_run(self, session_id: str, cancel: threading.Event | None) -> threading.Event | None:
        with self._runs_lock:
            if session_id in self._runs:
                return None
            event = cancel or threading.Event()
            self._runs[session_id] = event
            return event

    def _end_run(self, session_id: str) -> None:
        with self._runs_lock:
            self._runs.pop(session_id, None)

    def is_running(self, session_id: str) -> bool:
        with self._runs_lock:
            return session_id in self._runs

    def stop(self, session_id: str | None) -> bool:
        """Ask the reply being generated in `session_id` to stop; False when none is running."""
        with self._runs_lock:
            event = self._runs.get(session_id) if session_id else None
        if event is None:
            return False
        event.set()
        log.info("session %s: stop requested", session_id)
        return True

    # ---- chat -------------------------------------------------------------------------------

    def _normalized(self, options: ChatOptions) -> ChatOptions:
        return replace(options, settings=clamp_settings(options.settings), rices_k=max(1, options.rices_k))

    def send(
        self,
        session_id: str | None,
        text: str,
        files: Sequence[str | Path] = (),
        options: ChatOptions = ChatOptions(),
        cancel: threading.Event | None = None,
    ) -> Iterator[ReplyUpdate]:
        """Store a user message and stream the reply. `session_id` None starts a new session."""
        text = (text or "").strip()
        options = self._normalized(options)
        if not text and not files:
            yield _rejected(session_id, "Type a message or attach an image or video.")
            return
        try:
            media = check_uploads(files, self.limits, options.settings.num_frames)
        except InputRejected as exc:
            yield _rejected(session_id, str(exc))
            return
        created = session_id is None
        if created:
            session_id = self.store.create_session(title_from(text, media), options.example_set_id).id
        else:
            self.store.set_session_example_set(session_id, options.example_set_id)
        run = self._begin_run(session_id, cancel)
        if run is None:
            yield _rejected(session_id, "A reply is still being written in this session; stop it or wait.")
            return
        try:
            turn = self.store.add_user_turn(session_id, text, media)
            yield ReplyUpdate(session_id, "accepted")
            yield from self._reply(session_id, options, run, undo=(turn.id, created))
        finally:
            self._end_run(session_id)

    def regenerate(
        self, session_id: str, options: ChatOptions = ChatOptions(), cancel: threading.Event | None = None
    ) -> Iterator[ReplyUpdate]:
        """Replace the last reply with a new one."""
        options = self._normalized(options)
        run = self._begin_run(session_id, cancel)
        if run is None:
            yield _rejected(session_id, "A reply is still being written in this session; stop it or wait.")
            return
        try:
            if not any(t.role == "user" for t in self.store.turns(session_id)):
                yield _rejected(session_id, "Nothing to regenerate yet.")
                return
            self.store.delete_replies_after_last_user_turn(session_id)
            yield ReplyUpdate(session_id, "accepted")
            yield from self._reply(session_id, options, run, undo=None)
        finally:
            self._end_run(session_id)

    def _reply(
        self,
        session_id: str,
        options: ChatOptions,
        cancel: threading.Event,
        undo: tuple[int, bool] | None,
    ) -> Iterator[ReplyUpdate]:
        parts: list[str] = []
        prefix: list[dict] = []
        stream = None
        try:
            conversation, prefix = self._conversation(session_id, options)
            stream = self.engine.stream(conversation, options.settings, cancel=cancel, session_id=session_id)
            for delta in stream:
                parts.append(delta)
                yield ReplyUpdate(session_id, "streaming", "".join(parts), prefix=prefix)
        except GeneratorExit:  # the caller went away: keep what was written, marked stopped
            cancel.set()
            if stream is not None and hasattr(stream, "close"):
                stream.close()
            self._save(session_id, ReplyRecord("".join(parts), "stopped", finish_reason="cancelled", prefix=prefix))
            raise
        except MediaError as exc:
            if undo is not None and not parts:
                yield self._undo(session_id, undo, f"A file could not be used: {exc}")
                return
            reply = self._failed(session_id, parts, prefix, exc)
        except Exception as exc:
            reply = self._failed(session_id, parts, prefix, exc)
        else:
            reply = self._finished(session_id, parts, prefix, stream)
        self._save(session_id, reply)
        yield ReplyUpdate(session_id, reply.status, reply.text, reply.error, prefix)

    def _finished(self, session_id: str, parts: list[str], prefix: list[dict], stream) -> ReplyRecord:
        reason = getattr(stream, "finish_reason", None)
        dropped = int(getattr(stream, "dropped_turns", 0) or 0)
        status = "stopped" if reason == "cancelled" else "complete"
        log.info("session %s: reply %s (%s, %d chars, %d old turns dropped)",
                 session_id, status, reason, len("".join(parts)), dropped)
        return ReplyRecord("".join(parts), status, finish_reason=reason, dropped_turns=dropped, prefix=prefix)

    @staticmethod
    def _failed(session_id: str, parts: list[str], prefix: list[dict], exc: Exception) -> ReplyRecord:
        log.exception("session %s: generation failed", session_id)
        message = f"{type(exc).__name__}: {exc}"
        return ReplyRecord("".join(parts), "failed", error=message, finish_reason="error", prefix=prefix)

    def _undo(self, session_id: str, undo: tuple[int, bool], message: str) -> ReplyUpdate:
        """Take back a user turn the engine refused, so nothing is stored half-way."""
        turn_id, created = undo
        log.info("session %s: engine refused the message (%s); removing it", session_id, message)
        self.store.delete_turn(turn_id)
        if created:
            self.store.delete_session(session_id)
            return _rejected(None, message)
        return _rejected(session_id, message)

    def _save(self, session_id: str, reply: ReplyRecord) -> None:
        try:
            self.store.add_reply(session_id, reply)
        except NotFound:
            log.info("session %s was deleted while replying; reply dropped", session_id)

    def _conversation(self, session_id: str, options: ChatOptions) -> tuple[Conversation, list[dict]]:
        turns = self.store.turns(session_id)
        chosen = self._examples(options, turns)
        conversation = Conversation(
            examples=[Example([str(e.media.path)], e.text) for e in chosen],
            turns=[Turn(t.role, t.text, [str(m.path) for m in t.media]) for t in turns if _in_prompt(t)],
        )
        prefix = [_prefix_entry(e) for e in chosen]
        if prefix:
            log.info("session %s: %d example(s) before the conversation: %s",
                     session_id, len(prefix), [p["text"] for p in prefix])
        return conversation, prefix

    def _examples(self, options: ChatOptions, turns: Sequence[TurnRecord]) -> list[ExampleRecord]:
        if options.example_set_id is None:
            return []
        try:
            examples = self.store.examples(options.example_set_id)
        except NotFound:
            log.info("example set %s is gone; answering without examples", options.example_set_id)
            return []
        queries = _query_media(turns) if options.rices else []
        if not queries:
            return examples
        try:
            return self.selector.nearest(examples, queries, options.rices_k)
        except Exception:
            log.warning("RICES selection failed; using the whole set", exc_info=True)
            return examples

    # ---- example sets -----------------------------------------------------------------------

    def list_sets(self) -> list[ExampleSetInfo]:
        return self.store.list_sets()

    def create_set(self, name: str) -> ExampleSetInfo:
        name = " ".join(name.split())[:200]
        if not name:
            raise ValueError("An example set needs a name.")
        return self.store.create_set(name)

    def rename_set(self, set_id: int, name: str) -> None:
        name = " ".join(name.split())[:200]
        if not name:
            raise ValueError("An example set needs a name.")
        self.store.rename_set(set_id, name)

    def delete_set(self, set_id: int) -> None:
        self.store.delete_set(set_id)

    def examples(self, set_id: int) -> list[ExampleRecord]:
        return self.store.examples(set_id)

    def add_example(self, set_id: int, media_path: str | Path, text: str, num_frames: int = 8) -> int:
        """Check the file like a chat upload, then append it; raises InputRejected for bad files."""
        item = check_upload(Path(media_path), self.limits, num_frames)
        return self.store.add_examples(set_id, [(item, text.strip())])[0]

    def update_example(self, example_id: int, text: str) -> None:
        self.store.update_example(example_id, text.strip())

    def move_example(self, example_id: int, delta: int) -> None:
        self.store.move_example(example_id, delta)

    def remove_example(self, example_id: int) -> None:
        self.store.remove_example(example_id)

    def export_set(self, set_id: int) -> Path:
        path = zipio.write_set(self.exports_dir, self.store.get_set(set_id), self.store.examples(set_id))
        log.info("exported example set %d to %s", set_id, path)
        return path

    def import_set(self, zip_path: str | Path) -> ExampleSetInfo:
        """A new set from an exported zip; every file is checked first, so it is all or nothing.
        Raises zipio.ArchiveError or InputRejected with a message for the user."""
        with self._workdir() as tmp:
            name, entries = zipio.read_set(Path(zip_path), Path(tmp), self.limits.max_bytes)
            items = [
                (replace(check_upload(e.media_path, self.limits, 2), orig_name=e.orig_name), e.text)
                for e in entries
            ]
            info = self.store.create_set(self.store.free_set_name(name))
            try:
                self.store.add_examples(info.id, items)
            except Exception:
                self.store.delete_set(info.id)
                raise
        log.info("imported example set %r with %d example(s)", info.name, len(items))
        return self.store.get_set(info.id)
