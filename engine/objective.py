"""The paper's training objective: a weighted sum of per-dataset negative log-likelihoods,

    sum_m  lambda_m * E_{(x, y) ~ D_m} [ -sum_l log p(y_l | y_<l, x_<=l) ]

and how each optimiser step visits the datasets:

* ``accumulation`` (the paper's choice): every step draws one batch from every dataset and
  accumulates the gradients of lambda_m * loss_m before a single optimiser update.
* ``round_robin`` (its ablation): each step uses one dataset, in turn.

A dataset of weight 0 is never drawn (it would add no gradient).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cross_attention import MediaContext
from .data.features import FeatureCache, load_pixels
from .data.readers import RecordStream, open_source
from .data.sampling import IGNORE, Batch, SequenceSampler, collate, stack_media
from .media import MediaError

log = logging.getLogger(__name__)

STRATEGIES = ("accumulation", "round_robin")


def step_plan(step: int, weights: list[float], strategy: str) -> list[int]:
    """Indices of the datasets whose batches make optimiser step `step`."""
    active = [i for i, w in enumerate(weights) if w > 0]
    if not active:
        raise ValueError("every dataset has weight 0: nothing to train on")
    if strategy == "accumulation":
        return active
    if strategy == "round_robin":
        return [active[step % len(active)]]
    raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor | None = None  # (B, N, T, S, d) cached frozen features
    pixels: torch.Tensor | None = None  # (B, N, T, 3, H, W)
    num_samples: int = 0
    num_tokens: int = 0

    def to(self, device) -> "ModelInputs":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return ModelInputs(move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.features),
                           move(self.pixels), self.num_samples, self.num_tokens)


class DatasetFeed:
    """One dataset's stream of batches: records -> sampled sequences -> a batch with its media
    as cached features (or pixels). Records whose media cannot be read, and samples that keep
    no media (nothing to learn: text before the first image has no labels), are skipped."""

    def __init__(self, spec, tokenizer, media_token_id: int, pad_id: int, *, seed: int, rank: int, world: int,
                 cache: FeatureCache | None, image_size: int, num_frames: int, add_bos: bool | None = None):
        self.spec = spec
        self.name, self.weight, self.batch_size = spec.name, float(spec.weight), spec.batch_size
        options = {k: getattr(spec, k) for k in ("image_dir", "image_column", "caption_column")}
        self.source = open_source(spec.format, spec.path, spec.kind, **options)
        self.stream = RecordStream(self.source, seed=seed, shuffle=spec.shuffle, rank=rank, world=world)
        self.sampler = SequenceSampler(tokenizer, media_token_id, spec.kind, spec.max_tokens, spec.max_images,
                                       seed=seed * 1000 + 17 * rank + 1, add_bos=add_bos,
                                       mask_new_words=spec.mask_new_words, answers_only=spec.answers_only)
        self.media_token_id, self.pad_id = media_token_id, pad_id
        self.cache, self.image_size, self.num_frames = cache, image_size, num_frames
        self.media_kind = spec.media_kind
        self.skipped = 0

    def media_paths(self):
        for i in range(len(self.source)):
            yield from self.source[i].media

    def load_media(self, paths: list) -> dict:
        """path -> (T, ...) features (cache) or pixels; None where the file cannot be read."""
        if self.cache is not None:
            return self.cache.get_many(paths, self.media_kind)
        out = {}
        for p in paths:
            try:
                out[p] = load_pixels(p, self.image_size, self.num_frames, self.media_kind)
            except (MediaError, OSError) as e:
                log.warning("%s: unreadable media %s", self.name, e)
                out[p] = None
        return out

    def next_batch(self) -> ModelInputs:
        samples, media, pending = [], [], []
        for _ in range(1000 * self.batch_size):
            if len(samples) == self.batch_size:
                break
            record = next(self.stream)
            sample = self.sampler(record)
            if not sample.media:
                self.skipped += 1
                continue
            pending.append(sample)
            if len(samples) + len(pending) == self.batch_size:
                loaded = self.load_media([p for s in pending for p in s.media])  # one tower call for the misses
                for s in pending:
                    row = [loaded.get(p) for p in s.media]
                    if any(m is None for m in row):
                        self.skipped += 1
                        continue
                    samples.append(s)
                    media.append(row)
                pending = []
        if len(samples) < self.batch_size:
            raise ValueError(f"dataset {self.name!r}: no usable records (media unreadable, or no images in the sampled windows)")
        batch: Batch = collate(samples, self.pad_id, self.media_token_id)
        stacked = stack_media(media, batch.num_media)
        cached = self.cache is not None
        return ModelInputs(batch.input_ids, batch.attention_mask, batch.labels,
                           features=stacked if cached else None, pixels=None if cached else stacked,
                           num_samples=len(samples), num_tokens=int(batch.attention_mask.sum()))

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "sampler": self.sampler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.sampler.load_state_dict(state["sampler"])
        self.skipped = state.get("skipped", 0)


@dataclass
class PassRows:
    """One batch's share of an LM pass: its B rows under their own media, then again under each
    hinge's negative media (k = 1 + len(negatives) copies, as one batch of k * B rows).

    input_ids / attention_mask / labels: (k * B, L)
    media:     visual (k * B, N, R, d) and media_index (k * B, L); None for text only
    negatives: (kind, weight, rows the hinge applies to or None for all) per copy after the first
    hinges:    every hinge kind with weight > 0 (logged even where it had nothing to compare)
    scale:     0.0 for a batch with nothing to learn: a zero loss that still touches every
               parameter, so DDP ranks stay in step
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    media: MediaContext | None
    negatives: list
    hinges: list[str]
    scale: float = 1.0

    @property
    def copies(self) -> int:
        return 1 + len(self.negatives)


