"""The tasks stage on a GPU: the bundled tasks through lm-eval's vLLM model (run on a CUDA host: pytest -m gpu).

Fixtures as in test_gpu.py: QSCORE_GPU_FIXTURES names a directory with tiny-bf16/, tiny-nvfp4/ and
tiny-modelopt/ (tests/gpu_fixtures.py), else they are built here. A randomly initialised model of Qwen3-1.7B's
shape (with the tiny tokenizer's vocabulary) is written here too: its accuracy is chance, its time is the
point. Accuracy and wall time of every run are printed and, with QSCORE_GPU_TASKS_REPORT set, written as
JSON; nothing is asserted on time (figures belong in bench/RESULTS.md).

On the lent GPU machine (``bash tests/gpu_session.sh tasks``), lm-eval and what it imports beyond the
machine's image and the vLLM runtime travel as wheels in .whl/ (all pure Python, about 10 MB; dill 0.4.1
comes with the vLLM runtime):

    pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
        lm-eval==0.4.13 datasets==5.2.0 multiprocess==0.70.19 more-itertools==11.2.1
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import time

import numpy as np
import pytest

from conftest import cli_subprocess
from gpu_fixtures import cuda_available, write_report
from jobs.archive import tasks as task_archive
from jobs.report import tasks as task_report

pytestmark = pytest.mark.gpu



needs_vllm = pytest.mark.skipif(
    not cuda_available() or importlib.util.find_spec("vllm") is None or importlib.util.find_spec("lm_eval") is None,
    reason="needs a CUDA GPU, vLLM and lm-eval")
VLLM_OPTS = ["--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-model-len", "1024"]
# greedy decoding never samples: skipping FlashInfer's sampler skips its first-use JIT (minutes on a fresh host)
ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
TASKS = ("qscore_arith", "qscore_cloze")
REPORT: dict = {}
SHAPE_1P7B = {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    yield tmp_path_factory.mktemp("gpu-task-results")
    print("\nGPU tasks:", json.dumps(REPORT, indent=1))
    write_report(REPORT, "QSCORE_GPU_TASKS_REPORT")


def run_tasks(model, label, results, backend, *extra) -> float:
    t0 = time.time()
    r = cli_subprocess("tasks", "--model", model, "--label", label, "--tasks", "qscore_local", "--results-dir",
                       results, "--backend", backend, *extra, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    return time.time() - t0


def accuracy(results, label) -> dict:
    out = {}
    for task in TASKS:
        table, meta = task_archive.read_task(task_archive.task_dir(results, label, task))
        for (metric, filt), m in task_report.measures(table, meta).items():
            assert m.values.mean() == pytest.approx(meta["results"]["lm_eval"][f"{metric},{filt}"], abs=1e-12)
            out[f"{task} {metric}"] = round(float(m.values.mean()), 4)
    return out


@needs_vllm
def test_vllm_runs_the_bundled_tasks(gpu_checkpoints, results):
    for label, name in (("bf16", "tiny-bf16"), ("llmc-nvfp4", "tiny-nvfp4"), ("modelopt-nvfp4", "tiny-modelopt")):
        seconds = run_tasks(gpu_checkpoints / name, label, results, "vllm", *VLLM_OPTS)
        for task in TASKS:
            table, meta = task_archive.read_task(task_archive.task_dir(results, label, task))
            rt = meta["runtime"]
            assert rt["backend"] == "vllm" and rt["lm_eval"] == "0.4.13" and rt["gpu_name"], rt
            assert meta["task"]["n_docs"] == table.num_rows == 60
            if label != "bf16":
                assert "FP4" in rt["kernel_path"], rt["kernel_path"]
        REPORT[f"vllm {label}"] = {**accuracy(results, label), "seconds": round(seconds, 1),
                                   "kernel_path": rt["kernel_path"]}


@needs_vllm
def test_vllm_agrees_with_transformers_on_bf16(gpu_checkpoints, results):
    assert task_archive.task_dir(results, "bf16", "qscore_cloze").exists(), "run test_vllm_runs_the_bundled_tasks first"
    seconds = run_tasks(gpu_checkpoints / "tiny-bf16", "hf-bf16", results, "transformers", "--dtype", "bfloat16")
    REPORT["transformers bf16 (cuda)"] = {**accuracy(results, "hf-bf16"), "seconds": round(seconds, 1)}
    v, _ = task_archive.read_task(task_archive.task_dir(results, "bf16", "qscore_cloze"))
    h, _ = task_archive.read_task(task_archive.task_dir(results, "hf-bf16", "qscore_cloze"))
    same = float(np.mean(np.asarray(v.column("choice").to_pylist()) == np.asarray(h.column("choice").to_pylist())))
    lv = np.asarray(v.column("choice_logprobs").to_pylist())
    lh = np.asarray(h.column("choice_logprobs").to_pylist())
    diff = float(np.mean(np.abs(lv - lh)))
    REPORT["cloze: vllm vs transformers (bf16)"] = {"same choice": same, "mean |Δ loglikelihood|": round(diff, 4)}
    assert same >= 0.9 and diff < 0.5, REPORT["cloze: vllm vs transformers (bf16)"]


@needs_vllm
def test_validate_task_gate_through_vllm(gpu_checkpoints, results):
    base = results / "tasks" / "model=bf16"
    assert base.exists(), "run test_vllm_runs_the_bundled_tasks first"
    r = cli_subprocess("validate", "--model", gpu_checkpoints / "tiny-nvfp4", "--backend", "vllm", "--baseline-tasks",
                       base / "task=qscore_cloze", "--recovery-min", "0.01", *VLLM_OPTS, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    [m] = json.loads(r.stdout)["task_gate"]["measures"]
    assert m["verdict"] in ("pass", "undefined") and m["recovery"]["n"] == 60
    REPORT["validate task gate (vllm)"] = {"recovery": m["recovery"]["value"], "verdict": m["verdict"]}
    bad = cli_subprocess("validate", "--model", gpu_checkpoints / "tiny-nvfp4", "--backend", "vllm", "--baseline-tasks",
                         base / "task=qscore_cloze", "--recovery-min", "1", *VLLM_OPTS, env=ENV)
    if m["verdict"] == "pass" and m["recovery"]["value"] < 0.9:  # clearly below the gate's 1
        assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: quality gate")


@needs_vllm
def test_random_weight_1p7b_shape(gpu_checkpoints, results, tmp_path_factory):
    """Speed at a real model's size: Qwen3-1.7B's layers, random bf16 weights, the tiny tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

    out = tmp_path_factory.mktemp("qwen3-1.7b-shape-random")
    tiny = AutoConfig.from_pretrained(gpu_checkpoints / "tiny-bf16")
    cfg = Qwen3Config(vocab_size=tiny.vocab_size, eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id,
                      bos_token_id=None, tie_word_embeddings=True, max_position_embeddings=4096, **SHAPE_1P7B)
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    for f in (gpu_checkpoints / "tiny-bf16").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy2(f, out / f.name)
    seconds = run_tasks(out, "random-1.7b", results, "vllm", "--enforce-eager", "--gpu-memory-utilization", "0.5",
                        "--max-model-len", "1024")
    acc = accuracy(results, "random-1.7b")
    assert 0.0 <= acc["qscore_cloze acc"] <= 1.0
    REPORT["vllm random 1.7B shape"] = {**acc, "seconds": round(seconds, 1)}
    seconds = run_tasks(out, "random-1.7b-hf", results, "transformers", "--dtype", "bfloat16")
    REPORT["transformers random 1.7B shape (cuda)"] = {**accuracy(results, "random-1.7b-hf"),
                                                       "seconds": round(seconds, 1)}
