"""engine.prompt: media markers, chat template rendering, <EOC>, task templates, context budget."""
from __future__ import annotations

import pytest

from engine.conversation import Conversation, Example, Turn
from engine.prompt import (
    ChatFormat,
    few_shot_prompt,
    place_media,
    render_conversation,
    task_example,
    task_query,
)
from engine.testing import tiny_tokenizer
from engine.tokens import add_flamingo_tokens


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    add_flamingo_tokens(t)
    return t


@pytest.fixture(scope="module")
def fmt(tok):
    return ChatFormat(tok)


def test_place_media():
    assert place_media("What is it?", 2) == "<image><image>What is it?"
    assert place_media("a <image> b <image>", 2) == "a <image> b <image>"
    assert place_media("no media", 0) == "no media"
    with pytest.raises(ValueError, match="1 <image> marker"):
        place_media("a <image> b", 2, strict=True)
    assert place_media("a <image> b", 2) == "<image><image>a  b"  # lenient: stray markers go


def test_chat_template_with_examples_media_and_eoc(fmt, tok):
    conv = Conversation(
        examples=[Example(["e1.png"], "Output: a red apple."), Example(["e2.png"], "Output: a dog.")],
        turns=[
            Turn("user", "What is this?", ["a.png"]),
            Turn("assistant", "A cat."),
            Turn("user", "Compare <image> with <image>, please.", ["b.png", "c.png"]),
        ],
    )
    text = fmt.render(conv.examples, conv.turns)
    assert text == (
        "<|user|><image>Output: a red apple.<EOC><image>Output: a dog.<EOC><image>What is this?<|end|>\n"
        "<|assistant|>A cat.<EOC><|end|>\n"
        "<|user|>Compare <image> with <image>, please.<|end|>\n<|assistant|>"
    )
    media_id = tok.convert_tokens_to_ids("<image>")
    p = render_conversation(conv, fmt, media_id, budget=10_000)
    assert p.media == ["e1.png", "e2.png", "a.png", "b.png", "c.png"]
    assert p.ids.count(media_id) == 5 and p.ids.count(tok.convert_tokens_to_ids("<EOC>")) == 3
    assert (p.dropped_turns, p.dropped_examples, p.truncated_tokens) == (0, 0, 0)


def test_end_of_turn_token_found_from_the_template(fmt, tok):
    assert fmt.has_template
    assert fmt.end_of_turn_id == tok.convert_tokens_to_ids("<|end|>")


def test_user_typed_eoc_is_removed(fmt):
    text = fmt.render([], [Turn("user", "stop<EOC>here")])
    assert "<EOC>" not in text and "stophere" in text


def test_plain_layout_without_chat_template():
    t = tiny_tokenizer()
    t.chat_template = None
    add_flamingo_tokens(t)
    fmt = ChatFormat(t)
    assert not fmt.has_template and fmt.end_of_turn_id is None
    text = fmt.render([Example(["x.png"], "Output: x")], [Turn("user", "hi", ["a.png"]), Turn("assistant", "yo"), Turn("user", "and?")])
    assert text == "User: <image>Output: x<EOC><image>hi\nAssistant: yo<EOC>\nUser: and?\nAssistant:"


def test_task_templates():
    assert task_example("caption", ["a.png"], answer="A cat.").text == "Output: A cat."
    assert task_query("caption") == "<image>Output:"
    ex = task_example("vqa", ["a.png"], question="What colour?", answer="red")
    assert ex.text == "Question: What colour? Answer: red"
    assert task_query("vqa", question="How many?") == "<image>Question: How many? Answer:"
    assert task_example("classify", ["a.png"], answer="tabby cat").text == "Category: tabby cat"
    q = task_query("dialogue", caption="A man on a horse.", rounds=[("Is it sunny?", "yes")], question="What colour is the horse?")
    assert q == "<image>Caption: A man on a horse. Question: Is it sunny? Answer: yes. Question: What colour is the horse? Answer:"
    prompt = few_shot_prompt([ex, task_example("vqa", ["b.png"], question="Shape?", answer="round")], task_query("vqa", question="Size?"))
    assert prompt == ("<image>Question: What colour? Answer: red<EOC><image>Question: Shape? Answer: round<EOC>"
                      "<image>Question: Size? Answer:")
    with pytest.raises(ValueError, match="unknown task"):
        task_query("nope")
    with pytest.raises(ValueError, match="question"):
        task_query("vqa")


