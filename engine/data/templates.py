"""The words of the corpus: caption templates, questions and answers, motion captions, naming
sentences.  Short, plain English, because the language model is small (SmolLM2-135M)."""

from __future__ import annotations

import random

from .names import plural, with_article

MEDIA = "<image>"
EOC = "<EOC>"

# {a} = label with article ("a cat", "an apple", "grapes"), {x} = bare label, {bg} = colour,
# {abg} = colour with article ("an orange")
CAPTIONS = [
    "A drawing of {a}.",
    "Clip art: {x}.",
    "This is {a}.",
    "A picture of {a}.",
    "An illustration of {a}.",
    "{A} on {abg} background.",
    "An illustration showing {a} on {abg} background.",
    "A drawing of {a} on {bg}.",
    "{X}.",
    "A simple picture of {a}.",
    "Here is {a}.",
    "A cartoon of {a}.",
]
# Reference captions for the held-out captioning test (varied but all correct).
REFERENCE_CAPTIONS = [
    "A drawing of {a}.",
    "A picture of {a}.",
    "{A} on {abg} background.",
    "An illustration of {a}.",
    "Clip art of {a} on {bg}.",
]

NAMING = [  # few-shot naming sentences; {n} = name with article, {w} = bare name
    "This is {n}.",
    "Here is {n}.",
    "A {w}.",
    "Look, {n}!",
    "This one is called {n}.",
    "That is {n}.",
]
NAMING_QA = ("Question: What is this? Answer: {w}", "Question: What is it called? Answer: {w}")

MOTION_CAPTIONS = {
    "right": ["{A} moves from left to right.", "{A} moves to the right.",
              "{A} slides to the right."],
    "left": ["{A} moves from right to left.", "{A} moves to the left.",
             "{A} slides to the left."],
    "up": ["{A} moves up.", "{A} moves from the bottom to the top.", "{A} rises."],
    "down": ["{A} moves down.", "{A} moves from the top to the bottom.", "{A} falls down."],
    "grow": ["{A} grows bigger.", "{A} gets bigger.", "{A} grows."],
    "shrink": ["{A} shrinks.", "{A} gets smaller.", "{A} becomes smaller."],
    "appear": ["{A} appears.", "{A} suddenly appears.", "{A} shows up."],
    "disappear": ["{A} disappears.", "{A} vanishes.", "{A} goes away."],
}
BACKGROUND_QUESTION = "What colour is the background?"
DIRECTION_ANSWER = {"right": "right", "left": "left", "up": "up", "down": "down"}


def motion_question(label: str) -> str:
    """The video question of the corpus's test clips (and of the motion questions the built-in
    model trains on)."""
    return f"Which way does the {label} move?"


NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def fill(template: str, label: str, bg: str = "") -> str:
    a = with_article(label)
    abg = with_article(bg) if bg else ""
    return template.format(a=a, A=cap(a), x=label, X=cap(label), bg=bg, abg=abg)


def caption(rng: random.Random, label: str, bg: str) -> str:
    return fill(rng.choice(CAPTIONS), label, bg)


def reference_captions(label: str, bg: str) -> list[str]:
    return [fill(t, label, bg) for t in REFERENCE_CAPTIONS]


def motion_caption(rng: random.Random, label: str, motion: str) -> str:
    a = with_article(label)
    return rng.choice(MOTION_CAPTIONS[motion]).format(A=cap(a))


# Where a thing is, on a 3 x 3 grid: (column, row) -> the place's name and how a caption says it.
PLACES = {
    (0, 0): ("top left", "in the top left corner"), (1, 0): ("top", "at the top"),
    (2, 0): ("top right", "in the top right corner"), (0, 1): ("left", "on the left"),
    (1, 1): ("middle", "in the middle"), (2, 1): ("right", "on the right"),
    (0, 2): ("bottom left", "in the bottom left corner"), (1, 2): ("bottom", "at the bottom"),
    (2, 2): ("bottom right", "in the bottom right corner"),
}


SIDES = {"x": ("left", "right"), "y": ("top", "bottom")}  # a two-object scene's sides, first side first


def position_axis(question: str, answers: list[str] = ()) -> str | None:
    """The axis a position question is about, from its words and its answers ("Where is the cat?"
    names no side; its answer "left" does): "x" (left / right), "y" (top / bottom) or None."""
    words = set(" ".join([question, *map(str, answers)]).lower().replace("?", " ").split())
    if words & set(SIDES["x"]):
        return "x"
    return "y" if words & set(SIDES["y"]) else None


def side_word(axis: str) -> str:
    return "on the" if axis == "x" else "at the"


def where_qa(label: str, side: str) -> tuple[str, list[str]]:
    """"Where is the cat?" about a two-object scene, and its answers ("left", "on the left", ...)."""
    return f"Where is the {label}?", [side, f"on the {side}", f"at the {side}"]


def which_side_qa(label: str, side: str, axis: str) -> tuple[str, list[str]]:
    """"Is the cat on the left or on the right?" and its answers."""
    word, (first, second) = side_word(axis), SIDES[axis]
    return f"Is the {label} {word} {first} or {word} {second}?", [side, f"{word} {side}"]


def what_is_at_qa(side: str, axis: str, label: str) -> tuple[str, list[str]]:
    """"What is on the left?" and its answer, the label of what is there."""
    return f"What is {side_word(axis)} {side}?", [label]


def position_qas(labels: tuple[str, str], axis: str) -> list[tuple[str, list[str]]]:
    """Every position question about a scene of two things, `labels` (the left or top one first)
    along `axis`: where each one is, asked both ways, and what is on each side (6 in all)."""
    out = []
    for label, side in zip(labels, SIDES[axis]):
        out += [where_qa(label, side), which_side_qa(label, side, axis), what_is_at_qa(side, axis, label)]
    return out


def place_caption(label: str, column: int, row: int) -> str:
    return f"{cap(with_article(label))} {PLACES[column, row][1]}."


def naming(template: str, name: str) -> str:
    return template.format(n=with_article(name), w=name)


def chunk(body: str) -> str:
    """One media item followed by its text, closed by the end-of-chunk token."""
    return f"{MEDIA}{body}{EOC}"


def qa(question: str, answer: str) -> str:
    return f"Question: {question} Answer: {answer}"


def count_answers(n: int) -> list[str]:
    return [str(n), NUMBER_WORDS[n]] if n < len(NUMBER_WORDS) else [str(n)]


def how_many(label: str) -> str:
    return f"How many {plural(label)} are there?"
