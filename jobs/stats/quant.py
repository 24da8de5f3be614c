"""The aggregate stage's quantization statistics: from the archive's tokens to summary entries.

One model at a time (``start`` with the baseline, ``add_model`` for each other model while its tokens are
loaded, ``finish``), so that memory holds the baseline and a model or two whatever the number of models.
Adds, to every model paired with the baseline (per set and overall), the ``comparison`` block of
``comparison.statistics`` (KLD lower bound, Δp, top-k agreement, ln PPL ratio and correlation, buckets by
confidence and position); recognises the noise-floor runs (``<baseline>~<anything>``: the baseline scored
again through another path); and finds where it hurts (worst texts and tokens, decoded where a tokenizer
is at hand). The numbers are computed here; ``report.quant`` renders them and ``report.outputs`` writes
worst_tokens.parquet.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.stats import comparison, docppl, histograms, metrics, summary as summary_mod
from jobs.archive import logprobs
from jobs.core.errors import AggregateError, ArchiveError

TOPK_COLUMNS = ["topk_ids", "topk_logprobs"]
NOISE_SEP = summary_mod.PATH_SEP  # <baseline>~noise: the baseline through another path (backend, batch layout, dtype)
WORST_MD = 10  # rows per table in report.md
WORST_PARQUET = 1000  # rows per (model, criterion) in worst_tokens.parquet
CONTEXT_TOKENS = 12
KL_FLOOR = 1e-7  # the KLD CDF draws values at or below it at it (a log axis has no 0)


def is_noise(label: str, baseline: str) -> bool:
    return label.startswith(baseline + NOISE_SEP)


def has_topk(ddir: Path) -> bool:
    parts = logprobs.part_files(ddir)
    try:
        return bool(parts) and "topk_ids" in pq.read_schema(parts[0]).names
    except Exception:  # read_dataset reports a damaged file with its own message
        return False


def topk_matrices(table: pa.Table, where: Path) -> dict[str, np.ndarray]:
    """The list columns as (N_scored, K) arrays, one row per position > 0, in table order.

    Parquet keeps no slots for the null lists of position 0, so the rows that have a list must be exactly
    the scored ones; ``metrics.scored_tokens`` takes arrays of that length as already selected. Filled
    chunk by chunk into one array (no combine_chunks copy)."""
    scored = table.column("position").to_numpy() > 0
    n = int(scored.sum())

    def matrix(name: str, dtype) -> np.ndarray:
        col = table.column(name)
        valid = np.concatenate([c.is_valid().to_numpy(zero_copy_only=False) for c in col.chunks]) \
            if col.num_chunks else np.zeros(0, bool)
        if not np.array_equal(valid, scored):
            raise ArchiveError(f"{where}: {name} is null at scored positions or set at position 0")
        mat, row = None, 0
        for chunk in col.chunks:
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            rows = len(chunk) - chunk.null_count
            if rows == 0:
                continue
            if len(values) % rows:
                raise ArchiveError(f"{where}: {name} lists of different lengths")
            k = len(values) // rows
            if mat is None:
                mat = np.empty((n, k), dtype=dtype)
            if k != mat.shape[1] or not np.all(np.diff(chunk.offsets.to_numpy())[
                    chunk.is_valid().to_numpy(zero_copy_only=False)] == k):
                raise ArchiveError(f"{where}: {name} lists of different lengths")
            mat[row:row + rows] = values.reshape(rows, k)
            row += rows
        return mat if mat is not None else np.zeros((0, 1), dtype=dtype)

    # Filling the two matrices is memory traffic, much of it the kernel mapping fresh pages
    # (bench/RESULTS.md); numpy copies without the GIL, so the two fill side by side.
    with ThreadPoolExecutor(max_workers=2) as pool:
        ids, lps = pool.map(lambda a: matrix(*a), (("topk_ids", np.int32), ("topk_logprobs", np.float32)))
    return {"topk_ids": ids, "topk_logprobs": lps}


@dataclass
class Scored:
    """One model's scored sets as read from the archive: {set: tokens} (top-K matrices included where
    scored) and {set: metadata}."""

    label: str
    tokens: dict[str, metrics.Tokens]
    meta: dict[str, dict]


@dataclass
class Extra:
    """What the outputs need beyond summary.json: per-token arrays for plots and the worst-token rows."""

    kl: dict = field(default_factory=dict)  # model -> (x, CDF, mean) of its per-position KLD over the pooled sets
    worst_rows: list = field(default_factory=list)  # rows of worst_tokens.parquet
    decoded: bool = False
    rows_by_model: dict = field(default_factory=dict, repr=False)  # until ``finish`` orders them


@dataclass
class BaselineSide:
    """The baseline's side of every comparison, computed once and shared by every model."""

    scored: Scored
    topk: dict  # set -> divergence.TopK: the probabilities of its top-K
    context: dict  # set -> ``contexts``
    decode: object | None  # a tokenizers.Tokenizer for where-it-hurts, or None


