"""Write a ModelOpt-format NVFP4 checkpoint from a BF16 Hugging Face checkpoint (demo / test fixture).

The output has NVIDIA's layout (as nvidia/Qwen3-14B-NVFP4 and vLLM's ``modelopt.py`` read it):
``config.json`` with ``quantization_config = {quant_method: "modelopt", quant_algo: "NVFP4",
group_size: 16, kv_cache_quant_algo: null, exclude_modules / ignore: [...], config_groups, producer}``,
``hf_quant_config.json`` (``{"producer", "quantization": {quant_algo, kv_cache_quant_algo, group_size,
exclude_modules}}``) and safetensors holding, per quantized Linear ``X``: ``X.weight`` uint8
[out, in/2], ``X.weight_scale`` float8_e4m3fn [out, in/16], ``X.weight_scale_2`` float32 [] and
``X.input_scale`` float32 []; tokenizer files are copied; ``qscore_export.json`` says how it was made.

Two ways to make it, chosen by ``method``:
- ``"modelopt"``: nvidia-modelopt itself (``mtq.quantize`` with ``NVFP4_DEFAULT_CFG``, max calibration
  on the calibration texts, then ``export_hf_checkpoint``), run in a child process so that its
  patching of torch / transformers stays out of ours. An independent, genuinely ModelOpt checkpoint.
- ``"rtn"``: our own round-to-nearest exporter (``jobs.nvfp4.quantize_nvfp4``) writing the same layout:
  ``weight_scale_2 = amax / (6*448)`` shared by layers that read the same input (q/k/v, gate/up, as
  ModelOpt and vLLM's fused kernels expect), block scale = block amax / 6 / weight_scale_2 in fp8,
  ``input_scale`` = calibration amax / (6*448), or 1.0 without calibration.
- ``"auto"`` (default): ModelOpt when importable and it succeeds, otherwise RTN (the reason is recorded).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import atomic

log = logging.getLogger(__name__)

__all__ = ["export_modelopt_nvfp4", "DEFAULT_CALIBRATION_TEXTS", "METADATA_FILE", "modelopt_version"]

GROUP_SIZE = 16
METADATA_FILE = "qscore_export.json"
_E2M1_MAX, _FP8_MAX = 6.0, 448.0
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", "hf_quant_config.json", "model.safetensors.index.json",
               "pytorch_model.bin.index.json", METADATA_FILE,
               "qscore-tiny.json"}  # the tiny model's build manifest describes the BF16 source, not this
_SHARD_BYTES = 5 * 2**30

#: used when no calibration texts are given: varied English prose, code and chat, a few hundred tokens
DEFAULT_CALIBRATION_TEXTS: tuple[str, ...] = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made "
    "books cheaper to produce and spread literacy across Europe within a few generations.",
    "user: How do I reverse a list in Python?\nassistant: Use slicing, `items[::-1]`, which returns a new "
    "list, or call `items.reverse()` to reverse it in place.",
    "Photosynthesis converts light energy into chemical energy: chlorophyll absorbs mostly blue and red "
    "light, and the plant stores the energy as glucose while releasing oxygen.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "In 1969 the Apollo 11 mission landed two astronauts on the Moon; the descent stage still stands in "
    "the Sea of Tranquility, and the retroreflectors they left are used to measure its distance.",
    "user: Summarise the causes of inflation in two sentences.\nassistant: Inflation rises when demand "
    "outpaces supply or when costs such as energy and wages increase. Expectations can then feed it.",
    "Mix the flour, sugar and a pinch of salt, rub in the cold butter until the mixture looks like "
    "breadcrumbs, then add an egg and bring the dough together without kneading it too much.",
    "The theorem states that every continuous function on a closed interval attains a maximum and a "
    "minimum; the proof uses the completeness of the real numbers.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders USING (customer_id) GROUP BY name "
    "ORDER BY orders DESC LIMIT 10;",
    "Rivers carve valleys over millions of years, and the sediment they carry builds deltas where they "
    "meet the sea; floods renew the soil of the plains along their banks.",
    "user: Write a haiku about autumn.\nassistant: Maple leaves drifting / a cold wind hums through bare "
    "trees / the lake holds the sky",
    "Der schnelle braune Fuchs springt über den faulen Hund. Le vif renard brun saute par-dessus le "
    "chien paresseux. El veloz zorro marrón salta sobre el perro perezoso.",
)


def modelopt_version() -> str | None:
    """The installed nvidia-modelopt version, or None (without importing it)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("nvidia-modelopt")
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------
# shared helpers


