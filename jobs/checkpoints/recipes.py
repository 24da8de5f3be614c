"""Quantization recipes: scheme name → llm-compressor modifiers, the way llm-compressor's examples write them."""
from __future__ import annotations

import re
from dataclasses import dataclass

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
    "W8A8": {"calibrate": False, "doc": "INT8 weights per channel, INT8 activations per token (dynamic)"},
    "MXFP4": {"calibrate": False, "doc": "FP4 weights and activations, group 32, power-of-two scales (W4A4)"},
    "MXFP4A16": {"calibrate": False, "doc": "FP4 weights only, group 32, power-of-two scales"},
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


# -- a sweep: the recipes one base model is quantized into (SWEEP, SWEEP_SEEDS) -----------------------------
SEED_SEP = ".s"  # <recipe>.s<seed>: one checkpoint of a recipe quantized once per calibration seed
_WORD = re.compile(r"(?P<scheme>[A-Za-z0-9_]+)(?P<spin>\+spinquant)?(?:@(?P<samples>[1-9][0-9]*))?")


@dataclass(frozen=True)
class SweepEntry:
    """One checkpoint of a sweep: a recipe quantized from the base model with one seed, or a ready one."""

    label: str  # the report's label: <recipe>, or <recipe>.s<seed> when the recipe has several seeds
    recipe: str  # the deploy table's row: nvfp4, nvfp4-spinquant, nvfp4-n256, or a ready checkpoint's label
    scheme: str | None = None  # None: a ready checkpoint (PATH), not quantized here
    spinquant: bool = False
    samples: int | None = None  # calibration samples (None: the stage's default)
    seed: int | None = None  # calibration seed (None: data-free, or one seed only)
    path: str | None = None  # a ready checkpoint's path or hub id
    first: bool = True  # the recipe's first checkpoint: the one its bench job measures


def parse_sweep(text: str, seeds_text: str = "") -> list[SweepEntry]:
    """SWEEP's words, ``SCHEME[+spinquant][@SAMPLES]`` or ``LABEL=PATH``, with SWEEP_SEEDS' seeds (pure).

    A recipe that calibrates is quantized once per seed; a data-free one once, since every seed would write
    the same checkpoint (its spread is zero by construction)."""
    seeds = []
    for word in seeds_text.split():
        if not re.fullmatch(r"[0-9]+", word):
            raise SettingsError(f"SWEEP_SEEDS: {word!r} is not a whole number >= 0")
        seeds.append(int(word))
    if len(set(seeds)) != len(seeds):
        raise SettingsError(f"SWEEP_SEEDS repeats a seed: {seeds_text.strip()!r}")
    out: list[SweepEntry] = []
    for word in text.split():
        label, sep, path = word.partition("=")
        if sep:
            if not label or not path:
                raise SettingsError(f"SWEEP entry {word!r} is not SCHEME[+spinquant][@SAMPLES] or LABEL=PATH")
            out.append(SweepEntry(label=label, recipe=label, path=path))
            continue
        m = _WORD.fullmatch(word)
        if not m:
            raise SettingsError(f"SWEEP entry {word!r} is not SCHEME[+spinquant][@SAMPLES] or LABEL=PATH")
        scheme = check_scheme(m["scheme"])
        samples = int(m["samples"]) if m["samples"] else None
        recipe = scheme.lower() + ("-spinquant" if m["spin"] else "") + (f"-n{samples}" if samples else "")
        calibrates = needs_calibration(scheme, False)
        if samples and not calibrates:
            raise SettingsError(f"SWEEP entry {word!r}: {scheme} takes no calibration data, so no @SAMPLES")
        runs = seeds if calibrates and len(seeds) > 1 else [seeds[0] if calibrates and seeds else None]
        for i, seed in enumerate(runs):
            lab = recipe + (f"{SEED_SEP}{seed}" if len(runs) > 1 else "")
            out.append(SweepEntry(label=lab, recipe=recipe, scheme=scheme, spinquant=bool(m["spin"]),
                                  samples=samples, seed=seed, first=i == 0))
    labels = [e.label for e in out]
    if len(set(labels)) != len(labels):
        raise SettingsError(f"SWEEP names a recipe twice: {sorted({x for x in labels if labels.count(x) > 1})}")
    return out


def recipe_of(label: str) -> str:
    """The recipe a sweep label belongs to: ``nvfp4.s43`` -> ``nvfp4``; any other label is its own (pure)."""
    m = re.fullmatch(r"(.+)" + re.escape(SEED_SEP) + r"[0-9]+", label)
    return m.group(1) if m else label
