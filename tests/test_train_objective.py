"""The weighted objective, step strategies, optimiser groups and config validation."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.model import FlamingoModel
from engine.objective import DatasetFeed, FlamingoLoss, OnePassLoss, step_plan
from engine.testing import tiny_model
from engine.train import Trainer, param_groups
from engine.train_config import ParamGroupConfig, dataset_path, parse_train_config
from tests.train_fixtures import tiny_train_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _capture_grads(trainer):
    """Records the gradients each optimiser step sees."""
    seen = []
    original = trainer.optimizer.step

    def step(*a, **k):
        seen.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return original(*a, **k)

    trainer.optimizer.step = step
    return seen


def test_step_plan():
    assert step_plan(0, [1, 0.2, 0.03], "accumulation") == [0, 1, 2]
    assert [step_plan(s, [1, 0.2, 0.03], "round_robin") for s in range(4)] == [[0], [1], [2], [0]]
    assert step_plan(3, [1, 0, 0.5], "accumulation") == [0, 2]
    assert [step_plan(s, [1, 0, 0.5], "round_robin") for s in range(3)] == [[0], [2], [0]]
    with pytest.raises(ValueError, match="weight 0"):
        step_plan(0, [0, 0], "accumulation")


def test_accumulation_gradient_is_the_weighted_sum(corpus, tmp_path):
    cfg = parse_train_config(tiny_train_config(corpus, tmp_path / "r", **{"optim.max_grad_norm": 0}))
    t = Trainer(cfg, model=tiny_model(seed=1), resume=False)
    grads = _capture_grads(t)
    m = t.train_step()
    assert set(m) >= {"loss/m3w", "loss/ltip", "loss/vtp"}
    assert m["loss"] == pytest.approx(m["loss/m3w"] + 0.2 * m["loss/ltip"] + 0.03 * m["loss/vtp"])
    assert all(f.stream.cursor == f.batch_size for f in t.feeds)  # one batch of every dataset

    # the same batches by hand, from fresh feeds with the same seeds
    model = tiny_model(seed=1)
    loss_mod = FlamingoLoss(model)
    fresh = [DatasetFeed(dataclasses.replace(ds, path=str(dataset_path(cfg, ds))), model.tokenizer, model.media_token_id,
                         model.tokenizer.pad_token_id, seed=0, rank=0, world=1, cache=t.feeds[0].cache,
                         image_size=32, num_frames=2) for ds in cfg.data.datasets]
    total = 0
    for f in fresh:
        b = f.next_batch()
        total = total + f.weight * loss_mod(b.input_ids, b.attention_mask, b.labels, features=b.features)
    total.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    got = {k.removeprefix("model."): v for k, v in grads[0].items()}
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)


def test_one_pass_step_equals_the_accumulated_step(corpus, tmp_path):
    """run.one_pass: always (the GPU default) steps on the same gradients and logs the same
    losses as a pass per batch (the CPU default)."""
    steps = {}
    for one_pass in ("never", "always"):
        cfg = parse_train_config(tiny_train_config(corpus, tmp_path / one_pass, **{"optim.max_grad_norm": 0, "run.one_pass": one_pass}))
        t = Trainer(cfg, model=tiny_model(seed=1), resume=False)
        assert t.one_pass == (one_pass == "always")
        grads = _capture_grads(t)
        steps[one_pass] = (t.train_step(), grads[0])
    (m_never, g_never), (m_always, g_always) = steps["never"], steps["always"]
    assert set(m_never) == set(m_always)
    for k in m_never:
        assert m_always[k] == pytest.approx(m_never[k], rel=1e-4, abs=1e-6), k
    assert set(g_never) == set(g_always)
    for n in g_never:
        torch.testing.assert_close(g_always[n], g_never[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention, fused", [("auto", False), ("math", False), ("default", True)])
def test_cpu_training_step_uses_the_attention_kernels_asked_for(corpus, tmp_path, attention, fused):
    """run.attention auto means the matmul-softmax path on a CPU (its fused flash backward is
    slow for short sequences): the step's profile shows which kernel ran."""
    from torch.profiler import profile

    cfg = parse_train_config(tiny_train_config(corpus, tmp_path / attention, **{"run.attention": attention}))
    t = Trainer(cfg, model=tiny_model(seed=1), resume=False)
    with profile() as prof:
        t.train_step()
    ops = {e.key for e in prof.key_averages()}
    assert ("aten::_scaled_dot_product_flash_attention_for_cpu" in ops) == fused
    assert "aten::softmax" in ops or "aten::_softmax" in ops