def _ignored(module: str, patterns: Iterable[str]) -> bool:
    """Module name matches an ignore entry: exact name, dotted suffix, ``re:`` regex, fnmatch wildcard."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], module):
                return True
        elif module == p or module.endswith("." + p) or fnmatch(module, p):
            return True
    return False


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _calibration_batches(model_dir: Path, texts: Sequence[str] | None, vocab_size: int, max_length: int,
                         max_texts: int):
    """Token-id batches ([1, L] each) for calibration, and a description of where they came from."""
    import torch

    if texts is not None and len(texts) == 0:
        return [], {"source": "none", "texts": 0, "tokens": 0}
    tok = _load_tokenizer(model_dir)
    source = "user" if texts is not None else "builtin"
    if tok is None:
        if texts is not None:
            raise ValueError(f"{model_dir}: no tokenizer files to encode the calibration texts")
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, vocab_size, (1, 64), generator=g) for _ in range(8)]
        source = "random-token-ids"
    else:
        batches = []
        for text in list(texts if texts is not None else DEFAULT_CALIBRATION_TEXTS)[:max_texts]:
            ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            ids = ids[:, :max_length]
            if ids.numel():
                batches.append(ids.long().clamp_(0, vocab_size - 1))
    if not batches:
        raise ValueError("calibration texts encode to no tokens")
    return batches, {"source": source, "texts": len(batches), "tokens": int(sum(b.numel() for b in batches))}


def _model_dtype(config: dict):
    import torch

    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    dt = getattr(torch, name, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.bfloat16


def _quantization_config(exclude: list[str], producer: dict, with_activations: bool = True) -> dict:
    """config.json's quantization_config as ModelOpt writes it, plus the flat hf_quant_config fields."""
    group = {
        "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": GROUP_SIZE},
        "targets": ["Linear"],
    }
    if with_activations:
        group = {"input_activations": {"dynamic": False, "num_bits": 4, "type": "float",
                                       "group_size": GROUP_SIZE}, **group}
    return {
        "config_groups": {"group_0": group},
        "ignore": list(exclude),
        "quant_algo": "NVFP4",
        "producer": producer,
        "quant_method": "modelopt",
        "group_size": GROUP_SIZE,
        "kv_cache_quant_algo": None,
        "exclude_modules": list(exclude),
    }


def _hf_quant_config(exclude: list[str], producer: dict) -> dict:
    return {
        "producer": producer,
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": GROUP_SIZE,
            "exclude_modules": list(exclude),
        },
    }


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


# ---------------------------------------------------------------------------------------------------
# the ModelOpt path (runs in a child process)


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

    config = json.loads((model_dir / "config.json").read_text())
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_model_dtype(config))
    model.eval()
    batches, calib = _calibration_batches(model_dir, texts, model.config.vocab_size, max_length, max_texts)
    if not batches:
        raise ValueError("the ModelOpt path needs calibration data (it calibrates activation scales)")

    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    skip = [n for n in linear_names if _ignored(n, ignore)]
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


