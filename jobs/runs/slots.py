"""Run a command on a share of a GPU (or on whole GPUs) that nobody else holds, under ``make -j``.

    python3 -m jobs slots --gpus all --model models/x --max-model-len 2048 -- docker run --gpus {gpus} ... score ...

A scoring job whose model fits beside others gets a *share* of one GPU: the memory vLLM needs for it,
estimated from the checkpoint on disk and the engine's settings (``memory_need``), as a fraction of the
GPU's memory. The job gets its KV cache as ``KV_CACHE_MEMORY_BYTES`` (vLLM's ``kv_cache_memory_bytes``:
enough for every step, fixed, so it batches exactly as alone) and its share as ``GPU_MEMORY_UTILIZATION``
(the free memory vLLM checks for at start), so several jobs run on one GPU while their shares sum to at
most 1 - ``RESERVE``.
A job without ``--model`` (tensor parallelism, lm-eval's tasks, the transformers backend, a
GPU_MEMORY_UTILIZATION the user set), or whose checkpoint is not found, takes whole GPUs, alone.

Each GPU's holders are a ledger, ``gpu<N>.json`` in the lock directory (pid -> share), read and written
under one ``flock``; an entry whose process is gone is dropped, so a killed job never keeps its share.
A KV cache sized by vLLM's own profile would count a neighbour's memory changes as its own (and vLLM
stops when a neighbour frees memory during that profile); with its size given, vLLM skips that
measurement, so jobs start side by side and one job's start-up overlaps another's scoring. The command gets its GPUs as ``CUDA_VISIBLE_DEVICES`` and, for docker, in place of
``{gpus}`` (``device=0`` or ``"device=0,1"``). ``--gpus`` takes the Makefile's GPUS: ``all`` (every GPU
nvidia-smi lists), ``device=0``, ``"device=0,1"`` or ``0,1``. Standard library only: the Makefile runs it
with the host's python3.

Written here rather than taken from a scheduler because on one host none is installed to take it
from; on a cluster, `make k8s` / `make slurm` hand the same jobs to Kubernetes or Slurm instead.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from jobs.core.phases import start_ticks
from jobs.core.settings import EngineOptions

GIB = 1 << 30
# Of every GPU's memory, never handed out: each process's CUDA context exists before vLLM checks that its
# share is free, and the allocator rounds; 3 % of an H200 is 4.2 GiB.
RESERVE = 0.03
# Per engine, beyond weights, activations and KV: CUDA context, cuBLAS and attention workspaces, the
# sampler's and the scheduler's buffers. Scoring runs eager or compiled without CUDA graphs (jobs/engines/vllm.py).
OVERHEAD = 2 * GIB
BLOCK_TOKENS = 16  # vLLM's KV block on CUDA
# vLLM's LLM-class defaults where the user sets none: 16384 / 1024 on GPUs of >= 70 GiB, 8192 / 256 below.
# The larger pair everywhere: on a smaller GPU it over-budgets by a few GiB, never under.
DEFAULT_BATCHED_TOKENS, DEFAULT_MAX_SEQS = 16384, 1024
# Prompt logprobs: per position of one request's chunk, the vocabulary-wide bf16 logits, their float32
# copy and float32 log-softmax (10 bytes), plus 2 for top-k and the allocator. vLLM computes them request by
# request after the forward pass, outside the profiled peak.
LOGPROB_BYTES = 12
DEFAULT_MAX_MODEL_LEN = next(f.default for f in fields(EngineOptions) if f.name == "max_model_len")


# -- the estimate (pure) ----------------------------------------------------------------------------------
def text_config(config: dict) -> dict:
    """The language model's part of a config (a multimodal config nests it)."""
    return config.get("text_config") or config.get("llm_config") or config


def _dtype_bytes(config: dict) -> int:
    c = text_config(config)
    dtype = str(c.get("torch_dtype") or c.get("dtype") or config.get("torch_dtype") or config.get("dtype") or "bf16")
    return 4 if "32" in dtype else 2


