"""Quantization recipes: scheme name → llm-compressor modifiers, the way llm-compressor's examples write them."""
from __future__ import annotations

from jobs.core.errors import SettingsError

# Schemes whose activations are quantized with static scales need calibration data; the others
# (weight-only, or dynamic per-token activations) are round-to-nearest on the weights alone.
SCHEMES = {
    "NVFP4": {"calibrate": True, "doc": "FP4 weights and activations, group 16, FP8 scales (W4A4)"},
    "NVFP4A16": {"calibrate": False, "doc": "FP4 weights only, group 16 (W4A16)"},
    "FP8_DYNAMIC": {"calibrate": False, "doc": "FP8 weights per channel, FP8 activations per token"},
    "FP8": {"calibrate": True, "doc": "FP8 weights and static per-tensor FP8 activations"},
    "W4A16": {"calibrate": False, "doc": "INT4 weights, group 128 (round to nearest; no GPTQ)"},
    "W8A16": {"calibrate": False, "doc": "INT8 weights, per channel"},
    "W8A8": {"calibrate": True, "doc": "INT8 weights and activations"},
}


def check_scheme(scheme: str) -> str:
    key = scheme.upper()
    if key not in SCHEMES:
        raise SettingsError(f"unknown scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    return key


def needs_calibration(scheme: str, no_calibration: bool) -> bool:
    return SCHEMES[check_scheme(scheme)]["calibrate"] and not no_calibration


def build(scheme: str, ignore: list[str], spinquant: bool = False) -> list:
    """SpinQuant's Hadamard rotations (R1, R2) go first so the quantizer sees the rotated weights."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    mods = []
    if spinquant:
        from llmcompressor.modifiers.transform import SpinQuantModifier

        mods.append(SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard"))
    mods.append(QuantizationModifier(targets="Linear", scheme=check_scheme(scheme), ignore=list(ignore)))
    return mods
