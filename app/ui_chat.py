"""Chat tab behaviour: sending, streaming, stop, regenerate, and switching between sessions.

Which conversation each browser tab is looking at is tracked here (by Gradio's session hash),
so a reply never streams into a conversation the user has switched away from: switching stops
the running reply (it is kept, marked stopped) and the rest of its updates are not shown.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import gradio as gr

from app import views
from app.config import AppConfig, ChatOptions
from app.service import ChatService, ReplyUpdate
from app.store import NotFound
from engine.conversation import GenerationSettings

if TYPE_CHECKING:
    from app.ui import ChatParts

log = logging.getLogger(__name__)

BUSY_INPUT = dict(submit_btn=False, stop_btn=True)
IDLE_INPUT = dict(submit_btn=True, stop_btn=False)


class TabViews:
    """browser tab (Gradio session hash) -> the session id it shows."""

    def __init__(self):
        self._shown: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def show(self, tab: str, session_id: str | None) -> str | None:
        """Record what `tab` shows now; returns what it showed before."""
        with self._lock:
            before = self._shown.get(tab)
            self._shown[tab] = session_id
            return before

    def shows(self, tab: str, session_id: str | None) -> bool:
        with self._lock:
            return self._shown.get(tab) == session_id

    def forget(self, tab: str) -> None:
        with self._lock:
            self._shown.pop(tab, None)


def chat_options(set_value, rices, rices_k, temperature, max_new_tokens, num_frames) -> ChatOptions:
    settings = GenerationSettings(
        max_new_tokens=int(max_new_tokens), temperature=float(temperature), num_frames=int(num_frames)
    )
    return ChatOptions(settings, views.set_id_of(set_value), bool(rices), int(rices_k))


# ---- messages -------------------------------------------------------------------------------


def _media_component(item: dict):
    if item.get("kind") == "video":
        return gr.Video(item["path"], buttons=["download"], autoplay=False, loop=False)
    return gr.Image(item["path"], buttons=["fullscreen", "download"])


def as_gradio(messages: list[dict]) -> list[dict]:
    """views' messages with media items as inline Gradio components (no share buttons)."""
    def convert(part):
        return _media_component(part) if isinstance(part, dict) and "path" in part else part

    out = []
    for message in messages:
        content = message["content"]
        content = [convert(c) for c in content] if isinstance(content, list) else convert(content)
        out.append({**message, "content": content})
    return out


def history(service: ChatService, session_id: str | None) -> list:
    if session_id is None:
        return []
    try:
        return as_gradio(views.history(service.open_session(session_id).turns))
    except NotFound:
        return []


def session_list(service: ChatService, selected: str | None) -> gr.Radio:
    return gr.Radio(choices=views.session_choices(service.list_sessions()), value=selected)


# ---- streaming ------------------------------------------------------------------------------


class _Stream:
    """Turns one reply's ReplyUpdates into component updates for one browser tab."""

    def __init__(self, service: ChatService, chat: "ChatParts", tabs: TabViews, tab: str):
        self.service, self.chat, self.tabs, self.tab = service, chat, tabs, tab

    def run(self, updates, session_id: str | None, text: str | None):
        """`text`: the message being sent (None for regenerate, which leaves the box alone)."""
        chat = self.chat
        shown = history(self.service, session_id)
        busy = dict(BUSY_INPUT) if text is None else dict(value=None, **BUSY_INPUT)
        yield {chat.chatbot: shown, chat.chat_input: gr.MultimodalTextbox(**busy)}
        base = shown
        for update in updates:
            if update.status == "accepted":
                self.tabs.show(self.tab, update.session_id)
                base = history(self.service, update.session_id)
                yield self._accepted(update, base)
            elif update.status == "rejected":
                yield self._rejected(update, shown, session_id, text)
            elif not self.tabs.shows(self.tab, update.session_id):
                continue  # the user moved to another conversation: keep quiet
            elif update.status == "streaming":
                partial = {"role": "assistant", "content": views.reply_text(update.text, "streaming")}
                yield {chat.chatbot: base + [partial]}
            else:
                yield self._finished(update)
        yield self._idle()

    def _idle(self) -> dict:
        return {self.chat.chat_input: gr.MultimodalTextbox(**IDLE_INPUT)}

    def _accepted(self, update: ReplyUpdate, base: list) -> dict:
        chat = self.chat
        return {
            chat.chatbot: base + [{"role": "assistant", "content": "…"}],
            chat.state: update.session_id,
            chat.sessions: session_list(self.service, update.session_id),
            chat.title: self.service.open_session(update.session_id).info.title,
        }

    def _rejected(self, update: ReplyUpdate, shown: list, asked_in: str | None, text: str | None) -> dict:
        chat = self.chat
        if not self.tabs.shows(self.tab, asked_in):
            return {}
        restored = {} if text is None else {"value": {"text": text, "files": []}}
        return {
            chat.chatbot: shown + [views.error_message(update.error or "The message was not accepted.")],
            chat.chat_input: gr.MultimodalTextbox(**restored, **IDLE_INPUT),
            chat.state: update.session_id,
            chat.sessions: session_list(self.service, update.session_id),
        }

    def _finished(self, update: ReplyUpdate) -> dict:
        chat = self.chat
        return {
            chat.chatbot: history(self.service, update.session_id),
            chat.prompt_debug: views.prefix_list_markdown(update.prefix),
            chat.sessions: session_list(self.service, update.session_id),
        }


