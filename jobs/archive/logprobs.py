"""The per-token logprob archive of SPEC §3: its Arrow schema, its metadata, and safe reads and writes.

A scored dataset lives at ``<results>/logprobs/model=<label>/dataset=<set>/part-<k>.parquet``. Every
file is written under a temporary name and renamed when complete, so no reader sees a partial file.
Archives are found and read with ``pyarrow.dataset`` (Hive partitioning; hidden staging directories, lock
files and temporaries are not listed), after qscore's own checks of each part's footer: one run's
fingerprint, the required columns, and as many rows as the run recorded.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from jobs.core import atomic
from jobs.core.errors import ArchiveError, ScoreError, SettingsError, first_line

SCHEMA_VERSION = "1"
META_KEY = b"qscore"  # one JSON document under this key holds the metadata of SPEC §3

_BASE_FIELDS = [
    pa.field("sample_id", pa.int32(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("token_id", pa.int32(), nullable=False),
    pa.field("logprob", pa.float32()),
    pa.field("rank", pa.int32()),
    pa.field("top1_id", pa.int32()),
    pa.field("top1_logprob", pa.float32()),
]
_TOPK_FIELDS = [
    pa.field("topk_ids", pa.list_(pa.int32())),
    pa.field("topk_logprobs", pa.list_(pa.float32())),
]
REQUIRED_COLUMNS = [f.name for f in _BASE_FIELDS]
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]*$")  # "~": <baseline>~noise


def arrow_schema(topk: int = 1) -> pa.Schema:
    return pa.schema(_BASE_FIELDS + (_TOPK_FIELDS if topk > 1 else []))


def check_label(kind: str, value: str) -> str:
    """Labels become Hive directory names, so they must be plain (no '/', '=', spaces)."""
    if not _LABEL_RE.match(value or ""):
        raise SettingsError(
            f"bad {kind} {value!r}: use letters, digits, '.', '_', '+', '~', '-' (it names a directory)"
        )
    return value


def dataset_dir(results_dir: str | os.PathLike, label: str, dataset: str) -> Path:
    return Path(results_dir) / "logprobs" / f"model={check_label('model label', label)}" / (
        f"dataset={check_label('dataset name', dataset)}"
    )


def _null_first(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    mask = np.zeros(len(values), dtype=bool)
    if len(values):
        mask[0] = True
    return pa.array(values, type=arrow_type, mask=mask)


def sequences_to_table(seqs: Iterable, topk: int = 1) -> pa.Table:
    """Rows per token, positions 0..L-1, position 0 null: the archive holds every sequence whole.
    ``seqs``: the engines' ``SequenceScores`` (jobs/engines/base.py; the archive does not import engines)."""
    cols: dict[str, list] = {name: [] for name in arrow_schema(topk).names}
    for s in seqs:
        n = len(s.token_ids)
        if n < 2:
            raise ValueError(f"sample {s.sample_id}: a scored sequence needs at least 2 tokens")
        if not np.all(np.isfinite(np.asarray(s.logprob[1:], dtype=np.float64))):
            bad = int(np.argmax(~np.isfinite(np.asarray(s.logprob[1:], dtype=np.float64)))) + 1
            raise ScoreError(
                f"non-finite logprob in sample {s.sample_id} at position {bad}: the checkpoint is broken"
            )
        cols["sample_id"].append(pa.array(np.full(n, s.sample_id, dtype=np.int32)))
        cols["position"].append(pa.array(np.arange(n, dtype=np.int32)))
        cols["token_id"].append(pa.array(np.asarray(s.token_ids, dtype=np.int32)))
        cols["logprob"].append(_null_first(np.asarray(s.logprob, dtype=np.float32), pa.float32()))
        cols["rank"].append(_null_first(np.asarray(s.rank, dtype=np.int32), pa.int32()))
        cols["top1_id"].append(_null_first(np.asarray(s.top1_id, dtype=np.int32), pa.int32()))
        cols["top1_logprob"].append(
            _null_first(np.asarray(s.top1_logprob, dtype=np.float32), pa.float32())
        )
        if topk > 1:
            ids = np.asarray(s.topk_ids, dtype=np.int32)
            lps = np.asarray(s.topk_logprobs, dtype=np.float32)
            mask = np.zeros(n, dtype=bool)
            mask[0] = True
            offsets = pa.array(np.arange(0, (n + 1) * ids.shape[1], ids.shape[1], dtype=np.int32))
            cols["topk_ids"].append(
                pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1)), mask=pa.array(mask))
            )
            cols["topk_logprobs"].append(
                pa.ListArray.from_arrays(offsets, pa.array(lps.reshape(-1)), mask=pa.array(mask))
            )
    schema = arrow_schema(topk)
    arrays = [
        pa.concat_arrays(cols[f.name]) if cols[f.name] else pa.array([], type=f.type) for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def atomic_write_table(table: pa.Table, path: Path, metadata: dict, before_rename=None) -> Path:
    """Write to a hidden temporary name in the same directory, fsync, then rename into place
    (``before_rename(tmp)`` runs on the complete temporary file just before)."""
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = json.dumps(metadata, sort_keys=True, default=str).encode()
    # Logprobs are almost all distinct floats: a dictionary page for them is a failed attempt that pyarrow
    # keeps beside the plain values (18 % of a top-20 file, and slower to read: bench/RESULTS.md).
    dictionary = [f.name for f in table.schema if not pa.types.is_floating(getattr(f.type, "value_type", f.type))]
    with atomic.atomic_file(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp, compression="zstd", use_dictionary=dictionary)
        if before_rename is not None:
            before_rename(tmp)
    return Path(path)


def _footer(path: Path) -> tuple[pa.Schema, dict]:
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a damaged footer
        raise ArchiveError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    meta = schema.metadata or {}
    if META_KEY not in meta:
        raise ArchiveError(f"{path}: no qscore metadata (not written by the score stage)")
    return schema, json.loads(meta[META_KEY])


def read_metadata(path: Path) -> dict:
    return _footer(path)[1]


def part_files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).glob("part-*.parquet"))


