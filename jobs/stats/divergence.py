"""Per-position KL divergence between two models from their stored top-K candidates: a lower bound.

docs/statistics.md derives it and measures how tight it is. In short: the KL of a coarsening of the
vocabulary, one partition for both models, is at most the full KL (the log-sum inequality). Its cells are
the singletons S (the ids in both top-K lists, A ∩ B, and the actual token, whose logprob both models
store) and the rest. A token in A but not in B goes to the rest for *both* models: its own cell for one
model only would make two partitions, and the bound would not hold. With ``tighten`` (the default) the rest
is split into C1 = A∖S, C2 = B∖S and C3, and the unknown q(C1) ≤ |C1|·q_K, p(C2) ≤ |C2|·p_K are chosen to
minimise the KL (``_three_cells``): still a lower bound, never below the two-cell one. The reverse
KL(q ‖ p) is bounded on the same partition.

Numerics: probabilities in float64 from the stored float32 logprobs; the rest masses (1 − Σ) carry the
rounding of K terms (≈1e-6), so a cell mass is clipped at 0 and every denominator mass (q forward, p
reverse) floored at ``REST_FLOOR``: flooring a denominator up can only lower a term m ln(m/d).

Why numba: pairing each position's two top-K lists is a per-row set intersection of short lists, which no
array library offers as one vectorised operation; numpy's broadcast compare (N×K×K) measured about 1 s per
million positions on 2 cores; the compiled loop is an order of magnitude faster (bench/RESULTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

REST_FLOOR = 1e-6
MAX_AGREE_K = 10  # top-K agreement is reported for K = 1..min(K, 10)


@dataclass
class PairDivergence:
    """Per position (aligned with the paired token stream)."""

    kl: np.ndarray  # lower bound of KL(baseline ‖ model), nats
    kl_reverse: np.ndarray  # lower bound of KL(model ‖ baseline), nats
    agree: np.ndarray  # uint16 bit k-1 set: both models' top-k sets are equal (order ignored), k = 1..agree_k
    agree_k: int  # how many bits of ``agree`` are meaningful: min(K_baseline, K_model, MAX_AGREE_K)
    k: int  # min(K_baseline, K_model): the K of the bound


@numba.njit(cache=True, inline="always")
def _rel(a, b):
    """a ln(a/b), with 0 ln 0 = 0 and a ln(a/0) = inf (a > 0)."""
    if a <= 0.0:
        return 0.0
    if b <= 0.0:
        return np.inf
    return a * np.log(a / b)


@numba.njit(cache=True)
def _three_cells(p1, q1_max, q2, p2_max, s, r, floor, reverse):
    """min over the unknown masses of KL on the cells C1 = A\\S, C2 = B\\S, C3 = the rest.

    Known: p(C1) = p1, q(C2) = q2; p(C2 ∪ C3) = s, q(C1 ∪ C3) = r. Unknown: x = q(C1) ∈ [0, q1_max],
    y = p(C2) ∈ [0, p2_max]. The objective is convex; its stationary conditions are x = r p1 / (p1 + s − y)
    and y = s q2 / (q2 + r − x) in both directions, solved together by every cell having the same ratio
    (x = p1/λ, y = λ q2, λ = (p1 + s)/(r + q2): the two-cell bound). When that point is in the box it is
    the minimum; else the minimum lies on a face of the box, where the other variable's optimum is in
    closed form, and the least of those is taken.
    """
    ux = min(q1_max, r)
    uy = min(p2_max, s)
    den = r + q2
    if den > 0.0:
        lam = (p1 + s) / den
        if lam > 0.0 and p1 / lam <= ux and lam * q2 <= uy:  # feasible: the cells merge
            if reverse:
                return _rel(den, max(p1 + s, floor))
            return _rel(p1 + s, max(den, floor))
    best = np.inf
    for case in range(3):
        if case == 0:  # x = ux
            x = ux
            d = q2 + r - x
            y = min(max(s * q2 / d if d > 0.0 else 0.0, 0.0), uy)
        elif case == 1:  # y = uy
            y = uy
            d = p1 + s - y
            x = min(max(r * p1 / d if d > 0.0 else ux, 0.0), ux)
        else:  # y = 0
            y = 0.0
            d = p1 + s
            x = min(max(r * p1 / d if d > 0.0 else ux, 0.0), ux)
        p3 = max(s - y, 0.0)
        q3 = max(r - x, 0.0)
        # Denominators are floored (see the module's note on numerics): that only lowers the value.
        if reverse:  # KL(q ‖ p): cells' q masses over p masses
            v = _rel(x, max(p1, floor)) + _rel(q2, max(y, floor)) + _rel(q3, max(p3, floor))
        else:
            v = _rel(p1, max(x, floor)) + _rel(y, max(q2, floor)) + _rel(p3, max(q3, floor))
        if v < best:
            best = v
    return best


@numba.njit(parallel=True, cache=True, nogil=True)
def _kernel(b_ids, b_lp, b_p, b_listed, m_ids, m_lp, m_q, m_listed, b_act, m_act, tok, kagree, floor, tighten,
            kl, rkl, agree):
    n = b_ids.shape[0]
    kb = b_ids.shape[1]
    km = m_ids.shape[1]
    for r in numba.prange(n):
        t = tok[r]
        la, lm = np.float64(b_act[r]), np.float64(m_act[r])
        pa, qa = np.exp(la), np.exp(lm)
        fwd = pa * (la - lm)
        rev = qa * (lm - la)
        sp = pa  # mass of S (the tokens known under both) under each model
        sq = qa
        act_in_a = 0
        n_matched = 0  # tokens of A ∩ B other than the actual one
        runmax = -1
        bits = 0
        for i in range(kb):
            a = b_ids[r, i]
            found = -1
            # Ids are distinct within a list, and quantization mostly keeps the order: looking first where
            # the baseline has it (j = i) and then outwards finds it in a step or two instead of ~K/2.
            for step in range(km):
                j = i + step
                if j >= km:
                    j -= km
                if m_ids[r, j] == a:
                    found = j
                    break
            if i < kagree:
                if found < 0:
                    runmax = 1 << 30
                elif found > runmax:
                    runmax = found
                if runmax <= i:  # the first i+1 of A sit in the first i+1 of B: equal sets
                    bits |= 1 << i
            if a == t:  # already counted as the actual token
                act_in_a = 1
                continue
            if found < 0:
                continue
            lp = np.float64(b_lp[r, i])
            lq = np.float64(m_lp[r, found])
            p = np.float64(b_p[r, i])
            q = np.float64(m_q[r, found])
            fwd += p * (lp - lq)
            rev += q * (lq - lp)
            sp += p
            sq += q
            n_matched += 1
        pr = max(1.0 - sp, 0.0)  # mass of everything but S
        qr = max(1.0 - sq, 0.0)
        if tighten:
            act_in_b = 0
            for j in range(km):
                if m_ids[r, j] == t:
                    act_in_b = 1
                    break
            # C1 = A∖S, C2 = B∖S: their listed masses are each list's total less what S took from it
            n1 = kb - n_matched - act_in_a
            n2 = km - n_matched - act_in_b
            p1 = min(max(b_listed[r] - (sp - pa) - act_in_a * pa, 0.0), pr) if n1 > 0 else 0.0
            q2 = min(max(m_listed[r] - (sq - qa) - act_in_b * qa, 0.0), qr) if n2 > 0 else 0.0
            p_k = np.float64(b_p[r, kb - 1])  # a token outside A has p ≤ the K-th of A
            q_k = np.float64(m_q[r, km - 1])
            fwd += _three_cells(p1, n1 * q_k, q2, n2 * p_k, pr - p1, qr - q2, floor, False)
            rev += _three_cells(p1, n1 * q_k, q2, n2 * p_k, pr - p1, qr - q2, floor, True)
        else:
            fwd += _rel(pr, max(qr, floor))
            rev += _rel(qr, max(pr, floor))
        kl[r] = fwd
        rkl[r] = rev
        agree[r] = bits


@dataclass
class TopK:
    """One model's top-K candidates with their probabilities, computed once and shared by every pair."""

    ids: np.ndarray  # (N, K) int32
    logprobs: np.ndarray  # (N, K) float32
    probs: np.ndarray  # (N, K) float32
    listed: np.ndarray  # (N,) float64 Σ of probs: the mass of the K candidates

    @classmethod
    def of(cls, ids, logprobs) -> "TopK":
        lp = np.ascontiguousarray(logprobs, dtype=np.float32)
        # once per model here, not per pair inside the kernel
        p, listed = np.empty_like(lp), np.empty(len(lp))
        if len(lp):
            _probs(lp, p, listed)
        return cls(np.ascontiguousarray(ids, dtype=np.int32), lp, p, listed)


