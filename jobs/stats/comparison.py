"""The quantization statistics of llama.cpp's ``--kl-divergence`` and exllamav3's model comparison, paired
with a baseline on the identical token stream, each with a 95 % interval from a bootstrap over texts
(docs/statistics.md defines each one and its interval).

The bootstrap never loops over tokens: each text is reduced once (``textsums``) to a row of sums, bucket
sums and histogram counts (``layout``), and a replicate's sums are one matrix product
(``intervals.replicate_sums``). Percentile intervals are read off a replicate's summed histogram
(``KL_EDGES``, ``DP_EDGES``), none where it falls in an open end bin; point estimates of percentiles are
exact quantiles of the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jobs.stats import divergence, intervals, textsums
from jobs.stats.metrics import Tokens, check_same_stream, text_starts

QUANTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)  # llama.cpp's list (50 = median)
# KL: 20 bins per decade over [1e-10, 1e2) nats, plus one below (incl. 0) and one above.
KL_EDGES = np.concatenate([[-np.inf], np.logspace(-10, 2, 12 * 20 + 1), [np.inf]])
# Δp: ±(1e-8 … 1) on the same log grid, one central bin for |Δp| < 1e-8.
_DP_POS = np.logspace(-8, 0, 8 * 20 + 1)
DP_EDGES = np.concatenate([[-np.inf], -_DP_POS[::-1], _DP_POS, [np.inf]])  # central bin [-1e-8, 1e-8)
CONF_EDGES = np.linspace(0.0, 1.0, 11)  # the baseline's top-1 probability, 10 buckets
POS_EDGES = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 30])


@dataclass
class Pair:
    """One set's paired stream: the baseline's and the model's per-token values, same order."""

    sample_id: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    base_lp: np.ndarray
    model_lp: np.ndarray
    base_conf: np.ndarray  # the baseline's top-1 probability
    same_top1: np.ndarray  # bool
    div: divergence.PairDivergence
    context: np.ndarray | None = None  # tokens of context each had (document windows); None: its position
    cache: dict = field(default_factory=dict, repr=False)  # per-text matrices, per layout width

    def __len__(self) -> int:
        return len(self.base_lp)

    @property
    def delta(self) -> np.ndarray:
        return self.model_lp - self.base_lp


def topk_of(t: Tokens) -> divergence.TopK:
    """A model's top-K (the top-1 columns when it was scored with --topk 1), probabilities computed once."""
    if t.topk_ids is not None:
        return divergence.TopK.of(t.topk_ids, t.topk_logprobs)
    return divergence.TopK.of(t.top1_id[:, None], t.top1_logprob[:, None])


def pair(base: Tokens, model: Tokens, what: str = "", base_topk: divergence.TopK | None = None,
         model_topk: divergence.TopK | None = None, context: np.ndarray | None = None) -> Pair:
    """Check the two streams are identical and compute the per-position divergences."""
    check_same_stream(base, model, what)
    b, m = base_topk or topk_of(base), model_topk or topk_of(model)
    div = divergence.topk_kl(b.ids, b.logprobs, m.ids, m.logprobs, base.logprob, model.logprob, base.token_id,
                             base=b, model=m)
    return Pair(base.sample_id, base.position, base.token_id, base.logprob, model.logprob,
                np.exp(base.top1_logprob), base.top1_id == model.top1_id, div, context)


# -- per-text matrix -----------------------------------------------------------------------------------
@dataclass
class Layout:
    """Named column ranges of the per-text matrix."""

    slices: dict = field(default_factory=dict)
    width: int = 0

    def add(self, name: str, n: int = 1) -> None:
        self.slices[name] = slice(self.width, self.width + n)
        self.width += n

    def __call__(self, sums: np.ndarray, name: str) -> np.ndarray:
        s = sums[..., self.slices[name]]
        return s[..., 0] if s.shape[-1] == 1 else s


