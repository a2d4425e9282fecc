"""Prepare the built-in model's training files from a built corpus:

    python -m engine.data.prepare --corpus corpus --pairs 5000 --interleaved 2000 --vqa 1500 --videos 300

writes `<kind>.subset.train.jsonl` (the first N records of each train file, so the frozen-feature
cache holds only what training will read), `vqa.position.train.jsonl` (the position questions of
the full VQA file, for configs/experiment_positions.yaml), `position_sides.train.jsonl` (their
scenes as one record per concept and the side it is on, for configs/experiment_binding_probe.yaml),
`vqa.position_all.train.jsonl` (their scenes asked every position question, for
configs/experiment_position_warmup.yaml), `vqa.position_mirror.train.jsonl` (the same with each
scene's mirror image, `media/vqa_mirror/`, and the answers flipped, for
configs/experiment_position_mirror.yaml),
`videos_qa.train.jsonl` (the
direction questions about the training clips, for configs/experiment_motion_mix.yaml),
`vqa_colour.train.jsonl` (the pairs' pictures asked their background colour, for
configs/default_model_colour_qa.yaml), `naming_hard.train.jsonl` (the naming episodes with half of them made hard, for
configs/experiment_hard_naming.yaml) and `chat.train.jsonl`, the chat-formatted records derived
from the image subsets (engine/data/chat_records.py), which reuse their media.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

from . import templates as T
from .chat_records import build_chat_file

log = logging.getLogger(__name__)

FILES = {"pairs": "pairs.train.jsonl", "interleaved": "interleaved.train.jsonl", "vqa": "vqa.train.jsonl", "videos": "videos.train.jsonl"}


def write_subsets(corpus: Path, limits: dict[str, int]) -> dict[str, int]:
    counts = {}
    for kind, name in FILES.items():
        src = corpus / name
        if not src.is_file():
            raise FileNotFoundError(f"{src} is missing: build the corpus first (python -m engine build-data --out {corpus})")
        with src.open() as f:
            lines = [line for _, line in zip(range(limits[kind]), f)]
        (corpus / name.replace(".train.", ".subset.train.")).write_text("".join(lines))
        counts[kind] = len(lines)
    return counts


def write_position_questions(corpus: Path) -> int:
    """vqa.train.jsonl's records with qtype "position" -> vqa.position.train.jsonl; returns their number."""
    with (corpus / FILES["vqa"]).open() as f:
        lines = [line for line in f if json.loads(line).get("qtype") == "position"]
    (corpus / "vqa.position.train.jsonl").write_text("".join(lines))
    return len(lines)


def position_scenes(corpus: Path):
    """vqa.position.train.jsonl's two-object scenes: (record, axis) for each, axis "x" or "y"."""
    with (corpus / "vqa.position.train.jsonl").open() as f:
        for line in f:
            record = json.loads(line)
            axis = T.position_axis(record["question"], record["answers"])
            if axis is not None and len(record.get("concepts", [])) == 2:
                yield record, axis


def write_position_sides(corpus: Path) -> int:
    """vqa.position.train.jsonl's scenes -> position_sides.train.jsonl: one record per scene and
    concept, {"media", "concept_id", "side"}, the side being where that concept is ("left",
    "right", "top", "bottom"; the records list the left or top concept first); returns their
    number. A token probe asked about one thing reads these (token_probe.query_field)."""
    out = [json.dumps({"media": record["media"], "concept_id": concept, "side": side}) + "\n"
           for record, axis in position_scenes(corpus) for concept, side in zip(record["concepts"], T.SIDES[axis])]
    (corpus / "position_sides.train.jsonl").write_text("".join(out))
    return len(out)


