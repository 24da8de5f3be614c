"""Which recipe to deploy: the sweep's grammar, the plan's jobs for it, and the deploy table's numbers and
Pareto marks against values worked out by hand."""
import json
import re
from pathlib import Path

import pytest

from jobs.checkpoints import recipes
from jobs.core.errors import SettingsError
from jobs.runs import plan
from jobs.stats import deploy, summary as S


# -- the grammar --------------------------------------------------------------------------------------------
def test_sweep_words_seeds_and_labels():
    got = recipes.parse_sweep("NVFP4 nvfp4+spinquant@64 FP8_DYNAMIC vendor=org/ckpt", "7 8")
    assert [(e.label, e.recipe, e.scheme, e.seed, e.samples, e.spinquant, e.first) for e in got] == [
        ("nvfp4.s7", "nvfp4", "NVFP4", 7, None, False, True),
        ("nvfp4.s8", "nvfp4", "NVFP4", 8, None, False, False),
        ("nvfp4-spinquant-n64.s7", "nvfp4-spinquant-n64", "NVFP4", 7, 64, True, True),
        ("nvfp4-spinquant-n64.s8", "nvfp4-spinquant-n64", "NVFP4", 8, 64, True, False),
        ("fp8_dynamic", "fp8_dynamic", "FP8_DYNAMIC", None, None, False, True),  # data-free: once
        ("vendor", "vendor", None, None, None, False, True)]
    assert got[-1].path == "org/ckpt"
    one = recipes.parse_sweep("NVFP4", "5")
    assert [(e.label, e.seed) for e in one] == [("nvfp4", 5)]  # one seed: no suffix, the seed still passed
    assert recipes.recipe_of("nvfp4-spinquant-n64.s8") == "nvfp4-spinquant-n64"
    assert recipes.recipe_of("bf16") == "bf16"


@pytest.mark.parametrize("sweep, seeds, says", [
    ("NVFP5", "", "unknown scheme 'NVFP5'"),
    ("NVFP4@0", "", "is not SCHEME"),
    ("FP8_DYNAMIC@64", "", "takes no calibration data"),
    ("NVFP4 NVFP4", "", "names a recipe twice"),
    ("NVFP4", "1 x", "SWEEP_SEEDS: 'x'"),
    ("NVFP4", "1 1", "repeats a seed"),
])
def test_sweep_refuses_bad_words(sweep, seeds, says):
    with pytest.raises(SettingsError, match=says):
        recipes.parse_sweep(sweep, seeds)


def test_plan_makes_one_quantize_per_recipe_and_seed_and_benches_each_recipe_once():
    env = {"SWEEP": "NVFP4 W4A16 nv=org/nv", "SWEEP_SEEDS": "1 2", "MODEL_ID": "models/base", "GPUS": "",
           "NUM_CALIBRATION_SAMPLES": "64"}
    jobs = {j.id: j for j in plan.build(env)}
    assert [i for i in jobs if i.startswith("quantize")] == ["quantize.nvfp4.s1", "quantize.nvfp4.s2", "quantize.w4a16"]
    q = jobs["quantize.nvfp4.s2"].args
    assert q[q.index("--quant-output") + 1] == "models/base-nvfp4.s2"
    assert q[q.index("--calibration-seed") + 1] == "2" and q[q.index("--num-calibration-samples") + 1] == "64"
    assert "--calibration-seed" not in jobs["quantize.w4a16"].args
    assert [i for i in jobs if i.startswith("score.")] == ["score.bf16", "score.nvfp4.s1", "score.nvfp4.s2",
                                                         "score.w4a16", "score.nv"]
    assert jobs["score.nvfp4.s2"].needs == ["quantize.nvfp4.s2"]
    assert [i for i in jobs if i.startswith("bench.")] == ["bench.bf16", "bench.nvfp4.s1", "bench.w4a16", "bench.nv"]
    assert jobs["bench.w4a16"].outputs == ["results/bench/model=w4a16"]
    assert jobs["validate.nvfp4.s1"].needs == ["quantize.nvfp4.s1"]
    with pytest.raises(SettingsError, match="MODELS labels repeat"):
        plan.build({**env, "MODELS": "bf16=models/base w4a16=models/other"})


