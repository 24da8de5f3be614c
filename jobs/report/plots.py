"""The report's PNG plots, drawn from the summary and the per-token arrays the aggregate computed.

One visual language across plots: colour = checkpoint (a W4A4 and a W4A16 row of one checkpoint share it),
line style = arithmetic, the noise floor grey and dotted; legends outside the data; the sign of the tables
(Δnll = logprob(baseline) − logprob(model): positive is a loss); one axis range across sets.
"""
from __future__ import annotations

import io

import numpy as np

from jobs.stats.histograms import LogHist, abs_quantile, linear
from jobs.stats.quant import KL_FLOOR
from jobs.stats.summary import Summary

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
# dash patterns by arithmetic; each checkpoint's dashes start at its own offset, so that two curves that
# coincide (two checkpoints of one arithmetic, as the demo's llmc and modelopt rows) show both colours
DASHES = [None, (4, 2), (6, 2, 1, 2), (1.5, 1.5), (5, 1, 1, 1, 1, 1)]
NOISE = {"color": "#888888", "ls": ":", "lw": 1.6}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def styles(summary: Summary) -> dict[str, dict]:
    """Per label: colour by checkpoint (its content hash, else its path), line style by arithmetic (and the
    dtype it was computed in)."""
    ckpts, ariths, out = {}, {}, {}
    for m in summary.models:
        p = summary.provenance.get(m) or {}
        if m in summary.noise_floor:
            out[m] = dict(NOISE)
            continue
        ck = p.get("content_hash") or p.get("model") or m
        ar = (p.get("arithmetic"), p.get("dtype"))  # a twin through another dtype is drawn apart from its model
        colour = "#000000" if m == summary.baseline else PALETTE[ckpts.setdefault(ck, len(ckpts)) % len(PALETTE)]
        k = ckpts[ck] if m != summary.baseline else 0
        dash = DASHES[ariths.setdefault(ar, len(ariths)) % len(DASHES)]
        out[m] = {"color": colour, "ls": "-" if dash is None else (2.0 * k, dash), "lw": 1.4}
    return out


def label(summary: Summary, m: str) -> str:
    p = summary.provenance.get(m) or {}
    if m in summary.noise_floor:
        return f"{m} (noise floor)"
    what = p.get("arithmetic") or p.get("dtype")
    return f"{m}, {what}" if what else m


def _legend_outside(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)


def save(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def scores(summary: Summary) -> bytes:
    """A dot plot with intervals: one row per model, the score and its 95 % interval, the baseline's 100
    and the pass line 100 · RECOVERY_MIN; no bars, so no axis origin to exaggerate from."""
    plt = _plt()
    st = styles(summary)
    models = [m for m in summary.models if m != summary.baseline]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(models) + 1.4))
    y = np.arange(len(models))[::-1]
    for yi, m in zip(y, models):
        o = summary.models[m]["overall"]
        p = o["paired"]
        s = o["score"]
        err = [[max(s - p["score_lo"], 0.0)], [max(p["score_hi"] - s, 0.0)]]  # a model equal to the baseline: 0
        noise = m in summary.noise_floor
        ax.errorbar([s], [yi], xerr=err, fmt="s" if noise else "o", ms=6, capsize=4,
                    color=st[m]["color"], mfc="white" if noise else st[m]["color"], lw=1.4)
    ax.set_yticks(y, [label(summary, m) for m in models], fontsize=8)
    ax.axvline(100, color="k", lw=0.8)
    t = 100 * summary.recovery_min
    ax.axvline(t, color="#d62728", lw=0.8, ls="--")
    lo = min([t] + [summary.models[m]["overall"]["paired"]["score_lo"] for m in models])
    hi = max([100.0] + [summary.models[m]["overall"]["paired"]["score_hi"] for m in models])
    pad = 0.08 * (hi - lo)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(-0.7, len(models) - 0.3)
    ax.text(t, len(models) - 0.35, f" pass line {t:g}", color="#d62728", fontsize=7, va="top")
    ax.set_xlabel(f"score = 100 · PPL({summary.baseline}) / PPL(model); {summary.baseline} = 100")
    ax.set_title("Perplexity kept, 95 % interval (bootstrap over texts)", fontsize=10)
    ax.grid(axis="x", lw=0.3)
    return save(fig)


