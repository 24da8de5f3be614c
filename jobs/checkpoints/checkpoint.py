"""What a checkpoint directory holds: its config, its weights' headers, its quantization, its content hash.

Reads only JSON and safetensors headers, so it is cheap on a 14B checkpoint and needs no torch.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from jobs.core.errors import CheckpointError, SettingsError, first_line


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


def read_weights(path: Path) -> tuple[dict[str, dict], dict]:
    """{tensor name: {"dtype", "shape"}} of a .safetensors file, read by safetensors itself (which also
    refuses a truncated file or a bad header), and the file's JSON header, which the content hash covers."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "np") as fh:
            tensors = {}
            for name in fh.keys():
                part = fh.get_slice(name)
                tensors[name] = {"dtype": part.get_dtype(), "shape": list(part.get_shape())}
        return tensors, _header(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable weights {path}: {first_line(exc)}") from None


def _header(path: Path) -> dict:
    # safe_open gives no data offsets, and the content hash has covered the header as written (offsets
    # included) since the archive's first schema: so the header is still read here, after safetensors
    # has validated the file, to keep every existing archive's fingerprint.
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


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
        return _compressed_tensors(qc)
    if method == "modelopt":  # compressed-tensors reads no ModelOpt config; vLLM's own reader needs vLLM
        inner = qc.get("quantization") or {}
        algo = qc.get("quant_algo") or inner.get("quant_algo")
        bits = 4 if algo == "NVFP4" else 8
        return Quantization(method, algo, str(algo), qc.get("group_size") or inner.get("group_size"), bits, bits,
                            list(qc.get("exclude_modules") or qc.get("ignore") or []), qc)
    return Quantization(method, qc.get("format"), str(method), raw=qc)


def _compressed_tensors(qc: dict) -> Quantization:
    """A compressed-tensors config, parsed by compressed-tensors' own ``QuantizationConfig`` (as vLLM parses
    it), named by its first config group's weights and input activations. Imported here, not at the top:
    the library brings torch and transformers, which nothing else of a checkpoint's inspection needs."""
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    try:
        cfg = QuantizationConfig.model_validate(qc)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"] if "[" not in str(x))  # not pydantic's validator names
        raise CheckpointError(f"quantization_config is not one compressed-tensors can read ({where}: {err['msg']})") from None
    group = next(iter(cfg.config_groups.values()), None)
    w = group.weights if group else None
    a = group.input_activations if group else None
    wbits, is_float = (w.num_bits, w.type == "float") if w else (None, False)
    abits = a.num_bits if a else None
    # the config's own format, else its first group's (the library fills a default the checkpoint never wrote)
    fmt = cfg.format if "format" in cfg.model_fields_set else (getattr(group, "format", None) if group else None)
    if wbits == 4 and is_float:
        scheme = "NVFP4" if abits == 4 else "NVFP4A16"
    elif wbits == 8 and is_float:
        scheme = "FP8_DYNAMIC" if a and a.dynamic else ("FP8" if abits else "FP8A16")
    else:
        scheme = f"W{wbits}A{abits or 16}"
    return Quantization("compressed-tensors", fmt, scheme, w.group_size if w else None, wbits, abits,
                        list(cfg.ignore or []), qc)


def content_hash(path: Path, files: list[Path], headers: list[dict]) -> str:
    """Hash of config, weight index/headers and file sizes (and qscore.json if present).

    Reading every byte of a 28 GB checkpoint to fingerprint it would cost minutes; the headers pin
    names, dtypes and shapes, the sizes and the quantize manifest pin the rest in practice.
    """
    h = hashlib.sha256()
    _hash_files(h, path, ("config.json", "model.safetensors.index.json", "hf_quant_config.json", "qscore.json"))
    for f, head in zip(files, headers):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
        h.update(json.dumps(head, sort_keys=True).encode())
    return h.hexdigest()


def check_dir(path: Path) -> Path:
    """A Hugging Face checkpoint's directory, or a one-line error: before anything slow looks at it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json: not a Hugging Face checkpoint")
    return path


def inspect(path: Path) -> Checkpoint:
    path = check_dir(path)
    config = read_json(path / "config.json")
    hf_quant = read_json(path / "hf_quant_config.json") if (path / "hf_quant_config.json").exists() else None
    files = weight_files(path)
    headers, tensors = [], {}
    for f in files:
        table, header = read_weights(f)
        headers.append(header)
        tensors.update({name: {**info, "file": f.name} for name, info in table.items()})
    try:
        quant = describe_quantization(config, hf_quant)
    except CheckpointError as exc:
        raise CheckpointError(f"{path / 'config.json'}: {exc}") from None
    return Checkpoint(path, config, tensors, quant, content_hash(path, files, headers))


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


def _hash_files(h, path: Path, names) -> bool:
    """Add each of ``names`` that ``path`` holds, name and bytes, to the hash ``h``; False when none is there."""
    found = [name for name in names if (Path(path) / name).exists()]
    for name in found:
        h.update(name.encode() + b"\0" + (Path(path) / name).read_bytes())
    return bool(found)


def tokenizer_hash(path: Path) -> str:
    h = hashlib.sha256()
    if not _hash_files(h, path, ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                                 "merges.txt", "special_tokens_map.json", "chat_template.jinja")):
        raise CheckpointError(f"{path}: no tokenizer files")
    return h.hexdigest()
