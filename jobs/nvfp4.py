"""NVFP4 (FP4 e2m1 values, FP8 e4m3 scales per group of 16, one FP32 scale per tensor) in pure torch.

Two on-disk layouts of the same numbers, read here into plain dense state dicts:

compressed-tensors ``nvfp4-pack-quantized`` (llm-compressor), per quantized Linear ``X``:
    X.weight_packed        uint8 [out, in/2]    two e2m1 codes per byte, element 2j in the LOW nibble
    X.weight_scale         float8_e4m3fn [out, in/16]
    X.weight_global_scale  float32 [1]          a DIVISOR: w = e2m1 * (weight_scale / weight_global_scale)
                                                (= 448*6 / amax(W) when calibrated)
    X.input_global_scale   float32 [1]          (W4A4 only) likewise a divisor, 448*6 / amax(x)
  Source: compressed_tensors/compressors/nvfp4/helpers.py (pack_fp4_to_uint8 / unpack_fp4_from_uint8:
  ``packed = idx[:, 0] | idx[:, 1] << 4``), compressors/nvfp4/base.py (decompress) and
  quantization/lifecycle/forward_helpers.py (``_dequantize``: ``scale = scale / global_scale``).

ModelOpt NVFP4 (nvidia-modelopt ``export_hf_checkpoint``; e.g. nvidia/Qwen3-14B-NVFP4), per Linear ``X``:
    X.weight               uint8 [out, in/2]    same codes and nibble order as above
    X.weight_scale         float8_e4m3fn [out, in/16]
    X.weight_scale_2       float32 []           a MULTIPLIER: w = e2m1 * weight_scale * weight_scale_2
                                                (= amax(W) / (6*448))
    X.input_scale          float32 []           (W4A4) amax(x) / (6*448)
  Source: modelopt/torch/quantization/qtensor/nvfp4_tensor.py (NVFP4QTensor.quantize: ``packed =
  q[..., 1::2] << 4 | q[..., 0::2]``; dequantize: ``e2m1 * scale.float() * double_scale``), and
  compressed_tensors/entrypoints/convert/converters/modelopt_nvfp4.py (weight_global_scale =
  1 / weight_scale_2, input_global_scale = 1 / input_scale), which cites vLLM's modelopt.py.

The 4-bit code: bit 3 is the sign, bits 0-2 index [0, 0.5, 1, 1.5, 2, 3, 4, 6].
Dequantisation is done in float32 and cast to ``dtype`` last, which reproduces both libraries' own
dequantisation bit for bit.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

__all__ = [
    "E2M1_VALUES",
    "E2M1_MAX",
    "FP8_E4M3_MAX",
    "DEFAULT_GROUP_SIZE",
    "FORMATS",
    "unpack_fp4",
    "pack_fp4",
    "e2m1_codes",
    "quantize_nvfp4",
    "dequantize_compressed_tensors",
    "dequantize_modelopt",
    "dequantize_state_dict",
    "TensorMeta",
    "LayerInfo",
    "read_safetensors_meta",
    "detect_format",
    "detect_tensor_format",
    "describe_layers",
    "summarize_layers",
    "matches_ignore",
    "check_quantization_claims",
    "iter_dequantized",
    "load_dequantized_state_dict",
]

#: value of each 4-bit e2m1 code (bit 3 = sign); code 8 is -0.0
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)
E2M1_MAX = 6.0
FP8_E4M3_MAX = 448.0
DEFAULT_GROUP_SIZE = 16
FORMATS = ("compressed-tensors", "modelopt")

# rounding thresholds between consecutive magnitudes; ties at 0.75, 1.75, 3.5 round up (to the even
# mantissa), ties at 0.25, 1.25, 2.5, 5 round down: round-half-to-even, as both libraries do.
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
_E2M1_ODD_BOUNDS = torch.tensor([0.75, 1.75, 3.5], dtype=torch.float32)

_FP8_SCALE_DTYPES = (torch.float8_e4m3fn,)
# tensors that only parametrise quantized kernels: dropped from a dequantised state dict
_QUANT_ONLY_SUFFIXES = (
    "input_scale",
    "input_global_scale",
    "input_zero_point",
    "output_scale",
    "weight_zero_point",
    "weight_shape",
    "k_scale",
    "v_scale",
    "q_scale",
    "prob_scale",
)


# ---------------------------------------------------------------------------------------------------
# e2m1 codes, packing


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` to the nearest e2m1 value (ties to even, |x| > 6 saturates) and return 4-bit codes."""
    x = x.float()
    sign = (x < 0).to(torch.uint8)
    mag = x.abs()
    bounds = _E2M1_BOUNDS.to(x.device)
    idx = torch.searchsorted(bounds, mag.contiguous(), out_int32=True).to(torch.uint8)
    tie_up = (mag.unsqueeze(-1) == _E2M1_ODD_BOUNDS.to(x.device)).any(-1).to(torch.uint8)
    return (sign << 3) | (idx + tie_up)


