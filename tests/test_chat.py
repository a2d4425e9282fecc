"""ChatEngine: cached and uncached replies agree, videos reach the resampler as ordered frames,
long conversations fit the context, sessions run concurrently, the LM can be sharded."""
from __future__ import annotations

import gc
import tempfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from engine.chat import ChatEngine
from engine.conversation import Conversation, Example, GenerationSettings, Turn
from engine.media import MediaError, load_video
from engine.testing import tiny_model
from engine.vision import images_to_tensor



pytestmark = pytest.mark.usefixtures("one_thread")


GREEDY = GenerationSettings(max_new_tokens=10, temperature=0.0)


# ----- media fixtures -----------------------------------------------------------------------------
def _picture(path, seed: int):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(1, 1, 3))
    noise = rng.integers(0, 60, size=(48, 64, 3))
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)
    return str(path)


def _frame_colour(i: int) -> tuple[int, int, int]:
    return (min(255, 16 * i + 8), 255 - min(255, 16 * i + 8), 128)


def _mp4(path, frames: int = 16):
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (64, 64))
    assert w.isOpened()
    for i in range(frames):
        r, g, b = _frame_colour(i)
        w.write(np.full((64, 64, 3), (b, g, r), np.uint8))
    w.release()
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {
        "img0": _picture(d / "img0.png", 0),
        "img1": _picture(d / "img1.jpg", 1),
        "img2": _picture(d / "img2.webp", 2),
        "video": _mp4(d / "clip.mp4"),
        "ex": _picture(d / "example.png", 3),
    }


@pytest.fixture(scope="module")
def model():
    return tiny_model(gates=1.0)  # non-zero gates: the pictures change the replies


def chat(engine: ChatEngine, user_turns, settings=GREEDY, session_id="s", examples=()):
    """Runs a chat turn by turn, re-sending the history; returns the streams."""
    conv = Conversation(examples=list(examples))
    streams = []
    for text, media in user_turns:
        conv.turns.append(Turn("user", text, list(media)))
        stream = engine.stream(conv, settings, session_id=session_id)
        list(stream)
        streams.append(stream)
        conv.turns.append(Turn("assistant", stream.text))
    return streams


def five_turns(m):
    return [
        ("What is in this picture?", [m["img0"]]),
        ("And this one?", [m["img1"]]),
        ("Describe the clip.", [m["video"]]),
        ("Compare <image> with <image>.", [m["img2"], m["img0"]]),
        ("Thanks! Anything else?", []),
    ]


# ----- caching --------------------------------------------------------------------------------------
def test_cached_and_uncached_give_identical_tokens(model, media):
    cached = ChatEngine(model)
    uncached = ChatEngine(model, cache_size=0, prefix_cache=False)
    examples = [Example([media["ex"]], "Output: a red apple.")]
    a = chat(cached, five_turns(media), examples=examples)
    b = chat(uncached, five_turns(media), examples=examples)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.tokens == y.tokens, f"turn {i + 1}"
        assert x.text == y.text and x.finish_reason == y.finish_reason
        assert y.stats["reused_tokens"] == 0
    assert all(s.stats["reused_tokens"] > 0 for s in a[1:])
    # After turn 1 only the new part of each prompt ran.
    assert sum(s.stats["new_tokens"] for s in a[1:]) < sum(s.stats["new_tokens"] for s in b[1:]) / 2
    assert a[-1].stats["media"] == 6  # example + 3 pictures + video + a picture sent twice
    # img0 was encoded once though sent twice; the second engine cached nothing.
    assert cached.media.items.stats()["items"] == 5 and len(uncached.media.items) == 0


def test_region_tokens_serve_cached_and_uncached_alike(media):
    """A model with resampler.grid_tokens and region_latents (latents + region tokens per media item) chats over
    pictures, a clip and a text-only turn, and its cached replies equal the uncached ones."""
    import dataclasses

    from engine.model import FlamingoModel
    from engine.testing import TinyVisionTower, set_gates, tiny_config, tiny_lm, tiny_tokenizer

    config = tiny_config()
    config = dataclasses.replace(config, resampler=dataclasses.replace(config.resampler, grid_tokens=2, region_latents=2))
    torch.manual_seed(0)
    model = FlamingoModel(config, tiny_lm(), tiny_tokenizer(), TinyVisionTower(32))
    set_gates(model, 1.0)
    with torch.no_grad():
        model.resampler.region_embeddings.normal_()
        model.resampler.region_latent_embeddings.normal_()
    a = chat(ChatEngine(model), five_turns(media))
    b = chat(ChatEngine(model, cache_size=0, prefix_cache=False), five_turns(media))
    assert [x.tokens for x in a] == [y.tokens for y in b] and all(x.tokens for x in a)
    assert ChatEngine(model)._no_media.shape[-2] == config.resampler.num_latents + 8


