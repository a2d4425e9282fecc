"""GATED XATTN-DENSE: text tokens cross-attend to visual tokens, then a dense layer, each scaled
by tanh(alpha) with alpha initialised to 0, so a fresh block is the identity (paper, Fig. 4).

Which media a token sees travels as an argument (`media_index`), never as state on the module,
so one model instance can serve concurrent calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import CrossAttentionConfig
from .layers import FeedForward, merge_heads, split_heads

KV = tuple[torch.Tensor, torch.Tensor]
GATE_NAMES = ("attn_gate", "ff_gate")  # GatedCrossAttentionBlock's tanh gates


def block_key(layer: int) -> str:
    """The prefix of the saved weights (flamingo.safetensors) of the gated block before decoder
    layer `layer`."""
    return f"gated_blocks.{layer}."


@dataclass
class MediaContext:
    """Per-call cross-attention inputs; created for each forward (or each generated turn).

    visual:      (B, N, R, d_visual) resampled tokens of every media item of the sequence so far
    media_index: (B, L) for each input token, the index in N of the media it sees
                 (the last <image> at or before it); -1 before the first media
    kv:          keys/values of `visual` per gated block, filled on first use so a decoding
                 loop projects the media once per turn, not once per token

    What every gated block would otherwise work out again for each token (which media each row
    attends to, its keys/values, whether any token sees none) is derived once per context in
    `routing` and `row_kv`: a decoding turn reuses one context for all its tokens.
    """

    visual: torch.Tensor
    media_index: torch.Tensor
    only_last: bool = True
    kv: dict[int, KV] = field(default_factory=dict)
    _routing: "Routing | None" = field(default=None, repr=False)
    _row_kv: dict[int, KV] = field(default_factory=dict, repr=False)

    def with_index(self, media_index: torch.Tensor) -> "MediaContext":
        """The same media (and cached keys/values) for the next chunk of tokens."""
        return MediaContext(self.visual, media_index, self.only_last, self.kv)

    @property
    def num_latents(self) -> int:
        return self.visual.shape[-2]

    def routing(self) -> "Routing":
        if self._routing is None:
            self._routing = Routing.of(self.media_index, self.only_last)
        return self._routing

    def row_kv(self, block_id: int) -> KV:
        """Keys/values (B, heads, R, dh) of the one media each row attends to (routing().row_media)."""
        if block_id not in self._row_kv:
            k, v = self.kv[block_id]
            idx = self.routing().row_media.to(k.device)
            self._row_kv[block_id] = _gather_media(k, idx, self.num_latents), _gather_media(v, idx, self.num_latents)
        return self._row_kv[block_id]


@dataclass(frozen=True)
class Routing:
    """Which media the tokens of a chunk attend to.

    seen:      (B, L) the token has media before it
    all_seen:  every token has (nothing to zero out)
    row_media: (B,) when in only-last mode every token of a row sees the same media: its index
               (decoding, and most prompt chunks); None otherwise
    """

    seen: torch.Tensor
    all_seen: bool
    row_media: torch.Tensor | None

    @classmethod
    def of(cls, media_index: torch.Tensor, only_last: bool) -> "Routing":
        seen = media_index >= 0
        one = only_last and bool((media_index == media_index[:, :1]).all())
        return cls(seen, bool(seen.all()), media_index[:, 0].clamp(min=0) if one else None)


class MaskedCrossAttention(nn.Module):
    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def project_media(self, visual: torch.Tensor) -> KV:
        """(B, N, R, d_visual) -> keys and values, each (B, heads, N*R, dh)"""
        b, n, r, d = visual.shape
        k, v = self.to_kv(visual.reshape(b, n * r, d)).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def forward(self, x: torch.Tensor, media: MediaContext, block_id: int) -> torch.Tensor:
        """
        x:      (B, L, dim) text hidden states
        media:  its kv[block_id] (B, heads, N*R, dh) from `project_media`, and the routing
        returns (B, L, dim), exactly zero for tokens that see no media
        """
        q = split_heads(self.to_q(self.norm(x)), self.heads)  # (B, h, L, dh)
        route = media.routing()
        if route.row_media is not None:
            # every token of a row sees the same media: attend to its R tokens only, so the
            # cost stays flat in the number of media
            k, v = media.row_kv(block_id)
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            k, v = media.kv[block_id]
            r = media.num_latents
            key_media = torch.arange(k.shape[-2] // r, device=x.device).repeat_interleave(r)  # (N*R,)
            token_media = media.media_index.to(x.device)[:, :, None]
            allowed = (key_media == token_media) if media.only_last else (key_media <= token_media)
            allowed = allowed | ~route.seen.to(x.device)[:, :, None]  # keep softmax finite; zeroed below
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        out = self.to_out(merge_heads(out))
        return out if route.all_seen else out * route.seen.to(out.device)[..., None].to(out.dtype)


def _gather_media(t: torch.Tensor, idx: torch.Tensor, r: int) -> torch.Tensor:
    """(B, h, N*R, dh), idx (B,) -> (B, h, R, dh): the R keys (or values) of one media per row."""
    b, h, _, dh = t.shape
    t = t.view(b, h, -1, r, dh)
    return t[torch.arange(b, device=t.device), :, idx]


class GatedCrossAttentionBlock(nn.Module):
    """x = x + tanh(a_attn) * xattn(x, visual);  x = x + tanh(a_ff) * ffw(x)"""

    def __init__(self, dim: int, dim_visual: int, config: CrossAttentionConfig):
        super().__init__()
        self.config = config
        self.attn = MaskedCrossAttention(dim, dim_visual, config.heads, config.dim_head)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        # ff_mult 0 leaves the dense layer out: a GATED XATTN block only (see CrossAttentionConfig)
        self.ff = FeedForward(dim, config.ff_mult) if config.ff_mult > 0 else None
        self.ff_gate = nn.Parameter(torch.zeros(1)) if self.ff is not None else None

    def is_closed(self) -> bool:
        """True while both gates are zero: the block then leaves its input unchanged."""
        return not any(bool(g.any()) for g in (self.attn_gate, self.ff_gate) if g is not None)

    def project_into(self, media: MediaContext, block_id: int, like: torch.Tensor) -> None:
        """Fills media.kv[block_id] (and the per-row selection from it) once per context, on
        `like`'s device and dtype (moving is a no-op unless the LM is sharded over devices by
        accelerate's device_map)."""
        if block_id not in media.kv:
            media.kv[block_id] = self.attn.project_media(media.visual.to(device=like.device, dtype=like.dtype))
        if media.routing().row_media is not None:
            media.row_kv(block_id)

    def forward(self, x: torch.Tensor, media: MediaContext, block_id: int) -> torch.Tensor:
        """x: (B, L, dim) -> (B, L, dim)"""
        self.project_into(media, block_id, x)
        x = x + self.attn_gate.tanh() * self.attn(x, media, block_id)
        if self.ff is None:
            return x
        ff = self.ff(x)
        route = media.routing()
        if not self.config.dense_on_text_only and not route.all_seen:
            ff = ff * route.seen.to(ff.device)[..., None].to(ff.dtype)
        return x + self.ff_gate.tanh() * ff


def media_index_from_ids(input_ids: torch.Tensor, media_token_id: int, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """(B, L) token ids -> (B, L) index of the last media token at or before each position.

    `offset` (int or (B,)) counts media already seen in an earlier chunk (a KV-cached prefix).
    """
    count = (input_ids == media_token_id).cumsum(dim=-1)
    if isinstance(offset, torch.Tensor):
        offset = offset.to(count.device)[:, None]
    return count + offset - 1


def sample_next_media(media_index: torch.Tensor, num_media: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's p_next ablation: each text span (tokens sharing a media index) switches to
    the next media item with probability p, when there is one. num_media: (B,)."""
    if p <= 0:
        return media_index
    b = media_index.shape[0]
    n_max = int(num_media.max()) + 1
    flip = torch.rand(b, n_max + 1, generator=generator, device=media_index.device) < p  # one draw per span
    span = (media_index + 1).clamp(min=0)  # span id: 0 = before the first media
    moved = torch.where(flip.gather(1, span), media_index + 1, media_index)
    return torch.where(moved < num_media[:, None], moved, media_index)
