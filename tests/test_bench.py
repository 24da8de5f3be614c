"""The bench stage on the CPU: the row without a GPU, the archive (schema, atomic write, resume, refusal), the
parsing of vLLM 0.26's benchmark results and log lines, the server's and the benchmark's command lines, and the
driver's plumbing against a stand-in for vLLM's command line (tests/fixtures/fake_vllm.py)."""
from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, cli
from jobs.archive import bench as bench_archive
from jobs.archive import logprobs
from jobs.checkpoints import arithmetic as arith_mod
from jobs.checkpoints.checkpoint import Quantization
from jobs.core.errors import BenchError
from jobs.core.settings import EngineOptions, Nvfp4Compute
from jobs.engines import vllm_bench
from jobs.engines.vllm import engine_spec
from jobs.stages import bench as stage

sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import fake_vllm  # noqa: E402

NVFP4_CONFIG = {  # compressed-tensors' NVFP4 (W4A4) config, as llm-compressor writes it
    "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "nvfp4-pack-quantized",
        "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                    "symmetric": True, "dynamic": False, "observer": "minmax"},
        "input_activations": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                              "symmetric": True, "dynamic": "local", "observer": "minmax"}}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random-weight Llama built from a config, saved in several safetensors shards with an index."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, max_shard_size="100KB")
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    return out


@pytest.fixture
def no_gpu(monkeypatch):
    """This test's machine has no GPU, whatever the machine running it has."""
    monkeypatch.setattr(stage, "device", lambda: stage.Device("none", None, None))


def error_lines(r) -> list[str]:
    """The stage's own error report: one line, the last on stderr (log lines may come before it)."""
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), r.stderr
    return [line for line in lines if line.startswith("error")]


def bench(model, results, *extra):
    return cli("bench", "--model", model, "--label", "tiny", "--results-dir", results, *extra)


def read_row(results, label="tiny"):
    return bench_archive.read(bench_archive.bench_path(results, label))


# -- the row without a GPU ----------------------------------------------------------------------------------
def test_cpu_row(tiny, tmp_path, no_gpu):
    r = bench(tiny, tmp_path)
    assert r.exit_code == 0, r.output
    path = bench_archive.bench_path(tmp_path, "tiny")
    assert r.stdout.strip() == str(path)
    assert pq.read_schema(path).remove_metadata() == bench_archive.SCHEMA
    row, meta = read_row(tmp_path)
    assert row["bytes_on_disk"] == sum(f.stat().st_size for f in tiny.glob("*.safetensors"))
    assert row["label"] == "tiny" and row["model"] == str(tiny) and row["gpu"] == "none"
    assert row["arithmetic"] == "bfloat16"  # the scheme the checkpoint declares: nothing runs here
    assert row["deployment_speed"] is False and row["note"] == stage.NO_GPU
    assert (row["input_len"], row["output_len"], row["loaded_concurrency"]) == (512, 256, 64)
    nulls = ["weight_memory_bytes", "kv_cache_tokens", "gpu_memory_utilization", *bench_archive.SPEED_COLUMNS]
    assert all(row[c] is None for c in nulls)
    assert meta["schema_version"] == bench_archive.SCHEMA_VERSION and meta["fingerprint"]
    assert meta["model"]["content_hash"] and meta["command"].startswith("python -m jobs bench")
    assert bench_archive.load(tmp_path) == {"tiny": row}
    assert [p.name for p in path.parent.iterdir() if p.name != ".bench.parquet.lock"] == ["bench.parquet"]


def test_cpu_row_names_the_declared_nvfp4(tiny, tmp_path, no_gpu):
    ckpt = tmp_path / "nvfp4"
    shutil.copytree(tiny, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "quantization_config": NVFP4_CONFIG}))
    assert bench(ckpt, tmp_path / "r").exit_code == 0
    assert read_row(tmp_path / "r")[0]["arithmetic"] == "NVFP4"


# -- resume, refusal, bad input -----------------------------------------------------------------------------
def test_resume_refusal_and_overwrite(tiny, tmp_path, no_gpu):
    assert bench(tiny, tmp_path).exit_code == 0
    path = bench_archive.bench_path(tmp_path, "tiny")
    before = path.stat().st_mtime_ns
    assert bench(tiny, tmp_path).exit_code == 0  # same settings: kept as it is
    assert path.stat().st_mtime_ns == before
    r = bench(tiny, tmp_path, "--input-len", "128")
    assert r.exit_code == 1 and "other settings" in r.stderr and "--overwrite" in r.stderr
    assert len(error_lines(r)) == 1
    assert read_row(tmp_path)[0]["input_len"] == 512  # left as it was
    assert bench(tiny, tmp_path, "--input-len", "128", "--overwrite").exit_code == 0
    assert read_row(tmp_path)[0]["input_len"] == 128


