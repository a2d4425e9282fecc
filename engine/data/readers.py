"""Streaming readers for the three kinds of training data, and the common real formats.

Every reader yields :class:`Record` s: media file paths (absolute) and a text holding one
``<image>`` marker per media item, in order, with chunks closed by ``<EOC>``.

Kinds (what the sampler does with a record, see ``engine/data/sampling.py``):

* ``interleaved`` -- documents with images between paragraphs (M3W / MMC4-like)
* ``pairs``       -- one image and its caption (ALIGN / LTIP / COCO-like)
* ``video``       -- one video and its caption (VTP-like); the media is sampled into T frames

On-disk formats (``format:`` of a dataset in the training YAML):

``corpus`` (default) -- the project's corpus, as written by ``python -m engine build-data``:
    a JSONL file, one record a line::

        {"media": ["media/x.png", "media/y.png"], "text": "<image>A cat.<EOC> ... <image>A dog.<EOC>"}

    media paths are relative to the JSONL file's folder (absolute paths are kept), one
    ``<image>`` marker per media item in order. Optional ``"new_words": ["zax", ...]``: made-up
    words the text introduces (the builder's naming documents give them as ``"names"`` with
    ``"nonce"`` flags, read the same way); a dataset with ``mask_new_words`` leaves their
    first mention out of the loss. Files: ``pairs.train.jsonl``,
    ``interleaved.train.jsonl``, ``naming.train.jsonl``, ``videos.train.jsonl`` (media are
    videos), ``vqa.train.jsonl``, and held-out ``*.test.jsonl``.
``coco`` -- COCO captions JSON (``captions_train2017.json``): ``images[].{id, file_name}`` and
    ``annotations[].{image_id, caption}``; one record per caption; images in ``image_dir``
    (default: the JSON's folder, or its ``images/`` / ``train2017/`` subfolder when present).
``folder`` -- a folder of images with captions beside them: ``x.jpg`` + ``x.txt``; or a
    ``captions.tsv`` / ``captions.csv`` / ``captions.jsonl`` index of (image path, caption).
``parquet`` -- a parquet table of (image path, caption); column names from ``image_column``
    (default ``image``/``image_path``/``file_name``/``path``) and ``caption_column`` (default
    ``caption``/``text``). Needs pyarrow.
``mmc4`` -- MMC4-style JSONL documents: ``text_list`` (sentences) and
    ``image_info[{image_name, matched_text_index}]``; each image goes before its matched
    sentence; images in ``image_dir`` (default the JSONL's folder).

Reading is streaming in the sense that records are not held in memory for JSONL formats: a
first pass indexes each line's byte offset (8 bytes a record), and records are read on demand,
so a shuffled epoch over a large file stays cheap. :class:`RecordStream` gives each dataset a
resumable, shuffled, per-rank position.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<EOC>"
KINDS = ("interleaved", "pairs", "video")
FORMATS = ("corpus", "coco", "folder", "parquet", "mmc4")


@dataclass
class Record:
    media: list[Path]  # absolute paths, one per <image> marker in `text`
    text: str
    kind: str = "interleaved"
    new_words: tuple[str, ...] = ()  # made-up words in `text`: nothing can predict their first mention


def corpus_new_words(d: dict) -> tuple[str, ...]:
    """A corpus record's made-up words: its "new_words", or the "names" flagged in "nonce"."""
    if "new_words" in d:
        return tuple(d["new_words"])
    names, nonce = d.get("names") or {}, d.get("nonce") or []
    return tuple(name for name, made_up in zip(names, nonce) if made_up)


def pair_text(caption: str) -> str:
    """The paper's format of an image-text pair: ``<image>caption<EOC>``."""
    return f"{MEDIA_TOKEN}{caption.strip()}{EOC_TOKEN}"


def _check_record(media: list[Path], text: str, where: str) -> None:
    n = text.count(MEDIA_TOKEN)
    if n != len(media):
        raise ValueError(f"{where}: the text holds {n} {MEDIA_TOKEN} markers but {len(media)} media are listed")


