"""OpenFlamingo checkpoints -> this engine's trainable weights and FlamingoConfig.

An OpenFlamingo `checkpoint.pt` (open_flamingo 2.x) is a state dict, sometimes wrapped as
`{"model_state_dict": ...}` and sometimes with `module.` prefixes (DDP/FSDP), holding:

    perceiver.latents                                  (R, d)
    perceiver.layers.{i}.0.{norm_media,norm_latents,to_q,to_kv,to_out}.*   PerceiverAttention
    perceiver.layers.{i}.1.{0,1,3}.*                   FeedForward: LayerNorm, Linear, GELU, Linear
    perceiver.norm.*
    perceiver.frame_embs, perceiver.media_time_embs    (optional; absent in released checkpoints)
    lang_encoder.gated_cross_attn_layers.{i}.*         gated block before decoder layer i, or the
    lang_encoder.<decoder layers>.{i}.gated_cross_attn_layer.*   same block in its FlamingoLayer
    lang_encoder.<input embeddings>.weight             resized: rows for <|endofchunk|> and <image>
    lang_encoder.<output embeddings>.weight            (untied LMs; often absent: OpenFlamingo
                                                        trains and saves the input side only)

Our modules mirror OpenFlamingo's (same sub-module names and parameter shapes), so the mapping is a
renaming plus: the two new-token rows move into `new_token_embeddings` / `new_token_output`; the
resampler's time embeddings take `frame_embs` when present and are zero otherwise (OpenFlamingo
has none); every shape-determined setting (depths, latents, widths, every-n) is read from the
tensors. Head counts are not visible in shapes: OpenFlamingo's `Flamingo` always builds both
modules with dim_head = 64, so heads = inner width / 64.

This module maps tensors only: it never imports open_flamingo or loads a model.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import CrossAttentionConfig, FlamingoConfig, ResamplerConfig, VisionConfig
from .cross_attention import block_key

log = logging.getLogger(__name__)

EOC_TOKEN = "<|endofchunk|>"
MEDIA_TOKEN = "<image>"
DIM_HEAD = 64  # open_flamingo.src.flamingo.Flamingo never passes dim_head: the modules' default

# Where common LMs keep their embeddings, relative to the LM (OpenFlamingo prefixes "lang_encoder.").
INPUT_EMBEDDING_NAMES = (
    "model.embed_tokens.weight",  # Llama, Mistral, Qwen, OPT (model.decoder.embed_tokens below)
    "gpt_neox.embed_in.weight",  # GPT-NeoX / Pythia / RedPajama-INCITE
    "transformer.wte.weight",  # GPT-2, GPT-J, MPT (MosaicGPT)
    "model.decoder.embed_tokens.weight",  # OPT
    "transformer.embed_tokens.weight",
)
OUTPUT_EMBEDDING_NAMES = ("lm_head.weight", "embed_out.weight")  # embed_out: GPT-NeoX in transformers 4

_PERCEIVER_ATTN = ("norm_media.weight", "norm_media.bias", "norm_latents.weight", "norm_latents.bias", "to_q.weight", "to_kv.weight", "to_out.weight")
_FF = ("0.weight", "0.bias", "1.weight", "3.weight")
_BLOCK = ("attn.norm.weight", "attn.norm.bias", "attn.to_q.weight", "attn.to_kv.weight", "attn.to_out.weight", "attn_gate", "ff_gate") + tuple(f"ff.{k}" for k in _FF)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


class NotAnOpenFlamingoCheckpoint(ValueError):
    """The file or mapping is not an OpenFlamingo checkpoint (or one we cannot represent)."""


@dataclass
class ConvertedCheckpoint:
    config: FlamingoConfig
    state_dict: dict[str, torch.Tensor]  # our trainable names; may lack new_token_output (see below)
    # True when the LM is untied and the checkpoint holds no output-embedding rows for the new
    # tokens (OpenFlamingo does not train them): the caller keeps its own initialisation.
    output_rows_missing: bool = False
    # The checkpoint's full input-embedding matrix, to compare with the LM's own rows.
    input_embeddings: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)


# ----- reading ----------------------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads `checkpoint.pt` (or a .safetensors file) into a flat state dict of tensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        candidates = sorted(path.glob("*.pt")) + sorted(path.glob("*.safetensors"))
        hint = f"; did you mean {candidates[0]}?" if candidates else ""
        raise NotAnOpenFlamingoCheckpoint(f"{path} is a directory, not an OpenFlamingo checkpoint file{hint}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(path)
        except Exception as e:  # noqa: BLE001 - any parse failure means "not a checkpoint"
            raise NotAnOpenFlamingoCheckpoint(f"cannot read {path} as safetensors: {e}") from e
    else:
        obj = _torch_load(path)
    return unwrap_state_dict(obj, source=str(path))


def _torch_load(path: Path):
    errors = []
    for mmap in (True, False):  # mmap avoids reading a multi-GB file up front; old formats need False
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    raise NotAnOpenFlamingoCheckpoint(
        f"cannot read {path} as a PyTorch checkpoint (torch.load with weights_only=True): {errors[-1]}. "
        "OpenFlamingo's checkpoint.pt is a state dict saved with torch.save; a file holding other "
        "pickled objects must be re-saved as a plain state dict."
    )


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict: unwraps {"model_state_dict": ...} (or "state_dict"/"model")
    and strips DDP/FSDP/compile prefixes such as `module.`."""
    if not isinstance(obj, dict):
        raise NotAnOpenFlamingoCheckpoint(f"{source} holds a {type(obj).__name__}, not a state dict")
    for key in ("model_state_dict", "state_dict", "model"):
        if key in obj and isinstance(obj[key], dict) and not _is_perceiver_dict(obj):
            return unwrap_state_dict(obj[key], source)
    sd = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        name = name.replace("._checkpoint_wrapped_module", "").replace("._fsdp_wrapped_module", "")
        sd[name] = value
    return sd


