"""Run a command on a share of a GPU (or on whole GPUs) that nobody else holds, under ``make -j``.

    python3 -m jobs slots --gpus all --model models/x --max-model-len 2048 -- docker run --gpus {gpus} ... score ...

A scoring job whose model fits beside others gets a *share* of one GPU: the memory vLLM needs for it,
estimated from the checkpoint on disk and the engine's settings (``memory_need``), as a fraction of the
GPU's memory. The share reaches the job as ``GPU_MEMORY_UTILIZATION`` (vLLM's budget, a fraction of the
GPU's total memory), so several jobs run on one GPU while their shares sum to at most 1 - ``RESERVE``.
A job without ``--model`` (tensor parallelism, lm-eval's tasks, the transformers backend, a
GPU_MEMORY_UTILIZATION the user set), or whose checkpoint is not found, takes whole GPUs, alone.

Each GPU's holders are a ledger, ``gpu<N>.json`` in the lock directory (pid -> share), read and written
under one ``flock``; an entry whose process is gone is dropped, so a killed job never keeps its share.
vLLM sizes its KV cache by profiling at start-up and assumes no other process changes the GPU's memory
meanwhile: a job is *starting* until vLLM logs that its engine is up (or it exits), and no other job
on that GPU is launched while one is starting. So one job's start-up overlaps the others' scoring, never
their start-ups. The command gets its GPUs as ``CUDA_VISIBLE_DEVICES`` and, for docker, in place of
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
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

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
# request after the forward pass, outside the profiled peak, so this is memory beside vLLM's budget.
LOGPROB_BYTES = 12
# vLLM's line once an engine has profiled, allocated its KV cache and warmed up (vLLM 0.26, the same line
# jobs/engines/vllm.py times), and its KV cache size; its assertion when another process changed the
# GPU's memory during that profile (a neighbour that finished: the job is launched again).
READY = re.compile(r"init engine \(profile, create kv cache")
KV_LINE = re.compile(r"GPU KV cache size: ([\d,]+) tokens")
PROFILE_RACE = "Error in memory profiling"
RETRIES = 2
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
    activations: int  # peak of one step, which vLLM profiles and keeps out of its KV cache
    kv: int
    kv_tokens: int
    extra: int  # prompt logprobs: used beside vLLM's budget (not profiled)

    @property
    def budget(self) -> int:
        """vLLM's budget: what gpu_memory_utilization must cover for the KV cache to hold ``kv_tokens``."""
        return self.weights + OVERHEAD + self.activations + self.kv


def memory_need(weights: int, config: dict, *, max_model_len: int, batched_tokens: int | None = None,
                max_seqs: int | None = None, w4a4_emulated: bool = False) -> Need:
    """The memory of a prompt-scoring job (pure). Activations are bounded from above: every intermediate of
    one decoder layer at ``batched_tokens`` (qkv, attention out, gate/up, the activation, the residual
    stream), twice for the kernels' temporaries, and the sampler's float32 logits of ``max_seqs`` rows.
    W4A4 emulated (vLLM's ``emulation`` linear backend off Blackwell) dequantizes each layer's weight to
    bf16 and rounds its input through float32 inside every forward: the largest layer's weight in bf16,
    twice, and three float32 copies of the widest input; this is profiled by vLLM, so it is in the budget."""
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


def shares(need: Need, total: int, slack: int = 0) -> tuple[float, float]:
    """(gpu_memory_utilization, footprint) as fractions of ``total``, rounded up to 0.01 (pure). ``slack``:
    memory that neighbours may still take while this engine profiles (their prompt-logprob buffers), which
    vLLM would count as its own and take from the KV cache: the budget grows by it."""
    util = _up((need.budget + slack) / total)
    return util, _up(util + need.extra / total)


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
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
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
    """Whether a job of ``share`` may join ``entries`` (pure): nobody alone there, nobody starting, and the
    footprints sum to at most 1 - RESERVE; a job wanting the whole GPU waits until it is empty."""
    if exclusive:
        return not entries
    if any(e["exclusive"] or e["starting"] for e in entries.values()):
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

    def take(self, gpus: list[str], n: int, entry_for) -> tuple[list[str], dict] | None:
        """Record this process on ``n`` of ``gpus`` where ``entry_for(holders)`` fits; None if none fit now.
        ``entry_for`` returns this job's entry given the holders of a GPU (its share may depend on them)."""
        def go():
            chosen, entry = [], None
            for g in gpus:
                holders = self._read(g)
                e = entry_for(holders)
                if fits(holders, e["share"], e["exclusive"]):
                    chosen.append((g, holders, e))
                if len(chosen) == n:
                    break
            if len(chosen) < n:
                return None
            for g, holders, e in chosen:
                self._write(g, {**holders, str(os.getpid()): e})
                entry = e
            return [g for g, _, _ in chosen], entry
        return self._locked(go)

    def update(self, gpus: list[str], **changes) -> None:
        def go():
            for g in gpus:
                holders = self._read(g)
                if str(os.getpid()) in holders:
                    holders[str(os.getpid())].update(changes)
                    self._write(g, holders)
        self._locked(go)

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


