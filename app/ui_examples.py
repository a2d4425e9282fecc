"""The examples tab: create, rename, delete, import and export few-shot example sets, and add,
edit, reorder and remove their examples. Every handler answers with a fresh view of the set."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import gradio as gr

from app import views
from app.intake import InputRejected
from app.service import ChatService
from app.store import Conflict, NotFound
from app.zipio import ArchiveError

log = logging.getLogger(__name__)

USER_ERRORS = (ValueError, LookupError, InputRejected, ArchiveError, Conflict, NotFound)


@dataclass
class ExampleParts:
    set_picker: gr.Dropdown
    set_name: gr.Textbox
    gallery: gr.Gallery
    picker: gr.Radio
    edit_text: gr.Textbox
    status: gr.Markdown
    chat_sets: gr.Dropdown  # the chat tab's example-set selector, kept in step

    @property
    def view(self) -> list:
        return [self.set_picker, self.set_name, self.gallery, self.picker, self.edit_text,
                self.status, self.chat_sets]


def _layout(chat_sets: gr.Dropdown):
    with gr.Row():
        with gr.Column(scale=1, min_width=240):
            set_picker = gr.Dropdown(label="Example set", choices=[], value=None, elem_id="set-picker")
            new_name = gr.Textbox(label="New set name", elem_id="new-set-name")
            create = gr.Button("Create set", elem_id="create-set", variant="primary", size="sm")
            set_name = gr.Textbox(label="Rename selected set", elem_id="set-name")
            with gr.Row():
                rename = gr.Button("Rename", elem_id="rename-set", size="sm")
                delete = gr.Button("Delete set", elem_id="delete-set", size="sm", variant="stop")
            export = gr.Button("Export set as zip", elem_id="export-set", size="sm")
            export_file = gr.File(label="Exported set", elem_id="set-export-file", visible=False)
            import_file = gr.File(label="Import a set (.zip)", file_types=[".zip"], elem_id="import-set")
        with gr.Column(scale=3):
            status = gr.Markdown(elem_id="examples-status")
            gallery = gr.Gallery(label="Examples, in prompt order", columns=4, height=260,
                                 elem_id="example-gallery", allow_preview=False)
            picker = gr.Radio(label="Select an example to edit", choices=[], elem_id="example-picker")
            edit_text = gr.Textbox(label="Text of the selected example", lines=2, elem_id="example-edit-text")
            with gr.Row():
                save = gr.Button("Save text", elem_id="save-example", size="sm")
                up = gr.Button("▲ Earlier", elem_id="example-up", size="sm")
                down = gr.Button("▼ Later", elem_id="example-down", size="sm")
                remove = gr.Button("Remove", elem_id="remove-example", size="sm", variant="stop")
            with gr.Group():
                media = gr.File(label="New example: image or video", file_types=["image", "video"],
                                elem_id="example-media")
                text = gr.Textbox(label="New example: text (a caption, or Question: … Answer: …)",
                                  lines=2, elem_id="example-text")
                add = gr.Button("Add example", elem_id="add-example", variant="primary", size="sm")
    parts = ExampleParts(set_picker, set_name, gallery, picker, edit_text, status, chat_sets)
    controls = dict(new_name=new_name, create=create, rename=rename, delete=delete, export=export,
                    export_file=export_file, import_file=import_file, save=save, up=up, down=down,
                    remove=remove, media=media, text=text, add=add)
    return parts, controls


def build_examples_tab(service: ChatService, chat_sets: gr.Dropdown) -> ExampleParts:
    parts, c = _layout(chat_sets)
    handlers = _Handlers(service, parts, c)
    view = parts.view
    parts.set_picker.input(handlers.show_set, parts.set_picker, view)
    c["create"].click(handlers.create, c["new_name"], [*view, c["new_name"]])
    c["new_name"].submit(handlers.create, c["new_name"], [*view, c["new_name"]])
    c["rename"].click(handlers.rename, [parts.set_picker, parts.set_name], view)
    c["delete"].click(handlers.delete, [parts.set_picker, chat_sets], view)
    c["export"].click(handlers.export, parts.set_picker, [c["export_file"], parts.status])
    c["import_file"].upload(handlers.import_set, c["import_file"], [*view, c["import_file"]])
    parts.picker.input(handlers.pick, [parts.set_picker, parts.picker], parts.edit_text)
    c["save"].click(handlers.save, [parts.set_picker, parts.picker, parts.edit_text], view)
    c["up"].click(handlers.move(-1), [parts.set_picker, parts.picker], view)
    c["down"].click(handlers.move(+1), [parts.set_picker, parts.picker], view)
    c["remove"].click(handlers.remove, [parts.set_picker, parts.picker], view)
    c["add"].click(handlers.add, [parts.set_picker, c["media"], c["text"]], [*view, c["media"], c["text"]])
    return parts


class _Handlers:
    def __init__(self, service: ChatService, parts: ExampleParts, controls: dict):
        self.service = service
        self.p = parts
        self._new_name_box = controls["new_name"]
        self._import_box = controls["import_file"]
        self._media_box = controls["media"]
        self._text_box = controls["text"]

    # -- the view -------------------------------------------------------------------------------

    def view(self, set_id: int | None, example_id: int | None = None, message: str = "",
             chat_value: str | None = None) -> dict:
        sets = self.service.list_sets()
        if set_id is not None and set_id not in {s.id for s in sets}:
            set_id = None
        examples = self.service.examples(set_id) if set_id is not None else []
        chosen = next((e for e in examples if e.id == example_id), None)
        name = next((s.name for s in sets if s.id == set_id), "")
        chat = {"choices": views.set_choices(sets)}
        if chat_value is not None:
            chat["value"] = chat_value
        return {
            self.p.set_picker: gr.Dropdown(choices=views.set_choices(sets, with_none=False),
                                           value=str(set_id) if set_id is not None else None),
            self.p.set_name: name,
            self.p.gallery: views.gallery(examples),
            self.p.picker: gr.Radio(choices=views.example_choices(examples),
                                    value=str(chosen.id) if chosen else None),
            self.p.edit_text: chosen.text if chosen else "",
            self.p.status: message,
            self.p.chat_sets: gr.Dropdown(**chat),
        }

    def _failed(self, set_id: int | None, exc: Exception, example_id: int | None = None) -> dict:
        log.info("examples tab: %s", exc)
        return self.view(set_id, example_id, f"⚠️ {exc}")

    # -- sets -----------------------------------------------------------------------------------

    def show_set(self, set_value):
        return self.view(_int(set_value))

    def create(self, name):
        try:
            info = self.service.create_set(name or "")
        except USER_ERRORS as exc:
            return {**self._failed(None, exc), self._new_name_box: gr.skip()}
        return {**self.view(info.id, message=f"Created set **{info.name}**."), self._new_name_box: ""}

    def rename(self, set_value, name):
        set_id = _int(set_value)
        if set_id is None:
            return self.view(None, message="⚠️ Choose a set first.")
        try:
            self.service.rename_set(set_id, name or "")
        except USER_ERRORS as exc:
            return self._failed(set_id, exc)
        return self.view(set_id, message="Renamed.")

    def delete(self, set_value, chat_value):
        set_id = _int(set_value)
        if set_id is None:
            return self.view(None, message="⚠️ Choose a set first.")
        self.service.delete_set(set_id)
        chat_value = views.NO_SET if chat_value == str(set_id) else None
        return self.view(None, message="Deleted the set.", chat_value=chat_value)

    def export(self, set_value):
        set_id = _int(set_value)
        if set_id is None:
            return gr.File(visible=False), "⚠️ Choose a set first."
        path = self.service.export_set(set_id)
        return gr.File(value=str(path), visible=True), f"Exported to `{path.name}`."

    def import_set(self, zip_path):
        if not zip_path:
            return self.view(None)
        try:
            info = self.service.import_set(zip_path)
        except USER_ERRORS as exc:
            return {**self._failed(None, exc), self._import_box: None}
        message = f"Imported **{info.name}** with {info.size} example(s)."
        return {**self.view(info.id, message=message), self._import_box: None}

    # -- examples -------------------------------------------------------------------------------

    def pick(self, set_value, example_value):
        example_id = _int(example_value)
        for example in self.service.examples(_int(set_value)) if _int(set_value) is not None else []:
            if example.id == example_id:
                return example.text
        return ""

    def add(self, set_value, media_path, text):
        set_id = _int(set_value)
        keep = {self._media_box: gr.skip(), self._text_box: gr.skip()}
        if set_id is None:
            return {**self.view(None, message="⚠️ Create or choose a set first."), **keep}
        if not media_path:
            return {**self.view(set_id, message="⚠️ Choose an image or a video for the example."), **keep}
        try:
            example_id = self.service.add_example(set_id, media_path, text or "")
        except USER_ERRORS as exc:
            return {**self._failed(set_id, exc), **keep}
        return {**self.view(set_id, example_id, "Example added."), self._media_box: None, self._text_box: ""}

    def save(self, set_value, example_value, text):
        set_id, example_id = _int(set_value), _int(example_value)
        if example_id is None:
            return self.view(set_id, message="⚠️ Select an example first.")
        try:
            self.service.update_example(example_id, text or "")
        except USER_ERRORS as exc:
            return self._failed(set_id, exc)
        return self.view(set_id, example_id, "Saved.")

    def move(self, delta: int):
        def handler(set_value, example_value):
            set_id, example_id = _int(set_value), _int(example_value)
            if example_id is None:
                return self.view(set_id, message="⚠️ Select an example first.")
            try:
                self.service.move_example(example_id, delta)
            except USER_ERRORS as exc:
                return self._failed(set_id, exc)
            return self.view(set_id, example_id)

        return handler

    def remove(self, set_value, example_value):
        set_id, example_id = _int(set_value), _int(example_value)
        if example_id is None:
            return self.view(set_id, message="⚠️ Select an example first.")
        try:
            self.service.remove_example(example_id)
        except USER_ERRORS as exc:
            return self._failed(set_id, exc)
        return self.view(set_id, message="Removed.")


def _int(value) -> int | None:
    try:
        return None if value in (None, "", views.NO_SET) else int(value)
    except (TypeError, ValueError):
        return None
