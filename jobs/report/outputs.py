"""The aggregate stage's outputs: summary.json, summary.csv, report.md, tasks.csv, worst_tokens.parquet and
the PNG plots, all written into a staging directory that replaces the report directory only when complete
(a killed aggregate leaves the previous report, or none).

report.md reads top down as a reader asks: the verdict, the core tables, then an appendix of breakdowns.
Everything shown is computed before (``jobs.stats``); this module formats and writes.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.core import atomic
from jobs.report import deploy as deploy_report, plots, quant as quant_report
from jobs.report.fmt import ci, csv_text, sig
from jobs.stats.summary import Check, Summary

CSV_FIELDS = ["model", "dataset", "tokens", "texts", "nll", "ppl", "top1_acc", "conf_nll", "conf_ppl", "score",
              "delta_nll", "delta_nll_lo", "delta_nll_hi", "ppl_ratio", "ppl_ratio_lo", "ppl_ratio_hi",
              "same_top1", "delta_p", "kld", "kld_lo", "kld_hi", "kld_reverse", "delta_p_rms", "topk"]


def provenance_table(meta: dict) -> dict:
    """Per model: what was scored, how, and on what (from the Parquet metadata of its first set)."""
    out = {}
    for (label, _), m in sorted(meta.items()):
        if label in out:
            continue
        rt, q = m.get("runtime", {}), m.get("quantization", {})
        out[label] = {
            "model": m.get("model", {}).get("ref"), "content_hash": m.get("model", {}).get("content_hash", "")[:12],
            "quantization": q.get("scheme"), "format": q.get("format"), "backend": rt.get("backend"),
            "backend_version": rt.get("backend_version"), "dtype": rt.get("dtype"), "gpu": rt.get("gpu_name"),
            "compute_capability": rt.get("compute_capability"), "kernel_path": rt.get("kernel_path"),
            # an unquantized model computes in its dtype, whatever its label or recorded "arithmetic" says
            "arithmetic": (rt.get("arithmetic") or q.get("scheme")) if q.get("method") else rt.get("dtype"),
            "tokenizer": m.get("tokenizer", {}).get("name"), "max_model_len": m.get("sampling", {}).get("max_model_len"),
        }
    return out


def csv_rows(summary: Summary) -> list[dict]:
    rows = []
    for model, entry in summary.models.items():
        for name, stats in list(entry["sets"].items()) + [("overall", entry["overall"])]:
            row = {"model": model, "dataset": name, **{k: stats.get(k) for k in CSV_FIELDS[2:10]}}
            row.update({k: v for k, v in (stats.get("paired") or {}).items() if k in CSV_FIELDS})
            c = stats.get("comparison")
            if c:  # the KL lower bound and friends (docs/statistics.md)
                row.update(kld=c["kld"]["mean"]["value"], kld_lo=c["kld"]["mean"]["lo"], kld_hi=c["kld"]["mean"]["hi"],
                           kld_reverse=c["kld_reverse"]["mean"]["value"], delta_p_rms=c["delta_p"]["rms"]["value"],
                           topk=c["k"])
            rows.append(row)
    return rows


def render_csv(summary: Summary) -> str:
    return csv_text(csv_rows(summary), CSV_FIELDS)


# -- report.md ---------------------------------------------------------------------------------------------------
def _check_words(c: Check) -> str:
    more = f"; about {c.more} more {c.unit} would decide it at the observed effect" if c.more else ""
    return f"**{c.outcome}**{more}"


def _noise_line(checks: list[Check], what: str) -> str:
    """'noise floor (bf16~noise: dtype float32 → bfloat16): exceeds it in Δnll (0.10 vs ±3.2e-04), …'"""
    def fig(c: Check) -> str:
        name = c.figure.split(" vs ")[0]
        band = "±" if name == "Δnll" else ""  # Δnll is signed: the noise is a band around 0
        more = f"; ~{c.more} more texts" if c.more else ""
        return f"{name} ({sig(c.value, 2)} vs {band}{sig(c.against, 2)}{more})"

    parts = []
    for outcome, words in (("exceeds", "exceeds it in"), ("within", "within it in"), ("inconclusive", "inconclusive in")):
        cs = [c for c in checks if c.outcome == outcome]
        if cs:
            parts.append(f"{words} " + ", ".join(fig(c) for c in cs))
    return f"{what} ({checks[0].note}): " + "; ".join(parts)


def render_verdict(s: Summary) -> list[str]:
    L = ["## Verdict", "",
         f"Each model against **{s.baseline}**. *Perplexity* passes when the 95 % interval of its score "
         f"(100 · PPL({s.baseline}) / PPL(model)) lies at or above {sig(100 * s.recovery_min, 3)} "
         f"(RECOVERY_MIN {s.recovery_min}: PPL at most {sig(1 / s.recovery_min, 4)}× the baseline's), fails when it "
         "lies below, and is *inconclusive* when it straddles the line; *tasks* likewise on each task's recovery "
         "interval. A figure *exceeds* a noise when its interval lies outside it, is *within* when inside. "
         "Number of texts to decide: normal approximation at the observed effect (docs/statistics.md).", ""]
    for w in s.warnings:
        L += [f"> **Warning:** {w}", ""]
    if not s.verdict:
        L.append(f"No model besides the baseline {s.baseline} (and its noise floor): nothing to judge.")
    for m, v in s.verdict.items():
        p = s.provenance.get(m) or {}
        arith = "" if p.get("arithmetic") in (None, p.get("dtype")) else f"{p.get('arithmetic')}, "
        head = f"**{m}**" + (f" ({arith}computed in {p.get('dtype')})" if p.get("dtype") else "")
        L.append(f"- {head}: **{v.outcome}**")
        c = v.ppl_change_pct
        L.append(f"  - perplexity {ci(c['value'], c['lo'], c['hi'], 3, sign=True)} %; score "
                 f"{ci(v.perplexity.value, v.perplexity.lo, v.perplexity.hi, 4)} vs {sig(v.perplexity.against, 3)}: "
                 + _check_words(v.perplexity))
        if v.kld:
            L.append(f"  - mean KLD (lower bound) {ci(max(v.kld['value'], 0), max(v.kld['lo'], 0), v.kld['hi'], 3)} nats")
        groups = {}
        for c in v.noise:
            groups.setdefault((c.figure.split(" vs ")[1], c.note), []).append(c)
        for (what, _), cs in groups.items():
            L.append(f"  - {_noise_line(cs, what)}")
        if not s.noise_floor:
            L.append("  - noise floor: not measured (`make noise-floor` scores the baseline again as "
                     f"`{s.baseline}~noise`)")
        if not any(c.figure.endswith("own path noise") for c in v.noise):
            L.append(f"  - own path noise: not measured (score it again through another path as `{m}~<path>`)")
        if v.tasks:
            t = v.tasks
            rec = ci(t.value, t.lo, t.hi, 3) if t.value is not None else "undefined"
            L.append(f"  - tasks: {_check_words(t)} — {t.figure.split(': ', 1)[-1]} recovery {rec} "
                     f"vs {s.recovery_min} ({t.note})")
    return L + [""]


def render_perplexity(s: Summary) -> list[str]:
    L = ["## Perplexity", "",
         "PPL = exp of the mean negative log-likelihood of the actual text's tokens (position 0 of each text "
         "excluded); *overall* is token-weighted over " + ", ".join(s.overall_sets) + "."]
    if s.same_text:
        L[-1] += " Not pooled again: " + "; ".join(f"{a} (the same text as {b}, by its sha256)"
                                                   for a, b in s.same_text.items()) + "."
    L += ["dtype: what the archive's metadata says the model computed in (`runtime.dtype`).", "",
          "| model | dtype | arithmetic | " + " | ".join(f"{x} PPL" for x in s.sets)
          + " | overall PPL | PPL change (95 % CI) | score (95 % CI) |", "|---|---|---|" + "---:|" * (len(s.sets) + 3)]
    for m, e in s.models.items():
        p = e["overall"].get("paired")
        prov = s.provenance.get(m) or {}
        change = ci(p["ppl_change_pct"], p["ppl_change_pct_lo"], p["ppl_change_pct_hi"], 3, sign=True) + " %" \
            if p else "baseline"
        score = ci(e["overall"]["score"], p["score_lo"], p["score_hi"], 4) if p else "100"
        L.append(f"| {quant_report.name(s, m)} | {prov.get('dtype') or ''} | {prov.get('arithmetic') or ''} | "
                 + " | ".join(sig(e["sets"][x]["ppl"], 4) for x in s.sets)
                 + f" | {sig(e['overall']['ppl'], 4)} | {change} | {score} |")
    if s.sets_not_in_every_model:
        L += ["", f"Sets left out (not scored for every model): {', '.join(s.sets_not_in_every_model)}."]
    return L + [""]


def render_paired(s: Summary) -> list[str]:
    """Per set: Δnll and the per-token figures against the baseline (overall: the Perplexity and the
    distribution-shift tables)."""
    L = ["## Per set, paired with the baseline", "",
         "Δnll = mean over tokens of logprob(baseline) − logprob(model) = ln PPL ratio (> 0: the model is worse), "
         "on identical token streams; 95 % CI, bootstrap over texts.", "",
         "| model | set | tokens | Δnll (95 % CI) | mean KLD (95 % CI) | same top-1 | mean Δp |",
         "|---|---|---:|---:|---:|---:|---:|"]
    for m in s.compared():
        for x in s.sets:
            st = s.models[m]["sets"][x]
            p, c = st["paired"], st.get("comparison")
            k = c["kld"]["mean"] if c else None
            kld = ci(max(k["value"], 0), max(k["lo"], 0), k["hi"], 3) if k else ""
            L.append(f"| {quant_report.name(s, m)} | {x} | {p['tokens']} | "
                     f"{ci(p['delta_nll'], p['delta_nll_lo'], p['delta_nll_hi'], 3, sign=True)} | {kld} "
                     f"| {sig(p['same_top1'], 4)} | {sig(p['delta_p'], 2, sign=True)} |")
    return L + [""]


def render_provenance(s: Summary) -> list[str]:
    L = ["## Provenance", "",
         "| model | checkpoint | hash | quantization | backend | dtype | GPU (cc) | low-precision kernel path |",
         "|---|---|---|---|---|---|---|---|"]
    for m, p in s.provenance.items():
        gpu = f"{p['gpu']} ({p['compute_capability']})" if p.get("gpu") else "CPU"
        quant = f"{p['quantization']} ({p['format']})" if p.get("format") else "none"
        L.append(f"| {m} | {p['model']} | {p['content_hash']} | {quant} | "
                 f"{p['backend']} {p['backend_version']} | {p['dtype']} | {gpu} | {p['kernel_path']} |")
    if any("W4A" in str((v or {}).get("arithmetic")) for v in s.provenance.values()):
        L += ["", "Arithmetic: what the NVFP4 rows computed. W4A4 is what their configs declare (FP4 activations "
              "too): native on Blackwell, emulated elsewhere; W4A16 (weight-only) is what vLLM's Marlin kernel "
              "serves on Hopper (docs/SPEC.md §2). W4A4's per-token figures depend on the dtype the activations "
              "are computed in before they are rounded to FP4 (see each model's dtype): compare them with that "
              "model's own path noise."]
    return L + [""]


def render_markdown(s: Summary, plot_names: list[str]) -> str:
    b = s.bootstrap
    L = ["# qscore report", "",
         f"Baseline **{s.baseline}**; sets {', '.join(s.sets)}. Intervals: 95 %, bootstrap over texts "
         f"({b['replicates']} replicates, seed {b['seed']}).", ""]
    L += render_verdict(s)
    L += deploy_report.markdown(s, plot_names)
    L += render_perplexity(s)
    L += quant_report.render_core(s)
    L += render_paired(s)
    L += quant_report.render_documents(s)
    if s.tasks:
        from jobs.report.tasks import markdown as task_markdown

        L += task_markdown(s.tasks)
    L += render_provenance(s)
    others = [p for p in plot_names if not p.startswith("deploy_")]
    if others:
        L += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in others] + [""]
    L += ["---", "", "# Appendix: breakdowns", ""]
    L += quant_report.render_appendix(s)
    L += ["### Top-1 confidence (the reference run's statistic)", "",
          "`conf_ppl` = exp of minus the mean logprob of each position's own most likely token: the model's "
          "confidence, *not* the likelihood of the text (the statistic the reference run reported as PPL).", "",
          "| model | set | tokens | texts | top-1 acc | conf_ppl |", "|---|---|---:|---:|---:|---:|"]
    for m, e in s.models.items():
        for name, st in list(e["sets"].items()) + [("overall", e["overall"])]:
            L.append(f"| {m} | {name} | {st['tokens']} | {st['texts']} | {sig(st['top1_acc'], 4)} "
                     f"| {sig(st['conf_ppl'], 4)} |")
    return "\n".join(L) + "\n"


# -- writing -----------------------------------------------------------------------------------------------------
WORST_SCHEMA = pa.schema([("model", pa.string()), ("dataset", pa.string()), ("criterion", pa.string()),
                          ("sample_id", pa.int32()), ("position", pa.int32()), ("token_id", pa.int32()),
                          ("token", pa.string()), ("context", pa.string()), ("context_ids", pa.list_(pa.int32())),
                          ("base_logprob", pa.float32()), ("model_logprob", pa.float32()),
                          ("delta_nll", pa.float32()), ("kld", pa.float32()), ("kld_reverse", pa.float32()),
                          ("base_top1_prob", pa.float32())])


def write_report(summary: Summary, deltas: dict, extra, out_dir: Path) -> list[Path]:
    """Every output into a staging sibling of ``out_dir``, swapped into place when all are written."""
    from jobs.report import tasks as task_report

    out_dir = Path(out_dir)
    atomic.remove_stale_temporaries(out_dir)
    pngs = {**deploy_report.plots(summary), **plots.all_plots(summary, deltas, extra.kl if extra is not None else None)}
    names = []
    with atomic.atomic_dir(out_dir) as tmp:
        for name, png in pngs.items():
            (tmp / name).write_bytes(png)
            names.append(name)
        if extra is not None and summary.compared():
            pq.write_table(pa.Table.from_pylist(extra.worst_rows, schema=WORST_SCHEMA), tmp / "worst_tokens.parquet",
                           compression="zstd")
        (tmp / "summary.json").write_text(json.dumps(summary.to_json(), indent=2, sort_keys=False) + "\n")
        (tmp / "summary.csv").write_text(render_csv(summary))
        if summary.tasks:
            (tmp / "tasks.csv").write_text(task_report.render_csv(summary.tasks))
        (tmp / "report.md").write_text(render_markdown(summary, names))
        written = sorted(p.name for p in tmp.iterdir())
    return [out_dir / n for n in written]