def layout(agree_k: int) -> Layout:
    lay = Layout()
    for name in ("tokens", "delta", "delta_sq", "kl", "kl_reverse", "dp", "dp_sq", "same_top1"):
        lay.add(name)
    lay.add("agree", max(agree_k, 1))
    for name in ("texts", "nll_b", "nll_m", "nll_b2", "nll_m2", "nll_bm"):  # per-text, for the correlation
        lay.add(name)
    lay.add("kl_hist", len(KL_EDGES) - 1)
    lay.add("dp_hist", len(DP_EDGES) - 1)
    nc, npos = len(CONF_EDGES) - 1, len(POS_EDGES) - 1
    for name, n in (("conf_n", nc), ("conf_kl", nc), ("conf_delta", nc), ("pos_n", npos), ("pos_delta", npos)):
        lay.add(name, n)
    return lay


def _text_index(sample_id: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense 0..T-1 text index per token (each text's rows together)."""
    starts = text_starts(sample_id)
    return np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(sample_id)])), len(starts)


def text_matrix(p: Pair, lay: Layout) -> np.ndarray:
    """(n_texts × lay.width) sums per text: one compiled pass (``textsums``), no per-token Python."""
    return textsums.fill(sample_id=p.sample_id, base_lp=p.base_lp, model_lp=p.model_lp,
                         kl=p.div.kl, kl_reverse=p.div.kl_reverse, same_top1=p.same_top1, agree=p.div.agree,
                         agree_k=p.div.agree_k, base_conf=p.base_conf,
                         position=p.position if p.context is None else p.context, kl_edges=KL_EDGES,
                         dp_edges=DP_EDGES, conf_edges=CONF_EDGES, pos_edges=POS_EDGES,
                         columns={name: sl.start for name, sl in lay.slices.items()}, width=lay.width)


# -- bootstrap (``intervals``) ------------------------------------------------------------------------------
replicate_sums, interval = intervals.replicate_sums, intervals.interval


def hist_quantile(counts: np.ndarray, edges: np.ndarray, q: float, log: bool) -> np.ndarray:
    """Quantile q (0..1) of each row of binned counts, interpolated inside the bin (log-linearly where the
    bin edges are log-spaced); NaN where it falls in an open end bin or in the central bin around 0."""
    counts = np.atleast_2d(counts)
    cum = np.cumsum(counts, axis=1)
    total = cum[:, -1]
    target = q * total
    b = np.argmax(cum >= target[:, None], axis=1)
    below = np.where(b > 0, cum[np.arange(len(b)), b - 1], 0.0)
    inbin = counts[np.arange(len(b)), b]
    frac = np.where(inbin > 0, (target - below) / np.where(inbin > 0, inbin, 1), 0.5)
    lo, hi = edges[b], edges[b + 1]
    finite = np.isfinite(lo) & np.isfinite(hi)
    out = np.full(len(b), np.nan)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if log:
            same_sign = finite & (lo * hi > 0)
            la, lb = np.log(np.abs(lo)), np.log(np.abs(hi))
            out = np.where(same_sign, np.sign(lo) * np.exp(la + frac * (lb - la)), out)
        else:
            out = np.where(finite, lo + frac * (hi - lo), out)
    return out


def _ci(value: float, reps: np.ndarray, strict: bool = False) -> dict:
    lo, hi = interval(reps, strict=strict)
    return {"value": float(value), "lo": lo, "hi": hi}


def _distribution(values: np.ndarray, reps_hist: np.ndarray, edges: np.ndarray, mean: float,
                  mean_reps: np.ndarray, floor: float | None = None) -> dict:
    """Mean, extremes and percentiles; with ``floor`` (KL: 0), percentiles and the minimum below it are
    rounding (two probabilities that agree, each rounded) and are given as the floor, the raw minimum kept
    as ``min_raw``."""
    qs = np.percentile(values, QUANTILES) if len(values) else [np.nan] * len(QUANTILES)
    lo_raw = float(values.min())
    if floor is not None:
        qs = np.maximum(qs, floor)
    out = {"mean": _ci(mean, mean_reps), "max": float(values.max()),
           "min": lo_raw if floor is None else max(lo_raw, floor), "quantiles": {}}
    if floor is not None:
        out["min_raw"] = lo_raw
    for q, v in zip(QUANTILES, qs):
        out["quantiles"][f"{q:g}"] = _ci(v, hist_quantile(reps_hist, edges, q / 100, log=True), strict=True)
    return out