# ---- wiring ---------------------------------------------------------------------------------


def wire_chat(service: ChatService, config: AppConfig, chat: "ChatParts") -> TabViews:
    tabs = TabViews()
    b = chat.buttons
    outputs = [chat.chatbot, chat.chat_input, chat.state, chat.sessions, chat.prompt_debug, chat.title]

    def respond(message, session_id, set_value, rices, rices_k, temperature, max_new_tokens, num_frames,
                request: gr.Request):
        message = message or {}
        text, files = message.get("text") or "", message.get("files") or []
        options = chat_options(set_value, rices, rices_k, temperature, max_new_tokens, num_frames)
        tabs.show(request.session_hash, session_id)
        updates = service.send(session_id, text, files, options)
        yield from _Stream(service, chat, tabs, request.session_hash).run(updates, session_id, text)

    def regenerate(session_id, set_value, rices, rices_k, temperature, max_new_tokens, num_frames,
                   request: gr.Request):
        if session_id is None:
            yield {chat.chatbot: [views.error_message("Nothing to regenerate yet.")]}
            return
        options = chat_options(set_value, rices, rices_k, temperature, max_new_tokens, num_frames)
        tabs.show(request.session_hash, session_id)
        updates = service.regenerate(session_id, options)
        yield from _Stream(service, chat, tabs, request.session_hash).run(updates, session_id, None)

    inputs = [chat.state, *chat.option_inputs]
    reply = dict(concurrency_limit=max(1, config.concurrency), concurrency_id="reply")
    sent = chat.chat_input.submit(respond, [chat.chat_input, *inputs], outputs, **reply)
    again = b["regenerate"].click(regenerate, inputs, outputs, **reply)
    retried = chat.chatbot.retry(regenerate, inputs, outputs, **reply)
    for event in (sent, again, retried):
        event.then(lambda: gr.MultimodalTextbox(**IDLE_INPUT), None, chat.chat_input, queue=False)
    chat.chat_input.stop(lambda sid: service.stop(sid) and None, chat.state, None, queue=False)
    _wire_sessions(service, chat, tabs)
    return tabs


def _wire_sessions(service: ChatService, chat: "ChatParts", tabs: TabViews) -> None:
    b = chat.buttons

    def switch(tab: str, session_id: str | None) -> None:
        before = tabs.show(tab, session_id)
        if before and before != session_id and service.stop(before):
            log.info("tab moved away from session %s: its reply was stopped", before)

    def blank() -> dict:
        return {chat.state: None, chat.chatbot: [], chat.sessions: gr.Radio(value=None),
                chat.title: "", chat.prompt_debug: "*No reply yet.*",
                chat.export_file: gr.File(value=None, visible=False)}

    def new_session(request: gr.Request):
        switch(request.session_hash, None)
        return blank()

    def open_session(session_id, request: gr.Request):
        if not session_id:
            return new_session(request)
        try:
            view = service.open_session(session_id)
        except NotFound:
            gr.Warning("That conversation no longer exists.")
            return {chat.sessions: session_list(service, None)}
        switch(request.session_hash, session_id)
        set_value = str(view.info.example_set_id) if view.info.example_set_id else views.NO_SET
        return {chat.state: session_id, chat.chatbot: as_gradio(views.history(view.turns)),
                chat.title: view.info.title, chat.example_set: set_value,
                chat.prompt_debug: views.prefix_markdown(view.turns),
                chat.export_file: gr.File(value=None, visible=False)}

    def rename(session_id, title):
        if session_id:
            try:
                service.rename_session(session_id, title)
            except ValueError as exc:
                gr.Warning(str(exc))
        return session_list(service, session_id)

    def export(session_id):
        if not session_id:
            gr.Warning("Open a conversation first.")
            return gr.File(visible=False)
        return gr.File(value=str(service.export_session(session_id)), visible=True)

    def delete(session_id, request: gr.Request):
        if session_id:
            try:
                service.delete_session(session_id)
            except NotFound:
                pass
        tabs.show(request.session_hash, None)
        return {**blank(), chat.sessions: session_list(service, None), b["confirm"]: gr.Button(visible=False)}

    everything = [chat.state, chat.chatbot, chat.sessions, chat.title, chat.example_set,
                  chat.prompt_debug, chat.export_file, b["confirm"]]
    b["new"].click(new_session, None, everything, queue=False)
    chat.chatbot.clear(new_session, None, everything, queue=False)
    chat.sessions.input(open_session, chat.sessions, everything)
    b["rename"].click(rename, [chat.state, chat.title], chat.sessions)
    chat.title.submit(rename, [chat.state, chat.title], chat.sessions)
    b["export"].click(export, chat.state, chat.export_file)
    b["delete"].click(lambda sid: gr.Button(visible=bool(sid)), chat.state, b["confirm"], queue=False)
    b["confirm"].click(delete, chat.state, everything)
