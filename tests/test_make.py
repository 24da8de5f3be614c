"""The Makefile over the job plan. The jobs and their commands are tested in Python (jobs.runs.plan); make
itself only where make is the point: help, the included rules (`make -n`), stamps that make a second run
a no-op, .env reaching the stages, and refusals before anything runs.

Make runs on a copy of what it reads in tmp_path (`make -C`), with a clean environment, so nothing is
written into the repository and neither the user's .env nor their shell leaks in.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from jobs.runs import plan

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE = ROOT / "Makefile"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")

TARGETS = ["help", "setup", "setup-vllm", "demo", "test", "test-images", "images", "image-quantize", "image-vllm",
           "image-aggregate", "quantize", "validate", "eval", "score", "tasks", "bench", "sweep", "noise-floor", "report", "aggregate",
           "compare", "serve", "clean", "plan", "k8s", "slurm"]


def documented_vars() -> list[str]:
    return re.findall(r"^## ([A-Z][A-Z0-9_]*): ", MAKEFILE.read_text(), re.M)


class Repo:
    """A throwaway copy of what the Makefile reads."""

    def __init__(self, path: Path):
        self.path = path
        self.home = path / "home"
        self.home.mkdir(parents=True)
        for name in ("Makefile", ".env.example", "pyproject.toml"):
            shutil.copy2(ROOT / name, path / name)
        shutil.copytree(ROOT / "requirements", path / "requirements")
        shutil.copytree(ROOT / "jobs", path / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
        (path / "data").mkdir()
        (path / "data" / "mini.txt").write_text("one text per line\n")
        drop = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "GNUMAKEFLAGS", "MAKEFILES", *documented_vars()}
        self.env = {k: v for k, v in os.environ.items() if k not in drop} | {"HOME": str(self.home)}

    def make(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(["make", "--no-print-directory", "-C", str(self.path), *args], capture_output=True,
                           text=True, env={**self.env, **(env or {})}, timeout=60)
        if check:
            assert r.returncode == 0, f"make {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
        return r

    def dry(self, *args: str, **kw) -> list[str]:
        return [ln for ln in self.make("-n", *args, **kw).stdout.splitlines() if not re.match(r"make(\[\d+\])?: ", ln)]

    def jobs(self, **env) -> list[plan.Job]:
        cwd = os.getcwd()
        os.chdir(self.path)
        try:
            return plan.build({"HOME": str(self.home), **env}, uid=1000)
        finally:
            os.chdir(cwd)


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(tmp_path / "repo")


# --- the Makefile itself ----------------------------------------------------------------------------------
def test_makefile_is_thin():
    text = MAKEFILE.read_text()
    assert len(text.splitlines()) <= 250
    assert "$(eval" not in text and "define " not in text
    assert "print-%" not in text  # no target that prints any variable, HF_TOKEN included


def test_help_is_the_default_and_lists_every_target_and_variable_with_the_runner(repo):
    out = repo.make().stdout
    assert out == repo.make("help").stdout
    listed = set(re.findall(r"^  ([a-z][a-z0-9-]*) ", out, re.M))
    assert set(TARGETS) <= listed
    for var in documented_vars():
        assert re.search(rf"^  {var} ", out, re.M), f"{var} missing from help"
    assert "[Qwen/Qwen3-14B]" in out and "[bf16]" in out  # current values, derived ones too
    assert "(RUNNER=local;" in out and "make compare BASE=bf16 LABEL=new" in out
    (repo.path / ".env").write_text("RUNNER=docker\nHF_TOKEN=hf_secret123\n")
    out = repo.make("help").stdout
    assert "(RUNNER=docker;" in out and "hf_secret123" not in out
    assert repo.make("print-HF_TOKEN", check=False).returncode != 0


def test_runner_is_local_unless_set_even_when_docker_answers(repo, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text("#!/bin/sh\nexit 0\n")
    (fake / "docker").chmod(0o755)
    env = {"PATH": f"{fake}:{repo.env['PATH']}"}
    scores = [ln for ln in repo.dry("eval", env=env) if "jobs score" in ln]
    assert len(scores) == 3 and not any("docker" in ln for ln in scores)  # local: the venv
    assert all("docker run" in ln for ln in repo.dry("RUNNER=docker", "eval", env=env) if "jobs score" in ln)


def test_the_rules_make_runs_are_the_plans_commands(repo):
    jobs = {j.id: j for j in repo.jobs()}
    lines = repo.dry("quantize", "validate", "eval", "report")
    for jid in ("quantize", "validate", "score.bf16", "score.llmc-nvfp4", "score.nvidia-nvfp4", "report"):
        assert any(jobs[jid].commands["local"] in ln for ln in lines), jid
    lines = repo.dry("RUNNER=docker", "eval")
    assert sum("docker run" in ln and "qscore-vllm:latest score " in ln for ln in lines) == 3


@pytest.mark.parametrize("var, msg", [
    ("MODELS=../../etc=models/x", "is not a plain name"),
    ("TOPK=0", "TOPK must be a whole number >= 1"),
    ("MAX_MODEL_LEN=abc", "MAX_MODEL_LEN must be a whole number"),
    ("NVFP4_COMPUTE=foo", "NVFP4_COMPUTE must be one of"),
    ("SCORE_ARGS='a", "SCORE_ARGS is not a valid shell word list"),
    ("RESULTS_DIR=a b", "character make cannot use"),
    ("RECOVERY_MIN=7", "RECOVERY_MIN must be a number in (0, 1]"),
])
@pytest.mark.parametrize("target", ["eval", "k8s", "slurm"])
def test_bad_variables_stop_make_in_one_line_before_anything_is_rendered(repo, var, msg, target):
    r = repo.make(target, var, check=False)
    assert r.returncode != 0 and msg in r.stderr and r.stderr.count("error") == 1, r.stderr
    assert not (repo.path / "results" / "cluster").exists() and not (repo.path / "a").exists()


def test_duplicate_job_ids_are_refused(repo):
    r = repo.make("-n", "eval", "MODELS=a=org/a a-w4a16=org/b", "WEIGHT_ONLY=a", check=False)
    assert r.returncode != 0 and "two jobs have the id 'score.a-w4a16'" in r.stderr


def test_second_run_does_nothing_and_a_missing_output_reruns_only_its_job(repo, tmp_path):
    """Real runs with a stand-in venv whose python writes the outputs each stage names."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(
        "#!/bin/bash\necho \"$*\" >> \"$QS_LOG\"\nargs=(\"$@\"); for ((i=0;i<$#;i++)); do\n"
        "  [ \"${args[i]}\" = --label ] && label=${args[i+1]}\n  [ \"${args[i]}\" = --results-dir ] && r=${args[i+1]}\ndone\n"
        "[ \"$3\" = score ] && for s in wikitext2 ultrachat; do mkdir -p \"$r/logprobs/model=$label/dataset=$s\"; done\n"
        "[ \"$3\" = aggregate ] && mkdir -p \"$r/report\" && touch \"$r/report/summary.json\"\nexit 0\n")
    (venv / "python").chmod(0o755)
    (tmp_path / "venv" / ".qscore-setup").touch()
    log = tmp_path / "log"
    args = [f"VENV={tmp_path / 'venv'}", "GPUS=", "MODELS=a=org/a b=org/b"]
    env = {"QS_LOG": str(log)}
    repo.make(*args, "report", env=env)
    assert log.read_text().count(" score ") == 2 and log.read_text().count(" aggregate ") == 1
    log.unlink()
    repo.make(*args, "report", env=env)
    assert not log.exists()  # nothing to do
    shutil.rmtree(repo.path / "results" / "logprobs" / "model=b" / "dataset=ultrachat")
    repo.make(*args, "report", env=env)
    runs = log.read_text().splitlines()
    assert [r.split("--label ")[1].split()[0] for r in runs if " score " in r] == ["b"]
    assert "--overwrite" not in runs[0] and sum(" aggregate " in r for r in runs) == 1


def test_env_file_settings_reach_stages_run_locally(repo, tmp_path):
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("#!/bin/sh\nenv > \"$QS_ENV_OUT\"\n")
    (venv / "python").chmod(0o755)
    (tmp_path / "venv" / ".qscore-setup").touch()
    (repo.path / ".env").write_text("BOOTSTRAP=123\nSEED=7\nLOG_LEVEL=DEBUG\nWIKITEXT_SOURCE=data/wt\n")
    out = tmp_path / "env.txt"
    repo.make(f"VENV={tmp_path / 'venv'}", "aggregate", env={"QS_ENV_OUT": str(out)})
    seen = dict(ln.split("=", 1) for ln in out.read_text().splitlines() if "=" in ln)
    assert (seen["BOOTSTRAP"], seen["SEED"], seen["LOG_LEVEL"], seen["WIKITEXT_SOURCE"]) == ("123", "7", "DEBUG", "data/wt")


def test_score_then_compare(repo):
    lines = repo.dry("score", "MODEL=org/new", "LABEL=new")
    [s] = [ln for ln in lines if "jobs score" in ln]
    assert "--label new" in s and "--tokenizer" not in s  # the model's own tokenizer, as `python -m jobs score`
    assert len([ln for ln in lines if "jobs " in ln]) == 1  # nothing else
    [c] = [ln for ln in repo.dry("compare", "BASE=bf16", "LABEL=new") if "aggregate" in ln]
    assert "--baseline bf16" in c and "--labels bf16,new" in c and "--report-dir results/compare/bf16-vs-new" in c
    r = repo.make("score", "LABEL=new", check=False)
    assert r.returncode != 0 and "MODEL=" in r.stderr


def test_cluster_renders(repo):
    repo.make("k8s", "SHARDS=2")
    text = (repo.path / "results" / "cluster" / "qscore-k8s.json").read_text()
    assert '"completions": 6' in text
    repo.make("slurm")
    assert "#SBATCH --array=0-2" in (repo.path / "results" / "cluster" / "qscore.sbatch").read_text()
    out = repo.make("slurm").stdout
    assert "sbatch --job-name=qscore-aggregate --ntasks=1 --dependency=afterok:$jid --wrap" in out


def test_demo_builds_its_fixtures_locally_and_runs_the_plan(repo):
    for runner in ("local", "docker"):
        lines = [ln for ln in repo.dry("demo", f"DEMO_RUNNER={runner}") if "pip" not in ln and "venv" != ln[-4:]]
        i = [n for n, ln in enumerate(lines) if "tests/fixtures/cli.py" in ln]
        assert ".venv/bin/python tests/fixtures/cli.py build-tiny --output models/tiny-qwen3" in lines[i[0]]
        assert "tests/fixtures/cli.py export-modelopt --model models/tiny-qwen3" in lines[i[1]]
        assert f"RUNNER={runner}" in lines[i[1] + 1] and "validate eval" in lines[i[1] + 1]


def test_noise_floor_scores_any_model_of_models_again():
    """NOISE_MODELS: the baseline's second scoring is the noise floor; any other model's is its own path noise
    (`<label>~noise`, which the report pairs with `<label>`); a label not in MODELS stops the plan."""
    env = {"HOME": "/tmp", "MODELS": "bf16=models/a q=models/q", "DATASETS": "wiki=data/wiki.txt"}
    noise = {j.id.removeprefix("noise."): j for j in plan.build(env) if j.group == "noise"}
    assert set(noise) == {"bf16~noise"}
    noise = {j.id.removeprefix("noise."): j for j in plan.build({**env, "NOISE_MODELS": "bf16 q", "NOISE_ARGS": "--dtype bfloat16"})
             if j.group == "noise"}
    assert set(noise) == {"bf16~noise", "q~noise"}
    assert "--model models/q" in noise["q~noise"].command and "--dtype bfloat16" in noise["q~noise"].command
    with pytest.raises(plan.SettingsError, match="NOISE_MODELS: 'x' is not a label of MODELS"):
        plan.build({**env, "NOISE_MODELS": "x"})
