"""The session store: SQLite (WAL) through the SQLAlchemy 2.0 ORM, plus content-addressed media.

Everything leaves here as frozen dataclasses, never as ORM objects, so callers in any thread
hold plain data. Writes are serialised by one lock (SQLite allows one writer anyway), which
also keeps blob clean-up from racing a turn that is being stored.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, delete, event, exists, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.blobs import BlobStore, normalized_ext, sha256_of
from app.records import (  # noqa: F401  (re-exported: callers import records from here)
    Conflict,
    ExampleRecord,
    ExampleSetInfo,
    MediaInput,
    MediaRecord,
    NotFound,
    ReplyRecord,
    SessionInfo,
    TurnRecord,
)
from app.schema import (
    SCHEMA_VERSION,
    Base,
    ExampleRow,
    ExampleSetRow,
    MediaRow,
    MetaRow,
    SessionRow,
    TurnMediaRow,
    TurnRow,
    utcnow,
)

log = logging.getLogger(__name__)

DB_NAME = "flamingo.sqlite3"
MEDIA_DIR = "media"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(db_path: Path) -> Engine:
    engine = create_engine(
        f"sqlite:///{db_path}", connect_args={"check_same_thread": False, "timeout": 30}
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class Store:
    """Sessions, turns, example sets and their media under one data directory."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / DB_NAME
        self.blobs = BlobStore(self.data_dir / MEDIA_DIR)
        self.engine = make_engine(self.db_path)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = threading.RLock()
        self._stamp_version()
        self.sweep_stray_files()
        log.info("store open at %s", self.db_path)

    def close(self) -> None:
        self.engine.dispose()

    # ---- plumbing -------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions() as db:
            yield db

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_lock, self._sessions() as db, db.begin():
            yield db

    def _stamp_version(self) -> None:
        with self._write() as db:
            if db.get(MetaRow, "schema_version") is None:
                db.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))

    def journal_mode(self) -> str:
        with self.engine.connect() as conn:
            return conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()

    # ---- media ------------------------------------------------------------------------------

    def _media_record(self, row: MediaRow) -> MediaRecord:
        return MediaRecord(
            sha256=row.sha256,
            kind=row.kind,
            ext=row.ext,
            size=row.size,
            orig_name=row.orig_name,
            path=self.blobs.path_for(row.sha256, row.ext),
        )

    def _ingest(self, db: Session, item: MediaInput) -> MediaRow:
        """Copy one file into the blob store and make sure it has a row. Caller holds the lock."""
        sha = sha256_of(item.path)
        row = db.get(MediaRow, sha)
        if row is None:
            ext = normalized_ext(item.orig_name or item.path) or normalized_ext(item.path)
            size = Path(item.path).stat().st_size
            row = MediaRow(sha256=sha, kind=item.kind, ext=ext, size=size, orig_name=item.orig_name)
            db.add(row)
            db.flush()
        self.blobs.put(item.path, row.sha256, row.ext)
        return row

    def media_by_sha(self, sha: str) -> MediaRecord:
        with self._read() as db:
            row = db.get(MediaRow, sha)
            if row is None:
                raise NotFound(f"media {sha}")
            return self._media_record(row)

    def remove_orphans(self) -> int:
        """Delete media rows and files that no turn and no example references. Returns the count."""
        with self._write() as db:
            used_by_turn = exists().where(TurnMediaRow.media_sha == MediaRow.sha256)
            used_by_example = exists().where(ExampleRow.media_sha == MediaRow.sha256)
            rows = db.scalars(select(MediaRow).where(~used_by_turn, ~used_by_example)).all()
            gone = [(row.sha256, row.ext) for row in rows]
            for row in rows:
                db.delete(row)
        for sha, ext in gone:
            self.blobs.remove(sha, ext)
        if gone:
            log.info("removed %d orphaned media file(s)", len(gone))
        return len(gone)

    def sweep_stray_files(self) -> int:
        """Remove files under media/ that no row knows (left by a crash between copy and commit)."""
        with self._write() as db:
            known = {f"{sha}{ext}" for sha, ext in db.execute(select(MediaRow.sha256, MediaRow.ext))}
            stray = [p for p in self.blobs.files() if p.name not in known]
            for path in stray:
                path.unlink(missing_ok=True)
        if stray:
            log.info("swept %d stray media file(s)", len(stray))
        return len(stray)

    # ---- sessions ---------------------------------------------------------------------------

    @staticmethod
    def _session_info(row: SessionRow) -> SessionInfo:
        return SessionInfo(row.id, row.title, row.example_set_id, row.created_at, row.updated_at)

    def create_session(self, title: str, example_set_id: int | None = None) -> SessionInfo:
        with self._write() as db:
            row = SessionRow(title=title, example_set_id=example_set_id)
            db.add(row)
            db.flush()
            log.info("created session %s %r", row.id, title)
            return self._session_info(row)

    def list_sessions(self) -> list[SessionInfo]:
        with self._read() as db:
            rows = db.scalars(select(SessionRow).order_by(SessionRow.updated_at.desc()))
            return [self._session_info(r) for r in rows]

    def get_session(self, session_id: str) -> SessionInfo:
        with self._read() as db:
            return self._session_info(self._session_row(db, session_id))

    @staticmethod
    def _session_row(db: Session, session_id: str) -> SessionRow:
        row = db.get(SessionRow, session_id)
        if row is None:
            raise NotFound(f"session {session_id}")
        return row

    def rename_session(self, session_id: str, title: str) -> SessionInfo:
        with self._write() as db:
            row = self._session_row(db, session_id)
            row.title = title
            return self._session_info(row)

    def set_session_example_set(self, session_id: str, set_id: int | None) -> None:
        with self._write() as db:
            self._session_row(db, session_id).example_set_id = set_id

    def delete_session(self, session_id: str) -> None:
        with self._write() as db:
            db.delete(self._session_row(db, session_id))
        log.info("deleted session %s", session_id)
        self.remove_orphans()

    # ---- turns ------------------------------------------------------------------------------

    def _turn_record(self, row: TurnRow) -> TurnRecord:
        return TurnRecord(
            id=row.id,
            position=row.position,
            role=row.role,
            text=row.text,
            status=row.status,
            media=[self._media_record(link.media) for link in row.media_links],
            error=row.error,
            finish_reason=row.finish_reason,
            dropped_turns=row.dropped_turns,
            prefix=json.loads(row.prefix_json) if row.prefix_json else None,
        )

    def turns(self, session_id: str) -> list[TurnRecord]:
        with self._read() as db:
            self._session_row(db, session_id)
            rows = db.scalars(
                select(TurnRow).where(TurnRow.session_id == session_id).order_by(TurnRow.position)
            ).unique()
            return [self._turn_record(r) for r in rows]

    def _append(self, db: Session, session_id: str, row: TurnRow) -> TurnRow:
        session = self._session_row(db, session_id)
        last = db.scalar(select(func.max(TurnRow.position)).where(TurnRow.session_id == session_id))
        row.session_id = session_id
        row.position = 0 if last is None else last + 1
        session.updated_at = utcnow()
        db.add(row)
        db.flush()
        return row

    def add_user_turn(self, session_id: str, text: str, media: Sequence[MediaInput]) -> TurnRecord:
        """Store the files and the turn in one transaction; on failure nothing stays behind."""
        try:
            with self._write() as db:
                rows = [self._ingest(db, item) for item in media]
                turn = self._append(db, session_id, TurnRow(role="user", text=text))
                for i, media_row in enumerate(rows):
                    turn.media_links.append(TurnMediaRow(position=i, media_sha=media_row.sha256))
                db.flush()
                record = self._turn_record(turn)
        except Exception:
            self.sweep_stray_files()
            raise
        log.info("session %s: user turn %d stored (%d media)", session_id, record.id, len(media))
        return record

    def add_reply(self, session_id: str, reply: ReplyRecord) -> TurnRecord:
        with self._write() as db:
            row = TurnRow(
                role="assistant",
                text=reply.text,
                status=reply.status,
                error=reply.error,
                finish_reason=reply.finish_reason,
                dropped_turns=reply.dropped_turns,
                prefix_json=json.dumps(reply.prefix) if reply.prefix is not None else None,
            )
            record = self._turn_record(self._append(db, session_id, row))
        log.info("session %s: reply %d stored (%s)", session_id, record.id, reply.status)
        return record

    def delete_turn(self, turn_id: int) -> None:
        with self._write() as db:
            row = db.get(TurnRow, turn_id)
            if row is None:
                raise NotFound(f"turn {turn_id}")
            db.delete(row)
        self.remove_orphans()

    def delete_replies_after_last_user_turn(self, session_id: str) -> int:
        """Drop the reply (or replies) that follow the last user turn; for regenerate."""
        with self._write() as db:
            self._session_row(db, session_id)
            last_user = db.scalar(
                select(func.max(TurnRow.position)).where(
                    TurnRow.session_id == session_id, TurnRow.role == "user"
                )
            )
            if last_user is None:
                return 0
            result = db.execute(
                delete(TurnRow).where(
                    TurnRow.session_id == session_id, TurnRow.position > last_user
                )
            )
            return result.rowcount

    # ---- example sets -----------------------------------------------------------------------

    def create_set(self, name: str) -> ExampleSetInfo:
        try:
            with self._write() as db:
                row = ExampleSetRow(name=name)
                db.add(row)
                db.flush()
                info = ExampleSetInfo(row.id, row.name, 0)
        except IntegrityError as exc:
            raise Conflict(f"an example set named {name!r} already exists") from exc
        log.info("created example set %d %r", info.id, name)
        return info

    def free_set_name(self, name: str) -> str:
        """`name`, or `name (2)`, `name (3)`, ... whichever no set uses yet."""
        taken = {s.name for s in self.list_sets()}
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name} ({n})"
        return candidate

    def list_sets(self) -> list[ExampleSetInfo]:
        with self._read() as db:
            counts = (
                select(ExampleRow.set_id, func.count().label("n"))
                .group_by(ExampleRow.set_id)
                .subquery()
            )
            rows = db.execute(
                select(ExampleSetRow.id, ExampleSetRow.name, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.set_id == ExampleSetRow.id)
                .order_by(ExampleSetRow.name)
            )
            return [ExampleSetInfo(i, name, n) for i, name, n in rows]

    def get_set(self, set_id: int) -> ExampleSetInfo:
        for info in self.list_sets():
            if info.id == set_id:
                return info
        raise NotFound(f"example set {set_id}")

    @staticmethod
    def _set_row(db: Session, set_id: int) -> ExampleSetRow:
        row = db.get(ExampleSetRow, set_id)
        if row is None:
            raise NotFound(f"example set {set_id}")
        return row

    def rename_set(self, set_id: int, name: str) -> None:
        try:
            with self._write() as db:
                self._set_row(db, set_id).name = name
        except IntegrityError as exc:
            raise Conflict(f"an example set named {name!r} already exists") from exc

    def delete_set(self, set_id: int) -> None:
        with self._write() as db:
            db.delete(self._set_row(db, set_id))
        log.info("deleted example set %d", set_id)
        self.remove_orphans()

    def _example_record(self, row: ExampleRow) -> ExampleRecord:
        return ExampleRecord(
            row.id, row.set_id, row.position, row.text, self._media_record(row.media)
        )

    def examples(self, set_id: int) -> list[ExampleRecord]:
        with self._read() as db:
            self._set_row(db, set_id)
            rows = db.scalars(
                select(ExampleRow)
                .where(ExampleRow.set_id == set_id)
                .order_by(ExampleRow.position, ExampleRow.id)
            ).unique()
            return [self._example_record(r) for r in rows]

    def add_examples(self, set_id: int, items: Sequence[tuple[MediaInput, str]]) -> list[int]:
        """Append examples (media, text) to a set in one transaction. Returns their ids."""
        try:
            with self._write() as db:
                self._set_row(db, set_id)
                last = db.scalar(
                    select(func.max(ExampleRow.position)).where(ExampleRow.set_id == set_id)
                )
                start = 0 if last is None else last + 1
                rows = []
                for offset, (media, text) in enumerate(items):
                    media_row = self._ingest(db, media)
                    rows.append(
                        ExampleRow(
                            set_id=set_id,
                            position=start + offset,
                            text=text,
                            media_sha=media_row.sha256,
                        )
                    )
                db.add_all(rows)
                db.flush()
                ids = [r.id for r in rows]
        except Exception:
            self.sweep_stray_files()
            raise
        log.info("example set %d: added %d example(s)", set_id, len(ids))
        return ids

    def _example_row(self, db: Session, example_id: int) -> ExampleRow:
        row = db.get(ExampleRow, example_id)
        if row is None:
            raise NotFound(f"example {example_id}")
        return row

    def update_example(self, example_id: int, text: str) -> None:
        with self._write() as db:
            self._example_row(db, example_id).text = text

    def move_example(self, example_id: int, delta: int) -> None:
        """Move an example `delta` places (negative: earlier) within its set."""
        with self._write() as db:
            row = self._example_row(db, example_id)
            siblings = list(
                db.scalars(
                    select(ExampleRow)
                    .where(ExampleRow.set_id == row.set_id)
                    .order_by(ExampleRow.position, ExampleRow.id)
                ).unique()
            )
            old = siblings.index(row)
            new = max(0, min(len(siblings) - 1, old + delta))
            siblings.insert(new, siblings.pop(old))
            for position, sibling in enumerate(siblings):
                sibling.position = position

    def remove_example(self, example_id: int) -> None:
        with self._write() as db:
            db.delete(self._example_row(db, example_id))
        self.remove_orphans()
