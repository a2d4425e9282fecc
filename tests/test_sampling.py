"""The paper's sampling: 5 images / 256-token windows, pair truncation, label masking, collation."""
from __future__ import annotations

import random

import pytest
import torch

from engine.data.readers import Record, read_corpus
from engine.data.sampling import (IGNORE, SequenceSampler, cap_images, collate, first_mentions, make_labels, sample_window,
                                  stack_media)
from engine.testing import tiny_tokenizer
from engine.tokens import add_flamingo_tokens

M = 9999  # the <image> id in synthetic sequences


def _doc(n_images: int, gap: int = 40):
    """[M, 1000+k, filler...] per image: the token after each marker names its media."""
    filler = iter(range(20000, 10**6))  # unique text tokens, so a window's place is unambiguous
    ids, media = [next(filler) for _ in range(gap)], []
    for k in range(n_images):
        ids += [M, 1000 + k] + [next(filler) for _ in range(gap)]
        media.append(k)
    return ids, media


def _check_consistent(ids, media):
    marks = [i for i, t in enumerate(ids) if t == M]
    assert len(marks) == len(media)
    for pos, m in zip(marks, media):
        if pos + 1 < len(ids):
            assert ids[pos + 1] == 1000 + m  # the kept marker's own image, in order


@pytest.mark.parametrize("seed", range(30))
def test_window_keeps_first_five_images_and_matching_markers(seed):
    ids, media = _doc(12, gap=20)
    out, kept = sample_window(ids, media, M, random.Random(seed), max_tokens=256, max_images=5)
    assert len(out) <= 256
    assert 1 <= len(kept) <= 5
    assert kept == sorted(kept) and kept == list(range(kept[0], kept[0] + len(kept)))  # the first ones in the window
    _check_consistent(out, kept)


def test_window_is_a_random_contiguous_subsequence():
    ids, media = _doc(30, gap=30)
    starts = set()
    for seed in range(20):
        out, kept = sample_window(ids, media, M, random.Random(seed), max_tokens=64, max_images=5)
        s = ids.index(out[0])
        assert ids[s : s + 64] == out  # at most 2 markers fit in 64 tokens here: none removed
        starts.add(s)
    assert len(starts) > 5


def test_window_prefers_spans_with_an_image():
    ids = list(range(5, 600)) + [M, 1000] + [7] * 10  # one image at the very end
    for seed in range(10):
        out, kept = sample_window(ids, [0], M, random.Random(seed), max_tokens=64)
        assert kept == [0] and M in out


def test_short_document_is_kept_whole_with_images_capped():
    ids, media = _doc(8, gap=3)
    out, kept = sample_window(ids, media, M, random.Random(0), max_tokens=256, max_images=5)
    assert kept == [0, 1, 2, 3, 4]
    assert out.count(M) == 5 and len(out) == len(ids) - 3  # the 3 later markers removed, their text kept
    _check_consistent(out, kept)


def test_cap_images():
    out, kept = cap_images([M, 1, M, 2, M, 3], ["a", "b", "c"], M, 2)
    assert out == [M, 1, M, 2, 3] and kept == ["a", "b"]


def test_labels_mask_images_padding_and_text_before_first_image():
    ids = [1, 2, M, 3, 4, M, 5]
    assert make_labels(ids, M) == [IGNORE, IGNORE, IGNORE, 3, 4, IGNORE, 5]
    from engine.data.sampling import Sample

    batch = collate([Sample(ids, ["a", "b"]), Sample([M, 8], ["c"])], pad_id=0, media_token_id=M)
    assert batch.input_ids.shape == (2, 7)
    assert batch.attention_mask[1].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert batch.labels[1].tolist() == [IGNORE, 8] + [IGNORE] * 5
    assert batch.num_media == 2 and batch.media == [["a", "b"], ["c"]]


def test_stack_media_pads_rows_with_fewer_media():
    a = torch.ones(1, 4, 3)
    out = stack_media([[a, a], [a]], 2)
    assert out.shape == (2, 2, 1, 4, 3) and out[1, 1].abs().sum() == 0


def test_sequence_sampler_with_a_real_tokenizer():
    tok = tiny_tokenizer()
    media_id, eoc_id = add_flamingo_tokens(tok)
    pairs = SequenceSampler(tok, media_id, "pairs", max_tokens=6)
    s = pairs(Record(["x.png"], "<image>a photo of a cat sitting on a mat<EOC>", "pairs"))
    assert s.input_ids[0] == media_id and len(s.input_ids) == 6 and s.media == ["x.png"]
    full = pairs.encode("<image>a cat<EOC>")
    assert full[0] == media_id and full[-1] == eoc_id
    with pytest.raises(ValueError, match="markers"):
        pairs(Record(["x.png", "y.png"], "<image>one marker only<EOC>", "pairs"))

    doc = "".join(f"<image>the quick brown fox number {k}.<EOC>" for k in range(9))
    inter = SequenceSampler(tok, media_id, "interleaved", max_tokens=256, max_images=5, seed=3)
    s = inter(Record([f"{k}.png" for k in range(9)], doc, "interleaved"))
    assert s.media == [f"{k}.png" for k in range(5)] and s.input_ids.count(media_id) == 5


