"""The aggregate stage's quantization statistics: from the loaded archive to summary entries.

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

from jobs.stats import comparison, docppl, metrics, summary as summary_mod
from jobs.archive import logprobs
from jobs.core.errors import AggregateError, ArchiveError

TOPK_COLUMNS = ["topk_ids", "topk_logprobs"]
NOISE_SEP = summary_mod.PATH_SEP  # <baseline>~noise: the baseline through another path (backend, batch layout, dtype)
WORST_MD = 10  # rows per table in report.md
WORST_PARQUET = 1000  # rows per (model, criterion) in worst_tokens.parquet
CONTEXT_TOKENS = 12


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
class Extra:
    """What the outputs need beyond summary.json: per-token arrays for plots and the worst-token rows."""

    kl: dict = field(default_factory=dict)  # model -> per-position KLD over the pooled sets (the CDF plot)
    worst_rows: list = field(default_factory=list)  # rows of worst_tokens.parquet
    decoded: bool = False


def contexts(data: dict, meta: dict, label: str, sets: list[str]) -> dict[str, np.ndarray | None]:
    """Per set: the context each token had, for document-level sets scored in rolling windows (None: the
    position in the text is the context)."""
    out = {}
    for s in sets:
        roll = (meta[(label, s)].get("dataset") or {}).get("rolling")
        t = data[(label, s)]
        out[s] = None if not roll else summary_mod.context_lengths(t.sample_id, t.position, roll["window"],
                                                                    roll.get("stride"))
    return out


def add_to_summary(summary: summary_mod.Summary, data: dict, meta: dict, *, n_boot: int, seed: int,
                   tokenizer: str | None = None) -> Extra:
    """Fill ``summary``'s comparison blocks, noise floor, path noise and where-it-hurts; the per-set
    figures for every set, the overall ones over ``summary.overall_sets``."""
    base, sets, pooled = summary.baseline, summary.sets, summary.overall_sets
    labels = [m for m in summary.models if m != base]
    add_document_metrics(summary, data, meta, n_boot=n_boot, seed=seed)
    summary.noise_floor = [m for m in labels if is_noise(m, base)]
    ks = {m: _k(data, m, sets) for m in summary.models}
    summary.statistics = {
        "kl": "lower bound of the full-vocabulary KL divergence from top-K (see docs/statistics.md)",
        "topk": ks, "kl_bins_per_decade": 20, "kl_range": [1e-10, 1e2], "dp_bins_per_decade": 20,
        "dp_range": [1e-8, 1],
        "quantiles": list(comparison.QUANTILES),
    }
    decode = _decoder(tokenizer, meta, base)
    extra = Extra(decoded=decode is not None)
    hurts = {}
    ctx = contexts(data, meta, base, sets)
    base_topk = {s: comparison.topk_of(data[(base, s)]) for s in sets}  # shared by every model
    for m in labels:
        pairs = {}
        for s in sets:
            try:
                pairs[s] = comparison.pair(data[(base, s)], data[(m, s)], f"{m} vs {base} on {s}: ",
                                           base_topk=base_topk[s], context=ctx[s])
            except ValueError as exc:
                raise AggregateError(f"{m} vs {base} on {s}: {exc}") from None
            summary.models[m]["sets"][s]["comparison"] = comparison.statistics([pairs[s]], n_boot, seed)
        summary.models[m]["overall"]["comparison"] = comparison.statistics([pairs[s] for s in pooled], n_boot, seed)
        extra.kl[m] = np.concatenate([pairs[s].div.kl for s in pooled])
        hurts[m], rows = _where_it_hurts(m, pairs, data, base, decode)
        extra.worst_rows += rows
    summary.where_it_hurts = hurts
    summary.where_it_hurts_decoded = extra.decoded
    add_path_noise(summary, data, meta, ctx, n_boot=n_boot, seed=seed)
    return extra


def add_path_noise(summary: summary_mod.Summary, data: dict, meta: dict, ctx: dict, *, n_boot: int,
                   seed: int) -> None:
    """Every ``<label>~<path>`` twin against its ``<label>`` over the pooled sets: the baseline's twins are
    already paired with it; another model's twin is paired with that model here."""
    pooled = summary.overall_sets
    for m in summary.models:
        ref = summary_mod.twin_of(m, summary.models)
        if ref is None:
            continue
        path = summary_mod.describe_path(meta[(ref, pooled[0])], meta[(m, pooled[0])])
        if ref == summary.baseline:
            o = summary.models[m]["overall"]
            paired, comp = o["paired"], o["comparison"]
        else:
            what = f"{m} vs {ref}"
            try:
                paired = metrics.paired_stats([data[(ref, s)] for s in pooled], [data[(m, s)] for s in pooled],
                                              n_boot=n_boot, seed=seed)
                comp = comparison.statistics([comparison.pair(data[(ref, s)], data[(m, s)], f"{what} on {s}: ",
                                                              context=ctx[s]) for s in pooled], n_boot, seed)
            except ValueError as exc:
                raise AggregateError(f"{what}: {exc}") from None
        summary.path_noise[m] = summary_mod.path_noise(m, ref, path, paired, comp)


def add_document_metrics(summary: dict, data: dict, meta: dict, *, n_boot: int, seed: int) -> None:
    """lm-eval's word/byte perplexity and bits per byte for every document-level set (``wikitext2_doc``)."""
    for (label, s), t in data.items():
        ds = meta[(label, s)].get("dataset", {})
        if ds.get("kind") != "document" or label not in summary.models:
            continue
        units = ds.get("units") or {}
        summary.models[label]["sets"][s]["document"] = {
            **docppl.metrics(t.sample_id, t.logprob, units.get("words", []), units.get("bytes", []), n_boot, seed),
            "rolling": ds.get("rolling")}


def _k(data, label, sets) -> int:
    t = data[(label, sets[0])]
    return 1 if t.topk_ids is None else int(t.topk_ids.shape[1])


def _decoder(tokenizer: str | None, meta: dict, base: str):
    """A ``tokenizers.Tokenizer`` for the context column: the one asked for (it must load), else the
    baseline's recorded tokenizer when this machine can read it, else None (ids only)."""
    if tokenizer:
        path = Path(tokenizer)
    else:
        path = next((Path(m["tokenizer"]["path"]) for (label, _), m in meta.items()
                     if label == base and m.get("tokenizer", {}).get("path")), None)
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


def _where_it_hurts(model, pairs, data, base, decode) -> tuple[dict, list]:
    texts, rows = [], []
    for s, p in pairs.items():
        texts += [{"dataset": s, **t} for t in comparison.worst_texts(p, WORST_MD)]
        ids = data[(base, s)].token_id
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
