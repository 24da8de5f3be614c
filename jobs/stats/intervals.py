"""Resampling and intervals: the one bootstrap of the report (perplexity, comparison, documents, tasks) and
the three-way verdict read off an interval (docs/statistics.md).

Every interval is a 95 % percentile bootstrap over texts (documents for tasks), sets as strata drawn from
one generator in set order. ``draw_indices`` (index arrays, for a few columns) and ``draw_weights`` (how
often each text was drawn, for the comparison's wide per-text matrices: a replicate is then one matrix
product) cost differently and give bit-identical replicates for one seed.
"""
from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05
Z = 1.959963984540054  # the normal quantile of 1 - ALPHA/2, for the sample-size estimate


def interval(reps: np.ndarray, alpha: float = ALPHA, strict: bool = False) -> tuple[float, float]:
    """Percentile interval of the replicates; replicates that are not finite (a bucket no text of the
    replicate reached) are left out, or, with ``strict``, leave the interval undefined (NaN)."""
    reps = np.asarray(reps, dtype=np.float64)
    ok = np.isfinite(reps)
    if (strict and not ok.all()) or not ok.any():
        return float("nan"), float("nan")
    lo, hi = np.quantile(reps[ok], [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def draw_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot × n) indices of the texts drawn, with replacement, in each replicate."""
    return rng.integers(0, n, size=(n_boot, n))


def draw_weights(n_texts: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot × n_texts): how often each text is drawn in each replicate (the same generator calls as
    ``draw_indices``, so the same replicates)."""
    idx = draw_indices(n_texts, n_boot, rng)
    flat = idx + (np.arange(n_boot) * n_texts)[:, None]
    return np.bincount(flat.ravel(), minlength=n_boot * n_texts).reshape(n_boot, n_texts).astype(np.float64)


def replicate_sums(matrices: list[np.ndarray], n_boot: int, seed: int, exact: int | None = None) -> np.ndarray:
    """Σ over sets of W_set @ M_set: (n_boot × width), sets as strata, one generator in set order.

    Only the first ``exact`` columns (sums and counts the means come from) are multiplied in float64;
    the rest (histogram counts and bucket sums, most of the width) in float32, which halves the cost of
    the product and moves a percentile's interval by far less than its bin width."""
    rng = np.random.default_rng(seed)
    out = None
    for m in matrices:
        w = draw_weights(len(m), n_boot, rng)
        if exact is None or exact >= m.shape[1]:
            s = w @ m
        else:
            s = np.empty((n_boot, m.shape[1]))
            s[:, :exact] = w @ m[:, :exact]
            s[:, exact:] = w.astype(np.float32) @ m[:, exact:].astype(np.float32)
        out = s if out is None else out + s
    return out


def stratified_ratio_sums(groups: list[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Replicates of (Σ numerator, Σ denominator) over texts, sets as strata: ``groups`` holds per set the
    per-text numerators and denominators (e.g. Σ Δlogprob and tokens per text)."""
    rng = np.random.default_rng(seed)
    num = np.zeros(n_boot)
    den = np.zeros(n_boot)
    for d, n in groups:
        idx = draw_indices(len(d), n_boot, rng)
        num += d[idx].sum(axis=1)
        den += n[idx].sum(axis=1)
    return num, den


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean of ``values`` with a 95 % percentile-bootstrap interval (units resampled)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    reps = x[draw_indices(len(x), n_boot, rng)].mean(axis=1)
    lo, hi = interval(reps)
    return {"value": float(x.mean()), "lo": lo, "hi": hi, "n": int(len(x))}


def paired_ratio(base: np.ndarray, model: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Replicates of (mean(model), mean(base)) over the same resampled units for both (a paired bootstrap)."""
    rng = np.random.default_rng(seed)
    idx = draw_indices(len(base), n_boot, rng)
    return model[idx].mean(axis=1), base[idx].mean(axis=1)


# -- verdicts --------------------------------------------------------------------------------------------
PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


def three_way(lo: float | None, hi: float | None, threshold: float) -> str:
    """``pass`` when the whole interval lies at or above ``threshold`` (its lower end clears it), ``fail``
    when it lies wholly below (its upper end is below), ``inconclusive`` when it straddles the threshold or
    there is no interval. Quantities where lower is better are passed negated."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    if lo >= threshold:
        return PASS
    if hi < threshold:
        return FAIL
    return INCONCLUSIVE


def units_to_decide(value: float, lo: float, hi: float, threshold: float, n: int) -> int | None:
    """How many more units (texts, documents) would make an interval that straddles ``threshold`` decide,
    if the effect stayed at ``value``: the normal approximation, where the interval's half-width h shrinks
    as 1/√n, so n' = n · (h / |value − threshold|)². None when the interval already decides, has no width
    or the effect sits on the threshold (no number of units decides it)."""
    gap = abs(value - threshold)
    half = (hi - lo) / 2
    if not (lo < threshold <= hi) or gap == 0 or not math.isfinite(half) or half <= 0 or n < 1:
        return None
    return max(math.ceil(n * (half / gap) ** 2 - 1e-9) - n, 1)  # 1e-9: 400.0000001 is 400


def within(lo: float, hi: float, value: float, noise: float, n: int) -> dict:
    """Is an effect (interval [lo, hi] around ``value``, from n texts) larger in size than a noise of size
    ``noise`` (≥ 0; the effect is signed, so the band is [−noise, +noise])? ``exceeds`` when the interval
    lies wholly outside the band, ``within`` when wholly inside, ``inconclusive`` otherwise, with how many
    more texts would decide it at the observed effect (toward the band edge the point estimate lies
    beyond or inside)."""
    noise = abs(noise)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return {"outcome": INCONCLUSIVE, "more": None}
    if lo > noise or hi < -noise:
        return {"outcome": "exceeds", "more": None}
    if -noise <= lo and hi <= noise:
        return {"outcome": "within", "more": None}
    mores = [units_to_decide(value, lo, hi, edge, n) for edge in (noise, -noise) if lo < edge <= hi]
    known = [m for m in mores if m is not None]
    return {"outcome": INCONCLUSIVE, "more": max(known) if known and len(known) == len(mores) else None}
