"""Bench stage: what one checkpoint costs to serve, as one row of ``results/bench/model=<label>/bench.parquet``.

Bytes on disk are read anywhere. With vLLM and a GPU, ``jobs.engines.vllm_bench`` starts ``vllm serve`` with
the engine arguments every other stage uses and measures it with vLLM's own benchmark: the weights' GPU
memory, the KV cache's capacity, prefill and decode speed, TTFT and inter-token latency. Every figure is
labelled with the GPU and the arithmetic that produced it; an emulated arithmetic's speed is marked as no
deployment's (``deployment_speed`` false). Without a GPU or vLLM the row keeps the speed columns null.

The benchmark needs its GPU to itself: a neighbour's work would be measured too. Resume: a row with the same
settings is kept (skipped), one with other settings is refused unless ``overwrite``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from jobs.archive import bench as bench_archive
from jobs.archive.fingerprint import fingerprint
from jobs.checkpoints import arithmetic as arith_mod
from jobs.checkpoints.checkpoint import check_max_model_len, inspect, weight_files
from jobs.core import atomic, hub, locks, provenance
from jobs.core.errors import SettingsError
from jobs.core.phases import Phases
from jobs.core.settings import BenchSettings, Nvfp4Compute

log = logging.getLogger("qscore.bench")

NO_GPU = "speed needs a GPU: none here"
NO_VLLM = "speed needs vLLM: not installed here"


@dataclasses.dataclass(frozen=True)
class Device:
    gpu: str  # the CUDA device's name, or "none"
    capability: float | None
    vllm: str | None  # vLLM's version, None when it is not installed

    @property
    def can_measure(self) -> bool:
        return self.gpu != "none" and self.vllm is not None


def device() -> Device:
    """This machine's first GPU and vLLM. With vLLM, read through its platform (NVML): no CUDA context in this
    process, whose memory the server's share of the GPU would otherwise have to leave free."""
    vllm_version = provenance.versions("vllm")["vllm"] if importlib.util.find_spec("vllm") else None
    if vllm_version:
        from jobs.engines.vllm import gpu_capability

        cap = gpu_capability()
        if cap is None:
            return Device("none", None, vllm_version)
        from vllm.platforms import current_platform

        return Device(str(current_platform.get_device_name(0)), cap, vllm_version)
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return Device(torch.cuda.get_device_name(0), major + minor / 10, None)
    except ImportError:
        pass
    return Device("none", None, None)


def nvfp4_mode(asked: str, capability: float | None) -> Nvfp4Compute:
    return arith_mod.serving_mode(capability) if asked == "auto" else Nvfp4Compute(asked)


def bytes_on_disk(path: Path) -> int:
    """The checkpoint's weight files, as the index names them (or every *.safetensors)."""
    return sum(f.stat().st_size for f in weight_files(Path(path)))


def describe(arith: arith_mod.Arithmetic, dev: Device) -> tuple[bool, str]:
    """(deployment_speed, note) of a row measured on ``dev``."""
    if not dev.can_measure:
        return False, NO_GPU if dev.gpu == "none" else NO_VLLM
    cc = f"sm_{round(dev.capability * 10)}" if dev.capability is not None else "sm_?"
    how = {"marlin": " (vLLM's Marlin kernel)", "emulation": " (vLLM's emulation backend)"}.get(
        arith.vllm_linear_backend, "")
    where = f"{arith.label}{how} on {dev.gpu} ({cc}), vLLM {dev.vllm}"
    if arith.label == arith_mod.W4A4_EMULATED:
        return False, f"{where}: emulated arithmetic, not a deployment speed"
    return True, where


def check(s: BenchSettings) -> None:
    bench_archive.bench_path(s.results_dir, s.label)  # the label names a directory
    if s.engine.tensor_parallel_size != 1:
        raise SettingsError("--tensor-parallel-size: the bench stage measures one GPU (1)")


def run(*, settings: BenchSettings) -> Path:
    s = settings
    phases = Phases()
    check(s)
    final = bench_archive.bench_path(s.results_dir, s.label)
    try:
        with locks.hold(final, what="benchmark"):
            return _run(s, final, phases)
    finally:
        phases.log(log, s.label)


