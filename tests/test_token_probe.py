"""mode: token_probe -- the resampler learns which way a clip moves (or a picture's background
colour) while other items' tokens stay put."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.token_probe import TokenProbeTrainer, read_labelled
from engine.testing import tiny_model
from engine.train import export_checkpoint
from engine.train_config import parse_train_config
from tests.train_fixtures import tiny_train_config, write_corpus


def _moving_square(path: Path, direction: str, row: int, frames: int = 4, size: int = 32) -> None:
    """A white square crossing a black frame; a "left" clip is a "right" clip reversed."""
    xs = [2 + 7 * t for t in range(frames)]
    xs = xs if direction == "right" else xs[::-1]
    imgs = []
    for x in xs:
        img = Image.new("RGB", (size, size))
        img.paste((255, 255, 255), (x, row, x + 8, row + 8))
        imgs.append(img)
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=100, loop=0)


def _corpus(root: Path) -> Path:
    write_corpus(root, n_pairs=16, n_docs=1, n_videos=1)
    rows = []
    for i in range(16):
        direction = ("left", "right")[i % 2]
        _moving_square(root / "media" / f"m{i}.gif", direction, row=2 + (i // 2) * 3)
        rows.append({"media": [f"media/m{i}.gif"], "text": f"<image>A square moves {direction}.<EOC>", "motion": direction})
    rows.append({"media": ["media/m0.gif"], "text": "<image>No label.<EOC>"})  # skipped: no motion
    (root / "motion.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _config(corpus: Path, run: Path, anchor_weight: float, steps: int = 120):
    raw = tiny_train_config(corpus, run, **{
        "mode": "token_probe", "data.num_frames": 4, "data.feature_cache": True, "run.max_steps": steps,
        "run.save_every": 10, "optim.lr": 1e-2, "optim.embedding_lr": 1e-1, "optim.warmup_steps": 0,
        "token_probe.anchor_weight": anchor_weight})
    raw["data"]["datasets"] = [
        {"name": "clips", "kind": "video", "path": "motion.train.jsonl", "batch_size": 8},
        {"name": "pairs", "kind": "pairs", "path": "pairs.train.jsonl", "batch_size": 8},
    ]
    return parse_train_config(raw)


def _train(corpus, run, anchor_weight):
    model = tiny_model()
    others = {k: v.clone() for k, v in model.trainable_state_dict().items() if not k.startswith("resampler.")}
    t = TokenProbeTrainer(_config(corpus, run, anchor_weight), model=model, resume=False)
    logs = [t.train_step() for _ in range(120)]
    after = model.trainable_state_dict()
    assert all(torch.equal(v, after[k]) for k, v in others.items())  # gated blocks, token embeddings: untouched
    return t, logs


def test_the_probe_learns_direction_and_the_anchor_holds_pictures(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    assert len(read_labelled(corpus / "motion.train.jsonl", "motion")) == 16
    anchored, logs = _train(corpus, tmp_path / "a", anchor_weight=100.0)
    assert anchored.labels == ["left", "right"]
    # left and right clips hold the same frames: only their order tells them apart
    assert sum(l["probe_accuracy"] for l in logs[-10:]) / 10 >= 0.9, [l["probe_accuracy"] for l in logs]
    _, free_logs = _train(corpus, tmp_path / "b", anchor_weight=0.0)
    drift = sum(l["anchored_token_drift"] for l in logs[-10:]) / 10
    free_drift = sum(l["anchored_token_drift"] for l in free_logs[-10:]) / 10
    assert drift < free_drift / 3, (drift, free_drift)

    out = anchored.save_model()
    saved = load_file(out / "flamingo.safetensors")
    trained = anchored.model.trainable_state_dict()
    assert all(torch.equal(saved[k], trained[k]) for k in saved if k.startswith("resampler."))


def test_a_run_resumes_where_it_stopped(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    cfg = _config(corpus, tmp_path / "run", 100.0, steps=10)
    first = TokenProbeTrainer(cfg, model=tiny_model(), resume=False)
    first.fit()
    assert (tmp_path / "run" / "model" / "flamingo.safetensors").is_file()
    again = TokenProbeTrainer(_config(corpus, tmp_path / "run", 100.0, steps=20), model=tiny_model(), resume=True)
    assert again.step == 10
    assert torch.equal(again.model.resampler.latents, first.model.resampler.latents)
    assert again.labelled_feeds[0].stream.state_dict() == first.labelled_feeds[0].stream.state_dict()


def test_the_config_needs_clips_and_pictures(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    raw = tiny_train_config(corpus, tmp_path / "run", mode="token_probe", **{"data.feature_cache": True})
    raw["data"]["datasets"] = [{"name": "clips", "kind": "video", "path": "motion.train.jsonl"}]
    with pytest.raises(ValueError, match="another dataset"):
        parse_train_config(raw)
    raw["data"]["datasets"].append({"name": "pairs", "kind": "pairs", "path": "pairs.train.jsonl"})
    raw["data"]["feature_cache"] = False
    with pytest.raises(ValueError, match="feature_cache"):
        parse_train_config(raw)
    raw["data"]["feature_cache"] = True
    with pytest.raises(ValueError, match="mode token_probe writes"):
        export_checkpoint(parse_train_config(raw), tmp_path / "out")


def test_pictures_can_be_the_labelled_items(tmp_path):
    """token_probe.labelled names a picture dataset: the probe reads its records' field (here a
    background colour) and the clips are the anchored items."""
    corpus = _corpus(tmp_path / "corpus")
    rows = []
    for i in range(16):
        colour = ("red", "blue")[i % 2]
        img = Image.new("RGB", (32, 32), (200, 30, 30) if colour == "red" else (30, 30, 200))
        img.paste((255, 255, 255), (4 + i, 4 + i // 2, 12 + i, 12 + i // 2))
        img.save(corpus / "media" / f"c{i}.png")
        rows.append({"media": [f"media/c{i}.png"], "text": "<image>A square.<EOC>", "background": colour})
    (corpus / "colours.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = tiny_train_config(corpus, tmp_path / "run", **{
        "mode": "token_probe", "data.num_frames": 4, "data.feature_cache": True, "run.max_steps": 40,
        "optim.lr": 1e-2, "optim.warmup_steps": 0, "token_probe.label_field": "background",
        "token_probe.labelled": ["colours"]})
    raw["data"]["datasets"] = [
        {"name": "colours", "kind": "pairs", "path": "colours.train.jsonl", "batch_size": 8},
        {"name": "clips", "kind": "video", "path": "motion.train.jsonl", "batch_size": 8},
    ]
    t = TokenProbeTrainer(parse_train_config(raw), model=tiny_model(), resume=False)
    assert t.labels == ["blue", "red"] and t.labelled_feeds[0].kind == "image" and t.anchor_feeds[0].kind == "video"
    logs = [t.train_step() for _ in range(40)]
    assert sum(l["probe_accuracy"] for l in logs[-10:]) / 10 >= 0.9, [l["probe_accuracy"] for l in logs]

    raw["token_probe"]["labelled"] = ["nowhere"]
    with pytest.raises(ValueError, match="names no dataset"):
        parse_train_config(raw)


def _placed_model(spatial: bool):
    """tiny_model, with 16 spatial embeddings (its tower's 4 x 4 cells) when `spatial`."""
    import dataclasses

    from engine.model import FlamingoModel

    model = tiny_model()
    if not spatial:
        return model
    cfg = dataclasses.replace(model.config, resampler=dataclasses.replace(model.config.resampler, spatial_positions=16))
    placed = FlamingoModel(cfg, model.lm, model.tokenizer, model.vision)
    placed.load_trainable_state_dict(model.trainable_state_dict(), allow_new_zeros=True)
    return placed


def test_a_query_probe_asks_which_side_one_named_thing_is_on(tmp_path):
    """Two coloured blocks side by side; each record asks where one of them is. The probe reads it
    through the named block's prototype (from its own pictures) only if the tokens keep each block's
    side with its colour: with spatial embeddings they learn to; without, a scene and its mirror
    image give the same tokens and the probe stays near chance."""
    corpus = _corpus(tmp_path / "corpus")
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}
    rows, pictures = [], []
    for c, rgb in colours.items():
        Image.new("RGB", (32, 32), rgb).save(corpus / "media" / f"{c}.png")
        pictures.append({"media": [f"media/{c}.png"], "concept_id": c})
    for i, (a, b) in enumerate((a, b) for a in colours for b in colours if a != b):
        img = Image.new("RGB", (32, 32), (255, 255, 255))
        img.paste(colours[a], (0, 8, 16, 24))
        img.paste(colours[b], (16, 8, 32, 24))
        img.save(corpus / "media" / f"s{i}.png")
        rows += [{"media": [f"media/s{i}.png"], "concept_id": a, "side": "left"},
                 {"media": [f"media/s{i}.png"], "concept_id": b, "side": "right"}]
    rows.append({"media": ["media/s0.png"], "side": "left"})  # names no block: skipped
    (corpus / "sides.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (corpus / "blocks.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pictures))
    assert len(read_labelled(corpus / "sides.train.jsonl", "side", "concept_id")) == 24
    raw = tiny_train_config(corpus, tmp_path / "run", **{
        "mode": "token_probe", "data.num_frames": 4, "data.feature_cache": True, "run.max_steps": 200,
        "optim.lr": 3e-3, "optim.embedding_lr": 1e-1, "optim.warmup_steps": 0, "token_probe.label_field": "side",
        "token_probe.labelled": ["sides"], "token_probe.query_field": "concept_id",
        "token_probe.query_pictures": "blocks.train.jsonl", "token_probe.anchor_weight": 1.0})
    raw["data"]["datasets"] = [
        {"name": "sides", "kind": "pairs", "path": "sides.train.jsonl", "batch_size": 24},
        {"name": "clips", "kind": "video", "path": "motion.train.jsonl", "batch_size": 8},
    ]

    def accuracy(spatial: bool) -> float:
        t = TokenProbeTrainer(parse_train_config(raw), model=_placed_model(spatial), resume=False)
        assert t.labels == ["left", "right"] and t.queries == sorted(colours)
        logs = [t.train_step() for _ in range(200)]
        return sum(l["probe_accuracy"] for l in logs[-20:]) / 20

    a, b = accuracy(spatial=True), accuracy(spatial=False)
    assert a >= 0.9 and b <= 0.6, (a, b)

    raw["token_probe"]["query_pictures"] = "pairs.train.jsonl"  # no pictures of the blocks there
    with pytest.raises(ValueError, match="no pictures of 4 queried things"):
        TokenProbeTrainer(parse_train_config(raw), model=tiny_model(), resume=False)
