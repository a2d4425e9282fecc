"""The evaluation tasks. Each takes the model, the items of its data and the settings, and returns
{"results": [one row per (shots, metric)], "samples": [a few predictions], "info": {...}}.

Prompts use the corpus's own templates (engine/data/templates.py), so the built-in model is
evaluated in the format it was trained on:

    caption   <image>A drawing of a cat.<EOC> ... <image>                  -> greedy caption
              (0 shots: A drawing of a cat.<EOC>A picture of a boat.<EOC><image>, the paper's
              zero-shot prompt: text-only examples say what the task is)
    vqa       <image>Question: q Answer: a<EOC> ... <image>Question: q Answer:   -> greedy answer
    classify  <image>This is a dax.<EOC> ... <image>This is  + " a dax.<EOC>"    -> ranked names
    video_qa  <image>Question: q Answer: a<EOC> ... <image>Question: q Answer:  + " left<EOC>"
    dialogue  vqa turns in order, each turn's answer fed back as the history of the next

Every prompt starts with the LM's BOS, as training sequences do. Every score comes with an
image-blind control (`blind_score`): the same prompts with every image replaced by a blank grey
one. Ranking tasks also report contextual calibration (`calibrated_score`).
"""
from __future__ import annotations

import logging
import random
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data import templates as T
from ..data.names import with_article
from . import metrics as M
from .datasets import subset
from .scoring import (MediaBank, calibrate, decode_text, encode_text, greedy_generate, greedy_generate_lm,
                      greedy_generate_variants, mean_distribution, pick,
                      score_continuations)
from .shots import Rices, prototype_pick, random_support, spread_over_classes, support_orders

log = logging.getLogger(__name__)

TASKS = ("caption", "vqa", "classify", "video_qa", "recognize", "dialogue", "text")
RANKING_TASKS = ("classify", "recognize", "video_qa")
SELECTIONS = ("random", "rices")
MAX_SHOTS = 32
NUM_SAMPLES = 5  # predictions kept per (shots) in the report

MEDIA, EOC = T.MEDIA, T.EOC
NAMING_PREFIX = "This is"  # the corpus's naming sentence T.NAMING[0] = "This is {n}." up to the name


def default_shots(task: str) -> list[int]:
    return [0] if task in ("recognize", "text") else [0, 4, 8]


