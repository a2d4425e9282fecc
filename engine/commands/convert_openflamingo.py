"""python -m engine convert-openflamingo: an OpenFlamingo checkpoint.pt -> a model directory that
`FlamingoModel.from_pretrained` loads (flamingo_config.json + flamingo.safetensors)."""
from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)

DEFAULT_VISION = "openai/clip-vit-large-patch14"  # every released OpenFlamingo v2 model: CLIP ViT-L/14 (openai)

# Released OpenFlamingo v2 models, recognised by the LM layout and width in their checkpoint.
# (embedding parameter, LM width) -> (LM reference, OpenFlamingo model)
KNOWN_LMS = {
    ("gpt_neox.embed_in.weight", 2560): ("togethercomputer/RedPajama-INCITE-Base-3B-v1", "OpenFlamingo-4B-vitl-rpj3b"),
    ("transformer.wte.weight", 2048): ("anas-awadalla/mpt-1b-redpajama-200b", "OpenFlamingo-3B-vitl-mpt1b"),
    ("transformer.wte.weight", 4096): ("anas-awadalla/mpt-7b", "OpenFlamingo-9B-vitl-mpt7b"),
}

EPILOG = """defaults:
  --vision  %s (CLIP ViT-L/14, the tower of every released OpenFlamingo v2
            model; its post-layernorm patch tokens are what open_clip gave OpenFlamingo)
  --lm      guessed from the checkpoint's LM layout and width:
%s
            anything else needs --lm. The instruct/dolly variants were trained on the
            -Instruct / -dolly versions of these LMs: pass those with --lm. The MPT ones
            are remote-code models (MosaicGPT) that engine.lm cannot load (it runs no
            remote code): for those, --lm must name a natively supported copy with the
            same weights and tokenizer.
  --cross-attn-every-n-layers  read from where the checkpoint's gated blocks sit

The LM and the vision tower are loaded once to check that they fit the checkpoint; the output
directory holds references to them (not copies) plus the converted resampler, gated blocks and
<image>/<|endofchunk|> embeddings. The model's EOC token becomes <|endofchunk|>, as in
OpenFlamingo's prompts. Head counts are taken as width/64 (OpenFlamingo's fixed dim_head).""" % (
    DEFAULT_VISION,
    "\n".join(f"              {emb.split('.')[0]} width {w}: {lm}  ({name})" for (emb, w), (lm, name) in KNOWN_LMS.items()),
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert-openflamingo",
        help="convert an OpenFlamingo checkpoint.pt into a model directory",
        description="Convert an OpenFlamingo (open_flamingo 2.x) checkpoint into a directory that FlamingoModel.from_pretrained loads.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="OpenFlamingo checkpoint.pt (a state dict, possibly wrapped as {'model_state_dict': ...}) or .safetensors")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; existing model files are overwritten)")
    p.add_argument("--lm", default=None, metavar="HF_ID_OR_PATH", help="the LM the checkpoint was trained with (default: guessed, see below)")
    p.add_argument("--vision", default=DEFAULT_VISION, metavar="HF_ID_OR_PATH", help=f"vision tower: an HF CLIP/SigLIP id or path, 'efficientnet-lite0' or 'tiny' (default: {DEFAULT_VISION})")
    p.add_argument("--cross-attn-every-n-layers", type=int, default=None, metavar="N", help="check the gated blocks sit before every N-th decoder layer (default: inferred)")
    return p


def guess_lm(sd: dict) -> str:
    for (emb, width), (lm, _name) in KNOWN_LMS.items():
        t = sd.get(f"lang_encoder.{emb}")
        if t is not None and t.dim() == 2 and t.shape[1] == width:
            return lm
    embs = [k for k in sd if k.startswith("lang_encoder.") and ("embed" in k or "wte" in k)]
    raise ValueError(
        "cannot tell which LM this checkpoint was trained with; pass --lm HF_ID_OR_PATH "
        f"(checkpoint embeddings: {', '.join(f'{k} {tuple(sd[k].shape)}' for k in embs) or 'none'})"
    )


def _param_name(module, param) -> str | None:
    for name, p in module.named_parameters(remove_duplicate=False):
        if p is param:
            return name
    return None