def _long_conversation(n_exchanges: int, with_examples: bool = True) -> Conversation:
    turns = []
    for i in range(n_exchanges):
        turns += [Turn("user", f"Picture {i}: what is in it?", [f"img{i}.png"]), Turn("assistant", f"A blue bird number {i}.")]
    turns.append(Turn("user", "And the last one?", ["last.png"]))
    examples = [Example(["ex.png"], "Output: a red apple.")] if with_examples else []
    return Conversation(examples=examples, turns=turns)


def test_budget_drops_oldest_exchanges_keeps_examples_and_newest(fmt, tok):
    conv = _long_conversation(30)
    media_id = tok.convert_tokens_to_ids("<image>")
    full = render_conversation(conv, fmt, media_id, budget=10_000)
    p = render_conversation(conv, fmt, media_id, budget=200)
    assert len(p.ids) <= 200 < len(full.ids)
    assert p.dropped_turns > 0 and p.dropped_turns % 2 == 0  # whole exchanges
    text = tok.decode(p.ids)
    assert text.startswith("<|user|><image>Output: a red apple.<EOC><image>Picture")
    assert text.endswith("<image>And the last one?<|end|>\n<|assistant|>")
    assert p.media[0] == "ex.png" and p.media[-1] == "last.png"
    assert p.ids.count(media_id) == len(p.media)
    # The smallest drop that fits: one exchange fewer would not.
    kept = Conversation(conv.examples, conv.turns[p.dropped_turns - 2:])
    assert len(render_conversation(kept, fmt, media_id, 10_000).ids) > 200


def test_budget_last_resorts_never_fail(fmt, tok):
    media_id = tok.convert_tokens_to_ids("<image>")
    conv = Conversation(examples=[Example([f"e{i}.png"], "Output: a long example caption " * 3) for i in range(5)],
                        turns=[Turn("user", "old"), Turn("assistant", "reply"), Turn("user", "new question", ["q.png"])])
    p = render_conversation(conv, fmt, media_id, budget=60)
    assert p.dropped_turns == 2 and p.dropped_examples > 0 and len(p.ids) <= 60
    assert p.ids.count(media_id) == len(p.media) and p.media[-1] == "q.png"
    huge = Conversation(turns=[Turn("user", "word " * 500, ["a.png", "b.png"])])
    p = render_conversation(huge, fmt, media_id, budget=50)
    assert len(p.ids) == 50 and p.truncated_tokens > 0
    assert p.ids.count(media_id) == len(p.media)


def test_conversation_must_end_with_a_user_turn(fmt, tok):
    with pytest.raises(ValueError, match="user turn"):
        render_conversation(Conversation(turns=[Turn("user", "a"), Turn("assistant", "b")]), fmt, 0, 100)
    with pytest.raises(ValueError, match="user turn"):
        render_conversation(Conversation(), fmt, 0, 100)


@pytest.mark.slow
def test_smollm2_template_end_of_turn():
    from engine.lm import load_lm

    _, tok = load_lm("smollm2")
    add_flamingo_tokens(tok)
    fmt = ChatFormat(tok)
    assert tok.convert_ids_to_tokens(fmt.end_of_turn_id) == "<|im_end|>"
    text = fmt.render([], [Turn("user", "Hi", ["a.png"])])
    assert text.endswith("<|im_start|>user\n<image>Hi<|im_end|>\n<|im_start|>assistant\n")
    ids = fmt.encode(text)
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1
