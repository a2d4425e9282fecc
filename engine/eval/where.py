"""Does the LM read where things are? Two likelihood rankings (no generation, so no answer-format
noise):

    python -m engine.eval.where --model assets/model

- places: a picture from `places.test.jsonl` (one object in one of 9 cells of a 3 x 3 grid) and
  the start of its caption ("<image>A cat"); the 9 endings (" in the top left corner.", " at the
  top.", ...) ranked by log-likelihood. Chance 1/9.
- two-choice: the scene questions "Is the X on the left or on the right?" (and top / bottom) of
  `vqa.test.jsonl`, the two sides ranked after "Question: q Answer:". Chance 1/2.
- position: every position question of two-object scenes ranked between its two choices: the
  axis's two sides for "Where is the X?" and "Is the X on the left or on the right?", the two
  things' names (the corpus manifest's labels) for "What is on the left?". Chance 1/2; by form too.

`python -m engine.eval.probe --field place` asks whether the visual tokens carry the place; this
asks whether the gated blocks pass it to the words. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import templates as T
from ..data.names import with_article
from ..data.prepare import concept_labels
from .datasets import read_jsonl
from .scoring import MediaBank, encode_text, score_continuations

TWO_SIDES = re.compile(r"(?:on|at) the (\w+) or (?:on|at) the (\w+)\?$")


def two_choices(question: str) -> tuple[str, str] | None:
    """"Is the cat on the left or on the right?" -> ("left", "right"); None for other questions."""
    m = TWO_SIDES.search(question)
    return (m.group(1), m.group(2)) if m else None


def _best(model, bank: MediaBank, prompt: str, media: str, endings: list[str]) -> int:
    ids = encode_text(model, prompt)
    conts = [encode_text(model, e, bos=False) for e in endings]
    return int(score_continuations(model, ids, [[bank.visual(media)]], conts)[0].argmax())


@torch.inference_mode()
def place_accuracy(model, items: list[dict], bank: MediaBank, progress: bool = True) -> float:
    """Share of place-labelled pictures whose own place ending is the likeliest of the 9."""
    names = [name for name, _ in T.PLACES.values()]
    endings = [f" {phrase}." for _, phrase in T.PLACES.values()]
    right = 0
    for it in tqdm(items, desc="places", disable=not progress):
        start = "<image>" + T.cap(with_article(it["label"]))
        right += names[_best(model, bank, start, it["media"][0], endings)] == it["place"]
    return right / len(items)


def position_choices(item: dict, labels: dict[str, str]) -> tuple[str, list[str]] | None:
    """A two-object scene's position question -> (its form, its two choices): "where" / "which"
    (the sides of its axis) or "what" (the two things' labels, `labels` mapping concept ids);
    None for other questions."""
    concepts, question = item.get("concepts") or [], item.get("question") or ""
    axis = T.position_axis(question, item.get("answers", []))
    if item.get("qtype", "position") != "position" or axis is None or len(concepts) != 2:
        return None
    if question.startswith("What is"):
        names = [labels.get(c) for c in concepts]
        return None if None in names else ("what", names)
    return ("which" if two_choices(question) else "where"), list(T.SIDES[axis])


@torch.inference_mode()
def choice_accuracy(model, items: list[tuple[dict, list[str]]], bank: MediaBank, progress: bool = True,
                    desc: str = "choices") -> list[bool]:
    """For each (question, its choices): is a right answer the likelier choice after "Question: q Answer:"?"""
    right = []
    for it, choices in tqdm(items, desc=desc, disable=not progress):
        prompt = "<image>" + T.qa(it["question"], "").rstrip()
        right.append(choices[_best(model, bank, prompt, it["media"][0], [f" {c}" for c in choices])] in it["answers"])
    return right


def two_choice_accuracy(model, items: list[dict], bank: MediaBank, progress: bool = True) -> float:
    """Share of two-sided position questions whose right side is the likelier answer."""
    right = choice_accuracy(model, [(it, list(two_choices(it["question"]))) for it in items], bank, progress, "two-choice")
    return sum(right) / len(right)


def position_accuracy(model, items: list[dict], labels: dict[str, str], bank: MediaBank, progress: bool = True) -> dict:
    """Every position question of two-object scenes between its two choices: overall and by form."""
    asked = [(it, *choice) for it in items if (choice := position_choices(it, labels))]
    right = choice_accuracy(model, [(it, choices) for it, _, choices in asked], bank, progress, "position")
    out = {"accuracy": round(sum(right) / len(right), 4), "n": len(right), "chance": 0.5}
    for form in ("where", "which", "what"):
        mine = [r for r, (_, f, _) in zip(right, asked) if f == form]
        if mine:
            out[form] = {"accuracy": round(sum(mine) / len(mine), 4), "n": len(mine)}
    return out


def run_where(model, places: list[dict], questions: list[dict], progress: bool = True,
              labels: dict[str, str] | None = None) -> dict:
    """`labels` (concept id -> label) adds the ranking of every position question."""
    places = [it for it in places if it.get("place") in {n for n, _ in T.PLACES.values()}]
    positions = [it for it in questions if labels is not None and position_choices(it, labels)]
    questions = [it for it in questions if it.get("question") and two_choices(it["question"])]
    if not places and not questions and not positions:
        raise ValueError("no place-labelled pictures and no position questions in the data")
    bank, out = MediaBank(model), {}
    if places:
        out["places"] = {"accuracy": round(place_accuracy(model, places, bank, progress), 4), "n": len(places),
                         "chance": round(1 / len(T.PLACES), 4)}
    if questions:
        out["two_choice"] = {"accuracy": round(two_choice_accuracy(model, questions, bank, progress), 4),
                             "n": len(questions), "chance": 0.5}
    if positions:
        out["position"] = position_accuracy(model, positions, labels, bank, progress)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.eval.where", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/model", help="a saved model folder (default assets/model)")
    p.add_argument("--places", default="corpus/places.test.jsonl", help="place-labelled pictures ('' to skip)")
    p.add_argument("--vqa", default="corpus/vqa.test.jsonl", help="scene questions ('' to skip)")
    p.add_argument("--limit", type=int, default=180, help="place-labelled pictures to use (default 180)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from ..model import FlamingoModel
    from ..stdio import stdout_to_stderr

    try:
        places = read_jsonl(args.places)[: args.limit] if args.places else []
        questions = read_jsonl(args.vqa) if args.vqa else []
        manifest = Path(args.vqa).parent / "manifest.json" if args.vqa else None
        labels = concept_labels(manifest.parent) if manifest and manifest.is_file() else None
        with stdout_to_stderr():  # stdout holds the JSON result alone
            model = FlamingoModel.from_pretrained(args.model).eval()
        result = run_where(model, places, questions, progress=not args.no_progress, labels=labels)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"model": args.model, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
