"""Task accuracy and its recovery against a baseline, with bootstrap intervals over documents (pure numpy).

For one task, one metric (e.g. ``exact_match`` under the ``flexible-extract`` filter) and one model,
the per-document values x_1..x_n (0/1 for accuracy) give

    accuracy  = mean(x)                      95 % percentile-bootstrap interval, documents resampled
    recovery  = mean(x_model) / mean(x_base) on the documents both models answered (same doc ids,
                same documents), with a *paired* bootstrap: each replicate resamples one set of doc
                ids and takes the ratio of both models' means on it, so the documents' difficulty,
                shared by both, cancels out of the interval.

Recovery is llm-compressor's quantity (its CI requires ``recovery >= 0.95`` on GSM8K); it is
undefined when the baseline scores 0, and then reported as such, never divided by. Replicates in
which the resampled baseline mean is 0 are undefined too; they are dropped and counted, and with
more than 5 % of them undefined the interval is not given.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jobs.core.errors import QscoreError
from jobs.stats import intervals

ALPHA = intervals.ALPHA
MAX_UNDEFINED_SHARE = 0.05


class TaskDocsMismatch(QscoreError):
    """Two models' results for one task hold different documents under the same doc ids."""


@dataclass
class Measure:
    """One model's per-document values of one (metric, filter) of one task, in doc_id order."""

    doc_id: np.ndarray  # int64, unique, sorted
    doc_hash: np.ndarray  # str
    values: np.ndarray  # float64


interval = intervals.interval
bootstrap_mean = intervals.bootstrap_mean


def pair(base: Measure, model: Measure, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``base`` and ``model`` of the doc ids both hold; the documents must be the same."""
    common, ib, im = np.intersect1d(base.doc_id, model.doc_id, assume_unique=True, return_indices=True)
    differ = np.flatnonzero(base.doc_hash[ib] != model.doc_hash[im])
    if differ.size:
        raise TaskDocsMismatch(
            f"{what}doc {int(common[differ[0]])} is a different document for the baseline and the model "
            f"({differ.size} of {len(common)} shared doc ids differ): the task's data changed between the runs"
        )
    return ib, im


def paired_recovery(base: np.ndarray, model: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """mean(model) / mean(base) over paired documents, with a paired bootstrap interval."""
    b = np.asarray(base, dtype=np.float64)
    m = np.asarray(model, dtype=np.float64)
    if b.shape != m.shape:
        raise ValueError("paired values must have the same shape")
    out = {"value": None, "lo": None, "hi": None, "n": int(len(b)), "undefined": None, "undefined_replicates": 0}
    out["undefined"] = "no document answered by both models" if len(b) == 0 else (
        "baseline scores 0" if b.mean() == 0 else None)
    if out["undefined"]:
        return out
    out["value"] = float(m.mean() / b.mean())
    num, den = intervals.paired_ratio(b, m, n_boot, seed)
    ok = den > 0
    out["undefined_replicates"] = int(n_boot - ok.sum())
    if out["undefined_replicates"] <= MAX_UNDEFINED_SHARE * n_boot:
        out["lo"], out["hi"] = interval(num[ok] / den[ok])
    return out


def verdict(recovery: dict, minimum: float) -> dict:
    """The verdict on one recovery (``paired_recovery``'s dict) against ``minimum``, read off its interval
    (``intervals.three_way``), with ``more`` paired documents to decide an inconclusive one; ``undefined``
    without a recovery. The validate stage's task gate and the report both call it. llm-compressor's CI rounds
    the point estimate to the percent (0.945 passes 0.95); qscore compares the unrounded interval."""
    if recovery.get("value") is None:
        return {"outcome": "undefined", "more": None}
    lo, hi = recovery.get("lo"), recovery.get("hi")
    outcome = intervals.three_way(lo, hi, minimum)
    more = (intervals.units_to_decide(recovery["value"], lo, hi, minimum, recovery["n"])
            if outcome == intervals.INCONCLUSIVE and lo is not None else None)
    return {"outcome": outcome, "more": more}


def compare(base: Measure, model: Measure, minimum: float, n_boot: int = 1000, seed: int = 0,
            what: str = "") -> dict:
    """Everything the report and the quality gate say about one model against the baseline on one measure."""
    ib, im = pair(base, model, what)
    rec = paired_recovery(base.values[ib], model.values[im], n_boot=n_boot, seed=seed)
    v = verdict(rec, minimum)
    return {
        "accuracy": bootstrap_mean(model.values, n_boot, seed),
        "baseline_accuracy_paired": float(base.values[ib].mean()) if len(ib) else None,
        "accuracy_paired": float(model.values[im].mean()) if len(im) else None,
        "recovery": rec,
        "verdict": v["outcome"],
        "more_documents": v["more"],
    }