class FlamingoLoss(nn.Module):
    """The model and its loss as one module, so that DDP/FSDP wrap (and sync) everything the
    step touches: media -> visual tokens -> next-token loss on the labelled positions."""

    def __init__(self, model, p_next: float = 0.0, margin: float = 2.0):
        super().__init__()
        self.model = model
        self.p_next = p_next
        self.margin = margin

    def forward(self, input_ids, attention_mask, labels, features=None, pixels=None, contrast: float = 0.0,
                time_contrast: float = 0.0, query_contrast: float = 0.0, position_contrast: float = 0.0,
                return_parts: bool = False):
        """features (B, M, T, S, d) or pixels (B, M, T, 3, H, W) -> the scalar loss. contrast,
        time_contrast, query_contrast and position_contrast weigh the hinges of `score` (another
        row's media; the row's own frames in reverse order; the row's last picture swapped for an
        earlier one; the row's pictures turned half a turn).
        return_parts: (loss, {"nll": ..., "hinge_image" / "hinge_time" / "hinge_query" / ...}),
        detached and unweighted, with a key for every hinge whose weight is > 0 (0 where it had
        nothing to compare), so every call with the same weights logs the same keys."""
        rows = self.rows(input_ids, attention_mask, labels, features, pixels, contrast, time_contrast, query_contrast,
                         position_contrast)
        loss, parts = self.score(rows, self.row_nll(rows.input_ids, rows.attention_mask, rows.labels, rows.media))
        return (loss, parts) if return_parts else loss

    def row_nll(self, input_ids, attention_mask, labels, media) -> torch.Tensor:
        """One LM pass -> (rows,) next-token NLL summed over each row's labels."""
        return self.model(input_ids, None, attention_mask, media=media, labels=labels, loss_reduction="sequence").loss

    def rows(self, input_ids, attention_mask, labels, features=None, pixels=None, contrast: float = 0.0,
             time_contrast: float = 0.0, query_contrast: float = 0.0, position_contrast: float = 0.0) -> PassRows:
        """A batch (forward's arguments) -> its rows for an LM pass: the text under its own media
        and under each hinge's negative (one pass instead of k: on a GPU the small per-row passes
        were bound by the host launching their kernels, not by the kernels)."""
        visual = self._visual(features, pixels)
        scale = 1.0
        if not bool((labels[:, 1:] != IGNORE).any()):  # nothing to learn
            labels = labels.clone()
            labels[0, -1] = input_ids[0, -1]
            scale = 0.0
        weights = {"image": contrast, "time": time_contrast, "query": query_contrast, "position": position_contrast}
        negatives = self._negatives(visual, input_ids, features, pixels, weights) if scale > 0 else []
        k = 1 + len(negatives)
        media = None
        if visual is not None:
            own = self.model.media_context(visual, input_ids, 0, self.p_next if self.training else 0.0)
            contexts = [own] + [self.model.media_context(negative, input_ids, 0) for _, _, negative, _ in negatives]
            media = MediaContext(torch.cat([c.visual for c in contexts]), torch.cat([c.media_index for c in contexts]),
                                 own.only_last)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hinges = [kind for kind, weight in weights.items() if weight > 0]
        return PassRows(input_ids.repeat(k, 1), mask.repeat(k, 1), labels.repeat(k, 1), media,
                        [(kind, weight, which) for kind, weight, _, which in negatives], hinges, scale)

    def score(self, rows: PassRows, nll: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(k * B,) summed NLL per row -> the batch's loss and its parts: the next-token loss
        (mean over labelled tokens) plus, for each (kind, weight, rows) negative, a hinge asking
        each sequence's text to be more likely with its own media than with the negative:
        weight * mean(relu(margin + nll_own - nll_negative)).
        - another row's images (image_contrast): a constant, image-blind use of the visual tokens
          scores the same under both and pays the margin, which keeps the resampler from
          collapsing onto its latents when the text alone explains most of the loss;
        - the row's own frames reversed (time_contrast): reversal turns every motion of the
          corpus into its opposite (left/right, up/down, grow/shrink, appear/disappear), and
          visual tokens that ignore frame order score the same under both;
        - the row's last picture swapped for its least similar earlier picture (query_contrast):
          only the text after the last marker changes, so in a few-shot naming episode the hinge
          asks the query's name to follow from its picture rather than from the names in context
          alone (a frequent or recent name of the episode, which the plain loss also rewards);
        - the row's pictures turned half a turn (position_contrast: the feature grid's cells in
          reverse order, or the pixels turned): left and right, top and bottom trade places, so
          an answer about where things are must read where they are; visual tokens that ignore
          cell order score the same under both."""
        nll = nll.view(rows.copies, -1)
        own = nll[0]
        labelled = (rows.labels[: own.shape[0], 1:] != IGNORE).sum()
        loss = own.sum() / labelled.clamp(min=1) * rows.scale
        parts = {"nll": loss.detach()}
        for (kind, weight, which), other in zip(rows.negatives, nll[1:]):
            hinge = torch.relu(self.margin + own - other)
            hinge = hinge.mean() if which is None else hinge[which].mean()
            parts[f"hinge_{kind}"] = hinge.detach()
            loss = loss + weight * hinge
        for kind in rows.hinges:
            parts.setdefault(f"hinge_{kind}", torch.zeros((), device=loss.device))
        return loss, parts

    def _negatives(self, visual, input_ids, features, pixels, weights: dict[str, float]) -> list:
        """(kind, weight, negative visual tokens, rows the hinge applies to or None for all) for
        each hinge in use (weights: kind -> weight): the next row's media; the row's own frames in
        reverse order (dim 2 of features / pixels is T); the row's last media swapped for its
        least similar earlier one; the row's media turned half a turn (dim 3 of features is the
        7 x 7 grid's cells, row-major, so reversing it turns the grid; dims 4-5 of pixels are H, W)."""
        negatives = []
        if visual is None:
            return negatives
        if weights["image"] > 0 and visual.shape[0] > 1:
            negatives.append(("image", weights["image"], visual.roll(1, dims=0), None))
        frames = features if features is not None else pixels
        if weights["time"] > 0 and frames.shape[2] > 1:
            reversed_ = [None if x is None else x.flip(2) for x in (features, pixels)]
            negatives.append(("time", weights["time"], self._visual(*reversed_), None))
        if weights["query"] > 0:
            counts = (input_ids == self.model.media_token_id).sum(-1)
            pooled = features.float().mean(dim=(2, 3)) if features is not None else visual.detach().float().mean(2)
            swapped, rows = swap_last_media(visual, counts, pooled)
            if bool(rows.any()):
                negatives.append(("query", weights["query"], swapped, rows))
        if weights["position"] > 0 and (features is None or features.shape[3] > 1):
            turned = (features.flip(3), None) if features is not None else (None, pixels.flip((4, 5)))
            negatives.append(("position", weights["position"], self._visual(*turned), None))
        return negatives

    def _visual(self, features, pixels):
        """Frozen features or pixels -> (B, M, R, d) visual tokens (None without media)."""
        if features is not None:
            return self.model.resample(features)
        return None if pixels is None else self.model.encode_media(pixels)


