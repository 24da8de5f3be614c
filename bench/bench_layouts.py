"""What reading the top-K columns costs in other Parquet layouts than the archive's (SPEC §4: two ``list``
columns, zstd): the floor under the aggregate stage's read phase (bench/RESULTS.md).

    .venv/bin/python bench/bench_layouts.py                 # 1M rows of top-20, parts of 32,000 rows

The rows come from bench_aggregate's synthetic baseline (random ids and logprobs; real ones may compress
better). Each layout is written as parts like the score stage's and read back with pyarrow, one part at
a time on one thread (CPU seconds per million rows, all nine columns), and with two threads over the parts
(wall seconds per million rows), best of three each; with and without dictionary pages for the top-K. Layouts:

- ``list``: the archive's — ``topk_ids`` list<int32>, ``topk_logprobs`` list<float32>, null at position 0;
- ``flat``: 2K columns ``topk_id_01`` … ``topk_logprob_20``, nullable;
- ``flat-notnull``: the same with no nulls (a sentinel at position 0);
- ``fixed-binary``: two fixed_size_binary(4K) columns (opaque to other readers).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_aggregate import PART_TEXTS, TEXT_LEN, synth  # noqa: E402


def tables(n: int, k: int) -> dict[str, pa.Table]:
    token, [(ids, lp), *_] = synth(n, k, seed=0)
    pos = (np.arange(n) % TEXT_LEN).astype(np.int32)
    first = pos == 0
    base = pa.table({"sample_id": (np.arange(n) // TEXT_LEN).astype(np.int32), "position": pos,
                     "token_id": token.astype(np.int32), "logprob": pa.array(lp[:, 0], mask=first),
                     "rank": pa.array(np.ones(n, np.int32), mask=first),
                     "top1_id": pa.array(ids[:, 0], mask=first), "top1_logprob": pa.array(lp[:, 0], mask=first)})
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    out = {"list": base.append_column("topk_ids", pa.ListArray.from_arrays(offsets, pa.array(ids.ravel()),
                                                                          mask=pa.array(first)))
                       .append_column("topk_logprobs", pa.ListArray.from_arrays(offsets, pa.array(lp.ravel()),
                                                                               mask=pa.array(first)))}
    for name, nullable in (("flat", True), ("flat-notnull", False)):
        t = base
        for what, m in (("id", ids), ("logprob", lp)):
            for j in range(k):
                t = t.append_column(pa.field(f"topk_{what}_{j + 1:02d}", pa.from_numpy_dtype(m.dtype), nullable),
                                    pa.array(m[:, j], mask=first if nullable else None))
        out[name] = t
    out["fixed-binary"] = base.append_column(
        "topk_ids", pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * k), n, [None, pa.py_buffer(ids.tobytes())])
    ).append_column(
        "topk_logprobs", pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * k), n, [None, pa.py_buffer(lp.tobytes())]))
    return out


def measure(table: pa.Table, root: Path, compression: str, dictionary: bool) -> dict:
    rows = PART_TEXTS * TEXT_LEN
    paths = []
    # dictionary=True is the archive's writer (pyarrow's default: dictionary pages for every column);
    # False keeps them for the per-token columns only (random top-K values overflow a dictionary anyway)
    use_dictionary = True if dictionary else [c for c in table.column_names if not c.startswith("topk")]
    for i, start in enumerate(range(0, table.num_rows, rows)):
        p = root / f"part-{i:05d}.parquet"
        pq.write_table(table.slice(start, rows), p, compression=compression, use_dictionary=use_dictionary)
        paths.append(p)
    n = table.num_rows / 1e6
    best = wall = float("inf")
    for _ in range(3):
        c = time.process_time()
        for p in paths:
            pq.read_table(p, use_threads=False)
        best = min(best, time.process_time() - c)
        w = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda p: pq.read_table(p, use_threads=False), paths))
        wall = min(wall, time.perf_counter() - w)
    size = sum(p.stat().st_size for p in paths)
    for p in paths:
        p.unlink()
    return {"bytes_per_row": round(size / table.num_rows, 1), "cpu_s_per_M_rows_1_thread": round(best / n, 3),
            "wall_s_per_M_rows_2_threads": round(wall / n, 3)}


def fresh_memory(gib: float = 1.6, block_mib: int = 400) -> dict:
    """Seconds per GiB to fill memory the process has not touched before (np.empty + one write: the OS
    maps each page on first touch), against filling it again: whole-array aggregation pays the first for
    every array it materialises."""
    keep, first, again = [], 0.0, 0.0
    for _ in range(int(gib * 1024 / block_mib)):
        t = time.perf_counter()
        a = np.empty(block_mib * 2**20 // 4, np.int32)
        a[:] = 1
        first += time.perf_counter() - t
        t = time.perf_counter()
        a[:] = 2
        again += time.perf_counter() - t
        keep.append(a)
    n = len(keep) * block_mib / 1024
    return {"fresh_memory_s_per_gib": round(first / n, 3), "touched_memory_s_per_gib": round(again / n, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_024_000)
    ap.add_argument("--topk", type=int, default=20)
    args = ap.parse_args()
    print(json.dumps(fresh_memory()), flush=True)
    with tempfile.TemporaryDirectory(prefix="qscore-layouts-") as tmp:
        for name, table in tables(args.rows, args.topk).items():
            for compression in ("zstd", "lz4", "none"):
                for dictionary in (True, False):
                    print(json.dumps({"layout": name, "compression": compression, "topk_dictionary": dictionary,
                                      "rows": table.num_rows, "topk": args.topk,
                                      **measure(table, Path(tmp), compression, dictionary),
                                      "archive_layout": name == "list" and compression == "zstd" and dictionary,
                                      "cpus": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    main()
