"""What a long stage says while it works, on a terminal and in a batch log (a container's, a pod's, Slurm's).

tqdm draws bars on a terminal and nothing elsewhere (``disable=None``); a batch log gets instead one line
per finished part, at most one per ``every`` seconds, with parts done/total, tokens/s and the ETA.
Third-party bars and warnings (llm-compressor's calibration bars arrive in a log as one line of several
KB) stay out of batch logs unless LOG_LEVEL=DEBUG asks for them.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
import warnings

EVERY_S = 30.0  # at most one progress line per this many seconds in a batch log (the first and last always)


def on_terminal() -> bool:
    return sys.stderr.isatty()


@functools.lru_cache(maxsize=1)
def _nowhere():
    return open(os.devnull, "w")


def quiet_third_party() -> None:
    """In a batch log: no library progress bars, no library warnings (they stay on a terminal, and with DEBUG)."""
    if on_terminal() or logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if not getattr(init, "_qscore_quiet", False):
        # Every bar drawn to nowhere, whatever its library asks (compressed-tensors passes disable=False); tqdm's
        # TQDM_DISABLE would have to be set before tqdm is first imported, and is overridden by an explicit value.
        # Not disabled: a disabled bar keeps no time, and vLLM divides by its elapsed seconds (ZeroDivisionError
        # in LLM.generate under lm-eval, seen on the H200).
        @functools.wraps(init)
        def quiet(self, *args, **kwargs):
            kwargs["file"] = _nowhere()
            init(self, *args, **kwargs)

        quiet._qscore_quiet = True
        tqdm.std.tqdm.__init__ = quiet
    warnings.filterwarnings("ignore")
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")  # its loguru console, read when it is imported
    for name in ("transformers", "datasets", "huggingface_hub", "torch", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class PartProgress:
    """One line per finished part (at most one per ``every`` seconds) for batch logs."""

    def __init__(self, log: logging.Logger, what: str, parts_total: int, parts_done: int, tokens_todo: int,
                 every: float = EVERY_S, now=time.monotonic):
        self.log, self.what, self.total, self.done = log, what, parts_total, parts_done
        self.tokens_todo, self.tokens = tokens_todo, 0
        self.every, self.now = every, now
        self.t0 = now()
        self.last: float | None = None

    def line(self) -> str:
        elapsed = max(self.now() - self.t0, 1e-9)
        rate = self.tokens / elapsed
        eta = clock((self.tokens_todo - self.tokens) / rate) if rate > 0 else "?"
        return f"{self.what}: {self.done}/{self.total} parts, {rate:,.0f} tokens/s, ETA {eta}"

    def part(self, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        t = self.now()
        if self.last is None or self.done == self.total or t - self.last >= self.every:
            self.last = t
            self.log.info("%s", self.line())