def _modelopt_in_child(model_dir: Path, out_dir: Path, texts, ignore, max_length, max_texts, timeout_s) -> dict:
    with tempfile.TemporaryDirectory(prefix="qscore-modelopt-") as td:
        spec = Path(td) / "spec.json"
        result = Path(td) / "result.json"
        _write_json(spec, {
            "model_dir": str(model_dir), "out_dir": str(out_dir), "texts": None if texts is None else list(texts),
            "ignore": list(ignore), "max_length": max_length, "max_texts": max_texts, "result": str(result),
        })
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.modelopt_export", "--worker", str(spec)],
            env=env, capture_output=True, text=True, timeout=timeout_s,
        )
        if proc.returncode != 0 or not result.exists():
            lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
            raise RuntimeError(f"modelopt export failed (exit {proc.returncode}): {lines[-1] if lines else '?'}")
        return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------------
# the RTN path (pure torch + our quantizer)


def _shared_input_groups(model, linear_names: list[str], batch) -> list[list[str]]:
    """Linear layers fed the very same input tensor (q/k/v, gate/up), found on one forward pass."""
    import torch

    modules = dict(model.named_modules())
    seen: dict[int, list[str]] = {}
    keep: list = []  # hold the inputs so that no id is recycled during the pass

    def hook(name):
        def fn(_mod, args):
            if args and isinstance(args[0], torch.Tensor):
                keep.append(args[0])
                seen.setdefault(id(args[0]), []).append(name)
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in linear_names]
    try:
        with torch.no_grad():
            model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
    return [g for g in seen.values()]


_FUSED_LEAVES = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"w1", "w3"})


def _name_groups(names: list[str]) -> list[list[str]]:
    """Without a forward pass: the usual fused families under one parent."""
    groups: dict[tuple, list[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        fam = next((i for i, f in enumerate(_FUSED_LEAVES) if leaf in f), None)
        groups.setdefault((parent, fam) if fam is not None else (n, None), []).append(n)
    return list(groups.values())


def _run_rtn(model_dir: Path, out_dir: Path, texts, ignore, max_length, max_texts) -> dict:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from .nvfp4 import quantize_nvfp4, read_safetensors_meta

    config = json.loads((model_dir / "config.json").read_text())
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_model_dtype(config))
    model.eval()
    batches, calib = _calibration_batches(model_dir, texts, model.config.vocab_size, max_length, max_texts)
    meta = read_safetensors_meta(model_dir)
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    skip = [n for n in linear if _ignored(n, ignore)]
    todo = [n for n in linear if n not in skip]
    for n in todo:
        if f"{n}.weight" not in meta:
            raise ValueError(f"{model_dir}: Linear {n} has no tensor {n}.weight in the checkpoint (tied or renamed?); "
                             "add it to ignore")
        if meta[f"{n}.weight"].shape[-1] % GROUP_SIZE:
            raise ValueError(f"{n}: in_features {meta[f'{n}.weight'].shape[-1]} not a multiple of {GROUP_SIZE}; ignore it")

    # activation amax per Linear (calibration), and groups of layers sharing an input
    amax: dict[str, float] = {}
    if batches:
        groups = [[n for n in g if n in todo] for g in _shared_input_groups(model, todo, batches[0])]

        def rec(name):
            def fn(_mod, args):
                a = float(args[0].detach().abs().max())
                amax[name] = max(amax.get(name, 0.0), a)
            return fn

        handles = [modules[n].register_forward_pre_hook(rec(n)) for n in todo]
        try:
            with torch.no_grad():
                for ids in batches:
                    model(input_ids=ids)
        finally:
            for h in handles:
                h.remove()
    else:
        groups = _name_groups(todo)
    groups = [g for g in groups if g]
    grouped = {n for g in groups for n in g}
    groups += [[n] for n in todo if n not in grouped]
    del model

    handles = {f: safe_open(str(model_dir / f), framework="pt") for f in sorted({m.file for m in meta.values()})}

    def tensor(name):
        return handles[meta[name].file].get_tensor(name)

    quant: dict[str, dict] = {}
    for g in groups:
        ws = {n: tensor(f"{n}.weight") for n in g}
        w_amax = max(float(w.float().abs().max()) for w in ws.values())
        scale_2 = torch.tensor(w_amax / (_E2M1_MAX * _FP8_MAX) if w_amax > 0 else 1.0, dtype=torch.float32)
        a = max((amax.get(n, 0.0) for n in g), default=0.0)
        input_scale = torch.tensor(a / (_E2M1_MAX * _FP8_MAX) if a > 0 else 1.0, dtype=torch.float32)
        for n, w in ws.items():
            q = quantize_nvfp4(w, GROUP_SIZE, scale_2)
            quant[n] = {
                "weight": q["weight_packed"],
                "weight_scale": q["weight_scale"],
                "weight_scale_2": q["weight_scale_2"].reshape(()),
                "input_scale": input_scale.clone(),
            }

    # write in the original tensor order, sharded like save_pretrained
    shards: list[dict] = [{}]
    size = 0
    for name in meta:
        mod, _, leaf = name.rpartition(".")
        items = [(f"{mod}.{k}", v) for k, v in quant[mod].items()] if (leaf == "weight" and mod in quant) else [
            (name, tensor(name))]
        for k, v in items:
            nbytes = v.numel() * v.element_size()
            if size and size + nbytes > _SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][k] = v.contiguous()
            size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, sd in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(sd, str(out_dir / fname), metadata={"format": "pt"})
            for k, v in sd.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
        _write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})

    embeddings = [n for n, m in modules.items() if isinstance(m, torch.nn.Embedding)]
    exclude = sorted(set(skip) | set(embeddings))
    producer = {"name": "qscore-rtn", "version": "0.1.0"}
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config")}
    cfg["quantization_config"] = _quantization_config(exclude, producer)
    _write_json(out_dir / "config.json", cfg)
    _write_json(out_dir / "hf_quant_config.json", _hf_quant_config(exclude, producer))
    return {
        "calibration": calib,
        "ignored_linear_modules": skip,
        "shared_scale_groups": [g for g in groups if len(g) > 1],
        "seconds": round(time.time() - t0, 3),
    }


