"""lm-evaluation-harness's document-level perplexities (task ``wikitext``), from the per-token archive.

For documents d with total loglikelihood L_d (the sum of the logprobs of all their tokens, scored in
rolling windows), W_d words and B_d bytes of the original page (``evalsets.lm_eval_units``):

    word_perplexity = exp(−Σ L_d / Σ W_d)
    byte_perplexity = exp(−Σ L_d / Σ B_d)
    bits_per_byte   = −Σ L_d / Σ B_d / ln 2

— lm-eval's ``weighted_perplexity`` and ``bits_per_byte`` aggregations. Intervals: 95 %, bootstrap over
documents (the same resampling as every other interval of the report).
"""
from __future__ import annotations

import math

import numpy as np

from jobs.stats.intervals import interval, replicate_sums
from jobs.core.errors import AggregateError


def metrics(sample_id: np.ndarray, logprob: np.ndarray, words, bytes_, n_boot: int = 1000, seed: int = 0) -> dict:
    words, bytes_ = np.asarray(words, np.float64), np.asarray(bytes_, np.float64)
    docs, inv = np.unique(sample_id, return_inverse=True)
    if len(docs) and (docs.min() < 0 or docs.max() >= len(words)):
        raise AggregateError(f"document ids up to {int(docs.max())} but units for {len(words)} documents")
    ll = np.bincount(inv, weights=logprob, minlength=len(docs))
    m = np.column_stack([ll, words[docs], bytes_[docs]])
    point = m.sum(axis=0)
    reps = replicate_sums([m], n_boot, seed)

    def stats(s):
        return {"word_perplexity": np.exp(-s[..., 0] / s[..., 1]), "byte_perplexity": np.exp(-s[..., 0] / s[..., 2]),
                "bits_per_byte": -s[..., 0] / s[..., 2] / math.log(2)}

    p, r = stats(point), stats(reps)
    out = {"documents": int(len(docs)), "tokens": int(len(logprob)), "words": int(point[1]), "bytes": int(point[2])}
    for k in p:
        lo, hi = interval(r[k])
        out[k] = {"value": float(p[k]), "lo": lo, "hi": hi}
    return out