class OnePassLoss(FlamingoLoss):
    """Every dataset's batch of an optimiser step through the LM in one pass, their rows padded to
    a common length and media count: the same losses and gradients as a pass per batch
    (FlamingoLoss), with one LM pass's kernel launches instead of one per dataset. A GPU runs the
    step's small passes bound by the host launching kernels, so fewer, larger passes are faster
    there; on a CPU the padded positions cost more than the launches save (bench/recipe.py)."""

    def forward(self, batches: list[dict], weights: list[float]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, dict]]]:
        """batches: FlamingoLoss.forward's keyword arguments for each dataset's batch (without
        return_parts); weights: each dataset's lambda. Returns (sum of weight * loss, the
        (loss, parts) of each batch, as FlamingoLoss.forward(..., return_parts=True) gives them)."""
        rows = [self.rows(**batch) for batch in batches]
        nll = self.row_nll(*concat_rows(rows))
        results = [self.score(r, chunk) for r, chunk in zip(rows, nll.split([len(r.input_ids) for r in rows]))]
        total = sum(w * loss for w, (loss, _) in zip(weights, results))
        return total, results


def concat_rows(rows: list[PassRows]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, MediaContext | None]:
    """Several batches' rows -> one batch (input_ids, attention_mask, labels, media), right-padded
    as `collate` pads: text to the longest row (masked out of attention, no labels; a real token's
    position is unchanged), media to the most media (zeros that no token attends to: a padded
    token's media index is -1, none). Rows of a text-only batch see no media."""
    width = max(r.input_ids.shape[1] for r in rows)

    def pad_text(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)

    # The padding id is never embedded into anything a labelled token sees; 0 is a valid id.
    input_ids = torch.cat([pad_text(r.input_ids, 0) for r in rows])
    attention_mask = torch.cat([pad_text(r.attention_mask, 0) for r in rows])
    labels = torch.cat([pad_text(r.labels, IGNORE) for r in rows])
    with_media = [r.media for r in rows if r.media is not None]
    if not with_media:
        return input_ids, attention_mask, labels, None
    like = with_media[0].visual
    n = max(m.visual.shape[1] for m in with_media)
    visual, index = [], []
    for r in rows:
        if r.media is None:
            visual.append(like.new_zeros((len(r.input_ids), n, *like.shape[2:])))
            index.append(torch.full((len(r.input_ids), width), -1, dtype=torch.long, device=like.device))
        else:
            v = r.media.visual
            visual.append(F.pad(v, (0, 0, 0, 0, 0, n - v.shape[1])))
            index.append(pad_text(r.media.media_index, -1))
    return input_ids, attention_mask, labels, MediaContext(torch.cat(visual), torch.cat(index), with_media[0].only_last)


def swap_last_media(visual: torch.Tensor, counts: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    visual: (B, N, R, d) visual tokens; counts: (B,) media per row; pooled: (B, N, d') a summary
    of each media item to compare them by (cosine).
    Returns the visual tokens with each row's last media replaced by the row's earlier media least
    like it (in a naming episode, most likely a picture of another concept), and the (B,) rows
    that have an earlier media to swap in.
    """
    swapped = visual.clone()
    rows = counts >= 2
    for b in rows.nonzero().flatten().tolist():
        last = int(counts[b]) - 1
        sims = torch.nn.functional.cosine_similarity(pooled[b, :last], pooled[b, last][None], dim=-1)
        swapped[b, last] = visual[b, int(sims.argmin())]
    return swapped, rows
