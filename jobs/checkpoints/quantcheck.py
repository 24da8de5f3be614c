"""Does a checkpoint's weight layout match what its config claims? Pure: reads names, dtypes and shapes.

A checkpoint that says NVFP4 but holds bf16 weights (a failed save, a hand-edited config) would load
in some engines and silently score the wrong model; this catches it before any GPU time is spent.
"""
from __future__ import annotations

import fnmatch
import re

from jobs.checkpoints.checkpoint import Quantization

NOT_LINEAR = re.compile(r"(embed|norm|\.bias$|rotary|\.wte\.|\.wpe\.)")


def matches_ignore(module: str, patterns: list[str], method: str | None) -> bool:
    """Does ``module`` match the checkpoint's ignore list, as the engines that load it read the list?

    The one matcher of the project: validation, the ModelOpt export's self-check and the conversion
    of ModelOpt checkpoints all use it, so they cannot disagree about which modules are ignored.
    - compressed-tensors: its own ``match_name`` (the exact name, or ``re:<regex>`` with re.match).
      Class names such as ``Linear`` cannot be checked from tensor names and never match here.
    - ModelOpt ``exclude_modules``: as vLLM's ``ModelOptQuantConfigBase.is_layer_excluded`` reads them:
      the exact name, a substring of the name, or an fnmatch wildcard.
    """
    if method == "compressed-tensors":
        return any(_ct_match(module, p) for p in patterns)
    return any(p == module or p in module or fnmatch.fnmatch(module, p) for p in patterns)


def _ct_match(module: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return module == pattern


def as_compressed_tensors_ignore(patterns: list[str]) -> list[str]:
    """ModelOpt exclude patterns rewritten as compressed-tensors ``re:`` patterns that match the same
    modules (substring or wildcard), for converting a ModelOpt checkpoint with compressed-tensors."""
    return [f"re:(?:.*{re.escape(p)}|{fnmatch.translate(p)})" for p in patterns]


def linear_modules(tensors: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{module: {suffix: info}} for modules that look like Linear layers (2-D weight or packed weight)."""
    mods: dict[str, dict[str, dict]] = {}
    for name, info in tensors.items():
        module, _, suffix = name.rpartition(".")
        mods.setdefault(module, {})[suffix] = info
    weight = {module: parts.get("weight") or parts.get("weight_packed") for module, parts in mods.items()}
    return {module: parts for module, parts in mods.items()
            if weight[module] is not None and len(weight[module]["shape"]) == 2 and not NOT_LINEAR.search(module + ".")}


def check(tensors: dict[str, dict], q: Quantization, expect_scheme: str | None = None) -> list[str]:
    """Problems found (empty when the layout matches the claim). Each is one line naming a module."""
    problems = []
    if expect_scheme and q.scheme.upper() != expect_scheme.upper():
        problems.append(f"config says {q.scheme}, expected {expect_scheme.upper()}")
    if q.method is None:
        return problems
    mods = linear_modules(tensors)
    if not mods:
        return problems + ["no Linear layers found in the weights"]
    quantized = 0
    for module, parts in sorted(mods.items()):
        ignored = matches_ignore(module, q.ignore, q.method)
        if ignored:
            w = parts.get("weight")
            if w is None or w["dtype"] not in ("BF16", "F16", "F32"):
                problems.append(f"{module} is listed as ignored but its weights are not plain floats")
            continue
        err = _check_layer(module, parts, q)
        if err:
            problems.append(err)
        else:
            quantized += 1
        if len(problems) >= 5:
            break
    if quantized == 0 and not problems:
        problems.append("no layer is quantized although the config says it is")
    return problems


def _check_layer(module: str, parts: dict[str, dict], q: Quantization) -> str | None:
    g = q.group_size
    w4a4 = q.is_nvfp4 and q.activation_bits == 4  # the activations' global scale is calibrated, so stored
    if q.method == "compressed-tensors" and q.is_nvfp4:
        wp, ws = parts.get("weight_packed"), parts.get("weight_scale")
        if wp is None:
            return f"{module}: config says {q.scheme} but the layer holds unpacked {parts.get('weight', {}).get('dtype')} weights"
        if w4a4 and "input_global_scale" not in parts:
            return f"{module}: config says W4A4 but the layer has no input_global_scale"
        return _fp4_layout(module, wp, ws, g, "weight_global_scale" in parts)
    if q.method == "modelopt" and q.is_nvfp4:
        w, ws = parts.get("weight"), parts.get("weight_scale")
        if w is None or w["dtype"] != "U8":
            return f"{module}: config says ModelOpt NVFP4 but the weight is {w and w['dtype']}, not packed uint8"
        if w4a4 and "input_scale" not in parts:
            return f"{module}: config says W4A4 but the layer has no input_scale"
        return _fp4_layout(module, w, ws, g, "weight_scale_2" in parts)
    if q.method == "compressed-tensors" and q.weight_bits == 8 and q.scheme.startswith("FP8"):
        w = parts.get("weight")
        if w is None or w["dtype"] != "F8_E4M3" or "weight_scale" not in parts:
            return f"{module}: config says {q.scheme} but the weight is {w and w['dtype']} without FP8 scales"
    if q.method == "compressed-tensors" and q.weight_bits == 4 and not q.is_nvfp4:
        if "weight_packed" not in parts or "weight_scale" not in parts:
            return f"{module}: config says {q.scheme} but the layer holds no packed INT4 weights"
    return None


def _fp4_layout(module, packed, scale, group, has_global) -> str | None:
    if packed["dtype"] != "U8":
        return f"{module}: packed FP4 weight is {packed['dtype']}, expected U8"
    if scale is None or scale["dtype"] != "F8_E4M3":
        return f"{module}: FP4 group scales are {scale and scale['dtype']}, expected F8_E4M3"
    if not has_global:
        return f"{module}: no global (second-level) scale"
    out, half = packed["shape"]
    cols = half * 2
    if scale["shape"][0] != out or scale["shape"][1] * (group or 16) != cols:
        actual = cols // scale["shape"][1] if scale["shape"][1] else "?"
        return f"{module}: group size {actual} in the weights, config says {group}"
    return None