def test_missing_model_is_one_line_and_no_file(tmp_path, no_gpu):
    r = bench(tmp_path / "nope", tmp_path / "results")
    assert r.exit_code == 1
    assert error_lines(r) == [f"error: model directory not found: {tmp_path / 'nope'}"]
    assert not list((tmp_path / "results").rglob("*.parquet"))


@pytest.mark.parametrize("args, words", [
    (["--input-len", "2000", "--output-len", "100"], "do not fit in --max-model-len 2048"),
    (["--output-len", "1"], "--output-len must be at least 2"),
    (["--loaded-concurrency", "0"], "--loaded-concurrency must be at least 1"),
    (["--tensor-parallel-size", "2"], "one GPU"),
])
def test_bad_settings(tiny, tmp_path, no_gpu, args, words):
    r = bench(tiny, tmp_path, *args)
    assert r.exit_code == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "bench").exists() or not list((tmp_path / "bench").rglob("*.parquet"))


def test_bad_label(tiny, tmp_path, no_gpu):
    r = cli("bench", "--model", tiny, "--label", "a/b", "--results-dir", tmp_path)
    assert r.exit_code == 1 and "bad model label" in r.stderr


# -- the archive --------------------------------------------------------------------------------------------
def full_row(**over) -> dict:
    row = {"label": "m", "model": "models/m", "gpu": "NVIDIA H200", "arithmetic": "bf16", "deployment_speed": True,
           "note": "", "bytes_on_disk": 10, "weight_memory_bytes": 20, "kv_cache_tokens": 30,
           "gpu_memory_utilization": 0.85, "input_len": 512, "output_len": 256, "loaded_concurrency": 64,
           **{c: 1.5 for c in bench_archive.SPEED_COLUMNS}}
    return {**row, **over}


def test_archive_write_is_atomic(tmp_path, monkeypatch):
    path = bench_archive.bench_path(tmp_path, "m")
    with pytest.raises(ValueError, match="missing columns"):
        bench_archive.write(path, {k: v for k, v in full_row().items() if k != "note"}, {})
    assert not path.parent.exists() or not list(path.parent.iterdir())

    def torn(table, where, **kw):  # a writer killed half way: bytes on disk, then an error
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", torn)
    with pytest.raises(OSError):
        bench_archive.write(path, full_row(), {"fingerprint": "x"})
    assert not path.exists() and not list(path.parent.iterdir())  # neither the file nor its temporary
    monkeypatch.undo()
    bench_archive.write(path, full_row(), {"fingerprint": "x"})
    row, meta = bench_archive.read(path)
    assert row == full_row() and meta["fingerprint"] == "x"
    assert json.loads(pq.read_schema(path).metadata[logprobs.META_KEY])["schema_version"] == "bench-1"


def test_archive_refuses_foreign_files(tmp_path):
    path = bench_archive.bench_path(tmp_path, "m")
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), path)
    with pytest.raises(Exception, match="no qscore metadata"):
        bench_archive.load(tmp_path)
    assert bench_archive.load(tmp_path / "elsewhere") == {}


# -- vLLM's results and log lines ---------------------------------------------------------------------------
LOADS = vllm_bench.plan_loads(input_len=512, output_len=256, loaded_concurrency=64, num_prompts_b1=16,
                              num_prompts=256)


def canned(load: vllm_bench.Load) -> dict:
    args = type("A", (), {"num_prompts": load.num_prompts, "random_input_len": load.input_len,
                          "random_output_len": load.output_len, "max_concurrency": load.concurrency,
                          "model": "m"})
    return fake_vllm.result(args)


