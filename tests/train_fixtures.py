"""A tiny corpus written on the fly (the format of engine/data/readers.py) and tiny configs."""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

WORDS = "the quick brown fox jumps over the lazy dog a photo of a cat sitting on a mat red apple blue bird green hills".split()


def _image(path: Path, seed: int, size: int = 40) -> None:
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(4):
        x, y = rng.randrange(size - 8), rng.randrange(size - 8)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 8, y + 8))
    img.save(path)


def _video(path: Path, seed: int, frames: int = 4, size: int = 40) -> None:
    rng = random.Random(seed)
    imgs = [Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3))) for _ in range(frames)]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=100, loop=0)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_corpus(root: Path, n_pairs: int = 12, n_docs: int = 6, n_videos: int = 4, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (root / "media").mkdir(parents=True, exist_ok=True)
    pairs, docs, videos = [], [], []
    for i in range(n_pairs):
        _image(root / "media" / f"p{i}.png", seed * 1000 + i)
        pairs.append({"media": [f"media/p{i}.png"], "text": f"<image>{_sentence(rng, 6)}.<EOC>"})
    for i in range(n_docs):
        media, parts = [], [_sentence(rng, 5) + ". "]
        for j in range(3 + i % 5):
            name = f"media/d{i}_{j}.png"
            _image(root / name, seed * 1000 + 100 + 10 * i + j)
            media.append(name)
            parts.append(f"<image>{_sentence(rng, 8)}.<EOC>")
        docs.append({"media": media, "text": "".join(parts)})
    for i in range(n_videos):
        _video(root / "media" / f"v{i}.gif", seed * 1000 + 500 + i)
        videos.append({"media": [f"media/v{i}.gif"], "text": f"<image>{_sentence(rng, 5)}.<EOC>"})
    for name, rows in (("pairs", pairs), ("interleaved", docs), ("videos", videos)):
        (root / f"{name}.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_train_config(corpus: Path, run_dir: Path, **over) -> dict:
    cfg = {
        "data": {
            "root": str(corpus),
            "num_frames": 2,
            "datasets": [
                {"name": "m3w", "kind": "interleaved", "path": "interleaved.train.jsonl", "weight": 1.0, "batch_size": 2, "max_tokens": 48},
                {"name": "ltip", "kind": "pairs", "path": "pairs.train.jsonl", "weight": 0.2, "batch_size": 2},
                {"name": "vtp", "kind": "video", "path": "videos.train.jsonl", "weight": 0.03, "batch_size": 2},
            ],
        },
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "run": {"dir": str(run_dir), "max_steps": 4, "save_every": 2, "keep_last": 2, "device": "cpu",
                "mixed_precision": "no", "progress": False},
    }
    for dotted, v in over.items():
        d = cfg
        *parents, last = dotted.split(".")
        for k in parents:
            d = d.setdefault(k, {})
        d[last] = v
    return cfg
