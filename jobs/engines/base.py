"""The interface every backend offers the score and validate stages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np

from jobs.texts.sampling import Sample


@dataclass
class SequenceScores:
    """One scored sequence: arrays over positions 0..L-1; position 0 carries NaN/-1 (no context)."""

    sample_id: int
    token_ids: np.ndarray  # int, length L
    logprob: np.ndarray  # float, length L (index 0 ignored)
    rank: np.ndarray  # int, length L (index 0 ignored)
    top1_id: np.ndarray
    top1_logprob: np.ndarray
    topk_ids: np.ndarray | None = None  # (L, k)
    topk_logprobs: np.ndarray | None = None


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    logprobs: list[float]  # of each generated token


def runtime_info(backend: str, backend_version: str, dtype, device: str, kernel_path: str, **extra) -> dict:
    """The ``runtime`` provenance every backend records (SPEC §3), in one shape: what ran, on which GPU."""
    import torch

    info = {"backend": backend, "backend_version": backend_version, "torch_version": torch.__version__,
            "dtype": str(dtype).replace("torch.", ""), "device": device, "kernel_path": kernel_path}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, compute_capability=f"{props.major}.{props.minor}")
    return {**info, **extra}


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
