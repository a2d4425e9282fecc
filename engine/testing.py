"""Small random-weight models built in-process, for tests and development: no downloads.

`tiny_model()` is a complete Flamingo (tiny Llama-style LM + tiny conv vision tower) that runs in
milliseconds, so tests can exercise every code path the real model uses.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .config import CrossAttentionConfig, FlamingoConfig, ResamplerConfig, VisionConfig
from .model import FlamingoModel
from .vision import TinyVisionTower

_CORPUS = """The quick brown fox jumps over the lazy dog. A photo of a cat sitting on a mat.
Question: What is in the image? Answer: a red apple. How many dogs are there? Two.
Hello! How can I help you today? The capital of France is Paris. User assistant system.
An illustration of a blue bird flying over green hills under a yellow sun at noon.""" * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (384 tokens) with a chat template; every string encodes."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_lm(family: str = "llama", vocab_size: int = 384, seed: int = 0, hidden: int = 64, layers: int = 4):
    """A random causal LM of the given family: llama, gpt_neox, gpt2, opt."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                            max_position_embeddings=512, tie_word_embeddings=False, **common)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    elif family == "opt":
        cfg = OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                        max_position_embeddings=512, word_embed_proj_dim=hidden, **common)
    else:
        raise ValueError(f"unknown tiny LM family {family!r}")
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_config(**cross_attention) -> FlamingoConfig:
    return FlamingoConfig(
        lm="tiny",
        vision=VisionConfig(name="tiny", image_size=32),
        resampler=ResamplerConfig(depth=2, heads=2, dim_head=16, num_latents=4, ff_mult=2, max_frames=8),
        cross_attention=CrossAttentionConfig(**{"every_n_layers": 1, "heads": 2, "dim_head": 16, "ff_mult": 2, **cross_attention}),
    )


def tiny_model(family: str = "llama", seed: int = 0, gates: float | None = None, **cross_attention) -> FlamingoModel:
    """A complete random Flamingo. `gates` sets every tanh gate's alpha (0 = identity at init)."""
    torch.manual_seed(seed)
    model = FlamingoModel(tiny_config(**cross_attention), tiny_lm(family, seed=seed), tiny_tokenizer(), TinyVisionTower(32, seed=seed))
    if gates is not None:
        set_gates(model, gates)
    return model


def set_gates(model: FlamingoModel, alpha: float) -> None:
    with torch.no_grad():
        for block in model.gated_blocks.values():
            block.attn_gate.fill_(alpha)
            if block.ff_gate is not None:
                block.ff_gate.fill_(alpha)