def test_round_robin_uses_one_dataset_per_step(corpus, tmp_path):
    cfg = parse_train_config(tiny_train_config(corpus, tmp_path / "r", **{"optim.strategy": "round_robin"}))
    t = Trainer(cfg, model=tiny_model(), resume=False)
    keys = []
    for _ in range(4):
        m = t.train_step()
        keys.append(sorted(k for k in m if k.startswith("loss/")))
    assert keys == [["loss/m3w"], ["loss/ltip"], ["loss/vtp"], ["loss/m3w"]]
    assert [f.stream.cursor for f in t.feeds] == [4 % 6, 2, 2]  # m3w: two batches of 2


def test_weight_zero_dataset_adds_no_gradient(corpus, tmp_path):
    datasets = tiny_train_config(corpus, tmp_path)["data"]["datasets"]
    with_zero = tiny_train_config(corpus, tmp_path / "a", **{"optim.max_grad_norm": 0})
    with_zero["data"]["datasets"] = [dict(datasets[0]), dict(datasets[1], weight=0.0)]
    alone = tiny_train_config(corpus, tmp_path / "b", **{"optim.max_grad_norm": 0})
    alone["data"]["datasets"] = [dict(datasets[0])]
    ga = _capture_grads(ta := Trainer(parse_train_config(with_zero), model=tiny_model(), resume=False))
    gb = _capture_grads(tb := Trainer(parse_train_config(alone), model=tiny_model(), resume=False))
    for _ in range(2):
        ta.train_step(), tb.train_step()
    for a, b in zip(ga, gb):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert ta.feeds[1].stream.cursor == 0  # never drawn


def test_weight_zero_loss_has_zero_gradient(corpus, tmp_path):
    """The objective itself: 0 * loss contributes exactly nothing."""
    model = tiny_model(gates=0.5)
    cfg = parse_train_config(tiny_train_config(corpus, tmp_path))
    ds = cfg.data.datasets[1]
    f = DatasetFeed(dataclasses.replace(ds, path=str(dataset_path(cfg, ds))), model.tokenizer, model.media_token_id,
                    model.tokenizer.pad_token_id, seed=0, rank=0, world=1, cache=None, image_size=32, num_frames=2)
    b = f.next_batch()
    (0.0 * FlamingoLoss(model)(b.input_ids, b.attention_mask, b.labels, pixels=b.pixels)).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_param_groups_decay_only_weight_matrices():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    nn_ = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert any("to_kv" in n for n in dn) and any(n.endswith("ff.1.weight") for n in dn)
    assert any("gated_block" in n and n.endswith("attn.to_q.weight") for n in dn)  # the blocks' matrices decay too
    assert all(not n.endswith(("attn_gate", "ff_gate")) for n in dn)
    assert all(not any(k in n for k in ("latents", "time_embeddings", "new_token", "norm")) for n in dn)
    assert any("attn_gate" in n for n in nn_) and "resampler.latents" in nn_ and "new_token_embeddings" in nn_
    assert all("gated_block" in n for n in dn | nn_ if n.startswith("lm."))  # the frozen LM is not in the optimiser


def test_param_groups_give_gates_and_position_embeddings_their_rates():
    model = tiny_model()
    cfg = dataclasses.replace(model.config, resampler=dataclasses.replace(model.config.resampler, spatial_positions=16))
    model = FlamingoModel(cfg, model.lm, model.tokenizer, model.vision)
    groups = param_groups(model, 0.1, gate_lr=1e-2, embedding_lr=5e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g.get("lr"): {names[id(p)] for p in g["params"]} for g in groups if "lr" in g}
    assert by_lr[5e-3] == {"resampler.time_embeddings", "resampler.spatial_embeddings"}
    assert by_lr[1e-2] and all(n.endswith(("attn_gate", "ff_gate")) for n in by_lr[1e-2])
    plain = {names[id(p)] for g in groups if "lr" not in g for p in g["params"]}
    assert not plain & (by_lr[5e-3] | by_lr[1e-2]) and "resampler.latents" in plain


def test_param_groups_by_name_give_chosen_blocks_their_own_rates():
    """optim.groups: a gated block picked by its saved name (gated_blocks.<layer>.) learns at its
    own rates (lr for its weights, gate_lr for its gates) with the usual decay rules; the other
    groups keep their place first, so older checkpoints' optimiser states still fit."""
    model = tiny_model(layers=[0, 2])
    names = {id(p): n for n, p in model.named_parameters()}
    plain = param_groups(model, 0.1, gate_lr=1e-2)
    groups = param_groups(model, 0.1, gate_lr=1e-2, named=[ParamGroupConfig(match=r"^gated_blocks\.2\.", lr=3e-3, gate_lr=5e-2)])
    own = [g for g in groups if g.get("lr") in (3e-3, 5e-2)]
    own_names = {names[id(p)] for g in own for p in g["params"]}
    block2 = {id(p) for p in model.gated_blocks[2].parameters()}
    assert {id(p) for g in own for p in g["params"]} == block2
    assert {names[id(p)] for g in own if g["lr"] == 5e-2 for p in g["params"]} == {n for n in own_names if n.endswith(("attn_gate", "ff_gate"))}
    assert any(g["lr"] == 3e-3 and g["weight_decay"] == 0.1 for g in own)  # its matrices still decay
    assert all(g["weight_decay"] == 0.0 for g in own if g["lr"] == 5e-2)
    rest = groups[:len(groups) - len(own)]
    assert [g.get("lr") for g in rest] == [g.get("lr") for g in plain] and not own_names & {names[id(p)] for g in rest for p in g["params"]}
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for g in plain for p in g["params"]}
    # a group without its own gate rate gives its gates the run's gate_lr
    half = param_groups(model, 0.1, gate_lr=1e-2, named=[ParamGroupConfig(match=r"^gated_blocks\.2\.", lr=3e-3)])
    gates2 = {id(model.gated_blocks[2].attn_gate), id(model.gated_blocks[2].ff_gate)}
    assert [g["lr"] for g in half if {id(p) for p in g["params"]} == gates2] == [1e-2]


