"""From texts to the token sequences that get scored (SPEC §2): pure, deterministic, no model needed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from jobs.core.errors import SettingsError

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
    return [Sample(sid, tuple(int(i) for i in ids[:limit]), len(ids) > limit)
            for sid, ids in enumerate(token_lists) if len(ids) >= MIN_TOKENS]


def tokenize(texts: Sequence[str], encode: Callable[[str], Sequence[int]]) -> list[list[int]]:
    """Tokenise with the tokenizer's default special-token handling (``encode`` is the tokenizer's)."""
    return [list(encode(t)) for t in texts]


def hf_encoder(tokenizer) -> Callable[[str], list[int]]:
    return lambda text: tokenizer(text)["input_ids"]


# -- document-level sets, scored in rolling windows (lm-evaluation-harness's loglikelihood_rolling) --------
def documents(token_lists: Sequence[Sequence[int]], prefix_token: int) -> list[Sample]:
    """Each document whole, after one prefix token (BOS, else EOS, as lm-eval's ``prefix_token_id``) so
    that its first token has something to condition on. Nothing is dropped or truncated: long documents
    are scored in windows (``rolling_windows``)."""
    return [Sample(sid, (int(prefix_token),) + tuple(int(i) for i in ids), False)
            for sid, ids in enumerate(token_lists) if len(ids)]


def rolling_windows(n: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows over a document stream of ``n`` tokens (prefix included): (start, end, first_scored).

    Positions ``start+first_scored .. end-1`` are scored by the window ``[start, end)``; every position
    1..n-1 is scored exactly once. The first window scores all of ``1..window-1``; each later one scores the
    next ``stride`` positions (fewer at the end) with as much preceding context as fits in ``window``.
    ``stride = window - 1`` (the default) gives lm-eval's disjoint windows (``get_rolling_token_windows``
    with ``context_len=1`` and ``make_disjoint_window``, max_length = window - 1); a smaller stride
    overlaps the windows so that every token after the first window sees at least ``window - stride``
    tokens of context.
    """
    # lm_eval.utils.get_rolling_token_windows computes the same windows (tests/test_sampling.py holds them
    # equal), but the docker demo scores in the quantize image, which has no lm-eval, and it yields tokens, not places
    if window < 2:
        raise SettingsError(f"a rolling window needs at least 2 tokens, not {window}")
    stride = window - 1 if stride in (None, 0) else stride
    if not 1 <= stride <= window - 1:
        raise SettingsError(f"stride {stride} must be between 1 and the window length - 1 ({window - 1})")
    if n < 2:
        return []
    first_end = min(window, n)
    out = [(0, first_end, 1)]
    done = first_end - 1  # positions 1..done are scored
    while done < n - 1:
        end = min(done + stride, n - 1) + 1
        start = max(0, end - window)
        out.append((start, end, done + 1 - start))
        done = end - 1
    return out