def statistics(pairs: list[Pair], n_boot: int = 1000, seed: int = 0) -> dict:
    """Every statistic of the comparison over the given sets (one set, or all of them as strata)."""
    if not pairs or not sum(len(p) for p in pairs):
        raise ValueError("no paired tokens")
    agree_k = min(p.div.agree_k for p in pairs)
    k = min(p.div.k for p in pairs)
    lay = layout(agree_k)
    mats = [_matrix(p, lay) for p in pairs]
    point = sum(m.sum(axis=0) for m in mats)
    reps = replicate_sums(mats, n_boot, seed, exact=lay.slices["kl_hist"].start)
    kl = np.concatenate([p.div.kl for p in pairs])
    dp = np.concatenate([np.exp(p.model_lp) - np.exp(p.base_lp) for p in pairs])
    n, rn = lay(point, "tokens"), lay(reps, "tokens")

    def mean(name):
        return lay(point, name) / n, lay(reps, name) / rn

    out = {"k": k, "tokens": int(n), "texts": int(lay(point, "texts")), "bootstrap_replicates": n_boot}
    out["kld"] = _distribution(kl, lay(reps, "kl_hist"), KL_EDGES, *mean("kl"), floor=0.0)
    out["kld_reverse"] = {"mean": _ci(*mean("kl_reverse"))}
    out["delta_p"] = _distribution(dp, lay(reps, "dp_hist"), DP_EDGES, *mean("dp"))
    ms, rs = mean("dp_sq")
    out["delta_p"]["rms"] = _ci(np.sqrt(ms), np.sqrt(rs))
    out["same_top1"] = _ci(*mean("same_top1"))
    agree_p, agree_r = np.atleast_1d(lay(point, "agree")), lay(reps, "agree").reshape(len(reps), -1)
    out["topk_agreement"] = [{"k": j + 1, **_ci(agree_p[j] / n, agree_r[:, j] / rn)} for j in range(agree_k)]
    # ln(PPL(model)/PPL(base)) = Δnll. llama.cpp's uncertainty treats tokens as independent: the standard
    # error of the mean paired difference, sqrt(var(Δ)/N) = the delta method on its two runs' covariance.
    ln_ratio = -lay(point, "delta") / n
    var = max(lay(point, "delta_sq") / n - (lay(point, "delta") / n) ** 2, 0.0)
    se = float(np.sqrt(var / max(n - 1, 1)))
    out["ln_ppl_ratio"] = {**_ci(ln_ratio, -lay(reps, "delta") / rn), "se_token": se,
                           "lo_token": ln_ratio - 1.96 * se, "hi_token": ln_ratio + 1.96 * se}
    out["ln_ppl_correlation"] = {**_ci(_corr(lay, point), _corr(lay, reps)), "unit": "text"}
    out["ln_ppl_correlation_tokens"] = _token_correlation(pairs) if n > 1 else float("nan")
    out["by_confidence"] = _buckets(lay, point, reps, "conf", CONF_EDGES, kl=True, texts=_texts_in(lay, mats, "conf_n"))
    out["by_position"] = _buckets(lay, point, reps, "pos", POS_EDGES, kl=False, texts=_texts_in(lay, mats, "pos_n"))
    return out


def _matrix(p: Pair, lay: Layout) -> np.ndarray:
    """A set's per-text matrix, made once: the per-set and the overall statistics share it."""
    if lay.width not in p.cache:
        p.cache[lay.width] = text_matrix(p, lay)
    return p.cache[lay.width]


