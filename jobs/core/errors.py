"""The one family of known failures: bad input a stage reports as one line and exit status 1.

Anything else (a bug, a library's surprise) is not caught by the CLI and shows its traceback. Every
module raises these from here, so this module imports nothing of qscore's.
"""


class QscoreError(Exception):
    """Known bad input or an unusable environment: cli.stage prints ``error: <message>`` and exits 1."""


class SettingsError(QscoreError):
    """An option value that cannot work (a label that cannot name a directory, a context too small…)."""


class CheckpointError(QscoreError):
    """A model reference that is missing, not a checkpoint, or unreadable."""


class OfflineError(QscoreError):
    """A hub download was needed while the hub is unreachable or switched off."""


class EvalSetError(QscoreError):
    """An evaluation or calibration set that is missing, unreadable or empty."""


class TokenStreamMismatch(QscoreError):
    """Two models were scored on different token streams: their numbers cannot be paired."""


class ArchiveError(QscoreError):
    """A logprob file or dataset that cannot be trusted: missing, truncated, corrupt or inconsistent."""


class LockError(QscoreError):
    """An output another run is writing at this moment (jobs/core/locks.py)."""


class QuantizeError(QscoreError):
    pass


class ScoreError(QscoreError):
    pass


class ValidationError(QscoreError):
    pass


class AggregateError(QscoreError):
    pass


class BenchError(QscoreError):
    """The serving benchmark could not measure: the server did not start, or vLLM's benchmark failed."""


def first_line(exc: BaseException) -> str:
    """An exception's message as one line, for the one-line errors above (its type when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
