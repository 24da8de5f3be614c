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

ALPHA = 0.05
MAX_UNDEFINED_SHARE = 0.05


class TaskDocsMismatch(QscoreError):
    """Two models' results for one task hold different documents under the same doc ids."""


@dataclass
class Measure:
    """One model's per-document values of one (metric, filter) of one task, in doc_id order."""

    doc_id: np.ndarray  # int64, unique, sorted
    doc_hash: np.ndarray  # str
    values: np.ndarray  # float64


def interval(replicates: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    lo, hi = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean of ``values`` with a 95 % percentile-bootstrap interval (documents resampled)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    reps = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = interval(reps)
    return {"value": float(x.mean()), "lo": lo, "hi": hi, "n": int(len(x))}


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
    if len(b) == 0:
        out["undefined"] = "no document answered by both models"
        return out
    if b.mean() == 0:
        out["undefined"] = "baseline scores 0"
        return out
    out["value"] = float(m.mean() / b.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(b), size=(n_boot, len(b)))
    den = b[idx].mean(axis=1)
    num = m[idx].mean(axis=1)
    ok = den > 0
    out["undefined_replicates"] = int(n_boot - ok.sum())
    if out["undefined_replicates"] <= MAX_UNDEFINED_SHARE * n_boot:
        out["lo"], out["hi"] = interval(num[ok] / den[ok])
    return out


def verdict(recovery: float | None, minimum: float) -> str:
    """``pass`` when recovery >= minimum (no rounding), ``fail`` below, ``undefined`` without a recovery.

    llm-compressor's CI rounds recovery to the nearest percent before comparing (0.945 passes 0.95);
    qscore compares the unrounded ratio."""
    if recovery is None:
        return "undefined"
    return "pass" if recovery >= minimum else "fail"


def compare(base: Measure, model: Measure, minimum: float, n_boot: int = 1000, seed: int = 0,
            what: str = "") -> dict:
    """Everything the report and the quality gate say about one model against the baseline on one measure."""
    ib, im = pair(base, model, what)
    rec = paired_recovery(base.values[ib], model.values[im], n_boot=n_boot, seed=seed)
    return {
        "accuracy": bootstrap_mean(model.values, n_boot, seed),
        "baseline_accuracy_paired": float(base.values[ib].mean()) if len(ib) else None,
        "accuracy_paired": float(model.values[im].mean()) if len(im) else None,
        "recovery": rec,
        "verdict": verdict(rec["value"], minimum),
    }
