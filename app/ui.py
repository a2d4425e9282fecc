"""The Gradio page: a chat tab (sessions, conversation, settings) and the examples tab.

Handlers only translate between components and the service; nothing here touches the model,
the database or files directly. Stable elem_ids are listed in shared/CONTRACTS.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from app import views
from app.config import AppConfig
from app.service import ChatService
from app.ui_chat import IDLE_INPUT, wire_chat
from app.ui_examples import build_examples_tab

log = logging.getLogger(__name__)

CSS = """
#model-status { font-size: 0.85em; opacity: 0.85; }
#sessions .wrap { flex-direction: column; align-items: stretch; }
#sessions label { width: 100%; }
#chatbot button[aria-label="Share"] { display: none; }  /* posts to Hugging Face: not offline */
"""


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
    buttons: dict = field(default_factory=dict)
    epoch: gr.State | None = None  # the tab's view epoch (see ui_chat.TabViews)

    @property
    def option_inputs(self) -> list:
        return [self.example_set, self.rices, self.rices_k, self.temperature,
                self.max_new_tokens, self.num_frames]


def build_ui(service: ChatService, config: AppConfig) -> gr.Blocks:
    with gr.Blocks(title="Flamingo chat", fill_height=True, delete_cache=(3600, 86400)) as demo:
        status = gr.Markdown(elem_id="model-status")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                chat = _chat_layout()
            with gr.Tab("Few-shot examples", id="examples", elem_id="examples-tab"):
                build_examples_tab(service, chat.example_set)
        tabs = wire_chat(service, config, chat)
        demo.load(lambda: service.model_status(), None, status, queue=False)
        demo.load(lambda: _page_load(service), None, [chat.sessions, chat.example_set], queue=False)

        def tab_closed(request: gr.Request) -> None:
            tabs.forget(request.session_hash)

        demo.unload(tab_closed)
    return demo


def _page_load(service: ChatService):
    sessions = gr.Radio(choices=views.session_choices(service.list_sessions()), value=None)
    sets = gr.Dropdown(choices=views.set_choices(service.list_sets()))
    return sessions, sets


def _chat_layout() -> ChatParts:
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
                                 buttons=["copy"], feedback_options=None, allow_file_downloads=False)
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
    buttons = dict(new=new_session, rename=rename, export=export, delete=delete,
                   confirm=confirm, regenerate=regenerate)
    return ChatParts(gr.State(None), sessions, title, chatbot, chat_input, example_set, rices, rices_k,
                     temperature, max_new_tokens, num_frames, prompt_debug, export_file, buttons,
                     gr.State(0))


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
