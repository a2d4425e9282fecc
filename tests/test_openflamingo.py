"""OpenFlamingo checkpoints: conversion checked numerically against the real `open_flamingo`
package (2.0.1), built around the same tiny LM and vision tower as ours."""

import pytest
import torch

import engine.__main__ as cli
from bench._openflamingo import build_openflamingo, import_open_flamingo, randomize_openflamingo
from engine.model import FlamingoModel
from engine.openflamingo import (
    NotAnOpenFlamingoCheckpoint,
    convert_state_dict,
    load_checkpoint,
    openflamingo_token_ids,
    unwrap_state_dict,
)
from engine.resampler import PerceiverResampler
from engine.testing import tiny_lm, tiny_tokenizer
from engine.vision import TinyVisionTower

FAMILIES = ["llama", "gpt_neox"]  # tied and untied embeddings
BASE_VOCAB = 384  # tiny_tokenizer's


def _openflamingo(family, only_last=True, every_n=2, seed=1):
    of, of_tok = build_openflamingo(
        tiny_lm(family, seed=0), tiny_tokenizer(), TinyVisionTower(32, seed=0),
        cross_attn_every_n_layers=every_n, only_attend_immediate_media=only_last,
    )
    randomize_openflamingo(of, seed=seed)
    return of.eval(), of_tok


def _ours(of, family, only_last=True, lm=None):
    tok = tiny_tokenizer()
    media_id, eoc_id = openflamingo_token_ids(tok)
    lm = lm if lm is not None else tiny_lm(family, seed=0)
    conv = convert_state_dict(of.state_dict(), media_id, eoc_id, tied=bool(lm.config.tie_word_embeddings), lm="tiny", vision="tiny")
    conv.config.cross_attention.only_last_media = only_last
    model = FlamingoModel(conv.config, lm, tok, TinyVisionTower(32, seed=0))
    model.load_trainable_state_dict(conv.state_dict)
    return model.eval()


def _batch(ours, seed=0):
    """Two sequences (ids in our vocabulary), three images: row 0 uses all three, row 1 two.

    Both rows START with <image>: in OpenFlamingo's "all previous media" mode a token before the
    first image gets a uniform average over all the media (every key masked, softmax of a
    constant), in ours exactly zero (by design), so no token may precede the first image."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, BASE_VOCAB, (2, 24), generator=g)
    m, e = ours.media_token_id, ours.eoc_token_id
    ids[0, [0, 8, 16]] = m
    ids[0, [7, 15]] = e
    ids[1, [0, 11]] = m
    ids[1, [10, 23]] = e
    pixels = torch.rand(2, 3, 1, 3, 32, 32, generator=g)
    return ids, pixels


def _to_openflamingo_ids(ids, ours, of):
    out = ids.clone()
    out[ids == ours.media_token_id] = of.media_token_id
    out[ids == ours.eoc_token_id] = of.eoc_token_id
    return out


def _shared_logits(logits, media_id, eoc_id):
    """The base vocabulary's columns, then <image>'s and <|endofchunk|>'s."""
    return torch.cat([logits[..., :BASE_VOCAB], logits[..., [media_id, eoc_id]]], dim=-1)


def _assert_parity(ours, of, ids, pixels, atol=1e-4):
    with torch.no_grad():
        a = _shared_logits(ours(ids, ours.encode_media(pixels)).logits, ours.media_token_id, ours.eoc_token_id)
        b = _shared_logits(of(pixels, _to_openflamingo_ids(ids, ours, of)).logits, of.media_token_id, of.eoc_token_id)
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err < atol, f"max |logit difference| {err:.2e}"
    return a


def test_token_ids_match_openflamingo_factory():
    of, of_tok = _openflamingo("llama")
    assert openflamingo_token_ids(tiny_tokenizer()) == (of.media_token_id, of.eoc_token_id)
    assert len(of_tok) == BASE_VOCAB + 3  # <|endofchunk|>, <image>, <PAD>


