"""Where a job's wall time went: start-up and imports, reading and tokenizing, engine start, scoring,
writing, shutdown (SPEC §4 ``phases``). A sweep pays each job's fixed cost once per checkpoint, so the job
says how much of its wall time was fixed cost, in its Parquet metadata and as one ``phases`` log line.

Start-up runs from the process's own start (the kernel's clock, so the interpreter's imports count) to the
stage's first phase, plus the heavy imports a stage times as such (transformers, vLLM's platform module).
Everything else belongs to a named phase or to ``other``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time

ORDER = ("startup", "read", "engine_start", "score", "write", "shutdown")


def start_ticks(pid: int | str = "self") -> str:
    """When a process started, in clock ticks since boot (/proc/<pid>/stat, field 22); OSError if it is gone."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[19]  # after the command name, which may hold spaces


def process_age_s() -> float | None:
    """Seconds since this process started, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - int(start_ticks()) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """A stopwatch per phase; ``startup`` is taken when it is made (make it where the stage starts)."""

    def __init__(self):
        self._t0 = time.perf_counter() - (process_age_s() or 0.0)
        self.seconds: dict[str, float] = {"startup": time.perf_counter() - self._t0}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def snapshot(self) -> dict[str, float]:
        """The phases so far, in ORDER, with ``wall`` (process start to now) and ``other`` (the rest)."""
        wall = time.perf_counter() - self._t0
        named = {k: round(self.seconds[k], 3) for k in sorted(self.seconds, key=_order)}
        return {**named, "other": round(max(0.0, wall - sum(self.seconds.values())), 3), "wall": round(wall, 3)}

    def log(self, logger: logging.Logger, what: str) -> dict[str, float]:
        snap = self.snapshot()
        logger.info("phases %s %s", what, json.dumps(snap))
        return snap


def _order(name: str) -> tuple[int, str]:
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)