def kv_bytes_per_token(config: dict) -> int:
    """KV cache bytes of one token: K and V of every layer, in the model's dtype (vLLM's default cache dtype)."""
    c = text_config(config)
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", heads) * head_dim * _dtype_bytes(config)


def kv_tokens(max_model_len: int, batched_tokens: int, max_seqs: int) -> int:
    """KV cache tokens that every step of a prompt-scoring run can hold, so that the scheduler never waits for
    or preempts on KV blocks and batches exactly as on an idle GPU: a step schedules at most ``batched_tokens``
    new tokens, and a request whose prefill was cut at the previous step's budget keeps up to
    ``max_model_len`` tokens beside them (requests that finish free theirs: one sampled token each); every
    request rounds up to a block, and vLLM keeps one null block."""
    requests = min(max_seqs, batched_tokens)
    return batched_tokens + max_model_len + (requests + 1) * BLOCK_TOKENS


@dataclass(frozen=True)
class Need:
    """What one prompt-scoring engine needs, in bytes."""

    weights: int
    activations: int  # peak of one step
    kv: int  # the KV cache the job is given (KV_CACHE_MEMORY_BYTES)
    kv_tokens: int
    extra: int  # prompt logprobs, beside the forward pass's peak

    @property
    def footprint(self) -> int:
        return self.weights + OVERHEAD + self.activations + self.kv + self.extra


def memory_need(weights: int, config: dict, *, max_model_len: int, batched_tokens: int | None = None,
                max_seqs: int | None = None, w4a4_emulated: bool = False) -> Need:
    """The memory of a prompt-scoring job (pure). Activations are bounded from above: every intermediate of
    one decoder layer at ``batched_tokens`` (qkv, attention out, gate/up, the activation, the residual
    stream), twice for the kernels' temporaries, and the sampler's float32 logits of ``max_seqs`` rows.
    W4A4 emulated (vLLM's ``emulation`` linear backend off Blackwell) dequantizes each layer's weight to
    bf16 and rounds its input through float32 inside every forward: the largest layer's weight in bf16,
    twice, and three float32 copies of the widest input."""
    c = text_config(config)
    batched = batched_tokens or DEFAULT_BATCHED_TOKENS
    seqs = max_seqs or DEFAULT_MAX_SEQS
    hidden, inter = c["hidden_size"], c.get("intermediate_size") or 4 * c["hidden_size"]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    qkv = (heads + 2 * c.get("num_key_value_heads", heads)) * head_dim
    vocab = c["vocab_size"]
    act = _dtype_bytes(config)
    activations = 2 * batched * (qkv + heads * head_dim + 3 * inter + 4 * hidden) * act + 2 * seqs * vocab * 4
    if w4a4_emulated:
        activations += 2 * 2 * max(2 * inter, qkv) * hidden * 2 + 3 * batched * max(inter, hidden) * 4
    tokens = kv_tokens(max_model_len, batched, seqs)
    return Need(weights=weights, activations=activations, kv=tokens * kv_bytes_per_token(config), kv_tokens=tokens,
                extra=min(max_model_len, batched) * vocab * LOGPROB_BYTES)


def _up(x: float) -> float:
    return math.ceil(round(x * 100, 6)) / 100


def share_of(need: Need, total: int) -> float:
    """The job's footprint as a fraction of ``total``, rounded up to 0.01 (pure)."""
    return _up(need.footprint / total)


# -- the checkpoint ---------------------------------------------------------------------------------------
def find_checkpoint(model: str, hf_home: str | None) -> Path | None:
    """A local directory, or a hub id's snapshot in HF_HOME's cache (the revision ``refs/main`` names)."""
    if Path(model, "config.json").is_file():
        return Path(model)
    repo = Path(hf_home or os.path.expanduser("~/.cache/huggingface"), "hub", "models--" + model.replace("/", "--"))
    try:
        snap = repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    return snap if (snap / "config.json").is_file() else None


