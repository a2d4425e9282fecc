"""Running the model for evaluation: media -> visual tokens (cached), greedy generation that
stops at <EOC>, and ranking candidate continuations by log-likelihood with the shared context
computed once.

Candidate ranking (`score_continuations`): the prompt runs once with the KV cache on; the cache
is then expanded over the candidates (`DynamicCache.batch_repeat_interleave`) and every candidate
is scored in one batched forward. Several *variants* of a prompt that differ only in their media
(the real query image and a blank one, for contextual calibration) share the text and the media
before the first differing item, so that common prefix (all the support examples) runs once too.

Contextual calibration (Zhao et al. 2021, "Calibrate before use"): the candidates' probabilities
for a content-free input -- the same few-shot prompt with the query image replaced by a blank
image -- estimate the model's prior bias towards each answer; dividing by them
(p_cal(c) ∝ p(c | x) / p(c | content-free)) removes it. `calibrate` does this in log space.
A blank image is one estimate of that prior; `mean_distribution` builds another from several
inputs (for few-shot naming: the query replaced by a copy of each class's example, see
engine.eval.tasks), whose mean prediction is what the model answers on a class-balanced set.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..cross_attention import MediaContext, media_index_from_ids
from ..media import load_media, media_kind
from ..tokens import bos_prefix
from ..vision import images_to_tensor

BLANK_GREY = 0.5  # the blank image: every pixel mid grey


def model_device(model) -> torch.device:
    return next(model.resampler.parameters()).device


def encode_text(model, text: str, bos: bool = True) -> list[int]:
    """Prompt text (with <image> / <EOC> markers) -> ids, as training tokenises it."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return (bos_prefix(model.tokenizer) if bos else []) + list(ids)


def decode_text(model, ids: Sequence[int]) -> str:
    return model.tokenizer.decode(list(ids), skip_special_tokens=True)


