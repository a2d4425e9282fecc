"""Flamingo engine: a frozen vision tower and a frozen causal LM joined by a Perceiver
Resampler and gated cross-attention blocks (Alayrac et al., 2022)."""
