"""The metrics of SPEC §4, as pure functions of per-token arrays (no model, no files).

Position 0 of every sequence has no context and carries nulls; callers drop it (``scored_tokens``)
before anything here is computed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jobs.core.errors import TokenStreamMismatch
from jobs.stats import intervals


@dataclass
class Tokens:
    """The scored tokens of one (model, set): position 0 of each text already dropped."""

    sample_id: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    logprob: np.ndarray
    rank: np.ndarray
    top1_id: np.ndarray
    top1_logprob: np.ndarray
    topk_ids: np.ndarray | None = None  # (N, K), with --topk > 1
    topk_logprobs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.logprob)


def scored_tokens(columns: dict) -> Tokens:
    """Keep positions > 0, ordered by (sample_id, position), from a dict of column arrays."""
    pos = np.asarray(columns["position"])
    sid = np.asarray(columns["sample_id"])
    keep = pos > 0
    if keep.all():  # already selected (the aggregate stage reads only the scored rows): no copies
        keep = slice(None)
    s, p = sid[keep], pos[keep]
    ds, dp = np.diff(s), np.diff(p)
    # The score stage writes texts in order: then the (costly, at millions of rows) sort is skipped.
    order = None if np.all((ds > 0) | ((ds == 0) & (dp > 0))) else np.lexsort((p, s))

    def pick(values, dtype):
        out = np.asarray(values)[keep]
        return (out if order is None else out[order]).astype(dtype, copy=False)

    topk = {}
    if columns.get("topk_ids") is not None:
        # (N, K) arrays follow the same selection; (N_scored, K) ones (Parquet stores no lists for the
        # null position 0) hold the positions > 0 in table order already.
        def pick_k(values, dtype):
            values = np.asarray(values)
            if len(values) == len(pos):
                return pick(values, dtype)
            if len(values) != len(s):
                raise ValueError(f"top-K arrays have {len(values)} rows for {len(pos)} positions")
            return (values if order is None else values[order]).astype(dtype, copy=False)

        topk = {"topk_ids": pick_k(columns["topk_ids"], np.int32),
                "topk_logprobs": pick_k(columns["topk_logprobs"], np.float32)}
    dtypes = {"sample_id": np.int64, "position": np.int64, "token_id": np.int64, "logprob": np.float64,
              "rank": np.int64, "top1_id": np.int64, "top1_logprob": np.float64}
    return Tokens(**{name: pick(columns[name], dtype) for name, dtype in dtypes.items()}, **topk)


def _stats(nll: float, conf_nll: float, tokens: int, texts: int, top1_acc: float) -> dict:
    return {"nll": nll, "ppl": float(np.exp(nll)), "tokens": tokens, "texts": texts, "top1_acc": top1_acc,
            "conf_nll": conf_nll, "conf_ppl": float(np.exp(conf_nll))}


def set_stats(t: Tokens) -> dict:
    """nll, ppl, tokens, texts, top1_acc, and the top-1-confidence statistic of the reference run."""
    if len(t) == 0:
        raise ValueError("no scored tokens")
    return _stats(float(-t.logprob.mean()), float(-t.top1_logprob.mean()), len(t), len(text_starts(t.sample_id)),
                  float(np.mean(t.rank == 1)))


def overall_stats(per_set: list[dict]) -> dict:
    """Token-weighted over sets: nll_all = Σ N_d nll_d / Σ N_d (likewise conf_nll and top1_acc)."""
    n = np.array([s["tokens"] for s in per_set], dtype=np.float64)
    w = n / n.sum()

    def mean(key):
        return float(np.dot(w, [s[key] for s in per_set]))

    return _stats(mean("nll"), mean("conf_nll"), int(n.sum()), int(sum(s["texts"] for s in per_set)), mean("top1_acc"))


def score(ppl_baseline: float, ppl_model: float) -> float:
    """100 · ppl_all(baseline) / ppl_all(model): 100 is the baseline, lower is worse."""
    return 100.0 * ppl_baseline / ppl_model


def check_same_stream(base: Tokens, other: Tokens, what: str = "") -> None:
    """Refuse to pair unless sample_id, position and token_id agree everywhere; name the first text that differs."""
    n = min(len(base), len(other))
    for name in ("sample_id", "position", "token_id"):
        a, b = getattr(base, name)[:n], getattr(other, name)[:n]
        diff = np.flatnonzero(a != b)
        if diff.size:
            i = int(diff[0])
            sid = int(min(base.sample_id[i], other.sample_id[i]))
            raise TokenStreamMismatch(
                f"{what}token streams differ first in text sample_id={sid} (position "
                f"{int(min(base.position[i], other.position[i]))}): were they scored with different "
                "tokenizers, sets or max_model_len?"
            )
    if len(base) != len(other):
        longer = base if len(base) > len(other) else other
        raise TokenStreamMismatch(
            f"{what}token streams differ first in text sample_id={int(longer.sample_id[n])}: one side "
            "has tokens the other lacks (different truncation or set size?)"
        )


def text_starts(sample_id: np.ndarray) -> np.ndarray:
    """First row of each text, in order (each text's rows together, as ``scored_tokens`` leaves them):
    where the id changes — no hashing or sorting of millions of ids, as ``np.unique`` would."""
    sample_id = np.asarray(sample_id)
    if not len(sample_id):
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, sample_id[1:] != sample_id[:-1]])


def per_text_sums(sample_id: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum of values and token count per text (texts in order; each text's rows together)."""
    start = text_starts(sample_id)
    counts = np.diff(np.r_[start, len(sample_id)])
    sums = np.add.reduceat(values, start) if len(values) else np.zeros(0)
    return sums, counts


def bootstrap_delta_nll(
    groups: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> np.ndarray:
    """Bootstrap replicates of Δnll over texts, stratified by set (``intervals.stratified_ratio_sums``).

    ``groups`` holds, per set, (Σ Δlogprob per text, tokens per text). Texts — not tokens — are the
    resampled unit because tokens within a text are correlated. Returns the ``n_boot`` replicates.
    """
    num, den = intervals.stratified_ratio_sums(groups, n_boot, seed)
    return -num / den


interval = intervals.interval


def paired_stats(
    base_sets: list[Tokens], model_sets: list[Tokens], n_boot: int = 1000, seed: int = 0
) -> dict:
    """Δnll (model − baseline) with a 95 % bootstrap interval over texts, PPL ratio, same_top1 and Δp.

    The lists hold the same sets in the same order; each pair must be the identical token stream.
    """
    groups, n_tok, d_sum, same, dp = [], 0, 0.0, 0, 0.0
    for b, m in zip(base_sets, model_sets):
        check_same_stream(b, m)
        delta = m.logprob - b.logprob
        groups.append(per_text_sums(b.sample_id, delta))
        n_tok += len(b)
        d_sum += float(delta.sum())
        same += int(np.sum(b.top1_id == m.top1_id))
        dp += float(np.sum(np.exp(m.logprob) - np.exp(b.logprob)))
    lo, hi = interval(bootstrap_delta_nll(groups, n_boot=n_boot, seed=seed))
    d_nll = -d_sum / n_tok
    ends = {"": d_nll, "_lo": lo, "_hi": hi}
    return {**{f"delta_nll{e}": v for e, v in ends.items()},
            **{f"ppl_ratio{e}": float(np.exp(v)) for e, v in ends.items()},
            **{f"ppl_change_pct{e}": 100.0 * (float(np.exp(v)) - 1.0) for e, v in ends.items()},
            "score_lo": 100.0 * float(np.exp(-hi)), "score_hi": 100.0 * float(np.exp(-lo)),
            "same_top1": same / n_tok, "delta_p": dp / n_tok, "tokens": n_tok}
