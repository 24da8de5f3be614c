"""The llama.cpp / exllamav3 statistics, each against a value computed by hand on small arrays."""
import math

import numpy as np
import pytest

from jobs.stats import comparison, divergence, metrics


def make_pair(sids, base_lp, model_lp, kl=None, conf=None, same=None, agree=None, positions=None):
    n = len(base_lp)
    sids = np.asarray(sids)
    pos = positions if positions is not None else np.concatenate(
        [np.arange(1, np.sum(sids == s) + 1) for s in dict.fromkeys(sids.tolist())])
    kl = np.zeros(n) if kl is None else np.asarray(kl, float)
    div = divergence.PairDivergence(kl=kl, kl_reverse=kl * 2, agree=np.asarray(
        agree if agree is not None else np.full(n, 0b11), np.uint16), agree_k=2, k=2)
    return comparison.Pair(sids, np.asarray(pos), np.arange(n), np.asarray(base_lp, float),
                           np.asarray(model_lp, float), np.asarray(conf if conf is not None else np.full(n, 0.95)),
                           np.asarray(same if same is not None else np.ones(n, bool)), div)


def test_means_rms_agreement_and_ratio_by_hand():
    b = np.log([0.5, 0.25, 0.8, 0.1])
    m = np.log([0.4, 0.25, 0.9, 0.05])
    p = make_pair([0, 0, 1, 1], b, m, kl=[0.1, 0.0, 0.2, 0.3], same=[True, False, True, True],
                  agree=[0b11, 0b00, 0b01, 0b11])
    s = comparison.statistics([p], n_boot=200, seed=0)
    dp = np.array([0.4 - 0.5, 0.0, 0.9 - 0.8, 0.05 - 0.1])
    assert s["kld"]["mean"]["value"] == pytest.approx(0.15)
    assert s["kld_reverse"]["mean"]["value"] == pytest.approx(0.30)
    assert s["kld"]["max"] == pytest.approx(0.3) and s["kld"]["min"] == 0.0
    assert s["delta_p"]["mean"]["value"] == pytest.approx(dp.mean())
    assert s["delta_p"]["rms"]["value"] == pytest.approx(math.sqrt(np.mean(dp ** 2)))
    assert s["same_top1"]["value"] == pytest.approx(0.75)
    assert [a["value"] for a in s["topk_agreement"]] == [pytest.approx(0.75), pytest.approx(0.5)]
    d = m - b
    assert s["ln_ppl_ratio"]["value"] == pytest.approx(-d.mean())
    assert s["ln_ppl_ratio"]["se_token"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(4))
    assert s["kld"]["quantiles"]["50"]["value"] == pytest.approx(np.percentile([0.1, 0, 0.2, 0.3], 50))
    assert s["tokens"] == 4 and s["texts"] == 2


def test_correlation_of_per_text_ln_ppl_by_hand():
    rng = np.random.default_rng(0)
    sids = np.repeat(np.arange(30), 5)
    b = -rng.exponential(1.0, sids.size)
    m = b - rng.normal(0.1, 0.3, sids.size)
    s = comparison.statistics([make_pair(sids, b, m)], n_boot=300, seed=0)
    nb = -b.reshape(30, 5).mean(1)
    nm = -m.reshape(30, 5).mean(1)
    assert s["ln_ppl_correlation"]["value"] == pytest.approx(np.corrcoef(nb, nm)[0, 1])
    assert s["ln_ppl_correlation_tokens"] == pytest.approx(np.corrcoef(b, m)[0, 1])
    assert s["ln_ppl_correlation"]["lo"] <= s["ln_ppl_correlation"]["value"] <= s["ln_ppl_correlation"]["hi"]


