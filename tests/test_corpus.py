"""The offline corpus builder: labels, record format, determinism, held-out split, CLI errors.

The fast tests build from a tiny generated clip-art folder and a stand-in emoji renderer; the
``slow`` tests use the real Debian packages (openclipart-png, fonts-noto-color-emoji) and skip
when those are not installed."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine.data import records as REC
from engine.data import sources as S
from engine.data import templates as T
from engine.data.corpus import BuildConfig, Sizes, build_corpus
from engine.data.names import (clean_clipart_name, clean_emoji_name, nonce_words, plural,
                               with_article)

REAL_CLIPART = Path(S.DEFAULT_CLIPART_DIR)
REAL_FONT = Path(S.DEFAULT_EMOJI_FONT)

TINY = Sizes(pairs=24, places=18, interleaved=12, naming=6, videos=6, vqa=16, classify_renders=2,
             caption_renders=1, vqa_test=8, video_qa=4, recognize=6, places_test=9)

# (path as in openclipart-png, label): one or two files per concept, plus junk.
FIXTURE_FILES = [
    ("animals/mammals/contour_elephant.png", "elephant"),
    ("animals/mammals/elefante01_architetto_fr_01.png", "elephant"),
    ("animals/birds/acquila_architetto_franc_01.png", "eagle"),
    ("food/fruit/apple_bitten_dan_gerhard_01.png", "apple"),
    ("food/fruit/banana_mateya_01.png", "banana"),
    ("transportation/vehicles/bus1_jarno_vasamaa_01.png", "bus"),
    ("tools/hammer_nicu_buculei_01.png", "hammer"),
    ("recreation/music/trumpet_herald__ganson.png", "trumpet"),
    ("electronics/bulb/lightbulb_jon_phillips_01.png", "light bulb"),
    ("animals/mammals/housecats/kitten_gerald_g._01.png", "cat"),
    ("buildings/homes/casa_verde_architetto_fr_01.png", "house"),
]
JUNK_FILES = ["special/gradients/gradient-lavender.png",
              "computer/icons/flat-theme/action/reload.png",
              "people/clipart_by_nicu_buculei_01.png"]
FAKE_EMOJI = ["\U0001F34E", "\U0001F408", "\u2602", "\U0001F3BA", "\U0001F98A", "\U0001F6B2"]


def _shape_png(path: Path, k: int) -> None:
    """A distinct opaque shape (polygon with k+3 corners, colour from k) on transparency."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    n = 3 + k % 6
    pts = [(48 + 40 * math.cos(2 * math.pi * j / n), 48 + 40 * math.sin(2 * math.pi * j / n))
           for j in range(n)]
    colour = ((53 * k) % 256, (97 * k + 80) % 256, (151 * k + 40) % 256, 255)
    d.polygon(pts, fill=colour, outline=(0, 0, 0, 255))
    d.ellipse([40, 40, 56, 56], fill=(255 - colour[0], 255 - colour[1], 255 - colour[2], 255))
    im.save(path)


@pytest.fixture(scope="module")
def clipart_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("openclipart") / "png"
    for k, (rel, _) in enumerate(FIXTURE_FILES):
        _shape_png(root / rel, k)
    for k, rel in enumerate(JUNK_FILES):
        _shape_png(root / rel, 40 + k)
    blank = root / "animals/blank_owl_01.png"  # nameable but empty: dropped as unusable
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(blank)
    (root / "animals/birds/eagle_link.png").symlink_to(root / FIXTURE_FILES[2][0])
    return root


