"""report.md sections and plots for the quantization statistics (``quantstats`` computes them)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _ci(c: dict, fmt: str = "{:.5f}") -> str:
    if c is None:
        return ""
    v = fmt.format(c["value"])
    if c.get("lo") is None or not np.isfinite(c["lo"]):
        return v
    return f"{v} ({fmt.format(c['lo'])}, {fmt.format(c['hi'])})"


def _ordered(summary: dict) -> list[str]:
    """Noise-floor rows first (the yardstick), then the models."""
    base, noise = summary["baseline"], summary.get("noise_floor", [])
    return noise + [m for m in summary["models"] if m != base and m not in noise]


def _name(summary: dict, m: str) -> str:
    return f"{m} *(noise floor)*" if m in summary.get("noise_floor", []) else m


def _esc(text) -> str:
    if text is None:
        return ""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").replace("`", "'")


def render_documents(summary: dict) -> list[str]:
    rows = [(m, s, st["document"]) for m, e in summary["models"].items() for s, st in e["sets"].items()
            if "document" in st]
    if not rows:
        return []
    L = ["## Document-level perplexity (lm-evaluation-harness definitions)", "",
         "Whole documents scored in rolling windows, as lm-eval's `wikitext` task (`loglikelihood_rolling`): "
         "word_perplexity = exp(−ΣL/Σwords), byte_perplexity = exp(−ΣL/Σbytes), bits_per_byte = −ΣL/Σbytes/ln 2, "
         "L the loglikelihood of a document, words and bytes counted on the original page. Comparable with "
         "published lm-eval figures when the window matches their max_length (window = max_model_len − 8 tokens "
         "here, lm-eval's max_length = window − 1 for disjoint windows). 95 % CI: bootstrap over documents.", "",
         "| model | set | documents | tokens | window / stride | word_perplexity | byte_perplexity | bits_per_byte |",
         "|---|---|---:|---:|---|---:|---:|---:|"]
    for m, s, d in rows:
        r = d.get("rolling") or {}
        L.append(f"| {m} | {s} | {d['documents']} | {d['tokens']} | {r.get('window')} / {r.get('stride')} "
                 f"| {_ci(d['word_perplexity'], '{:.4f}')} | {_ci(d['byte_perplexity'], '{:.5f}')} "
                 f"| {_ci(d['bits_per_byte'], '{:.5f}')} |")
    return L + [""]


def render_sections(summary: dict) -> list[str]:
    docs = render_documents(summary)
    models = _ordered(summary)
    if not models or "statistics" not in summary:
        return docs
    st = summary["statistics"]
    base, sets = summary["baseline"], summary["sets"]
    ks = st["topk"]
    L = docs + ["## Distribution shift: KL divergence, Δp, top-k agreement", "",
         f"Per position, against **{base}**, on the identical token stream. **KLD is a lower bound** of the "
         "full-vocabulary KL divergence: it is computed exactly on a partition of the vocabulary (the tokens "
         "known under both models — in both top-K lists, or the actual token — each alone, then the rest in "
         "three cells, bounded by what each top-K list says of the other model's probabilities); merging "
         "outcomes can only lower a KL divergence (docs/statistics.md). Top-K stored: "
         + ", ".join(f"{m} K={k}" for m, k in ks.items())
         + ". Intervals: 95 %, bootstrap over texts; percentiles are read off per-text histograms with "
         f"{st['kl_bins_per_decade']} log-spaced bins per decade (KLD over 1e-10…1e2 nats; Δp over ±1e-8…1), so "
         "their intervals are resolved to about ±6 % of the value (none is given below or above that range).", ""]
    if summary.get("noise_floor"):
        L += [f"**Noise floor**: {', '.join(summary['noise_floor'])} is {base} scored again through another path "
              "(backend, batch layout or dtype). Its row is the size of a difference that means *no difference*; "
              "read every model's row beside it.", ""]
    L += ["| model | set | mean KLD (95 % CI) | median KLD | 99 % KLD | max KLD | mean reverse KLD | "
          "mean Δp | RMS Δp | same top-1 | ln PPL ratio (bootstrap) | ± 1.96·SE (tokens) | corr. ln PPL (texts) |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        e = summary["models"][m]
        for name, stats in [(s, e["sets"][s]) for s in sets] + [("overall", e["overall"])]:
            c = stats["comparison"]
            r = c["ln_ppl_ratio"]
            L.append(f"| {_name(summary, m)} | {name} | {_ci(c['kld']['mean'], '{:.5f}')} "
                     f"| {_ci(c['kld']['quantiles']['50'], '{:.2e}')} | {_ci(c['kld']['quantiles']['99'], '{:.4f}')} "
                     f"| {c['kld']['max']:.4f} | {_ci(c['kld_reverse']['mean'])} | {_ci(c['delta_p']['mean'], '{:+.5f}')} "
                     f"| {_ci(c['delta_p']['rms'], '{:.5f}')} | {_ci(c['same_top1'], '{:.4f}')} "
                     f"| {_ci(r, '{:+.5f}')} | ({r['lo_token']:+.5f}, {r['hi_token']:+.5f}) "
                     f"| {_ci(c['ln_ppl_correlation'], '{:.4f}')} |")
    L += ["", "The ln PPL ratio is Δnll. Its bootstrap interval resamples texts; llama.cpp's ± 1.96·SE treats every "
          "token as independent (the standard error of the mean paired difference); tokens of one text are "
          "correlated, so it is usually too narrow — the bootstrap is the one to trust. The correlation of ln PPL is over "
          "texts (per-text NLL of the two models); over tokens it is "
          + ", ".join(f"{m} {summary['models'][m]['overall']['comparison']['ln_ppl_correlation_tokens']:.4f}"
                      for m in models) + ".", ""]

    L += ["### Percentiles (overall)", "",
          "As llama.cpp's `--kl-divergence` prints them. KLD in nats; Δp = p(model) − p(baseline) of the actual token.",
          "", "| model | statistic | max | 99.9 % | 99 % | 95 % | 90 % | median | 10 % | 5 % | 1 % | 0.1 % | min |",
          "|---|---|" + "---:|" * 11]
    for m in models:
        c = summary["models"][m]["overall"]["comparison"]
        for key, label, fmt in (("kld", "KLD", "{:.3g}"), ("delta_p", "Δp", "{:+.3g}")):
            d = c[key]
            cells = [fmt.format(d["max"])] + [_ci(d["quantiles"][q], fmt) for q in
                                              ("99.9", "99", "95", "90", "50", "10", "5", "1", "0.1")] + [fmt.format(d["min"])]
            L.append(f"| {_name(summary, m)} | {label} | " + " | ".join(cells) + " |")

    L += ["", "### Top-k agreement (overall)", "",
          "Share of positions where both models' k most likely tokens are the same set (order ignored); k = 1 is "
          "*same top-1*. Up to k = min(K, 10) of the stored top-K.", ""]
    kmax = max(len(summary["models"][m]["overall"]["comparison"]["topk_agreement"]) for m in models)
    L += ["| model | " + " | ".join(f"k={k}" for k in range(1, kmax + 1)) + " |", "|---|" + "---:|" * kmax]
    for m in models:
        ag = summary["models"][m]["overall"]["comparison"]["topk_agreement"]
        cells = [_ci(a, "{:.4f}") for a in ag] + [""] * (kmax - len(ag))
        L.append(f"| {_name(summary, m)} | " + " | ".join(cells) + " |")

    L += ["", "### By the baseline's confidence (overall)", "",
          f"Positions bucketed by {base}'s probability of its own top-1 token. Mean KLD and Δnll per bucket.", "",
          "| model | confidence | tokens | mean KLD (95 % CI) | Δnll (95 % CI) |", "|---|---|---:|---:|---:|"]
    for m in models:
        for b in summary["models"][m]["overall"]["comparison"]["by_confidence"]:
            L.append(f"| {_name(summary, m)} | {b['lo_edge']:.1f}–{b['hi_edge']:.1f} | {b['tokens']} "
                     f"| {_ci(b['kld'])} | {_ci(b['delta_nll'], '{:+.5f}')} |")
    L += ["", "### By position in the text (overall)", "",
          "Δnll of the tokens at positions [lo, hi) of their text (position 0 has no context and is not scored).",
          "", "| model | positions | tokens | Δnll (95 % CI) |", "|---|---|---:|---:|"]
    for m in models:
        for b in summary["models"][m]["overall"]["comparison"]["by_position"]:
            L.append(f"| {_name(summary, m)} | {int(b['lo_edge'])}–{int(b['hi_edge']) - 1} | {b['tokens']} "
                     f"| {_ci(b['delta_nll'], '{:+.5f}')} |")

    hurts = summary.get("where_it_hurts", {})
    if hurts:
        L += ["", "## Where it hurts", "",
              "The texts and tokens that lost most against the baseline. Δnll = logprob(baseline) − logprob(model) "
              "of the actual token. Context = the 12 tokens before it, then the token in ⟦ ⟧"
              + ("" if summary.get("where_it_hurts_decoded") else
                 " (token ids: no tokenizer was readable here; pass `--tokenizer path/to/tokenizer.json`)")
              + ". The top 1000 positions per model, set and criterion are in `worst_tokens.parquet`.", ""]
        for m in models:
            h = hurts[m]
            L += [f"### {_name(summary, m)}", "", "| set | text (sample_id) | tokens | mean Δnll | mean KLD |",
                  "|---|---:|---:|---:|---:|"]
            L += [f"| {t['dataset']} | {t['sample_id']} | {t['tokens']} | {t['delta_nll']:+.4f} | {t['kld']:.4f} |"
                  for t in h["texts"]]
            for crit, title in (("tokens_by_delta_nll", "largest Δnll"), ("tokens_by_kld", "largest KLD")):
                L += ["", f"Tokens with the {title}:", "",
                      "| set | sample_id | pos | context ⟦token⟧ | p(base) | p(model) | Δnll | KLD |",
                      "|---|---:|---:|---|---:|---:|---:|---:|"]
                for r in h[crit]:
                    ctx = (f"{_esc(r['context'])}⟦{_esc(r['token'])}⟧" if r["context"] is not None
                           else f"{r['context_ids']} ⟦{r['token_id']}⟧")
                    L.append(f"| {r['dataset']} | {r['sample_id']} | {r['position']} | {ctx} "
                             f"| {np.exp(r['base_logprob']):.4f} | {np.exp(r['model_logprob']):.4f} "
                             f"| {r['delta_nll']:+.3f} | {r['kld']:.3f} |")
            L.append("")
    return L


# -- plots ------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(summary, m):
    return {"ls": "--", "color": "#777"} if m in summary.get("noise_floor", []) else {}


def plot_kld_cdf(summary: dict, kl: dict[str, np.ndarray], path: Path, save) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m in _ordered(summary):
        x, y = _log_cdf(kl[m], 1e-7)
        ax.plot(x, y, lw=1.4, label=f"{m} (mean {kl[m].mean():.4f})", **_style(summary, m))
    ax.set_xscale("log")
    ax.set_xlabel(f"per-position KLD lower bound vs {summary['baseline']} (nats; ≤1e-7 drawn at 1e-7)")
    ax.set_ylabel("share of positions ≤ x")
    ax.set_title("KL divergence, cumulative distribution")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def _log_cdf(values: np.ndarray, floor: float, per_decade: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The empirical CDF at the upper edges of bins of 1/200 decade (finer than the plot's pixels), values
    below ``floor`` counted at it (and any above 1e3 nats at 1e3): one binning pass where sorting 10M values
    took a second per model."""
    lv = np.log10(np.clip(values, floor, 1e3))
    lo = np.log10(floor)
    idx = np.floor((lv - lo) * per_decade).astype(np.int64)
    counts = np.bincount(idx, minlength=1)
    return 10 ** (lo + np.arange(1, len(counts) + 1) / per_decade), np.cumsum(counts) / max(len(values), 1)