def _is_perceiver_dict(obj: dict) -> bool:
    return any(isinstance(k, str) and "perceiver." in k for k in obj)


# ----- conversion -------------------------------------------------------------------------------
def openflamingo_token_ids(tokenizer) -> tuple[int, int]:
    """(media id, eoc id) that OpenFlamingo's factory gives `<image>` and `<|endofchunk|>` with
    this (unmodified) tokenizer: it adds `<|endofchunk|>` then `<image>` to it, so a token not
    already known takes the next free id. The tokenizer is not changed."""
    vocab = tokenizer.get_vocab()
    next_id = len(tokenizer)
    ids = {}
    for token in (EOC_TOKEN, MEDIA_TOKEN):
        if token in vocab:
            ids[token] = vocab[token]
        else:
            ids[token], next_id = next_id, next_id + 1
    return ids[MEDIA_TOKEN], ids[EOC_TOKEN]


def check_checkpoint(sd: dict[str, torch.Tensor]) -> tuple[ResamplerConfig, CrossAttentionConfig]:
    """Raises NotAnOpenFlamingoCheckpoint unless `sd` holds an OpenFlamingo resampler and gated
    blocks this engine can represent; cheap, so callers can check before loading an LM."""
    sd = unwrap_state_dict(sd)
    _, resampler = _convert_resampler(sd, [])
    _, xattn = _convert_blocks(sd, None)
    return resampler, xattn


