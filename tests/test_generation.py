"""engine.generation: choosing tokens, stop rules, cancellation, streaming text; and the same
rules through ChatEngine with a scripted model."""
from __future__ import annotations

import threading

import pytest
import torch

from engine.conversation import Conversation, GenerationSettings, Turn
from engine.generation import DecodeResult, IncrementalDetokenizer, Sampler, decode
from engine.testing import tiny_model, tiny_tokenizer



pytestmark = pytest.mark.usefixtures("one_thread")


V = 50


def onehot(token: int, v: int = V, high: float = 10.0) -> torch.Tensor:
    x = torch.zeros(v)
    x[token] = high
    return x


def scripted(tokens: list[int]):
    """A `step` function and first logits that make greedy decoding produce `tokens`."""
    it = iter(tokens[1:])
    calls = []

    def step(tok):
        calls.append(tok)
        return onehot(next(it, 0))

    return onehot(tokens[0]), step, calls


GREEDY = GenerationSettings(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)


def run(tokens, stop_ids=None, max_new=20, cancel=None, settings=GREEDY):
    first, step, calls = scripted(tokens)
    result = DecodeResult()
    out = list(decode(first, step, Sampler(settings), stop_ids or {}, max_new, cancel, result))
    return out, result, calls


def test_stops_on_eoc_and_eos_without_yielding_them():
    out, result, _ = run([5, 6, 7, 9, 8], {9: "eoc", 3: "eos"})
    assert out == [5, 6, 7] and result.finish_reason == "eoc" and result.stop_token == 9
    out, result, _ = run([5, 3, 7], {9: "eoc", 3: "eos"})
    assert out == [5] and result.finish_reason == "eos"


def test_max_new_tokens_and_the_last_token_is_not_fed_back():
    out, result, calls = run(list(range(10, 40)), max_new=4)
    assert out == [10, 11, 12, 13] and result.finish_reason == "length"
    assert calls == [10, 11, 12]  # the model never runs for a token nobody will read


def test_cancellation():
    cancel = threading.Event()
    first, step, _ = scripted(list(range(10, 40)))
    result = DecodeResult()
    got = []
    for tok in decode(first, step, Sampler(GREEDY), {}, 20, cancel, result):
        got.append(tok)
        if len(got) == 3:
            cancel.set()
    assert got == [10, 11, 12] and result.finish_reason == "cancelled"
    cancel = threading.Event()
    cancel.set()
    out, result, calls = run([1, 2], cancel=cancel)
    assert out == [] and result.finish_reason == "cancelled" and calls == []


def test_banned_tokens_are_never_chosen():
    s = Sampler(GREEDY, banned_ids=(4,))
    assert s([], onehot(4)) != 4


def test_repetition_penalty_and_no_repeat_ngram():
    logits = torch.zeros(V)
    logits[7], logits[8] = 2.0, 1.9
    plain = Sampler(GREEDY)
    assert plain([7, 1, 7], logits) == 7
    penalised = Sampler(GenerationSettings(temperature=0.0, repetition_penalty=1.3, no_repeat_ngram_size=0))
    assert penalised([7], logits) == 8 and penalised([], logits) == 7
    ngram = Sampler(GenerationSettings(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=2))
    assert ngram([7, 1, 7], logits) == 7  # "7 1" then "1 7" seen; after "7", 1 is banned, not 7
    logits[1] = 5.0
    assert ngram([7, 1, 3, 7], logits) != 1  # "7 1" already occurred: 1 may not follow 7 again


def test_greedy_with_penalties_matches_transformers_processors():
    """The index-only repetition controls choose what HF's logits processors would."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        logits = torch.randn(V, generator=g) * 3
        generated = torch.randint(0, 12, (int(torch.randint(0, 30, (1,), generator=g)),), generator=g).tolist()
        penalty, n = [1.0, 1.1, 1.5, 0.8][trial % 4], [0, 1, 2, 3][(trial // 4) % 4]
        ours = Sampler(GenerationSettings(temperature=0, repetition_penalty=penalty, no_repeat_ngram_size=n), banned_ids=(3,))
        ref = logits[None].clone()
        ref[0, 3] = float("-inf")
        if generated:
            ids = torch.tensor([generated])
            if penalty != 1.0:
                ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, ref)
            if n:
                ref = NoRepeatNGramLogitsProcessor(n)(ids, ref)
        assert ours(generated, logits) == int(ref.argmax()), (generated, penalty, n)


def test_sampling_is_seeded_and_reproducible():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0))
    settings = GenerationSettings(temperature=1.2, top_p=0.9, top_k=20, repetition_penalty=1.0, no_repeat_ngram_size=0, seed=123)

    def draw(seed):
        s = Sampler(GenerationSettings(**{**settings.__dict__, "seed": seed}))
        return [s([], logits) for _ in range(30)]

    assert draw(123) == draw(123)
    assert draw(123) != draw(124)
    top1 = Sampler(GenerationSettings(temperature=1.0, top_k=1, seed=1, repetition_penalty=1.0, no_repeat_ngram_size=0))
    assert {top1([], logits) for _ in range(10)} == {int(logits.argmax())}


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(num_frames=0)])
def test_bad_settings_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Sampler(GenerationSettings(**bad))


def test_incremental_detokenizer_never_splits_characters():
    tok = tiny_tokenizer()
    text = "Héllo wörld — 世界 🐦🦩 naïve café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # byte-level pieces: multi-byte characters span tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == tok.decode(ids)


# ----- the same rules through ChatEngine ---------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    from engine.chat import ChatEngine

    return ChatEngine(tiny_model(gates=0.5))


def script_engine(engine, monkeypatch, tokens):
    """Makes the engine's model calls return logits that spell out `tokens` greedily."""
    v = max(engine.model.new_token_ids) + 1
    queue = list(tokens)

    def forward(ids, media, cache):
        return onehot(queue.pop(0) if queue else 5, v)

    monkeypatch.setattr(engine, "forward", forward)


