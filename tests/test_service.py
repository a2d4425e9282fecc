"""The chat service with the real chat engine around the tiny random-weight model.

Wrappers here only observe the real engine (what Conversation it was given), slow it down, or
make it fail on purpose; the text always comes from the real model.
"""
from __future__ import annotations

import threading
import time
import zipfile
from pathlib import Path

import pytest

from app.config import ChatOptions, UploadLimits
from app.service import ChatService
from engine.conversation import GenerationSettings
from engine.media import MediaError

pytest_plugins = ["conftest_app"]

SETTINGS = GenerationSettings(max_new_tokens=12, temperature=0.0, num_frames=2)
OPTIONS = ChatOptions(SETTINGS)


class SpyEngine:
    """The real engine, plus: a record of each call, a delay per text delta, or a planned failure."""

    def __init__(self, real, delay: float = 0.0, fail_after: int | None = None,
                 media_error: bool = False, store=None):
        self.real = real
        self.delay = delay
        self.fail_after = fail_after
        self.media_error = media_error
        self.store = store
        self.calls: list[dict] = []
        self.lock = threading.Lock()

    def describe(self):
        return self.real.describe()

    def calls_by_session(self, session_id):
        return next(c for c in self.calls if c["session_id"] == session_id)

    def embed_media(self, path):
        return self.real.embed_media(path)

    def stream(self, conversation, settings, cancel=None, session_id=None):
        stored = self.store.turns(session_id) if self.store is not None else None
        with self.lock:
            self.calls.append({"conversation": conversation, "session_id": session_id, "stored": stored})
        if self.media_error:
            raise MediaError("the vision tower could not decode this file")
        return _SpyStream(self, self.real.stream(conversation, settings, cancel=cancel, session_id=session_id))


class _SpyStream:
    def __init__(self, spy: SpyEngine, inner):
        self.spy, self.inner = spy, inner

    def __iter__(self):
        for i, delta in enumerate(self.inner):
            if self.spy.fail_after is not None and i >= self.spy.fail_after:
                raise RuntimeError("simulated device failure")
            time.sleep(self.spy.delay)
            yield delta

    @property
    def finish_reason(self):
        return self.inner.finish_reason

    @property
    def dropped_turns(self):
        return self.inner.dropped_turns


def run(updates) -> list:
    return list(updates)


@pytest.fixture
def service(store, tiny_engine):
    return ChatService(store, tiny_engine, UploadLimits(max_bytes=1024 * 1024))


def spied(store, tiny_engine, **kw) -> tuple[ChatService, SpyEngine]:
    spy = SpyEngine(tiny_engine, store=store, **kw)
    return ChatService(store, spy, UploadLimits(max_bytes=1024 * 1024)), spy


def test_model_status_names_model_device_and_parameter_counts(service):
    text = service.model_status()
    assert "device" in text and "frozen params" in text and "trainable params" in text


def test_turn_lifecycle_user_turn_committed_before_generation(store, tiny_engine, media):
    service, spy = spied(store, tiny_engine)
    updates = run(service.send(None, "What is this?", [media.image()], OPTIONS))

    assert updates[0].status == "accepted"
    assert updates[-1].status == "complete" and updates[-1].done
    assert all(u.status == "streaming" for u in updates[1:-1])
    session_id = updates[-1].session_id
    # when the engine was called, the user's turn was already in the database
    stored_at_call = spy.calls[0]["stored"]
    assert [t.role for t in stored_at_call] == ["user"] and stored_at_call[0].text == "What is this?"
    turns = store.turns(session_id)
    assert [t.role for t in turns] == ["user", "assistant"]
    assert turns[1].status == "complete" and turns[1].text == updates[-1].text
    assert turns[1].finish_reason in ("eoc", "eos", "length")
    assert turns[0].media[0].path.exists() and turns[0].media[0].kind == "image"
    conversation = spy.calls[0]["conversation"]
    assert conversation.turns[-1].role == "user" and conversation.turns[-1].media == [str(turns[0].media[0].path)]
    assert store.list_sessions()[0].title == "What is this?"


def test_video_message_and_follow_up_keeps_history(store, tiny_engine, media):
    service, spy = spied(store, tiny_engine)
    first = run(service.send(None, "", [media.video()], OPTIONS))
    session_id = first[-1].session_id
    assert first[-1].status == "complete"
    second = run(service.send(session_id, "And then?", [], OPTIONS))
    assert second[-1].status == "complete"
    roles = [t.role for t in spy.calls[1]["conversation"].turns]
    assert roles[-1] == "user" and roles.count("user") == 2
    assert store.turns(session_id)[0].media[0].kind == "video"


