"""The Flamingo core: identity at init, masking, resampler, freezing, concurrency, save/load."""
import dataclasses
import threading

import pytest
import torch

from engine.config import FlamingoConfig, ResamplerConfig
from engine.cross_attention import GatedCrossAttentionBlock, MediaContext, media_index_from_ids, sample_next_media
from engine.lm import find_decoder_layers
from engine.model import FlamingoModel
from engine.resampler import PerceiverResampler
from engine.testing import set_gates, tiny_config, tiny_lm, tiny_model, tiny_tokenizer
from engine.vision import HFVisionTower, TinyVisionTower

TEXT = "A cat.<image>This is a cat.<EOC><image>This is a dog and a ball.<EOC>"


def _inputs(model, text=TEXT, batch=1, seed=0):
    ids = model.tokenizer([text] * batch, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(seed)
    n = int((ids[0] == model.media_token_id).sum())
    pixels = torch.rand(batch, n, 1, 3, 32, 32, generator=g)
    return ids, pixels


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_identity_at_init(family):
    model = tiny_model(family)
    ids, pixels = _inputs(model)
    with torch.no_grad():
        ours = model(ids, model.encode_media(pixels)).logits
        bare = tiny_lm(family, seed=0)(inputs_embeds=model.embed(ids)).logits
    assert torch.allclose(ours[..., : bare.shape[-1]], bare, atol=1e-5)
    set_gates(model, 0.5)  # the comparison is not vacuous: open gates change the output
    with torch.no_grad():
        assert not torch.allclose(model(ids, model.encode_media(pixels)).logits[..., : bare.shape[-1]], bare, atol=1e-3)


def _segments(model, ids):
    """Token positions before the first image, in segment 0 and in segment 1."""
    idx = media_index_from_ids(ids, model.media_token_id)[0]
    return (idx == -1), (idx == 0), (idx == 1)


def _block_runner(only_last: bool):
    """A gated block's cross-attention on fixed text states: visual (1, 2, 4, d) -> (1, L, dim),
    with the token segments of TEXT and a visual input to perturb."""
    torch.manual_seed(0)
    model = tiny_model(gates=1.0)
    block = next(iter(model.gated_blocks.values()))
    ids, _ = _inputs(model)
    x = torch.randn(1, ids.shape[1], 64)
    idx = media_index_from_ids(ids, model.media_token_id)
    run = lambda v: block.attn(x, MediaContext(v, idx, only_last, {0: block.attn.project_media(v)}), 0)
    return run, _segments(model, ids), torch.randn(1, 2, 4, model.resampler.dim)


def test_only_last_masking_at_block_level():
    run, (before, seg0, seg1), visual = _block_runner(only_last=True)
    base = run(visual)
    changed0 = visual.clone(); changed0[:, 0] += 1
    changed1 = visual.clone(); changed1[:, 1] += 1
    out0, out1 = run(changed0), run(changed1)
    assert torch.equal(base[0, before], torch.zeros_like(base[0, before]))  # exactly zero before any image
    assert not torch.allclose(out0[0, seg0], base[0, seg0]) and torch.equal(out0[0, seg1], base[0, seg1])
    assert not torch.allclose(out1[0, seg1], base[0, seg1]) and torch.equal(out1[0, seg0], base[0, seg0])


def test_all_previous_mode_sees_earlier_media():
    run, (before, seg0, seg1), visual = _block_runner(only_last=False)
    changed0 = visual.clone(); changed0[:, 0] += 1
    base, out0 = run(visual), run(changed0)
    assert not torch.allclose(out0[0, seg1], base[0, seg1])  # segment 1 sees image 0 too
    assert torch.equal(base[0, before], torch.zeros_like(base[0, before]))


def test_masking_through_the_whole_model():
    model = tiny_model(gates=1.0)
    ids, pixels = _inputs(model)
    before, seg0, seg1 = _segments(model, ids)
    with torch.no_grad():
        base = model(ids, model.encode_media(pixels)).logits[0]
        p1 = pixels.clone(); p1[:, 1] = torch.rand_like(p1[:, 1])
        out1 = model(ids, model.encode_media(p1)).logits[0]
        p0 = pixels.clone(); p0[:, 0] = torch.rand_like(p0[:, 0])
        out0 = model(ids, model.encode_media(p0)).logits[0]
    # tokens before the first image ignore all images; the LM is causal, so a later image
    # cannot reach earlier tokens, while a token's own image changes it
    assert torch.equal(out0[before], base[before]) and torch.equal(out1[before], base[before])
    assert torch.equal(out1[seg0], base[seg0])
    assert not torch.allclose(out0[seg0], base[seg0]) and not torch.allclose(out1[seg1], base[seg1])


def _ours_and_bare(model):
    """Logits of the model on text with images, of the bare LM on the same tokens (cut to the LM's
    vocabulary), and the token segments (before the first image, first image's, second's)."""
    ids, pixels = _inputs(model)
    with torch.no_grad():
        ours = model(ids, model.encode_media(pixels)).logits[0]
        bare = tiny_lm("llama", seed=0)(inputs_embeds=model.embed(ids)).logits[0]
    return ours[:, : bare.shape[-1]], bare, _segments(model, ids)


def test_text_only_tokens_skip_dense_when_configured():
    ours, bare, (before, _, _) = _ours_and_bare(tiny_model(gates=1.0, dense_on_text_only=False))
    assert torch.allclose(ours[before], bare[before], atol=1e-5)


def test_p_next_moves_spans_to_the_next_media():
    idx = torch.tensor([[-1, 0, 0, 1, 1, 2]])
    assert torch.equal(sample_next_media(idx, torch.tensor([3]), 1.0), torch.tensor([[0, 1, 1, 2, 2, 2]]))
    assert torch.equal(sample_next_media(idx, torch.tensor([3]), 0.0), idx)


@pytest.mark.parametrize("frames", [1, 3, 8])
def test_resampler_shapes(frames):
    r = PerceiverResampler(ResamplerConfig(depth=2, heads=2, dim_head=8, num_latents=5, max_frames=8), vision_dim=12)
    out = r(torch.randn(2, 3, frames, 7, 12))
    assert out.shape == (2, 3, 5, 12)


def test_resampler_frame_order_matters_through_time_embeddings():
    torch.manual_seed(0)
    r = PerceiverResampler(ResamplerConfig(depth=1, heads=2, dim_head=8, num_latents=4, max_frames=4), vision_dim=12)
    x = torch.randn(1, 1, 4, 6, 12)
    flipped = x.flip(2)
    with torch.no_grad():
        r.time_embeddings.normal_()
        assert not torch.allclose(r(x), r(flipped), atol=1e-4)
        r.time_embeddings.zero_()  # without time embeddings attention is order-blind
        assert torch.allclose(r(x), r(flipped), atol=1e-5)


def _object_at(column: int) -> torch.Tensor:
    """(1, 1, 1, 3, 32, 32) pixels: one bright 8 x 8 square in the top row's `column` cell of the
    tiny tower's 4 x 4 grid, on a grey background."""
    pixels = torch.full((1, 1, 1, 3, 32, 32), 0.5)
    pixels[..., 0:8, 8 * column:8 * column + 8] = 1.0
    return pixels


def test_spatial_embeddings_let_the_resampler_see_where_things_are():
    """A conv tower's tokens say what is in a cell, not where: without spatial embeddings an
    object on the left and the same object on the right give the same visual tokens."""
    model = tiny_model()
    left, right = _object_at(0), _object_at(3)
    with torch.no_grad():
        assert torch.allclose(model.encode_media(left), model.encode_media(right), atol=1e-5)
    cfg = dataclasses.replace(model.config, resampler=dataclasses.replace(model.config.resampler, spatial_positions=16))
    placed = FlamingoModel(cfg, model.lm, model.tokenizer, model.vision)
    placed.load_trainable_state_dict(model.trainable_state_dict(), allow_new_zeros=True)
    with torch.no_grad():
        assert torch.equal(placed.encode_media(left), model.encode_media(left))  # zero at the start: unchanged
        placed.resampler.spatial_embeddings.normal_()
        assert not torch.allclose(placed.encode_media(left), placed.encode_media(right), atol=1e-3)
    with pytest.raises(ValueError, match="weights do not match"):  # only all-zero additions may be missing
        placed.load_trainable_state_dict(model.trainable_state_dict(), allow_new_zeros=True)
    with pytest.raises(ValueError, match="16 tokens per frame, the vision tower gave 7"):
        placed.resampler(torch.randn(1, 1, 1, 7, model.vision.feature_dim))


def test_resampler_projection_and_bad_input():
    r = PerceiverResampler(ResamplerConfig(dim=16, depth=1, heads=2, dim_head=8, num_latents=3, max_frames=2), vision_dim=40)
    assert r(torch.randn(1, 2, 2, 5, 40)).shape == (1, 2, 3, 16)
    with pytest.raises(ValueError, match="max_frames"):
        r(torch.randn(1, 1, 3, 5, 40))
    with pytest.raises(ValueError, match=r"\(B, M, T, S, d\)"):
        r(torch.randn(2, 5, 40))


def test_resampler_standardizes_features_with_stored_statistics(tmp_path):
    torch.manual_seed(0)
    cfg = ResamplerConfig(depth=1, heads=2, dim_head=8, num_latents=3, max_frames=2, standardize_features=True)
    r = PerceiverResampler(cfg, vision_dim=12)
    scale, shift = torch.rand(12) * 5 + 0.5, torch.randn(12) * 10
    data = torch.randn(400, 12)
    x = torch.randn(1, 2, 1, 5, 12)
    r.set_feature_stats(data)
    before = r(x)
    r.set_feature_stats(data * scale + shift)  # the same data in other units: same output
    assert torch.allclose(r(x * scale + shift), before, atol=2e-3)  # up to the std epsilon
    assert {"feature_mean", "feature_std"} <= set(r.state_dict())  # saved with the weights
    plain = PerceiverResampler(ResamplerConfig(depth=1, heads=2, dim_head=8, num_latents=3, max_frames=2), vision_dim=12)
    assert "feature_mean" not in plain.state_dict()  # older checkpoints keep loading
    with pytest.raises(ValueError, match="standardize_features"):
        plain.set_feature_stats(data)


def test_freezing_after_an_optimiser_step():
    model = tiny_model(gates=0.1)
    model.train()
    ids, pixels = _inputs(model, batch=2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable
    assert all(n.startswith(("resampler", "new_token")) or ".gated_block." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids, model.encode_media(pixels), labels=ids).loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    moved = [n for n, v in trainable.items() if not torch.equal(after[n], v)]
    assert sorted(moved) == sorted(trainable)


def test_gate_zero_means_only_gates_get_gradient_at_first():
    model = tiny_model(gates=0.0)
    ids, pixels = _inputs(model)
    model(ids, model.encode_media(pixels), labels=ids).loss.backward()
    block = next(iter(model.gated_blocks.values()))
    assert block.attn_gate.grad.abs().item() > 0
    assert torch.count_nonzero(block.attn.to_q.weight.grad) == 0


def test_concurrent_calls_match_sequential():
    model = tiny_model(gates=1.0)
    inputs = [_inputs(model, seed=s) for s in range(2)]
    with torch.no_grad():
        expected = [model(ids, model.encode_media(px)).logits for ids, px in inputs]
    results = [[None] * 5 for _ in inputs]

    def work(i):
        for k in range(5):
            with torch.no_grad():
                ids, px = inputs[i]
                results[i][k] = model(ids, model.encode_media(px)).logits

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i in range(2):
        assert all(torch.equal(r, expected[i]) for r in results[i])


def test_kv_cached_chunks_match_one_pass():
    model = tiny_model(gates=1.0)
    ids, pixels = _inputs(model)
    visual = model.encode_media(pixels)
    split = int((ids[0] == model.media_token_id).nonzero()[1])  # the second chunk starts at image 2
    with torch.no_grad():
        full = model(ids, visual).logits
        first = model(ids[:, :split], visual[:, :1], use_cache=True)
        second = model(ids[:, split:], visual, past_key_values=first.past_key_values, media_offset=1, use_cache=True)
    assert torch.allclose(torch.cat([first.logits, second.logits], 1), full, atol=1e-5)


def test_bad_inputs_name_the_problem():
    model = tiny_model()
    ids, pixels = _inputs(model)
    visual = model.encode_media(pixels)
    with pytest.raises(ValueError, match="media count mismatch"):
        model(ids, visual[:, :1])
    with pytest.raises(ValueError, match="no media were given"):
        model(ids)
    with pytest.raises(ValueError, match=r"\(B, N, T, 3, H, W\)"):
        model.encode_media(pixels[0])
    with pytest.raises(ValueError, match=r"\(B, N, R, d\)"):
        model(ids, visual[0])
    with pytest.raises(ValueError, match="input_ids must be"):
        model(ids[0], visual)
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        find_decoder_layers(torch.nn.Linear(2, 2))


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        FlamingoConfig.from_dict({"resampler": {"depht": 2}})


def _saved_tiny_model(tmp_path, **cross_attention) -> FlamingoModel:
    """A tiny model saved under tmp_path/flamingo, its LM under tmp_path/lm (so it can be reloaded)."""
    model = tiny_model(gates=0.7, **cross_attention)
    lm_dir = tmp_path / "lm"
    tiny_lm("llama", seed=0).save_pretrained(lm_dir)
    tiny_tokenizer().save_pretrained(lm_dir)
    model.config.lm = str(lm_dir)
    model.save_pretrained(tmp_path / "flamingo")
    return model


def test_save_and_load_round_trip(tmp_path):
    model = _saved_tiny_model(tmp_path)
    loaded = FlamingoModel.from_pretrained(tmp_path / "flamingo")
    ids, pixels = _inputs(model)
    with torch.no_grad():
        assert torch.allclose(model(ids, model.encode_media(pixels)).logits, loaded(ids, loaded.encode_media(pixels)).logits, atol=1e-6)
    saved = set(__import__("safetensors.torch").torch.load_file(tmp_path / "flamingo" / "flamingo.safetensors"))
    assert not any(k.startswith(("lm.", "vision.")) for k in saved)  # frozen weights are references only


def test_from_pretrained_overrides_turn_on_new_zero_weights(tmp_path):
    model = _saved_tiny_model(tmp_path)
    placed = FlamingoModel.from_pretrained(tmp_path / "flamingo", overrides={"resampler": {"spatial_positions": 16}})
    assert placed.config.resampler.spatial_positions == 16 and placed.config.resampler.depth == model.config.resampler.depth
    ids, pixels = _inputs(model)
    with torch.no_grad():
        assert torch.allclose(model(ids, model.encode_media(pixels)).logits, placed(ids, placed.encode_media(pixels)).logits, atol=1e-6)
    with pytest.raises(ValueError, match="weights do not match"):  # a change that needs weights the save lacks
        FlamingoModel.from_pretrained(tmp_path / "flamingo", overrides={"cross_attention": {"every_n_layers": 2}})


def test_more_gated_blocks_for_a_trained_model_start_closed(tmp_path):
    """cross_attention.layers places blocks explicitly; a trained model given more of them keeps
    its own blocks' weights and its function (the new ones start with closed gates)."""
    model = _saved_tiny_model(tmp_path, layers=[1])
    assert sorted(model.gated_blocks) == [1]
    more = FlamingoModel.from_pretrained(tmp_path / "flamingo", overrides={"cross_attention": {"layers": [0, 1]}})
    assert sorted(more.gated_blocks) == [0, 1] and more.gated_blocks[0].is_closed() and not more.gated_blocks[1].is_closed()
    assert torch.equal(more.gated_blocks[1].attn.to_q.weight, model.gated_blocks[1].attn.to_q.weight)
    ids, pixels = _inputs(model)
    with torch.no_grad():
        assert torch.allclose(model(ids, model.encode_media(pixels)).logits, more(ids, more.encode_media(pixels)).logits, atol=1e-6)
    # saved and reloaded, the placement comes back from the config
    more.save_pretrained(tmp_path / "more")
    assert sorted(FlamingoModel.from_pretrained(tmp_path / "more").gated_blocks) == [0, 1]
    # a block the weights only partly cover is not new: an error, as is a block the weights lack without overrides
    sd = more.trainable_state_dict()
    partial = {k: v for k, v in sd.items() if k != "gated_blocks.0.attn.to_q.weight"}
    with pytest.raises(ValueError, match="weights do not match"):
        more.load_trainable_state_dict(partial, allow_new_zeros=True)
    with pytest.raises(ValueError, match="weights do not match"):
        more.load_trainable_state_dict(model.trainable_state_dict())
    with pytest.raises(ValueError, match="distinct layer indices"):
        tiny_model(layers=[0, 0])
    with pytest.raises(ValueError, match="distinct layer indices"):
        tiny_model(layers=[5])


def test_new_blocks_can_start_as_copies_of_the_nearest_trained_block(tmp_path):
    """new_block_init copy_nearest: a new block gets the weights of the nearest saved block (the
    earlier one on a tie) but keeps its gates at 0, so the model's function is still unchanged."""
    model = _saved_tiny_model(tmp_path, layers=[0, 3])
    more = FlamingoModel.from_pretrained(tmp_path / "flamingo", overrides={"cross_attention": {"layers": [0, 1, 2, 3]}},
                                         new_block_init="copy_nearest")
    blocks, saved = more.gated_blocks, model.gated_blocks
    for new, source in ((1, 0), (2, 3)):
        assert blocks[new].is_closed()
        for (name, p), q in zip(blocks[new].named_parameters(), saved[source].parameters()):
            if not name.endswith(("attn_gate", "ff_gate")):
                assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name  # a copy, not shared
    ids, pixels = _inputs(model)
    with torch.no_grad():
        assert torch.allclose(model(ids, model.encode_media(pixels)).logits, more(ids, more.encode_media(pixels)).logits, atol=1e-6)
    random = FlamingoModel.from_pretrained(tmp_path / "flamingo", overrides={"cross_attention": {"layers": [0, 1, 2, 3]}})
    assert not torch.equal(random.gated_blocks[1].attn.to_q.weight, saved[0].attn.to_q.weight)
    with pytest.raises(ValueError, match="only a closed block"):
        more.copy_gated_block(1, 0)  # block 0 is trained (open): never overwritten
    with pytest.raises(ValueError, match="new_block_init"):
        FlamingoModel.from_pretrained(tmp_path / "flamingo", new_block_init="nearest")


def test_global_features_start_at_zero_and_receive_gradient(tmp_path):
    """resampler.global_features adds a projection of the item's mean feature to every visual
    token: nothing changes until it is trained, and it is trainable from the first step."""
    model = _saved_tiny_model(tmp_path)
    g = FlamingoModel.from_pretrained(tmp_path / "flamingo", overrides={"resampler": {"global_features": True}})
    _, pixels = _inputs(model)
    with torch.no_grad():
        before = model.encode_media(pixels)
        assert torch.equal(g.encode_media(pixels), before)
    g.encode_media(pixels).pow(2).sum().backward()
    assert g.resampler.global_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        g.resampler.global_proj.bias.fill_(0.5)
        assert torch.allclose(g.encode_media(pixels), before + 0.5, atol=1e-6)  # the same vector on every token


def _check_added_tokens(tmp_path, option: str) -> FlamingoModel:
    """A saved tiny model loaded with resampler.<option> = 2 (2 x 2 more tokens): the latents are
    unchanged, 4 tokens follow them, the whole model runs on them, and they receive gradient
    (returned with its .grad set)."""
    model = _saved_tiny_model(tmp_path)
    g = FlamingoModel.from_pretrained(tmp_path / "flamingo", overrides={"resampler": {option: 2}})
    assert g.config.resampler.num_tokens == model.config.resampler.num_latents + 4
    ids, pixels = _inputs(model)
    with torch.no_grad():
        visual, before = g.encode_media(pixels), model.encode_media(pixels)
        r = before.shape[-2]
        assert visual.shape[-2] == r + 4 and torch.equal(visual[..., :r, :], before)
        assert torch.isfinite(g(ids, visual).logits).all()
    g.encode_media(pixels)[..., r:, :].pow(2).sum().backward()
    return g


def test_grid_tokens_follow_the_latents_and_keep_where_things_are(tmp_path):
    """resampler.grid_tokens g appends g x g region tokens (pooled frame features): the latents
    are unchanged, a trained model takes them on, and a picture's mirror image gives the same
    region tokens in mirrored order; the whole model runs with the longer token list."""
    g = _check_added_tokens(tmp_path, "grid_tokens")
    assert g.resampler.region_embeddings.grad.abs().sum() > 0

    cfg = ResamplerConfig(depth=1, heads=2, dim_head=8, num_latents=3, grid_tokens=2, spatial_positions=16)
    resampler = PerceiverResampler(cfg, vision_dim=6).eval()
    feats = torch.randn(1, 1, 1, 16, 6)  # a 4 x 4 grid
    mirrored = feats.reshape(1, 1, 1, 4, 4, 6).flip(4).reshape(1, 1, 1, 16, 6)
    with torch.no_grad():
        a, b = resampler(feats)[0, 0, 3:], resampler(mirrored)[0, 0, 3:]  # regions: TL, TR, BL, BR
        assert torch.allclose(a[[1, 0, 3, 2]], b, atol=1e-5) and not torch.allclose(a, b, atol=1e-3)
        top_left = resampler.proj(feats[0, 0, 0].reshape(4, 4, 6)[:2, :2].mean((0, 1))) + resampler.time_embeddings[0, 0]
        assert torch.allclose(a[0], resampler.norm(top_left), atol=1e-5)  # the spatial embeddings start at 0
    with pytest.raises(ValueError, match="square grid"):
        PerceiverResampler(dataclasses.replace(cfg, spatial_positions=0), vision_dim=6)(torch.randn(1, 1, 1, 15, 6))


def test_region_latents_attend_to_their_own_region_only(tmp_path):
    """resampler.region_latents g appends g x g latents, each summarising its own region of the
    grid through the resampler's layers: the latents are unchanged, a trained model takes them
    on, and changing one region's cells changes that region's latent alone."""
    g = _check_added_tokens(tmp_path, "region_latents")
    assert g.resampler.region_latent_embeddings.grad.abs().sum() > 0 and g.resampler.region_queries.grad.abs().sum() > 0

    cfg = ResamplerConfig(depth=2, heads=2, dim_head=8, num_latents=3, region_latents=2)
    resampler = PerceiverResampler(cfg, vision_dim=8).eval()
    mask = resampler.region_mask(t=2, s=9, device="cpu")  # a 3 x 3 grid, 2 frames: rows / cols 0-1 | 2
    assert mask.shape == (4, 2 * 9 + 4) and mask[:, :9].sum(1).tolist() == [4, 2, 2, 1]
    assert torch.equal(mask[:, :9], mask[:, 9:18]) and torch.equal(mask[:, 18:], torch.eye(4, dtype=torch.bool))
    feats = torch.randn(1, 1, 2, 9, 8)
    changed = feats.clone()
    changed[..., 8, :] = torch.randn(8) * 3  # the bottom right cell, in both frames
    with torch.no_grad():
        a, b = resampler(feats)[0, 0], resampler(changed)[0, 0]
    moved = (a - b).norm(dim=-1) > 1e-4
    assert moved.tolist() == [True] * 3 + [False, False, False, True]  # the latents see it; regions 0-2 do not
    with pytest.raises(ValueError, match="square grid"):
        resampler(torch.randn(1, 1, 1, 8, 8))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_vision_tower_patch_tokens(tmp_path, family):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    cfg_cls, model_cls = (CLIPVisionConfig, CLIPVisionModel) if family == "clip" else (SiglipVisionConfig, SiglipVisionModel)
    cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    model_cls(cfg).save_pretrained(tmp_path)
    tower = HFVisionTower(str(tmp_path))
    out = tower(torch.rand(2, 3, 3, 32, 32))
    assert out.shape == (2, 3, 16, 32)  # 4x4 patches; CLIP's CLS token dropped
    assert not any(p.requires_grad for p in tower.parameters())


def test_tiny_tower_is_frozen_in_train_mode():
    tower = TinyVisionTower()
    tower.train()
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())


def test_vision_weights_file_replaces_the_tower_weights(tmp_path):
    from safetensors.torch import save_file

    from engine.config import VisionConfig
    from engine.vision import load_vision_tower

    adapted = TinyVisionTower(seed=7)
    save_file({k: v.contiguous() for k, v in adapted.state_dict().items()}, tmp_path / "vision.safetensors")
    tower = load_vision_tower(VisionConfig(name="tiny", image_size=32, weights=str(tmp_path / "vision.safetensors")))
    x = torch.rand(1, 1, 3, 32, 32)
    assert torch.equal(tower(x), adapted(x)) and not torch.equal(tower(x), TinyVisionTower(seed=0)(x))
    with pytest.raises(ValueError, match="no such file"):
        load_vision_tower(VisionConfig(name="tiny", image_size=32, weights=str(tmp_path / "missing.safetensors")))


def test_blocks_without_the_dense_layer():
    model = tiny_model(gates=1.0, ff_mult=0)
    block = next(iter(model.gated_blocks.values()))
    assert block.ff is None and block.ff_gate is None
    ours, bare, (before, seg0, _) = _ours_and_bare(model)
    assert torch.allclose(ours[before], bare[before], atol=1e-5)
    assert not torch.allclose(ours[seg0], bare[seg0], atol=1e-3)


def test_decoding_routes_once_per_context_and_matches_the_masked_path():
    """A decoding turn reuses one MediaContext: which media each row sees and that media's
    keys/values are derived once, and attending to them alone equals the masked attention
    over every media."""
    from engine.cross_attention import Routing

    torch.manual_seed(0)
    model = tiny_model(gates=1.0)
    visual = torch.randn(2, 3, 4, model.resampler.dim)
    step = MediaContext(visual, torch.tensor([[2], [0]]))  # row 0 sees its 3rd media, row 1 its 1st
    x = torch.randn(2, 1, 64)
    with torch.no_grad():
        outs = [{bid: block(x, step, bid) for bid, block in model.gated_blocks.items()} for _ in range(2)]
        route = step.routing()
        assert step.routing() is route and route.all_seen and route.row_media.tolist() == [2, 0]
        assert set(step._row_kv) == set(model.gated_blocks)
        masked = MediaContext(visual, step.media_index, kv=dict(step.kv))
        masked._routing = Routing(route.seen, False, None)  # force the general, masked path
        for bid, block in model.gated_blocks.items():
            assert torch.equal(outs[0][bid], outs[1][bid])
            torch.testing.assert_close(block(x, masked, bid), outs[0][bid], rtol=1e-5, atol=1e-6)
