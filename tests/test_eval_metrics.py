"""engine.eval: metrics, support selection and calibration, checked against hand-computed values."""
import math
import random

import pytest
import torch

from engine.eval import metrics as M
from engine.eval.shots import Rices, prototype_pick, random_support, spread_over_classes, support_orders
from engine.eval.scoring import calibrate, mean_distribution


# ----- VQA normalisation and accuracy -----------------------------------------------------------
@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"),                      # number words as digits
    ("none", "0"),
    ("The dog.", "dog"),               # article and final period dropped
    ("a red apple", "red apple"),
    ("Yes!", "yes"),                   # punctuation
    ("dont", "don't"),                 # contractions restored
    ("isnt it", "isn't it"),
    ("3.5", "3.5"),                    # a decimal point stays
    ("1,000", "1000"),                 # the comma between digits goes
    ("black-and-white", "black and white"),
    ("on the left", "on left"),
    ("  Ten  ", "10"),
])
def test_vqa_normalisation(raw, norm):
    assert M.normalize_answer(raw) == norm


def test_vqa_accuracy_ten_answers_is_the_official_leave_one_out_average():
    # 2 of 10 humans said "cat": 2 subsets have 1 match (1/3), 8 have 2 matches (2/3) -> 0.6
    assert M.vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)
    # 3 of 10: 3 subsets with 2 matches (2/3), 7 with 3 (1) -> 0.9
    assert M.vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert M.vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)
    assert M.vqa_accuracy("bird", ["cat"] * 10) == 0.0
    assert M.vqa_accuracy("The Cat.", ["cat"] * 10) == 1.0  # normalised both sides
    assert M.vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_short_lists_are_accepted_alternatives():
    assert M.vqa_accuracy("two", ["2", "two"]) == 1.0
    assert M.vqa_accuracy("left", ["left", "on the left", "at the left"]) == 1.0
    assert M.vqa_accuracy("on the left", ["left", "on the left"]) == 1.0
    assert M.vqa_accuracy("right", ["left", "on the left"]) == 0.0
    with pytest.raises(ValueError):
        M.vqa_accuracy("x", [])


# ----- captions ---------------------------------------------------------------------------------
REFS = [
    ["A drawing of a cat.", "A picture of a cat.", "A cat on a blue background."],
    ["A drawing of a red apple.", "An apple on a white background.", "A picture of an apple."],
    ["A drawing of a dog.", "A picture of a dog.", "A dog on a green background."],
    ["A drawing of a tree.", "A picture of a tree.", "A tree on a yellow background."],
]


def test_caption_tokenizer_lowercases_and_drops_punctuation():
    assert M.tokenize_caption("A Cat, on a mat!") == "a cat on a mat"
    assert M.tokenize_caption("It's red.") == "it's red"


def test_identical_captions_score_higher_than_unrelated():
    same = M.caption_scores(REFS, [r[0] for r in REFS])
    unrelated = M.caption_scores(REFS, ["the stock market fell sharply today"] * 4)
    empty = M.caption_scores(REFS, ["", "", "", ""])
    assert same["BLEU-4"] > 0.9
    assert same["CIDEr"] > 1.0
    assert unrelated["CIDEr"] < 0.1 and unrelated["BLEU-4"] < 0.1
    assert empty["CIDEr"] == 0.0
    partial = M.caption_scores(REFS, ["a drawing of a dog", "a drawing", "a picture of a dog", "a tree"])
    assert unrelated["CIDEr"] < partial["CIDEr"] < same["CIDEr"]


def test_repeated_ngram():
    assert M.repeated_ngram("I am a cat. I am a cat. I am a cat. I am a cat.")
    assert not M.repeated_ngram("The capital of France is Paris, a large city on the Seine.")
    assert M.std([1.0]) == 0.0 and M.std([1.0, 3.0]) == pytest.approx(math.sqrt(2))


# ----- support selection ------------------------------------------------------------------------
def test_rices_most_similar_last_and_excludes_non_candidates():
    query = torch.tensor([1.0, 0.0])
    emb = torch.tensor([[1.0, 0.0],    # 0: identical
                        [0.0, 1.0],    # 1: orthogonal
                        [1.0, 1.0],    # 2: 45 degrees
                        [-1.0, 0.0],   # 3: opposite
                        [2.0, 0.1]])   # 4: nearly identical
    r = Rices(emb)
    assert r.select(query, 3) == [2, 4, 0]        # ascending similarity: the best (0) last
    assert r.select(query, 2, candidates=[1, 2, 3]) == [1, 2]
    assert r.select(0, 2, candidates=[1, 2, 3, 4]) == [2, 4]  # a pool index as the query
    assert r.order(query, [0, 3, 2]) == [3, 2, 0]
    assert r.select(query, 0) == []


