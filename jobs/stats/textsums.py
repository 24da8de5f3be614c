"""The comparison's per-text matrix in one compiled pass over the paired tokens.

Each text's row holds its sums (tokens, Δlogprob, KL, Δp, agreement, ...), histogram counts and bucket
sums: the columns of ``comparison.layout``. Built with numpy this took ~25 ``bincount`` passes and four
``searchsorted`` binnings over every token (7.6 s for 20M paired tokens, bench/RESULTS.md); here every
token is read once, texts are spread over the cores, and each text's values are added in token order, so
the sums are the ones ``np.bincount`` gives.
"""
from __future__ import annotations

import numba
import numpy as np

from jobs.stats import metrics

# Column starts in the order _fill reads them (comparison.layout names them).
FIELDS = ("tokens", "delta", "delta_sq", "kl", "kl_reverse", "dp", "dp_sq", "same_top1", "agree", "texts",
          "nll_b", "nll_m", "nll_b2", "nll_m2", "nll_bm", "kl_hist", "dp_hist", "conf_n", "conf_kl",
          "conf_delta", "pos_n", "pos_delta")


@numba.njit(cache=True, inline="always")
def _bin(v, edges):
    """The bin of ``v``: np.searchsorted(edges, v, side="right") - 1, clipped to the bins (NaN: the last)."""
    return min(max(np.searchsorted(edges, v, side="right") - 1, 0), len(edges) - 2)


@numba.njit(parallel=True, cache=True, nogil=True)
def _fill(starts, base_lp, model_lp, kl, kl_rev, same, agree, agree_k, conf, position, kl_edges, dp_edges,
          conf_edges, pos_edges, c, out):
    for t in numba.prange(len(starts) - 1):
        row = out[t]
        nb = 0.0
        nm = 0.0
        for i in range(starts[t], starts[t + 1]):
            lb, lm = base_lp[i], model_lp[i]
            d = lm - lb
            dp = np.exp(lm) - np.exp(lb)
            row[c[0]] += 1.0
            row[c[1]] += d
            row[c[2]] += d * d
            row[c[3]] += kl[i]
            row[c[4]] += kl_rev[i]
            row[c[5]] += dp
            row[c[6]] += dp * dp
            row[c[7]] += same[i]
            for k in range(agree_k):
                row[c[8] + k] += (agree[i] >> k) & 1
            nb += lb
            nm += lm
            row[c[15] + _bin(kl[i], kl_edges)] += 1.0
            row[c[16] + _bin(dp, dp_edges)] += 1.0
            cb = _bin(conf[i], conf_edges)
            row[c[17] + cb] += 1.0
            row[c[18] + cb] += kl[i]
            row[c[19] + cb] += d
            pb = _bin(position[i], pos_edges)
            row[c[20] + pb] += 1.0
            row[c[21] + pb] += d
        n = row[c[0]]
        mb, mm = -nb / n, -nm / n
        row[c[9]] = 1.0
        row[c[10]] = mb
        row[c[11]] = mm
        row[c[12]] = mb * mb
        row[c[13]] = mm * mm
        row[c[14]] = mb * mm


def fill(*, sample_id, base_lp, model_lp, kl, kl_reverse, same_top1, agree, agree_k, base_conf, position,
         kl_edges, dp_edges, conf_edges, pos_edges, columns: dict[str, int], width: int) -> np.ndarray:
    """(n_texts × width) float64: the sums described above, the layout given as each field's first column
    (texts in order, each text's rows together)."""
    starts = np.r_[metrics.text_starts(sample_id), len(sample_id)].astype(np.int64)
    out = np.zeros((len(starts) - 1, width))
    f64 = np.float64
    _fill(starts, np.asarray(base_lp, f64), np.asarray(model_lp, f64), np.asarray(kl, f64),
          np.asarray(kl_reverse, f64), np.asarray(same_top1, f64), np.asarray(agree, np.int64), int(agree_k),
          np.asarray(base_conf, f64), np.asarray(position, f64), kl_edges, dp_edges, conf_edges,
          np.asarray(pos_edges, f64), np.array([columns[f] for f in FIELDS], np.int64), out)
    return out