# ----- random-access sources -----------------------------------------------------------------
class JsonlSource:
    """Random access to the lines of a JSONL file through a byte-offset index."""

    def __init__(self, path: str | Path, parse: Callable[[dict, str], Record]):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file not found: {self.path}")
        self.parse = parse
        self.offsets = _line_offsets(self.path)
        self._fh = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Record:
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(self.offsets[i])
        line = self._fh.readline()
        where = f"{self.path}:{i + 1}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        return self.parse(d, where)

    def __getstate__(self):
        return {**self.__dict__, "_fh": None}


def _line_offsets(path: Path) -> list[int]:
    offsets, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return offsets


class ListSource:
    def __init__(self, records: Sequence[Record]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]


# ----- formats -------------------------------------------------------------------------------
def read_corpus(path: str | Path, kind: str = "interleaved") -> JsonlSource:
    """The project's corpus JSONL (see the module docstring)."""
    root = Path(path).resolve().parent

    def parse(d: dict, where: str) -> Record:
        if not isinstance(d, dict) or "text" not in d:
            raise ValueError(f"{where}: a record needs \"text\" (and \"media\")")
        media = [_resolve(root, m) for m in d.get("media") or []]
        text = d["text"]
        if kind != "interleaved" and MEDIA_TOKEN not in text and len(media) == 1:
            text = pair_text(text)
        _check_record(media, text, where)
        return Record(media, text, kind, corpus_new_words(d))

    return JsonlSource(path, parse)


def read_mmc4(path: str | Path, image_dir: str | Path | None = None, kind: str = "interleaved") -> JsonlSource:
    """MMC4-style documents: each image is placed before the sentence it matches."""
    root = Path(image_dir).resolve() if image_dir else Path(path).resolve().parent

    def parse(d: dict, where: str) -> Record:
        if "text_list" not in d:
            raise ValueError(f"{where}: an MMC4 document needs \"text_list\"")
        sentences = list(d["text_list"])
        before: dict[int, list[Path]] = {}
        for info in sorted(d.get("image_info") or [], key=lambda x: x.get("matched_text_index", 0)):
            name = info.get("image_name") or info.get("raw_url")
            if name is None:
                continue
            before.setdefault(int(info.get("matched_text_index", 0)), []).append(_resolve(root, name))
        media, parts = [], []
        for i, s in enumerate(sentences):
            for m in before.get(i, []):
                media.append(m)
                parts.append(MEDIA_TOKEN)
            parts.append(s.strip() + " ")
        text = "".join(parts).strip()
        return Record(media, text + EOC_TOKEN if media else text, kind)

    return JsonlSource(path, parse)


def read_coco(path: str | Path, image_dir: str | Path | None = None, kind: str = "pairs") -> ListSource:
    """COCO captions JSON: one (image, caption) record per annotation."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions file not found: {path}")
    d = json.loads(path.read_text())
    if not isinstance(d, dict) or "annotations" not in d or "images" not in d:
        raise ValueError(f"{path}: not a COCO captions file (needs \"images\" and \"annotations\")")
    root = Path(image_dir) if image_dir else _coco_image_dir(path)
    files = {img["id"]: img["file_name"] for img in d["images"]}
    records = []
    for ann in d["annotations"]:
        name = files.get(ann["image_id"])
        if name is None:
            raise ValueError(f"{path}: annotation {ann.get('id')} names unknown image_id {ann['image_id']}")
        records.append(Record([_resolve(root, name)], pair_text(ann["caption"]), kind))
    return ListSource(records)


def _coco_image_dir(path: Path) -> Path:
    for sub in ("images", "train2017", "val2017", "train2014", "val2014"):
        if (path.parent / sub).is_dir():
            return (path.parent / sub).resolve()
    return path.parent.resolve()


_IMAGE_COLUMNS = ("image", "image_path", "file_name", "filename", "path", "url")
_CAPTION_COLUMNS = ("caption", "text", "captions")


def read_folder(path: str | Path, kind: str = "pairs") -> ListSource:
    """A folder of images with same-stem .txt captions, or a captions.{tsv,csv,jsonl} index."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"caption folder not found: {root}")
    root = root.resolve()
    for index in ("captions.jsonl", "captions.tsv", "captions.csv"):
        if (root / index).is_file():
            rows = _read_table(root / index)
            return ListSource(_rows_to_records(rows, root, str(root / index), kind))
    from ..media import IMAGE_EXTS, VIDEO_EXTS

    exts = VIDEO_EXTS if kind == "video" else IMAGE_EXTS
    records = []
    for f in sorted(root.rglob("*")):
        if f.suffix.lower() in exts and f.with_suffix(".txt").is_file():
            records.append(Record([f], pair_text(f.with_suffix(".txt").read_text()), kind))
    if not records:
        raise ValueError(f"{root}: no images with .txt captions and no captions.tsv/.csv/.jsonl index")
    return ListSource(records)


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, newline="") as f:
        sample = f.readline()
        f.seek(0)
        has_header = any(c in sample.lower() for c in _CAPTION_COLUMNS)
        if has_header:
            return list(csv.DictReader(f, delimiter=delimiter))
        return [{"image": r[0], "caption": r[1]} for r in csv.reader(f, delimiter=delimiter) if len(r) >= 2]