def test_in_a_sweep_each_models_scoring_goes_before_its_tasks_and_bench(tmp_path, capsys):
    """Tasks and bench take whole GPUs: queued beside the scoring jobs (which share one) they took the GPU first
    on the H200 (bench/RESULTS.md, seventh session). Where the goals score (eval, report, sweep) a model's
    scoring is their order-only prerequisite; `make tasks` or `make bench` alone does not score."""
    env = {"SWEEP": "NVFP4 W4A16", "SWEEP_SEEDS": "1 2", "MODEL_ID": "models/base", "GPUS": "",
           "RESULTS_DIR": str(tmp_path / "results")}
    jobs = {j.id: j for j in plan.build(env)}
    assert plan.main(["--format", "make"], env) == 0
    text = Path(capsys.readouterr().out.strip()).read_text()
    for jid in ("tasks.nvfp4.s2", "bench.w4a16", "bench.bf16"):
        before = text[:text.index(f"\n{jobs[jid].stamp}:")]
        n, stamps = re.findall(r"^QS_FIRST_(\d+) := (.*)$", before, re.M)[-1]
        assert stamps == jobs[f"score.{jid.split('.', 1)[1]}"].stamp
        rule = next(ln for ln in text.splitlines() if ln.startswith(f"{jobs[jid].stamp}:"))
        assert " | " in rule and rule.endswith(f" $(if $(filter eval report sweep,$(MAKECMDGOALS)),$(QS_FIRST_{n}))")
    score_rule = next(ln for ln in text.splitlines() if ln.startswith(f"{jobs['score.w4a16'].stamp}:"))
    assert "QS_FIRST" not in score_rule


# -- the table, by hand -------------------------------------------------------------------------------------
def _overall(dn, lo, hi, kld):
    return {"texts": 50, "paired": {"delta_nll": dn, "delta_nll_lo": lo, "delta_nll_hi": hi},
            "comparison": {"kld": {"mean": {"value": kld, "lo": kld * 0.9, "hi": kld * 1.1}}}}


def _summary():
    models = {"bf16": {"overall": {"texts": 50}}, "bf16~noise": {"overall": _overall(0.001, -0.002, 0.004, 0.0005)},
              "nvfp4.s1": {"overall": _overall(0.050, 0.040, 0.060, 0.080)},
              "nvfp4.s2": {"overall": _overall(0.040, 0.030, 0.050, 0.070)},
              "w4a16": {"overall": _overall(0.047, 0.037, 0.057, 0.076)},
              "fp8": {"overall": _overall(0.002, -0.001, 0.005, 0.004)}}
    s = S.Summary(baseline="bf16", sets=["a"], sets_not_in_every_model=[], bootstrap={}, models=models,
                  recovery_min=0.95, noise_floor=["bf16~noise"])
    floor = S.Check("Δnll vs noise floor", 0, 0, 0, 0.001, "", note="")
    outcome = {"nvfp4.s1": "exceeds", "nvfp4.s2": "exceeds", "w4a16": "exceeds", "fp8": "inconclusive"}
    s.verdict = {m: S.ModelVerdict(m, "pass", {}, floor, None, noise=(S.Check(**{**floor.__dict__, "outcome": o}),))
                 for m, o in outcome.items()}
    return s


COSTS = {"bf16": {"bytes_on_disk": 1000, "decode_tokens_per_s_b1": 100.0, "decode_tokens_per_s_loaded": 4000.0,
                  "arithmetic": "bf16", "deployment_speed": True},
         "nvfp4.s1": {"bytes_on_disk": 300, "decode_tokens_per_s_b1": 180.0, "decode_tokens_per_s_loaded": 2900.0,
                      "arithmetic": "W4A16 Marlin", "deployment_speed": True},
         "w4a16": {"bytes_on_disk": 320, "decode_tokens_per_s_b1": 170.0, "decode_tokens_per_s_loaded": 3000.0,
                   "arithmetic": "W4A16", "deployment_speed": True},
         "fp8": {"bytes_on_disk": 520, "decode_tokens_per_s_b1": 150.0, "decode_tokens_per_s_loaded": 4500.0,
                 "arithmetic": "FP8", "deployment_speed": True}}


def test_pareto_by_hand():
    # (loss, cost): b dominates d (both lower); a and c trade off; e is missing
    pts = [(0.0, 10.0), (0.05, 3.0), (0.01, 5.0), (0.06, 4.0), None]
    assert deploy.pareto(pts) == [True, True, True, False, None]
    assert deploy.pareto([(1.0, 1.0), (1.0, 1.0)]) == [True, True]  # ties dominate neither