def _interval_plot(summary: dict, path: Path, save, *, points, xlabel: str, ylabel: str, title: str,
                   zero_line: bool = False) -> None:
    """One line with 95 % error bars per model; ``points(m)`` gives its x values and its interval cells
    (dicts with value, lo and hi)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m in _ordered(summary):
        x, cells = points(m)
        v = np.array([c["value"] for c in cells])
        err = [v - [c["lo"] for c in cells], np.array([c["hi"] for c in cells]) - v]
        ax.errorbar(x, v, yerr=err, marker="o", ms=3, capsize=3, lw=1.2, label=m, **_style(summary, m))
    if zero_line:
        ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def plot_topk_agreement(summary: dict, path: Path, save) -> None:
    def points(m):
        ag = summary["models"][m]["overall"]["comparison"]["topk_agreement"]
        return [a["k"] for a in ag], ag

    _interval_plot(summary, path, save, points=points, xlabel="k",
                   ylabel="share of positions with equal top-k sets",
                   title=f"Top-k agreement with {summary['baseline']} (95 % CI)")


def plot_by_confidence(summary: dict, path: Path, save) -> None:
    def points(m):
        rows = summary["models"][m]["overall"]["comparison"]["by_confidence"]
        return np.array([(r["lo_edge"] + r["hi_edge"]) / 2 for r in rows]), [r["delta_nll"] for r in rows]

    _interval_plot(summary, path, save, points=points, zero_line=True,
                   xlabel=f"{summary['baseline']}'s top-1 probability (bucket centre)",
                   ylabel="Δnll (nats/token)", title="Δnll by the baseline's confidence (95 % CI)")


def write_all(summary: dict, extra, out_dir: Path, save) -> list[str]:
    """The plots and worst_tokens.parquet; returns the plot file names for report.md."""
    from jobs.stats.quant import write_worst_tokens

    if not _ordered(summary) or extra is None:
        return []
    plots = ["kld_cdf.png", "topk_agreement.png", "delta_nll_by_confidence.png"]
    plot_kld_cdf(summary, extra.kl, out_dir / plots[0], save)
    plot_topk_agreement(summary, out_dir / plots[1], save)
    plot_by_confidence(summary, out_dir / plots[2], save)
    write_worst_tokens(extra.worst_rows, out_dir / "worst_tokens.parquet")
    return plots

