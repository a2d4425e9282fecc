"""A 10-turn chat with a new picture each turn: our ChatEngine with its caches, without them, and
OpenFlamingo 2.0.1 (`open_flamingo`, its own generate) on the same weights. Prints JSON.

    .venv/bin/python bench/chat.py [--turns 10] [--tokens 20] [--threads N] [--skip-openflamingo] [--model assets/model]

Setup: SmolLM2-135M-Instruct + EfficientNet-Lite0, a gated block before every 4th decoder layer,
OpenFlamingo's resampler (depth 6, 64 latents). The trainable weights are a randomised OpenFlamingo
(non-zero gates) converted to ours with engine.openflamingo, so both models compute the same
function; without open_flamingo, seeded random weights with gates set to 0.5. Each turn sends the
whole history again plus one new image and asks for exactly --tokens tokens (greedy, stop tokens
ignored).
Both sides get one untimed warm-up turn first; both suppress a generated <image>, and neither
ends a chunk early (OpenFlamingo's generate(min_new_tokens=...) bans its EOS <|endofchunk|>; our
engines ban <EOC> likewise), so the two produce the same replies (`replies_identical_to_
openflamingo`). BENCH_KEEP=1 keeps the work folder (images, converted weights, replies).

Measured (each model in its own process, so peak RSS is its own):
  ttft_s          stream() call -> first token (render, media encode, prefill, first sample)
  decode_tok_s    tokens/s between the first and the last token of a reply, end to end
                  (model, sampler, streaming detokenizer)
  model_decode_tok_s / bare_decode_tok_s
                  FlamingoModel decode steps with the turn's media vs the bare LM (the same
                  module, called without media, so no gated block runs) at the same context,
                  medians of interleaved repeats
  total_s         the 10 turns end to end; cached vs uncached (prefix_cache=False, no media LRU)
  peak_rss_mb     ru_maxrss of the process after the cached chat (model load included)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

QUESTIONS = ["What is in this picture?", "And in this one?", "How does it compare with the first?", "Describe the colours.",
             "What stands out here?", "Is this one brighter?", "Anything unusual?", "Summarise it in a few words.",
             "Which one do you like best?", "Thanks! One last look?"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--tokens", type=int, default=20, help="tokens generated per turn (exactly)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the model-level decode timing")
    p.add_argument("--decode-turns", default="1,4,7,10", help="turns at whose context decode speed is compared with the bare LM")
    p.add_argument("--skip-openflamingo", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (our model only; OpenFlamingo runs on the CPU)")
    p.add_argument("--model", default=None, help="a saved Flamingo model folder (e.g. assets/model, the built-in model) instead of the OpenFlamingo-shaped one; OpenFlamingo is skipped (other architecture)")
    p.add_argument("--lm-dir", default=None, help="a folder with an LM config and tokenizer: random weights of that shape instead of the built-in SmolLM2 (machines without it)")
    p.add_argument("--worker", choices=("ours", "openflamingo"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_images(directory: Path, n: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = 240, 320
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * (i + 1)) % 256, (y * (7 - i % 7)) % 256, ((x + y) * 3 + 40 * i) % 256], -1)
        img = np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        path = directory / f"picture{i}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(str(path))
    return paths


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----- ours -------------------------------------------------------------------------------------------
def load_ours(workdir: Path, lm_dir: str | None = None, saved: str | None = None):
    from safetensors.torch import load_file

    from engine.config import FlamingoConfig
    from engine.model import FlamingoModel
    from engine.testing import set_gates

    if saved:
        return FlamingoModel.from_pretrained(saved), f"saved model {saved}"
    weights = workdir / "ours.safetensors"
    converted = weights.is_file()
    config = FlamingoConfig.load(workdir / "ours_config.json") if converted else FlamingoConfig()
    if lm_dir:
        from engine.vision import EfficientNetLite0Tower

        lm, tokenizer = load_lm_dir(lm_dir)
        model = FlamingoModel(config, lm, tokenizer, EfficientNetLite0Tower())
    else:
        torch.manual_seed(0)
        model = FlamingoModel.from_config(config)
    if converted:
        model.load_trainable_state_dict(load_file(weights))
        return model, "randomised OpenFlamingo, converted" + (f" (random LM shaped as {lm_dir})" if lm_dir else "")
    set_gates(model, 0.5)
    return model, "seeded random, gates 0.5" + (f" (random LM shaped as {lm_dir})" if lm_dir else "")


def load_lm_dir(lm_dir: str):
    """A random LM (seed 0) of the shape in lm_dir's config, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from engine.lm import freeze

    torch.manual_seed(0)
    return freeze(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(lm_dir))), AutoTokenizer.from_pretrained(lm_dir)


