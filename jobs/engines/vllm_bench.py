"""What a checkpoint costs to serve, measured by vLLM itself: ``vllm serve`` in a subprocess, and vLLM's own
load generator and latency statistics (``vllm bench serve``, vllm/benchmarks/serve.py) against it.

The server is built from the same engine arguments and environment as every other engine qscore starts
(``jobs.engines.vllm.engine_spec``), turned into ``vllm serve`` flags. Three runs of ``vllm bench serve`` on
the random dataset with ``--ignore-eos`` (every request decodes exactly its output length):

- ``b1``: concurrency 1: decode speed and latencies of a single stream;
- ``loaded``: ``loaded_concurrency`` requests in flight: decode throughput and latencies under load;
- ``prefill``: output length 1 at the loaded concurrency: prompt tokens per second.

The three runs are ``vllm bench serve``'s own code called in this process (its ``add_cli_args`` and
``main_async`` on the command line below), imported while the server starts: three ``vllm bench serve``
processes would each import vLLM again (bench/RESULTS.md). Each run's JSON (``--save-result``) is read back;
the weights' GPU memory and the KV cache's capacity come from the server's own log lines. The parsing and
the command lines are pure and tested on the CPU.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from jobs.core.errors import BenchError

log = logging.getLogger("qscore.bench")

HOST = "127.0.0.1"
VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]  # the `vllm` console script, from this interpreter
PERCENTILES = (50, 99)
RUNS = ("b1", "loaded", "prefill")

# vLLM 0.26's log lines (vllm/v1/worker/gpu_model_runner.py, gpu/model_runner.py; vllm/v1/core/kv_cache_utils.py).
# The weights' memory is printed in GiB rounded to 2 decimals (vllm/utils/mem_utils.py format_gib): the
# figure is good to 0.005 GiB.
_WEIGHTS = re.compile(r"Model loading took ([\d.]+) GiB")
_KV_TOKENS = re.compile(r"GPU KV cache size: ([\d,]+) tokens")


@dataclass(frozen=True)
class Load:
    """One run of vLLM's benchmark: the random dataset's lengths, how many requests and how many at once."""

    name: str
    input_len: int
    output_len: int
    concurrency: int
    num_prompts: int
    seed: int  # another seed per run: no run's prompts repeat an earlier one's (prefix caching is off anyway)


def plan_loads(*, input_len: int, output_len: int, loaded_concurrency: int, num_prompts_b1: int,
               num_prompts: int) -> list[Load]:
    return [Load("b1", input_len, output_len, 1, num_prompts_b1, 1),
            Load("loaded", input_len, output_len, loaded_concurrency, num_prompts, 2),
            Load("prefill", input_len, 1, loaded_concurrency, num_prompts, 3)]


# -- pure parts ------------------------------------------------------------------------------------------
def serve_command(kwargs: dict, *, port: int, host: str = HOST) -> list[str]:
    """``vllm serve`` with the engine arguments ``kwargs`` (``engine_spec``'s, for ``LLM(**kwargs)``) as its flags:
    vLLM's engine-argument parser names each field ``--<field-with-dashes>``, booleans as ``--x`` / ``--no-x``,
    dicts as JSON (vllm/engine/arg_utils.py)."""
    args = [*VLLM_CLI, "serve", str(kwargs["model"]), "--host", host, "--port", str(port),
            "--disable-uvicorn-access-log"]  # one log line per request would bury the start-up lines
    for key, value in kwargs.items():
        if key == "model" or value is None:
            continue
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, dict):
            args += [f"--{flag}", json.dumps(value, sort_keys=True)]
        else:
            args += [f"--{flag}", str(value)]
    return args


def bench_command(load: Load, *, model: str, port: int, result_dir: Path, host: str = HOST) -> list[str]:
    """``vllm bench serve`` for one run; its result JSON goes to ``result_dir/<run>.json``."""
    return [*VLLM_CLI, "bench", "serve", "--backend", "vllm", "--host", host, "--port", str(port),
            "--model", model, "--dataset-name", "random",
            "--random-input-len", str(load.input_len), "--random-output-len", str(load.output_len),
            "--ignore-eos", "--temperature", "0",  # every request decodes output_len tokens, greedily
            "--max-concurrency", str(load.concurrency), "--num-prompts", str(load.num_prompts),
            # warm-up requests at the run's concurrency, not timed: the first steps of a fresh server are slower
            "--num-warmups", str(load.concurrency), "--seed", str(load.seed),
            "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", ",".join(map(str, PERCENTILES)),
            "--disable-tqdm", "--save-result", "--result-dir", str(result_dir),
            "--result-filename", f"{load.name}.json"]


def parse_server_log(lines: Sequence[str]) -> dict:
    """The weights' GPU memory (bytes) and the KV cache's capacity (tokens) from vLLM's log; None if absent."""
    out: dict = {"weight_memory_bytes": None, "kv_cache_tokens": None}
    for line in lines:
        m = _WEIGHTS.search(line)
        if m and out["weight_memory_bytes"] is None:
            out["weight_memory_bytes"] = int(round(float(m.group(1)) * 2**30))
        m = _KV_TOKENS.search(line)
        if m and out["kv_cache_tokens"] is None:
            out["kv_cache_tokens"] = int(m.group(1).replace(",", ""))
    return out


def check_result(load: Load, result: dict) -> None:
    """Refuse a run whose figures would not mean what their columns say: failed requests, or requests that
    stopped before their output length (the decode speed would count fewer tokens than were asked for)."""
    completed, failed = result.get("completed"), result.get("failed", 0)
    if completed != load.num_prompts or failed:
        raise BenchError(f"vLLM's benchmark ({load.name}): {completed} of {load.num_prompts} requests completed, "
                         f"{failed} failed")
    expected = load.num_prompts * load.output_len
    if result.get("total_output_tokens") != expected:
        raise BenchError(f"vLLM's benchmark ({load.name}): {result.get('total_output_tokens')} output tokens, "
                         f"expected {expected} ({load.num_prompts} x {load.output_len}, --ignore-eos)")


def figures(results: dict[str, dict]) -> dict[str, float]:
    """The archive's speed columns from the three runs' JSON (keys of vllm/benchmarks/serve.py ``benchmark``):
    decode speed is vLLM's ``output_throughput`` (output tokens / the run's duration), prefill speed the
    prompt tokens of the output-length-1 run over its duration, latencies its ``p50_*_ms`` / ``p99_*_ms``."""
    def key(run: str, name: str) -> float:
        try:
            return float(results[run][name])
        except (KeyError, TypeError, ValueError):
            raise BenchError(f"vLLM's benchmark result ({run}) has no {name!r}") from None

    out = {"prefill_tokens_per_s": key("prefill", "total_input_tokens") / key("prefill", "duration")}
    for run in ("b1", "loaded"):
        out[f"decode_tokens_per_s_{run}"] = key(run, "output_throughput")
        for metric in ("ttft", "itl"):
            for p in PERCENTILES:
                out[f"{metric}_p{p}_ms_{run}"] = key(run, f"p{p}_{metric}_ms")
    return out


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- the server and the runs ------------------------------------------------------------------------------
@contextlib.contextmanager
def server(kwargs: dict, env: dict, *, log_path: Path, timeout_s: float,
           while_starting: Callable[[], Any] = lambda: None) -> Iterator[tuple[int, Any]]:
    """``vllm serve`` on a free port, its output to ``log_path``; yields (the port, what ``while_starting``
    returned, called while the server starts) once /health answers. Stopped on the way out: SIGTERM to its
    process group (the engine core is its child), then SIGKILL."""
    port = free_port()
    cmd = serve_command(kwargs, port=port)
    log.info("starting vLLM's server (log: %s): %s", log_path, " ".join(cmd))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        meanwhile = while_starting()
        wait_healthy(proc, port, log_path=log_path, timeout_s=timeout_s)
        yield port, meanwhile
    finally:
        stop(proc)


def wait_healthy(proc: subprocess.Popen, port: int, *, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"http://{HOST}:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"vLLM's server exited with status {proc.returncode} before it was ready; "
                             f"its log {log_path} ends: {log_tail(log_path, 5)!r}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise BenchError(f"vLLM's server was not ready within {timeout_s:.0f} s (--timeout); log: {log_path}")


def stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("vLLM's server did not stop within %.0f s of SIGTERM: killed", grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def client() -> tuple[Callable, Callable]:
    """vLLM's benchmark client (vllm/benchmarks/serve.py), as ``vllm bench serve`` runs it: (its argument
    parser's ``parse_args``, its ``main_async``)."""
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    return parser.parse_args, serve.main_async


def run_load(load: Load, *, bench: tuple[Callable, Callable], model: str, port: int, work: Path,
             timeout_s: float) -> dict:
    """One run of vLLM's benchmark (``bench``: ``client()``); its saved result JSON, checked. What it prints
    goes to ``work/<run>.log``."""
    parse, main_async = bench
    cmd = bench_command(load, model=model, port=port, result_dir=work)
    log.info("vLLM's benchmark, %s: %s", load.name, " ".join(["vllm", *cmd[len(VLLM_CLI):]]))
    args = parse(cmd[len(VLLM_CLI) + 2:])  # what follows "bench serve", as vLLM's CLI hands it over
    log_path = work / f"{load.name}.log"
    with open(log_path, "w") as out, contextlib.redirect_stdout(out):  # stdout carries the stage's result
        try:
            asyncio.run(asyncio.wait_for(main_async(args), timeout_s))
        except TimeoutError:  # asyncio's too, since Python 3.11
            raise BenchError(f"vLLM's benchmark ({load.name}) ran past {timeout_s:.0f} s (--timeout); "
                             f"log: {log_path}") from None
        except Exception as e:  # vLLM's client raises what aiohttp or its dataset code raise
            raise BenchError(f"vLLM's benchmark ({load.name}) failed: {type(e).__name__}: {e}; "
                             f"log: {log_path}") from e
    result_path = work / f"{load.name}.json"
    if not result_path.exists():
        raise BenchError(f"vLLM's benchmark ({load.name}) saved no result; its log {log_path} ends: "
                         f"{log_tail(log_path, 5)!r}")
    result = json.loads(result_path.read_text())
    check_result(load, result)
    return result


def measure(kwargs: dict, env: dict, loads: Sequence[Load], *, work: Path, timeout_s: float) -> dict:
    """Start the server, run every load against it, stop it: {"results": {run: JSON}, "server": {...}}."""
    log_path = work / "server.log"
    t0 = time.perf_counter()
    results = {}
    with server(kwargs, env, log_path=log_path, timeout_s=timeout_s, while_starting=client) as (port, bench):
        start_s = time.perf_counter() - t0
        for load in loads:
            results[load.name] = run_load(load, bench=bench, model=str(kwargs["model"]), port=port, work=work,
                                          timeout_s=timeout_s)
    lines = log_path.read_text(errors="replace").splitlines()
    return {"results": results,
            "server": {**parse_server_log(lines), "start_s": round(start_s, 2),
                       "command": ["vllm", *serve_command(kwargs, port=port)[len(VLLM_CLI):]]}}
