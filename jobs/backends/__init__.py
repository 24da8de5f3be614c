"""Scoring backends: the same interface over transformers and vLLM (see base.py)."""
from __future__ import annotations

from ..errors import SettingsError

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


def load(name: str, model_path, **options):
    name = pick(name)
    if name == "vllm":
        from .vllm import VllmBackend

        return VllmBackend(model_path, **options)
    from .hf import TransformersBackend

    return TransformersBackend(model_path, **options)
