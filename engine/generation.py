"""Token-level generation: choosing the next token, stop rules, and streaming text out.

The decode loop itself is model-agnostic: `decode` takes the first logits and a `step(token)`
function that feeds one token to the model (with its KV cache) and returns the next logits.
`ChatEngine` supplies the Flamingo forward; tests can supply anything.

Repetition controls look at the reply being generated, not the whole conversation: a chat's
history (template tokens, the user's words) should not be penalised, while the run-on loops
OpenFlamingo users complain about are repeats within one answer.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .conversation import GenerationSettings

FINISH_REASONS = ("eoc", "eos", "length", "cancelled")


# ----- KV cache -------------------------------------------------------------------------------
class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into spare capacity instead of concatenating.

    DynamicLayer copies a layer's whole cache (`torch.cat`) for every new token: on a CPU and a
    small LM that copy costs about as much as the layer's matmuls at a few hundred tokens of
    context. Here new keys/values are written in place into a buffer that grows by half its
    length (at least 256 positions) when full; `keys`/`values` are views of the filled part, so
    everything that reads a DynamicLayer (masks, crop, get_seq_length) works unchanged.
    """

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    _length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, add = self._length, key_states.shape[-2]
        if self._buffers is None or n + add > self._buffers[0].shape[-2]:
            capacity = n + add + max(256, (n + add) // 2)
            grown = []
            for old, new in zip(self._buffers or (None, None), (key_states, value_states)):
                buf = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
                if n:
                    buf[..., :n, :] = old[..., :n, :]
                grown.append(buf)
            self._buffers = (grown[0], grown[1])
        k, v = self._buffers
        k[..., n : n + add, :] = key_states
        v[..., n : n + add, :] = value_states
        self._set_length(n + add)
        return self.keys, self.values

    def _set_length(self, n: int) -> None:
        self._length = n
        self.keys = self._buffers[0][..., :n, :]
        self.values = self._buffers[1][..., :n, :]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized or self._buffers is None:
            return
        self._set_length(max(0, self._length + tokens_to_remove))

    def reset(self) -> None:
        self._buffers, self._length = None, 0
        super().reset()


class GrowingCache(DynamicCache):
    """A DynamicCache of GrowingLayers (for LMs whose layers all attend to the full context)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


def new_kv_cache(lm_config) -> DynamicCache:
    """The KV cache for one conversation: GrowingCache where every layer is full attention,
    else transformers' DynamicCache built from the config (sliding windows, hybrids)."""
    text = lm_config.get_text_config(decoder=True) if hasattr(lm_config, "get_text_config") else lm_config
    types = getattr(text, "layer_types", None)
    full = (types is None or all(t == "full_attention" for t in types)) and not getattr(text, "sliding_window", None)
    return GrowingCache() if full else DynamicCache(config=lm_config)


def check_settings(settings: GenerationSettings) -> None:
    """Names the first impossible setting (ValueError)."""
    if settings.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {settings.max_new_tokens}")
    if settings.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {settings.temperature}")
    if not 0 < settings.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {settings.top_p}")
    if settings.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {settings.top_k}")
    if settings.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {settings.repetition_penalty}")
    if settings.no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {settings.no_repeat_ngram_size}")
    if settings.num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {settings.num_frames}")


class Sampler:
    """Next-token choice: banned tokens, repetition controls, then greedy (temperature 0) or
    sampling with temperature, top-k and top-p from a generator seeded by `settings.seed`
    (a fresh random seed when None). One Sampler per reply; not shared between threads.

    Repetition penalty (HF's rule: a seen token's logit is divided by the penalty, multiplied
    when negative) and no-repeat-ngram touch only the few token ids concerned, and greedy choice
    is a top-(k+1) over the raw logits: no per-token pass over the whole vocabulary on the CPU,
    where each such pass wakes every intra-op thread (costly on a shared or sandboxed machine).
    Sampling uses transformers' temperature / top-k / top-p warpers on the logits' device.
    """

    def __init__(self, settings: GenerationSettings, banned_ids: tuple[int, ...] = ()):
        check_settings(settings)
        self.greedy = settings.temperature == 0
        self.banned = sorted(set(banned_ids))
        self.penalty = float(settings.repetition_penalty)
        self.ngram = int(settings.no_repeat_ngram_size)
        self.warpers = LogitsProcessorList()
        if not self.greedy:
            if settings.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k > 0:
                self.warpers.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(settings.top_p))
        self.generator = torch.Generator()
        if settings.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(settings.seed))

    def ngram_bans(self, generated: list[int]) -> set[int]:
        """Tokens that would complete an n-gram already in `generated`."""
        n = self.ngram
        if n <= 0 or len(generated) < n:
            return set()
        prefix = generated[len(generated) - n + 1:]
        return {generated[i + n - 1] for i in range(len(generated) - n + 1) if generated[i : i + n - 1] == prefix}

    def adjustments(self, generated: list[int], scores: torch.Tensor) -> dict[int, float]:
        """{token id: its new logit} for the banned, penalised and n-gram-blocked tokens."""
        vocab = scores.shape[-1]
        adjusted: dict[int, float] = {}
        if self.penalty != 1.0 and generated:
            ids = sorted({t for t in generated if 0 <= t < vocab})
            values = scores[torch.tensor(ids, device=scores.device)].float().tolist()
            adjusted = {i: (v * self.penalty if v < 0 else v / self.penalty) for i, v in zip(ids, values)}
        for t in (*self.ngram_bans(generated), *self.banned):
            if 0 <= t < vocab:
                adjusted[t] = float("-inf")
        return adjusted

    def __call__(self, generated: list[int], logits: torch.Tensor) -> int:
        """generated: the reply's tokens so far; logits: (V,) or (1, V) for the next position."""
        scores = logits.reshape(-1)
        adjusted = self.adjustments(generated, scores)
        if self.greedy:
            values, ids = scores.float().topk(min(len(adjusted) + 1, scores.shape[-1]))
            candidates = [(v, i) for v, i in zip(values.tolist(), ids.tolist()) if i not in adjusted]
            candidates += [(v, i) for i, v in adjusted.items()]
            return max(candidates, key=lambda c: (c[0], -c[1]))[1]  # ties: the lowest id, as argmax
        s = scores.float()[None].clone()
        if adjusted:
            s[0, torch.tensor(list(adjusted), device=s.device)] = torch.tensor(list(adjusted.values()), device=s.device)
        s = self.warpers(torch.empty(1, 0, dtype=torch.long, device=s.device), s)
        probs = torch.softmax(s, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass
class DecodeResult:
    """Filled in while `decode` runs: the tokens yielded, and why it stopped."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_token: int | None = None


def decode(
    first_logits: torch.Tensor,
    step: Callable[[int], torch.Tensor],
    sampler: Sampler,
    stop_ids: dict[int, str],
    max_new_tokens: int,
    cancel: threading.Event | None = None,
    result: DecodeResult | None = None,
) -> Iterator[int]:
    """Yields generated token ids one by one.

    stop_ids maps a token to its finish reason ("eoc" or "eos"); the stop token itself is not
    yielded. The last token is never fed back (`step` runs only when another token follows), so
    a model's cache ends up holding the prompt and all yielded tokens but the last.
    `result` receives the tokens and the finish reason ("eoc", "eos", "length", "cancelled").
    """
    result = result if result is not None else DecodeResult()
    logits = first_logits
    for i in range(max_new_tokens):
        if cancel is not None and cancel.is_set():
            result.finish_reason = "cancelled"
            return
        token = sampler(result.tokens, logits)
        if token in stop_ids:
            result.finish_reason, result.stop_token = stop_ids[token], token
            return
        result.tokens.append(token)
        yield token
        if i + 1 < max_new_tokens:
            if cancel is not None and cancel.is_set():
                result.finish_reason = "cancelled"
                return
            logits = step(token)
    result.finish_reason = "length"


class IncrementalDetokenizer:
    """Token ids in, text deltas out, never splitting a multi-byte character.

    Decodes a short window of recent tokens and emits what it adds to the text already out;
    a window that ends in an incomplete UTF-8 sequence (U+FFFD) waits for the next token.
    The deltas concatenate to `tokenizer.decode(all_ids, skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: tokens before it are already out
        self.read_offset = 0  # tokens before it have been emitted

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._text(self.ids[self.prefix_offset : self.read_offset])
        now = self._text(self.ids[self.prefix_offset :])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return now[len(before):]
        return ""
