"""Builds a reference OpenFlamingo model (the `open_flamingo` package, 2.0.1) around modules we
give it: a causal LM, its tokenizer and one of our vision towers. Used by tests/test_openflamingo.py
and the benches, never by engine/.

It follows `open_flamingo.src.factory.create_model_and_transforms` step by step, minus
open_clip: the tokenizer gets `<|endofchunk|>` and `<image>` (and `<PAD>` when it has no pad
token), the LM is extended with `FlamingoLMMixin`, its embeddings are resized to
len(tokenizer), and `Flamingo` adds the Perceiver Resampler and the gated blocks.

open_flamingo 2.0.1 was written for transformers 4.28; `_patch_for_transformers5` holds the
small fixes it needs to run on transformers 5. They are applied to the imported classes, in
this process only.
"""
from __future__ import annotations

import copy
import sys
import types

import torch
from torch import nn


def import_open_flamingo():
    """The open_flamingo modules we use: (Flamingo, FlamingoLMMixin, extend_instance, factory).

    `import open_flamingo` imports its factory, which imports open_clip; we never use open_clip
    (vision towers are given), so a stub stands in for it when it is not installed."""
    if "open_clip" not in sys.modules:
        try:
            import open_clip  # noqa: F401
        except ImportError:
            stub = types.ModuleType("open_clip")

            def _missing(*_args, **_kwargs):
                raise RuntimeError("open_clip is not installed (a stub stands in for it in bench/_openflamingo.py)")

            stub.create_model_and_transforms = _missing
            stub.get_model_config = _missing
            sys.modules["open_clip"] = stub
    from open_flamingo.src import factory
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    _patch_for_transformers5(FlamingoLMMixin)
    return Flamingo, FlamingoLMMixin, extend_instance, factory


def _patch_for_transformers5(mixin) -> None:
    """FlamingoLMMixin.forward(input_ids, attention_mask, **kw) takes the mask as a required
    positional argument; transformers 5's generate() drops an all-ones mask (and may pass
    inputs_embeds-free calls without it), so the call fails. Give it a None default."""
    if getattr(mixin, "_patched_for_transformers5", False):
        return
    original = mixin.forward

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return original(self, input_ids, attention_mask, **kwargs)

    mixin.forward = forward
    mixin._patched_for_transformers5 = True


class _Visual(nn.Module):
    """OpenFlamingo calls `vision_encoder.visual(x)[1]` on (N, 3, H, W) pixels and expects
    (N, S, d) patch tokens (open_clip's `output_tokens=True`). Wraps one of our towers, which
    take pixels in [0, 1]: the same pixels go to both models."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, pixels: torch.Tensor):
        tokens = self.tower.encode(self.tower.normalize(pixels))
        return tokens.mean(1), tokens


class _VisionEncoder(nn.Module):
    """Stands in for an open_clip CLIP model, of which Flamingo keeps `.visual` only."""

    def __init__(self, tower):
        super().__init__()
        self.visual = _Visual(tower)


def openflamingo_tokenizer(tokenizer):
    """A copy of `tokenizer` with OpenFlamingo's tokens added, as its factory does."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<PAD>"})
    return tok


def build_openflamingo(
    lm: nn.Module,
    tokenizer,
    tower,
    cross_attn_every_n_layers: int = 1,
    only_attend_immediate_media: bool = True,
    decoder_layers_attr_name: str | None = None,
    gradient_checkpointing: bool = False,
    freeze_lm_embeddings: bool = False,
):
    """Returns (OpenFlamingo model, its tokenizer). `lm` is modified in place (mixin, resized
    embeddings, wrapped layers): give it a copy you do not use elsewhere. `tower` is shared."""
    Flamingo, FlamingoLMMixin, extend_instance, factory = import_open_flamingo()
    tok = openflamingo_tokenizer(tokenizer)
    extend_instance(lm, FlamingoLMMixin)
    if decoder_layers_attr_name is None:
        decoder_layers_attr_name = factory._infer_decoder_layers_attr_name(lm)
    lm.set_decoder_layers_attr_name(decoder_layers_attr_name)
    lm.resize_token_embeddings(len(tok))
    model = Flamingo(
        _VisionEncoder(tower),
        lm,
        tok.encode("<|endofchunk|>")[-1],
        tok.encode("<image>")[-1],
        vis_dim=tower.feature_dim,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        gradient_checkpointing=gradient_checkpointing,
    )
    for block in model.lang_encoder.gated_cross_attn_layers:
        if block is not None:
            block.attn.only_attend_immediate_media = only_attend_immediate_media
    # As the factory: everything frozen but the resampler, the gated blocks and (unless
    # freeze_lm_embeddings) the LM's input embeddings.
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    if not freeze_lm_embeddings:
        model.lang_encoder.get_input_embeddings().requires_grad_(True)
    return model, tok


def randomize_openflamingo(model, seed: int = 0) -> None:
    """Makes a fresh OpenFlamingo's added weights non-trivial, so a parity test means something:
    non-zero tanh gates, LayerNorms away from (1, 0), and distinct rows for the new tokens."""
    g = torch.Generator().manual_seed(seed)

    def rand_like(t, scale):
        return torch.randn(t.shape, generator=g, dtype=t.dtype) * scale

    with torch.no_grad():
        for block in model.lang_encoder.gated_cross_attn_layers:
            if block is None:
                continue
            for gate in (block.attn_gate, block.ff_gate):
                sign = 1.0 if float(torch.rand((), generator=g)) < 0.5 else -1.0
                gate.fill_(sign * (0.5 + float(torch.rand((), generator=g))))
        for module in list(model.perceiver.modules()) + list(model.lang_encoder.gated_cross_attn_layers.modules()):
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(rand_like(module.weight, 0.2))
                module.bias.add_(rand_like(module.bias, 0.2))
        ids = [model.media_token_id, model.eoc_token_id]
        emb = model.lang_encoder.get_input_embeddings().weight
        emb[ids] = rand_like(emb[ids], 0.5)
        out = model.lang_encoder.get_output_embeddings().weight
        if out.data_ptr() != emb.data_ptr():
            out[ids] = rand_like(out[ids], 0.5)
