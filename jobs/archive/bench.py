"""The serving-cost archive: one row per checkpoint, what it costs to serve, with provenance.

A finished benchmark lives at ``<results>/bench/model=<label>/bench.parquet``: one wide row (SPEC §6),
written under a temporary name and renamed when complete (``logprobs.atomic_write_table``), so a reader
never sees a partial file. The Parquet metadata under the key ``qscore`` (as in ``logprobs.py`` and
``tasks.py``) holds the run's provenance: the fingerprint of its settings, the checkpoint, the GPU, the
arithmetic, the server's command and vLLM's own benchmark results as it saved them.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.archive import logprobs
from jobs.core.errors import ArchiveError, first_line

SCHEMA_VERSION = "bench-1"
META_KEY = logprobs.META_KEY
FILE = "bench.parquet"

# the speed and latency figures: float64, null where not measured (no GPU, no vLLM)
SPEED_COLUMNS = (
    "prefill_tokens_per_s", "decode_tokens_per_s_b1", "decode_tokens_per_s_loaded",
    "ttft_p50_ms_b1", "ttft_p99_ms_b1", "itl_p50_ms_b1", "itl_p99_ms_b1",
    "ttft_p50_ms_loaded", "ttft_p99_ms_loaded", "itl_p50_ms_loaded", "itl_p99_ms_loaded",
)
FIELDS = [
    pa.field("label", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("gpu", pa.string(), nullable=False),  # the CUDA device's name, or "none"
    pa.field("arithmetic", pa.string(), nullable=False),
    pa.field("deployment_speed", pa.bool_(), nullable=False),
    pa.field("note", pa.string(), nullable=False),
    pa.field("bytes_on_disk", pa.int64(), nullable=False),
    pa.field("weight_memory_bytes", pa.int64()),
    pa.field("kv_cache_tokens", pa.int64()),
    pa.field("gpu_memory_utilization", pa.float64()),
    pa.field("input_len", pa.int64(), nullable=False),
    pa.field("output_len", pa.int64(), nullable=False),
    pa.field("loaded_concurrency", pa.int64(), nullable=False),
    *[pa.field(name, pa.float64()) for name in SPEED_COLUMNS],
]
SCHEMA = pa.schema(FIELDS)
COLUMNS = tuple(SCHEMA.names)


def bench_path(results_dir: str | os.PathLike, label: str) -> Path:
    return Path(results_dir) / "bench" / f"model={logprobs.check_label('model label', label)}" / FILE


def row_to_table(row: dict) -> pa.Table:
    """The one-row table of ``row``; a missing or extra column is an error, never a silent null."""
    missing = [c for c in COLUMNS if c not in row]
    extra = sorted(set(row) - set(COLUMNS))
    if missing or extra:
        raise ValueError(f"bench row: missing columns {missing}, unknown columns {extra}")
    return pa.Table.from_pylist([{c: row[c] for c in COLUMNS}], schema=SCHEMA)


def write(path: Path, row: dict, metadata: dict) -> Path:
    """Write ``row`` with ``metadata`` (its ``fingerprint`` included) to ``path`` in one rename."""
    meta = {"schema_version": SCHEMA_VERSION, **metadata}
    return logprobs.atomic_write_table(row_to_table(row), Path(path), meta)


def read(path: Path) -> tuple[dict, dict]:
    """(row, metadata) of one finished benchmark, checked: qscore's, this schema, one row."""
    path = Path(path)
    meta = logprobs.read_metadata(path)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ArchiveError(f"{path}: schema {meta.get('schema_version')!r}, expected {SCHEMA_VERSION!r}")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ArchiveError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing or table.num_rows != 1:
        raise ArchiveError(f"{path}: {table.num_rows} rows, missing columns {missing}: not a bench row")
    return table.select(list(COLUMNS)).to_pylist()[0], meta


def read_fingerprint(path: Path) -> str | None:
    return logprobs.read_metadata(Path(path)).get("fingerprint") if Path(path).exists() else None


def load(results_dir: str | os.PathLike) -> dict[str, dict]:
    """{label: row} of every finished benchmark under ``<results>/bench`` (temporaries, which are hidden
    files, are never matched)."""
    root = Path(results_dir) / "bench"
    out = {}
    for path in sorted(root.glob(f"model=*/{FILE}")):
        row, _ = read(path)
        out[row["label"]] = row
    return out
