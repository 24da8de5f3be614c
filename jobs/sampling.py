"""From texts to the token sequences that get scored (SPEC §2): pure, deterministic, no model needed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import SettingsError

MIN_TOKENS = 16  # shorter texts say too little to score
RESERVED = 8  # max_model_len - 8 leaves the engine room for the one generated token and specials
MIN_MODEL_LEN = MIN_TOKENS + RESERVED


@dataclass(frozen=True)
class Sample:
    sample_id: int  # index of the text in its evaluation set
    token_ids: tuple[int, ...]
    truncated: bool


def max_tokens(max_model_len: int) -> int:
    if max_model_len < MIN_MODEL_LEN:
        raise SettingsError(
            f"max_model_len {max_model_len} is below {MIN_MODEL_LEN}: sequences are cut to "
            f"max_model_len - {RESERVED} tokens and texts under {MIN_TOKENS} tokens are dropped"
        )
    return max_model_len - RESERVED


def select(token_lists: Sequence[Sequence[int]], max_model_len: int) -> list[Sample]:
    """Drop texts under 16 tokens; truncate the rest to max_model_len - 8 in token space.

    Truncation happens on token ids, never by decoding and re-encoding, so the scored stream is
    exactly the first tokens of the tokenizer's output for the whole text.
    """
    limit = max_tokens(max_model_len)
    out = []
    for sid, ids in enumerate(token_lists):
        if len(ids) < MIN_TOKENS:
            continue
        out.append(Sample(sid, tuple(int(i) for i in ids[:limit]), len(ids) > limit))
    return out


def tokenize(texts: Sequence[str], encode: Callable[[str], Sequence[int]]) -> list[list[int]]:
    """Tokenise with the tokenizer's default special-token handling (``encode`` is the tokenizer's)."""
    return [list(encode(t)) for t in texts]


def hf_encoder(tokenizer) -> Callable[[str], list[int]]:
    return lambda text: tokenizer(text)["input_ids"]
