"""The Flamingo model: a frozen vision tower and a frozen causal LM, joined by a trainable
Perceiver Resampler and gated cross-attention blocks inserted before every n-th decoder layer.

The LM is composed, not altered: each chosen decoder layer is wrapped in a `FlamingoDecoderLayer`
that runs its gated block, then the original layer. The media for a call travel down the LM as
the keyword argument `flamingo_media` (a `MediaContext`), which transformers passes through to
every decoder layer; nothing per-request is stored on any module.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import CrossAttentionConfig, FlamingoConfig
from .cross_attention import GATE_NAMES, GatedCrossAttentionBlock, MediaContext, block_key, media_index_from_ids, sample_next_media
from .lm import find_decoder_layers, load_lm
from .resampler import PerceiverResampler
from .tokens import add_flamingo_tokens
from .vision import VisionTower, load_vision_tower

log = logging.getLogger(__name__)

NEW_BLOCK_INITS = ("random", "copy_nearest")

WEIGHTS_NAME = "flamingo.safetensors"
CONFIG_NAME = "flamingo_config.json"
WEIGHTS_METADATA = {"format": "flamingo-engine"}  # stored in every weights file this engine writes


class FlamingoDecoderLayer(nn.Module):
    """A frozen decoder layer, preceded by a gated cross-attention block when it has one."""

    def __init__(self, decoder_layer: nn.Module, gated_block: GatedCrossAttentionBlock | None, block_id: int):
        super().__init__()
        self.decoder_layer = decoder_layer
        self.gated_block = gated_block
        self.block_id = block_id
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, *args, flamingo_media: MediaContext | None = None, **kwargs):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            if self.gated_block is not None and flamingo_media is not None:
                # Project the media outside the checkpoint: the lazily filled MediaContext.kv
                # would otherwise hold them on recomputation, and the saved tensors would differ.
                self.gated_block.project_into(flamingo_media, self.block_id, hidden_states)
            return checkpoint(self._forward, hidden_states, *args, flamingo_media=flamingo_media, use_reentrant=False, **kwargs)
        return self._forward(hidden_states, *args, flamingo_media=flamingo_media, **kwargs)

    def _forward(self, hidden_states, *args, flamingo_media=None, **kwargs):
        if self.gated_block is not None and flamingo_media is not None:
            hidden_states = self.gated_block(hidden_states, flamingo_media, self.block_id)
        return self.decoder_layer(hidden_states, *args, **kwargs)

    def __getattr__(self, name: str):
        # Some LMs read attributes of their layers (e.g. `attention_type` for sliding windows).
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self._modules.get("decoder_layer")
            if inner is None:
                raise
            return getattr(inner, name)


@dataclass
class FlamingoOutput:
    logits: torch.Tensor | None  # (B, L, V) or (B, logits_to_keep, V)
    past_key_values: object | None = None
    loss: torch.Tensor | None = None


def gated_block_layers(cfg: CrossAttentionConfig, num_layers: int) -> list[int]:
    """The decoder layers (0-based, ascending) that get a gated block before them: `cfg.layers`
    when given, else every n-th (layers n-1, 2n-1, ...)."""
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if not isinstance(i, int) or not 0 <= i < num_layers]
        if bad or len(set(cfg.layers)) != len(cfg.layers):
            raise ValueError(f"cross_attention.layers must be distinct layer indices in [0, {num_layers}), got {cfg.layers}")
        return sorted(cfg.layers)
    n = cfg.every_n_layers
    if n < 1:
        raise ValueError(f"cross_attention.every_n_layers must be >= 1, got {n}")
    return [i for i in range(num_layers) if (i + 1) % n == 0]


class FlamingoModel(nn.Module):
    def __init__(self, config: FlamingoConfig, lm: nn.Module, tokenizer, vision: VisionTower):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.vision = vision.freeze()
        self.lm = lm.requires_grad_(False).eval()
        self.resampler = PerceiverResampler(config.resampler, vision.feature_dim)
        self.media_token_id, self.eoc_token_id = add_flamingo_tokens(tokenizer, config.media_token, config.eoc_token)
        self.new_token_ids = (self.media_token_id, self.eoc_token_id)
        self._init_new_token_embeddings()
        self.block_layer_ids = self._insert_gated_blocks()

    # ----- construction -------------------------------------------------------------------
    def _init_new_token_embeddings(self) -> None:
        """<image> and <EOC> get their own small embedding tables, so the LM's matrices stay
        untouched; initialised at the mean embedding. Tied LMs share one table for in and out."""
        emb = self.lm.get_input_embeddings().weight
        init = emb.detach().float().mean(0, keepdim=True).repeat(2, 1)
        self.new_token_embeddings = nn.Parameter(init.clone())
        self.tied = bool(getattr(self.lm.config, "tie_word_embeddings", False))
        head = self.lm.get_output_embeddings()
        out_init = head.weight.detach().float().mean(0, keepdim=True).repeat(2, 1)
        self.new_token_output = None if self.tied else nn.Parameter(out_init)
        for p in self._new_token_params():
            p.requires_grad_(self.config.train_new_token_embeddings)

    def _new_token_params(self) -> list[nn.Parameter]:
        return [p for p in (self.new_token_embeddings, self.new_token_output) if p is not None]

    def _insert_gated_blocks(self) -> list[int]:
        parent, attr, layers = find_decoder_layers(self.lm)
        at = gated_block_layers(self.config.cross_attention, len(layers))
        dim = self.lm.get_input_embeddings().embedding_dim
        wrapped = []
        for i, layer in enumerate(layers):
            block = GatedCrossAttentionBlock(dim, self.resampler.dim, self.config.cross_attention) if i in at else None
            wrapped.append(FlamingoDecoderLayer(layer, block, block_id=i))
        setattr(parent, attr, nn.ModuleList(wrapped))
        self._wrappers = wrapped  # a plain list: not registered twice
        return at

    @property
    def gated_blocks(self) -> dict[int, GatedCrossAttentionBlock]:
        return {w.block_id: w.gated_block for w in self._wrappers if w.gated_block is not None}

    def train(self, mode: bool = True) -> "FlamingoModel":
        super().train(mode)
        self.lm.eval()  # frozen parts keep inference behaviour (dropout off, BatchNorm fixed)
        self.vision.eval()
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for w in self._wrappers:
            w.gradient_checkpointing = enabled

    # ----- media ----------------------------------------------------------------------------
    def encode_media(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, T, 3, H, W) pixels in [0, 1] -> (B, N, R, d) visual tokens."""
        if pixels.dim() != 6:
            raise ValueError(f"encode_media expects pixels (B, N, T, 3, H, W), got shape {tuple(pixels.shape)}")
        b, n = pixels.shape[:2]
        features = self.vision(pixels.flatten(0, 1))  # (B*N, T, S, d_v)
        return self.resample(features.view(b, n, *features.shape[1:]))

    def resample(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, T, S, d_v) frozen features -> (B, N, R, d) visual tokens."""
        return self.resampler(features.to(self.resampler.latents.dtype))

    def media_context(self, visual: torch.Tensor, input_ids: torch.Tensor, media_offset: torch.Tensor | int = 0, p_next: float = 0.0) -> MediaContext:
        """Checks that the <image> markers match the media, and says which media each token sees."""
        if visual.dim() != 4:
            raise ValueError(f"visual tokens must be (B, N, R, d), got shape {tuple(visual.shape)}")
        if visual.shape[0] != input_ids.shape[0]:
            raise ValueError(f"batch size mismatch: {input_ids.shape[0]} sequences but visual tokens for {visual.shape[0]}")
        counts = (input_ids == self.media_token_id).sum(-1) + media_offset
        n = visual.shape[1]
        if int(counts.max()) != n:
            raise ValueError(
                f"media count mismatch: the text holds {counts.tolist()} {self.config.media_token} markers "
                f"(including {media_offset} earlier) but {n} media items were given"
            )
        index = media_index_from_ids(input_ids, self.media_token_id, media_offset)
        if p_next > 0:
            index = sample_next_media(index, counts, p_next)
        return MediaContext(visual, index, self.config.cross_attention.only_last_media)

    # ----- text -----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D), with the new tokens taken from their own table."""
        table = self.lm.get_input_embeddings()
        embeds = table(input_ids.clamp(max=table.num_embeddings - 1))
        for slot, token_id in enumerate(self.new_token_ids):
            new = self.new_token_embeddings[slot].to(device=embeds.device, dtype=embeds.dtype)
            embeds = torch.where((input_ids == token_id).to(embeds.device)[..., None], new, embeds)
        return embeds

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V) with V covering the new token ids."""
        logits = self.lm.get_output_embeddings()(hidden)
        out_table = self.new_token_embeddings if self.tied else self.new_token_output
        new = (hidden @ out_table.to(device=hidden.device, dtype=hidden.dtype).T).to(device=logits.device, dtype=logits.dtype)
        v = logits.shape[-1]
        if self.new_token_ids == (v, v + 1):  # the usual case: the new ids extend the vocabulary
            return torch.cat([logits, new], dim=-1)
        # ids inside the LM's (padded) vocabulary, or not adjacent: overwrite those columns
        vocab = max(v, max(self.new_token_ids) + 1)
        if vocab > v:
            logits = F.pad(logits, (0, vocab - v), value=float("-inf"))
        ids = torch.tensor(self.new_token_ids, device=logits.device)
        return logits.index_copy(-1, ids, new)

    def forward(
        self,
        input_ids: torch.Tensor,
        visual: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        media: MediaContext | None = None,
        media_offset: torch.Tensor | int = 0,
        past_key_values=None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        p_next: float = 0.0,
        loss_reduction: str = "mean",
    ) -> FlamingoOutput:
        """
        input_ids:      (B, L) with <image> markers, one per media item
        visual:         (B, N, R, d) visual tokens (from `encode_media`), or None for text only
        attention_mask: (B, L_past + L) 1 for real tokens, 0 for padding
        media:          a prepared MediaContext instead of `visual` (reuses projected media)
        media_offset:   media items already seen in `past_key_values` (an int or (B,))
        labels:         (B, L) next-token targets aligned with input_ids (-100 = ignore); the
                        loss is computed on those positions only
        logits_to_keep: >0 computes logits for the last k positions only (generation)
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        if media is None and visual is not None and visual.shape[1] > 0:
            media = self.media_context(visual, input_ids, media_offset, p_next if self.training else 0.0)
        elif media is None and bool((input_ids == self.media_token_id).any()):
            raise ValueError(f"the text holds {self.config.media_token} markers but no media were given")
        out = self.lm.base_model(
            inputs_embeds=self.embed(input_ids),
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            flamingo_media=media,
        )
        hidden = out.last_hidden_state
        if labels is not None:
            return FlamingoOutput(None, getattr(out, "past_key_values", None), self.loss(hidden, labels, loss_reduction))
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return FlamingoOutput(self.logits(hidden), getattr(out, "past_key_values", None))

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy on the labelled positions only (the LM head is the costliest
        layer of a small LM; most positions of a sequence carry no label). reduction: "mean",
        "sum", "none" (per labelled token) or "sequence" ((B,) sums per row)."""
        targets = labels[:, 1:]
        keep = targets != -100
        h = hidden[:, :-1][keep]
        logits = self.logits(h).float()
        if reduction == "sequence":  # (B,) summed over each row's labelled tokens
            per_token = F.cross_entropy(logits, targets[keep], reduction="none")
            rows = keep.nonzero()[:, 0]
            return torch.zeros(labels.shape[0], device=per_token.device).index_add_(0, rows, per_token)
        return F.cross_entropy(logits, targets[keep], reduction=reduction)

    # ----- parameters -----------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights this model adds to the frozen LM and tower, under stable names."""
        sd = {f"resampler.{k}": v for k, v in self.resampler.state_dict().items()}
        for layer_id, block in self.gated_blocks.items():
            sd.update({block_key(layer_id) + k: v for k, v in block.state_dict().items()})
        sd["new_token_embeddings"] = self.new_token_embeddings.data
        if self.new_token_output is not None:
            sd["new_token_output"] = self.new_token_output.data
        return sd

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor], allow_new_zeros: bool = False) -> list[int]:
        """allow_new_zeros: weights the model has and `sd` lacks may stay as initialised when they
        leave the model's function unchanged: all zero (such as spatial embeddings turned on for a
        trained model), or a whole gated block that `sd` lacks, whose tanh gates start at zero
        (more blocks for a trained model). Anything else missing is an error.
        Returns the decoder layers of such new blocks."""
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        new_layers = []
        if allow_new_zeros:
            new_layers = [i for i, block in self.gated_blocks.items()
                          if not any(k.startswith(block_key(i)) for k in sd) and block.is_closed()]
            new_prefixes = tuple(block_key(i) for i in new_layers)
            missing = [k for k in missing if bool(own[k].any()) and not k.startswith(new_prefixes)]
        if missing or unexpected:
            raise ValueError(f"weights do not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, v in sd.items():
                if own[k].shape != v.shape:
                    raise ValueError(f"shape mismatch for {k}: model {tuple(own[k].shape)}, weights {tuple(v.shape)}")
                own[k].copy_(v)
        return new_layers

    def copy_gated_block(self, source: int, target: int) -> None:
        """Gives the closed block before decoder layer `target` the weights of the block before
        layer `source`, gates excepted: it stays closed, so the model's function is unchanged."""
        block = self.gated_blocks[target]
        if not block.is_closed():
            raise ValueError(f"the gated block before layer {target} is open; only a closed block may be overwritten")
        weights = {k: v for k, v in self.gated_blocks[source].state_dict().items() if not k.endswith(GATE_NAMES)}
        result = block.load_state_dict(weights, strict=False)
        assert not result.unexpected_keys and all(k.endswith(GATE_NAMES) for k in result.missing_keys), result

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable}

    # ----- save / load ----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Writes the config (with references to the frozen LM and tower) and the added weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        sd = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        save_file(sd, directory / WEIGHTS_NAME, metadata=WEIGHTS_METADATA)

    @classmethod
    def from_config(cls, config: FlamingoConfig, dtype: torch.dtype = torch.float32) -> "FlamingoModel":
        lm, tokenizer = load_lm(config.lm, dtype)
        vision = load_vision_tower(config.vision)
        return cls(config, lm, tokenizer, vision)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32,
                        overrides: dict | None = None, new_block_init: str = "random") -> "FlamingoModel":
        """overrides: config fields to change before loading (FlamingoConfig.with_overrides); the
        saved weights must still fit, except new weights that start at zero. Gated blocks the
        overrides add start closed, with random weights or (new_block_init "copy_nearest") those
        of the nearest saved block, the earlier one on a tie."""
        if new_block_init not in NEW_BLOCK_INITS:
            raise ValueError(f"new_block_init must be one of {', '.join(NEW_BLOCK_INITS)}, got {new_block_init!r}")
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"{directory} is not a saved Flamingo model (no {CONFIG_NAME})")
        config = FlamingoConfig.load(directory / CONFIG_NAME)
        if overrides:
            config = config.with_overrides(overrides)
        model = cls.from_config(config, dtype)
        sd = load_file(directory / WEIGHTS_NAME)
        new_layers = model.load_trainable_state_dict({k: v.float() for k, v in sd.items()}, allow_new_zeros=bool(overrides))
        trained = [i for i in model.gated_blocks if i not in new_layers]
        if new_block_init == "copy_nearest" and new_layers and trained:
            for layer in new_layers:
                model.copy_gated_block(min(trained, key=lambda t: (abs(t - layer), t)), layer)
        if new_layers:
            log.info("new closed gated blocks before layers %s (%s weights)", new_layers, new_block_init)
        return model