def run_once(cmd: list[str], ids: list[str], env: dict, ledger: Ledger | None,
             need_tokens: int | None) -> tuple[int, bool]:
    """Run the command; while it starts, pass its stderr through and watch for vLLM's lines. Returns (exit
    status, whether vLLM's profile met another process's change of memory)."""
    proc = subprocess.Popen([c.replace("{gpus}", docker_value(ids)) for c in cmd], env=env,
                            stderr=subprocess.PIPE if ledger else None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: proc.send_signal(s))
    race = [False]

    def watch():  # passed through as it comes (progress bars end lines with \r), matched line by line
        rest = b""
        while chunk := os.read(proc.stderr.fileno(), 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            *lines, rest = (rest + chunk).split(b"\n")
            rest = rest[-65536:]
            for raw in lines:
                seen(raw.decode("utf-8", "replace"))

    def seen(line: str) -> None:
        m = KV_LINE.search(line)
        if m and need_tokens and int(m.group(1).replace(",", "")) < need_tokens:
            print(f"slots: warning: the KV cache holds {m.group(1)} tokens, fewer than the {need_tokens:,} a "
                  "step may need: this job may batch otherwise than alone", file=sys.stderr, flush=True)
        if READY.search(line):
            ledger.update(ids, starting=False)
        race[0] = race[0] or PROFILE_RACE in line

    reader = threading.Thread(target=watch, daemon=True) if ledger else None
    if reader:
        reader.start()
    code = proc.wait()
    if reader:  # a process the command left behind may hold its stderr open: not waited for long
        reader.join(timeout=30)
    return code, race[0]


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
    shared = a.per_job == 1 and (a.share is not None or (need is not None and total is not None))
    if need and total and shares(need, total)[1] > 1 - RESERVE:
        shared = False  # it needs the whole GPU anyway

    def entry_for(holders: dict) -> dict:
        if not shared:
            return {"share": 1.0, "extra": 0.0, "exclusive": True, "starting": False, "started": _started(os.getpid())}
        if a.share is not None:
            util, share, extra = a.share, a.share, 0.0
        else:
            slack = int(sum(e["extra"] for e in holders.values()) * total)
            util, share = shares(need, total, slack)
            extra = need.extra / total
        return {"share": share, "util": util, "extra": extra, "exclusive": False, "starting": True,
                "started": _started(os.getpid())}

    ledger = Ledger(Path(a.lock_dir))
    for attempt in range(RETRIES + 1):
        announced = False
        while (got := ledger.take(gpus, a.per_job, entry_for)) is None:
            if not announced:
                what = "a share of a GPU" if shared else f"{a.per_job} free GPU(s)"
                print(f"slots: waiting for {what} of {','.join(gpus)}", file=sys.stderr, flush=True)
                announced = True
            time.sleep(a.poll)
        ids, entry = got
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(ids)}
        if shared:
            env["GPU_MEMORY_UTILIZATION"] = f"{entry['util']:.2f}"
            print(f"slots: GPU {ids[0]}, gpu_memory_utilization {entry['util']:.2f} (share {entry['share']:.2f})",
                  file=sys.stderr, flush=True)
        else:
            print(f"slots: GPU {','.join(ids)}", file=sys.stderr, flush=True)
        try:
            code, race = run_once(cmd, ids, env, ledger if shared else None, need.kv_tokens if need else None)
        finally:
            ledger.release(ids)
        if not (code and race and attempt < RETRIES):
            return code
        print("slots: another job's memory changed during vLLM's profile; starting this job again",
              file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
