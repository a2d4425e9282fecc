"""Forward+backward time of our Flamingo vs OpenFlamingo (open_flamingo 2.0.1) on the same LM,
vision tower, resampler and cross-attention configuration, side by side in one process.

    .venv/bin/python bench/forward.py [--repeats 5] [--batch 4] [--tokens 64] [--device cpu]

Setup: SmolLM2-135M (engine.lm.load_lm("smollm2")) + EfficientNet-Lite0 (7x7x1280 tokens), a
gated block before every 4th decoder layer, a batch of B sequences of L tokens, one image each
(<image> first, <|endofchunk|> last), every position labelled.

Variants (each on its own copy of the LM; the vision tower is shared):
  ours                 ResamplerConfig() = OpenFlamingo's resampler (depth 6, 8x64 heads, 64 latents)
                       at the vision width 1280, the same cross-attention blocks
  ours_projected       ResamplerConfig(dim=576, depth=2, num_latents=16): features projected to
                       the LM width first
  openflamingo         open_flamingo's Flamingo as its factory builds it: the LM's input embeddings
                       trainable (that is how it trains <image>/<|endofchunk|>)
  openflamingo_frozen_emb  the same with --freeze_lm_embeddings (new tokens not trained at all)

Training step = pixels -> vision (no grad) -> resampler -> LM with gated blocks -> loss ->
backward. Variants alternate within each repeat (order rotated), after one warm-up round; the
JSON reports medians and ratios ours/theirs (lower is better for ours). Forward-only timings
(no grad) give the Flamingo overhead over the bare LM on the same tokens.

Three measures, from most to least robust on a shared machine: GFLOP per training step
(torch.utils.flop_counter; exact, load-independent), process CPU seconds (exact work at
--threads 1, little disturbed by other jobs), wall seconds (what a user waits; noisy when the
cores are shared; on a quiet machine use the default threads).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from bench._openflamingo import build_openflamingo  # noqa: E402
from engine.config import CrossAttentionConfig, FlamingoConfig, ResamplerConfig, VisionConfig  # noqa: E402
from engine.model import FlamingoModel  # noqa: E402

EVERY_N = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--random-weights", action="store_true", help="SmolLM2-shaped random LM and random EfficientNet-Lite0 (timings do not depend on weights; for machines without the cached weights)")
    p.add_argument("--only", default=None, help="comma-separated variants to time (default: all)")
    p.add_argument("--no-flops", action="store_true", help="skip counting each variant's training-step FLOPs (one extra step each)")
    p.add_argument("--profile", default=None, metavar="VARIANT", help="print a torch.profiler table for one training step of VARIANT and exit")
    return p.parse_args(argv)


def load_backbones(random_weights: bool):
    from engine.lm import freeze, load_lm
    from engine.vision import EfficientNetLite0Tower

    if not random_weights:
        lm, tokenizer = load_lm("smollm2")
        with contextlib.redirect_stdout(sys.stderr):  # the EfficientNet package prints; stdout is for the JSON
            tower = EfficientNetLite0Tower()
        return lm, tokenizer, tower
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    lm = freeze(AutoModelForCausalLM.from_config(cfg))
    vocab = {f"t{i}": i for i in range(49152)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t2", pad_token="t2")
    tower = _random_efficientnet()
    return lm, tokenizer, tower


def _random_efficientnet():
    from efficientnet_lite_pytorch import EfficientNet

    from engine.vision import EfficientNetLite0Tower

    tower = EfficientNetLite0Tower.__new__(EfficientNetLite0Tower)
    torch.nn.Module.__init__(tower)
    tower.image_size = 224
    tower.net = EfficientNet.from_name("efficientnet-lite0")
    return tower.freeze()


def ours_config(projected: bool) -> FlamingoConfig:
    resampler = ResamplerConfig(dim=576, depth=2, num_latents=16) if projected else ResamplerConfig()
    return FlamingoConfig(
        lm="smollm2",
        vision=VisionConfig("efficientnet-lite0"),
        resampler=resampler,
        cross_attention=CrossAttentionConfig(every_n_layers=EVERY_N, heads=8, dim_head=64, ff_mult=4, only_last_media=True),
    )


class Ours:
    def __init__(self, model: FlamingoModel, ids, pixels):
        self.model, self.ids, self.pixels = model, ids, pixels
        self.params = [p for p in model.parameters() if p.requires_grad]

    def train_step(self):
        for p in self.params:
            p.grad = None
        m = self.model
        loss = m(self.ids, m.encode_media(self.pixels), labels=self.ids).loss
        loss.backward()
        return loss.detach()

    @torch.no_grad()
    def forward(self):
        m = self.model
        return m(self.ids, m.encode_media(self.pixels)).logits

    @torch.no_grad()
    def forward_blocks_only(self, visual):
        """LM + gated blocks on precomputed visual tokens (no vision tower, no resampler)."""
        return self.model(self.ids, visual).logits


class Theirs:
    def __init__(self, model, ids, pixels):
        self.model, self.ids, self.pixels = model, ids, pixels
        self.params = [p for p in model.parameters() if p.requires_grad]

    def train_step(self):
        for p in self.params:
            p.grad = None
        loss = self.model(self.pixels, self.ids, labels=self.ids).loss
        loss.backward()
        return loss.detach()

    @torch.no_grad()
    def forward(self):
        return self.model(self.pixels, self.ids).logits


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CPU_TIMES: dict[str, list[float]] = {}


def timed(fn, device, cpu_key=None):
    """Wall seconds of fn(); with cpu_key, also records the process CPU seconds it used (all
    threads; less disturbed than wall time when other jobs share the cores, exact at --threads 1)."""
    _sync(device)
    c = time.process_time()
    t = time.perf_counter()
    fn()
    _sync(device)
    wall = time.perf_counter() - t
    if cpu_key is not None:
        CPU_TIMES.setdefault(cpu_key, []).append(time.process_time() - c)
    return wall


def build(args):
    device = args.device
    t0 = time.perf_counter()
    lm, tokenizer, tower = load_backbones(args.random_weights)
    tower = tower.to(device)
    load_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(0)
    b, L = args.batch, args.tokens
    base = torch.randint(3, len(tokenizer), (b, L), generator=g)
    pixels = torch.rand(b, 1, 1, 3, 224, 224, generator=g).to(device)

    variants = {}
    for name, projected in (("ours", False), ("ours_projected", True)):
        model = FlamingoModel(ours_config(projected), copy.deepcopy(lm), copy.deepcopy(tokenizer), tower).to(device).eval()
        ids = base.clone()
        ids[:, 0], ids[:, -1] = model.media_token_id, model.eoc_token_id
        variants[name] = Ours(model, ids.to(device), pixels)
    for name, freeze_emb in (("openflamingo", False), ("openflamingo_frozen_emb", True)):
        model, tok = build_openflamingo(copy.deepcopy(lm), tokenizer, tower, cross_attn_every_n_layers=EVERY_N, freeze_lm_embeddings=freeze_emb)
        model = model.to(device).eval()
        ids = base.clone()
        ids[:, 0], ids[:, -1] = model.media_token_id, model.eoc_token_id
        variants[name] = Theirs(model, ids.to(device), pixels)
    bare = copy.deepcopy(lm).to(device).eval()
    return variants, bare, load_s


def trainable_counts(variants):
    return {name: sum(p.numel() for p in v.params) for name, v in variants.items()}


def count_flops(variants) -> dict[str, float]:
    """GFLOP of one training step per variant (torch.utils.flop_counter: matmuls, convolutions,
    attention), forward and backward: the work itself, untouched by other jobs on the machine."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for name, v in variants.items():
        with FlopCounterMode(display=False) as fc:
            v.train_step()
        out[name] = round(fc.get_total_flops() / 1e9, 1)
    return out