def test_deploy_table_by_hand():
    d = deploy.compute(_summary(), COSTS)
    rows = {r.recipe: r for r in d.rows}
    assert list(rows) == ["bf16", "nvfp4", "w4a16", "fp8"]  # the baseline first; the noise twin left out
    n = rows["nvfp4"]
    assert n.labels == ("nvfp4.s1", "nvfp4.s2")
    assert n.delta_nll == {"value": pytest.approx(0.045), "lo": 0.030, "hi": 0.060}  # mean; envelope of the seeds
    assert n.spread_delta_nll == pytest.approx(0.010) and n.spread_kld == pytest.approx(0.010)
    assert n.cost["bytes_on_disk"] == 300  # the first seed's bench row
    assert rows["w4a16"].spread_delta_nll is None
    assert d.loss == "mean KLD"
    # mean KLD against bytes: bf16 (0, 1000), nvfp4 (0.075, 300), w4a16 (0.076, 320), fp8 (0.004, 520):
    # w4a16 is dominated by nvfp4 (more loss, more bytes)
    assert {r.recipe: r.pareto_bytes for r in d.rows} == {"bf16": True, "nvfp4": True, "w4a16": False, "fp8": True}
    # against batch-1 speed (higher is better): nvfp4 180 is fastest; fp8 150 beats bf16 100 at more loss
    assert {r.recipe: r.pareto_speed_b1 for r in d.rows} == {"bf16": True, "nvfp4": True, "w4a16": False, "fp8": True}
    # loaded: fp8 4500 is fastest and nearly lossless, so it dominates all but the lossless baseline
    assert {r.recipe: r.pareto_speed_loaded for r in d.rows} == {"bf16": True, "nvfp4": False, "w4a16": False, "fp8": True}
    # nvfp4 vs w4a16: |0.045 − 0.047| = 0.002 ≤ nvfp4's spread 0.01; fp8 is 0.043 away
    assert d.apart == ["nvfp4 and w4a16 (Δnll differs by 0.002, the seeds' spread is 0.01)"]
    assert d.noise == ["fp8 (not shown to exceed the noise floor ±0.001 nats)"]
    assert d.speed_note is None
    json.dumps(S._finite(S.dataclasses.asdict(d)))  # summary.json can hold it


def test_no_table_without_a_choice_and_a_note_without_speed():
    s = _summary()
    s.models = {m: s.models[m] for m in ("bf16", "fp8")}
    assert deploy.compute(s, {}) is None  # one model, no bench: nothing to choose between
    one_seed = _summary()
    one_seed.models.pop("nvfp4.s2")
    assert deploy.compute(one_seed, {}) is None  # several, but no cost and no seeds: the verdicts say it all
    assert deploy.compute(_summary(), {}) is not None  # seeds: their spread is news
    assert deploy.compute(_summary(), {"fp8": COSTS["fp8"]}) is not None
    cpu = {"fp8": {"bytes_on_disk": 520, "note": "speed needs a GPU: none here", "gpu": "none"}}
    d = deploy.compute(s, cpu)
    assert d.speed_note == "speed needs a GPU: none here"
    assert [r.pareto_speed_b1 for r in d.rows] == [None, None]


def test_a_sweep_on_a_cluster_quantizes_first(tmp_path):
    import shlex
    import subprocess

    import kubernetes_validate

    from jobs.runs import executors

    env = {"SWEEP": "NVFP4 FP8_DYNAMIC", "SWEEP_SEEDS": "1 2", "MODEL_ID": "models/base", "GPUS": "",
           "CALIBRATION_DATASET": "data/calib_mini.jsonl", "K8S_PVC": "pvc1"}
    v = plan.resolve(env)
    jobs = plan.cluster(plan.build(env), v)
    assert [j.id for j in jobs][:3] == ["quantize.nvfp4.s1", "quantize.nvfp4.s2", "quantize.fp8_dynamic"]
    assert {j.stage for j in jobs} == {"quantize", "score", "tasks", "bench"}
    items = json.loads(executors.render("k8s", jobs, v))["items"]
    assert [d["metadata"]["name"] for d in items] == ["qscore-quantize", "qscore-score", "qscore-aggregate"]
    for d in items:
        kubernetes_validate.validate(d, "1.33", strict=True)
    qpod = items[0]["spec"]["template"]["spec"]["containers"][0]
    assert qpod["image"] == "qscore-quantize:latest" and items[0]["spec"]["completions"] == 3
    assert not {m["mountPath"]: m for m in qpod["volumeMounts"]}["/workspace/models"]["readOnly"]
    out = subprocess.run(["sh", "-c", qpod["command"][2].replace("exec ", "echo ")], capture_output=True, text=True,
                         env={"JOB_COMPLETION_INDEX": "1", "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[:4] == ["python3", "-m", "jobs", "quantize"] and "/workspace/models/base-nvfp4.s2" in out
    wait = items[1]["spec"]["template"]["spec"]["initContainers"][0]["command"][2]
    assert "/workspace/models/base-fp8_dynamic/qscore.json" in wait
    line = executors.submit(jobs, v, "q.sbatch")
    assert line.startswith("qjid=$(sbatch --parsable --array=0-2 q.sbatch) && jid=$(sbatch --parsable "
                           f"--array=3-{len(jobs) - 1} --dependency=afterok:$qjid q.sbatch) && sbatch")
    script = executors.render("slurm", jobs, v)
    assert ".venv/bin/python -m jobs quantize --model-id models/base" in script
    assert shlex.join([".venv-vllm/bin/python", "-m", "jobs", "bench", *jobs[-1].args]) in script


@pytest.mark.parametrize("sweep, seeds, says", [("NVFP5", "", "unknown scheme 'NVFP5'"),
                                                ("NVFP4", "1 x", "SWEEP_SEEDS: 'x' is not a whole number")])
def test_a_bad_sweep_is_one_line_and_exit_1(sweep, seeds, says):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "-m", "jobs", "plan"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "SWEEP": sweep, "SWEEP_SEEDS": seeds, "GPUS": ""})
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
