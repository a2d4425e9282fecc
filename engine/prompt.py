"""Rendering a conversation to text and tokens: the one place that decides what the LM reads.

A rendered prompt is the few-shot prefix (each example: its media markers, its text, `<EOC>`)
followed by the turns, through the LM's chat template where the tokenizer has one (SmolLM2-
Instruct does) and a plain "User:/Assistant:" layout otherwise. Every media item is one `<image>`
marker (a video too: its frames travel together); each assistant answer ends with `<EOC>`.

    <|im_start|>system ... <|im_end|>
    <|im_start|>user
    <image>Output: a red apple.<EOC><image>Output: a dog.<EOC>   <- few-shot prefix
    <image>What is in this picture?<|im_end|>                    <- the first kept user turn
    <|im_start|>assistant
    A cat on a mat.<EOC><|im_end|>
    ...
    <|im_start|>assistant\n                                        <- generation starts here

The few-shot prefix sits at the start of the first kept user message, so the text before the
first turn is the same whichever old turns are dropped to fit the context.

Task templates for the paper's tasks (captioning, VQA, classification, visual dialogue) build
examples and queries in the same `<image>text<EOC>` form (`task_example`, `task_query`,
`few_shot_prompt`).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from .conversation import Conversation, Example, Turn

log = logging.getLogger(__name__)

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<EOC>"


# ----- media markers ----------------------------------------------------------------------------
def place_media(text: str, num_media: int, marker: str = MEDIA_TOKEN, strict: bool = False) -> str:
    """Puts one `marker` per media item into `text`.

    Markers already in the text are kept when there is exactly one per media item; with none,
    all markers go before the text. Any other count is a mistake: `strict` raises ValueError,
    otherwise the stray markers are removed (they would not match any media) and the media go
    first.
    """
    found = text.count(marker)
    if found == num_media:
        return text
    if found and strict:
        raise ValueError(f"the prompt holds {found} {marker} marker(s) but {num_media} media item(s) were given")
    if found:
        log.warning("text holds %d %s marker(s) for %d media item(s); placing the media before the text", found, marker, num_media)
        text = text.replace(marker, "")
    return marker * num_media + text


def scrub(text: str, tokens: tuple[str, ...] = (EOC_TOKEN,)) -> str:
    """Removes control tokens a user may have typed (a literal `<EOC>` would end the answer)."""
    for token in tokens:
        text = text.replace(token, "")
    return text


# ----- task templates ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskTemplate:
    """The text around one media item for a task. `example` has every field filled in (for a
    shot); `query` stops where the model is to continue. Markers are not part of the template:
    `task_example`/`task_query` put them first (one per media item)."""

    name: str
    example: str
    query: str


TASKS: dict[str, TaskTemplate] = {
    "caption": TaskTemplate("caption", "Output: {answer}", "Output:"),
    "vqa": TaskTemplate("vqa", "Question: {question} Answer: {answer}", "Question: {question} Answer:"),
    "classify": TaskTemplate("classify", "Category: {answer}", "Category:"),
    # Visual dialogue: the caption and earlier rounds, then the question (VisDial layout).
    "dialogue": TaskTemplate("dialogue", "{history}Question: {question} Answer: {answer}", "{history}Question: {question} Answer:"),
}


def _task(name: str) -> TaskTemplate:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def dialogue_history(caption: str = "", rounds: list[tuple[str, str]] | tuple = ()) -> str:
    """`Caption: c. Question: q1 Answer: a1. ...` with a trailing space, for the dialogue task."""
    parts = [f"Caption: {caption.strip().rstrip('.')}." if caption else ""]
    parts += [f"Question: {q.strip()} Answer: {a.strip().rstrip('.')}." for q, a in rounds]
    text = " ".join(p for p in parts if p)
    return text + " " if text else ""


def _fill(template: str, fields: dict) -> str:
    fields = {k: (v.strip() if isinstance(v, str) else v) for k, v in fields.items()}
    history = dialogue_history(fields.pop("caption", ""), fields.pop("rounds", ()))
    fields.setdefault("history", history)
    try:
        return template.format(**fields)
    except KeyError as e:
        raise ValueError(f"task template {template!r} needs the field {e.args[0]!r}") from None


def task_example(task: str, media: list[str], **fields) -> Example:
    """A few-shot example for `task`, e.g. task_example("vqa", [path], question=..., answer=...)."""
    return Example(media=list(media), text=_fill(_task(task).example, fields))


def task_query(task: str, num_media: int = 1, **fields) -> str:
    """The query text (markers first) the model continues, e.g. `<image>Question: q Answer:`."""
    return place_media(_fill(_task(task).query, fields), num_media)


def render_example(example: Example, marker: str = MEDIA_TOKEN, eoc: str = EOC_TOKEN) -> str:
    return place_media(example.text, len(example.media), marker) + eoc


def few_shot_prompt(examples: list[Example], query: str, marker: str = MEDIA_TOKEN, eoc: str = EOC_TOKEN) -> str:
    """Flamingo's interleaved few-shot prompt, without a chat template (evaluation):
    `<image>Output: a.<EOC><image>Output: b.<EOC><image>Output:`."""
    return "".join(render_example(e, marker, eoc) for e in examples) + query


# ----- chat rendering -----------------------------------------------------------------------
@dataclass
class ChatFormat:
    """How one tokenizer lays out a chat: its template (or the plain fallback) and the token
    that ends a turn (e.g. `<|im_end|>`), found by rendering a probe conversation."""

    tokenizer: object
    marker: str = MEDIA_TOKEN
    eoc: str = EOC_TOKEN
    has_template: bool = field(init=False)
    end_of_turn_id: int | None = field(init=False)

    def __post_init__(self):
        # A fast tokenizer's __call__ re-sets its truncation/padding state (a mutable borrow of
        # the Rust object): concurrent calls from several threads can fail, so encode one at a time.
        self._lock = threading.Lock()
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.end_of_turn_id = self._find_end_of_turn() if self.has_template else None

    def _find_end_of_turn(self) -> int | None:
        probe = "Zq7Zq"
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
            )
        except Exception:  # a template that refuses the probe: no end-of-turn token known
            return None
        after = text[text.rfind(probe) + len(probe):]
        with self._lock:
            ids = self.tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        if not ids:
            return None
        special = set(getattr(self.tokenizer, "all_special_ids", []))
        special |= {i for i, t in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        return ids[0] if ids[0] in special else None

    # -- text --
    def render(self, examples: list[Example], turns: list[Turn]) -> str:
        """The prompt text for `turns` (whose last is the new user turn) after `examples`."""
        prefix = "".join(render_example(e, self.marker, self.eoc) for e in examples)
        messages = []
        for turn in turns:
            content = place_media(scrub(turn.text, (self.eoc,)), len(turn.media), self.marker)
            if turn.role == "assistant":
                content += self.eoc
            elif prefix:
                content, prefix = prefix + content, ""
            messages.append({"role": turn.role, "content": content})
        if prefix:  # no user turn at all (not reached through ChatEngine)
            messages.insert(0, {"role": "user", "content": prefix})
        if self.has_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n" for m in messages]
        return "".join(lines) + "Assistant:"

    def encode(self, text: str) -> list[int]:
        # A chat template writes any BOS itself; plain text gets the tokenizer's usual specials.
        with self._lock:
            return self.tokenizer(text, add_special_tokens=not self.has_template)["input_ids"]


@dataclass
class RenderedPrompt:
    """The token ids for the LM, the media of its markers in order, and what was left out."""

    ids: list[int]
    media: list[str]
    dropped_turns: int = 0
    dropped_examples: int = 0
    truncated_tokens: int = 0


def _media_of(examples: list[Example], turns: list[Turn]) -> list[str]:
    return [m for e in examples for m in e.media] + [m for t in turns for m in t.media]


def render_conversation(conversation: Conversation, fmt: ChatFormat, media_token_id: int, budget: int) -> RenderedPrompt:
    """Tokens of the conversation, fitted into `budget` tokens.

    Oldest turns go first (whole exchanges: what remains starts with a user turn), keeping the
    few-shot prefix and the newest turn; then, if still too long, the oldest examples; as a last
    resort the oldest tokens themselves (with the media whose markers they held). Never fails.
    """
    turns = list(conversation.turns)
    if not turns or turns[-1].role != "user":
        raise ValueError("the conversation must end with the new user turn")
    examples = list(conversation.examples)

    def build(first_turn: int, first_example: int) -> RenderedPrompt:
        ex, tu = examples[first_example:], turns[first_turn:]
        return RenderedPrompt(fmt.encode(fmt.render(ex, tu)), _media_of(ex, tu), first_turn, first_example)

    # Start positions that leave whole exchanges: a user turn first. The newest turn is always kept.
    starts = [i for i, t in enumerate(turns) if t.role == "user"]
    full = build(0, 0)
    if len(full.ids) <= budget:
        return full
    lo, hi = 0, len(starts) - 1  # find the smallest start index that fits (length falls as we drop)
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = build(starts[mid], 0)
        if len(candidate.ids) <= budget:
            best, hi = candidate, mid - 1
        else:
            lo = mid + 1
    if best is None:
        last = starts[-1]
        for first_example in range(1, len(examples) + 1):
            candidate = build(last, first_example)
            if len(candidate.ids) <= budget or first_example == len(examples):
                best = candidate
                if len(candidate.ids) <= budget:
                    break
        best = best or build(last, 0)
    if len(best.ids) > budget:
        best = _cut_left(best, media_token_id, budget)
    log.warning(
        "conversation too long for the context (%d tokens max): dropped %d oldest turn(s), %d example(s), %d token(s)",
        budget, best.dropped_turns, best.dropped_examples, best.truncated_tokens,
    )
    return best


def _cut_left(prompt: RenderedPrompt, media_token_id: int, budget: int) -> RenderedPrompt:
    cut = len(prompt.ids) - max(budget, 1)
    lost_media = sum(1 for t in prompt.ids[:cut] if t == media_token_id)
    return RenderedPrompt(prompt.ids[cut:], prompt.media[lost_media:], prompt.dropped_turns, prompt.dropped_examples, cut)