def test_figures_from_results():
    results = {x.name: canned(x) for x in LOADS}
    f = vllm_bench.figures(results)
    assert set(f) == set(bench_archive.SPEED_COLUMNS)
    b1, loaded, prefill = results["b1"], results["loaded"], results["prefill"]
    assert f["prefill_tokens_per_s"] == pytest.approx(256 * 512 / prefill["duration"])
    assert f["decode_tokens_per_s_b1"] == b1["output_throughput"]
    assert f["decode_tokens_per_s_loaded"] == loaded["output_throughput"]
    assert (f["ttft_p50_ms_b1"], f["ttft_p99_ms_b1"]) == (b1["p50_ttft_ms"], b1["p99_ttft_ms"])
    assert (f["itl_p50_ms_loaded"], f["itl_p99_ms_loaded"]) == (loaded["p50_itl_ms"], loaded["p99_itl_ms"])
    del results["loaded"]["p99_itl_ms"]
    with pytest.raises(BenchError, match="p99_itl_ms"):
        vllm_bench.figures(results)


def test_check_result_refuses_failures_and_short_outputs():
    load = LOADS[1]
    vllm_bench.check_result(load, canned(load))
    with pytest.raises(BenchError, match="255 of 256 requests completed, 1 failed"):
        vllm_bench.check_result(load, {**canned(load), "completed": 255, "failed": 1})
    with pytest.raises(BenchError, match="expected 65536"):
        vllm_bench.check_result(load, {**canned(load), "total_output_tokens": 60000})


def test_server_log_lines():
    got = vllm_bench.parse_server_log(["unrelated", *fake_vllm.SERVER_LOG])
    assert got == {"weight_memory_bytes": int(1.5 * 2**30), "kv_cache_tokens": 1_234_560}
    # the newer model runner's wording (vllm/v1/worker/gpu/model_runner.py)
    assert vllm_bench.parse_server_log(["Model loading took 0.01 GiB and 0.5 seconds"])["weight_memory_bytes"] == \
        round(0.01 * 2**30)
    assert vllm_bench.parse_server_log([]) == {"weight_memory_bytes": None, "kv_cache_tokens": None}


# -- command lines ------------------------------------------------------------------------------------------
def test_serve_command_from_the_one_engine_spec(tmp_path):
    quant = Quantization("compressed-tensors", "nvfp4-pack-quantized", "NVFP4", 16, 4, 4)
    arith = arith_mod.resolve(quant, Nvfp4Compute.WEIGHT_ONLY, backend="vllm", capability=9.0)
    spec = engine_spec(tmp_path, EngineOptions(max_model_len=1024, gpu_memory_utilization=0.5), arith, scoring=False)
    cmd = vllm_bench.serve_command(spec.kwargs, port=8123)
    assert cmd[:5] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(tmp_path)]
    text = " ".join(cmd)
    for part in ("--port 8123", "--max-model-len 1024", "--gpu-memory-utilization 0.5", "--no-enforce-eager",
                 "--no-enable-prefix-caching", "--linear-backend marlin", "--dtype auto"):
        assert part in text
    eager = engine_spec(tmp_path, EngineOptions(enforce_eager=True), arith, scoring=False)
    assert "--enforce-eager" in vllm_bench.serve_command(eager.kwargs, port=1)
    assert vllm_bench.serve_command({"model": "m", "compilation_config": {"b": 1, "a": 2}}, port=1)[-1] == \
        '{"a": 2, "b": 1}'


def test_bench_command(tmp_path):
    cmd = vllm_bench.bench_command(LOADS[2], model="models/m", port=8123, result_dir=tmp_path)
    assert cmd[3:5] == ["bench", "serve"]
    flags = dict(zip(cmd, cmd[1:]))
    assert flags["--backend"] == "vllm" and flags["--dataset-name"] == "random"
    assert (flags["--random-input-len"], flags["--random-output-len"]) == ("512", "1")
    assert (flags["--max-concurrency"], flags["--num-prompts"]) == ("64", "256")
    assert flags["--percentile-metrics"] == "ttft,tpot,itl" and flags["--metric-percentiles"] == "50,99"
    assert "--ignore-eos" in cmd and "--save-result" in cmd
    assert Path(flags["--result-dir"], flags["--result-filename"]) == tmp_path / "prefill.json"
    assert len({x.seed for x in LOADS}) == len(LOADS)


# -- arithmetic and labels ----------------------------------------------------------------------------------
def test_auto_mode_is_what_the_gpu_serves():
    assert stage.nvfp4_mode("auto", 9.0) is Nvfp4Compute.WEIGHT_ONLY  # Hopper: Marlin
    assert stage.nvfp4_mode("auto", 10.0) is Nvfp4Compute.DECLARED  # Blackwell: native W4A4
    assert stage.nvfp4_mode("auto", None) is Nvfp4Compute.DECLARED
    assert stage.nvfp4_mode("declared", 9.0) is Nvfp4Compute.DECLARED