@dataclass
class EvalSettings:
    shots: list[int] = field(default_factory=lambda: [0, 4, 8])
    seeds: int = 3
    selection: str = "random"
    limit: int | None = None
    way: int = 5
    num_frames: int | None = None  # frames per video (default: the resampler's max_frames)
    max_new_tokens: int | None = None  # default per task
    turns: int = 3  # dialogue: questions per dialogue
    history: str = "own"  # dialogue: "own" answers or the "reference" answers as history
    orders: int = 1  # classify / recognize: rank by the mean over this many orders of the support
    # caption at 0 shots: this many text-only examples (captions without their pictures, drawn at
    # random) before the query picture: the Flamingo paper's zero-shot prompt, which says what the
    # task is without showing a picture; 0 leaves the query picture alone
    zero_shot_texts: int = 2
    progress: bool = True

    def check(self) -> None:
        if not self.shots:
            raise ValueError("no shot counts given")
        bad = [k for k in self.shots if not 0 <= k <= MAX_SHOTS]
        if bad:
            raise ValueError(f"shot counts must be between 0 and {MAX_SHOTS}, got {bad}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"--selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.way < 2:
            raise ValueError(f"--way must be at least 2, got {self.way}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.turns < 2:
            raise ValueError(f"dialogue turns must be at least 2, got {self.turns}")
        if self.orders < 1:
            raise ValueError(f"--orders must be at least 1, got {self.orders}")
        if not 0 <= self.zero_shot_texts <= MAX_SHOTS:
            raise ValueError(f"--zero-shot-texts must be between 0 and {MAX_SHOTS}, got {self.zero_shot_texts}")
        if self.orders > 1 and self.selection == "rices":
            raise ValueError("--orders > 1 needs --selection random: RICES fixes the order (the most similar last)")
        if self.history not in ("own", "reference"):
            raise ValueError(f"dialogue history must be 'own' or 'reference', got {self.history!r}")


# ----- templates (the corpus's) ---------------------------------------------------------------------
def caption_example(caption: str) -> str:
    return T.chunk(caption.strip())


def caption_text(caption: str) -> str:
    """A caption as a text-only example (0-shot prompts): the chunk without its picture."""
    return caption_example(caption).removeprefix(MEDIA)


def vqa_example(question: str, answer: str) -> str:
    return T.chunk(T.qa(question.strip(), answer.strip()))


def vqa_query(question: str) -> str:
    return T.qa(question.strip(), "").rstrip()  # "Question: q Answer:"


def naming_example(name: str) -> str:
    return T.chunk(T.naming(T.NAMING[0], name))  # "<image>This is a dax.<EOC>"


def naming_continuation(name: str) -> str:
    return f" {with_article(name)}.{EOC}"


def motion_caption(label: str, direction: str) -> str | None:
    """The corpus's first motion caption for a direction ("A cat moves to the right."), if any."""
    options = T.MOTION_CAPTIONS.get(direction)
    return options[0].format(A=T.cap(with_article(label))) if options else None


def clean_answer(text: str) -> str:
    """A generated short answer up to the first line break or a new "Question:"/"Answer:"."""
    text = text.split("\n")[0]
    for stop in ("Question:", "Answer:", MEDIA, EOC):
        text = text.split(stop)[0]
    return text.strip()


def clean_caption(text: str) -> str:
    return text.split("\n")[0].replace(MEDIA, "").strip()


def _names(text: str, label: str | None) -> bool:
    return bool(label) and re.search(rf"\b{re.escape(label.lower())}\b", text.lower()) is not None


def naming_outcome(prediction: str, label: str, support_labels: Sequence[str | None]) -> dict[str, float]:
    """For items with a concept label: does the caption name the query's concept
    (`named_rate`), or instead a concept only a support example showed (`support_copy_rate`:
    a model that learned "the answer is a name from the context" copies it)?"""
    named = _names(prediction, label)
    copied = not named and any(_names(prediction, s) for s in support_labels if s and s != label)
    return {"named_rate": float(named), "support_copy_rate": float(copied)}


def caption_naming(prediction: str, blind_prediction: str, label: str, support_labels: Sequence[str | None]) -> dict[str, float]:
    """naming_outcome for the caption and for its image-blind control (`blind_` keys), and whether a
    support example showed the query's concept (`support_shows_rate`: with RICES support a caption
    can name a never-seen concept by reading it off the most similar example, as the blind
    control, given the same support texts, could only guess)."""
    out = naming_outcome(prediction, label, support_labels)
    out.update({f"blind_{k}": v for k, v in naming_outcome(blind_prediction, label, support_labels).items()})
    out["support_shows_rate"] = float(label in support_labels)
    return out


# ----- the shared machinery -------------------------------------------------------------------------
class Runner:
    """What every task needs: the model, the media bank, support selection and the bookkeeping."""

    def __init__(self, model, items: list[dict], settings: EvalSettings, task: str, bank: MediaBank | None = None):
        settings.check()
        self.model, self.items, self.settings, self.task = model, items, settings, task
        self.bank = bank or MediaBank(model, settings.num_frames)
        self.max_shots = max(settings.shots)
        self.by_media: dict[str, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            for p in it["media"]:
                self.by_media[p].append(i)
        self.rices: Rices | None = None
        if settings.selection == "rices" and self.max_shots > 0:
            log.info("RICES: embedding %d pool items with the vision tower", len(items))
            self.rices = Rices(self.bank.embeddings([it["media"][0] for it in items]))
        self._tok_cache: dict[str, list[int]] = {}

    def embeddings(self, indices: Sequence[int]) -> torch.Tensor:
        """(n, d_vision) tower embeddings of items (their first media), as RICES uses them."""
        return self.bank.embeddings([self.items[i]["media"][0] for i in indices])

    def token_embeddings(self, indices: Sequence[int]) -> torch.Tensor:
        """(n, d) the mean of each item's (first media's) visual tokens: what the LM is given."""
        if not indices:
            return torch.empty(0)
        return torch.stack([self.bank.visual(self.items[i]["media"][0]).float().mean(0).cpu() for i in indices])

    # -- support --
    def excluded(self, queries: Sequence[int]) -> set[int]:
        """The queries and every item sharing a media file with them."""
        out = set(queries)
        for q in queries:
            for p in self.items[q]["media"]:
                out.update(self.by_media[p])
        return out

    def eligible(self, queries: Sequence[int], candidates: Sequence[int] | None = None) -> list[int]:
        ex = self.excluded(queries)
        pool = range(len(self.items)) if candidates is None else candidates
        return [j for j in pool if j not in ex]

    def support(self, queries: Sequence[int], k: int, seed: int) -> list[int]:
        """k support items for the query (items), never the query nor its media; random (seeded per
        query) or RICES (most similar last)."""
        if k == 0:
            return []
        pool = self.eligible(queries)
        if self.rices is not None:
            return self.rices.select(queries[0], k, pool)
        return random_support(pool, k, random.Random(f"{self.task}:{seed}:{queries[0]}"), self.max_shots)

    def text_examples(self, query: int, n: int) -> list[int]:
        """n items whose text (not their media) goes before a 0-shot query: random whatever the
        selection, since RICES would pick the captions of the pictures most like the query."""
        return random_support(self.eligible([query]), n, random.Random(f"{self.task}:text:{query}"))

    def seeds_for(self, k: int, episodic: bool = False) -> list[int]:
        """Seeds worth running: one when nothing is random (0 shots, or RICES) unless the task
        draws episodes."""
        if not episodic and (k == 0 or self.rices is not None):
            return [0]
        return list(range(self.settings.seeds))

    # -- prompts --
    def tokens(self, text: str) -> list[int]:
        ids = self._tok_cache.get(text)
        if ids is None:
            ids = self._tok_cache[text] = self.model.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def prompt(self, chunks: Sequence[tuple[Sequence[str], str]]) -> tuple[list[int], list[str]]:
        """(media paths, text) chunks -> (ids with BOS, media paths in marker order)."""
        text = "".join(t for _, t in chunks)
        paths = [p for m, _ in chunks for p in m]
        ids = encode_text(self.model, text)
        n = sum(1 for t in ids if t == self.model.media_token_id)
        if n != len(paths):
            raise ValueError(f"prompt has {n} <image> markers for {len(paths)} media: {text[:120]!r}")
        return ids, paths

    def real(self, paths: Sequence[str]) -> list[torch.Tensor]:
        return [self.bank.visual(p) for p in paths]

    def blind(self, paths: Sequence[str]) -> list[torch.Tensor]:
        return [self.bank.blank_like(p) for p in paths]

    def content_free(self, paths: Sequence[str], n_query: int) -> list[torch.Tensor]:
        """The real media with the query's (the last n_query) replaced by blanks."""
        return self.real(paths[:-n_query]) + self.blind(paths[-n_query:])

    def generate(self, ids: list[int], visual: list[torch.Tensor], max_new: int) -> str:
        return decode_text(self.model, greedy_generate(self.model, ids, visual, max_new))

    def generate_with_blind(self, ids: list[int], paths: Sequence[str], max_new: int) -> tuple[str, str]:
        """(answer with the real media, answer with blank media): one batch of two."""
        real, blind = greedy_generate_variants(self.model, ids, [self.real(paths), self.blind(paths)], max_new)
        return decode_text(self.model, real), decode_text(self.model, blind)

    def progress(self, total: int):
        from tqdm import tqdm

        return tqdm(total=total, desc=f"eval {self.task}", unit="query", file=sys.stderr, dynamic_ncols=True,
                    disable=not self.settings.progress)


def _row(shots: int, metric: str, per_seed: Sequence[float], n: int, blind: Sequence[float] | None = None,
         per_query: Sequence[float] | None = None, **extra) -> dict:
    """One result row. `std` is the spread over seeds (support draws); `stderr`, given each
    query's score (its mean over seeds), the standard error over queries: the spread another
    sample of as many queries would show, which is what a comparison of two models must beat."""
    row = {"shots": shots, "metric": metric, "score": M.mean(per_seed), "n": n, "std": M.std(per_seed),
           "seeds": [float(x) for x in per_seed]}
    if per_query is not None:
        row["stderr"] = M.standard_error(per_query)
    if blind is not None:
        row["blind_score"] = M.mean(blind)
        row["blind_std"] = M.std(blind)
    row.update(extra)
    return row


def _has_splits(items: list[dict], queries: Sequence[int]) -> bool:
    return all("heldout" in items[q] for q in queries)


def _split_means(items: list[dict], queries: Sequence[int], per_seed: Sequence[dict]) -> dict:
    """Scores of the queries about held-out concepts vs concepts seen in training (the corpus
    marks each test item "heldout"), averaged over seeds: {"heldout": {...}, "seen": {...}}."""
    out = {}
    for name, flag in (("heldout", True), ("seen", False)):
        qs = [q for q in queries if bool(items[q]["heldout"]) == flag]
        if qs:
            out[name] = {"score": M.mean([M.mean([d[q] for q in qs]) for d in per_seed]), "n": len(qs)}
    return out


def _per_query(per_seed: Sequence[dict], queries: Sequence[int]) -> list[float]:
    """Each query's score averaged over the seeds, from one {query: score} dict per seed."""
    return [M.mean([d[q] for d in per_seed]) for q in queries]


def _mean_over_seeds(dicts: Sequence[dict]) -> dict:
    keys = sorted({k for d in dicts for k in d})
    return {k: M.mean([d[k] for d in dicts if k in d]) for k in keys}


# ----- caption ---------------------------------------------------------------------------------------
def eval_caption(model, items: list[dict], settings: EvalSettings, bank: MediaBank | None = None) -> dict:
    r = Runner(model, items, settings, "caption", bank)
    queries = subset(items, settings.limit)
    max_new = settings.max_new_tokens or 24
    r.bank.prefetch([p for q in queries for p in items[q]["media"]])
    results, samples = [], []
    bar = r.progress(sum(len(queries) * len(r.seeds_for(k)) for k in settings.shots))
    for k in settings.shots:
        scores: dict[str, list[float]] = {"CIDEr": [], "BLEU-4": []}
        blind: dict[str, list[float]] = {"CIDEr": [], "BLEU-4": []}
        naming: list[dict] = []
        for seed in r.seeds_for(k):
            refs, preds, blind_preds, names = [], [], [], []
            for qi in queries:
                if k == 0:  # the paper's zero-shot prompt: examples of the task's text, no pictures
                    sup = r.text_examples(qi, settings.zero_shot_texts)
                    chunks = [([], caption_text(random.Random(f"cap:{seed}:{j}").choice(items[j]["captions"]))) for j in sup]
                else:
                    sup = r.support([qi], k, seed)
                    chunks = [(items[j]["media"], caption_example(random.Random(f"cap:{seed}:{j}").choice(items[j]["captions"])))
                              for j in sup]
                chunks.append((items[qi]["media"], MEDIA * len(items[qi]["media"])))
                ids, paths = r.prompt(chunks)
                pred, bpred = map(clean_caption, r.generate_with_blind(ids, paths, max_new))
                refs.append(items[qi]["captions"])
                preds.append(pred)
                blind_preds.append(bpred)
                if "label" in items[qi]:
                    names.append(caption_naming(pred, bpred, items[qi]["label"], [items[j].get("label") for j in sup]))
                if seed == r.seeds_for(k)[0] and len(samples) < NUM_SAMPLES * (settings.shots.index(k) + 1):
                    samples.append({"shots": k, "media": items[qi]["media"], "prediction": pred, "blind_prediction": bpred,
                                    "references": items[qi]["captions"]})
                bar.update(1)
            s, b = M.caption_scores(refs, preds), M.caption_scores(refs, blind_preds)
            for name in scores:
                scores[name].append(s[name])
                blind[name].append(b[name])
            if names:
                naming.append({key: M.mean([n[key] for n in names]) for key in names[0]})
        for name in scores:
            extra = _mean_over_seeds(naming) if naming and name == "CIDEr" else {}
            if k == 0:
                extra["text_examples"] = settings.zero_shot_texts
            results.append(_row(k, name, scores[name], len(queries), blind[name], **extra))
    bar.close()
    return {"results": results, "samples": samples, "info": {"queries": len(queries), "pool": len(items)}}


# ----- vqa -------------------------------------------------------------------------------------------
def majority_baseline(items: list[dict], queries: Sequence[int]) -> dict[int, str]:
    """Per query: the most common (normalised) canonical answer of its question type among all
    OTHER items (leave-one-out, so the query's own answer does not vote)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for it in items:
        counts[it.get("qtype", "all")][M.normalize_answer(it["answer"])] += 1
    out = {}
    for q in queries:
        c = counts[items[q].get("qtype", "all")].copy()
        c[M.normalize_answer(items[q]["answer"])] -= 1
        best = sorted(((n, a) for a, n in c.items() if n > 0), key=lambda x: (-x[0], x[1]))
        out[q] = best[0][1] if best else ""
    return out


def eval_vqa(model, items: list[dict], settings: EvalSettings, bank: MediaBank | None = None) -> dict:
    r = Runner(model, items, settings, "vqa", bank)
    queries = subset(items, settings.limit)
    max_new = settings.max_new_tokens or 8
    r.bank.prefetch([p for q in queries for p in items[q]["media"]])
    majority = majority_baseline(items, queries)
    major_acc = {q: M.vqa_accuracy(majority[q], items[q]["answers"]) for q in queries}
    qtypes = sorted({items[q].get("qtype", "all") for q in queries})
    results, samples = [], []
    bar = r.progress(sum(len(queries) * len(r.seeds_for(k)) for k in settings.shots))
    for k in settings.shots:
        per_seed, per_seed_blind, per_type, per_type_blind, per_seed_acc = [], [], [], [], []
        for seed in r.seeds_for(k):
            accs, baccs = {}, {}
            per_seed_acc.append(accs)
            for qi in queries:
                it = items[qi]
                sup = r.support([qi], k, seed)
                chunks = [(items[j]["media"], vqa_example(items[j]["question"], items[j]["answer"])) for j in sup]
                chunks.append((it["media"], MEDIA * len(it["media"]) + vqa_query(it["question"])))
                ids, paths = r.prompt(chunks)
                pred, bpred = map(clean_answer, r.generate_with_blind(ids, paths, max_new))
                accs[qi], baccs[qi] = M.vqa_accuracy(pred, it["answers"]), M.vqa_accuracy(bpred, it["answers"])
                if seed == r.seeds_for(k)[0] and len(samples) < NUM_SAMPLES * (settings.shots.index(k) + 1):
                    samples.append({"shots": k, "media": it["media"], "question": it["question"], "prediction": pred,
                                    "blind_prediction": bpred, "answers": it["answers"], "majority": majority[qi]})
                bar.update(1)
            per_seed.append(M.mean(list(accs.values())))
            per_seed_blind.append(M.mean(list(baccs.values())))
            per_type.append({t: M.mean([a for q, a in accs.items() if items[q].get("qtype", "all") == t]) for t in qtypes})
            per_type_blind.append({t: M.mean([a for q, a in baccs.items() if items[q].get("qtype", "all") == t]) for t in qtypes})
        mt, bt = _mean_over_seeds(per_type), _mean_over_seeds(per_type_blind)
        breakdown = {t: {"score": mt[t], "blind_score": bt[t],
                         "majority_baseline": M.mean([major_acc[q] for q in queries if items[q].get("qtype", "all") == t]),
                         "n": sum(1 for q in queries if items[q].get("qtype", "all") == t)} for t in qtypes}
        extra = {"per_split": _split_means(items, queries, per_seed_acc)} if _has_splits(items, queries) else {}
        results.append(_row(k, "VQA accuracy", per_seed, len(queries), per_seed_blind,
                            per_query=_per_query(per_seed_acc, queries), majority_baseline=M.mean(list(major_acc.values())), per_qtype=breakdown, **extra))
    bar.close()
    return {"results": results, "samples": samples, "info": {"queries": len(queries), "pool": len(items)}}


# ----- classify / recognize --------------------------------------------------------------------------
def eval_naming(model, items: list[dict], settings: EvalSettings, task: str = "classify", bank: MediaBank | None = None) -> dict:
    """N-way naming episodes. classify: held-out (new) concepts, named in the support examples;
    recognize: new renders of training concepts. Each query draws way-1 other classes; k shots
    are spread over the way classes as evenly as possible (never the query's image); the
    candidates' names are ranked by log-likelihood, raw and calibrated. With support examples the
    report adds controls that say where a miss comes from:
    - `prototype_score` (vision only): the class whose examples' mean tower embedding is closest
      to the query's; `token_prototype_score`: the same with the mean of their visual tokens
      (the resampler's output, what the LM reads);
    - `copy_score`: the model's accuracy when the query picture is replaced by an exact copy of
      the last example of its class (over the queries whose class has one): the ceiling of the
      LM's reading when matching pictures is trivial;
    - `support_calibrated_score`: contextual calibration with the prior taken from the support
      instead of a blank picture (see `_naming_scores`).
    With `settings.orders` > 1 (random selection) each episode ranks by the mean over that many
    orders of its support (an order ensemble against the pull toward the names shown last), and
    the row adds `first_order_score`: the drawn order alone, as with one order."""
    r = Runner(model, items, settings, task, bank)
    labels = [str(it["label"]) for it in items]
    classes = sorted(set(labels))
    way = min(settings.way, len(classes))
    if way < 2:
        raise ValueError(f"{task}: the data hold {len(classes)} class(es); at least 2 are needed")
    if way < settings.way:
        log.warning("%s: only %d classes; running %d-way episodes", task, len(classes), way)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by_class[lab].append(i)
    queries = subset(items, settings.limit)
    r.bank.prefetch([p for q in queries for p in items[q]["media"]])
    results, samples = [], []
    bar = r.progress(sum(len(queries) * len(r.seeds_for(k, episodic=True)) for k in settings.shots))
    for k in settings.shots:
        per_seed: dict[str, list[float]] = defaultdict(list)  # outcome -> its mean per seed
        pooled: dict[str, list[float]] = defaultdict(list)  # outcome -> every episode's hit, over seeds
        # accuracy (and the vision-only prototype's) by the number of examples the query's class got
        by_shots: dict[int, list[float]] = defaultdict(list)
        by_shots_proto: dict[int, list[float]] = defaultdict(list)
        per_seed_hit: list[dict[int, float]] = []
        for seed in r.seeds_for(k, episodic=True):
            hits: dict[str, list[float]] = defaultdict(list)
            per_seed_hit.append({})
            for qi in queries:
                rng = random.Random(f"{task}:{seed}:{qi}")
                cands, sup = _naming_episode(r, qi, labels[qi], classes, by_class, k, way, rng)
                out = _score_naming_episode(r, qi, cands, sup, labels, rng)
                for key, hit in out["hits"].items():
                    hits[key].append(hit)
                hits["support"].append(float(len(sup)))
                per_seed_hit[-1][qi] = out["hits"]["raw"]
                by_shots[out["n_y"]].append(out["hits"]["raw"])
                if "prototype" in out["hits"]:
                    by_shots_proto[out["n_y"]].append(out["hits"]["prototype"])
                if seed == 0 and len(samples) < NUM_SAMPLES * (settings.shots.index(k) + 1):
                    samples.append({"shots": k, "media": items[qi]["media"], "label": labels[qi], **out["sample"]})
                bar.update(1)
            for key, v in hits.items():
                per_seed[key].append(M.mean(v))
                pooled[key] += v
        controls = {f"{key}_score": M.mean(per_seed[key])
                    for key in ("prototype", "token_prototype", "support_calibrated") if key in per_seed}
        if "support_calibrated" in per_seed:
            controls["support_calibrated_seeds"] = per_seed["support_calibrated"]
        if "copy" in pooled:
            controls.update(copy_score=M.mean(pooled["copy"]), copy_n=len(pooled["copy"]))
        if "first_order" in per_seed:
            controls.update(orders=settings.orders, first_order_score=M.mean(per_seed["first_order"]))
        results.append(_row(k, "accuracy", per_seed["raw"], len(queries), per_seed["blind"],
                            per_query=_per_query(per_seed_hit, queries), calibrated_score=M.mean(per_seed["calibrated"]), calibrated_std=M.std(per_seed["calibrated"]),
                            calibrated_seeds=per_seed["calibrated"], normalized_score=M.mean(per_seed["normalized"]),
                            chance=1.0 / way, way=way, support_mean=M.mean(per_seed["support"]),
                            per_class_shots=_per_class_shots(by_shots, by_shots_proto), **controls))
    bar.close()
    return {"results": results, "samples": samples,
            "info": {"queries": len(queries), "pool": len(items), "classes": len(classes), "way": way}}


def _score_naming_episode(r: Runner, qi: int, cands: list[str], sup: list[int], labels: Sequence[str],
                          rng: random.Random) -> dict:
    """Ranks the candidates' names after the support examples and the query picture. Returns
    {"hits": {outcome: 1.0 right / 0.0 wrong}, "n_y": examples of the query's class, "sample": ...};
    outcomes raw, calibrated, blind and normalized, and with examples the controls prototype,
    token_prototype and (when the query's class has one) copy. With `settings.orders` > 1 every
    outcome ranks by the mean over that many orders of the support (log-probabilities normalised
    over the candidates), and `first_order` keeps the drawn order's raw outcome."""
    y = labels[qi]
    conts = [r.tokens(naming_continuation(c)) for c in cands]
    orders = support_orders(sup, r.settings.orders, random.Random(f"orders:{qi}:{sup}"))
    per_order = [_naming_scores(r, qi, order, cands, conts, labels) for order in orders]
    scores = {key: torch.stack([o[key] for o in per_order]).mean(0) for key in per_order[0]}
    gold = cands.index(y)
    preds = {key: pick(v, rng) for key, v in scores.items()}
    hits = {key: float(p == gold) for key, p in preds.items()}
    if len(orders) > 1:
        hits["first_order"] = float(pick(per_order[0]["raw"], rng) == gold)
    if sup:  # vision-only controls: the nearest class mean of the examples' tower embeddings,
        # and of their visual tokens (what is lost in the resampler vs. in the LM's reading)
        hits["prototype"] = _prototype_hit(r.embeddings, qi, sup, cands, labels, gold)
        hits["token_prototype"] = _prototype_hit(r.token_embeddings, qi, sup, cands, labels, gold)
    sample = {"candidates": cands, "prediction": cands[preds["raw"]], "calibrated_prediction": cands[preds["calibrated"]],
              "blind_prediction": cands[preds["blind"]], "logprobs": [round(float(x), 4) for x in scores["raw"]]}
    return {"hits": hits, "n_y": sum(labels[j] == y for j in sup), "sample": sample}


def _naming_scores(r: Runner, qi: int, sup: Sequence[int], cands: Sequence[str], conts: list[list[int]],
                   labels: Sequence[str]) -> dict[str, torch.Tensor]:
    """(C,) log-probabilities of the candidates `cands` (tokenised as `conts`), normalised over
    them, after the support in this order and the query:
    - raw; normalized (per token, so long names are not penalised); blind (blank pictures);
    - calibrated: contextual calibration, the prior being the prediction for a blank query;
    - support_calibrated (with examples): the prior is the mean prediction when the query is
      replaced by a copy of each candidate's last example, i.e. on a class-balanced set of
      queries that are trivial to match. What it divides out is the pull toward names shown more
      often or more recently, which the model shows even on such copies, and which a blank
      picture estimates badly. It uses every candidate alike, not the query's label;
    - copy (when the query's class has an example): the query replaced by that class's copy."""
    items, y = r.items, labels[qi]
    chunks = [(items[j]["media"], naming_example(labels[j])) for j in sup]
    n_query = len(items[qi]["media"])
    chunks.append((items[qi]["media"], MEDIA * n_query + NAMING_PREFIX))
    ids, paths = r.prompt(chunks)
    context = r.real(paths[:-n_query])
    copies: dict[str, list[torch.Tensor]] = {}  # candidate -> media with the query replaced by its last example
    for c in cands:
        same = [j for j in sup if labels[j] == c and len(items[j]["media"]) == n_query]
        if same:
            copies[c] = context + r.real(items[same[-1]]["media"])
    variants = [r.real(paths), r.content_free(paths, n_query), *copies.values()]
    s = score_continuations(r.model, ids, variants, conts).float()
    b = score_continuations(r.model, ids, [r.blind(paths)], conts).float()
    lengths = torch.tensor([len(c) for c in conts], dtype=s.dtype, device=s.device)
    out = {"raw": s[0], "calibrated": calibrate(s[0], s[1]), "blind": b[0], "normalized": s[0] / lengths}
    if copies:
        out["support_calibrated"] = calibrate(s[0], mean_distribution(s[2:]))
    if y in copies:
        out["copy"] = s[2 + list(copies).index(y)]
    return {key: F.log_softmax(v, dim=-1) for key, v in out.items()}


def _prototype_hit(embed, qi: int, sup: Sequence[int], cands: Sequence[str], labels: Sequence[str], gold: int) -> float:
    """1.0 when the nearest class mean of the support items' embeddings (`embed(indices)` -> (n, d))
    is the query's class."""
    examples = [embed([j for j in sup if labels[j] == c]) for c in cands]
    return float(prototype_pick(embed([qi])[0], examples) == gold)


def _per_class_shots(model: dict[int, list[float]], prototype: dict[int, list[float]]) -> dict[str, dict]:
    """{"1": {"score", "n", "prototype_score"}, ...}: accuracy by the number of examples the query's class got."""
    out = {}
    for n, hits in sorted(model.items()):
        out[str(n)] = {"score": M.mean(hits), "n": len(hits)}
        if prototype.get(n):
            out[str(n)]["prototype_score"] = M.mean(prototype[n])
    return out


def _naming_episode(r: Runner, qi: int, y: str, classes: list[str], by_class: dict[str, list[int]], k: int, way: int,
                    rng: random.Random) -> tuple[list[str], list[int]]:
    """One N-way episode for query `qi` of class `y`: the candidate names (y and way-1 others, in
    random order) and k support items spread over them (random, or RICES with the most similar last)."""
    cands = rng.sample([c for c in classes if c != y], way - 1) + [y]
    rng.shuffle(cands)
    counts = spread_over_classes(k, cands, rng)
    sup: list[int] = []
    for c in cands:
        pool = r.eligible([qi], by_class[c])
        n = min(counts[c], len(pool))
        sup += r.rices.select(qi, n, pool) if r.rices is not None else rng.sample(pool, n)
    if r.rices is not None:
        return cands, r.rices.order(qi, sup)
    rng.shuffle(sup)
    return cands, sup


# ----- video qa --------------------------------------------------------------------------------------
def eval_video_qa(model, items: list[dict], settings: EvalSettings, bank: MediaBank | None = None) -> dict:
    """Multiple choice by likelihood: " {choice}<EOC>" after "Question: q Answer:". Where the items
    carry the object's label and the choices are directions, also in the corpus's own video format
    (motion captions: "<image>" + "A cat moves to the right.<EOC>")."""
    r = Runner(model, items, settings, "video_qa", bank)
    queries = subset(items, settings.limit)
    r.bank.prefetch([p for q in queries for p in items[q]["media"]])
    captionable = all("label" in it and all(motion_caption(it["label"], c) for c in it["choices"]) for it in items)
    results, samples = [], []
    bar = r.progress(sum(len(queries) * len(r.seeds_for(k)) for k in settings.shots))
    for k in settings.shots:
        acc, cal, bl, cap_acc, cap_cal, cap_bl = [], [], [], [], [], []
        per_seed_acc = []
        for seed in r.seeds_for(k):
            c = defaultdict(list)
            per_seed_acc.append({})
            for qi in queries:
                it = items[qi]
                gold = {M.normalize_answer(a) for a in it["answers"]}
                n_query = len(it["media"])
                sup = r.support([qi], k, seed)
                formats = [("qa", [(items[j]["media"], vqa_example(items[j]["question"], items[j]["answer"])) for j in sup]
                            + [(it["media"], MEDIA * n_query + vqa_query(it["question"]))],
                            [r.tokens(f" {ch}{EOC}") for ch in it["choices"]])]
                if captionable:
                    formats.append(("caption", [(items[j]["media"], caption_example(motion_caption(items[j]["label"], items[j]["answer"]) or items[j]["answer"])) for j in sup]
                                    + [(it["media"], MEDIA * n_query)],
                                    [r.tokens(motion_caption(it["label"], ch) + EOC) for ch in it["choices"]]))
                for name, chunks, conts in formats:
                    ids, paths = r.prompt(chunks)
                    s = score_continuations(model, ids, [r.real(paths), r.content_free(paths, n_query)], conts)
                    b = score_continuations(model, ids, [r.blind(paths)], conts)
                    rng = random.Random(f"video_qa:{seed}:{qi}:{name}")
                    picks = {"raw": pick(s[0], rng), "cal": pick(calibrate(s[0], s[1]), rng), "blind": pick(b[0], rng)}
                    for how, p in picks.items():
                        c[(name, how)].append(float(M.normalize_answer(it["choices"][p]) in gold))
                    if name == "qa":
                        per_seed_acc[-1][qi] = c[("qa", "raw")][-1]
                    if name == "qa" and seed == r.seeds_for(k)[0] and len(samples) < NUM_SAMPLES * (settings.shots.index(k) + 1):
                        samples.append({"shots": k, "media": it["media"], "question": it["question"], "choices": it["choices"],
                                        "answers": it["answers"], "prediction": it["choices"][picks["raw"]],
                                        "calibrated_prediction": it["choices"][picks["cal"]],
                                        "blind_prediction": it["choices"][picks["blind"]]})
                c["chance"].append(1.0 / len(it["choices"]))
                bar.update(1)
            acc.append(M.mean(c[("qa", "raw")]))
            cal.append(M.mean(c[("qa", "cal")]))
            bl.append(M.mean(c[("qa", "blind")]))
            if captionable:
                cap_acc.append(M.mean(c[("caption", "raw")]))
                cap_cal.append(M.mean(c[("caption", "cal")]))
                cap_bl.append(M.mean(c[("caption", "blind")]))
        chance = M.mean([1.0 / len(items[q]["choices"]) for q in queries])
        extra = {"per_split": _split_means(items, queries, per_seed_acc)} if _has_splits(items, queries) else {}
        results.append(_row(k, "accuracy", acc, len(queries), bl, per_query=_per_query(per_seed_acc, queries),
                            calibrated_score=M.mean(cal), calibrated_std=M.std(cal), chance=chance, **extra))
        if captionable:
            results.append(_row(k, "accuracy (caption format)", cap_acc, len(queries), cap_bl, calibrated_score=M.mean(cap_cal),
                                calibrated_std=M.std(cap_cal), chance=chance))
    bar.close()
    return {"results": results, "samples": samples, "info": {"queries": len(queries), "pool": len(items)}}


# ----- dialogue --------------------------------------------------------------------------------------
def build_dialogues(items: list[dict], turns: int = 3, seed: int = 0) -> tuple[list[list[int]], str]:
    """Dialogues of up to `turns` questions. Questions about the same media (VQAv2 has several per
    image) make same-scene dialogues; when no media has two questions (the corpus asks one per
    scene), consecutive questions of a seeded shuffle make multi-image dialogues (each turn
    brings its picture). Returns (dialogues as item indices, "same_scene" | "multi_image")."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[tuple(it["media"])].append(i)
    same = [g[:turns] for g in groups.values() if len(g) >= 2]
    if same:
        return same, "same_scene"
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    dialogues = [order[i:i + turns] for i in range(0, len(order), turns)]
    return [d for d in dialogues if len(d) >= 2], "multi_image"


def eval_dialogue(model, items: list[dict], settings: EvalSettings, bank: MediaBank | None = None) -> dict:
    """Several questions asked in turn; every turn is a VQA chunk (the image again, then
    "Question: q Answer: a<EOC>"), and each turn's answer -- the model's own by default, the
    reference with history="reference" -- is the history of the next. Scored per turn with VQA
    accuracy; `stderr` is over dialogues (each one's mean turn score), since the turns of a
    dialogue are not independent samples."""
    r = Runner(model, items, settings, "dialogue", bank)
    dialogues, kind = build_dialogues(items, settings.turns)
    if not dialogues:
        raise ValueError("dialogue: not enough questions to build a dialogue")
    chosen = [dialogues[i] for i in subset(dialogues, settings.limit)]
    max_new = settings.max_new_tokens or 8
    r.bank.prefetch([p for d in chosen for q in d for p in items[q]["media"]])
    n_turns = max(len(d) for d in chosen)
    results, samples = [], []
    bar = r.progress(sum(len(chosen) * len(r.seeds_for(k)) for k in settings.shots))
    for k in settings.shots:
        per_seed, per_seed_blind, turn_scores, turn_blind, per_seed_dialogue = [], [], [], [], []
        for seed in r.seeds_for(k):
            by_turn, by_turn_blind, by_dialogue = defaultdict(list), defaultdict(list), {}
            for i, d in enumerate(chosen):
                sup = r.support(d, k, seed)
                prefix = [(items[j]["media"], vqa_example(items[j]["question"], items[j]["answer"])) for j in sup]
                history = {"real": [], "blind": []}
                log_turns = []
                for t, qi in enumerate(d):
                    it = items[qi]
                    answers = {}
                    for how in ("real", "blind"):
                        chunks = prefix + [(items[j]["media"], vqa_example(items[j]["question"], a)) for j, a in history[how]]
                        chunks.append((it["media"], MEDIA * len(it["media"]) + vqa_query(it["question"])))
                        ids, paths = r.prompt(chunks)
                        visual = r.real(paths) if how == "real" else r.blind(paths)
                        answers[how] = clean_answer(r.generate(ids, visual, max_new))
                        history[how].append((qi, answers[how] if settings.history == "own" else it["answer"]))
                    by_turn[t].append(M.vqa_accuracy(answers["real"], it["answers"]))
                    by_turn_blind[t].append(M.vqa_accuracy(answers["blind"], it["answers"]))
                    log_turns.append({"question": it["question"], "prediction": answers["real"],
                                      "blind_prediction": answers["blind"], "answers": it["answers"]})
                by_dialogue[i] = M.mean([by_turn[t][-1] for t in range(len(d))])
                if seed == r.seeds_for(k)[0] and len(samples) < NUM_SAMPLES * (settings.shots.index(k) + 1):
                    samples.append({"shots": k, "media": [items[q]["media"] for q in d], "turns": log_turns})
                bar.update(1)
            all_real = [a for t in by_turn for a in by_turn[t]]
            all_blind = [a for t in by_turn_blind for a in by_turn_blind[t]]
            per_seed.append(M.mean(all_real))
            per_seed_blind.append(M.mean(all_blind))
            turn_scores.append([M.mean(by_turn[t]) for t in range(n_turns)])
            turn_blind.append([M.mean(by_turn_blind[t]) for t in range(n_turns)])
            per_seed_dialogue.append(by_dialogue)
        results.append(_row(k, "VQA accuracy", per_seed, sum(len(d) for d in chosen), per_seed_blind,
                            per_query=_per_query(per_seed_dialogue, range(len(chosen))), dialogues=len(chosen),
                            dialogue_kind=kind, history=settings.history,
                            per_turn=[M.mean([s[t] for s in turn_scores]) for t in range(n_turns)],
                            per_turn_blind=[M.mean([s[t] for s in turn_blind]) for t in range(n_turns)]))
    bar.close()
    return {"results": results, "samples": samples, "info": {"dialogues": len(chosen), "kind": kind, "history": settings.history}}


# ----- text ------------------------------------------------------------------------------------------
def _chat_ids(model, prompt: str) -> list[int]:
    tok = model.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(f"User: {prompt}\nAssistant:", add_special_tokens=True)["input_ids"]


def _text_stop_ids(model) -> set[int]:
    tok = model.tokenizer
    stops = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model.lm, "generation_config", None), "eos_token_id", None)
    stops.update(int(e) for e in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) if e is not None)
    try:
        from ..prompt import ChatFormat

        eot = ChatFormat(tok).end_of_turn_id
        if eot is not None:
            stops.add(int(eot))
    except Exception as e:  # the chat renderer is optional here
        log.debug("no end-of-turn token: %s", e)
    return stops


def eval_text(model, settings: EvalSettings, prompts: Sequence[str] | None = None) -> dict:
    """The text-only check: greedy answers of the Flamingo model (no media in the prompt) and of
    the bare frozen LM (`model.lm`) to general prompts through the chat template; with no media
    both should agree token for token. Also the rate of degenerate repetition in each."""
    from .text_prompts import TEXT_PROMPTS

    settings.check()
    prompts = list(prompts or TEXT_PROMPTS)
    if settings.limit:
        prompts = prompts[: settings.limit]
    max_new = settings.max_new_tokens or 48
    stops = _text_stop_ids(model)
    lm_vocab = model.lm.get_output_embeddings().weight.shape[0]
    agree, rep_f, rep_lm, samples = [], [], [], []
    from tqdm import tqdm

    for prompt in tqdm(prompts, desc="eval text", unit="prompt", file=sys.stderr, dynamic_ncols=True, disable=not settings.progress):
        ids = _chat_ids(model, prompt)
        flamingo = greedy_generate(model, ids, None, max_new, stop_ids=stops | {model.eoc_token_id})
        bare = greedy_generate_lm(model.lm, ids, max_new, stop_ids={s for s in stops if s < lm_vocab})
        a, b = decode_text(model, flamingo), decode_text(model, bare)
        agree.append(float(flamingo == bare))
        rep_f.append(float(M.repeated_ngram(a)))
        rep_lm.append(float(M.repeated_ngram(b)))
        samples.append({"prompt": prompt, "flamingo": a, "lm": b, "agree": flamingo == bare})
    n = len(prompts)
    results = [
        {"shots": 0, "metric": "agreement", "score": M.mean(agree), "n": n, "blind_score": None,
         "note": "exact token agreement of greedy answers, Flamingo without media vs the bare LM"},
        {"shots": 0, "metric": "repetition rate", "score": M.mean(rep_f), "n": n, "blind_score": None,
         "reference_score": M.mean(rep_lm), "note": "answers with a word 4-gram repeated >= 3 times; reference_score = bare LM"},
    ]
    return {"results": results, "samples": samples, "info": {"prompts": n, "max_new_tokens": max_new}}


# ----- entry ------------------------------------------------------------------------------------------
def run_task(task: str, model, items: list[dict] | None, settings: EvalSettings) -> dict:
    model.eval()
    if task == "text":
        return eval_text(model, settings)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if not items:
        raise ValueError(f"{task}: no evaluation items")
    if task == "caption":
        return eval_caption(model, items, settings)
    if task == "vqa":
        return eval_vqa(model, items, settings)
    if task in ("classify", "recognize"):
        return eval_naming(model, items, settings, task)
    if task == "video_qa":
        return eval_video_qa(model, items, settings)
    return eval_dialogue(model, items, settings)
