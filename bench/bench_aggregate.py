"""How long the aggregate stage takes on a large archive: synthetic Parquet, timed phase by phase.

    .venv/bin/python bench/bench_aggregate.py                       # 10M tokens × 3 models, top-20
    .venv/bin/python bench/bench_aggregate.py --tokens 1000000 --keep /tmp/qscore-bench

Writes an archive shaped like the score stage's (two sets, texts of 1000 tokens, parts of 32 texts,
zstd, the same schema) for a baseline and two models whose top-20 lists mostly overlap the baseline's,
then runs the aggregate stage's own functions and prints one JSON line of timings, wall and CPU seconds
(all threads; the load average before and after says whether the machine was shared): ``read``
(Parquet → arrays), ``paired`` (the existing SPEC §4 metrics and Δnll intervals), ``kl_one_model``
(the per-position KL kernel for one model, both sets — it runs again inside ``stats``), ``stats``
(every statistic of comparison.statistics and where-it-hurts, bootstrap included), ``report`` (plots,
outputs.md, worst_tokens.parquet), and ``aggregate`` = read + paired + stats + report, the stage minus
interpreter start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.stats import divergence, quant as quant_stats
from jobs.report import outputs
from jobs.archive import logprobs  # noqa: E402
from jobs.stages import aggregate  # noqa: E402

TEXT_LEN, PART_TEXTS, VOCAB = 1000, 32, 151_936


def synth(n_tokens: int, k: int, seed: int):
    """Per-position top-k ids/logprobs of a baseline and two perturbed models, and the actual tokens."""
    rng = np.random.default_rng(seed)
    token, base_ids, base_lp = baseline(n_tokens, k, rng)
    models = [perturb(base_ids, base_lp, scale, swap, rng) for scale, swap in ((0.02, 0.02), (0.3, 0.15))]
    return token, [(base_ids, base_lp)] + models


def baseline(n_tokens: int, k: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The actual tokens and the baseline's top-k ids and logprobs per position."""
    # top-k ids: distinct within a row (a random offset plus a stride), most likely first
    base_ids = ((rng.integers(0, VOCAB, n_tokens)[:, None] + np.arange(k) * 7919) % VOCAB).astype(np.int32)
    gaps = rng.exponential(1.0, (n_tokens, k)).astype(np.float32)
    gaps[:, 0] = rng.exponential(0.5, n_tokens)
    base_lp = -np.cumsum(gaps, axis=1)
    actual_rank = np.minimum(rng.geometric(0.45, n_tokens) - 1, k - 1)
    rows = np.arange(n_tokens)
    return base_ids[rows, actual_rank], base_ids, base_lp