def test_unfrozen_lm_joins_the_optimiser_and_the_checkpoint(corpus, tmp_path):
    cfg = parse_train_config(tiny_train_config(corpus, tmp_path / "r", **{"optim.freeze_lm": False, "run.max_steps": 1}))
    t = Trainer(cfg, model=tiny_model(), resume=False)
    opt_params = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    lm_params = list(t.model.lm.parameters())
    assert all(id(p) in opt_params for p in lm_params)
    t.fit()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "r" / "checkpoints" / "step-1" / "trainable.safetensors")
    assert any("embed_tokens" in k for k in saved) and any("self_attn" in k for k in saved)
    assert (tmp_path / "r" / "model" / "lm" / "config.json").is_file()


@pytest.mark.parametrize("patch, message", [
    ({"optim": {"lrr": 1}}, "unknown key optim.lrr"),
    ({"run": {"max_steps": "ten"}}, "run.max_steps: expected an integer"),
    ({"optim": {"strategy": "mix"}}, "optim.strategy: 'mix' is not one of accumulation, round_robin"),
    ({"model": {"resampler": {"dimm": 3}}}, "dimm"),
    ({"model": {}, "init_from": "x"}, "either 'model' or 'init_from'"),
    ({"data": {"datasets": [{"name": "a", "path": "x", "kind": "pair"}]}}, r"datasets\[0\] \(a\).kind: 'pair'"),
    ({"data": {"datasets": [{"name": "a", "path": "x", "weight": -1}]}}, "weight must be >= 0"),
    ({"data": {"datasets": [{"name": "a"}]}}, "missing key data.datasets\\[0\\].path"),
    ({"data": {"datasets": []}}, "data.datasets is empty"),
    ({"optim": {"freeze_vision": False}}, "feature_cache needs a frozen vision tower"),
    ({"surprise": 1}, "unknown key surprise"),
    ({"optim": {"decay_steps": 10**6}}, r"optim.decay_steps must be in \[0, run.max_steps"),
    ({"model_overrides": {"resampler": {"spatial_positions": 49}}}, "model_overrides .* needs init_from"),
    ({"init_from": "x", "model": None, "model_overrides": {"resampler": {"where": 1}}}, "model_overrides: .*unknown keys"),
    ({"optim": {"embedding_lr": 0}}, "optim.embedding_lr must be > 0"),
    ({"data": {"datasets": [{"name": "a", "path": "x", "kind": "pairs", "time_contrast": 1.0}]}}, "time_contrast needs frames to reverse"),
    ({"data": {"datasets": [{"name": "a", "path": "x", "kind": "pairs", "query_contrast": 1.0}]}}, "query_contrast needs several pictures"),
    ({"data": {"datasets": [{"name": "a", "path": "x", "query_contrast": -1.0}]}}, "query_contrast and position_contrast must be >= 0"),
    ({"data": {"datasets": [{"name": "a", "path": "x", "position_contrast": -1.0}]}}, "position_contrast must be >= 0"),
    ({"optim": {"groups": [{"match": "gated_blocks.(8"}]}}, r"optim.groups\[0\].match is not a regular expression"),
    ({"optim": {"groups": [{"match": "x", "gate_lr": -1e-3}]}}, r"optim.groups\[0\]: lr and gate_lr must be >= 0"),
    ({"optim": {"groups": [{"lr": 1e-3}]}}, r"missing key optim.groups\[0\].match"),
    ({"data": {"datasets": [{"name": "a", "path": "x", "format": "coco", "mask_new_words": True}]}}, "mask_new_words reads the corpus format"),
    ({"new_block_init": "nearest"}, "new_block_init: 'nearest' is not one of random, copy_nearest"),
    ({"new_block_init": "copy_nearest"}, "new_block_init applies to blocks that model_overrides adds"),
    ({"run": {"one_pass": True}}, "run.one_pass: expected a string, got True"),  # YAML's `yes`
    ({"run": {"one_pass": "gpu"}}, "run.one_pass: 'gpu' is not one of auto, always, never"),
    ({"run": {"attention": "flash"}}, "run.attention: 'flash' is not one of auto, math, default"),
])
def test_config_validation_names_the_bad_key(corpus, tmp_path, patch, message):
    raw = tiny_train_config(corpus, tmp_path)
    for k, v in patch.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and k in raw and k != "model" else v
    with pytest.raises(ValueError, match=message):
        parse_train_config(raw, "cfg.yaml")