# ----- media --------------------------------------------------------------------------------------
class MediaBank:
    """Media files -> pixels -> visual tokens (R, d), with an LRU of visual tokens by path, and the
    blank (grey) media used by the image-blind controls and calibration. The tower's pooled
    features (RICES, the prototype control) are kept by path too, from the same tower pass."""

    def __init__(self, model, num_frames: int | None = None, cache_items: int = 4096, batch_size: int = 16):
        self.model = model
        max_frames = int(model.config.resampler.max_frames)
        self.num_frames = max(1, min(int(num_frames or max_frames), max_frames))
        self.size = int(model.vision.image_size)
        self.cache_items = cache_items
        self.batch_size = batch_size
        self._visual: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._embedding: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._blank: dict[int, torch.Tensor] = {}
        self.device = model_device(model)
        self.dtype = model.resampler.latents.dtype

    def pixels(self, path: str) -> torch.Tensor:
        """(T, 3, H, W) in [0, 1]; T = 1 for an image, num_frames for a video."""
        return images_to_tensor(load_media(path, self.num_frames), self.size)

    def frames_of(self, path: str) -> int:
        return self.num_frames if media_kind(path) == "video" else 1

    @torch.inference_mode()
    def _encode(self, pixels: torch.Tensor, paths: Sequence[str] = ()) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, R, d); the pooled tower features of `paths` (one per row) are kept."""
        features = self.model.vision(pixels.to(device=self.device, dtype=self.dtype))  # (B, T, S, d_v)
        for path, e in zip(paths, _pooled(features)):
            self._remember(self._embedding, path, e)
        return self.model.resample(features[:, None])[:, 0]

    def _remember(self, cache: OrderedDict, path: str, value: torch.Tensor) -> None:
        cache[path] = value
        cache.move_to_end(path)
        while len(cache) > self.cache_items:
            cache.popitem(last=False)

    def visual(self, path: str) -> torch.Tensor:
        """(R, d) visual tokens of one media file."""
        hit = self._visual.get(path)
        if hit is not None:
            self._visual.move_to_end(path)
            return hit
        tokens = self._encode(self.pixels(path)[None], [path])[0]
        self._remember(self._visual, path, tokens)
        return tokens

    def pixel_batches(self, paths: Sequence[str]):
        """Yields (indices into `paths`, (b, T, 3, H, W) pixels): batches of at most batch_size
        files whose pixels have the same shape (images and videos are never stacked together)."""
        for i in range(0, len(paths), self.batch_size):
            pix = [self.pixels(p) for p in paths[i:i + self.batch_size]]
            by_shape: dict[tuple, list[int]] = {}
            for j, x in enumerate(pix):
                by_shape.setdefault(tuple(x.shape), []).append(j)
            for idx in by_shape.values():
                yield [i + j for j in idx], torch.stack([pix[j] for j in idx])

    def prefetch(self, paths: Sequence[str]) -> None:
        """Encodes the not-yet-cached `paths` in batches (at most the cache size)."""
        todo = [p for p in dict.fromkeys(paths) if p not in self._visual][: self.cache_items]
        for idx, pixels in self.pixel_batches(todo):
            for j, t in zip(idx, self._encode(pixels, [todo[j] for j in idx])):
                self._remember(self._visual, todo[j], t)

    def blank(self, frames: int = 1) -> torch.Tensor:
        """(R, d) visual tokens of a blank grey image (frames=1) or video (frames=T)."""
        if frames not in self._blank:
            pix = torch.full((1, frames, 3, self.size, self.size), BLANK_GREY)
            self._blank[frames] = self._encode(pix)[0]
        return self._blank[frames]

    def blank_like(self, path: str) -> torch.Tensor:
        return self.blank(self.frames_of(path))

    @torch.inference_mode()
    def embeddings(self, paths: Sequence[str]) -> torch.Tensor:
        """(P, d_vision) frozen vision features mean-pooled over frames and positions (RICES); the
        tower runs only for paths whose features are not kept yet."""
        found = {p: self._embedding[p] for p in paths if p in self._embedding}
        todo = [p for p in dict.fromkeys(paths) if p not in found]
        for idx, pixels in self.pixel_batches(todo):
            features = self.model.vision(pixels.to(device=self.device, dtype=self.dtype))
            for j, e in zip(idx, _pooled(features)):
                found[todo[j]] = e  # a pool larger than the cache still comes back whole
                self._remember(self._embedding, todo[j], e)
        return torch.stack([found[p] for p in paths]) if paths else torch.empty(0)


def _pooled(features: torch.Tensor) -> torch.Tensor:
    """(B, T, S, d_v) tower features -> (B, d_v) float on the CPU: the mean over frames and positions."""
    return features.float().mean(dim=(1, 2)).cpu()


# ----- forward passes ------------------------------------------------------------------------------
def _forward(model, ids: torch.Tensor, visual: torch.Tensor | None, offset: int = 0, past=None,
             attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0):
    """One forward of `ids` (B, L) after `past`, `offset` media already in the cache, seeing the
    visual tokens (B, N, R, d) of all the sequence's media (each token only those its markers
    allow). The media context is built here so a text-only prefix of a media prompt is run
    exactly as in the full sequence."""
    media = None
    if visual is not None and visual.shape[1] > 0:
        index = media_index_from_ids(ids, model.media_token_id, offset)
        media = MediaContext(visual, index, model.config.cross_attention.only_last_media)
    return model(ids, media=media, attention_mask=attention_mask, past_key_values=past, use_cache=True,
                 logits_to_keep=logits_to_keep)


def _stack(visual: Sequence[torch.Tensor] | torch.Tensor | None) -> torch.Tensor | None:
    """A list of (R, d) media -> (N, R, d); None or empty -> None."""
    if visual is None:
        return None
    if isinstance(visual, torch.Tensor):
        return visual if visual.numel() and visual.shape[0] > 0 else None
    return torch.stack(list(visual)) if len(visual) else None


def _check_media(model, ids: Sequence[int], visual: torch.Tensor | None) -> int:
    n_markers = sum(1 for t in ids if t == model.media_token_id)
    n_media = 0 if visual is None else visual.shape[0]
    if n_markers != n_media:
        raise ValueError(f"the prompt holds {n_markers} <image> markers but {n_media} media were given")
    return n_media


@torch.inference_mode()
def greedy_generate(model, ids: Sequence[int], visual: Sequence[torch.Tensor] | torch.Tensor | None,
                    max_new_tokens: int = 20, stop_ids: Sequence[int] | None = None) -> list[int]:
    """Greedy decoding after the prompt; stops at <EOC> (and the tokenizer's EOS), never emits
    <image>. Returns the generated ids without the stop token."""
    visual = _stack(visual)
    n = _check_media(model, ids, visual)
    device = model_device(model)
    stops = set(stop_ids) if stop_ids is not None else {model.eoc_token_id}
    if stop_ids is None and model.tokenizer.eos_token_id is not None:
        stops.add(int(model.tokenizer.eos_token_id))
    x = torch.tensor([list(ids)], device=device)
    media = None
    if n:
        media = MediaContext(visual[None], media_index_from_ids(x, model.media_token_id), model.config.cross_attention.only_last_media)
    out = model(x, media=media, use_cache=True, logits_to_keep=1)
    past = out.past_key_values
    step_index = torch.full((1, 1), n - 1, device=device)
    generated: list[int] = []
    for step in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        logits[model.media_token_id] = float("-inf")
        token = int(logits.argmax())
        if token in stops:
            break
        generated.append(token)
        if step == max_new_tokens - 1:
            break
        out = model(torch.tensor([[token]], device=device), media=media.with_index(step_index) if media else None,
                    past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
    return generated


@torch.inference_mode()
def greedy_generate_variants(model, ids: Sequence[int], variants: Sequence[Sequence[torch.Tensor] | torch.Tensor],
                             max_new_tokens: int = 20, stop_ids: Sequence[int] | None = None) -> list[list[int]]:
    """`greedy_generate` for several media variants of one prompt (the real images and the blank
    ones of the image-blind control) in one batch: the same text, so no padding is needed.
    A row that has stopped keeps being fed a pad token until every row has; its output ends at
    its stop."""
    if len(variants) == 1:
        return [greedy_generate(model, ids, variants[0], max_new_tokens, stop_ids)]
    stacked = [_stack(v) for v in variants]
    if any(v is None for v in stacked):
        raise ValueError("greedy_generate_variants needs media in every variant")
    for v in stacked:
        n = _check_media(model, ids, v)
    device = model_device(model)
    stops = set(stop_ids) if stop_ids is not None else {model.eoc_token_id}
    if stop_ids is None and model.tokenizer.eos_token_id is not None:
        stops.add(int(model.tokenizer.eos_token_id))
    B = len(stacked)
    x = torch.tensor([list(ids)], device=device).expand(B, -1)
    media = MediaContext(torch.stack(stacked), media_index_from_ids(x, model.media_token_id), model.config.cross_attention.only_last_media)
    out = model(x, media=media, use_cache=True, logits_to_keep=1)
    past = out.past_key_values
    step_index = torch.full((B, 1), n - 1, device=device)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    generated: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        logits[:, model.media_token_id] = float("-inf")
        tokens = logits.argmax(-1).tolist()
        feed = []
        for b, t in enumerate(tokens):
            if not done[b]:
                if t in stops:
                    done[b] = True
                else:
                    generated[b].append(int(t))
            feed.append(pad if done[b] else int(t))
        if all(done) or step == max_new_tokens - 1:
            break
        out = model(torch.tensor(feed, device=device)[:, None], media=media.with_index(step_index),
                    past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
    return generated


@torch.inference_mode()
def greedy_generate_lm(lm, ids: Sequence[int], max_new_tokens: int = 20, stop_ids: Sequence[int] = ()) -> list[int]:
    """The same greedy loop on a bare Hugging Face causal LM (the frozen LM as it is)."""
    device = next(lm.parameters()).device
    out = lm(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, logits_to_keep=1)
    generated: list[int] = []
    stops = set(stop_ids)
    for step in range(max_new_tokens):
        token = int(out.logits[0, -1].float().argmax())
        if token in stops:
            break
        generated.append(token)
        if step == max_new_tokens - 1:
            break
        out = lm(input_ids=torch.tensor([[token]], device=device), past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return generated


def shared_prefix_length(model, ids: Sequence[int], variants: Sequence[torch.Tensor]) -> int:
    """How many leading ids every variant reads identically: up to (not including) the marker of
    the first media item that differs between variants; all of them when none differs."""
    first = variants[0]
    differ = None
    for m in range(first.shape[0]):
        if any(not torch.equal(v[m], first[m]) for v in variants[1:]):
            differ = m
            break
    if differ is None:
        return len(ids)
    seen = 0
    for pos, t in enumerate(ids):
        if t == model.media_token_id:
            if seen == differ:
                return pos
            seen += 1
    raise ValueError("fewer <image> markers than media items")


@torch.inference_mode()
def score_continuations(model, ids: Sequence[int], variants: Sequence[Sequence[torch.Tensor] | torch.Tensor | None],
                        continuations: Sequence[Sequence[int]]) -> torch.Tensor:
    """(V, C) summed log-probabilities of each continuation after the prompt `ids`, for each
    media variant (a list of (R, d) visual tokens per <image> marker; variants differ only in
    their media). The shared context runs once; the candidates run in one batched forward that
    reuses its KV cache."""
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    if not variants:
        raise ValueError("at least one media variant is needed")
    device = model_device(model)
    stacked = [_stack(v) for v in variants]
    if any((s is None) != (stacked[0] is None) for s in stacked):
        raise ValueError("media variants must all have media, or all none")
    for s in stacked:
        _check_media(model, ids, s)
    V, C, L = len(stacked), len(continuations), len(ids)
    n_media = 0 if stacked[0] is None else stacked[0].shape[0]
    visual_v = None if stacked[0] is None else torch.stack(stacked)  # (V, N, R, d)

    split = len(ids) if V == 1 or visual_v is None else shared_prefix_length(model, ids, stacked)
    past, last = None, None
    if split > 0:  # the shared prefix, once
        x = torch.tensor([list(ids[:split])], device=device)
        out = _forward(model, x, None if visual_v is None else visual_v[:1], 0, None, logits_to_keep=1)
        past, last = out.past_key_values, out.logits[:, -1]
    if split < L:  # the rest, once per variant
        if past is not None:
            past.batch_repeat_interleave(V)
        offset = sum(1 for t in ids[:split] if t == model.media_token_id)
        x = torch.tensor([list(ids[split:])], device=device).expand(V, -1)
        out = _forward(model, x, visual_v, offset, past, logits_to_keep=1)
        past, last = out.past_key_values, out.logits[:, -1]
    else:
        last = last.expand(V, -1)
    first_lp = F.log_softmax(last.float(), dim=-1)  # (V, vocab)
    first_ids = torch.tensor([c[0] for c in continuations], device=device)
    scores = first_lp[:, first_ids]  # (V, C)

    width = max(len(c) for c in continuations) - 1
    if width > 0:  # the candidates' other tokens: one forward for all V*C rows on the expanded cache
        past.batch_repeat_interleave(C)
        pad = model.tokenizer.pad_token_id or 0
        inp = torch.full((C, width), pad, dtype=torch.long, device=device)
        tgt = torch.zeros((C, width), dtype=torch.long, device=device)
        keep = torch.zeros((C, width), dtype=torch.bool, device=device)
        for j, c in enumerate(continuations):
            n = len(c) - 1
            if n:
                inp[j, :n] = torch.tensor(c[:-1], device=device)
                tgt[j, :n] = torch.tensor(c[1:], device=device)
                keep[j, :n] = True
        inp, tgt, keep = (t.repeat(V, 1) for t in (inp, tgt, keep))  # row v*C + j
        mask = torch.cat([torch.ones((V * C, L), dtype=torch.long, device=device), keep.long()], dim=1)
        vis = None if visual_v is None else visual_v.repeat_interleave(C, dim=0)
        out = _forward(model, inp, vis, n_media, past, attention_mask=mask)
        lp = F.log_softmax(out.logits.float(), dim=-1).gather(-1, tgt[..., None])[..., 0]
        scores = scores + (lp * keep).sum(-1).view(V, C)
    return scores


@torch.inference_mode()
def naive_continuation_logprob(model, ids: Sequence[int], visual: Sequence[torch.Tensor] | torch.Tensor | None,
                               continuation: Sequence[int]) -> float:
    """The reference for `score_continuations`: one full forward of prompt + continuation."""
    device = model_device(model)
    v = _stack(visual)
    full = torch.tensor([list(ids) + list(continuation)], device=device)
    out = _forward(model, full, None if v is None else v[None], 0, None)
    lp = F.log_softmax(out.logits[0].float(), dim=-1)
    L = len(ids)
    return float(sum(lp[L - 1 + j, t] for j, t in enumerate(continuation)))


def calibrate(logp: torch.Tensor, logp_content_free: torch.Tensor) -> torch.Tensor:
    """Contextual calibration over the last dim: log of normalise(W p) with W = diag(p_cf)^-1,
    both p and p_cf normalised over the candidates first."""
    p = F.log_softmax(logp.float(), dim=-1)
    p_cf = F.log_softmax(logp_content_free.float(), dim=-1)
    return F.log_softmax(p - p_cf, dim=-1)


def mean_distribution(logps: torch.Tensor) -> torch.Tensor:
    """(K, C) log-scores of K inputs -> (C,) log of the mean of their distributions over the C
    candidates (each normalised first): a prior for `calibrate` estimated from several inputs."""
    if logps.ndim != 2 or logps.shape[0] == 0:
        raise ValueError(f"expected (K >= 1, C) log-scores, got {tuple(logps.shape)}")
    return torch.logsumexp(F.log_softmax(logps.float(), dim=-1), dim=0) - torch.log(torch.tensor(float(logps.shape[0])))


def pick(scores: torch.Tensor, rng=None, tol: float = 1e-5) -> int:
    """The argmax of (C,) scores, ties (within `tol`) broken by `rng` (a random.Random) rather
    than by position, so a ranking that carries no information -- e.g. calibration when the
    image changes nothing -- scores chance instead of favouring the first choice."""
    s = scores.float()
    best = torch.nonzero(s >= s.max() - tol).flatten().tolist()
    if len(best) == 1 or rng is None:
        return int(best[0])
    return int(rng.choice(best))