def weight_bytes(path: Path) -> int:
    """Bytes of the weights vLLM loads: the safetensors files (packed FP4 stays packed on the GPU)."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def declares_w4a4(path: Path) -> bool:
    """A checkpoint whose FP4 quantization covers activations too (llm-compressor's NVFP4, ModelOpt's NVFP4)."""
    texts = [p.read_text() for p in (path / "config.json", path / "hf_quant_config.json") if p.is_file()]
    q = [json.loads(t).get("quantization_config") or json.loads(t).get("quantization") or {} for t in texts]
    if any("NVFP4" in str(x.get("quant_algo", "")).upper() for x in q):
        return True
    groups = [g for x in q for g in (x.get("config_groups") or {}).values() if isinstance(g, dict)]
    return any((g.get("input_activations") or {}).get("num_bits") == 4 for g in groups)


def gpu_total_bytes(gpu: str) -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--id={gpu}", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return int(float(out.split()[0]) * (1 << 20))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# -- GPUs -------------------------------------------------------------------------------------------------
def parse_gpus(value: str, listed: list[str] | None = None) -> list[str]:
    """GPU ids from a GPUS value (pure): ``all`` means ``listed`` (what nvidia-smi reports)."""
    value = value.strip().strip("'\"")
    if value == "all":
        return list(listed or [])
    value = value.removeprefix("device=")
    return [g for g in re.split(r"[,\s]+", value) if g]


def nvidia_smi_gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in out.splitlines() if ln.strip()]


def docker_value(gpus: list[str]) -> str:
    return f"device={gpus[0]}" if len(gpus) == 1 else f'"device={",".join(gpus)}"'


# -- the ledger -------------------------------------------------------------------------------------------
def _started(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), None if it is gone: a reused pid is another process."""
    try:
        return start_ticks(pid)
    except (OSError, IndexError):  # no /proc (not Linux), or the process is gone
        try:
            os.kill(pid, 0)
            return ""
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""


def alive(entries: dict) -> dict:
    """The entries whose process still runs (pure but for /proc)."""
    out = {}
    for pid, e in entries.items():
        started = _started(int(pid))
        if started is not None and (not e.get("started") or not started or started == e["started"]):
            out[pid] = e
    return out


def fits(entries: dict, share: float, exclusive: bool) -> bool:
    """Whether a job of ``share`` may join ``entries`` (pure): nobody alone there, and the footprints sum to
    at most 1 - RESERVE; a job wanting the whole GPU waits until it is empty."""
    if exclusive:
        return not entries
    if any(e["exclusive"] for e in entries.values()):
        return False
    return sum(e["share"] for e in entries.values()) + share <= 1 - RESERVE + 1e-9