def perturb(base_ids: np.ndarray, base_lp: np.ndarray, scale: float, swap: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """A model's top-k: the baseline's logprobs with noise of ``scale``, a share of about ``swap`` of its ids
    replaced (the tail most)."""
    n_tokens, k = base_ids.shape
    ids = base_ids.copy()
    repl = rng.random((n_tokens, k)) < swap * np.linspace(0.2, 2.0, k)  # the tail changes most
    ids[repl] = rng.integers(0, VOCAB, int(repl.sum()))
    lp = np.sort(base_lp + rng.normal(0, scale, base_lp.shape).astype(np.float32), axis=1)[:, ::-1]
    return ids, np.ascontiguousarray(lp)


def write_archive(root: Path, n_tokens: int, k: int, seed: int = 0) -> None:
    token, models = synth(n_tokens, k, seed)
    for label, (ids, lp) in zip(("bf16", "llmc-nvfp4", "nvidia-nvfp4"), models):
        write_label(root, label, ids, lp, token)


def write_label(root: Path, label: str, ids: np.ndarray, lp: np.ndarray, token: np.ndarray) -> None:
    """One model's two sets (the first and second half of the tokens), in parts of 32 texts of 1000 tokens,
    through the score stage's writer: the top-K ``ids``/``lp`` (N, k) per position, the actual ``token``."""
    n_tokens, k = ids.shape
    sets = {"wiki": (0, n_tokens // 2), "chat": (n_tokens // 2, n_tokens)}
    for name, (lo, hi) in sets.items():
        n = hi - lo
        sid = np.repeat(np.arange(n // TEXT_LEN + 1, dtype=np.int32), TEXT_LEN)[:n]
        pos = (np.arange(n) % TEXT_LEN).astype(np.int32)
        first = pos == 0
        tk_ids, tk_lp, tok = ids[lo:hi], lp[lo:hi], token[lo:hi]
        actual = tk_lp[np.arange(n), np.argmax(tk_ids == tok[:, None], axis=1)]
        actual = np.where((tk_ids == tok[:, None]).any(1), actual, tk_lp[:, -1] - 1.0).astype(np.float32)
        rank = (tk_lp > actual[:, None]).sum(1).astype(np.int32) + 1
        part_rows = PART_TEXTS * TEXT_LEN
        ddir = logprobs.dataset_dir(root, label, name)
        for p, start in enumerate(range(0, n, part_rows)):
            sl = slice(start, min(start + part_rows, n))
            m = first[sl]
            rows = sl.stop - sl.start
            offsets = pa.array(np.arange(0, (rows + 1) * k, k, dtype=np.int32))
            table = pa.Table.from_arrays([
                pa.array(sid[sl]), pa.array(pos[sl]), pa.array(tok[sl].astype(np.int32)),
                pa.array(actual[sl], mask=m), pa.array(rank[sl], mask=m), pa.array(tk_ids[sl, 0], mask=m),
                pa.array(tk_lp[sl, 0], mask=m),
                pa.ListArray.from_arrays(offsets, pa.array(tk_ids[sl].reshape(-1)), mask=pa.array(m)),
                pa.ListArray.from_arrays(offsets, pa.array(tk_lp[sl].reshape(-1)), mask=pa.array(m)),
            ], schema=logprobs.arrow_schema(k))
            logprobs.atomic_write_table(table, ddir / f"part-{p:05d}.parquet",
                                      {"fingerprint": label, "model": {"ref": label}, "dataset": {"name": name}})


class Clock:
    """Wall and CPU seconds (all threads) of a phase: on a shared machine the wall time alone misleads."""

    def __init__(self):
        self.wall, self.cpu = {}, {}

    def __call__(self, name):
        clock = self

        class Phase:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                clock.wall[name] = time.perf_counter() - self.w
                clock.cpu[name] = time.process_time() - self.c

        return Phase()


def run(root: Path, n_boot: int) -> tuple[dict, dict]:
    """The stage's own steps phase by phase, every model read first (three models fit; the stage itself
    reads one model at a time, ``aggregate.summarize``, which interleaves these phases)."""
    c = Clock()
    with c("read"):
        found = aggregate.discover(root)
        models = {m: aggregate.load_model(m, sets) for m, sets in found.items()}
    base = models["bf16"]
    with c("paired"):
        summary, labels = aggregate.frame({m: list(sets) for m, sets in found.items()}, "bf16", n_boot, 0,
                                          {s: m.get("dataset") or {} for s, m in base.meta.items()})
        for m in labels:
            summary.models[m] = aggregate.model_entry(summary, models[m], None if m == "bf16" else base)
        summary.provenance = outputs.provenance_table({(m, s): v for m in labels for s, v in models[m].meta.items()})
        deltas = {s: {m: base.tokens[s].logprob - models[m].tokens[s].logprob for m in labels[1:]} for s in summary.sets}
    with c("kl_one_model"):  # the kernel alone, once (it also runs inside add_model)
        for s in summary.sets:
            b, q = base.tokens[s], models["llmc-nvfp4"].tokens[s]
            divergence.topk_kl(b.topk_ids, b.topk_logprobs, q.topk_ids, q.topk_logprobs, b.logprob, q.logprob,
                               b.token_id)
    with c("stats"):
        side, extra = quant_stats.start(summary, base, n_boot=n_boot, seed=0)
        for m in labels[1:]:
            quant_stats.add_model(summary, extra, side, models[m], reference=None, n_boot=n_boot, seed=0)
        quant_stats.finish(summary, extra)
    with c("report"):
        outputs.write_report(summary, deltas, extra, root / "report")
    for d in (c.wall, c.cpu):
        d["aggregate"] = d["read"] + d["paired"] + d["stats"] + d["report"]
    return c.wall, c.cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=10_000_000, help="tokens per model (two sets, half each)")
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--keep", default=None, help="write the archive here and reuse it on later runs")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qscore-bench-"))
    try:
        t0 = time.perf_counter()
        if not (root / "logprobs").exists():
            write_archive(root, args.tokens, args.topk)
        gen = time.perf_counter() - t0
        divergence.topk_kl(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)), np.zeros(1),
                           np.zeros(1), np.zeros(1))  # load the compiled kernel before timing
        size = sum(f.stat().st_size for f in (root / "logprobs").rglob("*.parquet"))
        load0 = os.getloadavg()[0]
        wall, cpu = run(root, args.bootstrap)
        print(json.dumps({"tokens_per_model": args.tokens, "models": 3, "topk": args.topk, "bootstrap": args.bootstrap,
                          "archive_gib": round(size / 2**30, 3), "generate_s": round(gen, 1),
                          "wall_s": {k: round(v, 2) for k, v in wall.items()},
                          "cpu_s": {k: round(v, 2) for k, v in cpu.items()}, "cpus": os.cpu_count(),
                          "loadavg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
                          "machine": platform.processor() or platform.machine()}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