def test_config_reads_yaml_numbers_and_defaults(corpus, tmp_path):
    raw = tiny_train_config(corpus, tmp_path, **{"optim.lr": "1e-4"})
    cfg = parse_train_config(raw)
    assert cfg.optim.lr == 1e-4 and cfg.data.datasets[1].max_tokens == 64 and cfg.data.datasets[0].max_tokens == 48


def test_example_configs_parse():
    from pathlib import Path

    from engine.train_config import load_train_config

    root = Path(__file__).resolve().parents[1] / "configs"
    found = [p for p in sorted(root.glob("*.yaml")) if not p.name.startswith("accelerate")]
    assert found
    for p in found:
        cfg = load_train_config(p)
        assert cfg.data.datasets, p


def _captions(model, texts):
    """Tokenised captions and their labels (padding and media markers unlabelled)."""
    ids = model.tokenizer(texts, return_tensors="pt", padding=True)
    labels = ids.input_ids.clone()
    labels[ids.attention_mask == 0] = -100
    labels[labels == model.media_token_id] = -100
    return ids, labels


def test_image_contrast_penalises_image_blind_use():
    model = tiny_model(gates=1.0)
    ids, labels = _captions(model, ["<image>A cat.<EOC>", "<image>A dog.<EOC>"])
    feats = torch.randn(2, 1, 1, 16, model.vision.feature_dim)
    loss_fn = FlamingoLoss(model)
    plain = loss_fn(ids.input_ids, ids.attention_mask, labels, features=feats)
    with_contrast = loss_fn(ids.input_ids, ids.attention_mask, labels, features=feats, contrast=1.0)
    same = loss_fn(ids.input_ids, ids.attention_mask, labels, features=feats[:1].expand(2, -1, -1, -1, -1), contrast=1.0)
    # identical images: own == other, so the hinge pays exactly the margin (2.0) on top of the NLL
    assert torch.allclose(same - loss_fn(ids.input_ids, ids.attention_mask, labels, features=feats[:1].expand(2, -1, -1, -1, -1)), torch.tensor(2.0), atol=1e-4)
    assert with_contrast > plain
    with_contrast.backward()
    assert model.resampler.latents.grad is not None


def test_hinges_in_one_batched_pass_equal_separate_passes():
    """FlamingoLoss runs the text under its own media and every negative as one batch; the loss
    and the gradients are those of one pass per media set."""
    model = tiny_model(gates=1.0)
    ids, labels = _captions(model, ["<image>A cat moves left.<EOC>", "<image>A dog grows bigger.<EOC>", "<image>A red fox.<EOC>"])
    feats = torch.randn(3, 1, 4, 16, model.vision.feature_dim)
    loss_fn = FlamingoLoss(model)
    loss, parts = loss_fn(ids.input_ids, ids.attention_mask, labels, features=feats, contrast=1.0, time_contrast=0.5,
                          return_parts=True)
    loss.backward()
    batched_grads = [p.grad.clone() for p in model.resampler.parameters()]
    model.zero_grad()

    def nll(visual):  # one pass, per-row summed NLL
        media = model.media_context(visual, ids.input_ids, 0)
        return model(ids.input_ids, None, ids.attention_mask, media=media, labels=labels, loss_reduction="sequence").loss

    own = nll(model.resample(feats))
    image = nll(model.resample(feats).roll(1, dims=0))
    time = nll(model.resample(feats.flip(2)))
    expected = own.sum() / (labels[:, 1:] != -100).sum() + torch.relu(2.0 + own - image).mean() + 0.5 * torch.relu(2.0 + own - time).mean()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["hinge_image"].item() == pytest.approx(torch.relu(2.0 + own - image).mean().item(), rel=1e-5)
    for got, p in zip(batched_grads, model.resampler.parameters()):
        assert torch.allclose(got, p.grad, rtol=1e-4, atol=1e-6)


