"""The interface every backend offers the score and validate stages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

from ..sampling import Sample
from ..schema import SequenceScores


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    logprobs: list[float]  # of each generated token


class Backend(Protocol):
    name: str

    def score(self, samples: Sequence[Sample], topk: int = 1) -> Iterator[SequenceScores]:
        """Per-token logprobs of each sample's own tokens, yielded in the order of ``samples``."""

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        """Greedy continuations of already-templated prompts."""

    def describe(self) -> dict:
        """Provenance: backend, version, dtype, device, GPU name and capability, kernel path."""

    def close(self) -> None:
        """Release the model (and the engine's processes)."""
