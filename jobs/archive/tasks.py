"""The task-accuracy archive: lm-evaluation-harness's per-sample records as Parquet, with provenance.

A finished task lives at ``<results>/tasks/model=<label>/task=<task>/part-<k>.parquet`` (Hive layout,
like the logprob archive). One row per (document, filter): gsm8k's two answer extractions
(``strict-match``, ``flexible-extract``) give two rows per question. Columns:

    doc_id          lm-eval's document index in the task's evaluation split
    filter          the lm-eval filter the row's response and metrics come from ("none" if the task has none)
    doc_hash        lm-eval's hash of the document (pairs a model's rows with the baseline's)
    prompt_hash     lm-eval's hash of the first request's prompt (few-shot context, chat template)
    target          the reference answer as lm-eval renders it (a choice index for multiple choice)
    response        generate_until: the filtered answer; multiple choice: the text of the chosen option
    raw_response    generate_until: the model's whole generation; null otherwise
    choice          multiple choice: index of the option of highest loglikelihood; null otherwise
    choice_logprobs multiple choice: loglikelihood of every option, in order; null otherwise
    correct         the task's first metric equals 1 (null when that metric is not 0/1)
    <metric>        one float64 column per metric of the task (acc, acc_norm, exact_match, ...)

The Parquet metadata under the key ``qscore`` (as in ``logprobs.py``) holds the run's provenance. A task
directory is written whole into a hidden temporary sibling and renamed into place, so readers never
see a partial task; interrupting a run loses at most the task being evaluated.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from jobs.core import atomic
from jobs.archive import logprobs
from jobs.core.errors import ArchiveError

SCHEMA_VERSION = "tasks-1"
META_KEY = logprobs.META_KEY
PART_ROWS = 50_000  # rows per Parquet part; lm-eval tasks rarely have more than a few thousand documents

BASE_FIELDS = [
    pa.field("doc_id", pa.int64(), nullable=False),
    pa.field("filter", pa.string(), nullable=False),
    pa.field("doc_hash", pa.string()),
    pa.field("prompt_hash", pa.string()),
    pa.field("target", pa.string()),
    pa.field("response", pa.string()),
    pa.field("raw_response", pa.string()),
    pa.field("choice", pa.int32()),
    pa.field("choice_logprobs", pa.list_(pa.float64())),
    pa.field("correct", pa.bool_()),
]
BASE_COLUMNS = [f.name for f in BASE_FIELDS]


def task_dir(results_dir: str | os.PathLike, label: str, task: str) -> Path:
    return Path(results_dir) / "tasks" / f"model={logprobs.check_label('model label', label)}" / (
        f"task={logprobs.check_label('task name', task)}")


def arrow_schema(metric_names: list[str]) -> pa.Schema:
    clash = [m for m in metric_names if m in BASE_COLUMNS]
    if clash:
        raise ArchiveError(f"metric names {clash} clash with the archive's own columns")
    return pa.schema(BASE_FIELDS + [pa.field(m, pa.float64()) for m in metric_names])


def rows_to_table(rows: list[dict], metric_names: list[str]) -> pa.Table:
    s = arrow_schema(metric_names)
    return pa.Table.from_pylist([{name: r.get(name) for name in s.names} for r in rows], schema=s)


def write_task(final: Path, table: pa.Table, metadata: dict, part_rows: int = PART_ROWS) -> Path:
    """Write ``table`` as part-00000.parquet, part-00001.parquet, ... into ``final`` in one rename."""
    n_parts = max(1, -(-table.num_rows // part_rows))
    meta = {**metadata, "counts": {**metadata.get("counts", {}), "rows_total": table.num_rows,
                                   "parts_total": n_parts}}
    with atomic.atomic_dir(final) as tmp:
        for k in range(n_parts):
            part = table.slice(k * part_rows, part_rows)
            logprobs.atomic_write_table(part, tmp / f"part-{k:05d}.parquet", {**meta, "part": {"index": k}})
    return final


def read_fingerprint(directory: Path) -> str | None:
    parts = logprobs.part_files(directory)
    return logprobs.read_metadata(parts[0]).get("fingerprint") if parts else None


def read_task(directory: Path) -> tuple[pa.Table, dict]:
    """One model's task: every part intact, from one run, and as many rows as the run recorded."""
    parts = logprobs.part_files(Path(directory))
    metrics = [m["name"] for m in logprobs.read_metadata(parts[0]).get("metrics", [])] if parts else []
    return logprobs.read_parts(Path(directory), required=BASE_COLUMNS + metrics, schema_version=SCHEMA_VERSION,
                             what="task")


def discover(results_dir: str | os.PathLike) -> dict[str, dict[str, Path]]:
    """{label: {task: directory}} of finished tasks (hidden temporary directories are not listed)."""
    return logprobs.hive_dirs(Path(results_dir) / "tasks", "task")
