"""Readers for evaluation data. Every reader returns a list of plain dicts with absolute media
paths under "media" (a list: one image, or one video) and the task's fields:

* the corpus's held-out split (``python -m engine build-data``): ``<name>.test.jsonl`` files,
  media paths relative to the corpus folder;
* COCO captions JSON (``captions_val2014.json``: ``images`` + ``annotations``) -> one item per
  image with all its captions;
* VQAv2 questions + annotations JSON -> one item per question with its 10 answers.

`load_task_data(task, data)` picks the reader from what `data` is.
"""
from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from pathlib import Path

# task -> the corpus file it reads
CORPUS_FILES = {
    "caption": "captions.test.jsonl",
    "vqa": "vqa.test.jsonl",
    "dialogue": "vqa.test.jsonl",
    "classify": "classify.test.jsonl",
    "recognize": "recognize.test.jsonl",
    "video_qa": "video_qa.test.jsonl",
}
# fields each task needs in an item (besides "media")
REQUIRED = {
    "caption": ("captions",),
    "vqa": ("question", "answers"),
    "dialogue": ("question", "answers"),
    "classify": ("label",),
    "recognize": ("label",),
    "video_qa": ("question", "answers", "choices"),
}


def _resolve(root: Path, p: str) -> str:
    path = Path(p)
    return str(path if path.is_absolute() else (root / path).resolve())


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """A corpus split: one JSON object a line with "media" (paths relative to the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    root = path.parent
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            media = obj.get("media")
            if isinstance(media, str):
                media = [media]
            if not media or not isinstance(media, list):
                raise ValueError(f"{path}:{n}: the item has no \"media\" list")
            missing = [k for k in required if k not in obj]
            if missing:
                raise ValueError(f"{path}:{n}: the item lacks {missing}")
            obj["media"] = [_resolve(root, m) for m in media]
            items.append(obj)
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def read_corpus_split(data_dir: str | Path, task: str) -> list[dict]:
    if task not in CORPUS_FILES:
        raise ValueError(f"no corpus split for task {task!r}")
    items = read_jsonl(Path(data_dir) / CORPUS_FILES[task], REQUIRED[task])
    for item in items:
        if "answers" in item and isinstance(item["answers"], str):
            item["answers"] = [item["answers"]]
        if "answers" in item and "answer" not in item:
            item["answer"] = item["answers"][0]  # the corpus lists the canonical answer first
    return items


def _image_dir(json_path: Path, image_dir: str | Path | None, names: tuple[str, ...]) -> Path:
    if image_dir is not None:
        return Path(image_dir)
    for base in (json_path.parent, json_path.parent.parent):
        for name in names:
            if (base / name).is_dir():
                return base / name
    return json_path.parent


def read_coco_captions(path: str | Path, image_dir: str | Path | None = None) -> list[dict]:
    """COCO captions JSON -> [{"media": [image], "captions": [...], "image_id": id}] in image order."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path} is not a COCO captions file (needs \"images\" and \"annotations\")")
    root = _image_dir(path, image_dir, ("images", "val2014", "val2017", "train2014", "train2017"))
    caps: dict = defaultdict(list)
    for ann in data["annotations"]:
        caps[ann["image_id"]].append(ann["caption"].strip())
    items = []
    for img in data["images"]:
        if caps.get(img["id"]):
            items.append({"media": [str(root / img["file_name"])], "captions": caps[img["id"]], "image_id": img["id"]})
    if not items:
        raise ValueError(f"{path}: no image has a caption")
    return items


