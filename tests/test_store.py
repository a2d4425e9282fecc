"""The session store: schema, cascades, orphan clean-up, restart persistence."""
from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from app.store import Conflict, NotFound, ReplyRecord, Store

pytest_plugins = ["conftest_app"]

def count(store: Store, table: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_schema_wal_and_foreign_keys(store):
    tables = set(inspect(store.engine).get_table_names())
    assert {"sessions", "turns", "turn_media", "media", "example_sets", "examples"} <= tables
    assert store.journal_mode() == "wal"
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    assert store.db_path.name == "flamingo.sqlite3"
    assert store.blobs.root == store.data_dir / "media"


def test_media_is_content_addressed_and_shared(store, media):
    img = media.image()
    copy = media.folder / "same-bytes.png"
    copy.write_bytes(img.read_bytes())
    s = store.create_session("one")
    t1 = store.add_user_turn(s.id, "a", [media.stored(img)])
    t2 = store.add_user_turn(s.id, "b", [media.stored(copy)])
    assert t1.media[0].sha256 == t2.media[0].sha256
    assert t1.media[0].path.name == f"{t1.media[0].sha256}.png"
    assert t1.media[0].path.read_bytes() == img.read_bytes()
    assert count(store, "media") == 1 and len(store.blobs.files()) == 1


def test_turn_order_and_reply_fields(store, media):
    s = store.create_session("t")
    store.add_user_turn(s.id, "hello", [media.stored(media.image()), media.stored(media.image((0, 9, 9)))])
    prefix = [{"example_id": 3, "text": "A cat."}]
    store.add_reply(s.id, ReplyRecord("partial", "stopped", finish_reason="cancelled", prefix=prefix))
    turns = store.turns(s.id)
    assert [t.role for t in turns] == ["user", "assistant"]
    assert [t.position for t in turns] == [0, 1]
    assert len(turns[0].media) == 2
    assert turns[1].status == "stopped" and turns[1].prefix == prefix
    assert turns[1].finish_reason == "cancelled"


def test_delete_session_cascades_and_removes_orphans(store, media):
    shared, own = media.image(), media.image((1, 2, 3))
    keep = store.create_session("keep")
    store.add_user_turn(keep.id, "x", [media.stored(shared)])
    gone = store.create_session("gone")
    store.add_user_turn(gone.id, "y", [media.stored(shared), media.stored(own)])
    store.add_reply(gone.id, ReplyRecord("z", "complete"))
    assert count(store, "media") == 2

    store.delete_session(gone.id)

    assert count(store, "turns") == 1 and count(store, "turn_media") == 1
    assert count(store, "media") == 1 and len(store.blobs.files()) == 1
    assert store.turns(keep.id)[0].media[0].path.exists()
    with pytest.raises(NotFound):
        store.turns(gone.id)


def test_media_used_by_an_example_survives_session_delete(store, media):
    img = media.image()
    s = store.create_session("s")
    store.add_user_turn(s.id, "x", [media.stored(img)])
    ex_set = store.create_set("captions")
    store.add_examples(ex_set.id, [(media.stored(img), "A red square.")])
    store.delete_session(s.id)
    assert len(store.blobs.files()) == 1
    store.delete_set(ex_set.id)
    assert store.blobs.files() == [] and count(store, "media") == 0 and count(store, "examples") == 0


def test_failed_user_turn_leaves_nothing(store, media):
    with pytest.raises(NotFound):
        store.add_user_turn("no-such-session", "x", [media.stored(media.image())])
    assert count(store, "media") == 0 and count(store, "turns") == 0
    assert store.blobs.files() == []


def test_regenerate_drops_only_the_last_reply(store):
    s = store.create_session("r")
    store.add_user_turn(s.id, "q1", [])
    store.add_reply(s.id, ReplyRecord("a1", "complete"))
    store.add_user_turn(s.id, "q2", [])
    old = store.add_reply(s.id, ReplyRecord("a2", "failed", error="boom"))
    assert store.delete_replies_after_last_user_turn(s.id) == 1
    assert [t.text for t in store.turns(s.id)] == ["q1", "a1", "q2"]
    assert store.add_reply(s.id, ReplyRecord("a2'", "complete")).id > old.id  # ids never reused


def test_example_sets_edit_reorder_remove(store, media):
    ex_set = store.create_set("vqa")
    ids = store.add_examples(
        ex_set.id, [(media.stored(media.image((i, i, i))), f"ex{i}") for i in range(3)]
    )
    store.move_example(ids[2], -2)
    assert [e.text for e in store.examples(ex_set.id)] == ["ex2", "ex0", "ex1"]
    store.move_example(ids[2], +5)
    assert [e.text for e in store.examples(ex_set.id)] == ["ex0", "ex1", "ex2"]
    store.update_example(ids[1], "Question: what? Answer: grey.")
    store.remove_example(ids[0])
    assert [e.text for e in store.examples(ex_set.id)] == ["Question: what? Answer: grey.", "ex2"]
    assert count(store, "media") == 2 and len(store.blobs.files()) == 2
    assert store.list_sets()[0].size == 2


def test_set_names_unique_and_session_link_cleared(store):
    ex_set = store.create_set("a")
    with pytest.raises(Conflict):
        store.create_set("a")
    assert store.free_set_name("a") == "a (2)"
    store.rename_set(ex_set.id, "b")
    s = store.create_session("linked", example_set_id=ex_set.id)
    store.delete_set(ex_set.id)
    assert store.get_session(s.id).example_set_id is None


def test_restart_restores_everything_and_sweeps_strays(data_dir, media):
    first = Store(data_dir)
    s = first.create_session("persist me")
    first.add_user_turn(s.id, "what is this?", [media.stored(media.image())])
    first.add_reply(s.id, ReplyRecord("a square", "complete"))
    ex_set = first.create_set("set")
    first.add_examples(ex_set.id, [(media.stored(media.image((5, 5, 5))), "cap")])
    stray = first.blobs.root / "ab" / "stray.png"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"left by a crash")
    first.close()

    again = Store(data_dir)
    assert [x.title for x in again.list_sessions()] == ["persist me"]
    turns = again.turns(s.id)
    assert [t.text for t in turns] == ["what is this?", "a square"]
    assert turns[0].media[0].path.exists()
    assert [e.text for e in again.examples(ex_set.id)] == ["cap"]
    assert not stray.exists()
    again.close()


def test_rename_session_and_order_by_activity(store):
    a = store.create_session("a")
    b = store.create_session("b")
    store.add_user_turn(a.id, "bump", [])
    assert [x.id for x in store.list_sessions()] == [a.id, b.id]
    store.rename_session(b.id, "renamed")
    assert store.get_session(b.id).title == "renamed"
