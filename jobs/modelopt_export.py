"""Write a ModelOpt-format NVFP4 checkpoint from a BF16 Hugging Face checkpoint with nvidia-modelopt itself
(the demo's and tests' stand-in for NVIDIA's published checkpoints such as nvidia/Qwen3-14B-NVFP4).

``mtq.quantize`` with ``NVFP4_DEFAULT_CFG`` (max calibration on the calibration texts), then
``export_hf_checkpoint``. The output has NVIDIA's layout as vLLM's ``modelopt.py`` reads it: per quantized
Linear ``X``: ``X.weight`` uint8 [out, in/2], ``X.weight_scale`` float8_e4m3fn [out, in/16],
``X.weight_scale_2`` and ``X.input_scale`` float32; ``config.json``'s ``quantization_config`` and
``hf_quant_config.json`` carry ``quant_algo: NVFP4``, ``group_size: 16`` and ``exclude_modules``.
qscore adds tokenizer files and ``qscore_export.json`` (how it was made), and checks the result with the
project's one layout checker (``quantcheck``) before it appears under its name.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from jobs.core import atomic
from jobs.texts import evalsets
from jobs.checkpoints import quantcheck
from jobs.checkpoints.checkpoint import inspect, read_json
from jobs.core.errors import CheckpointError, QscoreError

log = logging.getLogger(__name__)

GROUP_SIZE = 16
METADATA_FILE = "qscore_export.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", "hf_quant_config.json", "model.safetensors.index.json",
               "pytorch_model.bin.index.json", METADATA_FILE,
               "qscore-tiny.json"}  # the tiny model's build manifest describes the BF16 source, not this
DEFAULT_CALIBRATION = Path(__file__).resolve().parent.parent / "data" / "calib_mini.jsonl"

def modelopt_version() -> str | None:
    """The installed nvidia-modelopt version, or None (without importing it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nvidia-modelopt")
    except PackageNotFoundError:
        return None


def _calibration_batches(model_dir: Path, texts: Sequence[str], max_length: int, max_texts: int):
    """Token-id batches ([1, L] each) for calibration, and how many tokens they hold."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        raise CheckpointError(f"{model_dir}: no tokenizer to encode the calibration texts") from None
    batches = [tok(t, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
               for t in list(texts)[:max_texts]]
    batches = [b for b in batches if b.numel()]
    if not batches:
        raise QscoreError("calibration texts encode to no tokens")
    return batches, {"texts": len(batches), "tokens": int(sum(b.numel() for b in batches))}


def _model_dtype(config: dict):
    import torch

    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    dt = getattr(torch, name, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.bfloat16


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, chat template, generation config, ...: every small file that is not weights/config."""
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in _NOT_COPIED or f.suffix in _WEIGHT_SUFFIXES:
            continue
        if (dst / f.name).exists():
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


def _run_modelopt(model_dir: Path, out_dir: Path, texts: Sequence[str] | None, ignore: Sequence[str],
                  max_length: int, max_texts: int) -> dict:
    import copy
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    warnings.filterwarnings("ignore", message=".*transformers .* is not tested with current version of modelopt.*")
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    config = read_json(model_dir / "config.json")
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_model_dtype(config))
    model.eval()
    batches, calib = _calibration_batches(model_dir, texts, max_length, max_texts)

    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    skip = [n for n in linear_names if quantcheck.matches_ignore(n, list(ignore), "modelopt")]
    if isinstance(cfg["quant_cfg"], dict):  # older modelopt: {wildcard: cfg}
        for n in skip:
            cfg["quant_cfg"][f"{n}.*"] = {"enable": False}
    else:  # modelopt >= 0.4x: list of {"quantizer_name", ...}
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [{"quantizer_name": f"{n}.*", "enable": False} for n in skip]

    def forward_loop(m):
        with torch.no_grad():
            for ids in batches:
                m(input_ids=ids)

    mtq.quantize(model, cfg, forward_loop)
    t1 = time.time()
    with torch.no_grad():
        export_hf_checkpoint(model, export_dir=str(out_dir))
    return {
        "modelopt_version": getattr(modelopt, "__version__", modelopt_version()),
        "quant_config": "NVFP4_DEFAULT_CFG (max calibration)",
        "calibration": calib,
        "ignored_linear_modules": skip,
        "seconds_quantize": round(t1 - t0, 3),
        "seconds_export": round(time.time() - t1, 3),
    }