def concept_labels(corpus: Path) -> dict[str, str]:
    """Concept id -> label, from the corpus's manifest.json."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    return {c["id"]: c["label"] for c in manifest["train_concepts"] + manifest["heldout_concepts"]}


def _asked_everything(record: dict, axis: str, labels: dict[str, str]) -> list[str]:
    """A two-object scene record (its concepts, the left or top one first) -> a JSONL line for each
    of its position questions (templates.position_qas), on the same picture."""
    lines = []
    for question, answers in T.position_qas(tuple(labels[c] for c in record["concepts"]), axis):
        text = T.chunk(T.qa(question, answers[0]))
        lines.append(json.dumps(dict(record, text=text, question=question, answers=answers)) + "\n")
    return lines


def write_position_variants(corpus: Path) -> int:
    """vqa.position.train.jsonl's scenes asked every position question (templates.position_qas:
    where each of the two things is, both ways, and what is on each side) ->
    vqa.position_all.train.jsonl, six records per scene on the same picture (the corpus asks
    one); returns their number."""
    labels = concept_labels(corpus)
    out = [line for record, axis in position_scenes(corpus) for line in _asked_everything(record, axis, labels)]
    (corpus / "vqa.position_all.train.jsonl").write_text("".join(out))
    return len(out)


def write_position_mirrors(corpus: Path) -> int:
    """Each scene of vqa.position.train.jsonl mirrored along its axis (left and right, or top and
    bottom, trade places; media/vqa_mirror/), and both the scene and its mirror asked every
    position question -> vqa.position_mirror.train.jsonl; returns the number of records. A
    question and its words are the same for a scene and its mirror while the answer flips, so only
    the picture can tell them apart (assets/model/README.md, item 28)."""
    from PIL import Image, ImageOps

    labels, out = concept_labels(corpus), []
    (corpus / "media" / "vqa_mirror").mkdir(parents=True, exist_ok=True)
    for record, axis in position_scenes(corpus):
        mirror = Path("media") / "vqa_mirror" / Path(record["media"][0]).name
        with Image.open(corpus / record["media"][0]) as im:
            (ImageOps.mirror if axis == "x" else ImageOps.flip)(im.convert("RGB")).save(corpus / mirror)
        out += _asked_everything(record, axis, labels)
        out += _asked_everything(dict(record, media=[str(mirror)], concepts=record["concepts"][::-1]), axis, labels)
    (corpus / "vqa.position_mirror.train.jsonl").write_text("".join(out))
    return len(out)


def write_motion_questions(corpus: Path) -> int:
    """videos.train.jsonl's clips that move left, right, up or down, asked about as the test clips
    are ("Question: Which way does the cat move? Answer: left") -> videos_qa.train.jsonl, on the
    same frames; returns their number."""
    out = []
    with (corpus / FILES["videos"]).open() as f:
        for line in f:
            record = json.loads(line)
            answer = T.DIRECTION_ANSWER.get(record.get("motion"))
            if answer is not None:
                out.append(json.dumps(dict(record, text=T.chunk(T.qa(T.motion_question(record["label"]), answer)))))
    (corpus / "videos_qa.train.jsonl").write_text("".join(line + "\n" for line in out))
    return len(out)


def write_colour_questions(corpus: Path) -> int:
    """pairs.train.jsonl's pictures asked about their background colour as the test scenes are
    ("Question: What colour is the background? Answer: orange") -> vqa_colour.train.jsonl, on the
    same pictures; returns their number."""
    out = []
    with (corpus / FILES["pairs"]).open() as f:
        for line in f:
            record = json.loads(line)
            if record.get("background"):
                text = T.chunk(T.qa(T.BACKGROUND_QUESTION, record["background"]))
                out.append(json.dumps(dict(record, text=text, answers=[record["background"]])))
    (corpus / "vqa_colour.train.jsonl").write_text("".join(line + "\n" for line in out))
    return len(out)


def hard_episode(record: dict) -> dict | None:
    """A naming episode rewritten so that the query's concept has one example, shown first (the
    farthest from the query), the other examples after it in their order; None when the query's
    concept has no example. The built-in model's misses lean towards names shown more often or
    more recently than the right one (assets/model/README.md, recipe item 10)."""
    chunks = record["text"].split(T.MEDIA)[1:]
    concepts = record["concepts"]
    if not len(chunks) == len(record["media"]) == len(concepts):
        raise ValueError(f"a naming episode's text, media and concepts disagree: {record['text'][:80]!r}")
    query, support = concepts[-1], range(len(chunks) - 1)
    mine = [i for i in support if concepts[i] == query]
    if not mine:
        return None
    order = mine[:1] + [i for i in support if concepts[i] != query] + [len(chunks) - 1]
    return dict(record, media=[record["media"][i] for i in order], concepts=[concepts[i] for i in order],
                text="".join(T.MEDIA + chunks[i] for i in order))


def write_hard_naming(corpus: Path, fraction: float = 0.5, seed: int = 0) -> int:
    """naming.train.jsonl -> naming_hard.train.jsonl with `fraction` of the episodes rewritten by
    `hard_episode` (the rest as they are); returns how many were rewritten."""
    rng, out, changed = random.Random(seed), [], 0
    with (corpus / "naming.train.jsonl").open() as f:
        for line in f:
            record = json.loads(line)
            hard = hard_episode(record)
            if hard is not None and rng.random() < fraction:
                record, changed = hard, changed + 1
            out.append(json.dumps(record))
    (corpus / "naming_hard.train.jsonl").write_text("\n".join(out) + "\n")
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.data.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=Path("corpus"))
    p.add_argument("--lm", default="smollm2", help="LM whose chat template renders the chat records")
    for kind, n in (("pairs", 5000), ("interleaved", 2000), ("vqa", 1500), ("videos", 300)):
        p.add_argument(f"--{kind}", type=int, default=n, help=f"records of {FILES[kind]} to keep (default {n})")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ..lm import load_lm
    from ..tokens import add_flamingo_tokens

    counts = write_subsets(args.corpus, {k: getattr(args, k) for k in FILES})
    counts["vqa_position"] = write_position_questions(args.corpus)
    counts["position_sides"] = write_position_sides(args.corpus)
    counts["position_all"] = write_position_variants(args.corpus)
    counts["position_mirror"] = write_position_mirrors(args.corpus)
    counts["videos_qa"] = write_motion_questions(args.corpus)
    counts["vqa_colour"] = write_colour_questions(args.corpus)
    if (args.corpus / "naming.train.jsonl").is_file():
        counts["naming_hard"] = write_hard_naming(args.corpus, seed=args.seed)
    _, tokenizer = load_lm(args.lm)
    add_flamingo_tokens(tokenizer)
    # Videos stay out of the chat records: a training batch holds one media kind (frames per item).
    chat_sources = {k: args.corpus / FILES[k].replace(".train.", ".subset.train.") for k in FILES if k != "videos"}
    chat = build_chat_file(args.corpus, tokenizer, sources=chat_sources, seed=args.seed)
    log.info("subsets %s; chat records %s", json.dumps(counts), json.dumps(chat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