class Clock:
    """Wall and process CPU time together (CPU time is what a busy shared machine does not
    distort: with one torch thread it is the time this process computed). Syncs CUDA."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()


def rate(n: int, start, end) -> dict:
    return {"wall": round(n / max(end[0] - start[0], 1e-9), 2), "cpu": round(n / max(end[1] - start[1], 1e-9), 2)}


def decode_rates(engine, stream, tokens: int, repeats: int) -> dict:
    """Tokens/s of `tokens` decode steps after prefilling the turn's prompt, medians of
    interleaved repeats: FlamingoModel with the turn's media, the bare LM in the same loop with
    the same cache class (the same module called without media: no gated block runs), and the
    bare LM through transformers' generate() with its default DynamicCache."""
    from transformers import DynamicCache

    from engine.generation import new_kv_cache

    model, dev = engine.model, engine.placement.device
    clock = Clock(dev)
    x = torch.tensor([stream.prompt.ids], device=dev)
    vocab = model.lm.get_input_embeddings().num_embeddings
    plain = x.clone()
    plain[plain >= vocab] = model.tokenizer.eos_token_id
    media, lo = engine.media_context(stream.items, x, 0)
    with torch.inference_mode():
        fl_cache, bare_cache, gen_cache = new_kv_cache(model.lm.config), new_kv_cache(model.lm.config), DynamicCache(config=model.lm.config)
        model(x, media=media, past_key_values=fl_cache, use_cache=True, logits_to_keep=1)
        model.lm(input_ids=plain, past_key_values=bare_cache, use_cache=True, logits_to_keep=1)
        model.lm(input_ids=plain[:, :-1], past_key_values=gen_cache, use_cache=True, logits_to_keep=1)
    step_media = media.with_index(torch.full((1, 1), len(stream.items) - 1 - lo, device=dev))
    eos = model.tokenizer.eos_token_id
    runs = {"flamingo": [], "bare": [], "bare_generate": []}
    tok = torch.tensor([[eos]], device=dev)
    for r in range(repeats + 1):  # the first round warms up
        with torch.inference_mode():
            t = clock()
            for _ in range(tokens):
                logits = model(tok, media=step_media, past_key_values=fl_cache, use_cache=True, logits_to_keep=1).logits
                tok = logits[:, -1].argmax(-1, keepdim=True).clamp(max=vocab - 1)  # a token the bare LM knows too
            runs["flamingo"].append(rate(tokens, t, clock()))
            fl_cache.crop(-tokens)
            t = clock()
            for _ in range(tokens):
                logits = model.lm(input_ids=tok, past_key_values=bare_cache, use_cache=True, logits_to_keep=1).logits
                tok = logits[:, -1].argmax(-1, keepdim=True)
            runs["bare"].append(rate(tokens, t, clock()))
            bare_cache.crop(-tokens)
            t = clock()
            model.lm.generate(input_ids=plain, past_key_values=gen_cache, max_new_tokens=tokens, min_new_tokens=tokens,
                              do_sample=False, pad_token_id=eos, eos_token_id=None)
            runs["bare_generate"].append(rate(tokens, t, clock()))
            gen_cache.crop(plain.shape[1] - 1 - gen_cache.get_seq_length())
    out = {}
    for name, rs in runs.items():
        for kind in ("wall", "cpu"):
            out[f"{name}_tok_s_{kind}"] = statistics.median(r[kind] for r in rs[1:])
    return out


