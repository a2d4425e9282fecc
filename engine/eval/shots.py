"""Choosing the support (few-shot) examples of a query.

* random: a seeded sample from the pool (never the query itself, nor an item sharing its media);
  drawn once for the largest shot count and cut, so the 4 shots are the first 4 of the 8.
* RICES (Retrieval-based In-Context Example Selection, Yang et al. 2022, used by Flamingo): the
  pool items whose frozen vision-tower embedding (features mean-pooled over frames and positions)
  is closest to the query's by cosine similarity, ordered with the MOST similar LAST, nearest to
  the query in the prompt.
* spread_over_classes: k shots of an N-way episode spread as evenly as possible over the classes.
* support_orders: the same support in several orders, for an order ensemble (a small LM reading a
  few-shot prompt leans toward the labels shown last; averaging over orders evens that out).
* prototype_pick: the vision-only answer to an N-way episode (the class whose support examples'
  mean embedding is closest to the query's), the control that says how much of a naming task
  the frozen tower's features alone already solve.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def random_support(pool: Sequence[int], k: int, rng: random.Random, max_k: int | None = None) -> list[int]:
    """k items of `pool` in random order: the first k of one draw of max(k, max_k) items."""
    if k <= 0 or not pool:
        return []
    n = min(max(k, max_k or 0), len(pool))
    return rng.sample(list(pool), n)[:k]


def spread_over_classes(k: int, classes: Sequence, rng: random.Random) -> dict:
    """{class: count} with counts summing to k and differing by at most one; which classes get
    the extra shots is drawn from `rng`."""
    if not classes:
        raise ValueError("no classes to spread shots over")
    if k < 0:
        raise ValueError(f"the number of shots must be >= 0, got {k}")
    base, extra = divmod(k, len(classes))
    lucky = set(rng.sample(range(len(classes)), extra))
    return {c: base + (1 if i in lucky else 0) for i, c in enumerate(classes)}


def support_orders(support: Sequence[int], n: int, rng: random.Random) -> list[list[int]]:
    """n orders of `support`: the given one first, then shuffles, each new while new ones remain
    (a support of k items has k! orders; fewer than n when k! < n)."""
    if n < 1:
        raise ValueError(f"the number of orders must be >= 1, got {n}")
    orders = [list(support)]
    possible = math.factorial(len(support))
    while len(orders) < min(n, possible):
        order = list(support)
        rng.shuffle(order)
        if order not in orders:
            orders.append(order)
    return orders


class Rices:
    """Cosine-similarity retrieval over precomputed embeddings (P, d) of a pool."""

    def __init__(self, embeddings: torch.Tensor):
        if embeddings.dim() != 2:
            raise ValueError(f"RICES embeddings must be (P, d), got shape {tuple(embeddings.shape)}")
        self.embeddings = F.normalize(embeddings.float(), dim=-1)

    def similarities(self, query: torch.Tensor | int) -> torch.Tensor:
        """(P,) cosine similarity of every pool item to the query (an embedding, or a pool index)."""
        q = self.embeddings[query] if isinstance(query, int) else F.normalize(query.float().reshape(-1), dim=0)
        return self.embeddings @ q

    def order(self, query: torch.Tensor | int, indices: Sequence[int]) -> list[int]:
        """`indices` sorted by similarity to the query, ascending: the most similar last."""
        sims = self.similarities(query)
        return sorted(indices, key=lambda i: (float(sims[i]), -i))

    def select(self, query: torch.Tensor | int, k: int, candidates: Sequence[int] | None = None) -> list[int]:
        """The k candidates most similar to the query, the most similar last."""
        if k <= 0:
            return []
        sims = self.similarities(query)
        pool = list(range(len(self.embeddings))) if candidates is None else list(candidates)
        best = sorted(pool, key=lambda i: (-float(sims[i]), i))[:k]
        return best[::-1]


def prototype_pick(query: torch.Tensor, support: Sequence[torch.Tensor]) -> int:
    """The class whose support embeddings' mean is most cosine-similar to the query's.

    query: (d,); support: one (n_c, d) tensor per class (n_c may be 0: that class cannot win).
    Returns the index of the chosen class (the first on ties)."""
    q = F.normalize(query.float().reshape(-1), dim=0)
    sims = torch.full((len(support),), float("-inf"))
    for c, e in enumerate(support):
        if len(e):
            sims[c] = F.normalize(F.normalize(e.float(), dim=-1).mean(0), dim=0) @ q
    return int(sims.argmax())
