"""The report's "Task accuracy" section, from the task archive alone (no model, no lm-eval needed).

``summarize`` turns ``results/tasks`` into a JSON-able summary (``taskstats`` does the arithmetic),
``markdown`` renders it for report.md and ``render_csv`` writes tasks.csv. A measure is one metric of a
task under one lm-eval filter (gsm8k: ``exact_match`` under ``strict-match`` and under
``flexible-extract``); only metrics lm-eval averages over documents and where higher is better
(accuracy, exact match) get a recovery.
"""
from __future__ import annotations

import numpy as np

from jobs.archive import tasks as task_archive
from jobs.report import fmt
from jobs.stats import tasks as task_stats

CSV_FIELDS = ["task", "metric", "filter", "model", "num_fewshot", "limit", "docs", "accuracy", "accuracy_lo",
              "accuracy_hi", "lm_eval_value", "recovery", "recovery_lo", "recovery_hi", "paired_docs", "verdict",
              "more_documents", "note"]
# settings that make two runs of a task comparable; a difference is reported beside the recovery
COMPARABLE = {("task", "config_hash"): "task definition", ("task", "num_fewshot"): "shots",
              ("task", "limit"): "limit", ("lm_eval", "chat_template"): "chat template",
              ("lm_eval", "fewshot_as_multiturn"): "few-shot as multi-turn",
              ("lm_eval", "add_bos_token"): "BOS token", ("lm_eval", "version"): "lm-eval version",
              ("lm_eval", "max_model_len"): "context length"}


def load(results_dir) -> dict[str, dict[str, tuple]]:
    """{label: {task: (table, metadata)}} of every finished task under results_dir/tasks."""
    return {label: {task: task_archive.read_task(d) for task, d in tasks.items()}
            for label, tasks in task_archive.discover(results_dir).items()}


def measures(table, meta: dict) -> dict[tuple[str, str], task_stats.Measure]:
    """{(metric, filter): per-document values} for the comparable metrics of one model's task."""
    doc_id = table.column("doc_id").to_numpy()
    filt = np.asarray(table.column("filter").to_pylist(), dtype=object)
    hashes = np.asarray(table.column("doc_hash").to_pylist(), dtype=object)
    out = {}
    for m in meta.get("metrics", []):
        if not (m.get("per_sample", True) and m.get("aggregation") == "mean" and m.get("higher_is_better")):
            continue
        values = np.asarray(table.column(m["name"]).to_numpy(zero_copy_only=False), dtype=np.float64)
        for f in dict.fromkeys(filt.tolist()):
            sel = (filt == f) & ~np.isnan(values)
            if not sel.any():
                continue
            order = np.argsort(doc_id[sel], kind="stable")
            out[(m["name"], f)] = task_stats.Measure(doc_id[sel][order], hashes[sel][order].astype(str),
                                                    values[sel][order])
    return out


def _settings_diff(base_meta: dict, meta: dict) -> list[str]:
    return [what for (section, key), what in COMPARABLE.items()
            if base_meta.get(section, {}).get(key) != meta.get(section, {}).get(key)]


def summarize(data: dict[str, dict[str, tuple]], baseline: str, recovery_min: float, n_boot: int = 1000,
              seed: int = 0) -> dict:
    labels = sorted(data, key=lambda m: (m != baseline, m))
    tasks = sorted({t for per in data.values() for t in per})
    rows, notes = [], []
    for task in tasks:
        have = [m for m in labels if task in data[m]]
        per = {m: measures(*data[m][task]) for m in have}
        base = per.get(baseline)
        if base is None:
            notes.append(f"{task}: no result for the baseline {baseline}; accuracy only.")
        keys = list(base) if base is not None else list(dict.fromkeys(k for m in have for k in per[m]))
        for key in keys:
            for m in have:
                if key not in per[m]:
                    continue
                meta = data[m][task][1]
                mv = per[m][key]
                acc = task_stats.bootstrap_mean(mv.values, n_boot, seed)
                row = {"task": task, "metric": key[0], "filter": key[1], "model": m,
                       "num_fewshot": meta["task"].get("num_fewshot"), "limit": meta["task"].get("limit"),
                       "docs": acc["n"], "accuracy": acc["value"], "accuracy_lo": acc["lo"], "accuracy_hi": acc["hi"],
                       "lm_eval_value": ((meta.get("results") or {}).get("lm_eval") or {}).get(f"{key[0]},{key[1]}"),
                       "recovery": None, "recovery_lo": None, "recovery_hi": None, "paired_docs": None,
                       "verdict": "baseline" if m == baseline else None, "more_documents": None, "note": ""}
                if m != baseline and base is not None and key in base:
                    c = task_stats.compare(base[key], mv, recovery_min, n_boot, seed,
                                          what=f"{m} vs {baseline} on {task}: ")
                    rec = c["recovery"]
                    row.update(recovery=rec["value"], recovery_lo=rec["lo"], recovery_hi=rec["hi"],
                               paired_docs=rec["n"], verdict=c["verdict"], more_documents=c["more_documents"])
                    diff = _settings_diff(data[baseline][task][1], meta)
                    row["note"] = "; ".join(filter(None, [
                        rec["undefined"] and f"recovery undefined: {rec['undefined']}",
                        rec["value"] is not None and rec["lo"] is None
                        and f"no interval: baseline 0 in {rec['undefined_replicates']} of {n_boot} replicates",
                        diff and f"settings differ from the baseline's: {', '.join(diff)}",
                        rec["n"] != acc["n"] and f"paired on {rec['n']} of {acc['n']} documents"]))
                rows.append(row)
    runs = {}
    for m in (m for m in labels if data[m]):
        meta = data[m][min(data[m])][1]  # the first task's, by name
        rt, lm = meta.get("runtime", {}), meta.get("lm_eval", {})
        runs[m] = {
            "backend": rt.get("backend"), "backend_version": rt.get("backend_version"), "dtype": rt.get("dtype"),
            "gpu": rt.get("gpu_name"), "compute_capability": rt.get("compute_capability"),
            "kernel_path": rt.get("kernel_path"), "lm_eval": lm.get("version"),
            "chat_template": lm.get("chat_template"), "add_bos_token": lm.get("add_bos_token"),
            "content_hash": (meta.get("model", {}).get("content_hash") or "")[:12]}
    return {"baseline": baseline, "recovery_min": recovery_min,
            "bootstrap": {"replicates": n_boot, "seed": seed, "unit": "document", "alpha": task_stats.ALPHA},
            "rows": rows, "runs": runs, "notes": notes}