def test_one_pass_equals_a_pass_per_batch():
    """OnePassLoss pads batches of different lengths, media counts and hinges into one LM pass:
    each batch's loss and parts, the weighted total and the gradients are those of a pass each."""
    model = tiny_model(gates=1.0)
    pairs, pair_labels = _captions(model, ["<image>A cat.<EOC>", "<image>A dog sits on a mat.<EOC>", "<image>A fox.<EOC>"])
    clips, clip_labels = _captions(model, ["<image>A ball moves left.<EOC>", "<image>A star grows.<EOC>"])
    docs, doc_labels = _captions(model, ["<image>A dax.<EOC><image>A wug.<EOC><image>A dax, again, and a long tail of words.<EOC>",
                                         "<image>A wug.<EOC><image>A dax.<EOC>"])
    batches = [
        dict(input_ids=pairs.input_ids, attention_mask=pairs.attention_mask, labels=pair_labels,
             features=torch.randn(3, 1, 1, 16, model.vision.feature_dim), contrast=1.0),
        dict(input_ids=clips.input_ids, attention_mask=clips.attention_mask, labels=clip_labels,
             features=torch.randn(2, 1, 4, 16, model.vision.feature_dim), contrast=0.5, time_contrast=1.0),
        dict(input_ids=docs.input_ids, attention_mask=docs.attention_mask, labels=doc_labels,
             features=torch.randn(2, 3, 1, 16, model.vision.feature_dim), query_contrast=0.7),
    ]
    weights = [1.0, 0.3, 0.5]
    total, results = OnePassLoss(model)(batches, weights)
    total.backward()
    one_pass_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    separate = [FlamingoLoss(model)(**b, return_parts=True) for b in batches]
    expected = sum(w * loss for w, (loss, _) in zip(weights, separate))
    expected.backward()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    for (loss, parts), (want, want_parts) in zip(results, separate):
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert set(parts) == set(want_parts)
        assert all(parts[k].item() == pytest.approx(want_parts[k].item(), rel=1e-5, abs=1e-6) for k in parts)
    assert set(one_pass_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(one_pass_grads[n], p.grad, rtol=1e-4, atol=1e-6)


def test_concat_rows_pads_text_and_media_where_no_token_looks():
    from engine.objective import concat_rows

    model = tiny_model(gates=1.0)
    loss_fn = FlamingoLoss(model)
    short, short_labels = _captions(model, ["<image>A cat.<EOC>"])
    long, long_labels = _captions(model, ["<image>A dax.<EOC><image>A wug, and more words.<EOC>"])
    text, text_labels = _captions(model, ["Only words here, no picture."])
    rows = [loss_fn.rows(short.input_ids, short.attention_mask, short_labels, features=torch.randn(1, 1, 1, 16, model.vision.feature_dim)),
            loss_fn.rows(long.input_ids, long.attention_mask, long_labels, features=torch.randn(1, 2, 1, 16, model.vision.feature_dim)),
            loss_fn.rows(text.input_ids, text.attention_mask, text_labels)]
    ids, mask, labels, media = concat_rows(rows)
    width = max(short.input_ids.shape[1], long.input_ids.shape[1], text.input_ids.shape[1])
    assert ids.shape == mask.shape == labels.shape == (3, width)
    n = short.input_ids.shape[1]
    assert mask[0, n:].eq(0).all() and labels[0, n:].eq(-100).all() and media.media_index[0, n:].eq(-1).all()
    assert media.visual.shape[:2] == (3, 2) and media.visual[0, 1].eq(0).all()  # padded media: zeros
    assert media.media_index[2].eq(-1).all()  # the text-only row sees no media
    assert torch.equal(media.media_index[1], rows[1].media.media_index[0])


def test_gradient_reaches_the_tower_only_when_it_is_unfrozen():
    model = tiny_model(gates=1.0)
    ids, labels = _captions(model, ["<image>A cat.<EOC>", "<image>A dog.<EOC>"])
    pixels = torch.rand(2, 1, 1, 3, 32, 32)
    assert not model.vision(pixels[:, 0]).requires_grad  # frozen: no graph through the tower
    model.vision.requires_grad_(True)  # what optim.freeze_vision: false does
    FlamingoLoss(model)(ids.input_ids, ids.attention_mask, labels, pixels=pixels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())


def test_time_contrast_pays_for_order_blind_video_tokens():
    model = tiny_model(gates=1.0)
    ids, labels = _captions(model, ["<image>A cat moves left.<EOC>", "<image>A dog grows.<EOC>"])
    feats = torch.randn(2, 1, 4, 16, model.vision.feature_dim)  # 4 frames
    loss_fn = FlamingoLoss(model)
    args = (ids.input_ids, ids.attention_mask, labels)
    plain = loss_fn(*args, features=feats)
    with torch.no_grad():
        model.resampler.time_embeddings.zero_()  # order-blind: reversed frames give the same tokens
        blind_plain = loss_fn(*args, features=feats)
        assert torch.allclose(loss_fn(*args, features=feats, time_contrast=1.0) - blind_plain, torch.tensor(2.0), atol=1e-4)
        model.resampler.time_embeddings.normal_()
    hinged = loss_fn(*args, features=feats, time_contrast=1.0)
    hinged.backward()
    assert model.resampler.time_embeddings.grad.abs().sum() > 0
    assert loss_fn(*args, features=feats[:, :, :1], time_contrast=1.0) == loss_fn(*args, features=feats[:, :, :1])  # one frame: no hinge
    assert plain.item() > 0


def test_position_contrast_pays_for_tokens_that_ignore_where_things_are():
    import dataclasses as dc

    from engine.testing import TinyVisionTower, tiny_config, tiny_lm, tiny_tokenizer

    torch.manual_seed(0)
    config = tiny_config()
    config = dc.replace(config, resampler=dc.replace(config.resampler, spatial_positions=16))
    model = FlamingoModel(config, tiny_lm(), tiny_tokenizer(), TinyVisionTower(32))
    from engine.testing import set_gates
    set_gates(model, 1.0)
    ids, labels = _captions(model, ["<image>Question: What is on the left? Answer: a cat<EOC>",
                                    "<image>Question: Where is the dog? Answer: top<EOC>"])
    feats = torch.randn(2, 1, 1, 16, model.vision.feature_dim)  # a 4 x 4 grid of cells
    loss_fn = FlamingoLoss(model)
    args = (ids.input_ids, ids.attention_mask, labels)
    with torch.no_grad():  # no spatial embeddings: the cells' order changes nothing, the hinge pays its margin
        blind = loss_fn(*args, features=feats, position_contrast=1.0) - loss_fn(*args, features=feats)
        assert torch.allclose(blind, torch.tensor(2.0), atol=1e-4)
        model.resampler.spatial_embeddings.normal_()
    loss, parts = loss_fn(*args, features=feats, position_contrast=1.0, return_parts=True)
    assert abs(parts["hinge_position"].item() - 2.0) > 1e-3  # the turned grid now reads differently
    loss.backward()
    assert model.resampler.spatial_embeddings.grad.abs().sum() > 0
    one_cell = feats[:, :, :, :1].expand(-1, -1, -1, 16, -1).clone()  # every cell the same: turning changes nothing
    model.resampler.spatial_embeddings.data.zero_()
    with torch.no_grad():
        assert loss_fn(*args, features=one_cell, position_contrast=1.0).item() == pytest.approx(
            loss_fn(*args, features=one_cell).item() + 2.0, abs=1e-4)


def test_swap_last_media_takes_the_least_similar_earlier_item():
    from engine.objective import swap_last_media

    visual = torch.arange(2 * 3, dtype=torch.float).view(2, 3, 1, 1).expand(2, 3, 2, 4).clone()  # (B, N, R, d)
    pooled = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]],  # row 0: item 1 is least like the last
                           [[1.0, 0.0], [9.0, 9.0], [9.0, 9.0]]])  # row 1: one media only (padding after)
    swapped, rows = swap_last_media(visual, torch.tensor([3, 1]), pooled)
    assert rows.tolist() == [True, False]
    assert torch.equal(swapped[0, 2], visual[0, 1]) and torch.equal(swapped[0, :2], visual[0, :2])
    assert torch.equal(swapped[1], visual[1])  # nothing earlier to swap in: unchanged
    assert visual[0, 2, 0, 0] == 2  # the input is left alone


