"""Aggregate stage: every metric of SPEC §4 from the Parquet archive alone (no model, no GPU)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.stats import deploy as deploy_stats, histograms, metrics, quant as quant_stats, summary as stats_summary
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


def load_model(label: str, sets: dict[str, Path]) -> quant_stats.Scored:
    """One model's sets ({set: dataset dir}, as ``discover`` lists them), top-K matrices included."""
    tokens, meta = {}, {}
    for name, ddir in sets.items():
        topk = quant_stats.has_topk(ddir)
        table, m = logprobs.read_dataset(ddir, COLUMNS + (quant_stats.TOPK_COLUMNS if topk else []))
        cols = scored_columns(table, ddir)
        if topk:
            cols.update(quant_stats.topk_matrices(table, ddir))
        del table
        tokens[name] = metrics.scored_tokens(cols)
        meta[name] = m
    return quant_stats.Scored(label, tokens, meta)


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


def frame(found: dict[str, list[str]], baseline: str, n_boot: int, seed: int, dataset_meta: dict | None = None,
          recovery_min: float = 0.95) -> tuple[Summary, list[str]]:
    """The comparison before any figure, from which sets each model has ({label: sets}): the sets every
    model shares, the ones pooled in ``overall`` (over the sets holding distinct texts,
    ``summary.pooled_sets``), and the labels compared (the baseline first), a summary with no models yet."""
    labels = sorted(found, key=lambda m: (m != baseline, m))
    all_sets = sorted({s for sets in found.values() for s in sets})
    # a path-noise twin scored on fewer sets must not narrow every model's comparison: it is left out
    models = [m for m in labels if stats_summary.twin_of(m, labels) is None]
    common = [s for s in all_sets if all(s in found[m] for m in models)]
    if not common:
        raise AggregateError("no evaluation set was scored for every model: nothing to compare")
    partial = [m for m in labels if m not in models and not all(s in found[m] for s in common)]
    labels = [m for m in labels if m not in partial]
    skipped = [s for s in all_sets if s not in common]
    pooled, same = pooled_sets(common, dataset_meta or {})
    out = Summary(baseline=baseline, sets=common, sets_not_in_every_model=skipped,
                  bootstrap={"replicates": n_boot, "seed": seed, "unit": "text", "alpha": 0.05}, models={},
                  recovery_min=recovery_min, overall_sets=pooled, same_text=same)
    out.warnings += [f"{m} is left out: a path-noise twin must be scored on every set of the comparison "
                     f"({', '.join(s for s in common if s not in found[m])} missing)" for m in partial]
    return out, labels


def model_entry(summary: Summary, model: quant_stats.Scored, base: quant_stats.Scored | None) -> dict:
    """A model's ``sets`` and ``overall`` blocks: perplexity figures per set and token-weighted over
    ``summary.overall_sets``, its score, and its pairing with the baseline (``base``; None: the baseline's
    own entry, the first one made)."""
    per_set = {s: metrics.set_stats(t) for s, t in model.tokens.items()}
    overall = metrics.overall_stats([per_set[s] for s in summary.overall_sets])
    base_ppl = overall["ppl"] if base is None else summary.models[summary.baseline]["overall"]["ppl"]
    overall["score"] = metrics.score(base_ppl, overall["ppl"])
    if base is None:
        return {"sets": per_set, "overall": overall}
    m, b, n_boot, seed = model.label, summary.baseline, summary.bootstrap["replicates"], summary.bootstrap["seed"]
    for s in summary.sets:
        try:
            per_set[s]["paired"] = metrics.paired_stats([base.tokens[s]], [model.tokens[s]], n_boot=n_boot, seed=seed)
        except metrics.TokenStreamMismatch as exc:
            raise AggregateError(f"{m} vs {b} on {s}: {exc}") from None
    pooled = summary.overall_sets
    overall["paired"] = metrics.paired_stats([base.tokens[s] for s in pooled], [model.tokens[s] for s in pooled],
                                             n_boot=n_boot, seed=seed)
    return {"sets": per_set, "overall": overall}


def order(labels: list[str], baseline: str) -> tuple[list[str], dict[str, str | None]]:
    """The order models are read in, and each one's path-noise reference (``<label>`` of ``<label>~<path>``):
    the baseline first, then each model followed by its twins (depth first), so that a twin is compared
    with its reference while the reference is still loaded."""
    refs = {m: stats_summary.twin_of(m, labels) for m in labels}
    out: list[str] = []

    def visit(m):
        out.append(m)
        for t in labels:
            if refs[t] == m and t != baseline:  # a baseline that is a twin is read first, like any baseline
                visit(t)

    for m in [baseline] + [m for m in labels if m != baseline and refs[m] is None]:
        visit(m)
    return out, refs


