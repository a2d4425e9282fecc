"""Weight averaging of saved models (engine/soup.py)."""
import pytest
import torch
from safetensors.torch import load_file

from engine import soup
from engine.model import FlamingoModel
from engine.testing import tiny_lm, tiny_model, tiny_tokenizer


def _save(tmp_path, name: str, seed: int, **cross_attention):
    """A tiny model with its own random added weights saved under tmp_path/name; its LM is
    saved once under tmp_path/lm so the average can be reloaded."""
    lm_dir = tmp_path / "lm"
    if not lm_dir.exists():
        tiny_lm("llama", seed=0).save_pretrained(lm_dir)
        tiny_tokenizer().save_pretrained(lm_dir)
    model = tiny_model(seed=seed, gates=0.5 + 0.1 * seed, **cross_attention)
    model.config.lm = str(lm_dir)
    model.save_pretrained(tmp_path / name)
    return model.trainable_state_dict()


def test_average_is_the_mean_of_the_weights_and_loads(tmp_path):
    a, b = _save(tmp_path, "a", seed=0), _save(tmp_path, "b", seed=1)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    soup.save_average([tmp_path / "a", tmp_path / "b"], tmp_path / "mean")
    loaded = FlamingoModel.from_pretrained(tmp_path / "mean").trainable_state_dict()
    for k in a:
        torch.testing.assert_close(loaded[k], (a[k] + b[k]) / 2)


def test_average_stored_in_the_requested_dtype(tmp_path):
    a, b = _save(tmp_path, "a", seed=0), _save(tmp_path, "b", seed=1)
    assert soup.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "h"), "--dtype", "float16"]) == 0
    stored = load_file(tmp_path / "h" / "flamingo.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    k = next(iter(a))
    assert torch.equal(stored[k], ((a[k] + b[k]) / 2).half())


def test_average_refuses_models_that_do_not_match(tmp_path, capsys):
    _save(tmp_path, "a", seed=0)
    _save(tmp_path, "other", seed=1, every_n_layers=2)  # other blocks: another config, other weights
    with pytest.raises(ValueError, match="config differs"):
        soup.average_weights([tmp_path / "a", tmp_path / "other"])
    with pytest.raises(ValueError, match="at least 2"):
        soup.average_weights([tmp_path / "a"])
    assert soup.main([str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a saved Flamingo model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
