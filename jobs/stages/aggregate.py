"""Aggregate stage: every metric of SPEC §4 from the Parquet archive alone (no model, no GPU)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.stats import deploy as deploy_stats, metrics, quant as quant_stats, summary as stats_summary
from jobs.stats.summary import Summary, pooled_sets
from jobs.report import outputs, tasks as task_report
from jobs.archive import bench as bench_archive, logprobs
from jobs.core import locks
from jobs.core.errors import AggregateError
from jobs.core.settings import AggregateSettings

log = logging.getLogger("qscore.aggregate")
COLUMNS = ["sample_id", "position", "token_id", "logprob", "rank", "top1_id", "top1_logprob"]


def discover(results_dir: Path) -> dict[str, dict[str, Path]]:
    """{label: {set: dataset dir}} for finished datasets (hidden staging dirs are not listed)."""
    return logprobs.discover(results_dir)


def load(found: dict[str, dict[str, Path]]):
    data, meta = {}, {}
    for label, sets in found.items():
        for name, ddir in sets.items():
            topk = quant_stats.has_topk(ddir)
            table, m = logprobs.read_dataset(ddir, COLUMNS + (quant_stats.TOPK_COLUMNS if topk else []))
            cols = scored_columns(table, ddir)
            if topk:
                cols.update(quant_stats.topk_matrices(table, ddir))
            del table
            data[(label, name)] = metrics.scored_tokens(cols)
            meta[(label, name)] = m
    return data, meta


def scored_columns(table: pa.Table, where: Path) -> dict[str, np.ndarray]:
    """COLUMNS at the scored positions (> 0), in table order and in the dtypes ``metrics`` computes in.

    One array per column, filled chunk by chunk from Arrow's value buffers: at 10M rows, converting the
    nullable columns whole (nulls to NaN, ints to float) and then selecting and casting made five copies of
    each, and fresh memory is slow to map (bench/RESULTS.md). Values under position 0's nulls are skipped;
    a null anywhere else is an error."""
    keep = table.column("position").to_numpy() > 0
    n = int(keep.sum())
    out = {}
    for name in COLUMNS:
        col = table.column(name)
        if col.null_count and not np.array_equal(col.is_null().to_numpy(zero_copy_only=False), ~keep):
            raise AggregateError(f"{where}: {name} is null at a scored position (or set at position 0)")
        dst = np.empty(n, np.float64 if pa.types.is_floating(col.type) else np.int64)
        row = put = 0
        for chunk in col.chunks:
            size = len(chunk)
            if not size:
                continue
            values = np.frombuffer(chunk.buffers()[1], dtype=chunk.type.to_pandas_dtype(),
                                   count=chunk.offset + size)[chunk.offset:]
            k = keep[row:row + size]
            m = int(np.count_nonzero(k))
            dst[put:put + m] = values[k]
            if dst.dtype.kind == "f" and not np.isfinite(dst[put:put + m]).all():
                bad = dst[put + int(np.flatnonzero(~np.isfinite(dst[put:put + m]))[0])]
                raise AggregateError(f"{where}: {name} is {bad} at a scored position: a damaged part; "
                                     "score this set again")
            row, put = row + size, put + m
        out[name] = dst
    return out


def compute(data, baseline: str, n_boot: int, seed: int, dataset_meta: dict | None = None,
            recovery_min: float = 0.95) -> Summary:
    """Per model and set: perplexity figures; per model overall (over the sets holding distinct texts,
    ``summary.pooled_sets``): the same, token-weighted, and its pairing with the baseline."""
    labels = sorted({k[0] for k in data}, key=lambda m: (m != baseline, m))
    all_sets = sorted({k[1] for k in data})
    # a path-noise twin scored on fewer sets must not narrow every model's comparison: it is left out
    models = [m for m in labels if stats_summary.twin_of(m, labels) is None]
    common = [s for s in all_sets if all((m, s) in data for m in models)]
    if not common:
        raise AggregateError("no evaluation set was scored for every model: nothing to compare")
    partial = [m for m in labels if m not in models and not all((m, s) in data for s in common)]
    labels = [m for m in labels if m not in partial]
    skipped = [s for s in all_sets if s not in common]
    pooled, same = pooled_sets(common, dataset_meta or {})
    out = Summary(baseline=baseline, sets=common, sets_not_in_every_model=skipped,
                  bootstrap={"replicates": n_boot, "seed": seed, "unit": "text", "alpha": 0.05}, models={},
                  recovery_min=recovery_min, overall_sets=pooled, same_text=same)
    out.warnings += [f"{m} is left out: a path-noise twin must be scored on every set of the comparison "
                     f"({', '.join(s for s in common if (m, s) not in data)} missing)" for m in partial]
    for m in labels:
        per_set = {s: metrics.set_stats(data[(m, s)]) for s in all_sets if (m, s) in data}
        overall = metrics.overall_stats([per_set[s] for s in pooled])
        out.models[m] = {"sets": per_set, "overall": overall}
    base_ppl = out.models[baseline]["overall"]["ppl"]
    for m in labels:
        entry = out.models[m]
        entry["overall"]["score"] = metrics.score(base_ppl, entry["overall"]["ppl"])
        if m == baseline:
            continue
        for s in common:
            try:
                entry["sets"][s]["paired"] = metrics.paired_stats([data[(baseline, s)]], [data[(m, s)]],
                                                                  n_boot=n_boot, seed=seed)
            except metrics.TokenStreamMismatch as exc:
                raise AggregateError(f"{m} vs {baseline} on {s}: {exc}") from None
        entry["overall"]["paired"] = metrics.paired_stats([data[(baseline, s)] for s in pooled],
                                                          [data[(m, s)] for s in pooled], n_boot=n_boot, seed=seed)
    return out


def delta_nll(data, baseline: str, sets: list[str], models=None) -> dict[str, dict[str, np.ndarray]]:
    """Per set, per model: per-token Δnll = logprob(baseline) − logprob(model) on the shared stream (the
    tables' sign: positive is a loss)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for s in sets:
        for (m, name), t in data.items():
            if name == s and m != baseline and (models is None or m in models):
                out.setdefault(s, {})[m] = data[(baseline, s)].logprob - t.logprob
    return out


def warnings(summary: Summary, data, meta) -> list[str]:
    """What a reader must know before trusting the comparison."""
    out = []
    b = summary.baseline
    o = summary.models[b]["overall"]
    first = summary.overall_sets[0]
    vocab, how = stats_summary.vocabulary(meta[(b, first)], max(int(data[(b, s)].token_id.max()) for s in summary.sets))
    w = stats_summary.near_uniform(b, o["nll"], vocab, o["ppl"], f"vocabulary from {how}")
    if w:
        out.append(w)
    return out


def run(*, settings: AggregateSettings) -> Path:
    s = settings
    results = Path(s.results_dir)
    found = discover(results)
    if s.labels:  # a report of these labels only (`make compare`), with their noise twins (`<label>~<path>`)
        keep = {*s.labels, s.baseline}
        found = {k: v for k, v in found.items() if k.split(quant_stats.NOISE_SEP)[0] in keep}
    if not found:
        raise AggregateError(f"no scored datasets under {results / 'logprobs'}: run the score stage first")
    labels = sorted(found)
    baseline = s.baseline
    if baseline is None:
        if "bf16" not in found:
            raise AggregateError(f"no --baseline given and no model labelled 'bf16' (have {labels})")
        baseline = "bf16"
    if baseline not in found:
        raise AggregateError(f"baseline {baseline!r} has no scored datasets (have {labels})")
    if s.bootstrap < 100:
        raise AggregateError("--bootstrap needs at least 100 replicates for a 95 % interval")
    data, meta = load(found)
    summary = compute(data, baseline, s.bootstrap, s.seed, {name: meta[(baseline, name)].get("dataset") or {}
                                                            for (label, name) in meta if label == baseline},
                      recovery_min=s.recovery_min)
    summary.provenance = outputs.provenance_table(meta)
    if task_report.has_results(results):  # lm-eval task accuracy (the tasks stage), when there is any
        tasks = {k: t for k, t in task_report.load(results).items() if not s.labels or k in s.labels or k == baseline}
        summary.tasks = task_report.summarize(tasks, baseline, s.recovery_min, s.bootstrap, s.seed)
    out_dir = Path(s.report_dir) if s.report_dir else results / "report"
    with locks.hold(out_dir, what="report"):
        # The quantization statistics (KLD, Δp, agreement, noise floor, path noise, where it hurts): their own module.
        extra = quant_stats.add_to_summary(summary, data, meta, n_boot=s.bootstrap, seed=s.seed,
                                           tokenizer=s.report_tokenizer)
        summary.verdict = {m: stats_summary.model_verdict(summary, m) for m in summary.models
                           if m != baseline and m not in summary.noise_floor}
        summary.warnings += warnings(summary, data, meta)
        summary.deploy = deploy_stats.compute(summary, bench_archive.load(results))
        deltas = delta_nll(data, baseline, summary.sets, summary.models)
        del data
        outputs.write_report(summary, deltas, extra, out_dir)
    log.info("wrote %s", out_dir / "report.md")
    return out_dir
