"""Readers: the corpus JSONL, COCO captions, caption folders, MMC4 documents; resumable streams."""
from __future__ import annotations

import json

import pytest

from engine.data.readers import RecordStream, open_source, read_coco, read_corpus, read_folder, read_mmc4
from tests.train_fixtures import _image, write_corpus


def test_corpus_jsonl(tmp_path):
    write_corpus(tmp_path, n_pairs=3, n_docs=2, n_videos=1)
    src = read_corpus(tmp_path / "interleaved.train.jsonl")
    assert len(src) == 2
    r = src[1]
    assert r.kind == "interleaved" and r.text.count("<image>") == len(r.media) == 4
    assert all(p.is_absolute() and p.is_file() for p in r.media)
    v = read_corpus(tmp_path / "videos.train.jsonl", "video")[0]
    assert v.kind == "video" and v.media[0].suffix == ".gif"


def test_corpus_errors_name_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"media": ["a.png"], "text": "<image>x<EOC>"}) + "\n" + json.dumps({"media": ["a.png"], "text": "no marker"}) + "\n{oops\n")
    src = read_corpus(f)
    src[0]
    with pytest.raises(ValueError, match=r"bad.jsonl:2: the text holds 0 <image> markers but 1 media"):
        src[1]
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        src[2]
    with pytest.raises(FileNotFoundError):
        read_corpus(tmp_path / "missing.jsonl")


def test_plain_caption_becomes_a_pair(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"media": ["a.png"], "text": "a red apple"}) + "\n")
    assert read_corpus(f, "pairs")[0].text == "<image>a red apple<EOC>"


def test_coco_captions(tmp_path):
    (tmp_path / "images").mkdir()
    _image(tmp_path / "images" / "000001.jpg", 1)
    ann = {"images": [{"id": 1, "file_name": "000001.jpg"}],
           "annotations": [{"id": 10, "image_id": 1, "caption": "A cat. "}, {"id": 11, "image_id": 1, "caption": "A pet"}]}
    (tmp_path / "captions_train.json").write_text(json.dumps(ann))
    src = read_coco(tmp_path / "captions_train.json")
    assert len(src) == 2
    assert src[0].text == "<image>A cat.<EOC>" and src[0].media == [tmp_path / "images" / "000001.jpg"]
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        read_coco(tmp_path / "bad.json")


def test_caption_folder_txt_and_tsv(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    _image(a / "x.png", 1)
    (a / "x.txt").write_text("a blue bird\n")
    _image(a / "y.png", 2)  # no caption: ignored
    src = read_folder(a)
    assert len(src) == 1 and src[0].text == "<image>a blue bird<EOC>"
    b = tmp_path / "b"
    b.mkdir()
    (b / "captions.tsv").write_text("image\tcaption\nimg/1.png\tgreen hills\n")
    src = read_folder(b)
    assert src[0].media == [b.resolve() / "img" / "1.png"] and src[0].text == "<image>green hills<EOC>"


def test_mmc4_documents(tmp_path):
    doc = {"text_list": ["First sentence.", "Second one.", "Third."],
           "image_info": [{"image_name": "b.jpg", "matched_text_index": 2}, {"image_name": "a.jpg", "matched_text_index": 0}]}
    (tmp_path / "docs.jsonl").write_text(json.dumps(doc) + "\n")
    r = read_mmc4(tmp_path / "docs.jsonl", image_dir=tmp_path / "imgs")[0]
    assert r.text == "<image>First sentence. Second one. <image>Third.<EOC>"
    assert [p.name for p in r.media] == ["a.jpg", "b.jpg"]


def test_parquet_needs_pyarrow_or_reads(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "t.parquet").write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="pyarrow"):
            open_source("parquet", tmp_path / "t.parquet", "pairs")
        return
    pq.write_table(pa.table({"image_path": ["x.png"], "text": ["a dog"]}), tmp_path / "t.parquet")
    r = open_source("parquet", tmp_path / "t.parquet", "pairs")[0]
    assert r.text == "<image>a dog<EOC>" and r.media[0].name == "x.png"


def test_stream_epochs_shards_and_resume():
    src = list(range(10))
    s = RecordStream(src, seed=1)
    first = [next(s) for _ in range(10)]
    assert sorted(first) == src and first != src  # a shuffled epoch
    second = [next(s) for _ in range(10)]
    assert sorted(second) == src and second != first  # a new order each epoch

    s = RecordStream(src, seed=1)
    [next(s) for _ in range(13)]
    state = s.state_dict()
    want = [next(s) for _ in range(9)]
    t = RecordStream(src, seed=1)
    t.load_state_dict(state)
    assert [next(t) for _ in range(9)] == want

    r0, r1 = RecordStream(src, seed=2, rank=0, world=2), RecordStream(src, seed=2, rank=1, world=2)
    a, b = [next(r0) for _ in range(5)], [next(r1) for _ in range(5)]
    assert sorted(a + b) == src  # disjoint shares of one epoch