def pack_fp4(values: torch.Tensor) -> torch.Tensor:
    """Pack e2m1 values (floats that are exactly representable) two per byte along the last dim.

    Element ``2j`` goes to the low nibble of byte ``j``, element ``2j+1`` to the high nibble; -0.0
    keeps its sign bit (code 8), as compressed-tensors packs it, so unpack -> pack is byte-exact.
    """
    if values.ndim == 0 or values.shape[-1] % 2:
        raise ValueError(f"pack_fp4: last dimension must be even, got shape {tuple(values.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"pack_fp4: expected floating-point e2m1 values, got {values.dtype}")
    codes = e2m1_codes(values) | (torch.signbit(values).to(torch.uint8) << 3)
    exact = E2M1_VALUES.to(values.device)[codes.long()] == values.float()
    if not bool(exact.all()):
        bad = values.flatten()[(~exact).flatten()][:3].tolist()
        raise ValueError(f"pack_fp4: values are not e2m1-representable (e.g. {bad}); quantize first")
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_fp4(
    packed: torch.Tensor, shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unpack uint8 bytes holding two e2m1 codes each into floats: ``[..., n/2] -> [..., n]``.

    ``shape``, when given, is the expected unpacked shape (its last dim is twice the packed one).
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_fp4: packed FP4 must be uint8, got {packed.dtype}")
    if packed.ndim == 0:
        raise ValueError("unpack_fp4: packed FP4 must have at least one dimension")
    out_shape = (*packed.shape[:-1], packed.shape[-1] * 2)
    if shape is not None and tuple(int(s) for s in shape) != out_shape:
        raise ValueError(
            f"unpack_fp4: packed shape {tuple(packed.shape)} unpacks to {out_shape}, not {tuple(shape)}"
        )
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(out_shape)
    return E2M1_VALUES.to(packed.device)[codes.long()].to(dtype)


# ---------------------------------------------------------------------------------------------------
# quantisation (round to nearest, as ModelOpt's max calibration does for weights)


def quantize_nvfp4(
    weight: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    global_scale: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """RTN NVFP4 quantisation of ``weight`` ([..., in], groups of ``group_size`` along ``in``).

    ``global_scale`` is the per-tensor scale in ModelOpt's convention (``weight_scale_2``, a
    multiplier, default ``amax(W) / (6*448)``); pass a shared one for fused layers (q/k/v, gate/up).
    Follows ModelOpt's ``NVFP4QTensor``: block scale = block amax / (6 * weight_scale_2), zero blocks
    get scale 1, clamped to [2**-9, 448] and cast to fp8 e4m3; codes = round(w / (scale * scale_2)).

    Returns ``weight_packed`` (uint8 [..., in/2]), ``weight_scale`` (fp8 [..., in/group]),
    ``weight_scale_2`` (fp32 [], ModelOpt), ``weight_global_scale`` (fp32 [1] = 1/weight_scale_2,
    compressed-tensors) and ``dequantized`` (fp32, the weight the checkpoint will represent).
    """
    if weight.ndim < 2:
        raise ValueError(f"quantize_nvfp4: weight must be at least 2-D, got shape {tuple(weight.shape)}")
    if group_size <= 0 or group_size % 2 or weight.shape[-1] % group_size:
        raise ValueError(
            f"quantize_nvfp4: in_features {weight.shape[-1]} is not a multiple of group_size {group_size}"
        )
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_nvfp4: weight holds inf/nan")
    if global_scale is None:
        amax = w.abs().max()
        scale_2 = amax / (E2M1_MAX * FP8_E4M3_MAX)
    else:
        scale_2 = torch.as_tensor(global_scale, dtype=torch.float32, device=w.device)
        if scale_2.numel() != 1:
            raise ValueError(f"quantize_nvfp4: global_scale must be a scalar, got shape {tuple(scale_2.shape)}")
    scale_2 = scale_2.reshape(()).float()
    if not bool(scale_2 > 0) or not bool(torch.isfinite(scale_2)):
        scale_2 = torch.ones((), dtype=torch.float32, device=w.device)  # all-zero weight
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    per_block = blocks.abs().amax(dim=-1) / (E2M1_MAX * scale_2)
    per_block = torch.where(per_block == 0, torch.ones_like(per_block), per_block)
    weight_scale = per_block.clamp(min=2.0**-9, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    effective = weight_scale.float() * scale_2
    codes = e2m1_codes(blocks / effective.unsqueeze(-1)).reshape(w.shape)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    deq = (E2M1_VALUES.to(w.device)[codes.long()].reshape(blocks.shape) * effective.unsqueeze(-1)).reshape(
        w.shape
    )
    return {
        "weight_packed": packed,
        "weight_scale": weight_scale,
        "weight_scale_2": scale_2.clone(),
        "weight_global_scale": (1.0 / scale_2).reshape(1),
        "dequantized": deq,
    }


# ---------------------------------------------------------------------------------------------------
# dequantisation


def _check_nvfp4(packed: torch.Tensor, scale: torch.Tensor, what: str) -> int:
    """Validate packed weight + block scale; return the group size."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"{what}: packed weight must be uint8, got {packed.dtype}")
    if packed.ndim < 2:
        raise ValueError(f"{what}: packed weight must be at least 2-D, got shape {tuple(packed.shape)}")
    if not (scale.dtype in _FP8_SCALE_DTYPES or scale.is_floating_point()):
        raise ValueError(f"{what}: weight_scale must be float8_e4m3fn (or float), got {scale.dtype}")
    if scale.ndim != packed.ndim or tuple(scale.shape[:-1]) != tuple(packed.shape[:-1]):
        raise ValueError(
            f"{what}: weight_scale shape {tuple(scale.shape)} does not match packed weight "
            f"{tuple(packed.shape)} (expected [..., {packed.shape[-2]}, in/group])"
        )
    n_in = packed.shape[-1] * 2
    if scale.shape[-1] == 0 or n_in % scale.shape[-1]:
        raise ValueError(
            f"{what}: in_features {n_in} is not a multiple of the {scale.shape[-1]} block scales per row"
        )
    return n_in // scale.shape[-1]


def _scalar(t: torch.Tensor | float | None, name: str, what: str) -> torch.Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t)
    if t.numel() != 1:
        raise ValueError(f"{what}: {name} must hold one value, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{what}: {name} must be floating point, got {t.dtype}")
    return t.reshape(()).float()


def _dequant(packed: torch.Tensor, multiplier: torch.Tensor, dtype: torch.dtype, group: int) -> torch.Tensor:
    values = unpack_fp4(packed)  # fp32
    blocks = values.reshape(*values.shape[:-1], values.shape[-1] // group, group)
    return (blocks * multiplier.unsqueeze(-1)).reshape(values.shape).to(dtype)


def dequantize_compressed_tensors(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor | float | None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """compressed-tensors NVFP4: ``w = e2m1 * (weight_scale / weight_global_scale)``, in fp32 then ``dtype``."""
    return _dequant_two_level(weight_packed, weight_scale, weight_global_scale, dtype,
                              "compressed-tensors NVFP4", "weight_global_scale", divide=True)


def dequantize_modelopt(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor | float | None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """ModelOpt NVFP4: ``w = e2m1 * weight_scale * weight_scale_2``, in fp32 then ``dtype``."""
    return _dequant_two_level(weight, weight_scale, weight_scale_2, dtype, "ModelOpt NVFP4", "weight_scale_2",
                              divide=False)


def _dequant_two_level(packed, group_scale, tensor_scale, dtype, what: str, scale_name: str,
                       divide: bool) -> torch.Tensor:
    """The two formats differ only in how the per-tensor scale is stored: compressed-tensors keeps its
    reciprocal (global scale), ModelOpt the scale itself."""
    group = _check_nvfp4(packed, group_scale, what)
    t = _scalar(tensor_scale, scale_name, what)
    scale = group_scale.float()
    if t is not None:
        t = t.to(scale.device)
        scale = scale / t if divide else scale * t
    return _dequant(packed, scale, dtype, group)


def _dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor | None, dtype, what: str) -> torch.Tensor:
    """FP8 weights (ModelOpt FP8 layers of mixed checkpoints): per-tensor or per-channel scale."""
    w = weight.float()
    if scale is None:
        return w.to(dtype)
    s = scale.float()
    if s.numel() == 1:
        return (w * s.reshape(())).to(dtype)
    if s.numel() == w.shape[0]:
        return (w * s.reshape(-1, *([1] * (w.ndim - 1)))).to(dtype)
    raise ValueError(f"{what}: FP8 weight_scale shape {tuple(scale.shape)} fits neither per-tensor nor per-channel")


def _split(name: str) -> tuple[str, str]:
    mod, _, leaf = name.rpartition(".")
    return mod, leaf


def dequantize_state_dict(
    tensors: Mapping[str, torch.Tensor], fmt: str, dtype: torch.dtype | None = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Turn a whole checkpoint's tensors into a plain state dict (``X.weight`` dense) of ``dtype``.

    ``fmt`` is ``"compressed-tensors"`` or ``"modelopt"``. Quantized modules get a dense ``X.weight``;
    their scales (and activation / kv-cache scales, meaningless without quantized kernels) are
    dropped; every other tensor is kept, floating ones cast to ``dtype`` (``None``: kept as they are,
    dequantised weights in float32). Must be given all of a module's tensors at once (they may sit in
    different shards).
    """
    if fmt not in FORMATS:
        raise ValueError(f"dequantize_state_dict: unknown format {fmt!r}; expected one of {FORMATS}")
    out_dtype = dtype or torch.float32
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    if fmt == "compressed-tensors":
        for name, t in tensors.items():
            mod, leaf = _split(name)
            if leaf != "weight_packed":
                continue
            if t.dtype != torch.uint8:
                raise ValueError(
                    f"{name}: weight_packed is {t.dtype}, not uint8: not nvfp4-pack-quantized "
                    "(int4 pack-quantized is not supported here)"
                )
            scale = tensors.get(f"{mod}.weight_scale")
            if scale is None:
                raise ValueError(f"{mod}: weight_packed without weight_scale")
            if scale.dtype == torch.uint8:
                raise ValueError(f"{mod}: uint8 (e8m0) block scales are MXFP4, not NVFP4")
            g = tensors.get(f"{mod}.weight_global_scale")
            try:
                out[f"{mod}.weight"] = dequantize_compressed_tensors(t, scale, g, out_dtype)
            except ValueError as exc:
                raise ValueError(f"{mod}: {exc}") from None
            used.update({name, f"{mod}.weight_scale", f"{mod}.weight_global_scale"})
        for name, t in tensors.items():  # FP8 layers of mixed-precision checkpoints
            mod, leaf = _split(name)
            if leaf == "weight" and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                out[name] = _dequantize_fp8(t, tensors.get(f"{mod}.weight_scale"), out_dtype, mod)
                used.update({name, f"{mod}.weight_scale"})
    else:
        for name, t in tensors.items():
            mod, leaf = _split(name)
            if leaf != "weight" or f"{mod}.weight_scale" not in tensors:
                continue
            scale = tensors[f"{mod}.weight_scale"]
            s2 = tensors.get(f"{mod}.weight_scale_2")
            if t.dtype == torch.uint8:
                if s2 is None:
                    raise ValueError(f"{mod}: packed NVFP4 weight without weight_scale_2")
                try:
                    w = dequantize_modelopt(t, scale, s2, torch.float32)
                except ValueError as exc:
                    raise ValueError(f"{mod}: {exc}") from None
            elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                w = _dequantize_fp8(t, scale, torch.float32, mod)
            else:
                continue  # a dense weight that happens to sit next to a "weight_scale": leave it
            pqs = tensors.get(f"{mod}.pre_quant_scale")
            if pqs is not None:  # AWQ-style smoothing: y = W (x * s) = (W * s[None, :]) x
                if pqs.numel() != w.shape[-1]:
                    raise ValueError(f"{mod}: pre_quant_scale has {pqs.numel()} values for {w.shape[-1]} inputs")
                w = w * pqs.float().reshape(-1)
                used.add(f"{mod}.pre_quant_scale")
            out[f"{mod}.weight"] = w.to(out_dtype)
            used.update({name, f"{mod}.weight_scale", f"{mod}.weight_scale_2"})
    for name, t in tensors.items():
        if name in used or name in out:
            continue
        if _split(name)[1] in _QUANT_ONLY_SUFFIXES:
            continue
        out[name] = t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
    return out


# ---------------------------------------------------------------------------------------------------
# describing a checkpoint from names / shapes / dtypes (no tensor data needed)

_SAFETENSORS_DTYPES = {
    "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}
_FLOAT_NAMES = {"float16", "bfloat16", "float32", "float64"}


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str  # torch's name without "torch.", e.g. "uint8", "float8_e4m3fn", "bfloat16"
    file: str | None = None


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    s = str(dtype)
    return _SAFETENSORS_DTYPES.get(s, s.removeprefix("torch."))


def _meta(value: Any) -> TensorMeta:
    if isinstance(value, TensorMeta):
        return value
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), _dtype_name(value.dtype))
    if isinstance(value, Mapping):
        return TensorMeta(tuple(int(s) for s in value["shape"]), _dtype_name(value["dtype"]), value.get("file"))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return TensorMeta(tuple(int(s) for s in value[0]), _dtype_name(value[1]))
    raise ValueError(f"cannot read a tensor description from {type(value).__name__}")


def read_safetensors_meta(model_dir: str | Path) -> dict[str, TensorMeta]:
    """Names, shapes and dtypes of every tensor of a checkpoint dir, from the safetensors headers."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{root}: no .safetensors files")
    out: dict[str, TensorMeta] = {}
    for fname in files:
        with open(root / fname, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = TensorMeta(tuple(info["shape"]), _dtype_name(info["dtype"]), fname)
    return out


def detect_format(quant_config: Mapping[str, Any] | None) -> str | None:
    """``"compressed-tensors"`` / ``"modelopt"`` from a config.json ``quantization_config`` (or an
    hf_quant_config.json, which has a ``quantization`` block), else None."""
    if not quant_config:
        return None
    method = str(quant_config.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method.startswith("modelopt") or isinstance(quant_config.get("quantization"), Mapping):
        return "modelopt"
    return None


def detect_tensor_format(names: Iterable[str]) -> str | None:
    """Guess the layout from tensor names alone."""
    names = set(names)
    if any(n.endswith(".weight_packed") for n in names):
        return "compressed-tensors"
    if any(n.endswith(".weight_scale_2") for n in names):
        return "modelopt"
    return None


@dataclass
class LayerInfo:
    """One weight-bearing module (2-D or larger ``weight``) of a checkpoint."""

    module: str
    scheme: str  # "nvfp4" | "mxfp4" | "fp8" | "int-packed" | "dense"
    out_features: int
    in_features: int
    weight_dtype: str
    group_size: int | None = None
    scale_dtype: str | None = None
    has_global_scale: bool = False
    has_input_scale: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.scheme != "dense"


def describe_layers(tensors: Mapping[str, Any], fmt: str | None = None) -> dict[str, LayerInfo]:
    """Per weight-bearing module: is it NVFP4-packed, its group size, its scale dtypes, problems.

    ``tensors`` maps names to tensors, ``TensorMeta``, ``{"shape", "dtype"}`` dicts (safetensors or
    torch dtype names) or ``(shape, dtype)`` pairs. ``fmt`` defaults to a guess from the names.
    Modules with 1-D weights (norms) are left out.
    """
    meta = {k: _meta(v) for k, v in tensors.items()}
    fmt = fmt or detect_tensor_format(meta)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"describe_layers: unknown format {fmt!r}; expected one of {FORMATS}")
    layers: dict[str, LayerInfo] = {}
    for name, m in meta.items():
        mod, leaf = _split(name)
        if leaf == "weight_packed" and fmt == "compressed-tensors":
            layers[mod] = _describe_packed(mod, m, meta, fmt)
        elif leaf == "weight":
            if len(m.shape) < 2:
                continue
            if fmt == "modelopt" and f"{mod}.weight_scale" in meta and m.dtype == "uint8":
                layers[mod] = _describe_packed(mod, m, meta, fmt)
            elif m.dtype.startswith("float8"):
                s = meta.get(f"{mod}.weight_scale")
                layers[mod] = LayerInfo(
                    mod, "fp8", m.shape[-2], m.shape[-1], m.dtype, None, s.dtype if s else None,
                    has_input_scale=f"{mod}.input_scale" in meta,
                )
            else:
                info = LayerInfo(mod, "dense", m.shape[-2], m.shape[-1], m.dtype)
                if m.dtype not in _FLOAT_NAMES:
                    info.problems.append(f"{mod}.weight: dtype {m.dtype} is neither float nor a known packed format")
                layers[mod] = info
    return layers


def _describe_packed(mod: str, m: TensorMeta, meta: Mapping[str, TensorMeta], fmt: str) -> LayerInfo:
    ct = fmt == "compressed-tensors"
    w_name = f"{mod}.weight_packed" if ct else f"{mod}.weight"
    g_name = f"{mod}.weight_global_scale" if ct else f"{mod}.weight_scale_2"
    i_names = (f"{mod}.input_global_scale",) if ct else (f"{mod}.input_scale",)
    problems: list[str] = []
    if len(m.shape) < 2:
        return LayerInfo(mod, "dense", 0, 0, m.dtype, problems=[f"{w_name}: packed weight of shape {m.shape}"])
    if m.dtype != "uint8":
        scheme = "int-packed" if m.dtype == "int32" else "dense"
        return LayerInfo(mod, scheme, m.shape[-2], m.shape[-1], m.dtype,
                         problems=[] if scheme == "int-packed" else [f"{w_name}: dtype {m.dtype}, expected uint8"])
    out_f, in_f = m.shape[-2], m.shape[-1] * 2
    scale = meta.get(f"{mod}.weight_scale")
    group = None
    scheme = "nvfp4"
    if scale is None:
        problems.append(f"{mod}: packed weight without weight_scale")
    else:
        if tuple(scale.shape[:-1]) != tuple(m.shape[:-1]) or len(scale.shape) != len(m.shape):
            problems.append(f"{mod}.weight_scale: shape {list(scale.shape)} does not fit weight {list(m.shape)}")
        elif scale.shape[-1] == 0 or in_f % scale.shape[-1]:
            problems.append(f"{mod}.weight_scale: {scale.shape[-1]} scales per row do not divide {in_f} inputs")
        else:
            group = in_f // scale.shape[-1]
        if scale.dtype in ("uint8", "float8_e8m0fnu"):
            scheme = "mxfp4"
        elif scale.dtype != "float8_e4m3fn":
            problems.append(f"{mod}.weight_scale: dtype {scale.dtype}, expected float8_e4m3fn")
    gs = meta.get(g_name)
    if gs is None:
        if scheme == "nvfp4":
            problems.append(f"{mod}: no {g_name.rpartition('.')[2]} (per-tensor scale)")
    else:
        if gs.dtype != "float32":
            problems.append(f"{g_name}: dtype {gs.dtype}, expected float32")
        n = 1
        for s in gs.shape:
            n *= s
        if n != 1:
            problems.append(f"{g_name}: shape {list(gs.shape)}, expected one value")
    return LayerInfo(
        mod, scheme, out_f, in_f, "uint8", group, scale.dtype if scale else None,
        has_global_scale=gs is not None, has_input_scale=any(n in meta for n in i_names), problems=problems,
    )


def summarize_layers(layers: Mapping[str, LayerInfo]) -> dict[str, Any]:
    """Counts and lists for a report: schemes, group sizes, quantized / dense modules."""
    schemes: dict[str, int] = {}
    for info in layers.values():
        schemes[info.scheme] = schemes.get(info.scheme, 0) + 1
    return {
        "schemes": schemes,
        "group_sizes": sorted({i.group_size for i in layers.values() if i.group_size}),
        "quantized": sorted(k for k, i in layers.items() if i.quantized),
        "dense": sorted(k for k, i in layers.items() if not i.quantized),
        "with_input_scale": sum(1 for i in layers.values() if i.has_input_scale),
        "problems": [p for i in layers.values() for p in i.problems],
    }


def matches_ignore(module: str, patterns: Iterable[str], fmt: str | None) -> bool:
    """Does ``module`` match an ignore / exclude_modules entry, as the format's consumers read it?

    compressed-tensors: exact name, or ``re:<regex>`` (re.match); class names cannot be checked from
    names and never match here. ModelOpt (as vLLM reads it): exact, fnmatch wildcard, or substring.
    """
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], module):
                return True
        elif p == module:
            return True
        elif fmt != "compressed-tensors":
            if fnmatch(module, p) or p in module:
                return True
    return False


def _is_embedding(module: str) -> bool:
    leaf = module.rpartition(".")[2]
    return "embed" in leaf or leaf in ("wte", "wpe", "word_embeddings", "tok_embeddings")


def _claims(quant_config: Mapping[str, Any], hf_quant_config: Mapping[str, Any] | None, fmt: str):
    """(format/algo claimed, group sizes claimed, ignore list, activations quantized?)"""
    if fmt == "compressed-tensors":
        groups = list((quant_config.get("config_groups") or {}).values())
        top = quant_config.get("format")
        formats = {g.get("format") or top for g in groups} - {None}
        if top not in (None, "mixed-precision"):
            formats |= {f"{top} (disagrees with group format {g['format']})"
                        for g in groups if g.get("format") and g["format"] != top}
        sizes = {(g.get("weights") or {}).get("group_size") for g in groups}
        acts = any(
            (g.get("input_activations") or {}).get("num_bits") == 4
            and (g.get("input_activations") or {}).get("type") == "float"
            for g in groups
        )
        return formats, sizes - {None}, list(quant_config.get("ignore") or []), acts
    q = dict(quant_config)
    if isinstance(q.get("quantization"), Mapping):
        q = {**q, **q["quantization"]}
    hq = dict((hf_quant_config or {}).get("quantization") or {})
    algo = q.get("quant_algo") or hq.get("quant_algo")
    sizes = {q.get("group_size"), hq.get("group_size")}
    for g in (q.get("config_groups") or {}).values():
        sizes.add((g.get("weights") or {}).get("group_size"))
    sizes.discard(None)
    if not sizes and str(algo).upper() in ("NVFP4", "W4A16_NVFP4"):
        sizes = {DEFAULT_GROUP_SIZE}  # vLLM's default
    ignore = list(q.get("exclude_modules") or q.get("ignore") or hq.get("exclude_modules") or [])
    return {str(algo).upper()} if algo else set(), sizes, ignore, str(algo).upper() == "NVFP4"


def check_quantization_claims(
    quant_config: Mapping[str, Any] | None,
    layers: Mapping[str, LayerInfo],
    hf_quant_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Problems found when checking a config's NVFP4 claims against the tensors (empty: consistent).

    Checks: the format/algorithm is NVFP4, the tensors have that format's layout, every quantized
    module is NVFP4 with the claimed group size and well-formed scales, W4A4 claims come with input
    scales, ignored modules are dense, and no non-embedding weight is dense without being ignored.
    """
    fmt = detect_format(quant_config) or detect_format(hf_quant_config)
    if fmt is None:
        return ["config has no compressed-tensors or modelopt quantization_config"]
    claimed, sizes, ignore, w4a4 = _claims(quant_config or {}, hf_quant_config, fmt)
    problems: list[str] = []
    if fmt == "compressed-tensors" and claimed != {"nvfp4-pack-quantized"}:
        problems.append(f"compressed-tensors format is {sorted(claimed) or 'missing'}, not nvfp4-pack-quantized")
    if fmt == "modelopt" and not claimed & {"NVFP4", "W4A16_NVFP4"}:
        problems.append(f"modelopt quant_algo is {sorted(claimed) or 'missing'}, not NVFP4")
    if len(sizes) > 1:
        problems.append(f"config claims several group sizes {sorted(sizes)}")
    quantized = [i for i in layers.values() if i.quantized]
    if not quantized:
        problems.append("no quantized weights found in the tensors")
    for info in layers.values():
        problems.extend(info.problems)
        ignored = matches_ignore(info.module, ignore, fmt)
        if info.quantized:
            if ignored:
                problems.append(f"{info.module}: listed as ignored but its weight is {info.scheme}")
            if info.scheme != "nvfp4":
                problems.append(f"{info.module}: weight is {info.scheme}, not nvfp4")
            elif sizes and info.group_size is not None and info.group_size not in sizes:
                problems.append(f"{info.module}: group size {info.group_size}, config says {sorted(sizes)}")
            elif w4a4 and info.scheme == "nvfp4" and not info.has_input_scale:
                problems.append(f"{info.module}: W4A4 claimed but no input scale")
        elif not ignored and not _is_embedding(info.module):
            problems.append(f"{info.module}: weight is dense ({info.weight_dtype}) but not in the ignore list")
    return problems


# ---------------------------------------------------------------------------------------------------
# whole checkpoints on disk


def _open_files(model_dir: Path, meta: Mapping[str, TensorMeta]):
    from safetensors import safe_open

    return {f: safe_open(str(model_dir / f), framework="pt") for f in sorted({m.file for m in meta.values()})}


def iter_dequantized(
    model_dir: str | Path, fmt: str | None = None, dtype: torch.dtype | None = torch.bfloat16
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream a checkpoint dir as a dense state dict, one module at a time (bounded memory)."""
    root = Path(model_dir)
    meta = read_safetensors_meta(root)
    if fmt is None:
        cfg_path = root / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        fmt = detect_format(cfg.get("quantization_config")) or detect_tensor_format(meta)
    handles = _open_files(root, meta)
    by_module: dict[str, list[str]] = {}
    for name in meta:
        by_module.setdefault(_split(name)[0], []).append(name)
    for mod, names in by_module.items():
        tensors = {n: handles[meta[n].file].get_tensor(n) for n in names}
        if fmt in FORMATS:
            yield from dequantize_state_dict(tensors, fmt, dtype).items()
        else:
            for n, t in tensors.items():
                yield n, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)


def load_dequantized_state_dict(
    model_dir: str | Path, fmt: str | None = None, dtype: torch.dtype | None = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """A checkpoint dir (compressed-tensors / ModelOpt NVFP4, or dense) as a dense state dict."""
    return dict(iter_dequantized(model_dir, fmt, dtype))
