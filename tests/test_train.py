"""Training: a tiny end-to-end run with the feature cache, checkpoints and exact resume."""
from __future__ import annotations

import json

import pytest
import torch

from engine.checkpoint import list_checkpoints
from engine.testing import tiny_model
from engine.train import Trainer
from engine.train_config import parse_train_config
from tests.train_fixtures import tiny_train_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _trainer(cfg_dict, resume=True):
    return Trainer(parse_train_config(cfg_dict), model=tiny_model(), resume=resume)


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_checkpoints_and_exact_resume(corpus, tmp_path):
    full = tmp_path / "full"
    _trainer(tiny_train_config(corpus, full, **{"run.max_steps": 6})).fit()
    want = _losses(full)
    assert len(want) == 6 and all(l > 0 for l in want)
    assert [s for s, _ in list_checkpoints(full)] == [4, 6]  # keep_last 2
    assert (full / "model" / "flamingo.safetensors").is_file() and (full / "loss.png").is_file()
    assert any((corpus / ".feature_cache").rglob("*.safetensors"))

    part = tmp_path / "part"
    _trainer(tiny_train_config(corpus, part, **{"run.max_steps": 4})).fit()  # stops at 4 ...
    t = _trainer(tiny_train_config(corpus, part, **{"run.max_steps": 6}))  # ... resumes from step-4
    assert t.step == 4
    t.fit()
    assert _losses(part) == want  # bit-identical trajectory
    from safetensors.torch import load_file

    wa, wb = load_file(full / "model" / "flamingo.safetensors"), load_file(part / "model" / "flamingo.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