# ---------------------------------------------------------------------------------------------------
# the entry point


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
    """Header-level check of the written checkpoint against its own config, plus finite scales."""
    import torch
    from safetensors import safe_open

    from .nvfp4 import check_quantization_claims, describe_layers, read_safetensors_meta, summarize_layers

    cfg = json.loads((out_dir / "config.json").read_text())
    hq = json.loads((out_dir / "hf_quant_config.json").read_text())
    meta = read_safetensors_meta(out_dir)
    layers = describe_layers(meta, "modelopt")
    problems = check_quantization_claims(cfg["quantization_config"], layers, hq)
    files: dict[str, Any] = {}
    for name, m in meta.items():
        leaf = name.rpartition(".")[2]
        if leaf in ("weight_scale", "weight_scale_2", "input_scale") and len(problems) < 20:
            fh = files.get(m.file) or files.setdefault(m.file, safe_open(str(out_dir / m.file), framework="pt"))
            t = fh.get_tensor(name).float()
            if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                problems.append(f"{name}: non-finite or non-positive scale")
    if problems:
        raise RuntimeError(f"exported checkpoint is inconsistent: {problems[0]} ({len(problems)} problem(s))")
    return summarize_layers(layers)


def export_modelopt_nvfp4(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    calibration_texts: Sequence[str] | None = None,
    ignore: Sequence[str] = ("lm_head",),
    *,
    method: str = "auto",
    max_length: int = 512,
    max_texts: int = 512,
    overwrite: bool = False,
    timeout_s: float = 3600,
) -> Path:
    """Turn a BF16 HF checkpoint dir into a ModelOpt-format NVFP4 checkpoint dir; returns its path.

    ``calibration_texts``: None uses ``DEFAULT_CALIBRATION_TEXTS`` (random token ids if the model has
    no tokenizer); an empty sequence means no calibration (RTN only, ``input_scale`` 1.0).
    ``ignore``: Linear modules kept dense (exact name, dotted suffix, ``re:`` regex or wildcard); on
    the ModelOpt path its config's own exclusions (lm_head, MoE routers, ...) apply on top of them.
    ``method``: ``"auto"`` | ``"modelopt"`` | ``"rtn"`` (see the module docstring).
    Written to a temporary sibling dir and renamed when complete.
    """
    if method not in ("auto", "modelopt", "rtn"):
        raise ValueError(f"method must be auto, modelopt or rtn, not {method!r}")
    src = Path(model_dir).resolve()
    dst = Path(output_dir).resolve()
    if not (src / "config.json").is_file():
        raise ValueError(f"{src}: no config.json: not a Hugging Face checkpoint dir")
    if (json.loads((src / "config.json").read_text()).get("quantization_config")):
        raise ValueError(f"{src}: already quantized (config.json has a quantization_config)")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True to replace it)")
    if calibration_texts is not None:
        calibration_texts = [str(t) for t in calibration_texts]
    ignore = [str(p) for p in ignore]
    no_calibration = calibration_texts is not None and len(calibration_texts) == 0
    if method == "modelopt" and no_calibration:
        raise ValueError("the ModelOpt path needs calibration texts (or None for the built-in ones)")

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        info: dict[str, Any]
        fallback_reason = None
        used = "rtn"
        if method in ("auto", "modelopt") and not no_calibration:
            version = modelopt_version()
            try:
                if version is None:
                    raise RuntimeError("nvidia-modelopt is not installed")
                info = _modelopt_in_child(src, tmp, calibration_texts, ignore, max_length, max_texts, timeout_s)
                used = "modelopt"
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                if method == "modelopt":
                    raise
                fallback_reason = str(exc).splitlines()[0][:500]
                log.warning("ModelOpt export unavailable (%s); using qscore's RTN exporter", fallback_reason)
                shutil.rmtree(tmp)
                tmp.mkdir()
        elif no_calibration:
            fallback_reason = "no calibration texts: ModelOpt needs them; RTN with input_scale 1.0"
        if used == "rtn":
            info = _run_rtn(src, tmp, calibration_texts, ignore, max_length, max_texts)
        exclude = _normalise_configs(tmp)
        copied = _copy_side_files(src, tmp)
        summary = _verify(tmp)
        import torch
        import transformers

        meta = {
            "tool": "qscore export-modelopt",
            "method": used,
            "independent_modelopt_checkpoint": used == "modelopt",
            "description": (
                "quantized and exported by nvidia-modelopt itself (mtq.quantize NVFP4_DEFAULT_CFG, "
                "export_hf_checkpoint): an independent ModelOpt checkpoint"
                if used == "modelopt" else
                "written by qscore's own round-to-nearest NVFP4 exporter in ModelOpt's layout "
                "(not produced by nvidia-modelopt)"
            ),
            "fallback_reason": fallback_reason,
            "source_model": str(src),
            "group_size": GROUP_SIZE,
            "ignore": ignore,
            "exclude_modules": exclude,
            "copied_files": copied,
            "layers": {k: v for k, v in summary.items() if k in ("schemes", "group_sizes", "with_input_scale")},
            "dense_modules": summary["dense"],
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **info,
        }
        _write_json(tmp / METADATA_FILE, meta)
        atomic.umask_file_modes(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    info = _run_modelopt(Path(spec["model_dir"]), Path(spec["out_dir"]), spec["texts"], spec["ignore"],
                         spec["max_length"], spec["max_texts"])
    _write_json(Path(spec["result"]), info)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.modelopt_export", description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model")
    ap.add_argument("--output")
    ap.add_argument("--method", default="auto", choices=["auto", "modelopt", "rtn"])
    ap.add_argument("--ignore", default="lm_head", help="comma-separated module names / patterns")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    if not args.model or not args.output:
        ap.error("--model and --output are required")
    logging.basicConfig(level=logging.INFO)
    out = export_modelopt_nvfp4(args.model, args.output, ignore=[p for p in args.ignore.split(",") if p],
                                method=args.method, overwrite=args.overwrite)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
