"""The aggregate stage's time and peak memory against the number of models (issue #24: a recipe sweep
brings tens of them): a synthetic archive of a baseline and N−1 models, the stage run on it in a
subprocess, its wall time and peak RSS printed as one JSON line.

    .venv/bin/python bench/aggregate_models.py --keep /tmp/qbench-models               # 12 models × 1M tokens
    .venv/bin/python bench/aggregate_models.py --keep /tmp/qbench-models --models 3    # the same archive, fewer
    .venv/bin/python bench/aggregate_models.py --keep /tmp/qbench-models --code /tmp/old-checkout  # other code

The archive (written once with --keep, then reused) is shaped like the score stage's and written by its
writer (``bench_aggregate.write_label``): two sets (half the tokens each), texts of 1000 tokens, top-20;
the baseline ``bf16`` and models ``m01``, ``m02``, … whose top-20 lists drift further from the baseline's
the higher their number; with ``--twin`` the last one is ``<previous>~noise``, a path-noise twin, so that
three models are in memory at once. ``--models N`` aggregates the baseline and the first N−1 models
(``--labels``). Peak RSS is the aggregate process's own (``os.wait4``), interpreter start-up included.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_aggregate import baseline, perturb, write_label  # noqa: E402
from jobs.archive import logprobs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def labels(n_models: int, twin: bool) -> list[str]:
    out = ["bf16"] + [f"m{i:02d}" for i in range(1, n_models)]
    if twin and n_models >= 3:
        out[-1] = f"{out[-2]}~noise"
    return out


def write_archive(root: Path, names: list[str], n_tokens: int, k: int, seed: int = 0) -> None:
    """One model at a time (each is the baseline perturbed with its own generator): memory holds two."""
    token, base_ids, base_lp = baseline(n_tokens, k, np.random.default_rng(seed))
    write_label(root, names[0], base_ids, base_lp, token)
    prev = None
    for i, label in enumerate(names[1:], start=1):
        if label.endswith("~noise"):  # its reference again, through a path that moves the last digits
            ids, lp = prev
            lp = np.sort(lp + np.random.default_rng([seed, i]).normal(0, 1e-3, lp.shape).astype(np.float32), axis=1)
            lp = np.ascontiguousarray(lp[:, ::-1])
        else:
            ids, lp = perturb(base_ids, base_lp, 0.01 + 0.02 * i, 0.002 * i, np.random.default_rng([seed, i]))
        write_label(root, label, ids, lp, token)
        prev = ids, lp


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def aggregate(root: Path, names: list[str], code: Path, bootstrap: int) -> dict:
    """``python -m jobs aggregate`` of ``code`` on the archive: wall seconds, peak RSS, CPU seconds."""
    report = Path(tempfile.mkdtemp(prefix="qscore-agg-report-"))
    cmd = [sys.executable, "-m", "jobs", "aggregate", "--results-dir", str(root), "--baseline", "bf16",
           "--report-dir", str(report / "report"), "--bootstrap", str(bootstrap), "--labels", ",".join(names[1:])]
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest of every child so far
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    shutil.rmtree(report, ignore_errors=True)
    if proc.returncode:
        return {"returncode": proc.returncode, "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
                "output_tail": out.decode(errors="replace")[-2000:]}
    return {"returncode": 0, "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive-models", type=int, default=12, help="models written into the archive, baseline included")
    ap.add_argument("--models", type=int, default=None, help="models aggregated (default: all written)")
    ap.add_argument("--tokens", type=int, default=1_000_000, help="tokens per model (two sets, half each)")
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--twin", action="store_true", help="the last model is a path-noise twin of the one before")
    ap.add_argument("--keep", default=None, help="write the archive here and reuse it on later runs")
    ap.add_argument("--code", default=str(ROOT), help="the checkout whose `python -m jobs` runs the stage")
    args = ap.parse_args()
    names = labels(args.archive_models, args.twin)[:args.models]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qscore-bench-models-"))
    try:
        t0 = time.perf_counter()
        if not (root / "logprobs").exists():
            write_archive(root, labels(args.archive_models, args.twin), args.tokens, args.topk)
        gen = time.perf_counter() - t0
        have = logprobs.discover(root)
        missing = [m for m in names if m not in have]
        if missing:
            sys.exit(f"error: {root} holds no {', '.join(missing)}: write a new archive (another --keep)")
        size = sum(f.stat().st_size for m in names for f in (root / "logprobs" / f"model={m}").rglob("*.parquet"))
        load0 = os.getloadavg()[0]
        res = aggregate(root, names, Path(args.code).resolve(), args.bootstrap)
        print(json.dumps({"models": len(names), "labels": names, "tokens_per_model": args.tokens, "topk": args.topk,
                          "bootstrap": args.bootstrap, "archive_gib": round(size / 2**30, 3),
                          "generate_s": round(gen, 1), **res, "cpus": os.cpu_count(),
                          "loadavg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
                          "machine": cpu_model(), "code": str(Path(args.code).resolve())}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
