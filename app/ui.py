"""The Gradio page: a chat tab (sessions, conversation, settings) and the examples tab.

Handlers only translate between components and the service; nothing here touches the model,
the database or files directly. Stable elem_ids are listed in shared/CONTRACTS.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app import views
from app.config import AppConfig, ChatOptions
from app.service import ChatService, ReplyUpdate
from app.store import NotFound
from app.ui_examples import build_examples_tab
from engine.conversation import GenerationSettings

log = logging.getLogger(__name__)

CSS = """
#model-status { font-size: 0.85em; opacity: 0.85; }
#sessions .wrap { flex-direction: column; align-items: stretch; }
#sessions label { width: 100%; }
#chatbot button[aria-label="Share"] { display: none; }  /* posts to Hugging Face: not offline */
"""

BUSY_INPUT = dict(submit_btn=False, stop_btn=True)
IDLE_INPUT = dict(submit_btn=True, stop_btn=False)


def theme() -> gr.themes.Theme:
    """Gradio's default look with system fonts only: nothing is fetched from a font CDN."""
    return gr.themes.Default(
        font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
        font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"],
    )


@dataclass
class ChatParts:
    """The chat tab's components that handlers read or write."""

    state: gr.State
    sessions: gr.Radio
    title: gr.Textbox
    chatbot: gr.Chatbot
    chat_input: gr.MultimodalTextbox
    example_set: gr.Dropdown
    rices: gr.Checkbox
    rices_k: gr.Slider
    temperature: gr.Slider
    max_new_tokens: gr.Slider
    num_frames: gr.Slider
    prompt_debug: gr.Markdown
    export_file: gr.File

    @property
    def option_inputs(self) -> list:
        return [self.example_set, self.rices, self.rices_k, self.temperature,
                self.max_new_tokens, self.num_frames]


def chat_options(set_value, rices, rices_k, temperature, max_new_tokens, num_frames) -> ChatOptions:
    settings = GenerationSettings(
        max_new_tokens=int(max_new_tokens), temperature=float(temperature), num_frames=int(num_frames)
    )
    return ChatOptions(settings, views.set_id_of(set_value), bool(rices), int(rices_k))


def build_ui(service: ChatService, config: AppConfig) -> gr.Blocks:
    with gr.Blocks(title="Flamingo chat", fill_height=True, delete_cache=(3600, 86400)) as demo:
        status = gr.Markdown(elem_id="model-status")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                chat = _chat_layout(config)
            with gr.Tab("Few-shot examples", id="examples", elem_id="examples-tab"):
                build_examples_tab(service, config, chat.example_set)
        _wire_chat(service, config, chat)
        demo.load(lambda: service.model_status(), None, status, queue=False)
        demo.load(lambda: _page_load(service), None, [chat.sessions, chat.example_set], queue=False)
    return demo


def _page_load(service: ChatService):
    sessions = gr.Radio(choices=views.session_choices(service.list_sessions()), value=None)
    sets = gr.Dropdown(choices=views.set_choices(service.list_sets()))
    return sessions, sets


