"""The aggregate stage's outputs: summary.json, summary.csv, report.md and PNG plots."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from jobs.core import atomic
from jobs.report import quant as quant_report

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
            "arithmetic": rt.get("arithmetic") or q.get("scheme"),
            "tokenizer": m.get("tokenizer", {}).get("name"), "max_model_len": m.get("sampling", {}).get("max_model_len"),
        }
    return out


def csv_rows(summary: dict) -> list[dict]:
    rows = []
    for model, entry in summary["models"].items():
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


def render_csv(summary: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in csv_rows(summary):
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def _f(x, digits=6):
    return "" if x is None else f"{x:.{digits}f}"


def render_markdown(summary: dict, plots: list[str]) -> str:
    base, sets, models = summary["baseline"], summary["sets"], summary["models"]
    L = ["# qscore report", "",
         f"Baseline: **{base}**. PPL is exp of the mean negative log-likelihood of the actual text's tokens "
         "(position 0 of each text excluded); the overall figure is token-weighted over sets. "
         f"Score = 100 · PPL(baseline) / PPL(model). Intervals: 95 %, bootstrap over texts "
         f"({summary['bootstrap']['replicates']} replicates, seed {summary['bootstrap']['seed']}).", ""]
    prov = summary.get("provenance", {})
    L += ["## Perplexity", "", "| model | arithmetic | " + " | ".join(f"{s} PPL" for s in sets)
          + " | overall PPL | score (95 % CI) |", "|---|---|" + "---:|" * (len(sets) + 2)]
    for m, e in models.items():
        p = e["overall"].get("paired")
        ci = f" ({p['score_lo']:.2f}–{p['score_hi']:.2f})" if p else ""
        L.append(f"| {m} | {(prov.get(m) or {}).get('arithmetic') or ''} | " + " | ".join(_f(e["sets"][s]["ppl"]) for s in sets)
                 + f" | {_f(e['overall']['ppl'])} | {e['overall']['score']:.2f}{ci} |")
    L += ["", "## Paired with the baseline (identical token streams)", "",
          "| model | set | Δnll (95 % CI) | PPL ratio (95 % CI) | same top-1 | Δp | tokens |", "|---|---|---:|---:|---:|---:|---:|"]
    for m, e in models.items():
        if m == base:
            continue
        for name, stats in [(s, e["sets"][s]) for s in sets] + [("overall", e["overall"])]:
            p = stats["paired"]
            L.append(f"| {m} | {name} | {p['delta_nll']:+.5f} ({p['delta_nll_lo']:+.5f}, {p['delta_nll_hi']:+.5f}) "
                     f"| {p['ppl_ratio']:.5f} ({p['ppl_ratio_lo']:.5f}, {p['ppl_ratio_hi']:.5f}) "
                     f"| {p['same_top1']:.4f} | {p['delta_p']:+.5f} | {p['tokens']} |")
    L += [""] + quant_report.render_sections(summary)
    L += ["## Per set", "", "| model | set | tokens | texts | NLL | PPL | top-1 acc | conf_nll | conf_ppl |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, e in models.items():
        for name, st in list(e["sets"].items()) + [("overall", e["overall"])]:
            L.append(f"| {m} | {name} | {st['tokens']} | {st['texts']} | {_f(st['nll'])} | {_f(st['ppl'])} "
                     f"| {st['top1_acc']:.4f} | {_f(st['conf_nll'])} | {_f(st['conf_ppl'])} |")
    L += ["", "`conf_nll` / `conf_ppl` are the model's top-1 confidence (the mean logprob of its own most likely "
          "token), *not* the likelihood of the text: the statistic the reference run reported as PPL. They are "
          "shown only so that old reports can be compared.", ""]
    if summary.get("sets_not_in_every_model"):
        L += [f"Sets left out of the overall figures (not scored for every model): "
              f"{', '.join(summary['sets_not_in_every_model'])}.", ""]
    if summary.get("tasks"):
        from jobs.report.tasks import markdown as task_markdown

        L += task_markdown(summary["tasks"])
    L += ["Arithmetic: what the NVFP4 rows computed. W4A4 is what their configs declare (FP4 activations too): "
          "native on Blackwell, emulated elsewhere; W4A16 (weight-only) is what vLLM's Marlin kernel serves on "
          "Hopper. See docs/SPEC.md §2.", ""] if any("W4A" in str((v or {}).get("arithmetic")) for v in prov.values()) else []
    L += ["## Provenance", "", "| model | checkpoint | hash | quantization | backend | dtype | GPU (cc) | low-precision kernel path |",
          "|---|---|---|---|---|---|---|---|"]
    for m, p in summary.get("provenance", {}).items():
        gpu = f"{p['gpu']} ({p['compute_capability']})" if p.get("gpu") else "CPU"
        L.append(f"| {m} | {p['model']} | {p['content_hash']} | {p['quantization']} ({p['format']}) | "
                 f"{p['backend']} {p['backend_version']} | {p['dtype']} | {gpu} | {p['kernel_path']} |")
    if plots:
        L += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(L) + "\n"


def plot_scores(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summary["models"])
    scores = [summary["models"][m]["overall"]["score"] for m in models]
    lo, hi = [], []
    for m, s in zip(models, scores):
        p = summary["models"][m]["overall"].get("paired")
        lo.append(s - p["score_lo"] if p else 0.0)
        hi.append(p["score_hi"] - s if p else 0.0)
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(models)), 3.6))
    ax.bar(models, scores, yerr=[lo, hi], capsize=6, color=["#777"] + ["#3b75af"] * (len(models) - 1))
    floor = min(min(scores) - max(hi + [0.5]) * 3, 99.0)
    ax.set_ylim(floor, max(100.5, max(scores) + 0.5))
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_ylabel(f"score (baseline {summary['baseline']} = 100)")
    ax.set_title("Quality kept (95 % CI, bootstrap over texts)")
    for i, s in enumerate(scores):
        ax.text(i, s + hi[i], f"{s:.2f}", ha="center", va="bottom", fontsize=8)  # above the whisker
    fig.tight_layout()
    _save(fig, path)


def plot_deltas(name: str, deltas: dict[str, np.ndarray], baseline: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    lim = float(np.quantile(np.abs(np.concatenate(list(deltas.values()))), 0.995)) or 1.0
    for m, d in deltas.items():
        # counted here on 80 equal bins (numpy's arithmetic path), drawn as steps: ax.hist on an array of
        # edges sorts every value, seconds at 10M tokens
        counts, edges = np.histogram(np.clip(d, -lim, lim), bins=80, range=(-lim, lim))
        ax.stairs(counts, edges, lw=1.4, label=f"{m} (mean {d.mean():+.4f})")
    ax.set_yscale("log")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"per-token logprob(model) − logprob({baseline})")
    ax.set_ylabel("tokens")
    ax.set_title(f"{name}: per-token Δlogprob")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def write_all(summary: dict, deltas: dict, out_dir: Path, extra=None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = ["score.png"]
    plot_scores(summary, out_dir / "score.png")
    for name, d in deltas.items():
        fname = f"delta_logprob_{name}.png"
        plot_deltas(name, d, summary["baseline"], out_dir / fname)
        plots.append(fname)
    plots += quant_report.write_all(summary, extra, out_dir, _save)
    atomic.write_bytes(out_dir / "summary.json", (json.dumps(summary, indent=2, sort_keys=False) + "\n").encode())
    atomic.write_bytes(out_dir / "summary.csv", render_csv(summary).encode())
    atomic.write_bytes(out_dir / "report.md", render_markdown(summary, plots).encode())
    return [out_dir / p for p in ["summary.json", "summary.csv", "report.md", *plots]]
