"""Perceiver Resampler: a media item of any number of frames -> a fixed number of visual tokens.

Follows the paper's pseudo-code (Alayrac et al., 2022, Fig. 5):

    x_f = x_f + time_embeddings          # [T, S, d]
    x_f = flatten(x_f)                   # [T * S, d]
    for each layer:
        x = x + attention(q=x, kv=concat([x_f, x]))
        x = x + ffw(x)

Each media item (an image, T = 1, or a video's T frames) is resampled on its own. With
`spatial_positions` set, learned spatial embeddings are added beside the time embeddings
(x_f = x_f + time_embeddings + spatial_embeddings), for towers whose features carry no position.
With `global_features`, a projection of the item's mean feature is added to every output token,
so what the latents do not attend to (a picture's background) can still reach the LM. With
`grid_tokens` g, g x g region tokens (the item's frame features pooled to a g x g grid, plus learned
region embeddings) follow the latents, so where things are reaches the LM beside what they are.
With `region_latents` g, g x g more latents follow, each attending only to its region of the grid.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ResamplerConfig
from .layers import FeedForward, merge_heads, split_heads


def square_side(s: int, option: str) -> int:
    """The side of a square grid of `s` spatial tokens; ValueError naming `option` if not square."""
    side = math.isqrt(s)
    if side * side != s:
        raise ValueError(f"{option} needs a square grid of spatial tokens per frame, the vision tower gave {s}")
    return side


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media features, latents)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        media:   (B, M, T*S, d) flattened frame features
        latents: (B, M, R, d)
        mask:    optional (R, T*S + R) bool, True where a latent may attend
        returns  (B, M, R, d) the attention update for the latents
        """
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = split_heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat([media, latents], dim=-2)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q, split_heads(k, self.heads), split_heads(v, self.heads), attn_mask=mask)
        return self.to_out(merge_heads(out))


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.attn = PerceiverAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        latents = latents + self.attn(media, latents, mask)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """(B, M, T, S, d_vision) frame features -> (B, M, R, dim) visual tokens.

    B: batch, M: media items per sample, T: frames per item, S: spatial tokens per frame,
    R: learned latents. With `config.dim` set, features are first projected to that width.
    """

    def __init__(self, config: ResamplerConfig, vision_dim: int):
        super().__init__()
        dim = config.dim or vision_dim
        self.config = config
        self.dim = dim
        if config.standardize_features:
            # Per-channel statistics of the frozen features; `set_feature_stats` fills them in.
            self.register_buffer("feature_mean", torch.zeros(vision_dim))
            self.register_buffer("feature_std", torch.ones(vision_dim))
        self.proj = nn.Linear(vision_dim, dim) if dim != vision_dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(config.num_latents, dim) * 0.02)
        self.time_embeddings = nn.Parameter(torch.randn(config.max_frames, 1, dim) * 0.02)
        if config.spatial_positions:
            self.spatial_embeddings = nn.Parameter(torch.zeros(config.spatial_positions, dim))
        if config.global_features:
            self.global_proj = nn.Linear(dim, dim)
            nn.init.zeros_(self.global_proj.weight)
            nn.init.zeros_(self.global_proj.bias)
        if config.grid_tokens:
            self.region_embeddings = nn.Parameter(torch.zeros(config.grid_tokens ** 2, dim))
        if config.region_latents:
            self.region_queries = nn.Parameter(torch.zeros(config.region_latents ** 2, dim))
            self.region_latent_embeddings = nn.Parameter(torch.zeros(config.region_latents ** 2, dim))
        self.layers = nn.ModuleList(
            ResamplerLayer(dim, config.heads, config.dim_head, config.ff_mult) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim)

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor, eps: float = 1e-3) -> None:
        """(..., d_vision) frozen features of training media -> the per-channel mean and std
        used by `standardize_features`."""
        if not self.config.standardize_features:
            raise ValueError("set_feature_stats needs resampler.standardize_features: true")
        x = features.reshape(-1, features.shape[-1]).float()
        self.feature_mean.copy_(x.mean(0))
        self.feature_std.copy_(x.std(0) + eps)

    def has_feature_stats(self) -> bool:
        """Whether the standardisation statistics were set (not the zero/one placeholders)."""
        return self.config.standardize_features and bool((self.feature_mean != 0).any() or (self.feature_std != 1).any())

    def region_tokens(self, x_f: torch.Tensor) -> torch.Tensor:
        """(B, M, T, S, dim) projected frame features, S a square -> (B, M, g*g, dim) region tokens:
        the mean over frames, average-pooled to a g x g grid (rows from the top), plus the region
        embeddings."""
        b, m, _, s, dim = x_f.shape
        side, g = square_side(s, "grid_tokens"), self.config.grid_tokens
        grid = x_f.mean(dim=2).reshape(b * m, side, side, dim).permute(0, 3, 1, 2)  # (B*M, dim, side, side)
        pooled = F.adaptive_avg_pool2d(grid, g).flatten(2).transpose(1, 2)  # (B*M, g*g, dim)
        return pooled.reshape(b, m, g * g, dim) + self.region_embeddings

    def region_mask(self, t: int, s: int, device) -> torch.Tensor:
        """(g*g, T*S + g*g) bool: region latent i may attend to the cells of region i of every
        frame (rows from the top; region (r, c) holds cells with row * g // side == r and
        col * g // side == c) and to itself."""
        side, g = square_side(s, "region_latents"), self.config.region_latents
        cell = torch.arange(s, device=device)
        region = (cell // side * g // side) * g + (cell % side * g // side)  # (S,) region of each cell
        own = region.repeat(t)[None, :] == torch.arange(g * g, device=device)[:, None]  # (g*g, T*S)
        return torch.cat([own, torch.eye(g * g, dtype=torch.bool, device=device)], dim=1)

    def region_latent_tokens(self, x_f: torch.Tensor, t: int, s: int) -> torch.Tensor:
        """(B, M, T*S, dim) flattened frame features -> (B, M, g*g, dim) region latents."""
        b, m = x_f.shape[:2]
        mask = self.region_mask(t, s, x_f.device)
        latents = self.region_queries.expand(b, m, -1, -1)
        for layer in self.layers:
            latents = layer(x_f, latents, mask)
        return self.norm(latents) + self.region_latent_embeddings

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, M, T, S, d_vision) -> (B, M, R, dim), R = num_latents (+ grid_tokens ** 2) (+ region_latents ** 2)."""
        if features.dim() != 5:
            raise ValueError(f"resampler expects features (B, M, T, S, d), got shape {tuple(features.shape)}")
        b, m, t, s, _ = features.shape
        if t > self.config.max_frames:
            raise ValueError(f"{t} frames exceed the resampler's max_frames={self.config.max_frames}")
        if self.config.spatial_positions and s != self.config.spatial_positions:
            raise ValueError(f"the resampler has spatial embeddings for {self.config.spatial_positions} tokens per frame, "
                             f"the vision tower gave {s} (was vision.image_size changed?)")
        if self.config.standardize_features:
            features = (features - self.feature_mean) / self.feature_std
        x_f = self.proj(features) + self.time_embeddings[:t]  # (B, M, T, S, dim)
        if self.config.spatial_positions:
            x_f = x_f + self.spatial_embeddings  # (S, dim) broadcast over B, M, T
        regions = self.region_tokens(x_f) if self.config.grid_tokens else None
        x_f = x_f.reshape(b, m, t * s, self.dim)
        latents = self.latents.expand(b, m, -1, -1)
        for layer in self.layers:
            latents = layer(x_f, latents)
        out = self.norm(latents)  # (B, M, R, dim)
        if self.config.global_features:
            out = out + self.global_proj(x_f.mean(dim=-2)).unsqueeze(-2)  # (B, M, 1, dim) to every token
        if regions is not None:
            out = torch.cat([out, self.norm(regions)], dim=-2)  # (B, M, R + g*g, dim)
        if self.config.region_latents:
            out = torch.cat([out, self.region_latent_tokens(x_f, t, s)], dim=-2)
        return out