def _chat_layout(config: AppConfig) -> ChatParts:
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=220):
            new_session = gr.Button("+ New conversation", elem_id="new-session", variant="primary")
            sessions = gr.Radio(label="Conversations", choices=[], elem_id="sessions")
            with gr.Accordion("Manage conversation", open=False, elem_id="session-actions"):
                title = gr.Textbox(label="Name", elem_id="session-title")
                rename = gr.Button("Rename", elem_id="rename-session", size="sm")
                export = gr.Button("Export as zip", elem_id="export-session", size="sm")
                export_file = gr.File(label="Export", elem_id="session-export-file", visible=False)
                delete = gr.Button("Delete", elem_id="delete-session", size="sm", variant="stop")
                confirm = gr.Button("Really delete?", elem_id="delete-session-confirm", size="sm",
                                    variant="stop", visible=False)
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(elem_id="chatbot", label="Conversation", height=520,
                                 buttons=["copy"], feedback_options=None, allow_file_downloads=False,
                                 group_consecutive_messages=False)
            chat_input = gr.MultimodalTextbox(
                elem_id="chat-input", file_types=["image", "video"], file_count="multiple",
                placeholder="Ask about an image or a video; drop or paste files here",
                show_label=False, sources=["upload"], **IDLE_INPUT,
            )
            with gr.Row():
                regenerate = gr.Button("↻ Regenerate last reply", elem_id="regenerate", size="sm")
            with gr.Accordion("Settings", open=False, elem_id="settings"):
                with gr.Row():
                    example_set = gr.Dropdown(label="Few-shot example set", choices=[(views.NO_SET,) * 2],
                                              value=views.NO_SET, elem_id="example-set")
                    rices = gr.Checkbox(label="Pick the most similar examples per image (RICES)",
                                        elem_id="rices")
                    rices_k = gr.Slider(1, 16, value=2, step=1, label="Examples per image (k)",
                                        elem_id="rices-k")
                with gr.Row():
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                            elem_id="temperature")
                    max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens",
                                               elem_id="max-new-tokens")
                    num_frames = gr.Slider(1, 32, value=8, step=1, label="Frames per video",
                                           elem_id="num-frames")
            with gr.Accordion("Prompt details", open=False, elem_id="prompt-details"):
                prompt_debug = gr.Markdown("*No reply yet.*", elem_id="prompt-debug")
    parts = ChatParts(gr.State(None), sessions, title, chatbot, chat_input, example_set, rices, rices_k,
                      temperature, max_new_tokens, num_frames, prompt_debug, export_file)
    parts.buttons = dict(new=new_session, rename=rename, export=export, delete=delete,
                         confirm=confirm, regenerate=regenerate)
    return parts


# ---- chat handlers ------------------------------------------------------------------------


def _session_list(service: ChatService, selected: str | None) -> gr.Radio:
    return gr.Radio(choices=views.session_choices(service.list_sessions()), value=selected)


def _stream_outputs(chat: ChatParts) -> list:
    return [chat.chatbot, chat.chat_input, chat.state, chat.sessions, chat.prompt_debug, chat.title]


def _render_updates(service: ChatService, chat: ChatParts, updates, session_id: str | None,
                    text: str | None):
    """Turn the service's ReplyUpdates into component updates (a generator for Gradio).
    `text` is the message being sent (None for regenerate, which leaves the box alone)."""
    shown = _history(service, session_id)
    busy = gr.MultimodalTextbox(**BUSY_INPUT) if text is None else gr.MultimodalTextbox(value=None, **BUSY_INPUT)
    yield {chat.chatbot: shown, chat.chat_input: busy}
    base: list = shown
    for update in updates:
        if update.status == "rejected":
            yield _rejected(service, chat, update, shown, text)
            return
        if update.status == "accepted":
            base = _history(service, update.session_id)
            yield _accepted(service, chat, update, base)
        elif update.status == "streaming":
            partial = {"role": "assistant", "content": views.reply_text(update.text, "streaming")}
            yield {chat.chatbot: base + [partial]}
        else:
            yield _finished(service, chat, update)


def _rejected(service: ChatService, chat: ChatParts, update: ReplyUpdate, shown: list,
              text: str | None) -> dict:
    restored = {} if text is None else {"value": {"text": text, "files": []}}
    return {
        chat.chatbot: shown + [views.error_message(update.error or "The message was not accepted.")],
        chat.chat_input: gr.MultimodalTextbox(**restored, **IDLE_INPUT),
        chat.state: update.session_id,
        chat.sessions: _session_list(service, update.session_id),
    }


def _accepted(service: ChatService, chat: ChatParts, update: ReplyUpdate, base: list) -> dict:
    info = service.open_session(update.session_id).info
    return {
        chat.chatbot: base + [{"role": "assistant", "content": "…"}],
        chat.state: update.session_id,
        chat.sessions: _session_list(service, update.session_id),
        chat.title: info.title,
    }


def _finished(service: ChatService, chat: ChatParts, update: ReplyUpdate) -> dict:
    return {
        chat.chatbot: _history(service, update.session_id),
        chat.prompt_debug: views.prefix_list_markdown(update.prefix),
        chat.chat_input: gr.MultimodalTextbox(**IDLE_INPUT),
        chat.sessions: _session_list(service, update.session_id),
    }