class Ledger:
    """``gpu<N>.json`` files in ``lock_dir``, changed only under ``ledger.lock``."""

    def __init__(self, lock_dir: Path):
        self.dir = lock_dir
        lock_dir.mkdir(parents=True, exist_ok=True)

    def _path(self, gpu: str) -> Path:
        return self.dir / f"gpu{gpu}.json"

    def _read(self, gpu: str) -> dict:
        try:
            return alive(json.loads(self._path(gpu).read_text()))
        except (OSError, ValueError):
            return {}

    def _write(self, gpu: str, entries: dict) -> None:
        tmp = self._path(gpu).with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, self._path(gpu))

    def _locked(self, fn):
        with open(self.dir / "ledger.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            return fn()

    def take(self, gpus: list[str], n: int, entry: dict) -> list[str] | None:
        """Record this process's ``entry`` on ``n`` of ``gpus`` where it fits; None if none fit now."""
        def go():
            chosen = [(g, h) for g in gpus for h in [self._read(g)] if fits(h, entry["share"], entry["exclusive"])]
            if len(chosen) < n:
                return None
            for g, holders in chosen[:n]:
                self._write(g, {**holders, str(os.getpid()): entry})
            return [g for g, _ in chosen[:n]]
        return self._locked(go)

    def release(self, gpus: list[str]) -> None:
        def go():
            for g in gpus:
                holders = self._read(g)
                holders.pop(str(os.getpid()), None)
                self._write(g, holders)
        self._locked(go)


# -- running ----------------------------------------------------------------------------------------------
def estimate(a) -> Need | None:
    """The job's need from its checkpoint, or None (no --model, or its checkpoint is not here)."""
    if not a.model:
        return None
    path = find_checkpoint(a.model, a.hf_home)
    if path is None:
        return None
    try:
        config = json.loads((path / "config.json").read_text())
        weights = weight_bytes(path)
        if not weights:
            return None
        return memory_need(weights, config, max_model_len=a.max_model_len, batched_tokens=a.max_num_batched_tokens,
                           max_seqs=a.max_num_seqs, w4a4_emulated=not a.weight_only and declares_w4a4(path))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run(cmd: list[str], ids: list[str], env: dict) -> int:
    proc = subprocess.Popen([c.replace("{gpus}", docker_value(ids)) for c in cmd], env=env)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: proc.send_signal(s))
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs slots", description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", required=True)
    ap.add_argument("--per-job", default="1", help="GPUs per job, or all of --gpus (more than 1: whole GPUs)")
    ap.add_argument("--lock-dir", default=os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp",
                                                       f"qscore-gpu-locks-{os.getuid()}"))
    ap.add_argument("--model", help="the checkpoint (local path or hub id) of a prompt-scoring job that may share "
                                    "a GPU; without it the job takes whole GPUs")
    ap.add_argument("--hf-home", default=os.environ.get("HF_HOME"),
                    help="where a hub id's snapshot is cached [default HF_HOME, else ~/.cache/huggingface]")
    ap.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--weight-only", action="store_true", help="NVFP4 scored as W4A16 (no W4A4 emulation)")
    ap.add_argument("--share", type=float, default=None, help="the job's share of a GPU, given instead of estimated")
    ap.add_argument("--gpu-memory", type=float, default=None, help="GiB of each GPU [default: nvidia-smi's]")
    ap.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command given")
    gpus = parse_gpus(a.gpus, nvidia_smi_gpus() if a.gpus.strip().strip("'\"") == "all" else None)
    if not gpus:  # all, but nvidia-smi lists none: let the command find its GPUs itself
        return subprocess.call([c.replace("{gpus}", "all") for c in cmd])
    a.per_job = len(gpus) if a.per_job == "all" else int(a.per_job)
    if a.per_job > len(gpus):
        print(f"error: a job needs {a.per_job} GPUs but GPUS lists {len(gpus)} ({','.join(gpus)})", file=sys.stderr)
        return 1
    need = estimate(a) if a.per_job == 1 and a.share is None else None
    total = int(a.gpu_memory * GIB) if a.gpu_memory else (gpu_total_bytes(gpus[0]) if need else None)
    share = a.share if a.share is not None else (share_of(need, total) if need and total else None)
    shared = a.per_job == 1 and share is not None and share <= 1 - RESERVE  # else: it needs whole GPUs anyway
    entry = {"share": share if shared else 1.0, "exclusive": not shared, "started": _started(os.getpid())}
    ledger = Ledger(Path(a.lock_dir))
    announced = False
    while (ids := ledger.take(gpus, a.per_job, entry)) is None:
        if not announced:
            what = "a share of a GPU" if shared else f"{a.per_job} free GPU(s)"
            print(f"slots: waiting for {what} of {','.join(gpus)}", file=sys.stderr, flush=True)
            announced = True
        time.sleep(a.poll)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(ids)}
    if shared:
        env["GPU_MEMORY_UTILIZATION"] = f"{share:.2f}"
        if need:
            env["KV_CACHE_MEMORY_BYTES"] = str(need.kv)
        print(f"slots: GPU {ids[0]}, share {share:.2f}" + (f", KV cache {need.kv / GIB:.1f} GiB "
              f"({need.kv_tokens:,} tokens)" if need else ""), file=sys.stderr, flush=True)
    else:
        print(f"slots: GPU {','.join(ids)}", file=sys.stderr, flush=True)
    try:
        return run(cmd, ids, env)
    finally:
        ledger.release(ids)


if __name__ == "__main__":
    sys.exit(main())
