"""The fingerprint every archive directory carries: what its run's output depends on, hashed.

A rerun with the same fingerprint skips the finished output, with another it is refused (or replaced with
--overwrite); readers check that all parts of a directory carry one. The score and tasks stages compute it
here, from the fields they list."""
from __future__ import annotations

import hashlib
import json


def fingerprint(fields: dict) -> str:
    """16 hex digits of the SHA-256 of ``fields`` as canonical JSON (sorted keys; str() for other types)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
