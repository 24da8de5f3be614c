"""Checkpoint formats, left to the library that defines them: compressed-tensors reads its own format
and converts NVIDIA ModelOpt NVFP4 checkpoints into it (``ModelOptNvfp4Converter``), so qscore decodes
no FP4 bits itself."""
from __future__ import annotations

import logging
from pathlib import Path

from jobs.checkpoints import quantcheck
from jobs.checkpoints.checkpoint import Checkpoint
from jobs.core.errors import CheckpointError, first_line

log = logging.getLogger("qscore.formats")


def modelopt_to_compressed_tensors(ckpt: Checkpoint, dest: Path) -> Path:
    """Write ``ckpt`` (ModelOpt NVFP4) to ``dest`` in compressed-tensors' NVFP4 layout: the converter
    renames ``weight`` to ``weight_packed`` and inverts ``weight_scale_2`` / ``input_scale`` into
    global scales; the FP4 codes and FP8 group scales are copied, not re-quantized."""
    from compressed_tensors.entrypoints.convert import ModelOptNvfp4Converter, convert_checkpoint

    if ckpt.quant.method != "modelopt" or not ckpt.quant.is_nvfp4:
        raise CheckpointError(f"{ckpt.path}: not a ModelOpt NVFP4 checkpoint ({ckpt.quant.method} {ckpt.quant.scheme})")
    ignore = quantcheck.as_compressed_tensors_ignore(ckpt.quant.ignore)
    log.info("converting ModelOpt NVFP4 %s to compressed-tensors with compressed-tensors' converter", ckpt.path)
    import inspect

    # compressed-tensors 0.19 (llm-compressor's) can convert on a GPU and takes device=; 0.17 (vLLM's) cannot
    kw = {"device": "cpu"} if "device" in inspect.signature(convert_checkpoint).parameters else {}
    try:
        convert_checkpoint(str(ckpt.path), str(dest), ModelOptNvfp4Converter(ignore=ignore, targets=["Linear"]), **kw)
    except ValueError as exc:  # the converter's own validation: orphan scales, untargeted tensors
        raise CheckpointError(f"{ckpt.path}: compressed-tensors cannot convert it ({first_line(exc)[:300]})") from None
    return dest