def profile(v, steps=2):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    v.train_step()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(steps):
            v.train_step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants, bare, load_s = build(args)
    if args.profile:
        profile(variants[args.profile])
        return 0
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    names = list(variants)
    device = args.device

    ours = variants.get("ours")
    visual = None
    if ours is not None:
        with torch.no_grad():
            visual = ours.model.encode_media(ours.pixels)
        embeds = ours.model.embed(ours.ids).detach()
    bare_fwd = (lambda: bare(inputs_embeds=embeds).logits) if ours is not None else None

    flops = {} if args.no_flops else count_flops(variants)
    train = {n: [] for n in names}
    fwd = {n: [] for n in names}
    fwd_blocks, fwd_bare, losses = [], [], {}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    for r in range(args.repeats + 1):  # round 0 warms up
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            dt = timed(lambda: losses.__setitem__(n, float(variants[n].train_step())), device, f"train/{n}" if r else None)
            if r:
                train[n].append(dt)
        for n in order:
            dt = timed(variants[n].forward, device, f"forward/{n}" if r else None)
            if r:
                fwd[n].append(dt)
        if ours is not None:
            with torch.no_grad():
                a = timed(lambda: ours.forward_blocks_only(visual), device, "forward/ours_lm_with_blocks_given_visual" if r else None)
                c = timed(bare_fwd, device, "forward/bare_lm" if r else None)
            if r:
                fwd_blocks.append(a)
                fwd_bare.append(c)

    med = lambda xs: statistics.median(xs) if xs else None
    rnd = lambda x: round(x, 4) if x is not None else None
    train_med = {n: med(train[n]) for n in names}
    fwd_med = {n: med(fwd[n]) for n in names}
    ratio = lambda a, b: (round(a / b, 3) if a and b else None)
    result = {
        "setup": {
            "lm": "SmolLM2-135M-Instruct (random weights)" if args.random_weights else "SmolLM2-135M-Instruct (engine.lm.load_lm('smollm2'))",
            "vision": "EfficientNet-Lite0, 49 tokens x 1280",
            "cross_attention": f"every {EVERY_N}th layer (7 blocks), 8 heads x 64, ff x4, only last media",
            "resampler_same": "depth 6, 8 heads x 64, 64 latents, ff x4, width 1280 (OpenFlamingo's default)",
            "resampler_projected": "ResamplerConfig(dim=576, depth=2, num_latents=16)",
            "batch": args.batch,
            "tokens": args.tokens,
            "images_per_sequence": 1,
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "repeats": args.repeats,
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
            "load_seconds": round(load_s, 1),
            "bench_seconds": round(time.perf_counter() - t_start, 1),
        },
        "trainable_params": trainable_counts(variants),
        "train_step_gflop": flops,
        "train_step_gflop_ratios": {
            "ours_over_openflamingo": ratio(flops.get("ours"), flops.get("openflamingo")),
            "ours_projected_over_openflamingo": ratio(flops.get("ours_projected"), flops.get("openflamingo")),
            "ours_over_openflamingo_frozen_emb": ratio(flops.get("ours"), flops.get("openflamingo_frozen_emb")),
        } if flops else None,
        "train_step_seconds_median": {n: rnd(v) for n, v in train_med.items()},
        "train_step_seconds_all": {n: [round(x, 4) for x in v] for n, v in train.items()},
        "forward_seconds_median": {n: rnd(v) for n, v in fwd_med.items()}
        | ({"ours_lm_with_blocks_given_visual": rnd(med(fwd_blocks)), "bare_lm": rnd(med(fwd_bare))} if fwd_bare else {}),
        "ratios": {
            "train_ours_over_openflamingo": ratio(train_med.get("ours"), train_med.get("openflamingo")),
            "train_ours_projected_over_openflamingo": ratio(train_med.get("ours_projected"), train_med.get("openflamingo")),
            "train_ours_over_openflamingo_frozen_emb": ratio(train_med.get("ours"), train_med.get("openflamingo_frozen_emb")),
            "forward_ours_over_openflamingo": ratio(fwd_med.get("ours"), fwd_med.get("openflamingo")),
            "overhead_forward_blocks_over_bare_lm": ratio(med(fwd_blocks), med(fwd_bare)),
            "overhead_forward_full_ours_over_bare_lm": ratio(fwd_med.get("ours"), med(fwd_bare)),
            "overhead_forward_full_ours_projected_over_bare_lm": ratio(fwd_med.get("ours_projected"), med(fwd_bare)),
            "overhead_forward_full_openflamingo_over_bare_lm": ratio(fwd_med.get("openflamingo"), med(fwd_bare)),
        },
        "cpu_seconds_median": {k: rnd(med(v)) for k, v in CPU_TIMES.items()},
        "cpu_ratios": {
            "train_ours_over_openflamingo": ratio(med(CPU_TIMES.get("train/ours", [])), med(CPU_TIMES.get("train/openflamingo", []))),
            "train_ours_projected_over_openflamingo": ratio(med(CPU_TIMES.get("train/ours_projected", [])), med(CPU_TIMES.get("train/openflamingo", []))),
            "train_ours_over_openflamingo_frozen_emb": ratio(med(CPU_TIMES.get("train/ours", [])), med(CPU_TIMES.get("train/openflamingo_frozen_emb", []))),
            "overhead_forward_blocks_over_bare_lm": ratio(med(CPU_TIMES.get("forward/ours_lm_with_blocks_given_visual", [])), med(CPU_TIMES.get("forward/bare_lm", []))),
            "overhead_forward_full_ours_over_bare_lm": ratio(med(CPU_TIMES.get("forward/ours", [])), med(CPU_TIMES.get("forward/bare_lm", []))),
            "overhead_forward_full_openflamingo_over_bare_lm": ratio(med(CPU_TIMES.get("forward/openflamingo", [])), med(CPU_TIMES.get("forward/bare_lm", []))),
        } if device == "cpu" else None,
        "last_loss": {n: round(v, 4) for n, v in losses.items()},
        "goal": "train_ours_over_openflamingo <= 0.8",
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