def convert_state_dict(
    sd: dict[str, torch.Tensor],
    media_token_id: int,
    eoc_token_id: int,
    *,
    tied: bool,
    every_n_layers: int | None = None,
    lm: str = FlamingoConfig.lm,
    vision: str = VisionConfig.name,
    input_embedding_name: str | None = None,
    output_embedding_name: str | None = None,
) -> ConvertedCheckpoint:
    """An OpenFlamingo state dict -> our trainable state dict and a matching FlamingoConfig.

    media_token_id / eoc_token_id: the rows OpenFlamingo gave `<image>` / `<|endofchunk|>`
        (see `openflamingo_token_ids`).
    tied: whether the LM ties its input and output embeddings (then there is no new_token_output).
    every_n_layers: checked against the blocks' placement; inferred from it when None.
    input/output_embedding_name: the LM's parameter names (e.g. "model.embed_tokens.weight"), tried
        before the usual names.
    """
    sd = unwrap_state_dict(sd)
    notes: list[str] = []
    resampler_sd, resampler_cfg = _convert_resampler(sd, notes)
    blocks, xattn_cfg = _convert_blocks(sd, every_n_layers)
    out: dict[str, torch.Tensor] = {f"resampler.{k}": v for k, v in resampler_sd.items()}
    for layer_id, block in blocks.items():
        out.update({block_key(layer_id) + k: v for k, v in block.items()})

    ids = [media_token_id, eoc_token_id]  # our slots: 0 = media, 1 = EOC
    lang_dim = blocks[min(blocks)]["attn.to_q.weight"].shape[1]
    in_name = _find(sd, input_embedding_name, INPUT_EMBEDDING_NAMES)
    out_name = _find(sd, output_embedding_name, OUTPUT_EMBEDDING_NAMES)
    in_emb = sd[in_name] if in_name else None
    if in_emb is not None:
        _check_rows(in_emb, ids, lang_dim, in_name)
        out["new_token_embeddings"] = in_emb[ids].float().clone()
    else:
        notes.append("no input embeddings in the checkpoint: <image>/<|endofchunk|> keep the model's initial embeddings")
    output_rows_missing = False
    if not tied:
        if out_name is not None:
            _check_rows(sd[out_name], ids, lang_dim, out_name)
            out["new_token_output"] = sd[out_name][ids].float().clone()
        else:
            output_rows_missing = True
            notes.append(
                "no output embeddings in the checkpoint (OpenFlamingo does not train them): the output rows of "
                "<image>/<|endofchunk|> keep the model's initialisation (the mean output embedding)"
            )
    elif out_name is not None and in_emb is not None:
        # A tied LM has one table; a checkpoint whose output rows differ was not tied when trained.
        diff = (sd[out_name][ids].float() - in_emb[ids].float()).abs().max().item()
        if diff > 1e-6:
            notes.append(f"the LM is tied but the checkpoint's output rows for the new tokens differ from its input rows (max |diff| {diff:.3g}); the input rows are used")

    config = FlamingoConfig(
        lm=lm,
        vision=VisionConfig(name=vision),
        resampler=resampler_cfg,
        cross_attention=xattn_cfg,
        media_token=MEDIA_TOKEN,
        eoc_token=EOC_TOKEN,  # prompts written for OpenFlamingo keep working unchanged
    )
    return ConvertedCheckpoint(config, out, output_rows_missing, in_emb, notes)