_COCO_ID = re.compile(r"(\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)


def _index_images_by_id(root: Path) -> dict[int, str]:
    """COCO image files (COCO_val2014_000000123456.jpg, 000000123456.jpg) by their numeric id."""
    index = {}
    if root.is_dir():
        for p in root.iterdir():
            m = _COCO_ID.search(p.name)
            if m:
                index[int(m.group(1))] = str(p)
    return index


def read_vqav2(questions: str | Path, annotations: str | Path, image_dir: str | Path | None = None) -> list[dict]:
    """VQAv2 questions + annotations -> [{"media", "question", "answers" (10), "answer" (the
    multiple-choice answer), "qtype" (answer type: yes/no, number, other), "question_type",
    "question_id"}] in question order."""
    questions, annotations = Path(questions), Path(annotations)
    qs = json.loads(questions.read_text(encoding="utf-8"))
    anns = json.loads(annotations.read_text(encoding="utf-8"))
    if "questions" not in qs or "annotations" not in anns:
        raise ValueError(f"{questions} / {annotations}: expected VQAv2 files with \"questions\" and \"annotations\"")
    root = _image_dir(questions, image_dir, ("images", "val2014", "train2014", "test2015"))
    by_id = _index_images_by_id(root)
    ann_of = {a["question_id"]: a for a in anns["annotations"]}
    items = []
    for q in qs["questions"]:
        a = ann_of.get(q["question_id"])
        if a is None:
            continue
        image = by_id.get(q["image_id"])
        if image is None:
            raise ValueError(f"no image file for VQAv2 image_id {q['image_id']} in {root}")
        answers = [x["answer"] for x in a["answers"]]
        items.append({
            "media": [image], "question": q["question"], "answers": answers,
            "answer": a.get("multiple_choice_answer", answers[0]), "qtype": a.get("answer_type", "all"),
            "question_type": a.get("question_type", ""), "question_id": q["question_id"], "image_id": q["image_id"],
        })
    if not items:
        raise ValueError(f"{questions}: no question has an annotation")
    return items


def load_task_data(task: str, data: str | Path) -> list[dict]:
    """The items of `task` from `data`: a corpus folder (its ``*.test.jsonl``), a COCO captions
    JSON file or a folder holding one (caption), a folder holding VQAv2 ``*questions*.json`` and
    ``*annotations*.json`` (vqa, dialogue), or a ``.jsonl`` file in the corpus format."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"evaluation data not found: {data} (build the corpus with `python -m engine build-data`, or pass --data)")
    if data.is_file():
        if data.suffix == ".jsonl":
            items = read_jsonl(data, REQUIRED.get(task, ()))
            for item in items:
                if "answers" in item and "answer" not in item:
                    item["answer"] = item["answers"][0]
            return items
        if data.suffix == ".json" and task == "caption":
            return read_coco_captions(data)
        raise ValueError(f"cannot read {data} for task {task!r}: expected a corpus folder, a .jsonl split or (caption) a COCO captions JSON")
    if task in CORPUS_FILES and (data / CORPUS_FILES[task]).is_file():
        return read_corpus_split(data, task)
    if task == "caption":
        found = sorted(data.glob("captions_*.json")) + sorted(data.glob("annotations/captions_*.json"))
        if found:
            return read_coco_captions(found[0])
    if task in ("vqa", "dialogue"):
        qs = sorted(data.glob("*questions*.json")) + sorted(data.glob("annotations/*questions*.json"))
        ans = sorted(data.glob("*annotations*.json")) + sorted(data.glob("annotations/*annotations*.json"))
        if qs and ans:
            return read_vqav2(qs[0], ans[0])
    expected = CORPUS_FILES.get(task, "?")
    raise ValueError(f"no {task} data in {data}: expected {expected} (a corpus folder)"
                     + (", or COCO captions_*.json" if task == "caption" else "")
                     + (", or VQAv2 *questions*.json + *annotations*.json" if task in ("vqa", "dialogue") else ""))


def subset(items: list, limit: int | None, seed: int = 0) -> list[int]:
    """Indices of the evaluated queries: all, or `limit` of them drawn with a fixed seed (so the
    same queries are used whatever the shots, seeds or selection), in file order."""
    idx = list(range(len(items)))
    if limit is None or limit >= len(items):
        return idx
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    return sorted(random.Random(seed).sample(idx, limit))
