"""Dataset loaders for the bundled tasks (lm-eval's ``custom_dataset: !function loaders.jsonl_splits``).

The JSONL files sit next to this file, so the tasks work wherever ``data/tasks`` is (the repository,
a container's ``/data/tasks``) without the hub or the datasets cache.
"""
from __future__ import annotations

import json
from pathlib import Path


def jsonl_splits(data_file: str, **_metadata):
    """A DatasetDict with one split per value of the rows' ``split`` field."""
    import datasets

    rows: dict[str, list[dict]] = {}
    for line in (Path(__file__).resolve().parent / data_file).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.setdefault(row.pop("split"), []).append(row)
    return datasets.DatasetDict({name: datasets.Dataset.from_list(r) for name, r in rows.items()})