def test_stop_keeps_partial_reply_marked_stopped(store, tiny_engine, media):
    service, _ = spied(store, tiny_engine, delay=0.05)
    options = ChatOptions(GenerationSettings(max_new_tokens=200, num_frames=2))
    seen = []
    for update in service.send(None, "Tell me a long story", [media.image()], options):
        seen.append(update)
        if update.status == "streaming":
            assert service.stop(update.session_id)
    final = seen[-1]
    assert final.status == "stopped"
    reply = store.turns(final.session_id)[-1]
    assert reply.status == "stopped" and reply.finish_reason == "cancelled"
    assert reply.text == final.text and len(final.text) > 0
    assert not service.is_running(final.session_id)


def test_failed_reply_is_stored_with_status_and_next_message_works(store, tiny_engine, media):
    service, spy = spied(store, tiny_engine, fail_after=1)
    updates = run(service.send(None, "hi", [media.image()], OPTIONS))
    assert updates[-1].status == "failed" and "simulated device failure" in updates[-1].error
    session_id = updates[-1].session_id
    reply = store.turns(session_id)[-1]
    assert reply.role == "assistant" and reply.status == "failed" and "simulated" in reply.error
    spy.fail_after = None
    again = run(service.send(session_id, "try again", [], OPTIONS))
    assert again[-1].status == "complete"
    # the failed reply is kept in the store but not fed back to the model
    assert [t.role for t in spy.calls[-1]["conversation"].turns] == ["user", "user"]


def test_regenerate_replaces_the_last_reply(store, tiny_engine, media):
    service, spy = spied(store, tiny_engine)
    first = run(service.send(None, "Describe", [media.image()], OPTIONS))
    session_id = first[-1].session_id
    options = ChatOptions(GenerationSettings(max_new_tokens=12, temperature=1.0, seed=7, num_frames=2))
    again = run(service.regenerate(session_id, options))
    assert again[0].status == "accepted" and again[-1].status == "complete"
    turns = store.turns(session_id)
    assert [t.role for t in turns] == ["user", "assistant"]
    assert turns[-1].text == again[-1].text
    assert [t.role for t in spy.calls[-1]["conversation"].turns] == ["user"]


def test_regenerate_without_messages_is_rejected(service, store):
    session = store.create_session("empty")
    assert run(service.regenerate(session.id, OPTIONS))[-1].status == "rejected"


def test_example_set_prefix_reaches_the_conversation(store, tiny_engine, media):
    service, spy = spied(store, tiny_engine)
    ex_set = service.create_set("Captions")
    service.add_example(ex_set.id, media.image((255, 0, 0)), "A red square.")
    service.add_example(ex_set.id, media.video(), "A flickering clip.")
    options = ChatOptions(SETTINGS, example_set_id=ex_set.id)
    updates = run(service.send(None, "", [media.image((0, 0, 255))], options))

    conversation = spy.calls[0]["conversation"]
    assert [e.text for e in conversation.examples] == ["A red square.", "A flickering clip."]
    assert all(Path(e.media[0]).exists() for e in conversation.examples)
    assert [p["text"] for p in updates[-1].prefix] == ["A red square.", "A flickering clip."]
    session_id = updates[-1].session_id
    assert [p["text"] for p in store.turns(session_id)[-1].prefix] == ["A red square.", "A flickering clip."]
    assert store.get_session(session_id).example_set_id == ex_set.id


def test_rices_picks_the_most_similar_example_per_image(store, tiny_engine, media):
    service, spy = spied(store, tiny_engine)
    ex_set = service.create_set("Colours")
    red, green, blue = media.image((250, 0, 0)), media.image((0, 250, 0)), media.image((0, 0, 250))
    for path, text in [(red, "red"), (green, "green"), (blue, "blue")]:
        service.add_example(ex_set.id, path, text)
    query = media.folder / "query.png"
    query.write_bytes(green.read_bytes())  # same pixels as the "green" example
    options = ChatOptions(SETTINGS, example_set_id=ex_set.id, rices=True, rices_k=1)
    run(service.send(None, "colour?", [query], options))
    assert [e.text for e in spy.calls[0]["conversation"].examples] == ["green"]


@pytest.mark.parametrize("make", ["text_file", "corrupt_image", "empty_video", "garbage_video", "too_big"])
def test_bad_uploads_are_rejected_cleanly_and_next_message_works(store, service, media, make):
    bad = media.big_file(2) if make == "too_big" else getattr(media, make)()
    updates = run(service.send(None, "look", [media.image(), bad], OPTIONS))
    assert len(updates) == 1 and updates[0].status == "rejected"
    assert bad.name in updates[0].error and str(bad.parent) not in updates[0].error
    assert store.list_sessions() == [] and store.blobs.files() == []
    ok = run(service.send(None, "look again", [media.image()], OPTIONS))
    assert ok[-1].status == "complete"


def test_bad_upload_in_existing_session_stores_nothing(store, service, media):
    first = run(service.send(None, "hello", [], OPTIONS))
    session_id = first[-1].session_id
    before = store.turns(session_id)
    rejected = run(service.send(session_id, "this", [media.corrupt_image()], OPTIONS))
    assert rejected[-1].status == "rejected" and rejected[-1].session_id == session_id
    assert store.turns(session_id) == before


