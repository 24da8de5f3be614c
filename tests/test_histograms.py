"""The aggregate's per-token histograms (stats.histograms), against numpy on the arrays they replace."""
import numpy as np

from jobs.stats import histograms as H


def test_log_hist_counts_and_mean_exactly():
    x = np.array([0.0, 1e-12, -3.0, 0.5, 0.5, 2e4, -1e-3])
    h = H.log_hist(x)
    assert (h.n, h.zero, h.mean) == (7, 1, x.mean())
    assert h.pos.sum() == 4 and h.neg.sum() == 2
    assert h.pos[0] == 1 and h.pos[-1] == 1  # below 1e-9 and above 1e3 in the end bins


def test_quantile_and_linear_bins_follow_numpy():
    rng = np.random.default_rng(0)
    parts = [rng.laplace(0.05 * k, 0.2 + 0.1 * k, 20_000) for k in range(3)]
    hs = [H.log_hist(p) for p in parts]
    exact = float(np.quantile(np.abs(np.concatenate(parts)), 0.995))
    got = H.abs_quantile(hs, 0.995)
    assert exact <= got <= exact * 10 ** (2 / H.PER_DECADE)  # the upper edge of its bin, at most a bin above
    for p, h in zip(parts, hs):
        counts, edges, beyond = H.linear(h, got)
        ref, _ = np.histogram(np.clip(p, -got, got), bins=80, range=(-got, got))
        assert counts.sum() == len(p)
        assert abs(beyond - np.count_nonzero(np.abs(p) > got)) <= 0.002 * len(p)  # the straddling bin's tokens
        assert np.abs(counts - ref).sum() <= 0.01 * len(p)  # tokens near bin edges may move one bin
    assert H.abs_quantile([H.log_hist(np.zeros(10))], 0.995) == 0.0