def _token_correlation(pairs: list[Pair]) -> float:
    """Pearson's r of the per-token logprobs, from centred dot products set by set (np.corrcoef stacks
    and copies every token first); NaN where a side is constant."""
    n = sum(len(p) for p in pairs)
    mb = sum(p.base_lp.sum() for p in pairs) / n
    mm = sum(p.model_lp.sum() for p in pairs) / n
    sbb = smm = sbm = 0.0
    for p in pairs:
        b, m = p.base_lp - mb, p.model_lp - mm
        sbb, smm, sbm = sbb + b @ b, smm + m @ m, sbm + b @ m
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(sbm / np.sqrt(sbb * smm))


def _corr(lay: Layout, s: np.ndarray):
    t = lay(s, "texts")
    mb, mm = lay(s, "nll_b") / t, lay(s, "nll_m") / t
    cov = lay(s, "nll_bm") / t - mb * mm
    vb = lay(s, "nll_b2") / t - mb ** 2
    vm = lay(s, "nll_m2") / t - mm ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.sqrt(vb * vm)


MIN_TEXTS = 2  # a bucket whose tokens come from fewer texts gets no interval: resampling one text is no spread


def _texts_in(lay: Layout, mats: list[np.ndarray], name: str) -> np.ndarray:
    """How many texts have tokens in each bucket."""
    return sum((np.atleast_2d(m[:, lay.slices[name]]) > 0).sum(axis=0) for m in mats)


def _buckets(lay: Layout, point, reps, prefix: str, edges: np.ndarray, kl: bool, texts: np.ndarray) -> list[dict]:
    """Per bucket: tokens, texts and the mean Δnll (and KLD) with their intervals; with fewer than
    ``MIN_TEXTS`` texts the interval is undefined (NaN) and ``too_few_texts`` says why."""
    n, rn = lay(point, f"{prefix}_n"), lay(reps, f"{prefix}_n")
    dsum, rd = lay(point, f"{prefix}_delta"), lay(reps, f"{prefix}_delta")
    rows = []
    for b in range(len(edges) - 1):
        if n[b] == 0:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            row = {"lo_edge": float(edges[b]), "hi_edge": float(edges[b + 1]), "tokens": int(n[b]),
                   "texts": int(texts[b]), "too_few_texts": bool(texts[b] < MIN_TEXTS),
                   "delta_nll": _ci(-dsum[b] / n[b], -rd[:, b] / rn[:, b])}
            if kl:
                row["kld"] = _ci(lay(point, f"{prefix}_kl")[b] / n[b], lay(reps, f"{prefix}_kl")[:, b] / rn[:, b])
            if row["too_few_texts"]:
                for key in ("delta_nll", "kld"):
                    if key in row:
                        row[key].update(lo=float("nan"), hi=float("nan"))
        rows.append(row)
    return rows


# -- where it hurts --------------------------------------------------------------------------------------------
def worst_tokens(p: Pair, n: int) -> dict[str, np.ndarray]:
    """Indices of the ``n`` positions with the largest Δnll (= −Δlogprob) and the largest KLD."""
    def top(v):
        if len(v) <= n:
            return np.argsort(-v, kind="stable")
        idx = np.argpartition(-v, n)[:n]
        return idx[np.argsort(-v[idx], kind="stable")]

    return {"delta_nll": top(-p.delta), "kld": top(p.div.kl)}


def worst_texts(p: Pair, n: int, min_tokens: int = 16) -> list[dict]:
    """The ``n`` texts with the largest mean Δnll (texts with at least ``min_tokens`` scored tokens)."""
    ti, nt = _text_index(p.sample_id)
    cnt = np.bincount(ti, minlength=nt)
    dn = -np.bincount(ti, weights=p.delta, minlength=nt) / np.maximum(cnt, 1)
    kl = np.bincount(ti, weights=p.div.kl, minlength=nt) / np.maximum(cnt, 1)
    first = np.searchsorted(ti, np.arange(nt))
    ok = np.flatnonzero(cnt >= min_tokens)
    order = ok[np.argsort(-dn[ok], kind="stable")][:n]
    return [{"sample_id": int(p.sample_id[first[t]]), "tokens": int(cnt[t]), "delta_nll": float(dn[t]),
             "kld": float(kl[t])} for t in order]