def test_pictures_matter(model, media):
    engine = ChatEngine(model)
    x = engine.stream(Conversation(turns=[Turn("user", "What is it?", [media["img0"]])]), GREEDY, stop=False)
    y = engine.stream(Conversation(turns=[Turn("user", "What is it?", [media["img1"]])]), GREEDY, stop=False)
    list(x), list(y)
    assert x.tokens != y.tokens


def test_changed_media_at_the_same_position_is_not_reused(model, media):
    """Regenerating a turn with another picture behind the same <image> token."""
    cached, uncached = ChatEngine(model), ChatEngine(model, prefix_cache=False)
    chat(cached, [("Look:", [media["img0"]])], session_id="r")
    again = chat(cached, [("Look:", [media["img1"]])], session_id="r")[0]
    fresh = chat(uncached, [("Look:", [media["img1"]])], session_id="r")[0]
    assert again.tokens == fresh.tokens
    assert again.stats["reused_tokens"] < again.prompt.ids.index(model.media_token_id) + 1


def test_cancelled_turn_leaves_a_usable_cache(model, media):
    cached, uncached = ChatEngine(model), ChatEngine(model, prefix_cache=False)
    conv = Conversation(turns=[Turn("user", "What is in this picture?", [media["img0"]])])
    cancel = threading.Event()
    stream = cached.stream(conv, GenerationSettings(max_new_tokens=30, temperature=0), cancel=cancel, session_id="k", stop=False)
    for _ in stream:
        cancel.set()
    assert stream.finish_reason == "cancelled"
    conv.turns += [Turn("assistant", stream.text), Turn("user", "Go on.", [media["img1"]])]
    a, b = cached.stream(conv, GREEDY, session_id="k"), uncached.stream(conv, GREEDY)
    list(a), list(b)
    assert a.tokens == b.tokens and a.stats["reused_tokens"] > 0


# ----- video ----------------------------------------------------------------------------------------
def test_video_frames_reach_the_resampler_in_order(model, media, monkeypatch):
    engine = ChatEngine(model)
    seen = []
    original = model.resample

    def spy(features):
        seen.append(features.clone())
        return original(features)

    monkeypatch.setattr(model, "resample", spy)
    item = engine.media.encode(media["video"], num_frames=4)
    assert item.kind == "video" and item.num_frames == 4
    assert len(seen) == 1 and seen[0].shape[:3] == (1, 1, 4)  # (B, one media item, T frames, S, d)
    clip = load_video(media["video"], num_frames=4)
    expected = model.vision(images_to_tensor(clip.frames, model.vision.image_size)[None])
    torch.testing.assert_close(seen[0][0, 0], expected[0])
    assert item.timestamps == pytest.approx(clip.timestamps)
    assert len(item.timestamps) == 4 and all(b > a for a, b in zip(item.timestamps, item.timestamps[1:]))
    # The frames really are in time order: red rises frame by frame in the clip.
    reds = [float(np.asarray(f)[..., 0].mean()) for f in clip.frames]
    assert reds == sorted(reds)
    # Cached: the same video again is not re-encoded; more frames than the resampler takes are sampled down.
    engine.media.encode(media["video"], num_frames=4)
    assert len(seen) == 1
    stream = engine.stream(Conversation(turns=[Turn("user", "What happens?", [media["video"]])]), GenerationSettings(max_new_tokens=3, num_frames=20))
    list(stream)
    assert seen[-1].shape[2] == model.config.resampler.max_frames == 8
    assert stream.stats["media"] == 1  # a video is one media item


def test_broken_empty_unreadable_videos_fail_before_any_text(model, media, tmp_path):
    engine = ChatEngine(model)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(open(media["video"], "rb").read()[:300])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video\n" * 50)
    for path in (broken, empty, fake, tmp_path / "missing.mp4"):
        conv = Conversation(turns=[Turn("user", "What happens?", [str(path)])])
        with pytest.raises(MediaError, match=path.name):
            engine.stream(conv, GREEDY)


# ----- context budget -------------------------------------------------------------------------------
def test_fifty_turns_with_images_overflow_gracefully(media):
    model = tiny_model(gates=1.0)
    model.lm.config.max_position_embeddings = 160
    engine = ChatEngine(model)
    assert engine.context_length == 160
    pictures = [media["img0"], media["img1"], media["img2"]]
    settings = GenerationSettings(max_new_tokens=8, temperature=0)
    examples = [Example([media["ex"]], "Output: a red apple.")]
    turns = [(f"Picture {i}: what is in it?", [pictures[i % 3]]) for i in range(50)]
    streams = chat(engine, turns, settings, session_id="long", examples=examples)
    assert all(s.finish_reason in ("eoc", "eos", "length") for s in streams)
    assert streams[-1].dropped_turns > 80  # 99 earlier turns, most of them gone
    assert all(s.stats["prompt_tokens"] + 8 <= 160 for s in streams)
    text = model.tokenizer.decode(streams[-1].prompt.ids)
    assert "<image>Output: a red apple.<EOC>" in text and text.rstrip().endswith("Picture 49: what is in it?<|end|>\n<|assistant|>")
    # The same last turn without any cache gives the same reply.
    conv = Conversation(examples=examples)
    for (text_, media_), s in zip(turns, streams):
        conv.turns += [Turn("user", text_, media_), Turn("assistant", s.text)]
    conv.turns.pop()
    fresh = ChatEngine(model, prefix_cache=False).stream(conv, settings)
    list(fresh)
    assert fresh.tokens == streams[-1].tokens and fresh.dropped_turns == streams[-1].dropped_turns


