"""Chat-formatted training records derived from the corpus.

The app talks to the model through the LM's chat template (SmolLM2-Instruct's
`<|im_start|>user ... <|im_end|>`), while the corpus is raw `<image>caption<EOC>` text. Training
on both teaches the gated blocks to bring the image into an assistant's answer as well as into a
caption. Each derived record is rendered by engine.prompt.ChatFormat, exactly as ChatEngine
renders a conversation, followed by the answer, `<EOC>` and the end-of-turn text:

    <|im_start|>system ...<|im_end|>
    <|im_start|>user
    <image>This is a dax.<EOC><image>What is this?<|im_end|>     (few-shot examples, if any)
    <|im_start|>assistant
    This is a dax.<EOC><|im_end|>
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..conversation import Example, Turn
from ..prompt import ChatFormat

MEDIA, EOC = "<image>", "<EOC>"

DESCRIBE = ["What is in this picture?", "Describe the image.", "What is this?", "What do you see?",
            "What does this image show?", "Caption this image.", ""]
VIDEO = ["What happens in this video?", "Describe the video.", "What is going on?", "What happens?"]
NAME = ["What is this?", "And this one?", "What is it called?", ""]


def _chunks(text: str) -> list[str]:
    """'<image>A.<EOC><image>B.<EOC>' -> ['A.', 'B.']"""
    return [c.replace(MEDIA, "").strip() for c in text.split(EOC) if c.strip()]


def _answer(chunk: str) -> str:
    m = re.search(r"Answer:\s*(.*)$", chunk)
    return m.group(1).strip() if m else chunk


def _question(chunk: str) -> str | None:
    m = re.search(r"Question:\s*(.*?)\s*Answer:", chunk)
    return m.group(1).strip() if m else None


def to_chat(kind: str, record: dict, fmt: ChatFormat, rng: random.Random) -> dict | None:
    """One corpus record -> one chat record {"media", "text"}; None when it does not fit."""
    media, chunks = record["media"], _chunks(record["text"])
    if not media or len(chunks) != len(media):
        return None
    *shots, last = chunks
    question = _question(last)
    if question is None:
        pool = VIDEO if kind == "videos" else (NAME if shots else DESCRIBE)
        question = rng.choice(pool)
    answer = _answer(last)
    examples = [Example(media=[m], text=s) for m, s in zip(media[:-1], shots)]
    prompt = fmt.render(examples, [Turn("user", question, [media[-1]])])
    return {"media": list(media), "text": f"{prompt}{answer}{EOC}{_end_of_turn(fmt)}", "source": kind}


def _end_of_turn(fmt: ChatFormat) -> str:
    if fmt.end_of_turn_id is None:
        return "\n"
    return fmt.tokenizer.convert_ids_to_tokens(fmt.end_of_turn_id) + "\n"


def build_chat_file(corpus: Path, tokenizer, sources: dict[str, Path], out_name: str = "chat.train.jsonl", per_source: int = 2000, seed: int = 0) -> dict[str, int]:
    """Writes corpus/out_name from up to `per_source` records of each source file (keyed by
    kind: pairs, vqa, videos, interleaved); returns how many records came from each."""
    rng = random.Random(seed)
    fmt = ChatFormat(tokenizer)
    out, counts = [], {}
    for kind, path in sources.items():
        lines = Path(path).read_text().splitlines()
        rng.shuffle(lines)
        made = [r for r in (to_chat(kind, json.loads(line), fmt, rng) for line in lines[:per_source]) if r]
        counts[kind] = len(made)
        out.extend(made)
    rng.shuffle(out)
    (corpus / out_name).write_text("".join(json.dumps(r) + "\n" for r in out))
    return counts