def test_query_contrast_pays_only_for_the_text_after_the_last_picture():
    model = tiny_model(gates=1.0)
    ids, labels = _captions(model, ["<image>A dax.<EOC><image>A wug.<EOC><image>A dax.<EOC>",
                                    "<image>A wug.<EOC><image>A dax.<EOC><image>A wug.<EOC>"])
    feats = torch.randn(2, 3, 1, 16, model.vision.feature_dim)
    loss_fn = FlamingoLoss(model)
    args = (ids.input_ids, ids.attention_mask, labels)
    plain = loss_fn(*args, features=feats)
    # every picture of a row the same: the swap changes nothing and the hinge pays its margin
    same = feats[:, :1].expand(-1, 3, -1, -1, -1)
    assert torch.allclose(loss_fn(*args, features=same, query_contrast=1.0) - loss_fn(*args, features=same), torch.tensor(2.0), atol=1e-4)
    loss, parts = loss_fn(*args, features=same, query_contrast=1.0, return_parts=True)
    assert parts["hinge_query"] == pytest.approx(2.0, abs=1e-4) and parts["nll"] == pytest.approx(loss_fn(*args, features=same).item(), abs=1e-5)
    hinged = loss_fn(*args, features=feats, query_contrast=1.0)
    assert hinged > plain
    hinged.backward()
    assert model.resampler.latents.grad.abs().sum() > 0
    one = _captions(model, ["<image>A dax.<EOC>", "<image>A wug.<EOC>"])
    one_args = (one[0].input_ids, one[0].attention_mask, one[1])
    assert loss_fn(*one_args, features=feats[:, :1], query_contrast=1.0) == loss_fn(*one_args, features=feats[:, :1])  # no earlier picture: no hinge
    _, parts = loss_fn(*one_args, features=feats[:, :1], query_contrast=1.0, return_parts=True)
    assert parts["hinge_query"] == 0 and set(parts) == {"nll", "hinge_query"}  # the key is there all the same


