"""Training: a tiny end-to-end run with the feature cache, checkpoints and exact resume."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

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
    gates = {k: v for k, v in json.loads((full / "metrics.jsonl").read_text().splitlines()[-1]).items() if k.startswith("gate_")}
    saved = load_file(full / "model" / "flamingo.safetensors")  # the final weights: the last step's gates
    assert any(gates.values()) and gates == pytest.approx({f"gate_{k.split('.')[2][:-5]}/{k.split('.')[1]}": float(v.tanh())
                                             for k, v in saved.items() if k.endswith("_gate")})
    assert (full / "gates.png").stat().st_size > 0
    assert any((corpus / ".feature_cache").rglob("*.safetensors"))

    part = tmp_path / "part"
    _trainer(tiny_train_config(corpus, part, **{"run.max_steps": 4})).fit()  # stops at 4 ...
    t = _trainer(tiny_train_config(corpus, part, **{"run.max_steps": 6}))  # ... resumes from step-4
    assert t.step == 4
    t.fit()
    assert _losses(part) == want  # bit-identical trajectory

    wa, wb = load_file(full / "model" / "flamingo.safetensors"), load_file(part / "model" / "flamingo.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_resumed_run_can_add_a_decay_phase(corpus, tmp_path):
    """A constant-rate run resumed with a larger max_steps and decay_steps anneals to 0 from
    the checkpoint on: the first resumed step already uses the decayed rate."""
    run = tmp_path / "run"
    _trainer(tiny_train_config(corpus, run, **{"run.max_steps": 4, "optim.warmup_steps": 0})).fit()
    t = _trainer(tiny_train_config(corpus, run, **{"run.max_steps": 8, "optim.warmup_steps": 0, "optim.decay_steps": 4}))
    assert t.step == 4
    t.fit()
    logged = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    lr = t.cfg.optim.lr
    assert [m["lr"] for m in logged] == pytest.approx([lr] * 4 + [lr, 0.75 * lr, 0.5 * lr, 0.25 * lr])


def test_metrics_log_each_hinge_apart_from_the_next_token_loss(corpus, tmp_path):
    raw = tiny_train_config(corpus, tmp_path / "run", **{"run.max_steps": 2})
    raw["data"]["datasets"][0].update(image_contrast=0.5, query_contrast=1.0)
    _trainer(raw).fit()
    logged = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in logged:
        assert {"nll/m3w", "hinge_image/m3w", "hinge_query/m3w"} <= set(m)
        assert not any(k.endswith("/ltip") and not k.startswith("loss/") for k in m)  # no hinge: only its loss
        assert m["loss/m3w"] == pytest.approx(m["nll/m3w"] + 0.5 * m["hinge_image/m3w"] + m["hinge_query/m3w"], rel=1e-5)
        assert m["hinge_image/m3w"] >= 0 and m["hinge_query/m3w"] >= 0
    from engine.train_plot import plot_metrics

    assert plot_metrics(tmp_path / "run" / "metrics.jsonl", tmp_path / "curve.png").stat().st_size > 0  # hinges drawn dotted


def test_lazy_feature_cache_stores_only_what_batches_used(tmp_path):
    corpus = write_corpus(tmp_path / "c")
    raw = tiny_train_config(corpus, tmp_path / "run", **{"run.max_steps": 1, "data.precompute_features": False})
    t = _trainer(raw)
    t.fit()
    files = list((corpus / ".feature_cache").rglob("*.safetensors"))
    assert 0 < len(files) < len(list((corpus / "media").iterdir()))
    assert t.cache.misses == len(files)


def test_gradient_checkpointing_gives_the_same_gradients(corpus, tmp_path):
    from engine.objective import FlamingoLoss

    raw = tiny_train_config(corpus, tmp_path / "r")
    t = _trainer(raw, resume=False)
    b = t.feeds[0].next_batch()
    grads = []
    for ckpt in (False, True):
        model = tiny_model(gates=0.3)
        model.set_gradient_checkpointing(ckpt)
        model.train()
        FlamingoLoss(model)(b.input_ids, b.attention_mask, b.labels, features=b.features).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


def test_bos_follows_the_tokenizer():
    from engine.data.readers import Record
    from engine.data.sampling import SequenceSampler
    from engine.testing import tiny_tokenizer
    from engine.tokens import add_flamingo_tokens

    tok = tiny_tokenizer()
    media_id, _ = add_flamingo_tokens(tok)
    rec = Record(["x"], "<image>a cat<EOC>", "pairs")
    assert SequenceSampler(tok, media_id, "pairs")(rec).input_ids[0] == media_id  # adds none on encode: none here
    tok.bos_token = "<|endoftext|>"
    forced = SequenceSampler(tok, media_id, "pairs", add_bos=True)(rec).input_ids
    assert forced[0] == tok.bos_token_id and forced[1] == media_id


def test_eval_prompts_start_as_training_sequences_do():
    """A BOS the tokenizer does not add on its own (SmolLM2's is <|im_start|>) must not open
    evaluation prompts either: the model never saw it before an <image> in training."""
    from types import SimpleNamespace

    from engine.data.readers import Record
    from engine.data.sampling import SequenceSampler
    from engine.eval.scoring import encode_text
    from engine.testing import tiny_tokenizer
    from engine.tokens import add_flamingo_tokens

    tok = tiny_tokenizer()
    media_id, _ = add_flamingo_tokens(tok)
    tok.bos_token = "<|endoftext|>"  # has a BOS, but a plain encode does not add it
    assert tok("a")["input_ids"][:1] != [tok.bos_token_id]
    model = SimpleNamespace(tokenizer=tok)
    rec = Record(["x"], "<image>a cat<EOC>", "pairs")
    assert encode_text(model, "<image>a cat<EOC>") == SequenceSampler(tok, media_id, "pairs")(rec).input_ids
    assert encode_text(model, "<image>")[0] == media_id


def test_standardize_features_statistics_come_from_the_training_media(corpus, tmp_path):
    from safetensors.torch import load_file

    from engine.model import WEIGHTS_NAME, FlamingoModel

    model = tiny_model()
    cfg = dataclasses.replace(model.config, resampler=dataclasses.replace(model.config.resampler, standardize_features=True))
    model = FlamingoModel(cfg, model.lm, model.tokenizer, model.vision)
    raw = tiny_train_config(corpus, tmp_path / "run", **{"run.max_steps": 1})
    t = Trainer(parse_train_config(raw), model=model)
    mean, std = model.resampler.feature_mean, model.resampler.feature_std
    assert not torch.allclose(mean, torch.zeros_like(mean)) and not torch.allclose(std, torch.ones_like(std))
    t.fit()
    out = tmp_path / "saved"
    model.save_pretrained(out)
    fresh = tiny_model(seed=1)
    again = FlamingoModel(cfg, fresh.lm, fresh.tokenizer, fresh.vision)
    again.load_trainable_state_dict(load_file(out / WEIGHTS_NAME))
    assert torch.equal(again.resampler.feature_mean, mean) and torch.equal(again.resampler.feature_std, std)
    with torch.no_grad():
        again.resampler.feature_mean.fill_(0.5)  # a model that has statistics keeps them
    Trainer(parse_train_config(tiny_train_config(corpus, tmp_path / "run2")), model=again)
    assert torch.all(again.resampler.feature_mean == 0.5)


def test_export_writes_the_latest_checkpoint_without_touching_the_run(corpus, tmp_path):
    from safetensors.torch import load_file

    from engine.model import WEIGHTS_NAME
    from engine.train import export_checkpoint

    run = tmp_path / "run"
    raw = tiny_train_config(corpus, run, **{"run.max_steps": 3, "run.save_every": 2})
    _trainer(raw).fit()  # checkpoints at steps 2 and 3
    metrics = (run / "metrics.jsonl").read_text()
    raw = tiny_train_config(corpus, run, **{"run.max_steps": 3, "run.save_every": 2})
    cfg = parse_train_config(raw)
    out = tmp_path / "exported"
    model = tiny_model(seed=3)
    assert export_checkpoint(cfg, out, resume=str(run / "checkpoints" / "step-2"), model=model) == 2
    params = dict(model.named_parameters())
    for name, w in load_file(run / "checkpoints" / "step-2" / "trainable.safetensors").items():
        assert torch.equal(params[name], w), name  # the checkpoint's weights, not the seed-3 ones
    saved = load_file(out / WEIGHTS_NAME)
    own = model.trainable_state_dict()
    assert saved.keys() == own.keys() and all(torch.equal(saved[k], own[k]) for k in own)
    assert (run / "metrics.jsonl").read_text() == metrics  # the run's log is left alone
    with pytest.raises(ValueError, match="no checkpoint"):
        export_checkpoint(parse_train_config(tiny_train_config(corpus, tmp_path / "empty")), out, model=tiny_model())