@numba.njit(parallel=True, cache=True, nogil=True)
def _probs(lp, p, listed):
    """p = exp(lp) in float32 and each row's sum in float64, in one pass spread over the cores."""
    for r in numba.prange(lp.shape[0]):
        s = 0.0
        for j in range(lp.shape[1]):
            v = np.exp(lp[r, j])
            p[r, j] = v
            s += v
        listed[r] = s


def topk_kl(base_ids, base_lp, model_ids, model_lp, base_actual, model_actual, token_id,
            floor: float = REST_FLOOR, tighten: bool = True, base: TopK | None = None,
            model: TopK | None = None) -> PairDivergence:
    """Lower bounds of KL(base ‖ model) and KL(model ‖ base) per position, and top-k set agreement.

    ``base_ids``/``base_lp`` are (N, K_b) arrays of the baseline's top-K ids and logprobs (most likely
    first), ``model_ids``/``model_lp`` (N, K_m) the model's; ``*_actual`` the actual token's logprob under
    each, ``token_id`` the actual token. K_b and K_m may differ (and be 1: the top-1 columns). ``base``
    and ``model`` may pass them as ``TopK`` already computed (the baseline's is shared by every model).
    """
    base = base or TopK.of(base_ids, base_lp)
    model = model or TopK.of(model_ids, model_lp)
    n = base.ids.shape[0]
    for name, a in (("model top-K", model.ids), ("base actual", base_actual), ("model actual", model_actual),
                    ("token ids", token_id)):
        if a.shape[0] != n:
            raise ValueError(f"{name}: {a.shape[0]} rows for {n} positions")
    k = min(base.ids.shape[1], model.ids.shape[1])
    kagree = min(k, MAX_AGREE_K)
    kl = np.empty(n)
    rkl = np.empty(n)
    agree = np.empty(n, dtype=np.uint16)
    if n:
        _kernel(base.ids, base.logprobs, base.probs, base.listed, model.ids, model.logprobs, model.probs,
                model.listed, np.asarray(base_actual, np.float32), np.asarray(model_actual, np.float32),
                np.asarray(token_id, np.int32), kagree, floor, tighten, kl, rkl, agree)
    return PairDivergence(kl=kl, kl_reverse=rkl, agree=agree, agree_k=kagree, k=k)


def agreement_at(agree: np.ndarray, k: int) -> np.ndarray:
    """Boolean per position: the two models' top-k sets are equal (k ≤ ``PairDivergence.agree_k``)."""
    return (agree >> np.uint16(k - 1)) & np.uint16(1) == 1


def exact_kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) per row from full-vocabulary log-probabilities (N, V): the reference the bound is tested
    against (only the transformers backend on a small vocabulary can afford these)."""
    logp = np.asarray(logp, np.float64)
    logq = np.asarray(logq, np.float64)
    return np.sum(np.exp(logp) * (logp - logq), axis=-1)
