"""Task accuracy, recovery and their bootstrap intervals, checked by hand (jobs/task_stats.py)."""
import numpy as np
import pytest

from jobs.stats import tasks as task_stats
from jobs.stats.tasks import Measure, TaskDocsMismatch


def measure(values, ids=None, hashes=None):
    ids = np.arange(len(values)) if ids is None else np.asarray(ids)
    hashes = np.asarray([f"h{i}" for i in ids] if hashes is None else hashes)
    return Measure(ids, hashes, np.asarray(values, dtype=float))


def test_accuracy_and_its_interval():
    r = task_stats.bootstrap_mean([1, 0, 1, 1], n_boot=2000, seed=1)
    assert r["value"] == 0.75 and r["n"] == 4
    # a replicate mean of 4 draws is a multiple of 1/4, between 0 and 1
    assert r["lo"] in (0.25, 0.5) and r["hi"] == 1.0
    assert task_stats.bootstrap_mean([1, 1, 1], seed=0) == {"value": 1.0, "lo": 1.0, "hi": 1.0, "n": 3}
    assert task_stats.bootstrap_mean([], seed=0)["value"] is None
    # the seed fixes the interval
    x = np.random.default_rng(5).integers(0, 2, 200)
    assert task_stats.bootstrap_mean(x, seed=3) == task_stats.bootstrap_mean(x, seed=3)


def test_accuracy_interval_matches_the_binomial_width():
    x = np.r_[np.ones(300), np.zeros(700)]  # p = 0.3, n = 1000: 95 % half-width ≈ 1.96 · sqrt(.21/1000) = 0.0284
    r = task_stats.bootstrap_mean(x, n_boot=4000, seed=0)
    assert (r["hi"] - r["lo"]) / 2 == pytest.approx(0.0284, abs=0.003)


def test_recovery_by_hand():
    r = task_stats.paired_recovery([1, 1, 0, 0] * 5, [1, 0, 0, 0] * 5, n_boot=1000, seed=0)
    assert r["value"] == pytest.approx(0.5) and r["n"] == 20 and r["undefined"] is None
    assert r["lo"] < 0.5 < r["hi"] <= 1.0
    # with 4 documents the baseline resamples to 0 in (1/2)^4 = 6.25 % of replicates: no interval
    r = task_stats.paired_recovery([1, 1, 0, 0], [1, 0, 0, 0], n_boot=1000, seed=0)
    assert r["value"] == pytest.approx(0.5) and r["lo"] is None
    assert r["undefined_replicates"] == pytest.approx(62, abs=20)
    r = task_stats.paired_recovery([1, 0, 1, 0, 1], [1, 1, 1, 0, 1], seed=0)
    assert r["value"] == pytest.approx(4 / 3)


def test_identical_answers_recover_exactly_one_with_no_width():
    """Pairing: the same documents are resampled for both models, so identical per-document answers give a
    recovery of 1 in every replicate. Resampling the two models independently would not."""
    x = np.random.default_rng(0).integers(0, 2, 80).astype(float)
    r = task_stats.paired_recovery(x, x, n_boot=500, seed=0)
    assert (r["value"], r["lo"], r["hi"]) == (1.0, 1.0, 1.0)


def test_paired_interval_is_narrower_than_an_unpaired_one():
    rng = np.random.default_rng(1)
    base = (rng.random(400) < 0.6).astype(float)
    model = base.copy()
    flip = rng.choice(np.flatnonzero(base == 1), 20, replace=False)
    model[flip] = 0  # the model loses 20 of the baseline's correct answers and gains none
    r = task_stats.paired_recovery(base, model, n_boot=2000, seed=0)
    assert r["value"] == pytest.approx(model.sum() / base.sum())
    i = rng.integers(0, 400, size=(2000, 400))
    j = rng.integers(0, 400, size=(2000, 400))
    unpaired = model[i].mean(1) / base[j].mean(1)
    lo, hi = np.quantile(unpaired, [0.025, 0.975])
    assert (r["hi"] - r["lo"]) < 0.5 * (hi - lo)
    assert r["hi"] < 1.0  # the loss is significant once paired


