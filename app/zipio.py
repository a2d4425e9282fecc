"""Session and example-set archives: a zip holding one JSON document and a ``media/`` folder.

Reading never extracts blindly: only the members the JSON names are read, each checked for a
safe name and size, and written under a fresh folder the caller owns.
"""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from app.store import ExampleRecord, ExampleSetInfo, MediaRecord, SessionInfo, TurnRecord

SESSION_FORMAT = "flamingo-chat-session"
SET_FORMAT = "flamingo-example-set"
VERSION = 1
MAX_MEMBERS = 2000


class ArchiveError(ValueError):
    """A zip that is not an archive this app wrote (or is damaged); the message is for the user."""


@dataclass(frozen=True)
class ImportedExample:
    media_path: Path
    orig_name: str
    text: str


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:limit] or "untitled"


def _member(media: MediaRecord) -> str:
    return f"media/{media.sha256}{media.ext}"


def _media_json(media: MediaRecord) -> dict:
    return {"file": _member(media), "kind": media.kind, "name": media.orig_name}


def _write(dest: Path, document: dict, media: list[MediaRecord]) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(document, indent=2, ensure_ascii=False))
        for item in {m.sha256: m for m in media}.values():
            zf.write(item.path, _member(item), compress_type=zipfile.ZIP_STORED)
    tmp.replace(dest)
    return dest


def write_session(dest_dir: Path, info: SessionInfo, turns: list[TurnRecord]) -> Path:
    document = {
        "format": SESSION_FORMAT,
        "version": VERSION,
        "title": info.title,
        "created_at": info.created_at.isoformat(),
        "turns": [
            {
                "role": t.role,
                "text": t.text,
                "status": t.status,
                "error": t.error,
                "media": [_media_json(m) for m in t.media],
                "examples_in_prompt": t.prefix,
            }
            for t in turns
        ],
    }
    media = [m for t in turns for m in t.media]
    return _write(dest_dir / f"session-{slug(info.title)}-{info.id[:8]}.zip", document, media)


def write_set(dest_dir: Path, info: ExampleSetInfo, examples: list[ExampleRecord]) -> Path:
    document = {
        "format": SET_FORMAT,
        "version": VERSION,
        "name": info.name,
        "examples": [{"text": e.text, "media": _media_json(e.media)} for e in examples],
    }
    return _write(dest_dir / f"example-set-{slug(info.name)}.zip", document, [e.media for e in examples])


def read_set(zip_path: Path, workdir: Path, max_bytes: int) -> tuple[str, list[ImportedExample]]:
    """The set's name and its examples, media extracted into `workdir`."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            document = _manifest(zf, SET_FORMAT)
            name = str(document.get("name") or "Imported set").strip()[:200]
            entries = document.get("examples")
            if not isinstance(entries, list) or len(entries) > MAX_MEMBERS:
                raise ArchiveError("The archive's example list is missing or too long.")
            return name, [_extract_example(zf, e, i, workdir, max_bytes) for i, e in enumerate(entries)]
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"Not a readable zip file: {exc}") from exc


def _manifest(zf: zipfile.ZipFile, expected: str) -> dict:
    try:
        document = json.loads(zf.read("manifest.json"))
    except KeyError as exc:
        raise ArchiveError("The zip has no manifest.json; was it exported from this app?") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != expected:
        raise ArchiveError(f"This zip is not a {expected.replace('-', ' ')} archive.")
    if document.get("version") != VERSION:
        raise ArchiveError(f"Unsupported archive version {document.get('version')!r}.")
    return document


def _extract_example(
    zf: zipfile.ZipFile, entry: object, index: int, workdir: Path, max_bytes: int
) -> ImportedExample:
    if not isinstance(entry, dict) or not isinstance(entry.get("media"), dict):
        raise ArchiveError(f"Example {index + 1} in the archive is malformed.")
    member = str(entry["media"].get("file", ""))
    pure = PurePosixPath(member)
    if pure.is_absolute() or ".." in pure.parts or len(pure.parts) != 2 or pure.parts[0] != "media":
        raise ArchiveError(f"Example {index + 1} names an unsafe path {member!r}.")
    try:
        zinfo = zf.getinfo(member)
    except KeyError as exc:
        raise ArchiveError(f"Example {index + 1}: {member} is missing from the zip.") from exc
    if zinfo.file_size > max_bytes:
        raise ArchiveError(f"Example {index + 1}: {member} is larger than the upload limit.")
    orig = PurePosixPath(str(entry["media"].get("name") or pure.name)).name
    dest = workdir / f"{index:04d}-{pure.name}"
    dest.write_bytes(zf.read(zinfo))
    return ImportedExample(dest, orig, str(entry.get("text", "")))