def contexts(base: Scored, sets: list[str]) -> dict[str, np.ndarray | None]:
    """Per set: the context each token had, for document-level sets scored in rolling windows (None: the
    position in the text is the context)."""
    out = {}
    for s in sets:
        roll = (base.meta[s].get("dataset") or {}).get("rolling")
        t = base.tokens[s]
        out[s] = None if not roll else summary_mod.context_lengths(t.sample_id, t.position, roll["window"],
                                                                    roll.get("stride"))
    return out


def start(summary: summary_mod.Summary, base: Scored, *, n_boot: int, seed: int,
          tokenizer: str | None = None) -> tuple[BaselineSide, Extra]:
    """The statistics block and the baseline's own figures (document metrics, top-K); then ``add_model``
    for each other model, one at a time, and ``finish``."""
    sets = summary.sets
    add_document_metrics(summary, base, n_boot=n_boot, seed=seed)
    summary.statistics = {
        "kl": "lower bound of the full-vocabulary KL divergence from top-K (see docs/statistics.md)",
        "topk": {base.label: _k(base, sets)}, "kl_bins_per_decade": 20, "kl_range": [1e-10, 1e2],
        "dp_bins_per_decade": 20, "dp_range": [1e-8, 1],
        "quantiles": list(comparison.QUANTILES),
    }
    decode = _decoder(tokenizer, base)
    side = BaselineSide(scored=base, topk={s: comparison.topk_of(base.tokens[s]) for s in sets},
                        context=contexts(base, sets), decode=decode)
    summary.where_it_hurts_decoded = decode is not None
    return side, Extra(decoded=decode is not None)


def add_model(summary: summary_mod.Summary, extra: Extra, side: BaselineSide, model: Scored, *,
              reference: Scored | None, n_boot: int, seed: int) -> None:
    """One model against the baseline: its comparison blocks (per set and over ``summary.overall_sets``),
    document metrics and where it hurts; and, for a ``<label>~<path>`` twin, its path noise against
    ``reference``. What is kept of the model's tokens: the KLD per position (the CDF plot)."""
    base, m, sets, pooled = side.scored, model.label, summary.sets, summary.overall_sets
    add_document_metrics(summary, model, n_boot=n_boot, seed=seed)
    summary.statistics["topk"][m] = _k(model, sets)
    pairs = {}
    for s in sets:
        what = f"{m} vs {base.label} on {s}: "
        try:
            pairs[s] = comparison.pair(base.tokens[s], model.tokens[s], what, base_topk=side.topk[s],
                                       context=side.context[s])
        except ValueError as exc:
            raise AggregateError(f"{what}{exc}") from None
        summary.models[m]["sets"][s]["comparison"] = comparison.statistics([pairs[s]], n_boot, seed)
    summary.models[m]["overall"]["comparison"] = comparison.statistics([pairs[s] for s in pooled], n_boot, seed)
    kl = np.concatenate([pairs[s].div.kl for s in pooled])
    extra.kl[m] = (*histograms.log_cdf(kl, KL_FLOOR), float(kl.mean()))  # not the array: memory flat in models
    del kl
    summary.where_it_hurts[m], extra.rows_by_model[m] = _where_it_hurts(m, pairs, base, side.decode)
    if reference is not None:
        add_path_noise(summary, side, model, reference, n_boot=n_boot, seed=seed)


def finish(summary: summary_mod.Summary, extra: Extra) -> None:
    """The noise-floor runs, and every per-model entry in the order of ``summary.models`` (the models
    were taken in another order: each twin right after its reference)."""
    compared = [m for m in summary.models if m != summary.baseline]
    summary.noise_floor = [m for m in compared if is_noise(m, summary.baseline)]
    summary.statistics["topk"] = {m: summary.statistics["topk"][m] for m in summary.models}
    summary.where_it_hurts = {m: summary.where_it_hurts[m] for m in compared}
    summary.path_noise = {m: summary.path_noise[m] for m in summary.models if m in summary.path_noise}
    extra.kl = {m: extra.kl[m] for m in compared}
    extra.worst_rows += [r for m in compared for r in extra.rows_by_model.pop(m)]