def test_max_new_tokens_larger_than_the_context_is_clamped(media):
    model = tiny_model()
    model.lm.config.max_position_embeddings = 64
    stream = ChatEngine(model).stream(Conversation(turns=[Turn("user", "hi " * 100, [media["img0"]])]), GenerationSettings(max_new_tokens=500), stop=False)
    list(stream)
    assert len(stream.tokens) == 32 and stream.stats["prompt_tokens"] <= 32


# ----- threads ----------------------------------------------------------------------------------------
def test_two_sessions_in_two_threads_match_sequential_runs(model, media):
    plans = {
        "A": [("What is this?", [media["img0"]]), ("And now?", [media["img1"]]), ("Bye.", [])],
        "B": [("Describe it.", [media["video"]]), ("More?", [media["img2"]]), ("Ok.", [media["img0"]])],
    }
    sequential = {sid: [s.tokens for s in chat(ChatEngine(model), plan, session_id=sid)] for sid, plan in plans.items()}
    engine = ChatEngine(model)
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def worker(sid):
        try:
            barrier.wait()
            results[sid] = [s.tokens for s in chat(engine, plans[sid], session_id=sid)]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(sid,)) for sid in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == sequential


# ----- the rest of the API ------------------------------------------------------------------------------
def test_embed_media_describe_and_load(model, media):
    engine = ChatEngine.load("tiny", device="cpu")
    d = engine.describe()
    assert set(d) == {"model", "device", "dtype", "frozen_params", "trainable_params"}
    assert d["device"] == "cpu" and d["dtype"] == "float32" and d["trainable_params"] > 0
    e = engine.embed_media(media["img0"])
    assert e.shape == (engine.model.vision.feature_dim,) and e.dtype == torch.float32
    hits = engine.media.embeddings.hits
    assert torch.equal(engine.embed_media(media["img0"]), e) and engine.media.embeddings.hits == hits + 1
    assert engine.embed_media(media["video"]).shape == e.shape
    assert not torch.equal(engine.embed_media(media["img1"]), e)
    assert engine.reply(Conversation(turns=[Turn("user", "Hi")]), GenerationSettings(max_new_tokens=4)) is not None
    with pytest.raises(ValueError, match="no such folder"):
        ChatEngine.load("./no/such/model")


def test_sharded_lm_with_disk_offload_gives_identical_replies(media, tmp_path, monkeypatch):
    """accelerate device_map: part of the LM in CPU memory, the rest offloaded to disk and
    streamed in by hooks (on a GPU machine the same call splits over GPUs and CPU)."""
    from accelerate.utils import compute_module_sizes

    from engine.device import resolve
    from engine.sharding import shard_lm

    plain = ChatEngine(tiny_model(gates=1.0))
    model = tiny_model(gates=1.0)
    size = compute_module_sizes(model.lm)[""]
    device_map = shard_lm(model, {"cpu": size // 2, "disk": 10 * size}, resolve("cpu"), offload_dir=str(tmp_path))
    assert set(device_map.values()) == {"cpu", "disk"}, device_map
    sharded = ChatEngine(model)
    assert "sharded" in sharded.describe()["device"]
    turns = five_turns(media)[:3]
    assert [s.tokens for s in chat(sharded, turns)] == [s.tokens for s in chat(plain, turns)]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where load's own offload folder goes
    loaded = ChatEngine.load("tiny", device="cpu", max_memory={"cpu": size // 2, "disk": 10 * size})
    assert set(loaded.model.lm.hf_device_map.values()) == {"cpu", "disk"}
    assert len(list(tmp_path.glob("flamingo-offload-*"))) == 1
    del loaded
    gc.collect()
    assert not list(tmp_path.glob("flamingo-offload-*"))  # removed with the model


def test_session_caches_are_bounded(model, media):
    engine = ChatEngine(model, max_sessions=2, max_cached_tokens=10_000)
    for sid in ("a", "b", "c"):
        chat(engine, [("Hi", [media["img0"]])], session_id=sid)
    assert list(engine._sessions) == ["b", "c"]
    tight = ChatEngine(model, max_cached_tokens=30)
    for sid in ("a", "b"):
        chat(tight, [("Hello there, what is this?", [media["img0"]])], session_id=sid)
    assert list(tight._sessions) == ["b"]  # the newest is always kept
    engine.forget("c")
    assert list(engine._sessions) == ["b"]