def run_chat(engine, images, args, session_id, measure_decode=()):
    from engine.conversation import Conversation, GenerationSettings, Turn

    settings = GenerationSettings(max_new_tokens=args.tokens, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)
    clock = Clock(engine.placement.device)
    conv = Conversation()
    turns, texts = [], []
    total_wall = total_cpu = 0.0
    for i, image in enumerate(images):
        conv.turns.append(Turn("user", QUESTIONS[i % len(QUESTIONS)], [image]))
        t0 = clock()
        stream = engine.stream(conv, settings, session_id=session_id, stop=False)
        text = "".join(stream)
        t2 = clock()
        total_wall += t2[0] - t0[0]
        total_cpu += t2[1] - t0[1]
        st = stream.stats
        first = (st["first_token"], st["first_token_cpu"])
        row = {
            "turn": i + 1, "images": st["media"], "prompt_tokens": st["prompt_tokens"],
            "reused_tokens": st["reused_tokens"], "new_tokens": st["new_tokens"], "generated_tokens": len(stream.tokens),
            "ttft_s": round(first[0] - t0[0], 4), "ttft_cpu_s": round(first[1] - t0[1], 4),
            "decode_tok_s": rate(len(stream.tokens) - 1, first, (st["finished"], st["finished_cpu"])),
            "turn_s": round(t2[0] - t0[0], 4), "turn_cpu_s": round(t2[1] - t0[1], 4),
        }
        if measure_decode and i + 1 in measure_decode:
            row["model_decode"] = decode_rates(engine, stream, args.tokens, args.repeats)
        turns.append(row)
        texts.append(stream.tokens)
        conv.turns.append(Turn("assistant", text))
    return {"turns": turns, "total_s": round(total_wall, 3), "total_cpu_s": round(total_cpu, 3)}, texts, conv


def worker_ours(args, workdir: Path) -> dict:
    from engine.chat import ChatEngine
    from engine.device import resolve

    images = json.loads((workdir / "images.json").read_text())
    warmup, images = images["warmup"], images["chat"][: args.turns]
    t = time.perf_counter()
    model, weights = load_ours(workdir, args.lm_dir, args.model)
    placement = resolve(args.device)
    cached = ChatEngine(model, placement, name="bench")
    uncached = ChatEngine(model, placement, cache_size=0, prefix_cache=False)
    decode_engine = ChatEngine(model, placement)
    for engine in (cached, uncached, decode_engine):
        # As OpenFlamingo's generate(min_new_tokens=...) does with its EOS (<|endofchunk|>): no
        # end-of-chunk before the last token, so both models produce the same tokens.
        engine.banned_ids = engine.banned_ids + (model.eoc_token_id,)
    load_s = time.perf_counter() - t
    rss_loaded = rss_mb()
    for engine in (cached, uncached):  # first calls (lazy initialisation, CUDA kernels) are not timed
        run_chat(engine, [warmup], args, "warmup")
    cached_result, cached_tokens, conv = run_chat(cached, images, args, "bench")
    cached_result["peak_rss_mb"] = round(rss_mb(), 1)
    cached_result["rss_after_load_mb"] = round(rss_loaded, 1)
    cached_result["media_cache"] = cached.media.items.stats()
    uncached_result, uncached_tokens, _ = run_chat(uncached, images, args, "bench")
    # Decode speed against the bare LM, per turn's context, after the timed chats.
    turns_to_measure = {int(x) for x in args.decode_turns.split(",") if x.strip()}
    decode_result, _, _ = run_chat(decode_engine, images, args, "decode", measure_decode=turns_to_measure)
    (workdir / "ours_texts.json").write_text(json.dumps([t.text for t in conv.turns if t.role == "assistant"]))
    return {
        "weights": weights,
        "device": cached.describe()["device"], "dtype": cached.describe()["dtype"],
        "load_s": round(load_s, 2),
        "params": model.parameter_counts(),
        "cached": cached_result,
        "uncached": uncached_result,
        "decode_vs_bare": [{"turn": r["turn"], "images": r["images"], "context": r["prompt_tokens"], **r["model_decode"]} for r in decode_result["turns"] if "model_decode" in r],
        "cached_equals_uncached_tokens": cached_tokens == uncached_tokens,
    }