def _run(s: BenchSettings, final: Path, phases: Phases) -> Path:
    with phases("read"):
        atomic.remove_stale_temporaries(final)
        model_path = hub.resolve(s.model, "model")
        ckpt = inspect(model_path)
        check_max_model_len(ckpt, s.engine.max_model_len)
        size = bytes_on_disk(model_path)
    with phases("startup"):  # vLLM's platform module, imported to read the GPU
        dev = device()
    mode = nvfp4_mode(s.nvfp4_compute, dev.capability)
    engine = s.engine.replace(nvfp4_compute=mode)
    arith = arith_mod.resolve(ckpt.quant, mode, backend="vllm", capability=dev.capability)
    fp = fingerprint({"schema": bench_archive.SCHEMA_VERSION, "model_hash": ckpt.content_hash, "gpu": dev.gpu,
                      "vllm": dev.vllm, "arithmetic": arith.label, "engine": dataclasses.asdict(engine),
                      "input_len": s.input_len, "output_len": s.output_len,
                      "loaded_concurrency": s.loaded_concurrency, "num_prompts": s.num_prompts,
                      "num_prompts_b1": s.num_prompts_b1})
    old = bench_archive.read_fingerprint(final)
    if old is not None and not s.overwrite:
        if old == fp:
            log.info("%s: already measured with the same settings, skipped (%s)", final, fp)
            return final
        raise SettingsError(f"{final} already holds a benchmark with other settings (fingerprint {old} != {fp}); "
                            "pass --overwrite to replace it, or use another --label")

    deployment, note = describe(arith, dev)
    row = {"label": s.label, "model": s.model, "gpu": dev.gpu, "deployment_speed": deployment, "note": note,
           "bytes_on_disk": size, "input_len": s.input_len, "output_len": s.output_len,
           "loaded_concurrency": s.loaded_concurrency,
           # without a GPU no arithmetic runs: the row names the scheme the checkpoint declares
           "arithmetic": arith.label if dev.can_measure else ckpt.quant.scheme,
           "weight_memory_bytes": None, "kv_cache_tokens": None, "gpu_memory_utilization": None,
           **{c: None for c in bench_archive.SPEED_COLUMNS}}
    meta = {"fingerprint": fp,
            "model": {"label": s.label, "ref": s.model, "path": str(model_path), "content_hash": ckpt.content_hash,
                      "architecture": ckpt.architecture},
            "quantization": {"method": ckpt.quant.method, "format": ckpt.quant.format, "scheme": ckpt.quant.scheme},
            "runtime": {"gpu_name": dev.gpu, "compute_capability": dev.capability, "vllm": dev.vllm,
                        "arithmetic": arith.label, "nvfp4_compute": arith.recorded_mode,
                        "nvfp4_compute_asked": s.nvfp4_compute, "linear_backend": arith.vllm_linear_backend,
                        **provenance.versions("torch", "transformers", "compressed-tensors")},
            "settings": {"input_len": s.input_len, "output_len": s.output_len,
                         "loaded_concurrency": s.loaded_concurrency, "num_prompts": s.num_prompts,
                         "num_prompts_b1": s.num_prompts_b1, "engine": dataclasses.asdict(engine)},
            "host": provenance.host(), "command": provenance.command_line()}
    if dev.can_measure:
        row_more, meta_more = _measure(s, engine, arith, model_path, final, phases)
        row.update(row_more)
        meta.update(meta_more)
    else:
        log.warning("%s: %s; writing bytes on disk and the declared scheme only", s.label, note)
    with phases("write"):
        meta["phases"] = phases.snapshot()
        meta["created"] = provenance.now()
        bench_archive.write(final, row, meta)
    log.info("wrote %s (%s)", final, note)
    return final


def _measure(s: BenchSettings, engine, arith, model_path: Path, final: Path, phases: Phases) -> tuple[dict, dict]:
    from jobs.engines import vllm_bench
    from jobs.engines.vllm import engine_spec

    spec = engine_spec(model_path, engine, arith, scoring=False)
    env = dict(os.environ)
    for key, value in spec.env.items():
        env.setdefault(key, value)  # a value the user set wins, as for every engine
    work = final.parent / ".bench-work"  # hidden: the server's log and vLLM's result files, kept on failure
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    loads = vllm_bench.plan_loads(input_len=s.input_len, output_len=s.output_len,
                                  loaded_concurrency=s.loaded_concurrency, num_prompts_b1=s.num_prompts_b1,
                                  num_prompts=s.num_prompts)
    with phases("score"):
        measured = vllm_bench.measure(spec.kwargs, env, loads, work=work, timeout_s=s.timeout)
    shutil.rmtree(work, ignore_errors=True)
    server = measured["server"]
    row = {"weight_memory_bytes": server["weight_memory_bytes"], "kv_cache_tokens": server["kv_cache_tokens"],
           "gpu_memory_utilization": None if engine.kv_cache_memory_bytes else engine.gpu_memory_utilization,
           **vllm_bench.figures(measured["results"])}
    meta = {"server": {**server, "compile_reason": spec.compile_reason,
                       "env": {k: env[k] for k in spec.env}},
            "loads": [dataclasses.asdict(x) for x in loads],
            "vllm_bench": measured["results"]}  # vLLM's own result JSON of each run, as saved
    return row, meta
