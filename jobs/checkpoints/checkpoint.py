"""What a checkpoint directory holds: its config, its weights' headers, its quantization, its content hash.

Reads only JSON and safetensors headers, so it is cheap on a 14B checkpoint and needs no torch.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from jobs.core.errors import CheckpointError, SettingsError


@dataclass
class Quantization:
    method: str | None  # "compressed-tensors", "modelopt", other quant_method, or None (unquantized)
    format: str | None  # e.g. "nvfp4-pack-quantized", "float-quantized", "NVFP4"
    scheme: str  # a short name: "NVFP4", "NVFP4A16", "FP8_DYNAMIC", "W4A16", "bf16", …
    group_size: int | None = None
    weight_bits: int | None = None
    activation_bits: int | None = None
    ignore: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @property
    def is_nvfp4(self) -> bool:
        return self.scheme in ("NVFP4", "NVFP4A16")


@dataclass
class Checkpoint:
    path: Path
    config: dict
    tensors: dict[str, dict]  # name -> {"dtype", "shape", "file"}
    quant: Quantization
    content_hash: str

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc.__class__.__name__})") from None


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (names, dtypes, shapes, offsets) — the weights unread."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its header length")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > min(size - 8, 100 * 2**20):
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError("truncated: header promises more data than the file holds")
        return header
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable weights {path}: {exc}") from None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: weight index names missing files {missing[:3]}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")):
            raise CheckpointError(f"{path}: only .bin weights; qscore reads safetensors checkpoints")
        raise CheckpointError(f"{path}: no *.safetensors weights: not a checkpoint")
    return files


def describe_quantization(config: dict, hf_quant: dict | None = None) -> Quantization:
    qc = config.get("quantization_config") or config.get("compression_config")
    if not qc and hf_quant:  # older ModelOpt exports keep it only in hf_quant_config.json
        qc = {"quant_method": "modelopt", **(hf_quant.get("quantization") or {})}
    if not qc:
        return Quantization(None, None, str(config.get("torch_dtype") or config.get("dtype") or "bf16"))
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        w = (groups[0].get("weights") or {}) if groups else {}
        a = (groups[0].get("input_activations") or {}) if groups else {}
        wbits, wtype = w.get("num_bits"), w.get("type")
        abits = a.get("num_bits") if a else None
        fmt = qc.get("format") or (groups[0].get("format") if groups else None)
        if wbits == 4 and wtype == "float":
            scheme = "NVFP4" if abits == 4 else "NVFP4A16"
        elif wbits == 8 and wtype == "float":
            scheme = "FP8_DYNAMIC" if a and a.get("dynamic") else ("FP8" if abits else "FP8A16")
        elif wbits == 4:
            scheme = "W4A16" if not abits else f"W4A{abits}"
        elif wbits == 8:
            scheme = "W8A16" if not abits else f"W8A{abits}"
        else:
            scheme = f"W{wbits}A{abits or 16}"
        return Quantization(
            method, fmt, scheme, w.get("group_size"), wbits, abits, list(qc.get("ignore") or []), qc
        )
    if method == "modelopt":
        algo = qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo")
        return Quantization(
            method,
            algo,
            "NVFP4" if algo == "NVFP4" else str(algo),
            qc.get("group_size") or (qc.get("quantization") or {}).get("group_size"),
            4 if algo == "NVFP4" else 8,
            4 if algo == "NVFP4" else 8,
            list(qc.get("exclude_modules") or qc.get("ignore") or []),
            qc,
        )
    return Quantization(method, qc.get("format"), str(method), raw=qc)


def content_hash(path: Path, files: list[Path], headers: list[dict]) -> str:
    """Hash of config, weight index/headers and file sizes (and qscore.json if present).

    Reading every byte of a 28 GB checkpoint to fingerprint it would cost minutes; the headers pin
    names, dtypes and shapes, the sizes and the quantize manifest pin the rest in practice.
    """
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "hf_quant_config.json", "qscore.json"):
        p = path / name
        if p.exists():
            h.update(name.encode() + b"\0" + p.read_bytes())
    for f, head in zip(files, headers):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
        h.update(json.dumps(head, sort_keys=True).encode())
    return h.hexdigest()


def inspect(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json: not a Hugging Face checkpoint")
    config = read_json(path / "config.json")
    hf_quant = read_json(path / "hf_quant_config.json") if (path / "hf_quant_config.json").exists() else None
    files = weight_files(path)
    headers = [safetensors_header(f) for f in files]
    tensors = {}
    for f, head in zip(files, headers):
        for name, info in head.items():
            if name != "__metadata__":
                tensors[name] = {"dtype": info["dtype"], "shape": info["shape"], "file": f.name}
    return Checkpoint(path, config, tensors, describe_quantization(config, hf_quant), content_hash(path, files, headers))


_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def context_length(config: dict) -> int | None:
    """The longest context a model supports, rope scaling considered, as vLLM derives it
    (vllm/config/model.py ``_get_and_verify_max_len``): yarn scales its original length, other rope
    types (but su, longrope, llama3, whose max_position_embeddings already include it) scale by factor."""
    cfg = config.get("text_config") or config
    lengths = [cfg[k] for k in _LENGTH_KEYS if isinstance(cfg.get(k), int)]
    if not lengths:
        return None
    length = float(min(lengths))
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if isinstance(rope, dict) and rope and "gemma3" not in str(cfg.get("model_type", "")):
        params = rope if "rope_type" in rope or "type" in rope or "factor" in rope else next(iter(rope.values()), {})
        kind = params.get("rope_type") or params.get("type") or "default"
        if kind not in ("su", "longrope", "llama3", "default"):
            if kind == "yarn" and params.get("original_max_position_embeddings"):
                length = float(params["original_max_position_embeddings"])
            length *= float(params.get("factor") or 1.0)
    return int(length)


def check_max_model_len(ckpt: Checkpoint, max_model_len: int) -> None:
    """Refuse a context the model cannot take: scoring past it gives numbers that mean nothing."""
    limit = context_length(ckpt.config)
    if limit is not None and max_model_len > limit:
        raise SettingsError(f"--max-model-len {max_model_len} is beyond {ckpt.path}'s context of {limit} tokens "
                            "(max_position_embeddings, rope scaling considered)")


def tokenizer_hash(path: Path) -> str:
    h = hashlib.sha256()
    found = False
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                 "special_tokens_map.json", "chat_template.jinja"):
        p = Path(path) / name
        if p.exists():
            found = True
            h.update(name.encode() + b"\0" + p.read_bytes())
    if not found:
        raise CheckpointError(f"{path}: no tokenizer files")
    return h.hexdigest()
