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
    """Per browser tab (Gradio session hash): which session it shows, and a counter that moves
    on every switch, so a reply started before the switch knows it is no longer watched."""

    def __init__(self):
        self._shown: dict[str, str | None] = {}
        self._epoch: dict[str, int] = {}
        self._lock = threading.Lock()

    def epoch(self, tab: str) -> int:
        with self._lock:
            return self._epoch.get(tab, 0)

    def switch(self, tab: str, session_id: str | None) -> tuple[str | None, int]:
        """The tab now shows `session_id`; returns the session it showed before and the new epoch."""
        with self._lock:
            before = self._shown.get(tab)
            self._shown[tab] = session_id
            self._epoch[tab] = self._epoch.get(tab, 0) + 1
            return before, self._epoch[tab]

    def replying_in(self, tab: str, session_id: str | None) -> None:
        """A reply started in the tab has created or entered `session_id` (not a switch)."""
        with self._lock:
            self._shown[tab] = session_id

    def forget(self, tab: str) -> None:
        with self._lock:
            self._shown.pop(tab, None)
            self._epoch.pop(tab, None)


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
    """Turns one reply's ReplyUpdates into component updates for one browser tab. If the tab
    switches to another conversation meanwhile, the reply is stopped and nothing more is shown."""

    def __init__(self, service: ChatService, chat: "ChatParts", tabs: TabViews, tab: str, epoch: int):
        """`epoch`: the tab's view epoch when the user pressed send (from a gr.State)."""
        self.service, self.chat, self.tabs, self.tab, self.epoch = service, chat, tabs, tab, epoch
        self.stopped = False

    def watched(self, session_id: str | None) -> bool:
        if self.tabs.epoch(self.tab) == self.epoch:
            return True
        if session_id and not self.stopped:
            self.stopped = self.service.stop(session_id)
        return False

    def run(self, updates, session_id: str | None, text: str | None):
        """`text`: the message being sent (None for regenerate, which leaves the box alone)."""
        chat = self.chat
        if not self.watched(None):  # switched before the reply even started: send nothing
            log.info("tab %s switched conversation before the message was sent; not sending", self.tab)
            return
        shown = history(self.service, session_id)
        busy = dict(BUSY_INPUT) if text is None else dict(value=None, **BUSY_INPUT)
        yield {chat.chatbot: shown, chat.chat_input: gr.MultimodalTextbox(**busy)}
        base = shown
        for update in updates:
            if not self.watched(update.session_id):
                continue  # the user moved to another conversation: keep quiet
            if update.status == "accepted":
                self.tabs.replying_in(self.tab, update.session_id)
                base = history(self.service, update.session_id)
                yield self._accepted(update, base)
            elif update.status == "rejected":
                yield self._rejected(update, shown, text)
            elif update.status == "streaming":
                partial = {"role": "assistant", "content": views.reply_text(update.text, "streaming")}
                yield {chat.chatbot: base + [partial]}
            else:
                yield self._finished(update)
        yield {chat.chat_input: gr.MultimodalTextbox(**IDLE_INPUT)}

    def _accepted(self, update: ReplyUpdate, base: list) -> dict:
        chat = self.chat
        return {
            chat.chatbot: base + [{"role": "assistant", "content": "…"}],
            chat.state: update.session_id,
            chat.sessions: session_list(self.service, update.session_id),
            chat.title: self.service.open_session(update.session_id).info.title,
        }

    def _rejected(self, update: ReplyUpdate, shown: list, text: str | None) -> dict:
        chat = self.chat
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

    def respond(message, session_id, epoch, set_value, rices, rices_k, temperature, max_new_tokens,
                num_frames, request: gr.Request):
        message = message or {}
        text, files = message.get("text") or "", message.get("files") or []
        options = chat_options(set_value, rices, rices_k, temperature, max_new_tokens, num_frames)
        stream = _Stream(service, chat, tabs, request.session_hash, epoch)
        yield from stream.run(service.send(session_id, text, files, options), session_id, text)

    def regenerate(session_id, epoch, set_value, rices, rices_k, temperature, max_new_tokens, num_frames,
                   request: gr.Request):
        if session_id is None:
            yield {chat.chatbot: [views.error_message("Nothing to regenerate yet.")]}
            return
        options = chat_options(set_value, rices, rices_k, temperature, max_new_tokens, num_frames)
        stream = _Stream(service, chat, tabs, request.session_hash, epoch)
        yield from stream.run(service.regenerate(session_id, options), session_id, None)

    inputs = [chat.state, chat.epoch, *chat.option_inputs]
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

    def switch(tab: str, session_id: str | None) -> int:
        before, epoch = tabs.switch(tab, session_id)
        if before and before != session_id and service.stop(before):
            log.info("tab moved away from session %s: its reply was stopped", before)
        return epoch

    def blank() -> dict:
        return {chat.state: None, chat.chatbot: [], chat.sessions: gr.Radio(value=None),
                chat.title: "", chat.prompt_debug: "*No reply yet.*",
                chat.export_file: gr.File(value=None, visible=False)}

    def new_session(request: gr.Request):
        return {**blank(), chat.epoch: switch(request.session_hash, None)}

    def open_session(session_id, request: gr.Request):
        if not session_id:
            return new_session(request)
        try:
            view = service.open_session(session_id)
        except NotFound:
            gr.Warning("That conversation no longer exists.")
            return {chat.sessions: session_list(service, None)}
        epoch = switch(request.session_hash, session_id)
        set_value = str(view.info.example_set_id) if view.info.example_set_id else views.NO_SET
        return {chat.state: session_id, chat.chatbot: as_gradio(views.history(view.turns)),
                chat.title: view.info.title, chat.example_set: set_value,
                chat.prompt_debug: views.prefix_markdown(view.turns),
                chat.export_file: gr.File(value=None, visible=False), chat.epoch: epoch}

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
        return {**blank(), chat.epoch: switch(request.session_hash, None),
                chat.sessions: session_list(service, None), b["confirm"]: gr.Button(visible=False)}

    everything = [chat.state, chat.epoch, chat.chatbot, chat.sessions, chat.title, chat.example_set,
                  chat.prompt_debug, chat.export_file, b["confirm"]]
    b["new"].click(new_session, None, everything, queue=False)
    chat.chatbot.clear(new_session, None, everything, queue=False)
    chat.sessions.input(open_session, chat.sessions, everything)
    b["rename"].click(rename, [chat.state, chat.title], chat.sessions)
    chat.title.submit(rename, [chat.state, chat.title], chat.sessions)
    b["export"].click(export, chat.state, chat.export_file)
    b["delete"].click(lambda sid: gr.Button(visible=bool(sid)), chat.state, b["confirm"], queue=False)
    b["confirm"].click(delete, chat.state, everything)
