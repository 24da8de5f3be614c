"""Scoring backends: the same interface over transformers and vLLM (see base.py)."""
from __future__ import annotations

from jobs.checkpoints.checkpoint import Checkpoint
from jobs.core.errors import SettingsError
from jobs.core.settings import EngineOptions

BACKENDS = ("transformers", "vllm")


def pick(name: str) -> str:
    """``auto`` means vLLM where it is installed and a GPU is visible, else transformers."""
    if name != "auto":
        if name not in BACKENDS:
            raise SettingsError(f"unknown backend {name!r}: use auto, {', '.join(BACKENDS)}")
        return name
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    try:
        import torch

        return "vllm" if torch.cuda.is_available() else "transformers"
    except ImportError:
        return "transformers"


def arithmetic_for(name: str, quant, options: EngineOptions):
    """The arithmetic backend ``name`` will compute for ``quant`` under ``options`` (vLLM: on this machine's
    first GPU): resolved once per job, by the stage, and handed to the engine it loads."""
    from jobs.checkpoints.arithmetic import resolve

    name = pick(name)
    if name == "vllm":
        from jobs.engines.vllm import gpu_capability

        return resolve(quant, options.nvfp4_compute, backend=name, capability=gpu_capability())
    from jobs.engines.hf import with_activation_dtype

    return with_activation_dtype(resolve(quant, options.nvfp4_compute, backend=name), options)


def load(name: str, ckpt: Checkpoint, options: EngineOptions, *, arithmetic, expected_tokens: int | None = None):
    """A backend for the checkpoint the stage already inspected, computing the ``arithmetic`` it resolved.
    ``expected_tokens`` (how much will be scored) lets vLLM choose between eager and compiled execution."""
    name = pick(name)
    if name == "vllm":
        from jobs.engines.vllm import VllmBackend

        return VllmBackend(ckpt.path, options, arithmetic=arithmetic, expected_tokens=expected_tokens)
    from jobs.engines.hf import TransformersBackend

    return TransformersBackend(ckpt, options, arithmetic=arithmetic)
