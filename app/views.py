"""Plain functions that turn service records into what Gradio components show.

No Gradio imports here: messages are the dicts gr.Chatbot takes, choices are (label, value) pairs.
"""
from __future__ import annotations

from collections.abc import Sequence

from app.store import ExampleRecord, ExampleSetInfo, SessionInfo, TurnRecord

NO_SET = "none"

Message = dict


def _media_item(path: str, kind: str) -> dict:
    """A media item in a message; the UI turns it into an inline image or video player."""
    return {"path": path, "kind": kind}


def turn_message(turn: TurnRecord) -> Message:
    """One turn as one chat bubble: its media inline, then its text (and a status note)."""
    content: list = [_media_item(str(m.path), m.kind) for m in turn.media]
    text = turn.text if turn.role == "user" else reply_text(turn.text, turn.status, turn.error)
    if text:
        content.append(text)
    return {"role": turn.role, "content": content if len(content) != 1 else content[0]}


def reply_text(text: str, status: str, error: str | None = None) -> str:
    if status == "stopped":
        return f"{text}\n\n*(stopped)*" if text else "*(stopped before any text)*"
    if status == "failed":
        return f"{text}\n\n⚠️ *The reply failed: {error or 'unknown error'}*".lstrip()
    if status in ("streaming", "accepted"):
        return text or "…"
    return text or "*(empty reply)*"


def history(turns: Sequence[TurnRecord]) -> list[Message]:
    return [turn_message(t) for t in turns]


def error_message(message: str) -> Message:
    """A notice in the chat (not stored): the message was not sent, and why."""
    return {"role": "assistant", "content": "Nothing was stored; the next message works as usual.",
            "metadata": {"title": f"⚠️ Not sent: {message}", "status": "done"}}


def session_choices(sessions: Sequence[SessionInfo]) -> list[tuple[str, str]]:
    return [(f"{s.title} · {s.updated_at:%b %d %H:%M}", s.id) for s in sessions]


def set_choices(sets: Sequence[ExampleSetInfo], with_none: bool = True) -> list[tuple[str, str]]:
    choices = [(f"{s.name} · {s.size} example{'' if s.size == 1 else 's'}", str(s.id)) for s in sets]
    return [(NO_SET, NO_SET)] + choices if with_none else choices


def set_id_of(value: str | None) -> int | None:
    return None if value in (None, "", NO_SET) else int(value)


def example_choices(examples: Sequence[ExampleRecord]) -> list[tuple[str, str]]:
    return [(f"{i + 1}. [{e.media.kind}] {_short(e.text)}", str(e.id)) for i, e in enumerate(examples)]


def gallery(examples: Sequence[ExampleRecord]) -> list[tuple[str, str]]:
    return [(str(e.media.path), f"{i + 1}. {e.text}") for i, e in enumerate(examples)]


def prefix_markdown(turns: Sequence[TurnRecord]) -> str:
    """What went before the conversation in the prompt of the latest reply."""
    replies = [t for t in turns if t.role == "assistant"]
    if not replies:
        return "*No reply yet.*"
    return prefix_list_markdown(replies[-1].prefix or [])


def prefix_list_markdown(prefix: Sequence[dict]) -> str:
    if not prefix:
        return "*The last reply had no few-shot examples in its prompt.*"
    lines = [f"**Examples in the prompt of the last reply ({len(prefix)}):**", ""]
    lines += [f"{i + 1}. [{p['kind']}] {p['name']} — {p['text']}" for i, p in enumerate(prefix)]
    return "\n".join(lines)


def _short(text: str, limit: int = 60) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"