@pytest.mark.parametrize("mode, cap, label, deploy, words", [
    ("weight-only", 9.0, arith_mod.W4A16, True, "Marlin"),
    ("declared", 9.0, arith_mod.W4A4_EMULATED, False, "not a deployment speed"),
    ("declared", 10.0, arith_mod.W4A4_NATIVE, True, "sm_100"),
])
def test_labels(mode, cap, label, deploy, words):
    quant = Quantization("compressed-tensors", "nvfp4-pack-quantized", "NVFP4", 16, 4, 4)
    arith = arith_mod.resolve(quant, mode, backend="vllm", capability=cap)
    dev = stage.Device("NVIDIA X", cap, "0.26.0")
    deployment, note = stage.describe(arith, dev)
    assert arith.label == label and deployment is deploy and words in note and "NVIDIA X" in note
    assert stage.describe(arith, stage.Device("NVIDIA X", cap, None)) == (False, stage.NO_VLLM)


# -- the driver against a stand-in for vLLM ------------------------------------------------------------------
@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(vllm_bench, "VLLM_CLI", [sys.executable, str(ROOT / "tests" / "fixtures" / "fake_vllm.py")])
    monkeypatch.setattr(vllm_bench, "client", fake_vllm.client)
    monkeypatch.setattr(stage, "device", lambda: stage.Device("NVIDIA H200", 9.0, "0.26.0"))


def test_stage_with_a_stand_in_server(tiny, tmp_path, fake_gpu):
    r = bench(tiny, tmp_path, "--num-prompts", "32", "--loaded-concurrency", "8", "--timeout", "60")
    assert r.exit_code == 0, r.output
    row, meta = read_row(tmp_path)
    assert row["gpu"] == "NVIDIA H200" and row["arithmetic"] == "bfloat16" and row["deployment_speed"] is True
    assert row["weight_memory_bytes"] == int(1.5 * 2**30) and row["kv_cache_tokens"] == 1_234_560
    assert row["gpu_memory_utilization"] == 0.85
    assert all(row[c] > 0 for c in bench_archive.SPEED_COLUMNS)
    assert set(meta["vllm_bench"]) == {"b1", "loaded", "prefill"}
    assert meta["vllm_bench"]["loaded"]["max_concurrency"] == 8
    assert meta["server"]["command"][:2] == ["vllm", "serve"]
    assert not (bench_archive.bench_path(tmp_path, "tiny").parent / ".bench-work").exists()


def test_server_that_dies_is_one_line_and_leaves_its_log(tiny, tmp_path, fake_gpu, monkeypatch):
    monkeypatch.setattr(vllm_bench, "VLLM_CLI", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    r = bench(tiny, tmp_path, "--timeout", "60")
    assert r.exit_code == 1 and "exited with status 3 before it was ready" in r.stderr and "boom" in r.stderr
    assert len(error_lines(r)) == 1
    work = bench_archive.bench_path(tmp_path, "tiny").parent / ".bench-work"
    assert (work / "server.log").read_text().strip() == "boom"
    assert not list(tmp_path.rglob("*.parquet"))


def test_benchmark_run_that_fails_is_one_line(tiny, tmp_path, fake_gpu, monkeypatch):
    """vLLM's client runs in the stage's process: what it raises is the stage's one-line error, not a traceback."""
    parse, _ = fake_vllm.client()

    async def refused(args):
        raise ConnectionRefusedError("Connect call failed")

    monkeypatch.setattr(vllm_bench, "client", lambda: (parse, refused))
    r = bench(tiny, tmp_path, "--timeout", "60")
    assert r.exit_code == 1 and "vLLM's benchmark (b1) failed: ConnectionRefusedError" in r.stderr
    assert len(error_lines(r)) == 1 and not list(tmp_path.rglob("*.parquet"))


def test_benchmark_run_past_its_timeout_is_one_line(tiny, tmp_path, fake_gpu, monkeypatch):
    parse, _ = fake_vllm.client()

    async def hangs(args):
        await asyncio.sleep(60)

    monkeypatch.setattr(vllm_bench, "client", lambda: (parse, hangs))
    r = bench(tiny, tmp_path, "--timeout", "2")
    assert r.exit_code == 1 and "vLLM's benchmark (b1) ran past 2 s (--timeout)" in r.stderr
    assert len(error_lines(r)) == 1 and not list(tmp_path.rglob("*.parquet"))