def _history(service: ChatService, session_id: str | None) -> list:
    if session_id is None:
        return []
    try:
        return as_gradio(views.history(service.open_session(session_id).turns))
    except NotFound:
        return []


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


def _wire_chat(service: ChatService, config: AppConfig, chat: ChatParts) -> None:
    b = chat.buttons
    outputs = _stream_outputs(chat)

    def respond(message, session_id, *option_values):
        message = message or {}
        text, files = message.get("text") or "", message.get("files") or []
        options = chat_options(*option_values)
        updates = service.send(session_id, text, files, options)
        yield from _render_updates(service, chat, updates, session_id, text)

    def regenerate(session_id, *option_values):
        if session_id is None:
            yield {chat.chatbot: [views.error_message("Nothing to regenerate yet.")]}
            return
        updates = service.regenerate(session_id, chat_options(*option_values))
        yield from _render_updates(service, chat, updates, session_id, None)

    limit = max(1, config.concurrency)
    sent = chat.chat_input.submit(respond, [chat.chat_input, chat.state, *chat.option_inputs], outputs,
                                  concurrency_limit=limit, concurrency_id="reply")
    again = b["regenerate"].click(regenerate, [chat.state, *chat.option_inputs], outputs,
                                  concurrency_limit=limit, concurrency_id="reply")
    retried = chat.chatbot.retry(regenerate, [chat.state, *chat.option_inputs], outputs,
                                 concurrency_limit=limit, concurrency_id="reply")
    for event in (sent, again, retried):
        event.then(lambda: gr.MultimodalTextbox(**IDLE_INPUT), None, chat.chat_input, queue=False)
    chat.chat_input.stop(lambda sid: service.stop(sid) and None, chat.state, None, queue=False)
    _wire_sessions(service, chat)


def _wire_sessions(service: ChatService, chat: ChatParts) -> None:
    b = chat.buttons

    def new_session():
        return {chat.state: None, chat.chatbot: [], chat.sessions: gr.Radio(value=None),
                chat.title: "", chat.prompt_debug: "*No reply yet.*",
                chat.export_file: gr.File(value=None, visible=False)}

    def open_session(session_id):
        if not session_id:
            return new_session()
        try:
            view = service.open_session(session_id)
        except NotFound:
            gr.Warning("That conversation no longer exists.")
            return {chat.sessions: _session_list(service, None)}
        set_value = str(view.info.example_set_id) if view.info.example_set_id else views.NO_SET
        return {chat.state: session_id, chat.chatbot: as_gradio(views.history(view.turns)), chat.title: view.info.title,
                chat.example_set: set_value, chat.prompt_debug: views.prefix_markdown(view.turns),
                chat.export_file: gr.File(value=None, visible=False)}

    def rename(session_id, title):
        if session_id:
            try:
                service.rename_session(session_id, title)
            except ValueError as exc:
                gr.Warning(str(exc))
        return _session_list(service, session_id)

    def export(session_id):
        if not session_id:
            gr.Warning("Open a conversation first.")
            return gr.File(visible=False)
        return gr.File(value=str(service.export_session(session_id)), visible=True)

    def delete(session_id):
        if session_id:
            try:
                service.delete_session(session_id)
            except NotFound:
                pass
        return {**new_session(), chat.sessions: _session_list(service, None),
                b["confirm"]: gr.Button(visible=False)}

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


def launch_options(config: AppConfig) -> dict:
    """Keyword arguments for Blocks.launch: offline, local files only from the data dir."""
    return dict(
        server_name=config.host,
        server_port=config.port,
        theme=theme(),
        css=CSS,
        allowed_paths=[str(Path(config.data_dir).resolve() / "media"),
                       str(Path(config.data_dir).resolve() / "exports")],
        max_file_size=int(config.limits.max_bytes * 4),
        footer_links=["settings"],
        run_history=False,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        enable_monitoring=False,
        show_error=True,
        quiet=True,
    )