@pytest.mark.parametrize("only_last", [True, False], ids=["only_last", "all_previous"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_openflamingo(family, only_last):
    of, _ = _openflamingo(family, only_last=only_last, every_n=1 if family == "llama" else 2)
    ours = _ours(of, family, only_last)
    assert ours.config.cross_attention.every_n_layers == (1 if family == "llama" else 2)
    assert ours.config.resampler.depth == 6 and ours.config.resampler.heads == 8 and ours.config.resampler.num_latents == 64
    ids, pixels = _batch(ours)
    logits = _assert_parity(ours, of, ids, pixels)
    # Not vacuous: the media change the logits a lot, and the two masking modes differ.
    with torch.no_grad():
        bare = tiny_lm(family, seed=0)(inputs_embeds=ours.embed(ids)).logits[..., :BASE_VOCAB]
    assert (logits[..., :BASE_VOCAB] - bare).abs().max() > 0.1
    ours.config.cross_attention.only_last_media = not only_last
    with torch.no_grad():
        other = ours(ids, ours.encode_media(pixels)).logits[..., :BASE_VOCAB]
    assert (other - logits[..., :BASE_VOCAB]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_openflamingo_generate(family):
    """OpenFlamingo's generate() (patched for transformers 5) against a plain greedy loop."""
    of, of_tok = _openflamingo(family)
    ours = _ours(of, family)
    ids, pixels = _batch(ours)
    ids = ids[:, :20]
    with torch.no_grad():
        # A generated <image> would need an image; <PAD> has no counterpart in ours; <|endofchunk|>
        # would stop OpenFlamingo's generate early (its eos): suppress all three on both sides.
        suppress = [of_tok.pad_token_id, of.media_token_id, of.eoc_token_id]
        theirs = of.generate(pixels, _to_openflamingo_ids(ids, ours, of), max_new_tokens=5, do_sample=False, suppress_tokens=suppress)
        visual = ours.encode_media(pixels)
        seq = ids
        for _ in range(5):
            logits = ours(seq, visual).logits[:, -1]
            logits[:, [ours.media_token_id, ours.eoc_token_id]] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert theirs.shape[1] == ids.shape[1] + 5
    assert torch.equal(_to_openflamingo_ids(seq, ours, of), theirs)


def _tiny_lm_dir(tmp_path, family):
    path = tmp_path / f"lm-{family}"
    tiny_lm(family, seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_from_pretrained(tmp_path, family):
    of, _ = _openflamingo(family, only_last=False)
    ours = _ours(of, family, only_last=False)
    ours.config.lm = str(_tiny_lm_dir(tmp_path, family))
    ours.save_pretrained(tmp_path / "converted")
    loaded = FlamingoModel.from_pretrained(tmp_path / "converted").eval()
    assert loaded.config.eoc_token == "<|endofchunk|>" and not loaded.config.cross_attention.only_last_media
    ids, pixels = _batch(ours)
    with torch.no_grad():
        a = ours(ids, ours.encode_media(pixels)).logits
        b = loaded(ids, loaded.encode_media(pixels)).logits
    assert torch.equal(a, b)
    _assert_parity(loaded, of, ids, pixels)


def _run_cli(argv, monkeypatch):
    # Only this subcommand: the CLI imports every command module, some of which may not exist yet.
    monkeypatch.setattr(cli, "COMMANDS", ("convert_openflamingo",))
    return cli.main(["convert-openflamingo", *argv])


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_converts_a_saved_checkpoint(tmp_path, monkeypatch, capsys, family):
    of, _ = _openflamingo(family, every_n=2)
    lm_dir = _tiny_lm_dir(tmp_path, family)
    # As OpenFlamingo's training saves it, from a DDP-wrapped model: wrapped and `module.`-prefixed,
    # with the trainable-only filter (blocks under their FlamingoLayer, no vision encoder).
    sd = {k: v for k, v in of.state_dict().items() if "gated_cross_attn_layers" not in k and "old_decoder_blocks" not in k and "vision_encoder" not in k}
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "checkpoint.pt")
    rc = _run_cli(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "out"), "--lm", str(lm_dir), "--vision", "tiny"], monkeypatch)
    assert rc == 0, capsys.readouterr().err
    assert '"every_n_layers": 2' in capsys.readouterr().out
    loaded = FlamingoModel.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.cross_attention.every_n_layers == 2 and loaded.block_layer_ids == [1, 3]
    ids, pixels = _batch(loaded)
    _assert_parity(loaded, of, ids, pixels)


def test_cli_rejects_files_that_are_not_openflamingo_checkpoints(tmp_path, monkeypatch, capsys):
    garbage = tmp_path / "notes.pt"
    garbage.write_text("hello")
    other = tmp_path / "other.pt"
    torch.save({"model_state_dict": {"encoder.weight": torch.zeros(2, 2)}}, other)
    for path, message in [(garbage, "cannot read"), (other, "not an OpenFlamingo checkpoint"), (tmp_path / "missing.pt", "not found")]:
        rc = _run_cli(["--checkpoint", str(path), "--out", str(tmp_path / "out"), "--lm", "unused", "--vision", "tiny"], monkeypatch)
        err = capsys.readouterr().err
        assert rc == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_a_mismatched_every_n(tmp_path, monkeypatch, capsys):
    of, _ = _openflamingo("llama", every_n=2)
    torch.save(of.state_dict(), tmp_path / "checkpoint.pt")
    lm_dir = _tiny_lm_dir(tmp_path, "llama")
    rc = _run_cli(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "out"), "--lm", str(lm_dir), "--vision", "tiny", "--cross-attn-every-n-layers", "4"], monkeypatch)
    assert rc == 2 and "does not match the checkpoint" in capsys.readouterr().err
    base = ["--checkpoint", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "out"), "--vision", "tiny"]
    assert _run_cli(base, monkeypatch) == 2 and "pass --lm" in capsys.readouterr().err  # no default fits a tiny LM
    assert _run_cli([*base, "--lm", str(tmp_path / "no-such-lm")], monkeypatch) == 2 and "cannot load the LM" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_help(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", ("convert_openflamingo",))
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["convert-openflamingo", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for text in ("--checkpoint", "--lm", "--vision", "--cross-attn-every-n-layers", "openai/clip-vit-large-patch14", "RedPajama-INCITE-Base-3B-v1"):
        assert text in out


def test_both_block_layouts_and_wrappers_convert_identically():
    of, _ = _openflamingo("gpt_neox", every_n=2)
    sd = of.state_dict()
    listed = {k: v for k, v in sd.items() if ".gated_cross_attn_layer." not in k}
    wrapped = {k: v for k, v in sd.items() if "gated_cross_attn_layers" not in k}
    a = convert_state_dict(listed, 385, 384, tied=False).state_dict
    b = convert_state_dict({"model_state_dict": {f"module.{k}": v for k, v in wrapped.items()}}, 385, 384, tied=False).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted({k.split(".")[1] for k in a if k.startswith("gated_blocks.")}) == ["1", "3"]
    assert torch.equal(a["resampler.time_embeddings"], torch.zeros_like(a["resampler.time_embeddings"]))
    assert torch.equal(a["new_token_output"], sd["lang_encoder.lm_head.weight"][[385, 384]])


def test_untied_lm_without_output_rows_is_flagged():
    of, _ = _openflamingo("gpt_neox")
    sd = {k: v for k, v in of.state_dict().items() if "lm_head" not in k}
    conv = convert_state_dict(sd, 385, 384, tied=False)
    assert conv.output_rows_missing and "new_token_output" not in conv.state_dict and conv.notes


def test_resampler_with_frame_embeddings_matches_openflamingo():
    """Frame embeddings (absent from released checkpoints) map onto our time embeddings; head
    count and depth are read from the shapes. Multi-frame input, resampler alone."""
    import_open_flamingo()
    from open_flamingo.src.helpers import PerceiverResampler as OFResampler

    torch.manual_seed(0)
    theirs = OFResampler(dim=32, depth=2, heads=2, num_latents=8, max_num_frames=4).eval()
    with torch.no_grad():
        for mod in theirs.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.add_(torch.randn_like(mod.weight) * 0.2)
                mod.bias.add_(torch.randn_like(mod.bias) * 0.2)
    sd = {f"perceiver.{k}": v for k, v in theirs.state_dict().items()}
    sd.update(_fake_block(32))
    conv = convert_state_dict(sd, 0, 1, tied=True)
    cfg = conv.config.resampler
    assert (cfg.depth, cfg.heads, cfg.num_latents, cfg.max_frames) == (2, 2, 8, 4)
    ours = PerceiverResampler(cfg, 32).eval()
    ours.load_state_dict({k[len("resampler."):]: v for k, v in conv.state_dict.items() if k.startswith("resampler.")})
    x = torch.randn(2, 3, 4, 5, 32)  # (B, media, frames, tokens, d)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-5


def _fake_block(dim, layer=0):
    p = f"lang_encoder.gated_cross_attn_layers.{layer}."
    w = lambda *s: torch.randn(*s)
    return {
        p + "attn.norm.weight": w(dim), p + "attn.norm.bias": w(dim), p + "attn.to_q.weight": w(64, dim),
        p + "attn.to_kv.weight": w(128, dim), p + "attn.to_out.weight": w(dim, 64), p + "attn_gate": w(1), p + "ff_gate": w(1),
        p + "ff.0.weight": w(dim), p + "ff.0.bias": w(dim), p + "ff.1.weight": w(4 * dim, dim), p + "ff.3.weight": w(dim, 4 * dim),
    }


def test_unrepresentable_checkpoints_are_refused():
    of, _ = _openflamingo("llama", every_n=1)
    sd = dict(of.state_dict())
    with pytest.raises(NotAnOpenFlamingoCheckpoint, match="media_time_embs"):
        convert_state_dict({**sd, "perceiver.media_time_embs": torch.ones(4, 1, 32)}, 385, 384, tied=True)
    irregular = {k: v for k, v in sd.items() if "gated_cross_attn_layers.2." not in k and "layers.2.gated_cross_attn_layer." not in k}
    with pytest.raises(NotAnOpenFlamingoCheckpoint, match="every n-th"):
        convert_state_dict(irregular, 385, 384, tied=True)
    with pytest.raises(NotAnOpenFlamingoCheckpoint, match="rows"):
        convert_state_dict(sd, 1000, 384, tied=True)
    with pytest.raises(NotAnOpenFlamingoCheckpoint, match="not a state dict"):
        unwrap_state_dict([1, 2])


def test_load_checkpoint_reads_safetensors_and_names_directories(tmp_path):
    from safetensors.torch import save_file

    save_file({"module.perceiver.latents": torch.zeros(2, 4)}, tmp_path / "c.safetensors")
    assert list(load_checkpoint(tmp_path / "c.safetensors")) == ["perceiver.latents"]
    with pytest.raises(NotAnOpenFlamingoCheckpoint, match="directory"):
        load_checkpoint(tmp_path)