def _normalise_configs(out_dir: Path) -> list[str]:
    """Make config.json / hf_quant_config.json carry every field NVIDIA's checkpoints and vLLM use."""
    cfg = json.loads((out_dir / "config.json").read_text())
    qc = dict(cfg.get("quantization_config") or {})
    hq_path = out_dir / "hf_quant_config.json"
    hq = json.loads(hq_path.read_text()) if hq_path.exists() else {}
    q = dict(hq.get("quantization") or {})
    exclude = list(q.get("exclude_modules") or qc.get("exclude_modules") or qc.get("ignore") or [])
    producer = hq.get("producer") or qc.get("producer") or {"name": "modelopt"}
    if qc.get("quant_method") != "modelopt" or str(qc.get("quant_algo", "")).upper() != "NVFP4":
        raise RuntimeError(f"exported config.json has an unexpected quantization_config: {qc}")
    qc.setdefault("ignore", exclude)
    qc.setdefault("group_size", q.get("group_size", GROUP_SIZE))
    qc.setdefault("kv_cache_quant_algo", q.get("kv_cache_quant_algo"))
    qc.setdefault("exclude_modules", exclude)
    qc.setdefault("producer", producer)
    cfg["quantization_config"] = qc
    _write_json(out_dir / "config.json", cfg)
    q.setdefault("quant_algo", "NVFP4")
    q.setdefault("kv_cache_quant_algo", qc.get("kv_cache_quant_algo"))
    q.setdefault("group_size", qc["group_size"])
    q.setdefault("exclude_modules", exclude)
    _write_json(hq_path, {**hq, "producer": producer, "quantization": q})
    return exclude


def _verify(out_dir: Path) -> dict:
    """The written checkpoint checked against its own config by the project's layout checker, plus
    finite, positive scales."""
    import torch
    from safetensors import safe_open

    ckpt = inspect(out_dir)
    problems = quantcheck.check(ckpt.tensors, ckpt.quant, "NVFP4")
    handles: dict[str, Any] = {}
    for name, info in ckpt.tensors.items():
        if name.rpartition(".")[2] in ("weight_scale", "weight_scale_2", "input_scale") and len(problems) < 20:
            fh = handles.get(info["file"]) or handles.setdefault(
                info["file"], safe_open(str(out_dir / info["file"]), framework="pt"))
            t = fh.get_tensor(name).float()
            if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                problems.append(f"{name}: non-finite or non-positive scale")
    if problems:
        raise QscoreError(f"exported checkpoint is inconsistent: {problems[0]} ({len(problems)} problem(s))")
    mods = quantcheck.linear_modules(ckpt.tensors)
    dense = sorted(m for m in mods if quantcheck.matches_ignore(m, ckpt.quant.ignore, "modelopt"))
    return {"quantized_layers": len(mods) - len(dense), "dense_layers": dense}


def export_modelopt_nvfp4(model_dir, output_dir, calibration: str | Path = DEFAULT_CALIBRATION,
                          ignore: Sequence[str] = ("lm_head",), *, max_length: int = 512, max_texts: int = 512,
                          overwrite: bool = False) -> Path:
    """Quantize the BF16 checkpoint ``model_dir`` to NVFP4 with nvidia-modelopt and export it to ``output_dir``.

    ``calibration``: a local .txt/.jsonl/.parquet file of texts or chats (ModelOpt calibrates the
    activations' scales on them). ``ignore``: Linear modules kept dense
    (matched as ModelOpt's exclude_modules are, see quantcheck.matches_ignore); ModelOpt's own config
    excludes more on top (lm_head, routers). Written to a temporary sibling and renamed when complete.
    """
    src = Path(model_dir).resolve()
    dst = Path(output_dir).resolve()
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: no config.json: not a Hugging Face checkpoint directory")
    if read_json(src / "config.json").get("quantization_config"):
        raise CheckpointError(f"{src}: already quantized (config.json has a quantization_config)")
    if dst.exists() and not overwrite:
        raise QscoreError(f"{dst} exists: pass --overwrite to replace it")
    version = modelopt_version()
    if version is None:
        raise QscoreError("nvidia-modelopt is not installed (pip install nvidia-modelopt; see requirements/dev.txt)")
    evalsets.check_local_source(str(calibration), "calibration")
    texts = evalsets.read_local_texts(Path(calibration))
    with atomic.atomic_dir(dst) as tmp:
        info = _run_modelopt(src, tmp, texts, [str(p) for p in ignore], max_length, max_texts)
        exclude = _normalise_configs(tmp)
        copied = _copy_side_files(src, tmp)
        summary = _verify(tmp)
        import torch
        import transformers

        _write_json(tmp / METADATA_FILE, {
            "tool": "qscore export-modelopt",
            "description": "quantized and exported by nvidia-modelopt (mtq.quantize NVFP4_DEFAULT_CFG, "
                           "export_hf_checkpoint)",
            "source_model": str(src),
            "group_size": GROUP_SIZE,
            "ignore": list(ignore),
            "calibration_file": str(calibration),
            "exclude_modules": exclude,
            "copied_files": copied,
            **summary,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **info,
        })
    return dst