def summarize(found: dict[str, dict[str, Path]], baseline: str, *, n_boot: int, seed: int, recovery_min: float,
              tokenizer: str | None = None) -> tuple[Summary, dict, quant_stats.Extra]:
    """Every model against the baseline, one model in memory at a time beside the baseline (and a twin's
    reference): each is read, reduced to its summary entries and its per-token Δnll (the plots), and let go
    before the next is read. Returns the summary (verdicts still to make), the Δnll histogram per set and model, and
    what the outputs need beyond summary.json."""
    base = load_model(baseline, found[baseline])
    summary, labels = frame({m: list(sets) for m, sets in found.items()}, baseline, n_boot, seed,
                            {s: m.get("dataset") or {} for s, m in base.meta.items()}, recovery_min)
    meta = {(baseline, s): m for s, m in base.meta.items()}
    for m in found:  # a twin left out is still in the provenance table
        if m not in labels:
            meta.update({(m, s): logprobs.read_dataset(ddir, ["position"])[1] for s, ddir in found[m].items()})
    summary.models[baseline] = model_entry(summary, base, None)
    side, extra = quant_stats.start(summary, base, n_boot=n_boot, seed=seed, tokenizer=tokenizer)
    deltas = {}
    sequence, refs = order(labels, baseline)
    held = {baseline: base}  # what stays loaded: the baseline, and a model while its twins are to come
    for m in sequence[1:]:
        ref = refs[m]
        held = {k: v for k, v in held.items() if k in (baseline, ref)}
        if ref is not None and ref not in held:  # a twin of a twin came between: read the reference again
            held[ref] = load_model(ref, found[ref])
        model = load_model(m, found[m])
        meta.update({(m, s): v for s, v in model.meta.items()})
        summary.models[m] = model_entry(summary, model, base)
        quant_stats.add_model(summary, extra, side, model, reference=held.get(ref), n_boot=n_boot, seed=seed)
        deltas[m] = delta_nll(base, model, summary.sets)
        if refs[baseline] == m:  # the baseline is itself a twin of this model: its path noise
            quant_stats.add_path_noise(summary, side, base, model, n_boot=n_boot, seed=seed)
        if any(refs[t] == m for t in sequence if t != baseline):
            held[m] = model
        del model
    del held
    summary.models = {m: summary.models[m] for m in labels}
    quant_stats.finish(summary, extra)
    summary.provenance = outputs.provenance_table(meta)
    summary.warnings += warnings(summary, base)
    compared = [m for m in labels if m in deltas]
    return summary, {s: {m: deltas[m][s] for m in compared} for s in summary.sets} if compared else {}, extra


def delta_nll(base: quant_stats.Scored, model: quant_stats.Scored, sets: list[str]) -> dict[str, histograms.LogHist]:
    """Per set: the histogram of per-token Δnll = logprob(baseline) − logprob(model) on the shared stream (the
    tables' sign: positive is a loss); the plots' only need of the tokens, kept as bins, not arrays."""
    return {s: histograms.log_hist(base.tokens[s].logprob - model.tokens[s].logprob) for s in sets}


def warnings(summary: Summary, base: quant_stats.Scored) -> list[str]:
    """What a reader must know before trusting the comparison."""
    out = []
    o = summary.models[summary.baseline]["overall"]
    first = summary.overall_sets[0]
    vocab, how = stats_summary.vocabulary(base.meta[first], max(int(base.tokens[s].token_id.max()) for s in summary.sets))
    w = stats_summary.near_uniform(summary.baseline, o["nll"], vocab, o["ppl"], f"vocabulary from {how}")
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
    tasks = None
    if task_report.has_results(results):  # lm-eval task accuracy (the tasks stage), when there is any
        runs = {k: t for k, t in task_report.load(results).items() if not s.labels or k in s.labels or k == baseline}
        tasks = task_report.summarize(runs, baseline, s.recovery_min, s.bootstrap, s.seed)
    out_dir = Path(s.report_dir) if s.report_dir else results / "report"
    with locks.hold(out_dir, what="report"):
        summary, deltas, extra = summarize(found, baseline, n_boot=s.bootstrap, seed=s.seed,
                                           recovery_min=s.recovery_min, tokenizer=s.report_tokenizer)
        summary.tasks = tasks
        summary.verdict = {m: stats_summary.model_verdict(summary, m) for m in summary.models
                           if m != baseline and m not in summary.noise_floor}
        summary.deploy = deploy_stats.compute(summary, bench_archive.load(results))
        outputs.write_report(summary, deltas, extra, out_dir)
    log.info("wrote %s", out_dir / "report.md")
    return out_dir