def discover(results_dir: str | os.PathLike) -> dict[str, dict[str, Path]]:
    """{label: {set: dataset directory}} of the published datasets under ``<results>/logprobs``."""
    return hive_dirs(Path(results_dir) / "logprobs", "dataset")


def hive_dirs(root: Path, key: str) -> dict[str, dict[str, Path]]:
    """{label: {name: directory}} of the ``model=<label>/<key>=<name>/`` directories that hold parts, as
    pyarrow.dataset's Hive discovery lists them: it skips hidden and ``_`` names (staging directories,
    lock files, temporaries) and opens no file."""
    if not root.is_dir():
        return {}
    import pyarrow.dataset as ds  # readers only: it imports pandas, seconds of every scoring job's start-up

    strings = pa.schema([("model", pa.string()), (key, pa.string()), ("shard", pa.string())])
    found: dict[str, dict[str, Path]] = {}
    for frag in ds.dataset(root, format="parquet", partitioning=ds.partitioning(strings, flavor="hive")
                           ).get_fragments():
        keys = ds.get_partition_keys(frag.partition_expression)
        if not re.fullmatch(r"part-\d+\.parquet", Path(frag.path).name) or not keys.get("model") or not keys.get(key):
            continue
        found.setdefault(keys["model"], {})[keys[key]] = root / f"model={keys['model']}" / f"{key}={keys[key]}"
    return {m: dict(sorted(sets.items())) for m, sets in sorted(found.items())}


def read_dataset(directory: Path, columns: Sequence[str] | None = None) -> tuple[pa.Table, dict]:
    """Read one (model, set) dataset: its parts, or the complete set of its shards merged.

    Every part must be intact and carry the same run fingerprint; shards must all come from one run
    (same set fingerprint), none missing, none twice, no text in two of them.
    """
    directory = Path(directory)
    shards = sorted(directory.glob("shard=*"))
    if shards:
        if part_files(directory):
            raise ArchiveError(f"{directory}: holds both an unsharded run and shards; delete one of them")
        return _read_shards(directory, shards, columns)
    return read_parts(directory, columns)


