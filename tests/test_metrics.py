import math

import numpy as np
import pytest

from jobs.stats import metrics
from jobs.engines.base import SequenceScores


def toks(sids, lps, ranks=None, top1=None, top1_lp=None, token_ids=None):
    n = len(lps)
    sids = np.asarray(sids)
    pos = np.concatenate([np.arange(1, np.sum(sids == s) + 1) for s in dict.fromkeys(sids.tolist())])
    return metrics.Tokens(sids, pos, np.asarray(token_ids if token_ids is not None else np.arange(n)),
                          np.asarray(lps, float), np.asarray(ranks if ranks is not None else [1] * n),
                          np.asarray(top1 if top1 is not None else np.arange(n)),
                          np.asarray(top1_lp if top1_lp is not None else lps, float))


def test_set_stats_by_hand():
    t = toks([0, 0, 1], [-1.0, -2.0, -3.0], ranks=[1, 2, 1], top1_lp=[-0.5, -0.5, -1.0])
    s = metrics.set_stats(t)
    assert s["nll"] == pytest.approx(2.0)
    assert s["ppl"] == pytest.approx(math.exp(2.0))
    assert s["tokens"] == 3 and s["texts"] == 2
    assert s["top1_acc"] == pytest.approx(2 / 3)
    assert s["conf_nll"] == pytest.approx(2 / 3)
    assert s["conf_ppl"] == pytest.approx(math.exp(2 / 3))


def test_overall_is_token_weighted_not_set_averaged():
    a = {"nll": 1.0, "tokens": 1, "texts": 1, "top1_acc": 1.0, "conf_nll": 0.5}
    b = {"nll": 2.0, "tokens": 3, "texts": 2, "top1_acc": 0.0, "conf_nll": 1.5}
    o = metrics.overall_stats([a, b])
    assert o["nll"] == pytest.approx((1 * 1 + 3 * 2) / 4)  # 1.75, not 1.5
    assert o["ppl"] == pytest.approx(math.exp(1.75))
    assert o["tokens"] == 4 and o["texts"] == 3
    assert o["top1_acc"] == pytest.approx(0.25)
    assert o["conf_nll"] == pytest.approx(1.25)


def test_score_against_baseline():
    assert metrics.score(1.687084, 1.687084) == pytest.approx(100.0)
    assert metrics.score(2.0, 2.5) == pytest.approx(80.0)


def test_reference_run_scores_reproduce_from_its_ppls():
    # SPEC §1: score = 100 · ppl_all(BF16) / ppl_all(model)
    assert metrics.score(1.481134, 1.491422) == pytest.approx(99.31, abs=0.005)
    assert metrics.score(1.481134, 1.503834) == pytest.approx(98.49, abs=0.005)


def test_scored_tokens_drops_position_zero_and_sorts():
    cols = {"sample_id": [1, 1, 0, 0, 0], "position": [1, 0, 2, 0, 1], "token_id": [7, 6, 5, 3, 4],
            "logprob": [-1.0, np.nan, -3.0, np.nan, -2.0], "rank": [1, -1, 2, -1, 1],
            "top1_id": [7, -1, 9, -1, 4], "top1_logprob": [-1.0, np.nan, -0.1, np.nan, -2.0]}
    t = metrics.scored_tokens(cols)
    assert t.sample_id.tolist() == [0, 0, 1] and t.position.tolist() == [1, 2, 1]
    assert t.logprob.tolist() == [-2.0, -3.0, -1.0]


def test_paired_stats_by_hand():
    base = toks([0, 0, 1, 1], [-1.0, -1.0, -2.0, -2.0], top1=[1, 2, 3, 4])
    model = toks([0, 0, 1, 1], [-1.5, -1.0, -2.0, -2.5], top1=[1, 0, 3, 4])
    p = metrics.paired_stats([base], [model], n_boot=2000, seed=1)
    assert p["delta_nll"] == pytest.approx(0.25)  # (0.5 + 0 + 0 + 0.5) / 4
    assert p["ppl_ratio"] == pytest.approx(math.exp(0.25))
    assert p["same_top1"] == pytest.approx(0.75)
    dp = (math.exp(-1.5) - math.exp(-1.0) + math.exp(-2.5) - math.exp(-2.0)) / 4
    assert p["delta_p"] == pytest.approx(dp)
    # Both texts have the same Δ sum (0.5 over 2 tokens): every text resample gives 0.25.
    assert p["delta_nll_lo"] == pytest.approx(0.25) and p["delta_nll_hi"] == pytest.approx(0.25)
    assert p["score_lo"] == pytest.approx(100 * math.exp(-0.25))
    assert p["ppl_change_pct"] == pytest.approx(100 * (math.exp(0.25) - 1))  # the verdict's "+28.4 %"


