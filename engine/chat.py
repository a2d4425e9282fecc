"""ChatEngine: conversations in, streamed replies out, with every reusable result cached.

One engine serves every session of the app from one model; it is thread-safe. Per turn:

1. the conversation is rendered to tokens (engine.prompt), dropping the oldest turns when it does
   not fit the LM's context together with `max_new_tokens`;
2. its media are encoded through a content-hash LRU of resampled visual tokens
   (engine.media_cache): a picture already seen costs nothing. Bad media raise
   `engine.media.MediaError` here, before any text;
3. the LM's KV cache of the session's previous turn is reused: the longest common token prefix
   with the cached sequence (cut before the first media item that changed) is kept, the cache is
   cropped to it, and only the rest of the prompt runs, with `media_offset` = the media items in
   the kept prefix;
4. the gated blocks project the media they need once for the turn (MediaContext.kv), then the
   decode loop (engine.generation) feeds one token at a time with `logits_to_keep=1`.

Only the media a chunk of tokens can see are handed to the cross-attention (with the paper's
"only the last media" rule, the last media of the prefix and the new ones), so a turn's cost does
not grow with the number of pictures earlier in the conversation.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from .config import FlamingoConfig
from .conversation import Conversation, GenerationSettings
from .cross_attention import MediaContext, media_index_from_ids
from .device import Placement, resolve
from .generation import DecodeResult, IncrementalDetokenizer, Sampler, check_settings, decode, new_kv_cache
from .media_cache import MediaEncoder, MediaItem
from .model import CONFIG_NAME, FlamingoModel
from .prompt import ChatFormat, RenderedPrompt, render_conversation

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "model"


# ----- loading ----------------------------------------------------------------------------------
def load_model(spec: str = "default", dtype: torch.dtype = torch.float32) -> tuple[FlamingoModel, str]:
    """(model, a name for it) from "default", "tiny", a saved model folder or a Hugging Face id."""
    if spec == "tiny":
        from .testing import tiny_model

        return tiny_model(), "tiny (random weights, for tests)"
    if spec == "default":
        if (DEFAULT_MODEL_DIR / CONFIG_NAME).is_file():
            return FlamingoModel.from_pretrained(DEFAULT_MODEL_DIR, dtype), "default (assets/model)"
        log.warning(
            "the built-in model is not in %s yet: using an UNTRAINED Flamingo around SmolLM2-135M-Instruct "
            "and EfficientNet-Lite0 (its replies ignore the pictures)", DEFAULT_MODEL_DIR,
        )
        return FlamingoModel.from_config(FlamingoConfig(), dtype), "untrained (SmolLM2-135M + EfficientNet-Lite0)"
    path = Path(spec).expanduser()
    if path.exists():
        return FlamingoModel.from_pretrained(path, dtype), str(path)
    if "/" not in spec or spec.startswith((".", "/", "~")):
        raise ValueError(f"model {spec!r}: no such folder; use default, tiny, a saved model folder or a Hugging Face id")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec)
    except Exception as e:
        raise ValueError(f"model {spec!r} is neither a local folder nor a downloadable Hugging Face repository ({type(e).__name__}: {e})") from e
    return FlamingoModel.from_pretrained(local, dtype), spec


def _context_length(model: FlamingoModel) -> int:
    cfg = model.lm.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _is_sharded(model: FlamingoModel) -> bool:
    return bool(getattr(model.lm, "hf_device_map", None))


# ----- sessions ---------------------------------------------------------------------------------
@dataclass
class _SessionCache:
    """What the LM's KV cache of one session holds: these token ids, with these media."""

    ids: list[int]
    media_keys: list[tuple]
    cache: DynamicCache