def test_position_questions_file(tmp_path):
    import json

    from engine.data.prepare import write_position_questions

    rows = [{"qtype": q, "text": f"<image>{i}<EOC>", "media": ["m.png"]} for i, q in enumerate(["count", "position", "colour", "position"])]
    (tmp_path / "vqa.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_position_questions(tmp_path) == 2
    got = [json.loads(l) for l in (tmp_path / "vqa.position.train.jsonl").read_text().splitlines()]
    assert [r["text"] for r in got] == ["<image>1<EOC>", "<image>3<EOC>"]


def test_position_sides_name_where_each_of_a_scenes_two_concepts_is(tmp_path):
    import json

    from engine.data.prepare import write_position_sides

    rows = [{"media": ["a.png"], "question": "Where is the cat?", "answers": ["right", "on the right"], "concepts": ["dog", "cat"]},
            {"media": ["b.png"], "question": "What is at the top?", "answers": ["top hat"], "concepts": ["top_hat", "cat"]},
            {"media": ["c.png"], "question": "What is this?", "answers": ["cat"], "concepts": ["cat"]}]  # no sides: skipped
    (tmp_path / "vqa.position.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_position_sides(tmp_path) == 4
    got = [json.loads(l) for l in (tmp_path / "position_sides.train.jsonl").read_text().splitlines()]
    assert [(r["media"][0], r["concept_id"], r["side"]) for r in got] == [
        ("a.png", "dog", "left"), ("a.png", "cat", "right"), ("b.png", "top_hat", "top"), ("b.png", "cat", "bottom")]


def test_position_variants_ask_every_position_question_of_each_scene(tmp_path):
    import json

    from engine.data import templates as T
    from engine.data.prepare import write_position_variants

    manifest = {"train_concepts": [{"id": "dog", "label": "dog"}, {"id": "top_hat", "label": "top hat"}],
                "heldout_concepts": [{"id": "cat", "label": "cat"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    rows = [{"media": ["a.png"], "question": "Where is the cat?", "answers": ["right", "on the right"], "concepts": ["dog", "cat"], "qtype": "position"},
            {"media": ["b.png"], "question": "What is at the top?", "answers": ["top hat"], "concepts": ["top_hat", "cat"], "qtype": "position"}]
    (tmp_path / "vqa.position.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_position_variants(tmp_path) == 12
    got = [json.loads(l) for l in (tmp_path / "vqa.position_all.train.jsonl").read_text().splitlines()]
    assert all(r["media"] == ["a.png"] for r in got[:6]) and all(r["media"] == ["b.png"] for r in got[6:])
    a, b = ({r["question"]: r["answers"][0] for r in part} for part in (got[:6], got[6:]))
    assert a["Where is the cat?"] == "right" and a["Where is the dog?"] == "left"
    assert a["Is the cat on the left or on the right?"] == "right" and a["What is on the left?"] == "dog"
    assert b["Where is the cat?"] == "bottom" and b["What is at the top?"] == "top hat"
    assert b["Is the cat at the top or at the bottom?"] == "bottom" and b["What is at the bottom?"] == "cat"
    assert got[0]["text"] == T.chunk(T.qa(got[0]["question"], got[0]["answers"][0]))
    # every question the corpus itself asks of a scene is one of its variants, word for word
    assert ("Where is the cat?", ["right", "on the right", "at the right"]) in T.position_qas(("dog", "cat"), "x")


def test_position_mirrors_flip_the_picture_and_the_answers(tmp_path):
    import json

    from PIL import Image

    from engine.data.prepare import write_position_mirrors

    manifest = {"train_concepts": [{"id": "dog", "label": "dog"}, {"id": "cat", "label": "cat"}], "heldout_concepts": []}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "media").mkdir()
    for name, size, box in (("x.png", (4, 2), (0, 0, 2, 2)), ("y.png", (2, 4), (0, 0, 2, 2))):
        im = Image.new("RGB", size, "blue")
        im.paste((255, 0, 0), box)  # red on the left / at the top
        im.save(tmp_path / "media" / name)
    rows = [{"media": ["media/x.png"], "question": "Where is the dog?", "answers": ["left"], "concepts": ["dog", "cat"], "qtype": "position"},
            {"media": ["media/y.png"], "question": "What is at the top?", "answers": ["cat"], "concepts": ["cat", "dog"], "qtype": "position"}]
    (tmp_path / "vqa.position.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_position_mirrors(tmp_path) == 24
    got = [json.loads(l) for l in (tmp_path / "vqa.position_mirror.train.jsonl").read_text().splitlines()]
    assert [r["media"][0] for r in got[::6]] == ["media/x.png", "media/vqa_mirror/x.png", "media/y.png", "media/vqa_mirror/y.png"]
    assert Image.open(tmp_path / "media/vqa_mirror/x.png").getpixel((3, 0)) == (255, 0, 0)  # red now on the right
    assert Image.open(tmp_path / "media/vqa_mirror/y.png").getpixel((0, 3)) == (255, 0, 0)  # and at the bottom
    scene, mirror = ({r["question"]: r["answers"][0] for r in got[i:i + 6]} for i in (0, 6))
    assert scene.keys() == mirror.keys()  # the same questions ...
    assert (scene["Where is the dog?"], mirror["Where is the dog?"]) == ("left", "right")  # ... the answers flipped
    assert (scene["What is on the left?"], mirror["What is on the left?"]) == ("dog", "cat")
    assert got[6]["concepts"] == ["cat", "dog"]  # the left or top one first, as in every scene record


def test_motion_questions_ask_what_the_test_clips_ask(tmp_path):
    import json

    from engine.data.prepare import write_motion_questions
    from engine.eval.tasks import vqa_example

    rows = [{"media": [f"{m}.mp4"], "text": f"<image>It {m}s.<EOC>", "motion": m, "label": "red kite"}
            for m in ("left", "grow", "up", "still")]
    (tmp_path / "videos.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_motion_questions(tmp_path) == 2
    got = [json.loads(l) for l in (tmp_path / "videos_qa.train.jsonl").read_text().splitlines()]
    assert [r["media"] for r in got] == [["left.mp4"], ["up.mp4"]]
    assert [r["text"] for r in got] == ["<image>Question: Which way does the red kite move? Answer: left<EOC>",
                                        "<image>Question: Which way does the red kite move? Answer: up<EOC>"]
    assert got[0]["text"] == vqa_example("Which way does the red kite move?", "left")  # as the evaluation asks


def test_colour_questions_ask_what_the_test_scenes_ask(tmp_path):
    import json

    from engine.data.prepare import write_colour_questions
    from engine.eval.tasks import vqa_example

    rows = [{"media": ["a.png"], "text": "<image>A cat on a pink background.<EOC>", "background": "pink"},
            {"media": ["b.png"], "text": "<image>A cat.<EOC>"}]
    (tmp_path / "pairs.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_colour_questions(tmp_path) == 1
    (got,) = [json.loads(l) for l in (tmp_path / "vqa_colour.train.jsonl").read_text().splitlines()]
    assert got["media"] == ["a.png"] and got["answers"] == ["pink"]
    assert got["text"] == vqa_example("What colour is the background?", "pink")  # as the evaluation asks


def test_hard_naming_episodes_show_the_query_concept_once_and_first(tmp_path):
    import json

    from engine.data.prepare import hard_episode, write_hard_naming

    names = {"a": "dax", "b": "wug", "c": "fep"}
    concepts = ["b", "a", "c", "a", "b", "a"]  # the last is the query
    episode = {"media": [f"{i}.png" for i in range(6)], "concepts": concepts,
               "text": "".join(f"<image>A {names[c]} ({i}).<EOC>" for i, c in enumerate(concepts))}
    hard = hard_episode(episode)
    assert hard["concepts"] == ["a", "b", "c", "b", "a"]
    assert hard["media"] == ["1.png", "0.png", "2.png", "4.png", "5.png"]
    assert hard["text"] == "<image>A dax (1).<EOC><image>A wug (0).<EOC><image>A fep (2).<EOC><image>A wug (4).<EOC><image>A dax (5).<EOC>"
    assert hard_episode(dict(episode, concepts=["b", "c", "b", "c", "b", "a"])) is None  # no example of the query
    (tmp_path / "naming.train.jsonl").write_text(json.dumps(episode) + "\n")
    assert write_hard_naming(tmp_path, fraction=0.0) == 0
    assert json.loads((tmp_path / "naming_hard.train.jsonl").read_text()) == episode
    assert write_hard_naming(tmp_path, fraction=1.0) == 1
    assert json.loads((tmp_path / "naming_hard.train.jsonl").read_text()) == hard


def test_lr_schedule_warms_up_holds_then_decays_to_zero():
    from engine.train import lr_schedule

    f = lr_schedule(warmup_steps=4, max_steps=20, decay_steps=8)
    got = [f(s) for s in range(20)]
    assert got[:4] == [0.25, 0.5, 0.75, 1.0] and got[4:12] == [1.0] * 8
    assert got[12:] == [(20 - s) / 8 for s in range(12, 20)] and got[-1] == 1 / 8
    assert all(a > b for a, b in zip(got[12:], got[13:]))  # strictly falling through the decay
    assert lr_schedule(4)(1000) == 1.0  # no decay: the paper's warm-up then constant