def test_bootstrap_resamples_texts_not_tokens():
    # One text with a large Δ over many tokens, one with none: a token bootstrap would give a narrow
    # interval; resampling the two texts gives replicates of 0, the mean, or the full Δ.
    d = np.array([10.0, 0.0])
    n = np.array([10, 10])
    reps = metrics.bootstrap_delta_nll([(d, n)], n_boot=4000, seed=0)
    assert set(np.round(-reps, 6)) == {0.0, 0.5, 1.0}
    lo, hi = metrics.interval(reps)
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(0.0)


def test_bootstrap_is_seeded():
    g = [(np.random.default_rng(3).normal(size=50), np.full(50, 7))]
    assert np.array_equal(metrics.bootstrap_delta_nll(g, 200, seed=5), metrics.bootstrap_delta_nll(g, 200, seed=5))
    assert not np.array_equal(metrics.bootstrap_delta_nll(g, 200, seed=5), metrics.bootstrap_delta_nll(g, 200, seed=6))


def test_interval_covers_the_point_estimate_on_real_noise():
    rng = np.random.default_rng(0)
    sid = np.repeat(np.arange(100), 20)
    b = toks(sid, -rng.exponential(2.0, sid.size))
    m = toks(sid, b.logprob - rng.normal(0.05, 0.2, sid.size))
    p = metrics.paired_stats([b], [m], n_boot=1000, seed=0)
    assert p["delta_nll_lo"] < p["delta_nll"] < p["delta_nll_hi"]
    assert p["delta_nll_lo"] > 0  # a 0.05-nat shift over 2000 tokens is resolved


def test_mismatched_streams_name_the_first_differing_text():
    base = toks([0, 0, 3, 3], [-1.0] * 4, token_ids=[1, 2, 3, 4])
    other = toks([0, 0, 3, 3], [-1.0] * 4, token_ids=[1, 2, 3, 9])
    with pytest.raises(metrics.TokenStreamMismatch, match="sample_id=3"):
        metrics.paired_stats([base], [other])
    shorter = toks([0, 0, 3], [-1.0] * 3, token_ids=[1, 2, 3])
    with pytest.raises(metrics.TokenStreamMismatch, match="sample_id=3"):
        metrics.check_same_stream(base, shorter)


def test_scored_tokens_takes_topk_rows_of_every_position_or_of_the_scored_ones():
    cols = {"sample_id": [1, 1, 0, 0, 0], "position": [1, 0, 2, 0, 1], "token_id": [7, 6, 5, 3, 4],
            "logprob": [-1.0, np.nan, -3.0, np.nan, -2.0], "rank": [1, -1, 2, -1, 1],
            "top1_id": [7, -1, 9, -1, 4], "top1_logprob": [-1.0, np.nan, -0.1, np.nan, -2.0]}
    every = np.array([[71, 72], [-1, -1], [51, 52], [-1, -1], [41, 42]])
    scored = every[[0, 2, 4]]  # Parquet keeps no list for position 0: the scored rows only, in table order
    for ids in (every, scored):
        t = metrics.scored_tokens({**cols, "topk_ids": ids, "topk_logprobs": -ids.astype(float)})
        assert t.topk_ids.tolist() == [[41, 42], [51, 52], [71, 72]]  # (0,1), (0,2), (1,1)
        assert t.topk_logprobs[0].tolist() == [-41.0, -42.0]
    with pytest.raises(ValueError, match="rows"):
        metrics.scored_tokens({**cols, "topk_ids": every[:2], "topk_logprobs": every[:2]})


def test_the_aggregate_reads_the_scored_rows_of_every_chunk_and_refuses_a_scored_null():
    import pyarrow as pa

    from jobs.archive import logprobs
    from jobs.core.errors import AggregateError
    from jobs.stages.aggregate import COLUMNS, scored_columns

    rng = np.random.default_rng(0)
    seqs = [SequenceScores(i, rng.integers(0, 99, n), -rng.random(n), rng.integers(1, 9, n),
                                  rng.integers(0, 99, n), -rng.random(n)) for i, n in enumerate((5, 3, 7))]
    # chunks as concat_tables of parts gives them: one a slice (a buffer offset), one empty
    table = pa.concat_tables([logprobs.sequences_to_table(seqs[:1]), logprobs.sequences_to_table(seqs[1:]).slice(0, 10),
                              logprobs.sequences_to_table(seqs[:1]).slice(0, 0)])
    plain = {c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}
    keep = plain["position"] > 0
    got = scored_columns(table, "t")
    for c in COLUMNS:
        np.testing.assert_array_equal(got[c], plain[c][keep].astype(got[c].dtype))
    assert got["logprob"].dtype == np.float64 and got["rank"].dtype == np.int64
    broken = table.set_column(3, "logprob", pa.chunked_array([pa.array([None, -1.0, None] + [-0.5] * 12,
                                                                       pa.float32())]))
    with pytest.raises(AggregateError, match="logprob is null at a scored position"):
        scored_columns(broken, "t")