def read_parts(directory: Path, columns: Sequence[str] | None = None, *, required: Sequence[str] | None = None,
               schema_version: str | None = None, what: str = "dataset") -> tuple[pa.Table, dict]:
    """One run's parts in one directory: each intact, with the ``required`` columns (default: ``columns``,
    else the logprob schema's), of ``schema_version`` where given, all from one run (one fingerprint),
    and as many rows as the run recorded. The task archive reads its parts through this too."""
    parts = part_files(directory)
    if not parts:
        raise ArchiveError(f"{directory}: no part-*.parquet files")
    required = list(required or columns or REQUIRED_COLUMNS)
    meta0 = None
    schema0 = None
    for p in parts:
        schema, meta = _footer(p)
        missing = [c for c in required if c not in schema.names]
        if missing:
            raise ArchiveError(f"{p}: missing columns {missing}")
        if schema_version is not None and meta.get("schema_version") != schema_version:
            raise ArchiveError(f"{p}: not a {what} file of schema {schema_version!r} "
                               f"(schema {meta.get('schema_version')!r})")
        if meta0 is None:
            meta0, schema0 = meta, schema
        elif meta.get("fingerprint") != meta0.get("fingerprint"):
            raise ArchiveError(f"{p}: written by a different run than {parts[0].name} (settings differ)")
    # One scan of every part (pyarrow reads several at once, in the parts' order), without the partition
    # columns: the rows are the parts' own.
    import pyarrow.dataset as ds

    try:
        table = ds.dataset([str(p) for p in parts], schema=schema0, format="parquet").to_table(
            columns=list(columns) if columns else None)
    except Exception as exc:
        raise ArchiveError(f"{_corrupt_part(parts, columns) or directory}: corrupt Parquet file "
                           f"({first_line(exc)})") from None
    expected = meta0.get("counts", {}).get("rows_total")
    if expected is not None and table.num_rows != expected:
        raise ArchiveError(
            f"{directory}: {table.num_rows} rows but the run recorded {expected} (incomplete {what})"
        )
    return table, meta0


def _corrupt_part(parts: Sequence[Path], columns) -> Path | None:
    """Which part fails to read on its own (the scan's error need not name it)."""
    for p in parts:
        try:
            pq.read_table(p, columns=list(columns) if columns else None)
        except Exception:
            return p
    return None


def shard_problem(names: Sequence[str]) -> str | None:
    """Why shard directory names ``shard=i-of-N`` do not make one complete set (pure; None if they do)."""
    parsed = []
    for n in names:
        m = re.fullmatch(r"shard=(\d+)-of-(\d+)", n)
        if not m:
            return f"unexpected directory {n!r} (shards are named shard=i-of-N)"
        parsed.append((int(m.group(1)), int(m.group(2))))
    counts = sorted({c for _, c in parsed})
    if len(counts) > 1:
        return f"shards of different splits ({' and '.join(f'of-{c}' for c in counts)}) overlap"
    count = counts[0]
    missing = sorted(set(range(1, count + 1)) - {i for i, _ in parsed})
    if missing:
        return f"missing shard(s) {', '.join(f'{i}-of-{count}' for i in missing)}"
    return None


def _read_shards(directory: Path, shards: list[Path], columns: Sequence[str] | None) -> tuple[pa.Table, dict]:
    problem = shard_problem([d.name for d in shards])
    if problem:
        raise ArchiveError(f"{directory}: {problem}")
    tables, metas = [], []
    for d in shards:
        t, m = read_parts(d, list(dict.fromkeys(["sample_id", "position", *columns])) if columns else None)
        tables.append(t)
        metas.append(m)
    first = metas[0]
    for d, m in zip(shards[1:], metas[1:]):
        if m.get("set_fingerprint") != first.get("set_fingerprint"):
            raise ArchiveError(f"{d}: a shard of a different run than {shards[0].name} (settings differ)")
    seen: dict[int, str] = {}
    for d, t in zip(shards, tables):
        for sid in set(t.column("sample_id").to_pylist()):
            if sid in seen:
                raise ArchiveError(f"{directory}: text {sid} is in both {seen[sid]} and {d.name} (overlapping shards)")
            seen[sid] = d.name
    table = pa.concat_tables(tables)
    order = pa.compute.sort_indices(table, [("sample_id", "ascending"), ("position", "ascending")])
    table = table.take(order)
    if columns:
        table = table.select(list(columns))
    meta = {**first, "fingerprint": first.get("set_fingerprint"), "shard": None,
            "shards": [d.name for d in shards],
            "counts": {**first.get("counts", {}), "rows_total": table.num_rows,
                       "texts_total": sum(m.get("counts", {}).get("texts_total", 0) for m in metas)}}
    return table, meta