def _fake_render_emoji(char: str, font_path: str) -> Image.Image:
    """Stand-in for the colour font: a disc whose colour and notch come from the code point."""
    im = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    if ord(char) > 0x10000 and char not in FAKE_EMOJI:
        return im  # "no glyph"
    cp = ord(char)
    d = ImageDraw.Draw(im)
    d.ellipse([20, 20, 140, 140], fill=(cp % 251, (cp // 7) % 253, (cp // 3) % 241, 255))
    d.rectangle([70, 20 + cp % 60, 90, 100], fill=(255, 255, 255, 255))
    return im


@pytest.fixture
def fake_emoji(monkeypatch, tmp_path) -> str:
    monkeypatch.setattr(S, "render_emoji", _fake_render_emoji)
    font = tmp_path / "FakeEmoji.ttf"
    font.write_bytes(b"not a real font; render_emoji is replaced")
    return str(font)


def _build(out: Path, clipart: Path, font: str | None, seed: int = 0, **kw) -> dict:
    cfg = BuildConfig(out=out, seed=seed, sizes=TINY, clipart_dir=str(clipart), emoji_font=font,
                      emoji_chars=FAKE_EMOJI, workers=1, progress=False, **kw)
    return build_corpus(cfg)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def built(tmp_path, clipart_dir, fake_emoji):
    out = tmp_path / "corpus"
    return out, _build(out, clipart_dir, fake_emoji)


# ------------------------------------------------------------------------------------------
# labels


@pytest.mark.parametrize("rel,label", FIXTURE_FILES + [
    ("food/fruit/pear_jean-victor_balin_01r.png", "pear"),
    ("food/fruit/an_apple_01.png", "apple"),
    ("food/fruit/orange_slice_jonathan_di_01.png", "orange"),
    ("animals/birds/cigno_di_spalle_architet_01.png", "swan"),
    ("food/hot_dog_juliane_krug_r.png", "hot dog"),
    ("signs_and_symbols/traffic_light_red_dan_ge_01.png", "traffic light"),
    ("recreation/toys/simple_teddy_bear_gerald_01.png", "teddy bear"),
    ("shapes/stars/star_95pt06step.png", "star"),
    ("animals/dinosaurs/dino_architetto_francesc_07.png", "dinosaur"),
    ("animals/birds/mirjam_meijer_mirjam_mei_01.png", "bird"),  # no noun: folder name
    ("recreation/music/trumpet_b_flat_colour_ganso.png", "trumpet"),
    ("animals/mammals/dog_05_drawn_with_strai_02.png", "dog"),
])
def test_clipart_label_cleaning(rel, label):
    assert clean_clipart_name(rel) == label


@pytest.mark.parametrize("rel", JUNK_FILES + [
    "geography/map_of_finland_jarno_vas_01.png",
    "computer/icons/lemon-theme/actions/filesaveas.png",
    "special/patterns/pattern-dot-grid-0003.png",
    "recreation/games/cards/bordered/bordered_c_9.png",
    "signs_and_symbols/led/led_rectangular_h_purple.png",
    "unsorted/ralf_ark.in-berlin.de_ra_01.png",
])
def test_clipart_junk_dropped(rel):
    assert clean_clipart_name(rel) is None


def test_emoji_names_and_english():
    assert clean_emoji_name("UMBRELLA WITH RAIN DROPS") == "umbrella"
    assert clean_emoji_name("DOG FACE") == "dog"
    assert clean_emoji_name("RED APPLE") == "apple"
    assert clean_emoji_name("BLUE BOOK") == "book"
    assert clean_emoji_name("AUTOMOBILE") == "car"
    for junk in ("GRINNING FACE", "CLOCK FACE ONE OCLOCK", "LARGE RED CIRCLE", "THUMBS UP SIGN",
                 "REGIONAL INDICATOR SYMBOL LETTER A", "ARIES", "EMOJI MODIFIER FITZPATRICK TYPE-3"):
        assert clean_emoji_name(junk) is None, junk
    assert plural("mouse") == "mice" and plural("hot dog") == "hot dogs"
    assert plural("bus") == "buses" and plural("strawberry") == "strawberries"
    assert with_article("apple") == "an apple" and with_article("grapes") == "grapes"
    assert with_article("unicorn") == "a unicorn"


def test_nonce_words_are_made_up_and_distinct():
    import random

    words = nonce_words(random.Random(3), 200, avoid={"dax"})
    assert len(set(words)) == 200 and "dax" not in words
    assert all(w.isalpha() and 3 <= len(w) <= 7 for w in words)
    assert not {"cat", "apple", "banana", "soda", "sex"} & set(words)


# ------------------------------------------------------------------------------------------
# building


def test_records_are_well_formed(built):
    out, manifest = built
    train_ids = {c["id"] for c in manifest["train_concepts"]}
    held_ids = {c["id"] for c in manifest["heldout_concepts"]}
    assert held_ids and len(train_ids) >= 2 and not train_ids & held_ids
    assert manifest["seed"] == 0 and manifest["build_seconds"] >= 0
    for kind, name in REC.FILES.items():
        recs = _read(out / name)
        assert len(recs) == manifest["counts"][name] > 0, name
        for r in recs:
            assert isinstance(r["media"], list) and r["media"], (name, r)
            for rel in r["media"]:
                assert not Path(rel).is_absolute() and (out / rel).is_file(), rel
            if kind in REC.TRAIN_KINDS:
                assert r["text"].count("<image>") == len(r["media"]), r
                assert r["text"].endswith("<EOC>"), r
                assert r["text"].count("<EOC>") == len(r["media"]), r
                assert r["text"].startswith("<image>")
    # the pictures are 224x224 RGB PNGs the media loader reads
    from engine.media import load_image, load_video

    pair = _read(out / "pairs.train.jsonl")[0]
    im = load_image(out / pair["media"][0])
    assert im.size == (224, 224)
    vid = _read(out / "videos.train.jsonl")[0]
    clip = load_video(out / vid["media"][0], num_frames=4)
    assert len(clip.frames) == 4 and clip.total_frames == vid["frames"]
    assert all(b > a for a, b in zip(clip.timestamps, clip.timestamps[1:]))


def test_train_files_exclude_heldout_concepts(built):
    out, manifest = built
    held = {c["id"]: c["label"] for c in manifest["heldout_concepts"]}
    for name in ("pairs.train.jsonl", "interleaved.train.jsonl", "naming.train.jsonl",
                 "videos.train.jsonl", "vqa.train.jsonl"):
        for r in _read(out / name):
            ids = set(r.get("concepts", [])) | {r.get("concept_id")}
            ids |= set(r.get("names", {}).values())
            assert not ids & set(held), (name, r)
            for label in held.values():  # fixture labels share no words
                assert not re.search(rf"\b{re.escape(label)}\b", r["text"]), (name, r["text"])
    for r in _read(out / "classify.test.jsonl") + _read(out / "captions.test.jsonl"):
        assert r["concept_id"] in held
    train_labels = {c["label"] for c in manifest["train_concepts"]}
    recognize = _read(out / "recognize.test.jsonl")
    assert {r["label"] for r in recognize} <= train_labels
    for r in recognize:  # captions of seen concepts: each reference names the concept
        assert len(r["captions"]) == 5 and all(r["label"] in c for c in r["captions"])
        assert any(r["background"] in c for c in r["captions"])


def test_places_are_labelled_with_where_the_object_is(built):
    """Each picture's label names the 3 x 3 cell that holds the centre of its drawn pixels, and the
    caption says it."""
    out, _ = built
    recs = _read(out / "places.train.jsonl") + _read(out / "places.test.jsonl")
    names = {name: cell for cell, (name, _) in T.PLACES.items()}
    assert len({r["place"] for r in recs}) >= 4
    for r in recs:
        a = np.asarray(Image.open(out / r["media"][0]).convert("RGB")).astype(int)
        drawn = np.abs(a - a[2, 2]).sum(-1) > 60   # not the (plain, jittered) background
        ys, xs = np.nonzero(drawn)
        cell = (int(xs.mean() * 3 // a.shape[1]), int(ys.mean() * 3 // a.shape[0]))
        assert cell == names[r["place"]], r
        assert r["text"] == f"<image>{T.place_caption(r['label'], *cell)}<EOC>"


def test_interleaved_documents_teach_from_context(built):
    out, _ = built
    docs = _read(out / "interleaved.train.jsonl")
    for d in docs:
        assert 2 <= len(d["media"]) <= 5
        # the last picture repeats a concept (its name is in the context), or, in some documents
        # with real names, shows a new one (so copying from the context is not always right)
        assert (d["concepts"][-1] not in d["concepts"][:-1]) == d["new_last"]
        if d["new_last"]:
            assert d["doc"] != "naming" or not any(d["nonce"])  # a made-up name can't be known
    naming = [d for d in docs if d["doc"] == "naming"]
    assert naming
    flags = [f for d in naming for f in d["nonce"]]
    # made-up names dominate in a larger sample; in this tiny one at least some exist
    assert any(flags)


def test_naming_episodes_are_shaped_like_few_shot_prompts(built):
    out, _ = built
    episodes = _read(out / "naming.train.jsonl")
    assert episodes
    for d in episodes:
        support, query = d["concepts"][:-1], d["concepts"][-1]
        way = len(set(support))
        assert 2 <= way <= 5 and way <= len(support) <= 8 and len(d["media"]) == len(support) + 1
        counts = [support.count(c) for c in set(support)]
        assert max(counts) - min(counts) <= 1  # spread as evenly as the evaluation's shots
        assert query in support and not d["new_last"]
        # every chunk names its own picture's concept, with the document's name for it
        name_of = {c: nm for nm, c in d["names"].items()}
        chunks = d["text"].split("<EOC>")[:-1]
        assert len(chunks) == len(d["concepts"])
        for chunk, cid in zip(chunks, d["concepts"]):
            assert chunk.startswith("<image>") and name_of[cid] in chunk


def test_some_documents_end_with_a_concept_they_have_not_shown():
    import random

    from engine.data.records import _doc_plan, _doc_sequence

    plans = [_doc_plan(random.Random(i)) for i in range(4000)]
    new = [p for p in plans if p[3]]
    assert 0.1 < len(new) / len(plans) < 0.35  # most documents still reward reading the context
    assert all(names == "real" for _, _, names, _ in new)
    assert {names for style, _, names, _ in plans if style == "naming"} == {"made_up", "mixed", "real"}
    for i in range(200):
        n = 2 + i % 4
        repeat, fresh = _doc_sequence(random.Random(i), n), _doc_sequence(random.Random(i), n, new_last=True)
        assert len(repeat) == len(fresh) == n and repeat[:-1] == fresh[:-1]
        assert repeat[-1] in repeat[:-1] and fresh[-1] not in fresh[:-1]
        assert sorted(set(fresh)) == list(range(max(fresh) + 1))  # slots name concepts 0..k in order of use


def test_eval_files_fields(built):
    out, _ = built
    for r in _read(out / "vqa.test.jsonl"):
        assert r["qtype"] in ("count", "colour", "position") and r["answers"] and r["question"]
    for r in _read(out / "video_qa.test.jsonl"):
        assert r["answers"][0] in r["choices"] and r["question"].startswith("Which way")
    for r in _read(out / "captions.test.jsonl"):
        assert len(r["captions"]) >= 3 and all(c.endswith(".") for c in r["captions"])


def _digest(out: Path) -> dict[str, str]:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def test_same_seed_same_corpus(tmp_path, clipart_dir, fake_emoji):
    _build(tmp_path / "a", clipart_dir, fake_emoji, seed=7)
    _build(tmp_path / "b", clipart_dir, fake_emoji, seed=7)
    _build(tmp_path / "c", clipart_dir, fake_emoji, seed=8)
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert a["pairs.train.jsonl"] != c["pairs.train.jsonl"]


def test_parallel_build_matches_serial(tmp_path, clipart_dir, fake_emoji):
    cfg = dict(sizes=Sizes(pairs=20, places=6, interleaved=10, naming=4, videos=4, vqa=10, classify_renders=1,
                           caption_renders=1, vqa_test=4, video_qa=4, recognize=4, places_test=3),
               clipart_dir=str(clipart_dir), emoji_font=fake_emoji, emoji_chars=FAKE_EMOJI,
               progress=False)
    build_corpus(BuildConfig(out=tmp_path / "serial", workers=1, **cfg))
    build_corpus(BuildConfig(out=tmp_path / "par", workers=2, **cfg))
    assert _digest(tmp_path / "serial") == _digest(tmp_path / "par")


def test_rebuild_replaces_an_old_corpus(tmp_path, clipart_dir, fake_emoji):
    out = tmp_path / "c"
    _build(out, clipart_dir, fake_emoji)
    (out / "media" / "stale.png").write_bytes(b"x")
    _build(out, clipart_dir, fake_emoji)
    assert not (out / "media" / "stale.png").exists()
    assert not list(out.glob(".cutouts-*"))


# ------------------------------------------------------------------------------------------
# the CLI


def _cli(argv: list[str]) -> int:
    from engine.commands import build_data

    parser = argparse.ArgumentParser(prog="python -m engine")
    sub = parser.add_subparsers(dest="command", required=True)
    build_data.add_parser(sub)
    return build_data.run(parser.parse_args(["build-data", *argv]))


def test_cli_missing_sources_is_a_clear_error(tmp_path, capsys):
    rc = _cli(["--out", str(tmp_path / "o"), "--clipart-dir", str(tmp_path / "nope"),
               "--emoji-font", "none", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "openclipart-png" in err and "Traceback" not in err
    rc = _cli(["--out", str(tmp_path / "o"), "--clipart-dir", "none",
               "--emoji-font", str(tmp_path / "no.ttf"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "fonts-noto-color-emoji" in err


def test_cli_refuses_a_foreign_folder(tmp_path, capsys, clipart_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    rc = _cli(["--out", str(out), "--clipart-dir", str(clipart_dir), "--emoji-font", "none",
               "--no-progress"])
    assert rc == 2 and "no corpus" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "precious"


def test_cli_builds_with_explicit_counts(tmp_path, capsys, clipart_dir):
    out = tmp_path / "cli"
    rc = _cli(["--out", str(out), "--clipart-dir", str(clipart_dir), "--emoji-font", "none",
               "--pairs", "5", "--interleaved", "3", "--videos", "2", "--vqa", "3",
               "--vqa-test", "2", "--video-qa", "2", "--recognize", "2", "--classify-renders",
               "1", "--caption-renders", "1", "--workers", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["pairs.train.jsonl"] == 5
    assert manifest["sources"]["emoji_font"] is None


# ------------------------------------------------------------------------------------------
# the real Debian sources


@pytest.mark.slow
def test_real_openclipart_labels():
    if not REAL_CLIPART.is_dir():
        pytest.skip(f"openclipart-png not installed ({REAL_CLIPART} missing): "
                    f"apt-get install -y openclipart-png")
    labels = S.scan_clipart(REAL_CLIPART)
    assert 200 <= len(labels) <= 1000
    for must in ("apple", "cat", "dog", "elephant", "guitar", "light bulb", "star"):
        assert must in labels, must
    for word in ("architetto", "ganson", "nicu", "buculei", "01"):
        assert not any(word in lab.split() for lab in labels), word
    assert all(len(lab) <= 24 and len(lab.split()) <= 3 for lab in labels)
    cut = S.load_source_cutout(S.Source("clipart", labels["apple"][0]), str(REAL_CLIPART), None)
    assert cut is not None and cut.mode == "RGBA" and max(cut.size) <= S.CUTOUT_MAX_SIDE


@pytest.mark.slow
def test_real_emoji_font(tmp_path, clipart_dir):
    if not REAL_FONT.is_file():
        pytest.skip(f"fonts-noto-color-emoji not installed ({REAL_FONT} missing): "
                    f"apt-get install -y fonts-noto-color-emoji")
    im = S.render_emoji("\U0001F34E", str(REAL_FONT))
    a = np.asarray(im)
    assert im.getbbox() is not None and a[..., 0][a[..., 3] > 0].mean() > 120  # a red apple
    chars = ["\U0001F34E", "\U0001F408", "\U0001F68C", "\U0001F3BA", "\U0001F41D"]
    emo = S.scan_emoji(str(REAL_FONT), chars)
    assert set(emo) == {"apple", "cat", "bus", "trumpet", "bee"}
    out = tmp_path / "real"
    manifest = build_corpus(BuildConfig(out=out, sizes=TINY, clipart_dir=str(clipart_dir),
                                        emoji_font=str(REAL_FONT), emoji_chars=chars, workers=1,
                                        progress=False))
    apple = [c for c in manifest["train_concepts"] + manifest["heldout_concepts"]
             if c["id"] == "apple"][0]
    assert any(s.startswith("emoji") for s in apple["sources"])  # emoji + clip art merged
    assert any(s.startswith("clipart") for s in apple["sources"])