def test_random_support_is_seeded_nested_and_never_repeats():
    pool = list(range(100))
    a = random_support(pool, 8, random.Random("s"), max_k=32)
    b = random_support(pool, 4, random.Random("s"), max_k=32)
    assert len(set(a)) == 8 and b == a[:4]
    assert random_support(pool, 8, random.Random("t"), max_k=32) != a
    assert random_support([1, 2], 5, random.Random(0)) in ([1, 2], [2, 1])


def test_support_orders_keep_the_drawn_order_first_and_are_distinct_permutations():
    sup = [7, 3, 9, 1, 4, 8, 2, 6]
    orders = support_orders(sup, 6, random.Random(0))
    assert len(orders) == 6 and orders[0] == sup
    assert all(sorted(o) == sorted(sup) for o in orders)
    assert len({tuple(o) for o in orders}) == 6
    assert orders == support_orders(sup, 6, random.Random(0))  # seeded
    assert sorted(map(tuple, support_orders([1, 2], 5, random.Random(1)))) == [(1, 2), (2, 1)]  # only 2! exist
    assert support_orders([], 3, random.Random(0)) == [[]]
    assert support_orders(sup, 1, random.Random(0)) == [sup]
    with pytest.raises(ValueError):
        support_orders(sup, 0, random.Random(0))


@pytest.mark.parametrize("k, n", [(0, 5), (4, 5), (5, 5), (8, 5), (12, 5), (32, 5), (3, 2)])
def test_shots_spread_over_classes_evenly(k, n):
    classes = [f"c{i}" for i in range(n)]
    counts = spread_over_classes(k, classes, random.Random(k))
    assert set(counts) == set(classes)
    assert sum(counts.values()) == k
    assert max(counts.values()) - min(counts.values()) <= 1


def test_prototype_pick_takes_the_nearest_class_mean_and_skips_classes_without_examples():
    a = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # class 0: mean direction ~ (0.95, 0.3)
    b = torch.tensor([[0.0, 1.0]])
    assert prototype_pick(torch.tensor([1.0, 0.2]), [a, b]) == 0
    assert prototype_pick(torch.tensor([0.1, 1.0]), [a, b]) == 1
    # scale does not matter (cosine), and a class with no example cannot win even when the rest point away
    assert prototype_pick(torch.tensor([10.0, 2.0]), [a * 5, b]) == 0
    assert prototype_pick(torch.tensor([-1.0, -1.0]), [torch.empty(0), b]) == 1


def test_calibration_math():
    p = torch.tensor([0.5, 0.3, 0.2])
    p_cf = torch.tensor([0.6, 0.2, 0.2])  # the model leans towards candidate 0 whatever the input
    expected = (p / p_cf) / (p / p_cf).sum()  # W p normalised, W = diag(p_cf)^-1
    got = calibrate(p.log() + 3.0, p_cf.log() - 1.0).exp()  # unnormalised log-probs are fine
    assert torch.allclose(got, expected, atol=1e-6)
    assert int(p.argmax()) == 0 and int(got.argmax()) == 1  # calibration changes the decision
    # a content-free input with a uniform prediction changes nothing
    assert torch.allclose(calibrate(p.log(), torch.zeros(3)).exp(), p, atol=1e-6)


def test_mean_distribution_is_the_mean_of_normalised_predictions():
    a, b = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.6, 0.3])
    got = mean_distribution(torch.stack([a.log() + 5.0, b.log() - 2.0])).exp()  # each normalised first
    assert torch.allclose(got, (a + b) / 2, atol=1e-6)
    assert torch.allclose(mean_distribution(a.log()[None]).exp(), a, atol=1e-6)
    with pytest.raises(ValueError):
        mean_distribution(torch.zeros(0, 3))


def test_support_prior_removes_a_pull_that_copies_show():
    """The naming case support calibration is for: the model leans toward candidate 0 (a name shown
    more often) even when the query is a copy of another class's example; the mean of its
    predictions on one copy per class estimates that lean, and dividing by it flips a query of
    class 1 that the raw ranking gives to class 0."""
    copies = torch.tensor([[0.90, 0.05, 0.05],   # query = copy of class 0's example
                           [0.55, 0.40, 0.05],   # copy of class 1's: still pulled toward 0
                           [0.50, 0.05, 0.45]]).log()
    query = torch.tensor([0.50, 0.42, 0.08]).log()  # a new picture of class 1
    assert int(query.argmax()) == 0
    assert int(calibrate(query, mean_distribution(copies)).argmax()) == 1


def test_pick_breaks_ties_at_random_not_by_position():
    from engine.eval.scoring import pick

    assert pick(torch.tensor([0.1, 0.9, 0.3]), random.Random(0)) == 1
    flat = torch.zeros(4)
    assert pick(flat) == 0  # without an rng: the first
    seen = {pick(flat, random.Random(i)) for i in range(60)}
    assert seen == {0, 1, 2, 3}
    assert pick(torch.tensor([1.0, 1.0 + 1e-7, -2.0]), random.Random(1)) in (0, 1)
