"""Scores for the evaluation tasks: VQA accuracy (with the official VQAv2 answer normalisation),
CIDEr and BLEU-4 (pycocoevalcap's scorers, fed by a plain Python tokenizer instead of the Java
PTBTokenizer), exact-match accuracy, and a degenerate-repetition check for generated text.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

# ----- VQA answer normalisation (the official VQAv2 evaluation script, vqaEval.py) ------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern (drops '.' not before a digit)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The VQAv2 normalisation: punctuation removed, number words as digits ("two" -> "2"),
    articles dropped, contractions restored ("dont" -> "don't"), lower case."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer.

    With 10 human answers (VQAv2): min(#humans who gave the answer / 3, 1), averaged over the ten
    leave-one-out subsets of 9 answers (the official metric). With any other number the list is
    read as the accepted alternatives of one answer (the corpus's format, e.g. ["2", "two"]):
    1 if the prediction matches any of them, else 0. Both sides are normalised first.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) != 10:
        return float(pred in gts)
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def majority_answer(answers: Iterable[str]) -> str:
    """The most frequent normalised answer (ties: the first seen)."""
    counts = Counter(normalize_answer(a) for a in answers)
    if not counts:
        return ""
    return counts.most_common(1)[0][0]


# ----- captioning -----------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize_caption(text: str) -> str:
    """Lower case words (punctuation dropped, as the PTBTokenizer + coco-caption's punctuation
    filter do), joined by single spaces: the form the coco scorers expect."""
    return " ".join(_TOKEN.findall(text.lower()))


def caption_scores(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus-level {"CIDEr", "BLEU-4"} of one predicted caption per item against its references.
    CIDEr is CIDEr-D as in coco-caption (idf over this set's references), on the usual 0-10 scale."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference lists but {len(predictions)} predictions")
    if not predictions:
        return {"CIDEr": 0.0, "BLEU-4": 0.0}
    gts, res = {}, {}
    for i, (refs, pred) in enumerate(zip(references, predictions)):
        refs = [tokenize_caption(r) for r in refs]
        if not refs:
            raise ValueError(f"item {i} has no reference captions")
        gts[i] = refs
        # an empty hypothesis would divide by zero in the scorers; one unmatched token scores 0
        res[i] = [tokenize_caption(pred) or "<empty>"]
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"CIDEr": float(cider), "BLEU-4": float(bleu[3])}


# ----- text ------------------------------------------------------------------------------------

def repeated_ngram(text: str, n: int = 4, times: int = 3) -> bool:
    """Whether some word n-gram occurs at least `times` times: a run-on, degenerate answer."""
    words = text.lower().split()
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return any(c >= times for c in counts.values())


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return float(math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)))


def standard_error(values: Sequence[float]) -> float:
    """Standard error of a mean of per-query scores, std / sqrt(n) (0 for fewer than two): how
    far the score could move on another draw of as many queries (a 200-question score of 0.4 has
    about 0.035)."""
    return std(values) / math.sqrt(len(values)) if len(values) >= 2 else 0.0
