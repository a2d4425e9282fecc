"""Small building blocks shared by the resampler and the gated cross-attention blocks."""
from __future__ import annotations

import torch
from torch import nn


class FeedForward(nn.Sequential):
    """Pre-norm MLP: LayerNorm -> Linear(d, d*mult) -> GELU -> Linear(d*mult, d), no biases."""

    def __init__(self, dim: int, mult: int = 4):
        inner = int(dim * mult)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),
            nn.GELU(),
            nn.Linear(inner, dim, bias=False),
        )


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, heads * dh) -> (..., heads, L, dh)"""
    *lead, length, width = x.shape
    return x.view(*lead, length, heads, width // heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, L, dh) -> (..., L, heads * dh)"""
    x = x.transpose(-3, -2)
    return x.reshape(*x.shape[:-2], -1)