def _convert_resampler(sd: dict[str, torch.Tensor], notes: list[str]) -> tuple[dict[str, torch.Tensor], ResamplerConfig]:
    p = {k[len("perceiver."):]: v for k, v in sd.items() if k.startswith("perceiver.")}
    if not p:
        sample = ", ".join(list(sd)[:5]) or "none"
        raise NotAnOpenFlamingoCheckpoint(
            "not an OpenFlamingo checkpoint: it holds no perceiver.* (Perceiver Resampler) weights "
            f"({len(sd)} tensors; first keys: {sample})"
        )
    if "latents" not in p:
        raise NotAnOpenFlamingoCheckpoint("not an OpenFlamingo checkpoint: perceiver.latents is missing")
    latents = p["latents"]
    if latents.dim() != 2:
        raise NotAnOpenFlamingoCheckpoint(f"perceiver.latents should be (num_latents, dim), got shape {tuple(latents.shape)}")
    num_latents, dim = latents.shape
    layer_ids = sorted({int(m.group(1)) for k in p if (m := re.match(r"layers\.(\d+)\.", k))})
    if layer_ids != list(range(len(layer_ids))) or not layer_ids:
        raise NotAnOpenFlamingoCheckpoint(f"perceiver layers should be numbered 0..depth-1, found {layer_ids}")
    expected = {"latents", "norm.weight", "norm.bias"}
    expected |= {f"layers.{i}.0.{k}" for i in layer_ids for k in _PERCEIVER_ATTN}
    expected |= {f"layers.{i}.1.{k}" for i in layer_ids for k in _FF}
    optional = {"frame_embs", "media_time_embs"}
    _check_keys("perceiver.", set(p), expected, optional)

    inner = p["layers.0.0.to_q.weight"].shape[0]
    heads = _heads(inner, "perceiver.layers.0.0.to_q")
    ff_mult = _mult(p["layers.0.1.1.weight"].shape[0], dim, "perceiver.layers.0.1.1")
    max_frames = ResamplerConfig.max_frames
    if "frame_embs" in p:
        max_frames = p["frame_embs"].shape[0]
    if "media_time_embs" in p and p["media_time_embs"].abs().max() > 0:
        raise NotAnOpenFlamingoCheckpoint(
            "the checkpoint's resampler has media_time_embs (an embedding per media position in the "
            "sequence); this engine resamples each media item on its own and cannot represent them"
        )
    cfg = ResamplerConfig(dim=None, depth=len(layer_ids), heads=heads, dim_head=DIM_HEAD, num_latents=num_latents, ff_mult=ff_mult, max_frames=max_frames)

    out = {"latents": latents, "norm.weight": p["norm.weight"], "norm.bias": p["norm.bias"]}
    for i in layer_ids:
        for k in _PERCEIVER_ATTN:
            out[f"layers.{i}.attn.{k}"] = p[f"layers.{i}.0.{k}"]
        for k in _FF:
            out[f"layers.{i}.ff.{k}"] = p[f"layers.{i}.1.{k}"]
    if "frame_embs" in p:
        out["time_embeddings"] = p["frame_embs"][:, None, :]  # (F, d) -> (F, 1, d): per frame, all tokens
        notes.append(f"resampler frame embeddings ({max_frames} frames) mapped to time_embeddings")
    else:
        out["time_embeddings"] = torch.zeros(max_frames, 1, dim)  # OpenFlamingo adds none
    return {k: v.float().clone() for k, v in out.items()}, cfg


def _convert_blocks(sd: dict[str, torch.Tensor], every_n_layers: int | None) -> tuple[dict[int, dict[str, torch.Tensor]], CrossAttentionConfig]:
    """Gated blocks by decoder-layer index, from either of the two places OpenFlamingo keeps them."""
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    listed = re.compile(r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)$")
    wrapped = re.compile(r"^lang_encoder\..+\.(\d+)\.gated_cross_attn_layer\.(.+)$")
    for name, value in sd.items():
        m = listed.match(name) or wrapped.match(name)
        if m:
            layer, key = int(m.group(1)), m.group(2)
            seen = blocks.setdefault(layer, {})
            if key in seen and not torch.equal(seen[key], value):
                raise NotAnOpenFlamingoCheckpoint(f"the checkpoint holds two different copies of gated block {layer}'s {key}")
            seen[key] = value
    if not blocks:
        raise NotAnOpenFlamingoCheckpoint(
            "not an OpenFlamingo checkpoint: it has a perceiver but no gated cross-attention blocks "
            "(lang_encoder.gated_cross_attn_layers.* or lang_encoder.<layers>.N.gated_cross_attn_layer.*)"
        )
    for layer, block in blocks.items():
        _check_keys(f"lang_encoder.gated_cross_attn_layers.{layer}.", set(block), set(_BLOCK), set())

    ids = sorted(blocks)
    inferred = ids[0] + 1
    if ids != list(range(inferred - 1, ids[-1] + 1, inferred)):
        raise NotAnOpenFlamingoCheckpoint(
            f"gated blocks sit before decoder layers {ids}; this engine places them before every n-th "
            "layer (n-1, 2n-1, ...), which cannot express this placement"
        )
    n = inferred
    if every_n_layers is not None:
        if every_n_layers < 1 or (ids != list(range(every_n_layers - 1, ids[-1] + 1, every_n_layers))):
            raise NotAnOpenFlamingoCheckpoint(
                f"--cross-attn-every-n-layers {every_n_layers} does not match the checkpoint, whose gated blocks "
                f"sit before decoder layers {ids} (every {inferred})"
            )
        n = every_n_layers
    first = blocks[ids[0]]
    dim = first["attn.to_q.weight"].shape[1]
    heads = _heads(first["attn.to_q.weight"].shape[0], "gated block attn.to_q")
    ff_mult = _mult(first["ff.1.weight"].shape[0], dim, "gated block ff.1")
    cfg = CrossAttentionConfig(every_n_layers=n, heads=heads, dim_head=DIM_HEAD, ff_mult=ff_mult, only_last_media=True, dense_on_text_only=True)
    converted = {layer: {k: v.float().clone() for k, v in block.items()} for layer, block in blocks.items()}
    return converted, cfg