def test_baseline_zero_is_undefined_not_a_division():
    with np.errstate(all="raise"):
        r = task_stats.paired_recovery([0, 0, 0], [1, 0, 0], seed=0)
    assert r["value"] is None and r["lo"] is None and r["undefined"] == "baseline scores 0"
    assert task_stats.verdict(r, 0.95)["outcome"] == "undefined"
    r = task_stats.paired_recovery([], [], seed=0)
    assert r["value"] is None and "no document" in r["undefined"]


def test_replicates_where_the_baseline_resamples_to_zero():
    base = np.zeros(20)
    base[0] = 1
    with np.errstate(all="raise"):
        r = task_stats.paired_recovery(base, base, n_boot=1000, seed=0)
    # P(document 0 never drawn in 20 draws) = (19/20)^20 ≈ 0.358: far more than 5 % of replicates
    assert r["value"] == 1.0 and r["lo"] is None and r["hi"] is None
    assert r["undefined_replicates"] == pytest.approx(358, abs=50)


def test_verdict_is_read_off_the_interval_not_the_point():
    def rec(value, lo, hi, n=60):
        return {"value": value, "lo": lo, "hi": hi, "n": n}

    v = task_stats.verdict
    assert v(rec(1.0, 0.95, 1.1), 0.95) == {"outcome": "pass", "more": None}  # lower end clears it
    assert v(rec(0.9, 0.85, 0.9499), 0.95) == {"outcome": "fail", "more": None}  # upper end below, unrounded
    # the demo's case (issue #22): recovery 1.000, interval 0.892–1.125 on 60 documents: not a pass.
    # Half-width 0.1165, effect 1.000 − 0.95 = 0.05: n' = 60 · (0.1165 / 0.05)² = 325.7 → 326, 266 more
    assert v(rec(1.0, 0.892, 1.125), 0.95) == {"outcome": "inconclusive", "more": 266}
    assert v(rec(0.95, 0.9, 1.0), 0.95) == {"outcome": "inconclusive", "more": None}  # on the line: never
    assert v(rec(1.0, None, None), 0.95)["outcome"] == "inconclusive"  # no interval, no pass
    assert v(rec(None, None, None), 0.95)["outcome"] == "undefined"


def test_pairing_by_doc_id_and_document():
    base = measure([1, 0, 1, 1], ids=[0, 1, 2, 3])
    model = measure([1, 1, 0], ids=[1, 2, 3])
    ib, im = task_stats.pair(base, model)
    assert base.doc_id[ib].tolist() == model.doc_id[im].tolist() == [1, 2, 3]
    c = task_stats.compare(base, model, 0.95, n_boot=200, seed=0)
    assert c["recovery"]["n"] == 3 and c["recovery"]["value"] == pytest.approx(2 / 2)
    # recovery 1.0 on 3 documents, two of them discordant: the interval is wide, the verdict open
    assert c["accuracy"]["value"] == pytest.approx(2 / 3) and c["verdict"] == "inconclusive"
    assert c["more_documents"] > 0
    other = measure([1, 1, 0], ids=[1, 2, 3], hashes=["h1", "changed", "h3"])
    with pytest.raises(TaskDocsMismatch, match="doc 2 is a different document"):
        task_stats.pair(base, other, "m vs b: ")


def test_compare_fails_below_the_minimum():
    base = measure([1] * 200)
    model = measure([1] * 160 + [0] * 40)
    c = task_stats.compare(base, model, 0.95, n_boot=200, seed=0)
    assert c["recovery"]["value"] == pytest.approx(0.8) and c["recovery"]["hi"] < 0.95 and c["verdict"] == "fail"
    assert task_stats.compare(base, model, 0.7, n_boot=200, seed=0)["verdict"] == "pass"
    # one miss in ten: recovery 0.9 < 0.95, but the interval reaches 1.0: not a fail on this evidence
    assert task_stats.compare(measure([1] * 10), measure([1] * 9 + [0]), 0.95, n_boot=200,
                              seed=0)["verdict"] == "inconclusive"