def test_engine_media_error_rolls_back_the_user_turn(store, tiny_engine, media):
    service, spy = spied(store, tiny_engine, media_error=True)
    updates = run(service.send(None, "look", [media.image()], OPTIONS))
    assert updates[-1].status == "rejected" and "could not decode" in updates[-1].error
    assert store.list_sessions() == [] and store.blobs.files() == []
    spy.media_error = False
    assert run(service.send(None, "again", [media.image()], OPTIONS))[-1].status == "complete"


def test_one_reply_at_a_time_per_session(store, tiny_engine, media):
    service, _ = spied(store, tiny_engine, delay=0.02)
    options = ChatOptions(GenerationSettings(max_new_tokens=40, num_frames=2))
    first = service.send(None, "one", [], options)
    accepted = next(first)
    clash = run(service.send(accepted.session_id, "two", [], options))
    assert clash[-1].status == "rejected" and "still being written" in clash[-1].error
    service.stop(accepted.session_id)
    assert run(first)[-1].status == "stopped"


def test_abandoned_stream_is_saved_as_stopped(store, tiny_engine, media):
    service, _ = spied(store, tiny_engine, delay=0.01)
    options = ChatOptions(GenerationSettings(max_new_tokens=40, num_frames=2))
    gen = service.send(None, "bye", [], options)
    accepted = next(gen)
    next(gen)  # some text
    gen.close()  # e.g. the browser went away
    reply = store.turns(accepted.session_id)[-1]
    assert reply.role == "assistant" and reply.status == "stopped"
    assert not service.is_running(accepted.session_id)


def test_ten_sessions_streaming_at_once(store, tiny_engine, media):
    service, spy = spied(store, tiny_engine, delay=0.002)
    prompts = [f"Question number {i}: what colour?" for i in range(10)]
    images = [media.image((25 * i, 200 - 15 * i, 7 * i)) for i in range(10)]
    results: dict[int, list] = {}
    barrier = threading.Barrier(10)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = run(service.send(None, prompts[i], [images[i]], OPTIONS))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 10
    for i, updates in results.items():
        final = updates[-1]
        assert final.status == "complete", final
        turns = store.turns(final.session_id)
        assert [t.role for t in turns] == ["user", "assistant"]
        assert turns[0].text == prompts[i]
        assert turns[1].text == final.text
        assert turns[0].media[0].path.read_bytes() == images[i].read_bytes()
    assert len({u[-1].session_id for u in results.values()}) == 10
    # greedy replies equal what each conversation gets when it runs alone
    for i, updates in results.items():
        alone = tiny_engine.reply(spy.calls_by_session(updates[-1].session_id)["conversation"], OPTIONS.settings)
        assert alone == updates[-1].text, i
    # every engine call saw only its own session's message
    for call in spy.calls:
        own = [t.text for t in store.turns(call["session_id"]) if t.role == "user"]
        assert [t.text for t in call["conversation"].turns] == own


def test_export_session_zip_holds_json_and_media(service, store, media):
    updates = run(service.send(None, "zip me", [media.image(), media.video()], OPTIONS))
    path = service.export_session(updates[-1].session_id)
    assert path.parent == store.data_dir / "exports"
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        import json

        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["format"] == "flamingo-chat-session" and manifest["title"] == "zip me"
    assert [t["role"] for t in manifest["turns"]] == ["user", "assistant"]
    assert sorted(m["file"] for m in manifest["turns"][0]["media"]) == sorted(n for n in names if n.startswith("media/"))


def test_example_set_export_import_roundtrip(service, store, media):
    ex_set = service.create_set("Round trip")
    service.add_example(ex_set.id, media.image((1, 2, 3)), "first")
    service.add_example(ex_set.id, media.video(), "Question: what moves? Answer: colours.")
    archive = service.export_set(ex_set.id)
    imported = service.import_set(archive)
    assert imported.name == "Round trip (2)" and imported.size == 2
    texts = [e.text for e in service.examples(imported.id)]
    assert texts == ["first", "Question: what moves? Answer: colours."]
    assert [e.media.kind for e in service.examples(imported.id)] == ["image", "video"]
    assert len(store.blobs.files()) == 2  # shared content, stored once


def test_import_rejects_foreign_or_unsafe_zips(service, store, tmp_path):
    from app.zipio import ArchiveError

    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ArchiveError):
        service.import_set(junk)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("manifest.json", '{"format": "flamingo-example-set", "version": 1, "name": "x",'
                    ' "examples": [{"text": "t", "media": {"file": "../../etc/passwd"}}]}')
    with pytest.raises(ArchiveError):
        service.import_set(evil)
    assert service.list_sets() == []


def test_delete_session_removes_its_media(service, store, media):
    updates = run(service.send(None, "temp", [media.image()], OPTIONS))
    assert len(store.blobs.files()) == 1
    service.delete_session(updates[-1].session_id)
    assert store.blobs.files() == [] and service.list_sessions() == []
