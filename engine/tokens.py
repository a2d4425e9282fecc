"""The two tokens Flamingo adds to the LM's vocabulary: <image> marks where a media item sits in
the text; <EOC> (end of chunk) closes each example and answer."""
from __future__ import annotations

from tokenizers import AddedToken


def add_flamingo_tokens(tokenizer, media_token: str = "<image>", eoc_token: str = "<EOC>") -> tuple[int, int]:
    """Adds the tokens if missing (idempotent) and gives the tokenizer a pad token.
    Returns (media_token_id, eoc_token_id)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (media_token, eoc_token) if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(media_token), tokenizer.convert_tokens_to_ids(eoc_token)


def bos_prefix(tokenizer) -> list[int]:
    """The BOS the tokenizer itself puts before a plain encode ([] when it adds none, as
    SmolLM2's does). Training sequences and evaluation prompts both start with exactly this."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []
