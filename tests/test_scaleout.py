"""Scale-out: the job plan, shards (identical to the unsharded run, row for row), GPU slots, and the
Kubernetes / Slurm renderings of the plan (validated against the Kubernetes API schemas)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import ROOT, cli
from jobs.runs import executors, plan, slots
from jobs.archive import logprobs
import re

from jobs.core.errors import QscoreError, SettingsError

ENV = {"MODELS": "bf16=Qwen/Qwen3-14B llmc=models/Qwen3-14B-NVFP4", "DATASETS": "wikitext2 chat=data/chat.jsonl",
       "MAX_MODEL_LEN": "2048", "TOPK": "1", "RESULTS_DIR": "results"}


# -- the plan ---------------------------------------------------------------------------------------------
def scoring(env: dict) -> list:
    return [j for j in plan.build(env, uid=1000) if j.group == "eval"]


def test_one_job_per_model_with_every_set():
    jobs = scoring(ENV)
    assert [j.id for j in jobs] == ["score.bf16", "score.llmc"]
    assert jobs[1].args[:6] == ["--model", "models/Qwen3-14B-NVFP4", "--label", "llmc", "--datasets",
                                "wikitext2,chat=data/chat.jsonl"]
    assert jobs[0].outputs == ["results/logprobs/model=bf16/dataset=wikitext2", "results/logprobs/model=bf16/dataset=chat"]
    assert len({j.stamp for j in jobs}) == 2
    assert scoring(ENV) == jobs  # stable


def test_every_job_has_commands_for_both_runners_inputs_outputs_and_a_stamp():
    jobs = {j.id: j for j in plan.build(ENV, uid=1000)}
    assert {"quantize", "validate", "score.bf16", "tasks.llmc", "report", "noise.bf16~noise", "serve"} <= set(jobs)
    for j in jobs.values():
        assert j.commands["local"] and "docker run" in j.commands["docker"]
    assert jobs["report"].stamp.startswith("results/.stamps/report.") and jobs["report"].outputs
    assert jobs["validate"].needs == ["quantize"] and jobs["validate"].inputs == ["models/Qwen3-14B-NVFP4/qscore.json"]


def test_shards_and_weight_only_jobs():
    jobs = scoring({**ENV, "SHARDS": "2", "WEIGHT_ONLY": "llmc"})
    assert [j.id for j in jobs] == ["score.bf16.shard-1-of-2", "score.bf16.shard-2-of-2", "score.llmc.shard-1-of-2",
                                   "score.llmc.shard-2-of-2", "score.llmc-w4a16.shard-1-of-2",
                                   "score.llmc-w4a16.shard-2-of-2"]
    wo = jobs[-1]
    assert wo.args[wo.args.index("--nvfp4-compute") + 1] == "weight-only" and wo.args[-2:] == ["--shard", "2/2"]
    assert wo.outputs[0] == "results/logprobs/model=llmc-w4a16/dataset=wikitext2/shard=2-of-2"


@pytest.mark.parametrize("env, msg", [
    ({"MODELS": "oops"}, "not label=path"),
    ({"MODELS": "a=x a=y"}, "labels repeat"),
    ({"MODELS": "a=x a-w4a16=y", "WEIGHT_ONLY": "a"}, "two jobs have the id 'score.a-w4a16'"),
    ({"MODELS": "../../etc=x"}, "not a plain name"),
    ({"DATASETS": "../x=data/a.txt"}, "not a plain name"),
    ({"WEIGHT_ONLY": "nope"}, "not in MODELS"),
    ({"SHARDS": "0"}, "SHARDS must be a whole number >= 1"),
    ({"TOPK": "0"}, "TOPK must be a whole number >= 1"),
    ({"MAX_MODEL_LEN": "abc"}, "MAX_MODEL_LEN must be a whole number"),
    ({"NVFP4_COMPUTE": "foo"}, "NVFP4_COMPUTE must be one of"),
    ({"SCORE_ARGS": "--x 'unclosed"}, "not a valid shell word list"),
    ({"RESULTS_DIR": "my results"}, "character make cannot use"),
    ({"RECOVERY_MIN": "7"}, "RECOVERY_MIN must be a number in (0, 1]"),
    ({"RUNNER": "podman"}, "RUNNER must be one of local, docker"),
    ({"LABEL": "x"}, "needs both MODEL"),
    ({"DATASETS": "bogus"}, "unknown evaluation set"),
])
def test_bad_plans_are_named(env, msg):
    with pytest.raises(QscoreError, match=re.escape(msg)):
        plan.build({**ENV, **env})


def test_plan_command_prints_json_lines_and_one_job(capsys):
    assert plan.main(["--group", "eval", "--index", "1"], env=ENV) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and '"id": "score.llmc"' in out[0]
    assert plan.main(["--group", "eval", "--index", "5"], env=ENV) == 1
    assert "out of range" in capsys.readouterr().err
    assert plan.main(["--format", "k8s"], env={**ENV, "TOPK": "0"}) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1  # one line, nothing rendered


def test_docker_least_privilege():
    jobs = {j.id: j.commands["docker"] for j in plan.build({**ENV, "HF_HUB_OFFLINE": "1"}, uid=1000)}
    for jid in ("validate", "score.bf16", "tasks.bf16", "report"):
        assert ":/models:ro" in jobs[jid] and ":/hf:ro" in jobs[jid] and '-u "$(id -u):$(id -g)"' in jobs[jid], jid
    assert ":/models " in jobs["quantize"] and "chown" not in jobs["quantize"]
    root = {j.id: j.commands["docker"] for j in plan.build(ENV, uid=0)}
    assert all("-u 10001:10001" in c and "chown -R 10001:10001" in c for c in root.values())
    assert ":/hf " in root["score.bf16"]  # a hub model is downloaded on first use: the cache is writable
    assert "--env-file" not in root["report"]  # no .env here: nothing (never .env.example)


# -- shards ------------------------------------------------------------------------------------------------
def test_sharded_run_is_the_unsharded_run_row_for_row(tiny_model, tmp_path):
    wiki = Path(__file__).resolve().parent.parent / "data" / "wiki_mini.txt"
    sets = f"wiki={wiki}"
    base = ["--model", tiny_model, "--label", "m", "--datasets", sets, "--backend", "transformers", "--part-size", "8",
            "--topk", "3"]
    for args in ([*base, "--results-dir", tmp_path / "one"],
                 [*base, "--results-dir", tmp_path / "two", "--shard", "2/2"],
                 [*base, "--results-dir", tmp_path / "two", "--shard", "1/2"]):
        r = cli("score", *args)
        assert r.exit_code == 0, r.output
    one, meta1 = logprobs.read_dataset(logprobs.dataset_dir(tmp_path / "one", "m", "wiki"))
    two, meta2 = logprobs.read_dataset(logprobs.dataset_dir(tmp_path / "two", "m", "wiki"))
    assert one.num_rows > 0 and one.equals(two)
    assert meta2["fingerprint"] == meta1["fingerprint"]  # the shards' set fingerprint is the unsharded run's
    shard1 = logprobs.dataset_dir(tmp_path / "two", "m", "wiki") / "shard=1-of-2"
    assert sorted(p.name for p in shard1.glob("part-*")) == [f"part-{k:05d}.parquet" for k in range(0, 17, 2)]
    # the aggregate stage reads the merged shards like any dataset
    r = cli("aggregate", "--results-dir", tmp_path / "two", "--baseline", "m", "--bootstrap", 100)
    assert r.exit_code == 0, r.output


def _fake_shards(root: Path, names: list[str]):
    d = root / "logprobs" / "model=m" / "dataset=wiki"
    for n in names:
        (d / n).mkdir(parents=True)
        table = pa.table({"sample_id": pa.array([0], pa.int32()), "position": pa.array([0], pa.int32())})
        logprobs.atomic_write_table(table, d / n / "part-00000.parquet", {"set_fingerprint": "x", "fingerprint": n})
    return d


@pytest.mark.parametrize("names, msg", [
    (["shard=1-of-3", "shard=3-of-3"], "missing shard(s) 2-of-3"),
    (["shard=1-of-2", "shard=2-of-2", "shard=1-of-3"], "shards of different splits (of-2 and of-3) overlap"),
])
def test_incomplete_or_overlapping_shards_are_refused(tmp_path, names, msg):
    _fake_shards(tmp_path, names)
    r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "m")
    assert r.exit_code == 1 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_shard_names(tmp_path):
    assert logprobs.shard_problem(["shard=1-of-2", "shard=2-of-2"]) is None
    assert "unexpected directory" in logprobs.shard_problem(["shard=x"])
    r = cli("score", "--model", tmp_path, "--label", "m", "--shard", "3/2")
    assert r.exit_code == 1 and "--shard must be i/N" in r.stderr


# -- one job per GPU -----------------------------------------------------------------------------------------
def test_gpus_values():
    assert slots.parse_gpus("all", ["0", "1"]) == ["0", "1"]
    assert slots.parse_gpus("device=0") == ["0"]
    assert slots.parse_gpus('"device=0,1"') == ["0", "1"]
    assert slots.parse_gpus("2, 3") == ["2", "3"]
    assert slots.docker_value(["1"]) == "device=1" and slots.docker_value(["0", "1"]) == '"device=0,1"'


def test_jobs_wait_for_a_free_gpu(tmp_path):
    """Two jobs on one GPU run one after the other; on two GPUs, side by side, each with its own."""
    def start(gpus, out):
        cmd = [sys.executable, "-m", "jobs.runs.slots", "--gpus", gpus, "--lock-dir", str(tmp_path / "locks"), "--",
               "sh", "-c", f'echo "$CUDA_VISIBLE_DEVICES {{gpus}} $(date +%s.%N)" >> {out}; sleep 1.5; date +%s.%N >> {out}']
        return subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)

    a, b = tmp_path / "a", tmp_path / "b"
    procs = [start("0", a), start("0", b)]
    assert [p.wait(timeout=30) for p in procs] == [0, 0]
    (ga, _, sa), ea = a.read_text().split()[:3], float(a.read_text().split()[3])
    (gb, _, sb), eb = b.read_text().split()[:3], float(b.read_text().split()[3])
    assert ga == gb == "0" and (float(sb) >= ea - 0.05 or float(sa) >= eb - 0.05)  # never at once
    a.unlink(), b.unlink()
    t = time.time()
    procs = [start("0,1", a), start("0,1", b)]
    assert [p.wait(timeout=30) for p in procs] == [0, 0]
    assert time.time() - t < 2.9  # side by side
    assert {a.read_text().split()[0], b.read_text().split()[0]} == {"0", "1"}
    assert {a.read_text().split()[1], b.read_text().split()[1]} == {"device=0", "device=1"}


# -- Kubernetes and Slurm ----------------------------------------------------------------------------------
def _run_case(script: str, var: str, index: int, tmp_path: Path) -> list[str]:
    """Run the rendered dispatch with a stand-in python3 that prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python3", "python"):
        (bin_dir / name).write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
        (bin_dir / name).chmod(0o755)
    r = subprocess.run(["sh", "-c", script], env={**os.environ, var: str(index), "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_kubernetes_manifests_are_valid_least_privileged_and_each_index_runs_its_job(tmp_path):
    import json

    import kubernetes_validate

    env = {**ENV, "SHARDS": "2", "K8S_PVC": "pvc1", "TAG": "v1"}
    jobs = scoring(env)
    doc = json.loads(executors.render("k8s", jobs, plan.resolve(env)))
    docs = doc["items"]
    assert doc["kind"] == "List" and [d["metadata"]["name"] for d in docs] == ["qscore-score", "qscore-aggregate"]
    for d in docs:
        kubernetes_validate.validate(d, "1.33", strict=True)
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts["/workspace/models"]["readOnly"] and mounts["/workspace/data"]["readOnly"]
            assert not mounts["/workspace/results"].get("readOnly") and "/tmp" in mounts
    score = docs[0]["spec"]
    assert score["completionMode"] == "Indexed" and score["completions"] == len(jobs) == 4
    pod = score["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "qscore-vllm:v1" and c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "pvc1"
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}} in c["env"]
    script = c["command"][2]
    for i, job in enumerate(jobs):
        args = _run_case(script, "JOB_COMPLETION_INDEX", i, tmp_path)
        assert args == ["-m", "jobs", *executors.relocate(["score", *job.args], "/workspace")]
    assert "/workspace/models/Qwen3-14B-NVFP4" in _run_case(script, "JOB_COMPLETION_INDEX", 2, tmp_path)
    r = subprocess.run(["sh", "-c", script], env={**os.environ, "JOB_COMPLETION_INDEX": "9"}, capture_output=True, text=True)
    assert r.returncode == 2 and "no job" in r.stderr
    agg = docs[1]["spec"]["template"]["spec"]
    assert agg["containers"][0]["args"][:1] == ["aggregate"] and "until [ -d" in agg["initContainers"][0]["command"][2]


def test_slurm_array_runs_the_plan_and_the_report_is_a_job_of_its_own(tmp_path):
    jobs = scoring(ENV)
    v = plan.resolve({**ENV, "SLURM_PREFIX": "srun --container-image=q.sqsh"})
    text = executors.render("slurm", jobs, v)
    assert "#SBATCH --array=0-1" in text and "#SBATCH --gpus-per-task=1" in text and "aggregate" not in text.split("set -eu")[1]
    script = text.split("set -euo pipefail", 1)[1]
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (tmp_path / "bin" / "srun").chmod(0o755)
    r = subprocess.run(["bash", "-c", script], env={**os.environ, "SLURM_ARRAY_TASK_ID": "1",
                                                     "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["--container-image=q.sqsh", ".venv-vllm/bin/python", "-m", "jobs", "score", *jobs[1].args]
    submit = shlex.split(executors.aggregate_submit(v, "42"))
    assert submit[:4] == ["sbatch", "--job-name=qscore-aggregate", "--ntasks=1", "--dependency=afterok:42"]
    assert not any(a.startswith(("--array", "--gpus")) for a in submit)
    assert shlex.split(submit[-1])[:4] == [".venv/bin/python", "-m", "jobs", "aggregate"]


def test_a_job_wanting_more_gpus_than_listed_is_refused(capsys):
    assert slots.main(["--gpus", "0", "--per-job", "2", "--", "true"]) == 1
    assert "needs 2 GPUs but GPUS lists 1" in capsys.readouterr().err


def test_unknown_engine_options_are_refused():
    from jobs.core.settings import EngineOptions

    with pytest.raises(SettingsError, match="unknown engine option"):
        EngineOptions.from_mapping({"max_model_len": 64, "enforce_eger": True})
    with pytest.raises(SettingsError, match="--nvfp4-compute must be one of declared, weight-only"):
        EngineOptions(nvfp4_compute="w4a4")


def test_plan_piped_into_a_reader_that_stops_early_is_quiet():
    r = subprocess.run(f"{shlex.quote(sys.executable)} -m jobs plan | head -c 10", shell=True, cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "SHARDS": "50", "GPUS": ""})
    assert r.returncode == 0 and r.stdout.startswith('{"index"') and "Traceback" not in r.stderr, r.stderr
