"""Training throughput: our train step vs OpenFlamingo's, on the same model, side by side.

Both are built around the same frozen SmolLM2-135M (engine.lm.load_lm("smollm2")) and
EfficientNet-Lite0, with OpenFlamingo's defaults on both sides (Perceiver width 1280, depth 6,
64 latents; gated cross-attention before every 4th decoder layer, 8 heads x 64, ff x4). A step
is one optimiser update on B sequences of L tokens with one image each: forward, loss, backward,
gradient clipping, AdamW. Variants are measured in interleaved rounds so that they share the
machine's load.

    ours_pixels    our model from pixels (the frozen tower runs every step)
    ours_cache     our model from precomputed frozen features (the feature cache)
    openflamingo   open_flamingo.Flamingo's step, as its train_one_epoch does it

Prints one JSON object. Usage: python bench/train.py [--steps 4] [--batch 4] [--tokens 64]
[--every 4] [--bf16] [--freeze-of-embeddings]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn


def build_ours(every: int):
    from engine.config import CrossAttentionConfig, FlamingoConfig, ResamplerConfig, VisionConfig
    from engine.model import FlamingoModel

    cfg = FlamingoConfig(lm="smollm2", vision=VisionConfig("efficientnet-lite0", 224),
                         resampler=ResamplerConfig(), cross_attention=CrossAttentionConfig(every_n_layers=every))
    return FlamingoModel.from_config(cfg)


class _Visual(nn.Module):
    """open_clip's `.visual` face over our EfficientNet tower: images -> (pooled, tokens)."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, x):
        tokens = self.tower.encode(self.tower.normalize(x))
        return tokens.mean(1), tokens


def build_openflamingo(every: int, freeze_embeddings: bool):
    sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))  # only its factory needs it
    from open_flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    from engine.lm import load_lm
    from engine.vision import EfficientNetLite0Tower

    lm, tok = load_lm("smollm2")
    tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<PAD>"})
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.layers")
    lm.resize_token_embeddings(len(tok))
    holder = nn.Module()
    holder.visual = _Visual(EfficientNetLite0Tower(224))
    model = Flamingo(holder, lm, tok.encode("<|endofchunk|>")[-1], tok.encode("<image>")[-1], vis_dim=1280,
                     cross_attn_every_n_layers=every)
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    if not freeze_embeddings:  # OpenFlamingo's default trains the LM's input embeddings
        model.lang_encoder.get_input_embeddings().requires_grad_(True)
    return model, tok


def batch(b: int, length: int, media_id: int, eoc_id: int, pad_id: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(200, 40000, (b, length), generator=g)
    ids[:, 0] = media_id
    ids[:, -1] = eoc_id
    labels = ids.clone()
    labels[ids == media_id] = -100
    mask = torch.ones_like(ids)
    pixels = torch.rand(b, 1, 1, 3, 224, 224, generator=g)
    return ids, mask, labels, pixels


def make_step(params, forward, clip: float = 1.0, bf16: bool = False, opt=None):
    opt = opt or torch.optim.AdamW(params, lr=1e-5)  # OpenFlamingo's: torch's default AdamW

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="measured rounds (after one warm-up round)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--every", type=int, default=4, help="cross-attention every n-th layer")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for both")
    ap.add_argument("--freeze-of-embeddings", action="store_true", help="OpenFlamingo's --freeze_lm_embeddings")
    ap.add_argument("--skip-openflamingo", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)

    from engine.objective import FlamingoLoss

    import contextlib

    quiet = contextlib.redirect_stdout(sys.stderr)  # libraries print while loading: stdout stays JSON
    with quiet:
        ours = build_ours(args.every).train()
    loss_mod = FlamingoLoss(ours)
    ids, mask, labels, pixels = batch(args.batch, args.tokens, ours.media_token_id, ours.eoc_token_id, ours.tokenizer.pad_token_id)
    with torch.no_grad():
        features = ours.vision(pixels.flatten(0, 1)).unsqueeze(1).half()  # what the cache stores: (B, 1, T, S, d) fp16
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    from engine.train import build_optimizer
    from engine.train_config import OptimConfig

    opt = build_optimizer(ours, OptimConfig(lr=1e-5))  # what `python -m engine train` uses (fused AdamW)
    steps = {
        "ours_pixels": make_step(ours_params, lambda: loss_mod(ids, mask, labels, pixels=pixels), bf16=args.bf16, opt=opt),
        "ours_cache": make_step(ours_params, lambda: loss_mod(ids, mask, labels, features=features), bf16=args.bf16, opt=opt),
    }
    info = {"ours_trainable_params": sum(p.numel() for p in ours_params)}
    if not args.skip_openflamingo:
        with contextlib.redirect_stdout(sys.stderr):
            of, tok = build_openflamingo(args.every, args.freeze_of_embeddings)
        of.train()
        of_media, of_eoc = tok.encode("<image>")[-1], tok.encode("<|endofchunk|>")[-1]
        of_ids = ids.clone()
        of_ids[ids == ours.media_token_id] = of_media
        of_ids[ids == ours.eoc_token_id] = of_eoc
        of_labels = of_ids.clone()
        of_labels[of_ids == of_media] = -100
        of_params = [p for p in of.parameters() if p.requires_grad]
        info["openflamingo_trainable_params"] = sum(p.numel() for p in of_params)
        steps["openflamingo"] = make_step(of_params, lambda: of(pixels, of_ids, mask, labels=of_labels)[0], bf16=args.bf16)

    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.steps + 1):
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if r > 0:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    out = {
        "config": {"batch": args.batch, "tokens": args.tokens, "images_per_sequence": 1, "cross_attn_every": args.every,
                   "bf16_autocast": args.bf16, "threads": torch.get_num_threads(), "rounds": args.steps},
        "seconds_per_step": {k: round(v, 3) for k, v in med.items()},
        "samples_per_s": {k: round(args.batch / v, 3) for k, v in med.items()},
        # the fastest round: the least disturbed by other work on a shared machine
        "min_seconds_per_step": {k: round(min(v), 3) for k, v in times.items()},
        # CPU seconds of this process per step: steadier than wall time on a shared machine
        "cpu_seconds_per_step": {k: round(v, 3) for k, v in med_cpu.items()},
        "all_step_times": {k: [round(x, 3) for x in v] for k, v in times.items()},
        **info,
    }
    if "openflamingo" in med:
        out["speedup_vs_openflamingo"] = {k: round(med["openflamingo"] / med[k], 2) for k in ("ours_pixels", "ours_cache")}
        fastest = {k: min(v) for k, v in times.items()}
        out["speedup_vs_openflamingo_fastest_round"] = {k: round(fastest["openflamingo"] / fastest[k], 2) for k in ("ours_pixels", "ours_cache")}
        out["speedup_vs_openflamingo_cpu_time"] = {k: round(med_cpu["openflamingo"] / med_cpu[k], 2) for k in ("ours_pixels", "ours_cache")}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
