"""Every compile and JIT cache the scoring stack keeps, under one directory that outlives the container.

A container's HOME and /tmp vanish with it (``docker run --rm``), and so would ~2.5 minutes of JIT and
compile work per engine start (measured on an H100: FlashInfer's sampler JIT ~110 s, torch.compile
~35 s). Each variable below is where the pinned package itself looks (read in its source):
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_env(root: str | os.PathLike) -> dict[str, str]:
    root = Path(root)
    return {
        # vllm/envs.py: VLLM_CACHE_ROOT, default $XDG_CACHE_HOME/vllm; vllm/compilation keeps its
        # torch.compile artefacts there and points Inductor and Triton at sub-directories of it.
        "VLLM_CACHE_ROOT": str(root / "vllm"),
        # anything else that follows the XDG convention (e.g. a default ~/.cache)
        "XDG_CACHE_HOME": str(root),
        # torch/_inductor/runtime/cache_dir_utils.py: default /tmp/torchinductor_<user>
        "TORCHINDUCTOR_CACHE_DIR": str(root / "torchinductor"),
        # triton/knobs.py: default ~/.triton/cache
        "TRITON_CACHE_DIR": str(root / "triton"),
        # flashinfer/jit/env.py: <FLASHINFER_WORKSPACE_BASE>/.cache/flashinfer, default base $HOME
        "FLASHINFER_WORKSPACE_BASE": str(root),
        # the CUDA driver's PTX JIT cache, default ~/.nv/ComputeCache (256 MiB, too small to keep much)
        "CUDA_CACHE_PATH": str(root / "nv-compute"),
        "CUDA_CACHE_MAXSIZE": str(4 * 2**30),
        # vllm/v1/worker/startup_plan.py: keep the memory-profiling result under VLLM_CACHE_ROOT and
        # skip the profiling run on the next start of the same model and GPU.
        "VLLM_ENABLE_STARTUP_PLAN": "1",
    }


def _hf_home_writable() -> bool:
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    probe = home / "datasets"
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK)  # False on a read-only mount (EROFS) too


def use(root: str | os.PathLike | None) -> dict[str, str]:
    """Point the caches at ``root`` (created if missing), leaving any variable the user set alone."""
    if not root:
        return {}
    env = cache_env(root)
    if not _hf_home_writable():
        # datasets writes its Arrow cache even for a local file, under HF_HOME by default: with the HF cache
        # mounted read-only (a job that reads no hub model or set), that cache goes here instead
        env["HF_DATASETS_CACHE"] = str(Path(root) / "datasets")
    Path(root).mkdir(parents=True, exist_ok=True)
    applied = {}
    for key, value in env.items():
        if key not in os.environ:
            os.environ[key] = applied[key] = value
    return applied