def add_path_noise(summary: summary_mod.Summary, side: BaselineSide, twin: Scored, reference: Scored, *,
                   n_boot: int, seed: int) -> None:
    """A ``<label>~<path>`` twin against its ``<label>`` over the pooled sets: the baseline's twins are
    already paired with it; another model's twin is paired with that model here."""
    pooled, m, ref = summary.overall_sets, twin.label, reference.label
    path = summary_mod.describe_path(reference.meta[pooled[0]], twin.meta[pooled[0]])
    if ref == summary.baseline:
        o = summary.models[m]["overall"]
        paired, comp = o["paired"], o["comparison"]
    else:
        what = f"{m} vs {ref}"
        a, b = reference.tokens, twin.tokens
        try:
            paired = metrics.paired_stats([a[s] for s in pooled], [b[s] for s in pooled], n_boot=n_boot, seed=seed)
            comp = comparison.statistics([comparison.pair(a[s], b[s], f"{what} on {s}: ", context=side.context[s])
                                          for s in pooled], n_boot, seed)
        except ValueError as exc:
            raise AggregateError(f"{what}: {exc}") from None
    summary.path_noise[m] = summary_mod.path_noise(m, ref, path, paired, comp)


def add_document_metrics(summary: summary_mod.Summary, model: Scored, *, n_boot: int, seed: int) -> None:
    """lm-eval's word/byte perplexity and bits per byte for every document-level set (``wikitext2_doc``)."""
    for s, t in model.tokens.items():
        ds = model.meta[s].get("dataset", {})
        if ds.get("kind") != "document":
            continue
        units = ds.get("units") or {}
        summary.models[model.label]["sets"][s]["document"] = {
            **docppl.metrics(t.sample_id, t.logprob, units.get("words", []), units.get("bytes", []), n_boot, seed),
            "rolling": ds.get("rolling")}


def _k(model: Scored, sets) -> int:
    t = model.tokens[sets[0]]
    return 1 if t.topk_ids is None else int(t.topk_ids.shape[1])


def _decoder(tokenizer: str | None, base: Scored):
    """A ``tokenizers.Tokenizer`` for the context column: the one asked for (it must load), else the
    baseline's recorded tokenizer when this machine can read it, else None (ids only)."""
    if tokenizer:
        path = Path(tokenizer)
    else:
        path = next((Path(m["tokenizer"]["path"]) for m in base.meta.values()
                     if m.get("tokenizer", {}).get("path")), None)
        if path is None:
            return None
    f = path / "tokenizer.json" if path.is_dir() else path
    if not f.is_file():
        if tokenizer:
            raise AggregateError(f"--tokenizer {tokenizer}: no tokenizer.json there")
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(f))
    except Exception as exc:
        if tokenizer:
            raise AggregateError(f"--tokenizer {tokenizer}: cannot load ({exc})") from None
        return None


def _where_it_hurts(model, pairs, base: Scored, decode) -> tuple[dict, list]:
    texts, rows = [], []
    for s, p in pairs.items():
        texts += [{"dataset": s, **t} for t in comparison.worst_texts(p, WORST_MD)]
        ids = base.tokens[s].token_id
        starts = metrics.text_starts(p.sample_id)
        text_start = starts[np.searchsorted(starts, np.arange(len(p.sample_id)), side="right") - 1]
        for crit, idx in comparison.worst_tokens(p, WORST_PARQUET).items():
            for i in idx:
                rows.append(_row(model, s, crit, p, ids, int(i), int(text_start[i]), decode))
    texts.sort(key=lambda t: -t["delta_nll"])
    md = {crit: sorted((r for r in rows if r["criterion"] == crit), key=lambda r: -r[crit])[:WORST_MD]
          for crit in ("delta_nll", "kld")}  # a criterion is named after the row field it ranks by
    return {"texts": texts[:WORST_MD], "tokens_by_delta_nll": md["delta_nll"], "tokens_by_kld": md["kld"]}, rows


def _row(model, s, crit, p, ids, i, text_start, decode) -> dict:
    sid = p.sample_id[i]
    lo = max(i - CONTEXT_TOKENS, text_start)
    ctx = ids[lo:i].tolist()
    tok = int(p.token_id[i])
    return {
        "model": model, "dataset": s, "criterion": crit, "sample_id": int(sid), "position": int(p.position[i]),
        "token_id": tok, "token": decode.decode([tok], skip_special_tokens=False) if decode else None,
        "context": decode.decode(ctx, skip_special_tokens=False) if decode else None,
        "context_ids": ctx, "base_logprob": float(p.base_lp[i]), "model_logprob": float(p.model_lp[i]),
        "delta_nll": float(p.base_lp[i] - p.model_lp[i]), "kld": float(p.div.kl[i]),
        "kld_reverse": float(p.div.kl_reverse[i]), "base_top1_prob": float(p.base_conf[i]),
    }
