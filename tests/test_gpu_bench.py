"""The bench stage on a GPU: ``vllm serve`` and vLLM's own benchmark against the GPU tests' tiny checkpoints (run
on a CUDA host with vLLM: pytest -m gpu tests/test_gpu_bench.py).

Fixtures as in test_gpu.py (QSCORE_GPU_FIXTURES, else built here). The stage runs as a subprocess, as in its
container; each test starts one server (about a minute with eager execution), so the timeouts are generous. On
failure the server's log (kept in the hidden .bench-work directory) is printed. Nothing is asserted on speed
beyond its sign: figures belong in bench/RESULTS.md.
"""
from __future__ import annotations

import importlib.util

import pytest

from conftest import cli_subprocess
from gpu_fixtures import cuda_available, write_report
from jobs.archive import bench as bench_archive
from jobs.checkpoints import arithmetic as arith_mod

pytestmark = pytest.mark.gpu

needs_vllm = pytest.mark.skipif(not cuda_available() or importlib.util.find_spec("vllm") is None,
                                reason="needs a CUDA GPU and vLLM")
# small and eager: the plumbing and the figures' sanity, not a deployment's speed
OPTS = ["--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-model-len", "1024", "--input-len", "128",
        "--output-len", "32", "--loaded-concurrency", "8", "--num-prompts", "32", "--num-prompts-b1", "4",
        "--timeout", "900"]
REPORT = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    yield tmp_path_factory.mktemp("gpu-bench")
    write_report(REPORT, "QSCORE_GPU_BENCH_REPORT")


def run_bench(model, label, results, *extra) -> dict:
    r = cli_subprocess("bench", "--model", model, "--label", label, "--results-dir", results, *OPTS, *extra,
                       timeout=3000)
    work = bench_archive.bench_path(results, label).parent / ".bench-work"
    logs = "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-6000:]}" for p in sorted(work.glob("*.log"))
                   ) if work.is_dir() else ""
    assert r.returncode == 0, r.stderr[-4000:] + logs
    row, meta = bench_archive.read(bench_archive.bench_path(results, label))
    REPORT[label] = {"row": row, "server": meta.get("server")}
    print(label, row)
    return row


def check_measured(row: dict) -> None:
    assert row["gpu"] != "none"
    assert row["weight_memory_bytes"] is not None and row["weight_memory_bytes"] >= 0  # 0.01 GiB resolution
    assert row["kv_cache_tokens"] > 0 and row["gpu_memory_utilization"] == 0.3
    for c in bench_archive.SPEED_COLUMNS:
        assert row[c] is not None and row[c] > 0, c
    for metric in ("ttft", "itl"):
        for run in ("b1", "loaded"):
            assert row[f"{metric}_p99_ms_{run}"] >= row[f"{metric}_p50_ms_{run}"]


@needs_vllm
def test_bench_bf16(gpu_checkpoints, results):
    row = run_bench(gpu_checkpoints / "tiny-bf16", "bf16", results)
    check_measured(row)
    assert row["deployment_speed"] is True
    assert row["bytes_on_disk"] == sum(f.stat().st_size for f in (gpu_checkpoints / "tiny-bf16").glob("*.safetensors"))
    # the same settings again: kept, not measured again
    mtime = bench_archive.bench_path(results, "bf16").stat().st_mtime_ns
    r = cli_subprocess("bench", "--model", gpu_checkpoints / "tiny-bf16", "--label", "bf16", "--results-dir", results,
                       *OPTS, timeout=600)
    assert r.returncode == 0 and bench_archive.bench_path(results, "bf16").stat().st_mtime_ns == mtime


@needs_vllm
def test_bench_nvfp4_as_served(gpu_checkpoints, results):
    """auto: W4A4 native on Blackwell, W4A16 through Marlin elsewhere; a deployment's arithmetic either way."""
    row = run_bench(gpu_checkpoints / "tiny-nvfp4", "nvfp4", results)
    check_measured(row)
    assert row["arithmetic"] in (arith_mod.W4A4_NATIVE, arith_mod.W4A16) and row["deployment_speed"] is True


@needs_vllm
def test_bench_nvfp4_declared(gpu_checkpoints, results):
    """declared: W4A4, emulated off Blackwell, and then labelled as no deployment's speed."""
    row = run_bench(gpu_checkpoints / "tiny-nvfp4", "nvfp4-declared", results, "--nvfp4-compute", "declared")
    check_measured(row)
    if row["arithmetic"] == arith_mod.W4A4_EMULATED:
        assert row["deployment_speed"] is False and "not a deployment speed" in row["note"]
    else:
        assert row["arithmetic"] == arith_mod.W4A4_NATIVE and row["deployment_speed"] is True