# ----- OpenFlamingo -------------------------------------------------------------------------------------
class _Clock:
    """A generate() streamer that notes when the prompt and each new token arrive."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append((time.perf_counter(), time.process_time()))

    def end(self):
        pass


def worker_openflamingo(args, workdir: Path) -> dict:
    from safetensors.torch import save_file

    from bench._openflamingo import build_openflamingo, randomize_openflamingo
    from engine.conversation import Example, Turn  # noqa: F401
    from engine.lm import load_lm
    from engine.openflamingo import convert_state_dict, openflamingo_token_ids
    from engine.prompt import ChatFormat
    from engine.vision import EfficientNetLite0Tower, images_to_tensor

    images = json.loads((workdir / "images.json").read_text())
    warmup, images = images["warmup"], images["chat"][: args.turns]
    t = time.perf_counter()
    lm, tok = load_lm_dir(args.lm_dir) if args.lm_dir else load_lm("smollm2")
    tower = EfficientNetLite0Tower()
    torch.manual_seed(0)
    of, of_tok = build_openflamingo(lm, tok, tower, cross_attn_every_n_layers=4)
    randomize_openflamingo(of, seed=0)
    of.eval()
    load_s = time.perf_counter() - t
    media_id, eoc_id = openflamingo_token_ids(of_tok)
    conv = convert_state_dict(of.state_dict(), media_id, eoc_id, tied=bool(lm.config.tie_word_embeddings), every_n_layers=4)
    conv.config.save(workdir / "ours_config.json")
    save_file({k: v.contiguous() for k, v in conv.state_dict.items()}, workdir / "ours.safetensors")

    fmt = ChatFormat(of_tok, "<image>", "<|endofchunk|>")
    from engine.media import load_image

    with torch.inference_mode():  # first calls are not timed
        w = torch.tensor([of_tok(fmt.render([], [Turn("user", "Hi", [warmup])]), add_special_tokens=False)["input_ids"]])
        of.generate(images_to_tensor([load_image(warmup)], tower.image_size)[None, :, None], w, attention_mask=torch.ones_like(w),
                    max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, num_beams=1, pad_token_id=of_tok.pad_token_id)
    clock_now = Clock("cpu")
    turns, rows, texts = [], [], []
    total_wall = total_cpu = 0.0
    pixels = []
    for i, image in enumerate(images):
        turns.append(Turn("user", QUESTIONS[i % len(QUESTIONS)], [image]))
        clock = _Clock()
        t0 = clock_now()
        # What OpenFlamingo users do: the whole history again, every picture encoded again.
        pixels.append(images_to_tensor([load_image(image)], tower.image_size)[0])
        text = fmt.render([], turns)
        ids = torch.tensor([of_tok(text, add_special_tokens=False)["input_ids"]])
        vision_x = torch.stack(pixels)[None, :, None]  # (1, N, 1, 3, H, W)
        with torch.inference_mode():
            # suppress <image> as our engine does (a generated marker would need a picture)
            out = of.generate(vision_x, ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                              do_sample=False, num_beams=1, streamer=clock, pad_token_id=of_tok.pad_token_id, suppress_tokens=[media_id])
        t1 = clock_now()
        total_wall += t1[0] - t0[0]
        total_cpu += t1[1] - t0[1]
        new = out[0, ids.shape[1]:].tolist()
        reply = of_tok.decode(new, skip_special_tokens=True)
        texts.append(reply)
        ts = clock.times  # [prompt, token 1, token 2, ...]
        rows.append({
            "turn": i + 1, "images": len(pixels), "prompt_tokens": ids.shape[1], "generated_tokens": len(new),
            "ttft_s": round(ts[1][0] - t0[0], 4), "ttft_cpu_s": round(ts[1][1] - t0[1], 4),
            "decode_tok_s": rate(len(ts) - 2, ts[1], ts[-1]),
            "turn_s": round(t1[0] - t0[0], 4), "turn_cpu_s": round(t1[1] - t0[1], 4),
        })
        turns.append(Turn("assistant", reply))
    (workdir / "openflamingo_texts.json").write_text(json.dumps(texts))
    return {"load_s": round(load_s, 2), "turns": rows, "total_s": round(total_wall, 3), "total_cpu_s": round(total_cpu, 3), "peak_rss_mb": round(rss_mb(), 1)}


# ----- driver -------------------------------------------------------------------------------------------
def run_worker(kind: str, args, workdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--workdir", str(workdir),
           "--turns", str(args.turns), "--tokens", str(args.tokens), "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--decode-turns", args.decode_turns, "--device", args.device] + (["--lm-dir", args.lm_dir] if args.lm_dir else []) \
        + (["--model", args.model] if args.model else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}", "stderr_tail": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarise(ours: dict, of: dict | None) -> dict:
    c, u, d = ours["cached"], ours["uncached"], ours["decode_vs_bare"]
    t = c["turns"]
    s = {}
    for kind, key in (("wall", "ttft_s"), ("cpu", "ttft_cpu_s")):
        s[f"ttft_turn10_over_turn1_{kind}"] = {
            "cached": round(t[-1][key] / t[0][key], 3),
            "uncached": round(u["turns"][-1][key] / u["turns"][0][key], 3),
        }
    s["ttft_s_turn1_turn10_cached"] = {"wall": [t[0]["ttft_s"], t[-1]["ttft_s"]], "cpu": [t[0]["ttft_cpu_s"], t[-1]["ttft_cpu_s"]]}
    s["ttft_s_turn1_turn10_uncached"] = {"wall": [u["turns"][0]["ttft_s"], u["turns"][-1]["ttft_s"]], "cpu": [u["turns"][0]["ttft_cpu_s"], u["turns"][-1]["ttft_cpu_s"]]}
    for kind in ("wall", "cpu"):
        s[f"decode_ratio_{kind}"] = {
            "flamingo_vs_bare_same_loop": [round(r[f"flamingo_tok_s_{kind}"] / r[f"bare_tok_s_{kind}"], 3) for r in d],
            "flamingo_vs_bare_hf_generate": [round(r[f"flamingo_tok_s_{kind}"] / r[f"bare_generate_tok_s_{kind}"], 3) for r in d],
            "engine_stream_vs_bare_hf_generate": [round(t[x["turn"] - 1]["decode_tok_s"][kind] / x[f"bare_generate_tok_s_{kind}"], 3) for x in d],
            "turns": [x["turn"] for x in d],
        }
    s["decode_tok_s_engine_stream_per_turn"] = {k: [r["decode_tok_s"][k] for r in t] for k in ("wall", "cpu")}
    s["total_10_turns_s"] = {"cached": {"wall": c["total_s"], "cpu": c["total_cpu_s"]}, "uncached": {"wall": u["total_s"], "cpu": u["total_cpu_s"]}}
    s["speedup_cached_vs_uncached"] = {"wall": round(u["total_s"] / c["total_s"], 2), "cpu": round(u["total_cpu_s"] / c["total_cpu_s"], 2)}
    s["peak_rss_mb_cached_chat"] = c["peak_rss_mb"]
    s["cached_equals_uncached_tokens"] = ours["cached_equals_uncached_tokens"]
    if of and "total_s" in of:
        s["total_10_turns_s"]["openflamingo"] = {"wall": of["total_s"], "cpu": of["total_cpu_s"]}
        s["speedup_cached_vs_openflamingo"] = {"wall": round(of["total_s"] / c["total_s"], 2), "cpu": round(of["total_cpu_s"] / c["total_cpu_s"], 2)}
        s["peak_rss_mb_openflamingo"] = of["peak_rss_mb"]
    return s


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        workdir = Path(args.workdir)
        result = worker_ours(args, workdir) if args.worker == "ours" else worker_openflamingo(args, workdir)
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        if os.environ.get("BENCH_KEEP"):
            tmp = tempfile.mkdtemp(prefix="bench-chat-kept-")
        workdir = Path(tmp)
        paths = make_images(workdir, args.turns + 1)
        (workdir / "images.json").write_text(json.dumps({"chat": paths[:-1], "warmup": paths[-1]}))
        of = None if (args.skip_openflamingo or args.model) else run_worker("openflamingo", args, workdir)
        ours = run_worker("ours", args, workdir)
        same = None
        if (workdir / "openflamingo_texts.json").is_file() and (workdir / "ours_texts.json").is_file():
            a = json.loads((workdir / "ours_texts.json").read_text())
            b = json.loads((workdir / "openflamingo_texts.json").read_text())
            same = sum(x.strip() == y.strip() for x, y in zip(a, b))
    report = {
        "setup": {"lm": "SmolLM2-135M-Instruct", "vision": "EfficientNet-Lite0", "model": args.model or "OpenFlamingo-shaped (cross-attention every 4th layer)", "turns": args.turns,
                  "tokens_per_turn": args.tokens, "threads": torch.get_num_threads() if not args.threads else args.threads,
                  "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
        "ours": ours,
        "openflamingo": of,
    }
    if "error" not in ours:
        report["summary"] = summarise(ours, of)
        if same is not None:
            report["summary"]["replies_identical_to_openflamingo"] = f"{same}/{args.turns}"
    print(json.dumps(report, indent=1))
    return 0 if "error" not in ours else 1


if __name__ == "__main__":
    sys.exit(main())
