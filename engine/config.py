"""Typed configuration of a Flamingo model, loaded and saved in one place."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class VisionConfig:
    # "efficientnet-lite0" (offline default), "tiny" (random, for tests) or a Hugging Face
    # vision model id / local path (CLIPVisionModel, SiglipVisionModel, ...).
    name: str = "efficientnet-lite0"
    image_size: int = 224
    # A state dict (safetensors) replacing the tower's weights, e.g. the
    # run_dir/tower/vision.safetensors of a contrastive run (mode: contrastive).
    weights: str | None = None


@dataclass
class ResamplerConfig:
    dim: int | None = None  # working width; None keeps the vision feature width (OpenFlamingo)
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    num_latents: int = 64
    ff_mult: int = 4
    max_frames: int = 8  # learned time embeddings; longer videos are sampled down to this
    # Standardise each feature channel with fixed statistics of the training media (set by
    # `engine train`, saved with the weights) before the projection. Raw tower features share a
    # large common component (pooled cosine between different images ~0.34; ~0 once
    # standardised), which lets the resampler settle on an image-blind output.
    standardize_features: bool = False
    # Learned embeddings for the S spatial tokens of a frame (0: none, as in the paper). A ViT
    # tower's patch features carry their position already; a convolutional tower's (EfficientNet:
    # 7 x 7 = 49) do not: a token looks the same wherever in the frame it is, and attention over
    # the frame's tokens is blind to their order, so "left of", "moves right" and "moves left" are
    # unreadable. Zero at initialisation, so turning them on for a trained model changes nothing
    # until they are trained (`engine train` with init_from + model_overrides).
    spatial_positions: int = 0
    # Add a projection of the media item's mean feature (over frames and spatial tokens) to every
    # visual token. The latents need not attend to everything: the stage-2 built-in model's visual
    # tokens hold almost no linearly readable background colour (17% over 10 colours, majority
    # 13%) while the tower's mean features do (50%; `python -m engine.eval.probe`). Zero at
    # initialisation, like spatial_positions.
    global_features: bool = False
    # g > 0 adds g x g region tokens after the latents: the frame features (projected, with their
    # time and spatial embeddings) averaged over frames and pooled to a g x g grid, plus learned
    # region embeddings (zero at the start), through the output norm. The latents summarise what
    # is there; a region token keeps what is where, for the LM to read without a latent having to
    # bind the two (item 28 of assets/model/README.md). Turning it on for a trained model changes
    # its output (the blocks' attention is shared with the new tokens) until it is trained.
    grid_tokens: int = 0
    # g > 0 adds g x g region latents after the latents (and any grid tokens): each attends, through
    # the resampler's own layers and weights, to its own region of the frame grid only (over all
    # frames), so it summarises what is there as the latents summarise the whole picture, in the
    # form the gated blocks already read; learned region embeddings, added after the output norm,
    # tell the regions apart. Both start at zero; the latents' own output is unchanged.
    region_latents: int = 0

    @property
    def num_tokens(self) -> int:
        """Visual tokens per media item: the latents, then the grid tokens, then the region latents."""
        return self.num_latents + self.grid_tokens ** 2 + self.region_latents ** 2


@dataclass
class CrossAttentionConfig:
    every_n_layers: int = 4  # a gated block before decoder layers n-1, 2n-1, ... (as OpenFlamingo)
    # Explicit 0-based decoder layers with a gated block before them, in place of every_n_layers:
    # lets a trained model take more blocks (with init_from + model_overrides, the new ones start
    # closed, so the model's function is unchanged until they are trained).
    layers: list[int] | None = None
    heads: int = 8
    dim_head: int = 64
    # Width of the gated dense layer; 0 leaves it out. Without a contrast term the dense layer
    # learns the text's own statistics first (an image-blind shortcut); with the image-contrast
    # hinge it helped (configs/default_model.yaml has the measurements).
    ff_mult: int = 4
    only_last_media: bool = True  # the paper's default: a token sees only the last media before it
    # The paper applies the gated dense layer to every token. False skips it for tokens that
    # have seen no media yet, so text-only input is answered exactly by the frozen LM.
    dense_on_text_only: bool = True
    p_next: float = 0.0  # training ablation: attend to the next media with this probability


@dataclass
class FlamingoConfig:
    lm: str = "smollm2"  # "smollm2" (built-in GGUF), an HF id, a local path or a .gguf file
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    train_new_token_embeddings: bool = True  # <image> and <EOC> embeddings are trainable
    media_token: str = "<image>"
    eoc_token: str = "<EOC>"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlamingoConfig":
        return _build(cls, d)

    def with_overrides(self, overrides: dict[str, Any]) -> "FlamingoConfig":
        """A copy with the given (nested) fields replaced, e.g. {"resampler": {"spatial_positions": 49}}."""
        merged = self.to_dict()
        for key, value in overrides.items():
            if key in _NESTED and isinstance(value, dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return FlamingoConfig.from_dict(merged)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "FlamingoConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


_NESTED = {"vision": VisionConfig, "resampler": ResamplerConfig, "cross_attention": CrossAttentionConfig}


def _build(cls, d: dict[str, Any]):
    """Build a dataclass from a dict, naming unknown keys instead of ignoring them."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(known)}")
    kwargs = {k: (_build(_NESTED[k], v) if k in _NESTED and cls is FlamingoConfig else v) for k, v in d.items()}
    return cls(**kwargs)