def test_sampler_rng_state_roundtrip():
    tok = tiny_tokenizer()
    media_id, _ = add_flamingo_tokens(tok)
    doc = "".join(f"<image>the quick brown fox jumps over the lazy dog {k}.<EOC>" for k in range(20))
    rec = Record([str(k) for k in range(20)], doc, "interleaved")
    a = SequenceSampler(tok, media_id, "interleaved", max_tokens=32, seed=1)
    a(rec)
    state = a.state_dict()
    want = [a(rec).input_ids for _ in range(3)]
    b = SequenceSampler(tok, media_id, "interleaved", max_tokens=32, seed=99)
    b.load_state_dict(state)
    assert [b(rec).input_ids for _ in range(3)] == want


def test_first_mentions_mark_each_new_word_once_as_a_whole_word():
    text = "<image>A zaxes.<EOC><image>Look, a zax!<EOC><image>Look, a zax!<EOC><image>A dorp.<EOC>"
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    hit = first_mentions(enc["offset_mapping"], text, ("zax", "dorp"))
    marked = "".join(text[a:b] for (a, b), h in zip(enc["offset_mapping"], hit) if h)
    assert marked.replace(" ", "") == "zaxdorp"  # not inside "zaxes", not the second "zax"
    first_zax = text.index("a zax!") + 2
    assert any(h and a <= first_zax < b for (a, b), h in zip(enc["offset_mapping"], hit))
    # only tokens from `offsets` count: a word first mentioned before a window is new inside it
    later = [(a, b) for a, b in enc["offset_mapping"] if a >= first_zax + 3]
    assert "".join(text[a:b] for (a, b), h in zip(later, first_mentions(later, text, ("zax",))) if h).strip() == "zax"


def test_sampler_leaves_new_words_first_mentions_out_of_the_labels():
    tok = tiny_tokenizer()
    media_id, _ = add_flamingo_tokens(tok)
    text = "<image>Look, a zax!<EOC><image>Look, a dog!<EOC><image>Look, a zax!<EOC>"
    rec = Record(["a.png", "b.png", "c.png"], text, "interleaved", new_words=("zax",))
    plain = SequenceSampler(tok, media_id, "interleaved", max_tokens=256, seed=0)(rec)
    masked = SequenceSampler(tok, media_id, "interleaved", max_tokens=256, seed=0, mask_new_words=True)(rec)
    assert plain.input_ids == masked.input_ids and plain.media == masked.media and plain.no_loss is None
    lp, lm = make_labels(plain.input_ids, media_id, plain.no_loss), make_labels(masked.input_ids, media_id, masked.no_loss)
    dropped = [i for i, (a, b) in enumerate(zip(lp, lm)) if a != b]
    assert tok.decode([masked.input_ids[i] for i in dropped]).strip() == "zax"  # the first zax only ...
    assert dropped[-1] < masked.input_ids.index(media_id, dropped[-1])  # ... before the second picture
    assert all(b == IGNORE for i, b in enumerate(lm) if i in dropped)
    batch = collate([masked, plain], pad_id=0, media_token_id=media_id)
    assert batch.labels[0].tolist()[:len(lm)] == lm and batch.labels[1].tolist()[:len(lp)] == lp
    # pairs and records without new words are untouched
    other = SequenceSampler(tok, media_id, "pairs", max_tokens=8, mask_new_words=True)(Record(["a.png"], "<image>a zax<EOC>", "pairs"))
    assert other.no_loss is None


def test_answers_only_labels_each_answer_and_its_end_of_chunk():
    tok = tiny_tokenizer()
    media_id, eoc_id = add_flamingo_tokens(tok)
    text = "<image>Question: Where is the dog? Answer: on the left<EOC><image>A cat.<EOC><image>Question: What is it? Answer: a cat<EOC>"
    rec = Record(["a.png", "b.png", "c.png"], text, "interleaved")
    sample = SequenceSampler(tok, media_id, "interleaved", max_tokens=256, seed=0, answers_only=True)(rec)
    labels = make_labels(sample.input_ids, media_id, sample.no_loss)
    kept = [t for t in labels if t != IGNORE]
    assert tok.decode(kept).replace(" ", "") == "ontheleft<EOC>acat<EOC>"  # not the questions, not the caption
    assert kept.count(eoc_id) == 2
    plain = SequenceSampler(tok, media_id, "interleaved", max_tokens=256, seed=0)(rec)
    assert plain.input_ids == sample.input_ids and plain.no_loss is None
    # with new words masked too, both masks apply
    both = SequenceSampler(tok, media_id, "pairs", max_tokens=64, answers_only=True, mask_new_words=True)(
        Record(["a.png"], "<image>Question: What is it? Answer: a zax<EOC>", "pairs", new_words=("zax",)))
    assert tok.decode([t for t in make_labels(both.input_ids, media_id, both.no_loss) if t != IGNORE]).replace(" ", "") == "a<EOC>"


def test_corpus_records_carry_their_made_up_words(tmp_path):
    import json

    (tmp_path / "a.png").write_bytes(b"")
    rows = [{"media": ["a.png"], "text": "<image>a zax<EOC>", "names": {"zax": "bikini", "dog": "dog"}, "nonce": [True, False]},
            {"media": ["a.png"], "text": "<image>a blick<EOC>", "new_words": ["blick"]},
            {"media": ["a.png"], "text": "<image>a dog<EOC>"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = read_corpus(tmp_path / "d.jsonl")
    assert [src[i].new_words for i in range(3)] == [("zax",), ("blick",), ()]