class ChatEngine:
    def __init__(
        self,
        model: FlamingoModel,
        placement: Placement | None = None,
        cache_size: int = 256,
        *,
        max_sessions: int = 8,
        max_cached_tokens: int = 32768,
        prefix_cache: bool = True,
        name: str | None = None,
    ):
        """cache_size: media items kept as visual tokens (0: none); max_sessions: conversations
        whose KV cache is kept, at most max_cached_tokens tokens in all (least recently used go
        first); prefix_cache=False re-runs the whole prompt every turn."""
        self.model = model
        self.placement = placement or Placement(next(model.lm.parameters()).device, next(model.lm.parameters()).dtype)
        self._place_model()
        model.eval()
        cfg = model.config
        self.name = name or f"{cfg.lm} + {cfg.vision.name}"
        self.format = ChatFormat(model.tokenizer, cfg.media_token, cfg.eoc_token)
        self.media = MediaEncoder(model, self.placement, cache_size)
        self.prefix_cache = prefix_cache and max_sessions > 0
        self.max_sessions = max_sessions
        self.max_cached_tokens = max_cached_tokens
        self.context_length = _context_length(model)
        self.stop_ids = self._stop_ids()
        self.banned_ids = (model.media_token_id,)
        self._sessions: OrderedDict[str, _SessionCache] = OrderedDict()
        self._lock = threading.Lock()
        self._no_media = torch.zeros(1, 1, cfg.resampler.num_tokens, model.resampler.dim, device=self.placement.device, dtype=model.resampler.latents.dtype)

    @classmethod
    def load(cls, model: str = "default", device: str = "auto", *, max_memory: dict | None = None, **kwargs) -> "ChatEngine":
        """model: "default" (assets/model), "tiny", a saved model folder or a Hugging Face id.
        device: auto (CUDA with bf16 when available, else CPU fp32), cpu or cuda.
        max_memory: e.g. {0: "10GiB", "cpu": "30GiB"} shards the LM with accelerate (engine.sharding)."""
        placement = resolve(device)
        flamingo, name = load_model(model, placement.dtype)
        if max_memory:
            from .sharding import shard_lm

            shard_lm(flamingo, max_memory, placement)
        return cls(flamingo, placement, name=name, **kwargs)

    def _place_model(self) -> None:
        dev, dtype = self.placement.device, self.placement.dtype
        if not _is_sharded(self.model):
            self.model.to(device=dev, dtype=dtype)
            return
        # accelerate placed the LM (with its gated blocks); the rest goes to the main device.
        self.model.vision.to(device=dev, dtype=dtype)
        self.model.resampler.to(device=dev, dtype=dtype)
        for p in self.model._new_token_params():
            p.data = p.data.to(device=dev, dtype=dtype)

    def _stop_ids(self) -> dict[int, str]:
        tok = self.model.tokenizer
        stops: dict[int, str] = {}
        gen_eos = getattr(getattr(self.model.lm, "generation_config", None), "eos_token_id", None)
        for eos in [tok.eos_token_id, self.format.end_of_turn_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]:
            if eos is not None:
                stops[int(eos)] = "eos"
        stops[self.model.eoc_token_id] = "eoc"
        return stops

    # ----- public API -------------------------------------------------------------------------
    def describe(self) -> dict:
        counts = self.model.parameter_counts()
        device = str(self.placement.device)
        if _is_sharded(self.model):
            devices = sorted({str(d) for d in self.model.lm.hf_device_map.values()})
            device = f"{device} (LM sharded over {', '.join(devices)})"
        return {
            "model": self.name,
            "device": device,
            "dtype": str(self.placement.dtype).removeprefix("torch."),
            "frozen_params": counts["frozen"],
            "trainable_params": counts["trainable"],
        }

    def stream(
        self,
        conversation: Conversation,
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
        session_id: str | None = None,
        *,
        stop: bool = True,
    ) -> "ChatStream":
        """Starts a reply to the conversation's last (user) turn; iterate for text deltas.

        Decodes and encodes the media now (a bad file raises MediaError before any text); the
        model runs as the stream is iterated. `stop=False` ignores stop tokens (benchmarks)."""
        started = (time.perf_counter(), time.process_time())
        check_settings(settings)
        max_new = settings.max_new_tokens
        if max_new > self.context_length // 2:
            max_new = max(1, self.context_length // 2)
            log.warning("max_new_tokens %d does not fit the context of %d tokens; using %d", settings.max_new_tokens, self.context_length, max_new)
        prompt = render_conversation(conversation, self.format, self.model.media_token_id, self.context_length - max_new)
        items = [self.media.encode(path, settings.num_frames) for path in prompt.media]
        return ChatStream(self, prompt, items, settings, max_new, cancel, session_id, stop, started)

    def reply(self, conversation: Conversation, settings: GenerationSettings | None = None, **kwargs) -> str:
        return "".join(self.stream(conversation, settings or GenerationSettings(), **kwargs))

    def embed_media(self, path) -> torch.Tensor:
        """(d,) mean-pooled frozen vision features of an image or video (cached by content hash)."""
        return self.media.embedding(path)

    def forget(self, session_id: str) -> None:
        """Drops a session's KV cache (e.g. when the conversation is deleted)."""
        with self._lock:
            self._sessions.pop(session_id, None)

    # ----- sessions ---------------------------------------------------------------------------
    def _claim(self, session_id: str | None) -> _SessionCache | None:
        """Takes the session's cache out of the table: one stream uses it at a time."""
        if session_id is None or not self.prefix_cache:
            return None
        with self._lock:
            return self._sessions.pop(session_id, None)

    def _keep(self, session_id: str | None, state: _SessionCache) -> None:
        if session_id is None or not self.prefix_cache:
            return
        with self._lock:
            self._sessions[session_id] = state
            self._sessions.move_to_end(session_id)
            total = sum(len(s.ids) for s in self._sessions.values())
            while len(self._sessions) > 1 and (len(self._sessions) > self.max_sessions or total > self.max_cached_tokens):
                _, evicted = self._sessions.popitem(last=False)
                total -= len(evicted.ids)

    def _reusable(self, state: _SessionCache, ids: list[int], keys: list[tuple]) -> int:
        """Length of the cached prefix valid for `ids`: equal tokens, and equal media behind
        every marker; at least one token is left to run (for the next-token logits)."""
        n = min(len(state.ids), len(ids) - 1)
        p = 0
        while p < n and state.ids[p] == ids[p]:
            p += 1
        marker, m = self.model.media_token_id, 0
        for i in range(p):
            if ids[i] == marker:
                if m >= len(state.media_keys) or state.media_keys[m] != keys[m]:
                    return i
                m += 1
        return p

    # ----- model calls --------------------------------------------------------------------------
    def media_context(self, items: list[MediaItem], ids: torch.Tensor, offset: int) -> tuple[MediaContext, int]:
        """The cross-attention inputs for a chunk of tokens after `offset` earlier media.

        Returns the context and `lo`, the first media item it holds: with "only the last media"
        a chunk sees media lo.. only, so earlier ones are left out. A conversation without media
        gets one all-zero item nobody sees, so every chunk runs the gated blocks the same way."""
        index = media_index_from_ids(ids, self.model.media_token_id, offset)  # (1, L)
        only_last = self.model.config.cross_attention.only_last_media
        lo = max(int(index.min()), 0) if (only_last and items) else 0
        if items:
            visual = torch.stack([item.visual for item in items[lo:]])[None]
        else:
            visual = self._no_media
        local = torch.where(index >= 0, index - lo, torch.full_like(index, -1))
        return MediaContext(visual, local, only_last), lo

    def forward(self, ids: list[int], media: MediaContext, cache: DynamicCache) -> torch.Tensor:
        """Runs a chunk of tokens through the model, extending `cache`; (V,) next-token logits."""
        x = torch.tensor([ids], dtype=torch.long, device=self.placement.device)
        with torch.inference_mode():
            out = self.model(x, media=media, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]


class ChatStream:
    """An iterator of text deltas for one reply. After (or during) iteration:
    `finish_reason` ("eoc", "eos", "length", "cancelled"; None while running), `dropped_turns`
    (oldest turns left out to fit the context), `text` (the reply so far), `tokens` and `stats`."""

    def __init__(self, engine: ChatEngine, prompt: RenderedPrompt, items: list[MediaItem], settings: GenerationSettings,
                 max_new_tokens: int, cancel, session_id, stop: bool, started: float):
        self.engine = engine
        self.prompt = prompt
        self.items = items
        self.settings = settings
        self.max_new_tokens = max_new_tokens
        self.cancel = cancel
        self.session_id = session_id
        self.stop = stop
        self.dropped_turns = prompt.dropped_turns
        self.dropped_examples = prompt.dropped_examples
        self.finish_reason: str | None = None
        self.text = ""
        self.result = DecodeResult()
        # Timestamps: time.perf_counter() seconds, and *_cpu = time.process_time() (the process's
        # CPU seconds, all threads) for benchmarks on shared machines.
        self.stats = {"prompt_tokens": len(prompt.ids), "media": len(items), "started": started[0], "started_cpu": started[1]}
        self._gen = self._run()

    @property
    def tokens(self) -> list[int]:
        return self.result.tokens

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        """Stops generating (the session keeps its cache)."""
        self._gen.close()
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def _run(self):
        engine, ids = self.engine, self.prompt.ids
        keys = [item.key for item in self.items]
        state = engine._claim(self.session_id)
        reuse = 0
        if state is not None:
            reuse = engine._reusable(state, ids, keys)
            crop = reuse - state.cache.get_seq_length()
            if reuse == 0 or (crop < 0 and not getattr(state.cache, "is_croppable", True)):
                state, reuse = None, 0
            elif crop < 0:
                state.cache.crop(crop)
        cache = state.cache if state is not None else new_kv_cache(engine.model.lm.config)
        fed = list(ids[:reuse])
        offset = sum(1 for t in fed if t == engine.model.media_token_id)
        self.stats.update(reused_tokens=reuse, new_tokens=len(ids) - reuse)
        healthy = False
        try:
            chunk = torch.tensor([ids[reuse:]], device=engine.placement.device)
            media, lo = engine.media_context(self.items, chunk, offset)
            if self.cancel is not None and self.cancel.is_set():
                self.finish_reason = "cancelled"
                healthy = True  # nothing ran: the cropped cache still matches `fed`
                return
            logits = engine.forward(ids[reuse:], media, cache)
            fed = list(ids)
            self.stats.update(prefill_done=time.perf_counter(), prefill_done_cpu=time.process_time())
            last = len(self.items) - 1 - lo if self.items else -1
            decode_media = media.with_index(torch.full((1, 1), last, dtype=torch.long, device=media.media_index.device))

            def step(token: int) -> torch.Tensor:
                out = engine.forward([token], decode_media, cache)
                fed.append(token)
                return out

            sampler = Sampler(self.settings, engine.banned_ids)
            stops = engine.stop_ids if self.stop else {}
            detok = IncrementalDetokenizer(engine.model.tokenizer)
            healthy = True
            for token in decode(logits, self._guard(step), sampler, stops, self.max_new_tokens, self.cancel, self.result):
                if "first_token" not in self.stats:
                    self.stats.update(first_token=time.perf_counter(), first_token_cpu=time.process_time())
                delta = detok.push(token)
                if delta:
                    self.text += delta
                    yield delta
            delta = detok.flush()
            if delta:
                self.text += delta
                yield delta
            self.finish_reason = self.result.finish_reason
        finally:
            self.stats.update(generated_tokens=len(self.result.tokens), finished=time.perf_counter(), finished_cpu=time.process_time())
            if self.finish_reason is None and healthy:
                self.finish_reason = "cancelled"
            if healthy and self._healthy:
                engine._keep(self.session_id, _SessionCache(fed, keys, cache))

    _healthy = True

    def _guard(self, step):
        """A step that fails half-way leaves the cache unknown: it is then not kept."""

        def guarded(token: int) -> torch.Tensor:
            self._healthy = False
            out = step(token)
            self._healthy = True
            return out

        return guarded
