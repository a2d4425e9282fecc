"""mode: contrastive -- a few steps on a tiny tower reduce the symmetric InfoNCE loss."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from engine.contrastive import ContrastiveTrainer, caption_of
from engine.testing import tiny_tokenizer
from engine.tokens import add_flamingo_tokens
from engine.train_config import parse_train_config
from engine.vision import TinyVisionTower
from tests.train_fixtures import tiny_train_config, write_corpus


def test_contrastive_steps_reduce_the_loss_and_save_the_tower(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_pairs=8, n_docs=1, n_videos=1)
    raw = tiny_train_config(corpus, tmp_path / "run", **{
        "mode": "contrastive", "run.max_steps": 25, "run.save_every": 10, "optim.lr": 3e-3, "optim.warmup_steps": 0,
        "data.feature_cache": False, "optim.freeze_vision": False,
        "contrastive": {"text_dim": 32, "text_layers": 1, "text_heads": 2, "embed_dim": 32, "max_tokens": 16}})
    raw["data"]["datasets"] = [{"name": "pairs", "kind": "pairs", "path": "pairs.train.jsonl", "batch_size": 8}]
    cfg = parse_train_config(raw)
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    tower = TinyVisionTower(32, seed=0)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    t = ContrastiveTrainer(cfg, tower=tower, tokenizer=tok, resume=False)
    losses = [t.train_step()["loss"] for _ in range(25)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3, losses
    assert any(not torch.equal(before[k], v) for k, v in tower.state_dict().items())  # the tower itself adapted
    t.save_tower()
    saved = load_file(tmp_path / "run" / "tower" / "vision.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in tower.state_dict().items())
    assert caption_of("<image>a cat.<EOC>") == "a cat."