def _ci(value, lo, hi, digits=3) -> str:
    return "—" if value is None else fmt.ci(value, lo, hi, digits)


def markdown(summary: dict) -> list[str]:
    rmin = summary["recovery_min"]
    b = summary["bootstrap"]
    L = ["## Task accuracy", "",
         f"lm-evaluation-harness on each task, per metric and filter. Accuracy: 95 % interval, bootstrap over "
         f"documents. Recovery = accuracy(model) / accuracy({summary['baseline']}) on the documents both answered, "
         f"with a paired bootstrap interval (the same documents resampled for both; {b['replicates']} replicates, "
         f"seed {b['seed']}). Verdict against {rmin} (RECOVERY_MIN; llm-compressor's CI requires 0.95 of the point "
         "estimate rounded to the percent): *pass* when the interval's lower end is at least that, *fail* when its "
         "upper end is below, *inconclusive* otherwise, with how many more documents would decide it at the "
         "observed recovery. A recovery is undefined when the baseline scores 0.", "",
         f"| task | metric (filter) | shots | docs | model | accuracy (95 % CI) | recovery (95 % CI) | vs {rmin} |",
         "|---|---|---:|---:|---|---:|---:|:---:|"]
    prev = None
    for r in summary["rows"]:
        head = (r["task"], r["metric"], r["filter"])
        cells = [r["task"], f"{r['metric']} ({r['filter']})", str(r["num_fewshot"]), str(r["docs"])] \
            if head != prev else ["", "", "", ""]
        prev = head
        if r["verdict"] == "baseline":
            rec, ok = "baseline", ""
        elif r["recovery"] is None:
            rec, ok = "undefined" + (" (baseline 0)" if "baseline scores 0" in r["note"] else ""), "—"
        else:
            rec, ok = _ci(r["recovery"], r["recovery_lo"], r["recovery_hi"], 3), r["verdict"]
            if r.get("more_documents"):
                ok += f" (~{r['more_documents']} more docs)"
        acc = _ci(r["accuracy"], r["accuracy_lo"], r["accuracy_hi"])
        L.append("| " + " | ".join(cells + [r["model"], acc, rec, ok]) + " |")
    notes = [f"{r['model']} on {r['task']} {r['metric']} ({r['filter']}): {r['note']}" for r in summary["rows"]
             if r["note"]] + summary["notes"]
    if notes:
        L += [""] + [f"- {n}" for n in notes]
    L += ["", "| model | backend | dtype | GPU (cc) | low-precision kernel path | chat template | BOS | lm-eval |",
          "|---|---|---|---|---|---|---|---|"]
    for m, p in summary["runs"].items():
        gpu = f"{p['gpu']} ({p['compute_capability']})" if p.get("gpu") else "CPU"
        L.append(f"| {m} | {p['backend']} {p['backend_version']} | {p['dtype']} | {gpu} | {p['kernel_path']} | "
                 f"{p['chat_template']} | {p['add_bos_token']} | {p['lm_eval']} |")
    return L + [""]


def render_csv(summary: dict) -> str:
    return fmt.csv_text(summary["rows"], CSV_FIELDS)


def has_results(results_dir) -> bool:
    return bool(task_archive.discover(results_dir))