def _check_keys(prefix: str, have: set[str], expected: set[str], optional: set[str]) -> None:
    missing, unexpected = sorted(expected - have), sorted(have - expected - optional)
    if missing or unexpected:
        raise NotAnOpenFlamingoCheckpoint(
            f"unexpected OpenFlamingo layout under {prefix}: missing {[prefix + k for k in missing[:5]]}, "
            f"unknown {[prefix + k for k in unexpected[:5]]}"
        )


def _heads(inner: int, where: str) -> int:
    if inner % DIM_HEAD:
        raise NotAnOpenFlamingoCheckpoint(f"{where} has inner width {inner}, not a multiple of OpenFlamingo's dim_head {DIM_HEAD}")
    return inner // DIM_HEAD


def _mult(inner: int, dim: int, where: str) -> int:
    if inner % dim:
        raise NotAnOpenFlamingoCheckpoint(f"{where}: feed-forward width {inner} is not an integer multiple of {dim}")
    return inner // dim


def _find(sd: dict[str, torch.Tensor], preferred: str | None, names: tuple[str, ...]) -> str | None:
    for name in ((preferred,) if preferred else ()) + names:
        if f"lang_encoder.{name}" in sd:
            return f"lang_encoder.{name}"
    return None


def _check_rows(table: torch.Tensor, ids: list[int], dim: int, name: str) -> None:
    if table.dim() != 2 or table.shape[1] != dim:
        raise NotAnOpenFlamingoCheckpoint(f"{name} has shape {tuple(table.shape)}; expected (vocab, {dim}) to match the gated blocks")
    if max(ids) >= table.shape[0]:
        raise NotAnOpenFlamingoCheckpoint(
            f"{name} has {table.shape[0]} rows, but with this LM's tokenizer OpenFlamingo's <image>/<|endofchunk|> "
            f"would be rows {ids}: is the LM the one the checkpoint was trained with?"
        )


def embedding_drift(checkpoint_rows: torch.Tensor, lm_rows: torch.Tensor) -> float:
    """Max |difference| between the checkpoint's and the LM's input embeddings over the LM's own
    vocabulary. OpenFlamingo trains the whole input matrix unless --freeze_lm_embeddings; this
    engine keeps the LM's rows, so a large value means outputs will differ from OpenFlamingo's."""
    v = min(checkpoint_rows.shape[0], lm_rows.shape[0])
    if checkpoint_rows.shape[1] != lm_rows.shape[1]:
        return float("inf")
    return (checkpoint_rows[:v].float() - lm_rows[:v].float()).abs().max().item()