def delta_nll(summary: Summary, deltas: dict[str, dict[str, LogHist]]) -> dict[str, bytes]:
    """Per set, the per-token Δnll histogram of each model, on one x-range for every set (the 99.5th
    percentile of |Δnll| over all of them); tokens beyond it are counted in the end bins and the plot
    says how many. From the aggregate's histograms (``stats.histograms``), not the tokens."""
    plt = _plt()
    st = styles(summary)
    lim = abs_quantile([h for per in deltas.values() for h in per.values()], 0.995) or 1.0
    out = {}
    for name, per in deltas.items():
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        clipped = 0
        for m, h in per.items():
            counts, edges, beyond = linear(h, lim)
            clipped += beyond
            ax.stairs(counts, edges, label=f"{label(summary, m)}, mean {h.mean:+.3g}", **st[m])
        ax.set_yscale("log")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlim(-lim, lim)
        ax.set_xlabel(f"per-token Δnll = logprob({summary.baseline}) − logprob(model)  (> 0: a loss)")
        ax.set_ylabel("tokens")
        total = sum(h.n for h in per.values())
        note = (f"; {clipped} of {total} token values beyond ±{lim:.3g} are counted in the end bins"
                if clipped else "")
        ax.set_title(f"{name}: per-token Δnll{note}", fontsize=9)
        _legend_outside(ax)
        out[name] = save(fig)
    return out


def kld_cdf(summary: Summary, kl: dict[str, tuple]) -> bytes:
    plt = _plt()
    st = styles(summary)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for m in summary.compared():
        x, y, mean = kl[m]
        ax.plot(x, y, label=f"{label(summary, m)}, mean {max(mean, 0):.3g}", **st[m])
    ax.set_xscale("log")
    floor = f"1e{round(np.log10(KL_FLOOR))}"
    ax.set_xlabel(f"per-position KLD lower bound vs {summary.baseline} (nats; ≤ {floor} drawn at {floor})")
    ax.set_ylabel("share of positions ≤ x")
    ax.set_ylim(0, 1.01)
    ax.set_title("KL divergence, cumulative distribution", fontsize=10)
    _legend_outside(ax)
    return save(fig)


def _intervals(summary: Summary, *, points, xlabel: str, ylabel: str, title: str, zero_line: bool = False,
               ylim=None) -> bytes:
    """One line with 95 % error bars per model; ``points(m)`` gives its x values and its interval cells
    (dicts with value, lo and hi; a cell without an interval is drawn without a bar)."""
    plt = _plt()
    st = styles(summary)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    models = summary.compared()
    for i, m in enumerate(models):
        x, cells = points(m)
        x = np.asarray(x, np.float64) + (i - (len(models) - 1) / 2) * 0.012 * (np.ptp(x) or 1)  # no hidden pairs
        v = np.array([c["value"] for c in cells], np.float64)
        lo = np.array([c["lo"] if c["lo"] is not None else np.nan for c in cells], np.float64)
        hi = np.array([c["hi"] if c["hi"] is not None else np.nan for c in cells], np.float64)
        err = np.nan_to_num(np.maximum([v - lo, hi - v], 0.0))
        ax.errorbar(x, v, yerr=err, marker="o", ms=3, capsize=3, label=label(summary, m), **st[m])
    if zero_line:
        ax.axhline(0, color="k", lw=0.8)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _legend_outside(ax)
    return save(fig)


def topk_agreement(summary: Summary) -> bytes:
    def points(m):
        ag = summary.models[m]["overall"]["comparison"]["topk_agreement"]
        return [a["k"] for a in ag], ag

    return _intervals(summary, points=points, xlabel="k", ylabel="share of positions with equal top-k sets",
                      title=f"Top-k agreement with {summary.baseline} (95 % CI)", ylim=(0, 1.02))


def by_confidence(summary: Summary) -> bytes:
    def points(m):
        rows = summary.models[m]["overall"]["comparison"]["by_confidence"]
        return [(r["lo_edge"] + r["hi_edge"]) / 2 for r in rows], [r["delta_nll"] for r in rows]

    return _intervals(summary, points=points, zero_line=True,
                      xlabel=f"{summary.baseline}'s top-1 probability (bucket centre)",
                      ylabel="Δnll (nats/token)", title="Δnll by the baseline's confidence (95 % CI)")


def all_plots(summary: Summary, deltas: dict, kl: dict | None) -> dict[str, bytes]:
    """{file name: PNG bytes}, in the order report.md shows them."""
    out = {"score.png": scores(summary)} if len(summary.models) > 1 else {}
    out.update({f"delta_nll_{name}.png": png for name, png in delta_nll(summary, deltas).items()})
    if summary.compared() and summary.statistics is not None and kl:
        out["kld_cdf.png"] = kld_cdf(summary, kl)
        out["topk_agreement.png"] = topk_agreement(summary)
        out["delta_nll_by_confidence.png"] = by_confidence(summary)
    return out
