"""The failures a stage reports as one line (bad input, not bugs): see cli.stage."""
from .evalsets import EvalSetError
from .hub import CheckpointError, OfflineError
from .metrics import TokenStreamMismatch
from .schema import ArchiveError
from .stages.aggregate import AggregateError
from .stages.quantize import QuantizeError
from .stages.score import ScoreError
from .stages.validate import ValidationError

KNOWN = (CheckpointError, OfflineError, EvalSetError, TokenStreamMismatch, ArchiveError, AggregateError,
         QuantizeError, ScoreError, ValidationError, ValueError)
