"""report.md sections for the quantization statistics (``stats.quant`` computes them): the distribution
shift and path-noise tables of the core, and the appendix's breakdowns."""
from __future__ import annotations

import numpy as np

from jobs.report.fmt import ci, sig
from jobs.stats.summary import Summary


def _ci(c: dict | None, n: int = 3, sign: bool = False) -> str:
    if c is None:
        return ""
    return ci(c["value"], c.get("lo"), c.get("hi"), n, sign)


def _kl(c: dict | None, n: int = 3) -> str:
    """A KL figure: never below 0 (a negative value is rounding, see the note under the tables)."""
    if c is None:
        return ""
    clip = lambda x: x if x is None or not np.isfinite(x) else max(x, 0.0)  # noqa: E731
    return ci(clip(c["value"]), clip(c.get("lo")), clip(c.get("hi")), n)


def name(s: Summary, m: str) -> str:
    return f"{m} *(noise floor)*" if m in s.noise_floor else m


def _esc(text) -> str:
    if text is None:
        return ""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").replace("`", "'")


def render_documents(summary: Summary) -> list[str]:
    rows = [(m, s, st["document"]) for m, e in summary.models.items() for s, st in e["sets"].items()
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
                 f"| {_ci(d['word_perplexity'], 4)} | {_ci(d['byte_perplexity'], 4)} "
                 f"| {_ci(d['bits_per_byte'], 4)} |")
    return L + [""]


def render_core(s: Summary) -> list[str]:
    """Overall distribution shift per model and the path-noise yardsticks beside it."""
    models = s.compared()
    if not models or s.statistics is None:
        return []
    ks = s.statistics["topk"]
    L = ["## Distribution shift against the baseline (overall)", "",
         f"Per position, against **{s.baseline}**, on the identical token stream; 95 % CI, bootstrap over texts. "
         "**KLD is a lower bound** of the full-vocabulary KL divergence, exact on a partition of the vocabulary "
         "built from both top-K lists (docs/statistics.md); top-K stored: " + ", ".join(f"{m} K={k}" for m, k in ks.items())
         + ". Δp = p(model) − p(baseline) of the actual token. KL values below 0 are rounding of two equal "
         "probabilities and are shown as 0.", "",
         "| model | mean KLD | 99 % KLD | RMS Δp | same top-1 |", "|---|---:|---:|---:|---:|"]
    for m in models:
        c = s.models[m]["overall"]["comparison"]
        L.append(f"| {name(s, m)} | {_kl(c['kld']['mean'])} | {_kl(c['kld']['quantiles']['99'])} "
                 f"| {_ci(c['delta_p']['rms'])} | {_ci(c['same_top1'], 4)} |")
    L.append("")
    if s.path_noise:
        L += ["## Path noise", "",
              "The same checkpoint scored twice through two paths (`<label>~<path>`; what differs is read from the "
              "archive's metadata): the size of a difference that means *no difference* for that model. The "
              "baseline's own is the noise floor. The verdict says which of each model's figures exceed it.", "",
              "| twin | of | path | Δnll (95 % CI) | mean KLD | RMS Δp | top-1 disagreement | tokens |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
        for label, pn in s.path_noise.items():
            d = pn.delta_nll
            L.append(f"| {label} | {pn.reference} | {pn.path} | {ci(d['value'], d['lo'], d['hi'], 3, sign=True)} "
                     f"| {sig(pn.kld, 2)} | {sig(pn.rms_delta_p, 2)} | {sig(pn.top1_disagreement, 2)} | {pn.tokens} |")
        L.append("")
    return L


def render_appendix(s: Summary) -> list[str]:
    models = s.compared()
    if not models or s.statistics is None:
        return []
    st = s.statistics
    comp = {m: s.models[m]["overall"]["comparison"] for m in models}
    L = ["### KLD and Δp percentiles (overall)", "",
         "As llama.cpp's `--kl-divergence` prints them. Percentile intervals are read off per-text histograms with "
         f"{st['kl_bins_per_decade']} log-spaced bins per decade (KLD over 1e-10…1e2 nats; Δp over ±1e-8…1), "
         "so they are resolved to about ±6 % of the value (none below or above that range).", "",
         "| model | statistic | max | 99.9 % | 99 % | 95 % | 90 % | median | 10 % | 5 % | 1 % | 0.1 % | min |",
         "|---|---|" + "---:|" * 11]
    for m in models:
        for key, label in (("kld", "KLD"), ("delta_p", "Δp")):
            d = comp[m][key]
            fmt = _kl if key == "kld" else (lambda x, n=2: _ci(x, n, sign=True))
            cells = [sig(d["max"], 2, key != "kld")] + [fmt(d["quantiles"][q], 2) for q in
                                                         ("99.9", "99", "95", "90", "50", "10", "5", "1", "0.1")]
            cells.append(sig(d["min"], 2, key != "kld"))
            L.append(f"| {name(s, m)} | {label} | " + " | ".join(cells) + " |")
    raw = {m: comp[m]["kld"].get("min_raw") for m in models}
    neg = {m: v for m, v in raw.items() if v is not None and v < 0}
    if neg:
        L += ["", "KLD minimum below 0 before clipping (rounding): "
              + ", ".join(f"{m} {sig(v, 2)}" for m, v in neg.items()) + "."]

    L += ["", "### Top-k agreement (overall)", "",
          "Share of positions where both models' k most likely tokens are the same set (order ignored); k = 1 is "
          "*same top-1*. Up to k = min(K, 10) of the stored top-K.", ""]
    kmax = max(len(comp[m]["topk_agreement"]) for m in models)
    L += ["| model | " + " | ".join(f"k={k}" for k in range(1, kmax + 1)) + " |", "|---|" + "---:|" * kmax]
    for m in models:
        ag = comp[m]["topk_agreement"]
        L.append(f"| {name(s, m)} | " + " | ".join([sig(a["value"], 4) for a in ag] + [""] * (kmax - len(ag))) + " |")

    L += ["", "### Δnll: token-level uncertainty and correlation (overall)", "",
          "llama.cpp's ± 1.96·SE treats every token as independent; tokens of one text are correlated, so it is "
          "usually narrower than the bootstrap over texts (the one the tables use). Correlation of ln PPL over "
          "texts (per-text NLL of the two models) and over tokens.", "",
          "| model | Δnll | ± 1.96·SE (tokens) | corr. (texts, 95 % CI) | corr. (tokens) |", "|---|---:|---:|---:|---:|"]
    for m in models:
        c = comp[m]
        r = c["ln_ppl_ratio"]
        L.append(f"| {name(s, m)} | {sig(r['value'], 2, sign=True)} | [{sig(r['lo_token'], 2, sign=True)}, "
                 f"{sig(r['hi_token'], 2, sign=True)}] | {_ci(c['ln_ppl_correlation'], 4)} "
                 f"| {sig(c['ln_ppl_correlation_tokens'], 4)} |")

    def buckets(key: str, span, kld: bool) -> None:
        for m in models:
            for b in comp[m][key]:
                few = " (n too small)" if b.get("too_few_texts") else ""
                cells = ([f"{_kl(b['kld'], 2)}{few}"] if kld else []) + [f"{_ci(b['delta_nll'], 2, sign=True)}{few}"]
                L.append(f"| {name(s, m)} | {span(b)} | {b['tokens']} | {b.get('texts', '')} | " + " | ".join(cells) + " |")

    L += ["", "### By the baseline's confidence (overall)", "",
          f"Positions bucketed by {s.baseline}'s probability of its own top-1 token. Mean KLD and Δnll per bucket; "
          "no interval where the bucket's tokens come from fewer than 2 texts.", "",
          "| model | confidence | tokens | texts | mean KLD (95 % CI) | Δnll (95 % CI) |", "|---|---|---:|---:|---:|---:|"]
    buckets("by_confidence", lambda b: f"{b['lo_edge']:.1f}–{b['hi_edge']:.1f}", kld=True)
    L += ["", "### By context length (overall)", "",
          "Δnll of the tokens that had [lo, hi] tokens of context: the position in the text, or, for document-level "
          "sets scored in rolling windows, the position in the window that scored it (no token had more).", "",
          "| model | context | tokens | texts | Δnll (95 % CI) |", "|---|---|---:|---:|---:|"]
    buckets("by_position", lambda b: f"{int(b['lo_edge'])}–{int(b['hi_edge']) - 1}", kld=False)
    return L + [""] + render_where_it_hurts(s)


def render_where_it_hurts(s: Summary) -> list[str]:
    """Worst texts and tokens of the models (the noise floor's are in worst_tokens.parquet)."""
    hurts = s.where_it_hurts
    models = [m for m in s.compared() if m not in s.noise_floor and m in hurts]
    if not models:
        return []
    L = ["### Where it hurts", "",
         "The texts and tokens that lost most against the baseline. Δnll = logprob(baseline) − logprob(model) "
         "of the actual token. Context = the 12 tokens before it, then the token in ⟦ ⟧"
         + ("" if s.where_it_hurts_decoded else
            " (token ids: no tokenizer was readable here; pass `--tokenizer path/to/tokenizer.json`)")
         + ". The top 1000 positions per model, set and criterion, the noise floor's too, are in "
         "`worst_tokens.parquet`.", ""]
    for m in models:
        h = hurts[m]
        L += [f"#### {m}", "", "| set | text (sample_id) | tokens | mean Δnll | mean KLD |", "|---|---:|---:|---:|---:|"]
        L += [f"| {t['dataset']} | {t['sample_id']} | {t['tokens']} | {sig(t['delta_nll'], 3, sign=True)} "
              f"| {sig(max(t['kld'], 0), 3)} |" for t in h["texts"][:5]]
        L += ["", "Tokens with the largest Δnll:", "",
              "| set | sample_id | pos | context ⟦token⟧ | p(base) | p(model) | Δnll | KLD |",
              "|---|---:|---:|---|---:|---:|---:|---:|"]
        for r in h["tokens_by_delta_nll"][:5]:
            ctx = (f"{_esc(r['context'])}⟦{_esc(r['token'])}⟧" if r["context"] is not None
                   else f"{r['context_ids']} ⟦{r['token_id']}⟧")
            L.append(f"| {r['dataset']} | {r['sample_id']} | {r['position']} | {ctx} "
                     f"| {sig(np.exp(r['base_logprob']), 3)} | {sig(np.exp(r['model_logprob']), 3)} "
                     f"| {sig(r['delta_nll'], 3, sign=True)} | {sig(max(r['kld'], 0), 3)} |")
        L.append("")
    return L