def ask(text="Hello!"):
    return Conversation(turns=[Turn("user", text)])


def test_engine_stops_at_eoc_eos_and_end_of_turn(engine, monkeypatch):
    tok = engine.model.tokenizer
    words = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    for stop, reason in [(engine.model.eoc_token_id, "eoc"), (tok.eos_token_id, "eos"), (engine.format.end_of_turn_id, "eos")]:
        script_engine(engine, monkeypatch, words + [stop] + words)
        stream = engine.stream(ask(), GREEDY)
        text = "".join(stream)
        assert text == "The quick brown fox" and stream.finish_reason == reason
        assert stream.tokens == words


def test_engine_length_and_streaming_deltas(engine, monkeypatch):
    tok = engine.model.tokenizer
    ids = tok("Héllo wörld — 世界 🐦 a b c d e f g", add_special_tokens=False)["input_ids"]
    script_engine(engine, monkeypatch, ids)
    stream = engine.stream(ask(), GenerationSettings(max_new_tokens=len(ids) - 3, temperature=0, repetition_penalty=1.0, no_repeat_ngram_size=0))
    deltas = list(stream)
    assert stream.finish_reason == "length" and len(stream.tokens) == len(ids) - 3
    assert "".join(deltas) == stream.text == tok.decode(ids[:-3], skip_special_tokens=True)
    assert all(deltas) and all("\ufffd" not in d for d in deltas)


def test_engine_never_generates_a_media_marker(engine, monkeypatch):
    script_engine(engine, monkeypatch, [engine.model.media_token_id] * 5)
    stream = engine.stream(ask(), GenerationSettings(max_new_tokens=5, temperature=0))
    list(stream)
    assert engine.model.media_token_id not in stream.tokens


def test_engine_cancellation_mid_stream(engine):
    cancel = threading.Event()
    stream = engine.stream(ask(), GenerationSettings(max_new_tokens=40, temperature=0.8, seed=0), cancel=cancel, session_id="c", stop=False)
    seen = None
    for _ in stream:
        cancel.set()
        seen = len(stream.tokens) if seen is None else seen
    assert stream.finish_reason == "cancelled" and len(stream.tokens) == seen < 40


def test_engine_sampling_reproducible_with_a_seed(engine):
    settings = GenerationSettings(max_new_tokens=15, temperature=1.0, top_p=0.95, seed=7)
    a = engine.stream(ask(), settings, stop=False)
    b = engine.stream(ask(), settings, stop=False)
    assert "".join(a) == "".join(b) and a.tokens == b.tokens
    c = engine.stream(ask(), GenerationSettings(**{**settings.__dict__, "seed": 8}), stop=False)
    list(c)
    assert c.tokens != a.tokens


def test_engine_repetition_controls_break_loops(engine, monkeypatch):
    """A model stuck on one phrase: no-repeat-ngram makes it say something else."""
    tok = engine.model.tokenizer
    loop = tok(" the cat", add_special_tokens=False)["input_ids"]
    v = max(engine.model.new_token_ids) + 1
    base = torch.linspace(0, 1, v)  # a weak preference for other tokens
    state = {"n": 0}

    def forward(ids, media, cache):
        x = base.clone()
        x[loop[state["n"] % len(loop)]] = 5.0
        state["n"] += 1
        return x

    monkeypatch.setattr(engine, "forward", forward)
    free = engine.stream(ask(), GenerationSettings(max_new_tokens=12, temperature=0, repetition_penalty=1.0, no_repeat_ngram_size=0), stop=False)
    list(free)
    assert free.tokens == (loop * 12)[:12]
    state["n"] = 0
    controlled = engine.stream(ask(), GenerationSettings(max_new_tokens=12, temperature=0, repetition_penalty=1.0, no_repeat_ngram_size=3), stop=False)
    list(controlled)
    grams = [tuple(controlled.tokens[i:i + 3]) for i in range(len(controlled.tokens) - 2)]
    assert len(grams) == len(set(grams))


def test_growing_cache_matches_dynamic_cache_through_crops():
    """In-place KV appends give the same logits as transformers' DynamicCache, across chunks,
    buffer growth (past 256 positions) and crops."""
    from transformers import DynamicCache

    from engine.cross_attention import MediaContext
    from engine.generation import GrowingCache, new_kv_cache

    model = tiny_model(gates=0.5)
    assert isinstance(new_kv_cache(model.lm.config), GrowingCache)
    ids = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(0))
    visual = torch.randn(1, 1, 4, 32)

    def media(n):
        return MediaContext(visual, torch.zeros(1, n, dtype=torch.long))

    results = []
    for cache in (GrowingCache(), DynamicCache(config=model.lm.config)):
        outs = []
        with torch.inference_mode():
            for a, b in ((0, 200), (200, 280), (280, 281), (281, 300)):
                outs.append(model(ids[:, a:b], past_key_values=cache, use_cache=True, media=media(b - a)).logits[:, -1])
            cache.crop(-50)
            assert cache.get_seq_length() == 250
            outs.append(model(ids[:, 250:260], past_key_values=cache, use_cache=True, media=media(10)).logits[:, -1])
        results.append(outs)
    for x, y in zip(*results):
        torch.testing.assert_close(x, y)