def test_the_bootstrap_draws_the_texts_metrics_draws():
    # W @ M with the same generator calls gives exactly metrics.bootstrap_delta_nll's replicates.
    rng = np.random.default_rng(4)
    sids = np.repeat(np.arange(40), rng.integers(2, 9, 40))
    b = -rng.exponential(1.0, sids.size)
    m = b - rng.normal(0.05, 0.2, sids.size)
    p = make_pair(sids, b, m)
    lay = comparison.layout(2)
    reps = comparison.replicate_sums([comparison.text_matrix(p, lay)], 500, seed=7)
    ours = -lay(reps, "delta") / lay(reps, "tokens")
    theirs = metrics.bootstrap_delta_nll([metrics.per_text_sums(sids, m - b)], n_boot=500, seed=7)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_intervals_collapse_when_every_text_is_alike():
    b = np.log([0.5, 0.4] * 6)
    m = np.log([0.45, 0.4] * 6)
    s = comparison.statistics([make_pair(np.repeat(np.arange(6), 2), b, m, kl=[0.01, 0.02] * 6)], 300, 0)
    assert s["kld"]["mean"]["lo"] == pytest.approx(0.015) == s["kld"]["mean"]["hi"]
    assert s["ln_ppl_ratio"]["lo"] == pytest.approx(s["ln_ppl_ratio"]["value"])


def test_percentile_intervals_from_histograms_cover_the_exact_percentile():
    rng = np.random.default_rng(1)
    sids = np.repeat(np.arange(200), 50)
    kl = rng.lognormal(-6, 2, sids.size)
    b = np.full(sids.size, -1.0)
    m = b + rng.normal(0, 0.01, sids.size)
    s = comparison.statistics([make_pair(sids, b, m, kl=kl)], 400, 0)
    for q in ("99", "90", "50", "10", "1"):
        c = s["kld"]["quantiles"][q]
        assert c["value"] == pytest.approx(np.percentile(kl, float(q)))
        assert c["lo"] <= c["value"] * 1.13 and c["hi"] >= c["value"] / 1.13  # within one bin of the CI
        assert c["hi"] / c["lo"] < 2.0


def test_hist_quantile_reads_the_quantile_inside_its_bin():
    edges = np.array([-np.inf, 1.0, 10.0, 100.0, np.inf])
    counts = np.array([[0, 10, 10, 0]])
    assert comparison.hist_quantile(counts, edges, 0.5, log=True)[0] == pytest.approx(10.0)
    assert comparison.hist_quantile(counts, edges, 0.25, log=True)[0] == pytest.approx(10 ** 0.5)
    assert comparison.hist_quantile(counts, edges, 0.25, log=False)[0] == pytest.approx(5.5)
    assert np.isnan(comparison.hist_quantile(np.array([[5, 0, 0, 0]]), edges, 0.5, log=True)[0])  # open bin


def test_buckets_by_confidence_and_position_by_hand():
    b = np.log([0.5, 0.5, 0.5, 0.5])
    m = np.log([0.25, 0.5, 0.5, 0.125])
    p = make_pair([0, 0, 0, 0], b, m, kl=[0.4, 0.0, 0.2, 0.6], conf=[0.05, 0.55, 0.95, 0.95],
                  positions=np.array([1, 2, 3, 600]))
    s = comparison.statistics([p], 100, 0)
    conf = {round(r["lo_edge"], 1): r for r in s["by_confidence"]}
    assert set(conf) == {0.0, 0.5, 0.9}
    assert conf[0.9]["tokens"] == 2 and conf[0.9]["kld"]["value"] == pytest.approx(0.4)
    assert conf[0.9]["delta_nll"]["value"] == pytest.approx(-(0 + math.log(0.25)) / 2)
    assert conf[0.0]["delta_nll"]["value"] == pytest.approx(math.log(2))
    pos = {int(r["lo_edge"]): r["tokens"] for r in s["by_position"]}
    assert pos == {1: 1, 2: 2, 512: 1}


def test_sets_are_strata_and_overall_pools_them():
    b1, m1 = np.log([0.5, 0.5]), np.log([0.25, 0.5])
    b2, m2 = np.log([0.5] * 4), np.log([0.5] * 4)
    s = comparison.statistics([make_pair([0, 1], b1, m1), make_pair([0, 0, 1, 1], b2, m2)], 200, 0)
    assert s["tokens"] == 6 and s["texts"] == 4
    assert s["ln_ppl_ratio"]["value"] == pytest.approx(math.log(2) / 6)


