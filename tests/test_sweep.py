"""`make sweep` on the tiny model, end to end on the CPU: two seeds of NVFP4 and two data-free recipes,
quantized, scored, benched (size only: speed needs a GPU) and reported, with the deploy table's numbers and
Pareto marks recomputed here from summary.json and the bench rows."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from jobs.archive import bench

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def test_make_sweep_writes_the_deploy_table(tiny_model, tmp_path):
    results = tmp_path / "results"
    venv = sys.prefix  # this interpreter's venv runs the stages; SETUP_STAMP= keeps make from making one
    args = ["RUNNER=local", f"VENV={venv}", f"VLLM_VENV={venv}", "SETUP_STAMP=", f"MODEL_ID={tiny_model}",
            f"QUANT_OUTPUT={tmp_path}/models/q", "SWEEP=NVFP4 NVFP4A16 FP8_DYNAMIC", "SWEEP_SEEDS=1 2",
            "CALIBRATION_DATASET=data/calib_mini.jsonl", "CALIBRATION_SPLIT=", "NUM_CALIBRATION_SAMPLES=32",
            "MAX_SEQUENCE_LENGTH=128", "DATASETS=wiki_mini=data/wiki_mini.txt chat_mini=data/chat_mini.jsonl",
            "BASELINE=bf16", "BACKEND=transformers", "MAX_MODEL_LEN=256", "TOPK=20", "GPUS=", "TASKS=qscore_local",
            "LIMIT=8", f"RESULTS_DIR={results}", "NOISE_ARGS=--dtype bfloat16",
            "BENCH_ARGS=--input-len 128 --output-len 64"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")} | {"HF_HUB_OFFLINE": "1"}
    for target in ("noise-floor", "sweep"):
        r = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), target, *args], capture_output=True,
                           text=True, env=env, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir() if not p.name.startswith(".")) == [
        "tiny-qwen3-fp8_dynamic", "tiny-qwen3-nvfp4.s1", "tiny-qwen3-nvfp4.s2", "tiny-qwen3-nvfp4a16"]
    seeds = [json.loads((tmp_path / "models" / f"tiny-qwen3-nvfp4.s{i}" / "qscore.json").read_text())["calibration"]["seed"]
             for i in (1, 2)]
    assert seeds == [1, 2]
    rows = bench.load(results)
    assert sorted(rows) == ["bf16", "fp8_dynamic", "nvfp4.s1", "nvfp4a16"]  # a recipe's later seeds are not benched
    assert all(r["decode_tokens_per_s_b1"] is None and "speed needs a GPU" in r["note"] for r in rows.values())

    report = results / "report"
    s = json.loads((report / "summary.json").read_text())
    d = {r["recipe"]: r for r in s["deploy"]["rows"]}
    assert list(d) == ["bf16", "fp8_dynamic", "nvfp4", "nvfp4a16"]
    # by hand from the models' own figures: the recipe's Δnll is its seeds' mean, its spread their range
    dn = [s["models"][f"nvfp4.s{i}"]["overall"]["paired"]["delta_nll"] for i in (1, 2)]
    assert d["nvfp4"]["delta_nll"]["value"] == pytest.approx(sum(dn) / 2)
    assert d["nvfp4"]["spread_delta_nll"] == pytest.approx(abs(dn[0] - dn[1]))
    assert d["nvfp4"]["cost"]["bytes_on_disk"] == rows["nvfp4.s1"]["bytes_on_disk"]
    # Pareto against bytes, by hand: a recipe is marked unless another has no more loss and no more bytes
    pts = {k: (r["kld"]["value"], r["cost"]["bytes_on_disk"]) for k, r in d.items()}
    for k, (loss, size) in pts.items():
        dominated = any(o != k and ol <= loss and os_ <= size and (ol < loss or os_ < size) for o, (ol, os_) in pts.items())
        assert d[k]["pareto_bytes"] is (not dominated), k
    assert d["bf16"]["pareto_bytes"] is True and all(r["pareto_speed_b1"] is None for r in d.values())
    md = (report / "report.md").read_text()
    table = md[md.index("## Which recipe to deploy"):md.index("## Perplexity")]
    assert re.search(r"\| \*\*nvfp4\*\*.* \| 2 \| W4A4 \(emulated\) \| NVFP4 \|", table)
    assert "No speed figures: speed needs a GPU" in table and "![deploy_bytes](deploy_bytes.png)" in table
    assert "**Within the noise floor:**" in table and "not measured" not in table.split("noise floor:**")[1]
    assert (report / "deploy_bytes.png").stat().st_size > 10_000 and not (report / "deploy_speed.png").exists()
