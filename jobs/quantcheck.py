"""Does a checkpoint's weight layout match what its config claims? Pure: reads names, dtypes and shapes.

A checkpoint that says NVFP4 but holds bf16 weights (a failed save, a hand-edited config) would load
in some engines and silently score the wrong model; this catches it before any GPU time is spent.
"""
from __future__ import annotations

import fnmatch
import re

from .checkpoint import Quantization

NOT_LINEAR = re.compile(r"(embed|norm|\.bias$|rotary|\.wte\.|\.wpe\.)")


def _ignored(module: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], module):
                return True
        elif module == p or module.endswith("." + p) or fnmatch.fnmatch(module, p):
            return True
    return False


def linear_modules(tensors: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{module: {suffix: info}} for modules that look like Linear layers (2-D weight or packed weight)."""
    mods: dict[str, dict[str, dict]] = {}
    for name, info in tensors.items():
        module, _, suffix = name.rpartition(".")
        mods.setdefault(module, {})[suffix] = info
    out = {}
    for module, parts in mods.items():
        w = parts.get("weight") or parts.get("weight_packed")
        if w is None or len(w["shape"]) != 2 or NOT_LINEAR.search(module + "."):
            continue
        out[module] = parts
    return out


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
        ignored = _ignored(module, q.ignore)
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
    if q.method == "compressed-tensors" and q.is_nvfp4:
        wp, ws = parts.get("weight_packed"), parts.get("weight_scale")
        if wp is None:
            return f"{module}: config says {q.scheme} but the layer holds unpacked {parts.get('weight', {}).get('dtype')} weights"
        return _fp4_layout(module, wp, ws, g, "weight_global_scale" in parts)
    if q.method == "modelopt" and q.is_nvfp4:
        w, ws = parts.get("weight"), parts.get("weight_scale")
        if w is None or w["dtype"] != "U8":
            return f"{module}: config says ModelOpt NVFP4 but the weight is {w and w['dtype']}, not packed uint8"
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