def read_parquet(path: str | Path, image_dir: str | Path | None = None, kind: str = "pairs",
                 image_column: str | None = None, caption_column: str | None = None) -> ListSource:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"parquet file not found: {path}")
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError("reading parquet needs pyarrow (pip install pyarrow)") from e
    rows = pq.read_table(path).to_pylist()
    root = Path(image_dir).resolve() if image_dir else (path if path.is_dir() else path.parent).resolve()
    return ListSource(_rows_to_records(rows, root, str(path), kind, image_column, caption_column))


def _rows_to_records(rows: list[dict], root: Path, where: str, kind: str,
                     image_column: str | None = None, caption_column: str | None = None) -> list[Record]:
    if not rows:
        raise ValueError(f"{where}: no rows")
    cols = set(rows[0])
    img = image_column or next((c for c in _IMAGE_COLUMNS if c in cols), None)
    cap = caption_column or next((c for c in _CAPTION_COLUMNS if c in cols), None)
    if img not in cols or cap not in cols:
        raise ValueError(f"{where}: needs an image-path column ({'/'.join(_IMAGE_COLUMNS)}) and a caption column "
                         f"({'/'.join(_CAPTION_COLUMNS)}); found {sorted(cols)}")
    out = []
    for r in rows:
        caption = r[cap]
        if isinstance(caption, list):
            caption = caption[0]
        out.append(Record([_resolve(root, str(r[img]))], pair_text(str(caption)), kind))
    return out


def _resolve(root: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else root / q


def open_source(fmt: str, path: str | Path, kind: str, **options: Any):
    """A random-access source of Records for one dataset."""
    if fmt == "corpus":
        return read_corpus(path, kind)
    if fmt == "mmc4":
        return read_mmc4(path, options.get("image_dir"), kind)
    if fmt == "coco":
        return read_coco(path, options.get("image_dir"), kind)
    if fmt == "folder":
        return read_folder(path, kind)
    if fmt == "parquet":
        return read_parquet(path, options.get("image_dir"), kind, options.get("image_column"), options.get("caption_column"))
    raise ValueError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")


# ----- a resumable shuffled stream -----------------------------------------------------------
class RecordStream:
    """An endless stream over a source: a fresh permutation each epoch (seeded by seed and
    epoch), this rank's share of it (every world-th item), and a position that can be saved
    and restored exactly (`state_dict` / `load_state_dict`)."""

    def __init__(self, source, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1):
        if len(source) == 0:
            raise ValueError("a dataset has no records")
        self.source, self.seed, self.shuffle, self.rank, self.world = source, seed, shuffle, rank, world
        self.epoch, self.cursor = 0, 0
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            order = list(range(len(self.source)))
            if self.shuffle:
                random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
            if self.world > 1:  # every rank gets the same number of items
                if len(order) < self.world:
                    order = order * self.world
                order = order[self.rank :: self.world][: len(order) // self.world]
            self._order = order
        return self._order

    def __iter__(self) -> Iterator[Record]:
        return self

    def __next__(self) -> Record:
        order = self._epoch_order()
        if self.cursor >= len(order):
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
            order = self._epoch_order()
        i = order[self.cursor]
        self.cursor += 1
        return self.source[i]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None