def test_worst_tokens_and_texts():
    b = np.log([0.5, 0.5, 0.5, 0.5, 0.5])
    m = np.log([0.4, 0.05, 0.5, 0.25, 0.5])
    p = make_pair([0, 0, 1, 1, 1], b, m, kl=[0.0, 0.1, 0.9, 0.2, 0.0])
    w = comparison.worst_tokens(p, 2)
    assert w["delta_nll"].tolist() == [1, 3] and w["kld"].tolist() == [2, 3]
    t = comparison.worst_texts(p, 5, min_tokens=1)
    assert [x["sample_id"] for x in t] == [0, 1]
    assert t[0]["delta_nll"] == pytest.approx((math.log(0.5 / 0.4) + math.log(10)) / 2)


def _text_matrix_by_bincount(p, lay):
    """The per-text matrix as numpy's bincount and searchsorted give it: the reference for textsums."""
    ti = np.cumsum(np.r_[0, np.diff(p.sample_id) != 0])
    nt = ti[-1] + 1
    m = np.zeros((nt, lay.width))
    d = p.model_lp - p.base_lp
    dp = np.exp(p.model_lp) - np.exp(p.base_lp)

    def binned(values, edges):
        return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)

    def put(name, values, bins=None, nbins=1):
        idx = ti if bins is None else ti * nbins + bins
        m[:, lay.slices[name]] = np.bincount(idx, weights=values, minlength=nt * nbins).reshape(nt, nbins)

    for name, values in (("tokens", np.ones(len(d))), ("delta", d), ("delta_sq", d * d), ("kl", p.div.kl),
                         ("kl_reverse", p.div.kl_reverse), ("dp", dp), ("dp_sq", dp * dp),
                         ("same_top1", p.same_top1.astype(float))):
        put(name, values)
    for k in range(p.div.agree_k):
        m[:, lay.slices["agree"].start + k] = np.bincount(ti, weights=(p.div.agree >> k) & 1, minlength=nt)
    n = m[:, lay.slices["tokens"].start]
    nll_b = -np.bincount(ti, weights=p.base_lp) / n
    nll_m = -np.bincount(ti, weights=p.model_lp) / n
    for name, v in (("texts", 1.0), ("nll_b", nll_b), ("nll_m", nll_m), ("nll_b2", nll_b ** 2), ("nll_m2", nll_m ** 2),
                    ("nll_bm", nll_b * nll_m)):
        m[:, lay.slices[name].start] = v
    nk, nd = len(comparison.KL_EDGES) - 1, len(comparison.DP_EDGES) - 1
    put("kl_hist", None, binned(p.div.kl, comparison.KL_EDGES), nk)
    put("dp_hist", None, binned(dp, comparison.DP_EDGES), nd)
    cb, nc = binned(p.base_conf, comparison.CONF_EDGES), len(comparison.CONF_EDGES) - 1
    pb, npos = binned(p.position, comparison.POS_EDGES), len(comparison.POS_EDGES) - 1
    put("conf_n", None, cb, nc)
    put("conf_kl", p.div.kl, cb, nc)
    put("conf_delta", d, cb, nc)
    put("pos_n", None, pb, npos)
    put("pos_delta", d, pb, npos)
    return m


def test_the_compiled_text_matrix_equals_bincount():
    rng = np.random.default_rng(11)
    sids = np.repeat(rng.choice(10_000, 60, replace=False).cumsum(), rng.integers(1, 80, 60))
    n = len(sids)
    b = -rng.exponential(2.0, n)
    m = b + rng.normal(0, 0.3, n)
    m[::7] = b[::7]  # Δp = 0: the central bin
    kl = rng.exponential(1e-3, n)
    kl[::5] = 0.0
    kl[1::9] = comparison.KL_EDGES[100]  # on an edge: the bin above, as searchsorted(side="right")
    kl[2::11] = 1e3  # beyond the last edge
    conf = rng.random(n)
    conf[::13] = 1.0
    pos = np.concatenate([np.arange(1, c + 1) for c in np.unique(sids, return_counts=True)[1]]) * 37
    p = make_pair(sids, b, m, kl=kl, conf=conf, same=rng.random(n) > 0.2,
                  agree=rng.integers(0, 4, n), positions=pos)
    lay = comparison.layout(2)
    np.testing.assert_allclose(comparison.text_matrix(p, lay), _text_matrix_by_bincount(p, lay), rtol=1e-12, atol=1e-15)