def run(args) -> int:
    from ..config import VisionConfig
    from ..cross_attention import block_key
    from ..lm import find_decoder_layers, load_lm
    from ..model import FlamingoModel
    from ..openflamingo import check_checkpoint, convert_state_dict, embedding_drift, load_checkpoint, openflamingo_token_ids
    from ..vision import load_vision_tower

    sd = load_checkpoint(args.checkpoint)
    check_checkpoint(sd)  # before loading anything big
    lm_ref = args.lm or guess_lm(sd)
    log.info("LM %s, vision tower %s", lm_ref, args.vision)
    try:
        lm, tokenizer = load_lm(lm_ref)
    except OSError as e:  # not found locally / on the Hub
        raise ValueError(f"cannot load the LM {lm_ref!r}: {e}") from e
    try:
        vision = load_vision_tower(VisionConfig(name=args.vision))
    except OSError as e:
        raise ValueError(f"cannot load the vision tower {args.vision!r}: {e}") from e

    media_id, eoc_id = openflamingo_token_ids(tokenizer)  # before our model adds its tokens
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    converted = convert_state_dict(
        sd, media_id, eoc_id,
        tied=tied,
        every_n_layers=args.cross_attn_every_n_layers,
        lm=lm_ref,
        vision=args.vision,
        input_embedding_name=_param_name(lm, lm.get_input_embeddings().weight),
        output_embedding_name=_param_name(lm, lm.get_output_embeddings().weight),
    )
    config = converted.config
    out = converted.state_dict

    width = out["resampler.latents"].shape[1]
    if vision.feature_dim != width:
        raise ValueError(f"the checkpoint's resampler works at width {width} but the vision tower {args.vision!r} gives {vision.feature_dim}-d features; pass the tower it was trained with (--vision)")
    block_ids = sorted({int(k.split(".")[1]) for k in out if k.startswith("gated_blocks.")})
    lm_dim = lm.get_input_embeddings().embedding_dim
    block_dim = out[block_key(block_ids[0]) + "attn.to_q.weight"].shape[1]
    if block_dim != lm_dim:
        raise ValueError(f"the checkpoint's gated blocks expect an LM of width {block_dim} but {lm_ref!r} has width {lm_dim}; pass the LM it was trained with (--lm)")
    n_layers = len(find_decoder_layers(lm)[2])
    n = config.cross_attention.every_n_layers
    expected = list(range(n - 1, n_layers, n))
    if block_ids != expected:
        raise ValueError(f"the checkpoint has gated blocks before decoder layers {block_ids}, but {lm_ref!r} has {n_layers} layers, so every {n} gives {expected}: is this the LM it was trained with?")

    model = FlamingoModel(config, lm, tokenizer, vision)
    own = model.trainable_state_dict()
    if converted.output_rows_missing:
        out["new_token_output"] = own["new_token_output"]
    if "new_token_embeddings" not in out:
        out["new_token_embeddings"] = own["new_token_embeddings"]
    model.load_trainable_state_dict(out)
    for note in converted.notes:
        log.warning("%s", note)
    if converted.input_embeddings is not None:
        drift = embedding_drift(converted.input_embeddings, lm.get_input_embeddings().weight)
        if drift > 1e-3:
            log.warning(
                "the checkpoint's input embeddings differ from %s's own (max |diff| %.3g over the LM's vocabulary): "
                "OpenFlamingo trained them; the converted model keeps the LM's, so its outputs will differ somewhat", lm_ref, drift,
            )
    model.save_pretrained(args.out)
    summary = {
        "out": str(args.out),
        "lm": lm_ref,
        "vision": args.vision,
        "resampler": {k: getattr(config.resampler, k) for k in ("depth", "heads", "dim_head", "num_latents", "ff_mult")} | {"width": width},
        "gated_blocks": block_ids,
        "cross_attention": {k: getattr(config.cross_attention, k) for k in ("every_n_layers", "heads", "dim_head", "ff_mult", "only_last_media")},
        "openflamingo_token_ids": {"<image>": media_id, "<|endofchunk|>": eoc_id},
        "tied": tied,
        "output_rows_from_checkpoint": not tied and not converted.output_rows_missing,
    }
    print(json.dumps(summary, indent=2))
    return 0
