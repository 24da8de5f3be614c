"""The Makefile, checked with `make -n` (nothing runs): the docker and local commands of every stage,
one scoring job per (model, set), stamps that make a second run a no-op, and `make help`.

Every test runs make on a copy of the Makefile in tmp_path (`make -C`), with a clean environment,
so nothing is written into the repository and neither the user's .env nor their shell leaks in.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE = ROOT / "Makefile"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")

TARGETS = ["help", "setup", "setup-vllm", "demo", "test", "test-images", "images", "image-quantize", "image-vllm",
           "image-aggregate", "quantize", "validate", "eval", "score", "tasks", "noise-floor", "report", "aggregate", "serve", "clean",
           "plan", "k8s", "slurm"]
LABELS = ("bf16", "llmc-nvfp4", "nvidia-nvfp4")
PAIRS = [(m, d) for m in LABELS for d in ("wikitext2", "ultrachat")]
BOTH = "wikitext2,ultrachat"


def documented_vars() -> list[str]:
    return re.findall(r"^## ([A-Z][A-Z0-9_]*): ", MAKEFILE.read_text(), re.M)


def clean_env(home: Path) -> dict:
    drop = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "GNUMAKEFLAGS", "MAKEFILES",
            *documented_vars()}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["HOME"] = str(home)
    return env


class Repo:
    """A throwaway copy of what the Makefile reads."""

    def __init__(self, path: Path):
        self.path = path
        self.home = path / "home"
        self.home.mkdir(parents=True)
        for name in ("Makefile", ".env.example", "pyproject.toml"):
            if (ROOT / name).exists():
                shutil.copy2(ROOT / name, path / name)
        shutil.copytree(ROOT / "requirements", path / "requirements")
        # the Makefile takes its scoring jobs from the job plan (python3 -m jobs.runs.plan)
        shutil.copytree(ROOT / "jobs", path / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
        (path / "data").mkdir()
        (path / "data" / "mini.txt").write_text("one text per line\n")
        self.env = clean_env(self.home)

    def make(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(["make", "--no-print-directory", "-C", str(self.path), *args], capture_output=True,
                           text=True, env={**self.env, **(env or {})}, timeout=60)
        if check:
            assert r.returncode == 0, f"make {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
        return r

    def dry(self, *args: str, **kw) -> list[str]:
        """The commands `make -n` prints (continuation lines joined), without make's own messages."""
        text = self.make("-n", *args, **kw).stdout.replace("\\\n", " ")
        return [ln for ln in text.splitlines() if not re.match(r"make(\[\d+\])?: ", ln)]

    def var(self, name: str, *args: str) -> str:
        return self.make(*args, f"print-{name}").stdout.rstrip("\n")

    def vars(self, names, *args: str) -> dict[str, str]:
        """Several variables in one make run (print-VAR prints one line each)."""
        out = self.make(*args, *[f"print-{n}" for n in names]).stdout.split("\n")
        return dict(zip(names, out))


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(tmp_path / "repo")


def stage_lines(lines: list[str], stage: str) -> list[str]:
    """Lines running `jobs <stage>`, in a container or locally."""
    pat = re.compile(rf"(-(quantize|vllm|aggregate):\S+|-m jobs) {stage}( |$)")
    return [ln for ln in lines if pat.search(ln)]


def opt(line: str, name: str) -> str:
    m = re.search(rf"{name} (\S+)", line)
    assert m, f"{name} not in {line}"
    return m.group(1)


# --- help and variables ---------------------------------------------------------------------------

def test_help_is_the_default_and_lists_every_target_and_variable(repo):
    out = repo.make().stdout
    assert out == repo.make("help").stdout
    listed = set(re.findall(r"^  ([a-z][a-z0-9%-]*) ", out, re.M))
    phony = set(re.search(r"^\.PHONY:(.*?)(?<!\\)\n", MAKEFILE.read_text(), re.M | re.S).group(1)
                .replace("\\\n", " ").split()) - {"FORCE"}
    assert set(TARGETS) <= phony
    assert phony <= listed, f"targets missing from help: {phony - listed}"
    for var in documented_vars():
        assert re.search(rf"^  {var} ", out, re.M), f"{var} missing from help"
    assert "[Qwen/Qwen3-14B]" in out  # current values are shown


def test_env_example_documents_every_variable_with_the_makefile_default(repo):
    lines = (ROOT / ".env.example").read_text().splitlines()
    entries = {}
    for i, ln in enumerate(lines):
        m = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", ln)
        if m:
            entries[m.group(1)] = (m.group(2), ln.startswith("#"))
            assert i > 0 and lines[i - 1].startswith("# "), f"{m.group(1)} has no comment line above it"
    required = ["MODEL_ID", "NVIDIA_MODEL", "SCHEME", "QUANT_OUTPUT", "CALIBRATION_DATASET", "CALIBRATION_SPLIT",
                "NUM_CALIBRATION_SAMPLES", "MAX_SEQUENCE_LENGTH", "MAX_MODEL_LEN", "N_WIKITEXT", "N_ULTRACHAT",
                "DATASETS", "MODELS", "BASELINE", "BACKEND", "TOPK", "GPUS", "GPU_MEMORY_UTILIZATION", "HF_HOME",
                "HF_TOKEN", "RESULTS_DIR", "REPORT_DIR", "TAG", "RUNNER", "PORT"]
    documented = [v for v in documented_vars() if v not in ("MODEL", "LABEL", "OVERWRITE")]  # per-command
    for var in required + documented:
        assert var in entries, f"{var} missing from .env.example"
    assert entries["HF_TOKEN"][0] == ""  # never a token in the example
    values = repo.vars(list(entries), "RUNNER=local")
    for var, (value, commented) in entries.items():
        if var == "RUNNER" or (commented and not value):
            continue
        expected = value.replace("~", str(repo.home))
        assert values[var] == expected, f"{var}: .env.example says {expected!r}, the Makefile {values[var]!r}"
    # the same file used as .env gives the same values (plain KEY=value lines make reads as-is)
    before = repo.vars(documented_vars(), "RUNNER=local")
    shutil.copy2(ROOT / ".env.example", repo.path / ".env")
    assert repo.vars(documented_vars(), "RUNNER=local") == before
    assert repo.var("MODELS") == "bf16=Qwen/Qwen3-14B llmc-nvfp4=models/Qwen3-14B-NVFP4 nvidia-nvfp4=nvidia/Qwen3-14B-NVFP4"
    assert repo.var("HF_HOME") == f"{repo.home}/.cache/huggingface"


def test_dotenv_and_command_line_precedence(repo):
    (repo.path / ".env").write_text("MODEL_ID=org/Other-7B\nSCHEME=FP8_DYNAMIC\nHF_TOKEN=hf_secret123\n")
    assert repo.var("QUANT_OUTPUT") == "models/Other-7B-FP8_DYNAMIC"
    assert repo.var("MODELS") == ("bf16=org/Other-7B llmc-fp8_dynamic=models/Other-7B-FP8_DYNAMIC "
                                  "nvidia-fp8_dynamic=nvidia/Qwen3-14B-NVFP4")
    assert repo.var("TOKENIZER") == "org/Other-7B"
    assert repo.var("SCHEME", "SCHEME=W4A16") == "W4A16"  # the command line wins over .env
    # HF_HOME from the environment is kept when .env does not set it
    assert repo.make("print-HF_HOME", env={"HF_HOME": "/data/hf"}).stdout.strip() == "/data/hf"
    # the token goes to containers by name only, and help does not print it
    lines = repo.dry("RUNNER=docker", "eval")
    assert lines and not any("hf_secret123" in ln for ln in lines)
    assert all(" -e HF_TOKEN " in ln for ln in stage_lines(lines, "score"))
    assert "hf_secret123" not in repo.make("help").stdout
    assert all("--env-file .env " in ln for ln in stage_lines(lines, "score"))


def test_runner_defaults_to_docker_only_when_an_engine_answers(repo, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    docker = fake / "docker"
    path = f"{fake}:{repo.env['PATH']}"
    docker.write_text("#!/bin/sh\n[ \"$1\" = info ] && exit 0\nexit 1\n")
    docker.chmod(0o755)
    assert repo.make("print-RUNNER", env={"PATH": path}).stdout.strip() == "docker"
    docker.write_text("#!/bin/sh\nexit 1\n")  # a docker CLI but no engine
    assert repo.make("print-RUNNER", env={"PATH": path}).stdout.strip() == "local"
    assert repo.make("print-RUNNER", "RUNNER=local", env={"PATH": path}).stdout.strip() == "local"
    r = repo.make("-n", "eval", "RUNNER=podman", check=False)
    assert r.returncode != 0 and "RUNNER must be docker or local" in r.stderr


# --- docker commands ---------------------------------------------------------------------------

def test_docker_commands_of_the_pipeline(repo):
    home, path = repo.home, repo.path
    lines = repo.dry("RUNNER=docker", "quantize", "validate", "eval", "report")
    common = ["docker run --rm", "--env-file .env.example", "-u $(id -u):$(id -g)", f"-v {path}/results:/results"]
    gpu = ["--gpus 'all'", "--ipc=host", "-e HF_HOME=/hf", f"-v {home}/.cache/huggingface:/hf",
           f"-v {path}/data:/data:ro"]

    [q] = stage_lines(lines, "quantize")
    for s in common + gpu + [f"-v {path}/models:/models ", "qscore-quantize:latest quantize"]:
        assert s in q, f"{s!r} not in {q}"
    assert ":/models:ro" not in q
    assert q.endswith("quantize --model-id Qwen/Qwen3-14B --output /models/Qwen3-14B-NVFP4 --scheme NVFP4 "
                      "--calibration-dataset HuggingFaceH4/ultrachat_200k --calibration-split train_sft "
                      "--num-calibration-samples 1024 --max-sequence-length 2048")

    [v] = stage_lines(lines, "validate")
    for s in common + gpu + [f"-v {path}/models:/models:ro", "qscore-vllm:latest validate --model "
                             "/models/Qwen3-14B-NVFP4 --backend auto --expect-scheme NVFP4"]:
        assert s in v, f"{s!r} not in {v}"

    scores = stage_lines(lines, "score")
    assert len(scores) == 3  # one job, one engine, per model: every set goes through it
    seen = set()
    for ln in scores:
        for s in common + gpu + [f"-v {path}/models:/models:ro", "qscore-vllm:latest score",
                                 "--tokenizer Qwen/Qwen3-14B", "--results-dir /results", "--max-model-len 2048"]:
            assert s in ln, f"{s!r} not in {ln}"
        seen.add((opt(ln, "--label"), opt(ln, "--datasets")))
        assert "--overwrite" not in ln
    assert seen == {(m, BOTH) for m in LABELS}
    models = {opt(ln, "--label"): opt(ln, "--model") for ln in scores}
    assert models == {"bf16": "Qwen/Qwen3-14B", "llmc-nvfp4": "/models/Qwen3-14B-NVFP4",
                      "nvidia-nvfp4": "nvidia/Qwen3-14B-NVFP4"}

    [a] = stage_lines(lines, "aggregate")
    for s in common + ["qscore-aggregate:latest aggregate --results-dir /results --baseline bf16 "
                       "--report-dir /results/report"]:
        assert s in a, f"{s!r} not in {a}"
    assert "--gpus" not in a and "/data" not in a and "HF_TOKEN" not in a
    # read-only, the baseline's tokenizer (under models/ or the HF cache) decodes the worst tokens' context
    assert f"-v {path}/models:/models:ro" in a and f"-v {home}/.cache/huggingface:/hf:ro" in a
    # the order make runs them in: quantize before its scores, the report last
    assert lines.index(q) < min(lines.index(s) for s in scores if "/models/" in opt(s, "--model"))
    assert lines.index(a) > max(lines.index(s) for s in scores)


def test_docker_image_names_gpus_and_extra_options(repo):
    lines = repo.dry("RUNNER=docker", "TAG=v7", "IMAGE_PREFIX=reg.example/qs", "GPUS=\"device=0,1\"",
                     "DOCKER_ARGS=--shm-size 16g", "GPU_MEMORY_UTILIZATION=0.7", "SCORE_ARGS=--enforce-eager",
                     "eval", "aggregate")
    for ln in stage_lines(lines, "score"):
        assert "reg.example/qs-vllm:v7 score" in ln
        # each job waits for a GPU of its own among GPUS, which jobs.runs.slots puts in place of {gpus}
        assert "python3 -m jobs.runs.slots --gpus '\"device=0,1\"' --per-job 1 -- docker run" in ln
        assert "--gpus {gpus}" in ln and "--shm-size 16g" in ln
        assert "--gpu-memory-utilization 0.7" in ln and ln.rstrip().endswith("--enforce-eager")
    assert "reg.example/qs-aggregate:v7 aggregate" in stage_lines(lines, "aggregate")[0]


def test_gpus_empty_in_env_file_or_environment(repo):
    """GPUS= from .env or the environment (not only the command line) also runs the model stages on the CPU:
    `--gpus` with an empty value fails on a host without GPUs (could not select device driver "" with
    capabilities: [[gpu]], exit 125). The model stages keep everything else."""
    for env in (None, {"GPUS": ""}):
        if env is None:
            (repo.path / ".env").write_text("GPUS=\n")
        lines = repo.dry("RUNNER=docker", "quantize", "validate", "eval", "report", env=env)
        runs = [ln for ln in lines if "docker run" in ln]
        assert stage_lines(runs, "score") and not any("--gpus" in ln or "jobs.runs.slots" in ln for ln in runs), env
        for ln in stage_lines(lines, "quantize") + stage_lines(lines, "score"):
            assert "--ipc=host" in ln and f"-v {repo.path}/data:/data:ro" in ln and "-e HF_HOME=/hf" in ln
        (repo.path / ".env").unlink(missing_ok=True)
    # unset, the default is every GPU
    [q] = stage_lines(repo.dry("RUNNER=docker", "quantize"), "quantize")
    assert "--gpus 'all' --ipc=host" in q
    assert repo.var("GPUS") == "all"


def test_cpu_stages_never_ask_for_a_gpu(repo):
    """build-tiny (the demo's fixture) and aggregate run on the CPU whatever GPUS says; build-tiny gets data/
    where jobs.tinymodel reads it (beside the package, /opt/qscore in the images) and models/ writable."""
    stamp = repo.var("DEMO_BASE_STAMP")
    [b] = [ln for ln in repo.dry("RUNNER=docker", "GPUS=all", stamp) if "docker run" in ln]
    assert "--gpus" not in b and "--ipc=host" not in b
    assert b.endswith("qscore-quantize:latest build-tiny --output /models/tiny-qwen3")
    assert f"-v {repo.path}/data:/opt/qscore/data:ro" in b and f"-v {repo.path}/models:/models " in b
    assert "-u $(id -u):$(id -g)" in b
    [a] = stage_lines(repo.dry("RUNNER=docker", "GPUS=all", "aggregate"), "aggregate")
    assert "--gpus" not in a and "/data" not in a
    # locally, the same fixture from the venv
    assert ".venv/bin/python -m jobs build-tiny --output models/tiny-qwen3" in repo.dry("RUNNER=local", stamp)


def _sub_makes(lines: list[str]) -> list[list[str]]:
    """A dry run of `make demo`, cut at each sub-make it starts: [[its command line, what it prints], ...]."""
    out = []
    for ln in lines:
        if "HF_HUB_OFFLINE=1" in ln and "--no-print-directory" in ln:
            out.append([])
        if out:
            out[-1].append(ln)
    return out


def test_demo_in_the_images(repo):
    """DEMO_RUNNER=docker: the demo's jobs in the containers, on the CPU; the ModelOpt fixture and the task
    accuracy (lm-eval is in the vLLM image only) from the venv."""
    score_part, tasks_part, report_part = _sub_makes(repo.dry("demo", "DEMO_RUNNER=docker", "GPUS=all", "TAG=ci"))
    assert "RUNNER=docker" in score_part[0] and "RUNNER=docker" in report_part[0]
    assert "RUNNER=docker" not in tasks_part[0] and tasks_part[0].rstrip().endswith(" tasks")
    runs = [ln for ln in score_part if "docker run" in ln]
    assert runs and not any("--gpus" in ln or "jobs.runs.slots" in ln for ln in runs)
    for stage in ("build-tiny", "quantize", "validate", "score"):  # in the quantize image (CPU torch)
        assert any(f"qscore-quantize:ci {stage} " in ln for ln in runs), stage
    scores = stage_lines(runs, "score")
    assert {opt(s, "--label") for s in scores} == {"bf16", "llmc-nvfp4", "modelopt-nvfp4", "llmc-nvfp4-w4a16",
                                                   "modelopt-nvfp4-w4a16", "bf16~noise"}
    assert all("qscore-quantize:ci score" in s and f"-v {repo.path}/models:/models:ro" in s
               and opt(s, "--backend") == "transformers" for s in scores)
    # the local demo's sets, their files read where the container has data/
    local = {opt(s, "--datasets") for s in stage_lines(_sub_makes(repo.dry("demo"))[0], "score")}
    assert {opt(s, "--datasets") for s in scores} == {d.replace("=data/", "=/data/") for d in local}
    assert len(local) == 1 and "=data/" in local.pop()
    [v] = stage_lines(runs, "validate")
    assert "qscore-quantize:ci validate --model /models/tiny-qwen3-nvfp4 --backend transformers" in v
    # the demo runs offline, and so do its containers (the variables are passed by name)
    offline = "-e HF_HUB_OFFLINE -e HF_DATASETS_OFFLINE -e TRANSFORMERS_OFFLINE"
    assert all(offline in ln for ln in runs) and all("HF_HUB_OFFLINE=1" in p[0] for p in (score_part, report_part))
    # nvidia-modelopt is in no image: its fixture is made by the venv, before it is scored
    [m] = [ln for ln in score_part if "jobs export-modelopt" in ln]
    assert m.startswith(".venv/bin/python -m jobs export-modelopt")
    assert score_part.index(m) < min(score_part.index(s) for s in scores if "--label modelopt" in s)
    tasks = stage_lines(tasks_part, "tasks")
    assert tasks and all(t.startswith(".venv/bin/python -m jobs tasks") for t in tasks)
    [a] = stage_lines(report_part, "aggregate")
    assert "qscore-aggregate:ci aggregate" in a and offline not in a and "--gpus" not in a
    r = repo.make("-n", "demo", "DEMO_RUNNER=podman", check=False)
    assert r.returncode != 0 and "DEMO_RUNNER must be docker or local" in r.stderr


def test_docker_user(repo):
    """Containers run as the caller (-u $(id -u):$(id -g)) unless DOCKER_USER names another uid:gid, e.g. a
    non-root one when make itself runs as root (make test-images in CI)."""
    for args, user in (([], "$(id -u):$(id -g)"), (["DOCKER_USER=1000:1000"], "1000:1000")):
        runs = [ln for ln in repo.dry("RUNNER=docker", *args, "quantize", "eval", "report") if "docker run" in ln]
        assert len(runs) >= 5 and all(f" -u {user} " in ln for ln in runs), (args, runs)


def test_test_images_target(repo):
    lines = repo.dry("test-images")
    assert lines[-1] == "bash tests/images/test-images.sh"
    assert lines[0] == "python3 -m venv .venv"  # the comparison's local run needs the venv


def test_docker_env_file_falls_back_to_the_example_or_is_left_out(repo):
    (repo.path / ".env").write_text("N_WIKITEXT=50\n")
    [ln, *_] = stage_lines(repo.dry("RUNNER=docker", "eval"), "score")
    assert "--env-file .env " in ln
    (repo.path / ".env").unlink()
    (repo.path / ".env.example").unlink()
    [ln, *_] = stage_lines(repo.dry("RUNNER=docker", "eval"), "score")
    assert "--env-file" not in ln


def test_docker_paths_are_translated(repo, tmp_path):
    ckpt = tmp_path / "elsewhere" / "ckpt"
    ckpt.mkdir(parents=True)
    lines = repo.dry("RUNNER=docker", f"MODELS=base=models/base new={ckpt} hub=org/Model",
                     "DATASETS=wikitext2 ultrachat mine=data/mini.txt", "CALIBRATION_DATASET=data/calib.jsonl",
                     "quantize", "eval")
    [q] = stage_lines(lines, "quantize")
    assert "--calibration-dataset /data/calib.jsonl" in q and "--calibration-split" not in q
    scores = stage_lines(lines, "score")
    assert len(scores) == 3  # one job per model
    by = {opt(s, "--label"): s for s in scores}
    assert {opt(s, "--datasets") for s in scores} == {"wikitext2,ultrachat,mine=/data/mini.txt"}
    assert opt(by["base"], "--model") == "/models/base"
    assert opt(by["hub"], "--model") == "org/Model"
    new = by["new"]
    assert opt(new, "--model") == f"/mnt/host{ckpt}" and f"-v {ckpt}:/mnt/host{ckpt}:ro" in new
    assert all(opt(s, "--tokenizer") == "/models/base" for s in scores)
    # a bare path names its set after the file, and the name is passed explicitly
    [s] = stage_lines(repo.dry("RUNNER=docker", "MODELS=hub=org/Model", "DATASETS=data/mini.txt", "eval"), "score")
    assert opt(s, "--datasets") == "mini=/data/mini.txt"
    [s] = stage_lines(repo.dry("RUNNER=local", "MODELS=hub=org/Model", "DATASETS=data/mini.txt", "eval"), "score")
    assert opt(s, "--datasets") == "mini=data/mini.txt"


def test_score_runs_one_container_and_nothing_else(repo, tmp_path):
    ckpt = tmp_path / "ckpts" / "mine"
    lines = repo.dry("RUNNER=docker", "score", f"MODEL={ckpt}", "LABEL=mine")
    runs = [ln for ln in lines if "docker run" in ln]
    assert len(runs) == 1 and not stage_lines(lines, "quantize")
    [s] = runs
    assert "qscore-vllm:latest score" in s and "-v " + str(repo.path) + "/models:/models:ro" in s
    assert opt(s, "--model") == f"/mnt/host{ckpt}" and f"-v {ckpt}:/mnt/host{ckpt}:ro" in s
    assert opt(s, "--label") == "mine" and opt(s, "--datasets") == "wikitext2,ultrachat"
    assert opt(s, "--tokenizer") == "Qwen/Qwen3-14B"
    [s] = stage_lines(repo.dry("RUNNER=docker", "score", "MODEL=org/New-NVFP4", "LABEL=new"), "score")
    assert opt(s, "--model") == "org/New-NVFP4" and "/mnt/host" not in s
    r = repo.make("-n", "score", "LABEL=x", check=False)
    assert r.returncode != 0 and "MODEL=" in r.stderr


def test_serve_and_images(repo):
    lines = repo.dry("RUNNER=docker", "serve", "PORT=9000")
    [s] = [ln for ln in lines if "--entrypoint vllm" in ln]
    assert "-p 9000:9000" in s and "qscore-vllm:latest serve /models/Qwen3-14B-NVFP4 --host 0.0.0.0 --port 9000" in s
    assert stage_lines(lines, "quantize")  # the quantized model is made first
    builds = [ln for ln in repo.dry("images", "TAG=v1", "QUANTIZE_BASE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime")
              if ln.startswith("docker build")]
    assert len(builds) == 3
    for name in ("quantize", "vllm", "aggregate"):
        [b] = [ln for ln in builds if f"-f docker/{name}.Dockerfile" in ln]
        assert f"-t qscore-{name}:v1" in b and b.endswith(" .") and "--build-arg VERSION=" in b
    assert "--build-arg BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime" in builds[0]


# --- local commands ------------------------------------------------------------------------------

def test_local_commands(repo):
    lines = repo.dry("RUNNER=local", "quantize", "validate", "eval", "report")
    assert not any("docker" in ln for ln in lines)
    assert lines[:2] == ["python3 -m venv .venv", ".venv/bin/pip install -r requirements/dev.txt"]  # once, first
    assert sum(ln.startswith("python3 -m venv") for ln in lines) == 1
    [q] = stage_lines(lines, "quantize")
    assert q.startswith(".venv/bin/python -m jobs quantize --model-id Qwen/Qwen3-14B --output models/Qwen3-14B-NVFP4")
    [v] = stage_lines(lines, "validate")
    assert v.startswith(".venv/bin/python -m jobs validate --model models/Qwen3-14B-NVFP4 --backend auto")
    scores = stage_lines(lines, "score")
    assert {(opt(s, "--label"), opt(s, "--datasets")) for s in scores} == {(m, BOTH) for m in LABELS}
    assert all(s.startswith("python3 -m jobs.runs.slots --gpus 'all' --per-job 1 -- .venv/bin/python -m jobs score")
               and opt(s, "--results-dir") == "results" for s in scores)
    [a] = stage_lines(lines, "aggregate")
    assert a == ".venv/bin/python -m jobs aggregate --results-dir results --baseline bf16 --report-dir results/report"
    # a vLLM venv, when there is one, runs validate and score
    (repo.path / ".venv-vllm" / "bin").mkdir(parents=True)
    (repo.path / ".venv-vllm" / "bin" / "python").write_text("")
    lines = repo.dry("RUNNER=local", "validate", "eval", "serve")
    assert all(".venv-vllm/bin/python -m jobs score" in ln for ln in stage_lines(lines, "score"))
    assert stage_lines(lines, "validate")[0].startswith(".venv-vllm/bin/python -m jobs validate")
    assert stage_lines(lines, "quantize")[0].startswith(".venv/bin/python -m jobs quantize")
    assert any(ln.startswith(".venv-vllm/bin/vllm serve models/Qwen3-14B-NVFP4 --port 8000") for ln in lines)


def test_setup_and_test_targets(repo):
    lines = repo.dry("test")
    assert lines[:3] == ["python3 -m venv .venv", ".venv/bin/pip install -r requirements/dev.txt",
                         "touch .venv/.qscore-setup"]
    assert lines[-1] == '.venv/bin/python -m pytest -m "not gpu"'
    (repo.path / ".venv").mkdir()
    (repo.path / ".venv" / ".qscore-setup").write_text("")
    assert repo.dry("test") == ['.venv/bin/python -m pytest -m "not gpu"']  # set up once
    assert repo.dry("setup-vllm")[1] == ".venv-vllm/bin/pip install vllm==0.26.0 -r requirements/vllm.txt"


def test_demo_is_local_cpu_and_offline(repo):
    # the demo runs two sub-makes (scoring, then the report); a dry run prints the first one's work twice
    lines = list(dict.fromkeys(repo.dry("demo", "RUNNER=docker")))  # the demo ignores the runner
    assert not any("docker run" in ln for ln in lines)
    assert any("HF_HUB_OFFLINE=1" in ln for ln in lines)
    assert ".venv/bin/python -m jobs build-tiny --output models/tiny-qwen3" in lines
    [q] = stage_lines(lines, "quantize")
    assert q == (".venv/bin/python -m jobs quantize --model-id models/tiny-qwen3 --output models/tiny-qwen3-nvfp4 "
                 "--scheme NVFP4 --calibration-dataset data/calib_mini.jsonl --num-calibration-samples 64 "
                 "--max-sequence-length 256")
    [v] = stage_lines(lines, "validate")
    assert "--model models/tiny-qwen3-nvfp4 --backend transformers" in v
    assert (".venv/bin/python -m jobs export-modelopt --model models/tiny-qwen3 "
            "--output models/tiny-qwen3-modelopt-nvfp4") in lines
    scores = stage_lines(lines, "score")
    sets = "wiki_mini=data/wiki_mini.txt,chat_mini=data/chat_mini.jsonl,wikitext2_doc=data/wiki_mini.txt"
    assert {(opt(s, "--label"), opt(s, "--datasets")) for s in scores} == {
        (m, sets) for m in ("bf16", "llmc-nvfp4", "modelopt-nvfp4", "llmc-nvfp4-w4a16", "modelopt-nvfp4-w4a16",
                            "bf16~noise")}
    assert all(opt(s, "--tokenizer") == "models/tiny-qwen3" and opt(s, "--backend") == "transformers"
               and opt(s, "--topk") == "20" for s in scores)
    # both NVFP4 models as declared (W4A4), and again weight-only beside them; no GPU asked for
    assert {opt(s, "--label") for s in scores if "--nvfp4-compute weight-only" in s} == {
        "llmc-nvfp4-w4a16", "modelopt-nvfp4-w4a16"}
    assert not any("jobs.runs.slots" in s for s in scores)
    # the noise floor: the baseline again, in bfloat16 instead of float32
    [noise] = [s for s in scores if opt(s, "--label") == "bf16~noise"]
    assert opt(noise, "--model") == "models/tiny-qwen3" and opt(noise, "--dtype") == "bfloat16"
    assert lines.index(noise) < lines.index(stage_lines(lines, "aggregate")[0])
    [a] = stage_lines(lines, "aggregate")
    assert "--baseline bf16" in a
    # every fixture is made before it is used
    i = {k: next(n for n, ln in enumerate(lines) if k in ln) for k in ("build-tiny", "export-modelopt")}
    assert i["build-tiny"] < lines.index(q) < min(lines.index(s) for s in scores if "noise" not in s)
    assert i["export-modelopt"] < min(lines.index(s) for s in scores if "modelopt" in opt(s, "--label"))


# --- tasks (lm-evaluation-harness) -----------------------------------------------------------------

def test_tasks_runs_one_container_per_model(repo):
    home, path = repo.home, repo.path
    lines = repo.dry("RUNNER=docker", "tasks")
    runs = stage_lines(lines, "tasks")
    assert len(runs) == 3 and not stage_lines(lines, "score")
    for ln in runs:
        for s in ["docker run --rm", "--gpus 'all'", f"-v {home}/.cache/huggingface:/hf", f"-v {path}/data:/data:ro",
                  f"-v {path}/models:/models:ro", f"-v {path}/results:/results", "qscore-vllm:latest tasks",
                  "--tasks gsm8k,arc_challenge", "--backend auto", "--max-model-len 2048", "--chat-template none",
                  "--results-dir /results --include-path /data/tasks"]:
            assert s in ln, f"{s!r} not in {ln}"
        assert "--limit" not in ln and "--num-fewshot" not in ln and "--overwrite" not in ln
    assert {opt(ln, "--label"): opt(ln, "--model") for ln in runs} == {
        "bf16": "Qwen/Qwen3-14B", "llmc-nvfp4": "/models/Qwen3-14B-NVFP4", "nvidia-nvfp4": "nvidia/Qwen3-14B-NVFP4"}
    # the quantized model is made first
    lines = repo.dry("RUNNER=docker", "tasks", "quantize")
    [q] = stage_lines(lines, "quantize")
    assert lines.index(q) < min(lines.index(ln) for ln in stage_lines(lines, "tasks") if "/models/" in ln)


def test_tasks_settings_and_local_task_files(repo):
    (repo.path / "data" / "mine.yaml").write_text("task: mine\n")
    args = ("TASKS=qscore_local data/mine.yaml", "LIMIT=50", "NUM_FEWSHOT=0", "CHAT_TEMPLATE=default",
            "TASKS_ARGS=--no-add-bos-token", "MODELS=base=models/base", "tasks")
    [d] = stage_lines(repo.dry("RUNNER=docker", *args), "tasks")
    assert "--tasks qscore_local,/data/mine.yaml " in d
    assert "--limit 50 --num-fewshot 0" in d and "--chat-template default" in d and d.endswith("--no-add-bos-token")
    [loc] = stage_lines(repo.dry("RUNNER=local", *args), "tasks")
    assert loc.startswith(".venv/bin/python -m jobs tasks --model models/base --label base "
                          "--tasks qscore_local,data/mine.yaml --backend auto")
    assert "--results-dir results " in loc and "--include-path" not in loc  # the package finds data/tasks


def test_tasks_stamps_and_the_report(repo):
    t = _set_up_and_quantized(repo, age=1000) + 10
    stamps = repo.var("TASKS_STAMPS", "RUNNER=local").split()
    assert len(stamps) == len(set(stamps)) == 3  # one file per job
    for k, stamp in enumerate(stamps):
        label = Path(stamp).name.split(".")[0]
        d = repo.path / "results" / "tasks" / f"model={label}" / "task=gsm8k"
        d.mkdir(parents=True)
        os.utime(d, (t + k, t + k))
        os.utime(d.parent, (t + k, t + k))
        Path(repo.path, stamp).parent.mkdir(parents=True, exist_ok=True)
        Path(repo.path, stamp).write_text("")
    assert repo.dry("RUNNER=local", "tasks") == []
    # another setting names other stamps: every job runs again, and the stage skips what is done
    assert len(stage_lines(repo.dry("RUNNER=local", "tasks", "LIMIT=10"), "tasks")) == 3
    # a deleted model directory redoes that model's job only
    shutil.rmtree(repo.path / "results" / "tasks" / "model=bf16")
    [ln] = stage_lines(repo.dry("RUNNER=local", "tasks"), "tasks")
    assert opt(ln, "--label") == "bf16"
    # `make tasks report` aggregates after the task jobs; RECOVERY_MIN reaches the report
    lines = repo.dry("RUNNER=local", "tasks", "report", "RECOVERY_MIN=0.9")
    [a] = stage_lines(lines, "aggregate")
    assert lines.index(a) > max(lines.index(ln) for ln in stage_lines(lines, "tasks"))
    assert a.endswith("--report-dir results/report --recovery-min 0.9")


def test_demo_runs_the_bundled_tasks_before_its_report(repo):
    lines = repo.dry("demo")
    runs = stage_lines(lines, "tasks")
    assert {opt(ln, "--label") for ln in runs} == {"bf16", "llmc-nvfp4", "modelopt-nvfp4"}
    for ln in runs:
        assert "--tasks qscore_local --backend transformers --max-model-len 256" in ln and "docker" not in ln
    [a] = stage_lines(lines, "aggregate")
    assert lines.index(a) > max(lines.index(ln) for ln in runs)


# --- stamps ---------------------------------------------------------------------------------------

def _set_up_and_quantized(repo: Repo, *, age: float) -> float:
    """A set-up venv and a quantized checkpoint written ``age`` seconds ago; returns that time."""
    (repo.path / ".venv").mkdir()
    (repo.path / ".venv" / ".qscore-setup").write_text("")
    qscore = repo.path / "models" / "Qwen3-14B-NVFP4" / "qscore.json"
    qscore.parent.mkdir(parents=True)
    qscore.write_text("{}")
    t = time.time() - age
    os.utime(qscore, (t, t))
    return t


def _complete(repo: Repo, *args: str) -> list[str]:
    """Make the outputs and stamps a real run would leave, oldest first; returns the stamps."""
    t = _set_up_and_quantized(repo, age=1000)
    for job in repo.var("JOB_STAMPS", *args).split():  # each model's job, then its (model, set) stamps
        Path(repo.path, job).parent.mkdir(parents=True, exist_ok=True)
        Path(repo.path, job).write_text("")
        os.utime(Path(repo.path, job), (t + 5, t + 5))
    stamps = repo.var("EVAL_STAMPS", *args).split()
    results = repo.var("RESULTS_DIR", *args)
    for k, stamp in enumerate(stamps):
        label, name = Path(stamp).parent.name, Path(stamp).name.split(".")[0]
        ddir = Path(repo.path, results, "logprobs", f"model={label}", f"dataset={name}")
        ddir.mkdir(parents=True)
        (ddir / "part-00000.parquet").write_text("")
        p = Path(repo.path, stamp)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
        os.utime(ddir, (t + 10 + k, t + 10 + k))
        os.utime(p, (t + 20 + k, t + 20 + k))
    report = Path(repo.path, repo.var("REPORT_STAMP", *args))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("")
    summary = Path(repo.path, repo.var("REPORT_DIR", *args), "summary.json")
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text("{}")
    return stamps


@pytest.mark.parametrize("runner", ["docker", "local"])
def test_second_run_does_nothing(repo, runner):
    first = repo.dry(f"RUNNER={runner}", "quantize", "eval", "report")
    assert len(stage_lines(first, "score")) == 3
    stamps = _complete(repo, f"RUNNER={runner}")
    assert len(stamps) == len(set(stamps)) == 6  # one file per (model, set): make -j never writes one twice
    assert repo.dry(f"RUNNER={runner}", "eval") == []
    assert repo.dry(f"RUNNER={runner}", "quantize", "eval", "report") == []
    assert "Nothing to be done for 'eval'" in repo.make(f"RUNNER={runner}", "-n", "eval").stdout
    # a runner switch reruns nothing: stamps are named after the local form of the arguments
    assert repo.dry("RUNNER=docker" if runner == "local" else "RUNNER=local", "eval") == []


def test_stale_and_missing_outputs_rerun_only_what_they_affect(repo):
    _complete(repo, "RUNNER=docker")
    root = repo.path
    # a new quantized checkpoint: its two jobs rerun, replacing their results; then the report
    os.utime(root / "models" / "Qwen3-14B-NVFP4" / "qscore.json")
    lines = repo.dry("RUNNER=docker", "eval", "report")
    scores = stage_lines(lines, "score")
    assert {opt(s, "--label") for s in scores} == {"llmc-nvfp4"} and len(scores) == 1
    assert all(s.endswith("--overwrite") for s in scores)
    assert stage_lines(lines, "aggregate")
    _complete_again = [Path(root, s) for v in ("JOB_STAMPS", "EVAL_STAMPS") for s in repo.var(v, "RUNNER=docker").split()]
    for p in _complete_again:
        p.touch()
    # a deleted dataset directory: that model's job reruns, without --overwrite: the stage skips the
    # set it still has (same inputs) and scores only the missing one
    shutil.rmtree(root / "results" / "logprobs" / "model=bf16" / "dataset=ultrachat")
    [s] = stage_lines(repo.dry("RUNNER=docker", "eval"), "score")
    assert (opt(s, "--label"), opt(s, "--datasets")) == ("bf16", BOTH) and "--overwrite" not in s
    (root / "results" / "logprobs" / "model=bf16" / "dataset=ultrachat").mkdir()
    # another argument: the jobs it changes run again, and the stage decides (skip, resume or refuse)
    scores = stage_lines(repo.dry("RUNNER=docker", "eval", "N_WIKITEXT=50"), "score")
    assert len(scores) == 3 and not any("--overwrite" in s for s in scores)
    scores = stage_lines(repo.dry("RUNNER=docker", "eval", "N_WIKITEXT=50", "OVERWRITE=1"), "score")
    assert len(scores) == 3 and all(s.endswith("--overwrite") for s in scores)
    # a set added to DATASETS: every model's job runs for it (the stage skips the sets it has)
    scores = stage_lines(repo.dry("RUNNER=docker", "eval", "DATASETS=wikitext2 ultrachat mine=data/mini.txt"), "score")
    assert len(scores) == 3 and not any("--overwrite" in s for s in scores)
    # the quantized model is never redone while its qscore.json is there
    assert stage_lines(repo.dry("RUNNER=docker", "quantize", "NUM_CALIBRATION_SAMPLES=64"), "quantize") == []


def test_report_follows_new_results(repo):
    _complete(repo, "RUNNER=local")
    assert repo.dry("RUNNER=local", "report") == []
    # a checkpoint scored with `make score` appears in results: the report is redone
    new = repo.path / "results" / "logprobs" / "model=mine" / "dataset=wikitext2"
    new.mkdir(parents=True)
    lines = repo.dry("RUNNER=local", "report")
    assert stage_lines(lines, "aggregate") and not stage_lines(lines, "score")
    # `make aggregate` always aggregates what is there, and runs nothing else
    assert repo.dry("RUNNER=local", "aggregate") == [
        ".venv/bin/python -m jobs aggregate --results-dir results --baseline bf16 --report-dir results/report"]


def test_clean_keeps_real_models(repo):
    [cmd] = repo.dry("clean")
    assert cmd.startswith("rm -rf results/logprobs results/report results/.stamps results/demo")
    assert " models " not in f"{cmd} " and "Qwen3-14B-NVFP4" not in cmd and "models/tiny-qwen3 " in cmd


# --- docs/cuda-host.md matches the Makefile ----------------------------------------------------------

DOC = ROOT / "docs" / "cuda-host.md"


def test_cuda_host_doc_names_every_target_and_its_commands_work(repo):
    text = DOC.read_text()
    for target in TARGETS:
        assert f"make {target}" in text or (target == "help" and "`make`" in text), f"make {target} not in {DOC.name}"
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = [ln.split("#", 1)[0].strip() for b in blocks for ln in b.splitlines()]
    commands = [c for c in commands if c.startswith("make")]
    assert len(commands) >= 8
    shutil.copy2(ROOT / ".env.example", repo.path / ".env")
    for cmd in commands:
        args = cmd.split()[1:]
        r = repo.make("-n", "RUNNER=docker", *args, check=False)
        assert r.returncode == 0, f"{cmd!r} from {DOC.name} fails: {r.stderr}"


def test_cuda_host_doc_example_is_what_make_prints(repo):
    block = re.search(r"```\n(python3 -m jobs.runs.slots .*?)```", DOC.read_text(), re.S).group(1)
    documented = " ".join(block.replace("\\\n", " ").split())
    shutil.copy2(ROOT / ".env.example", repo.path / ".env")
    [line] = [ln for ln in stage_lines(repo.dry("RUNNER=docker", "eval"), "score") if "--label llmc-nvfp4" in ln]
    line = line.split(" && ", 1)[1].replace(str(repo.home), "~").replace(str(repo.path), "$PWD")
    assert documented == line


# --- GPUs, shards and the job plan ------------------------------------------------------------------

def test_no_gpus_means_no_gpu_asked_for(repo):
    """GPUS= on a host without GPUs: no --gpus (docker would refuse it, exit 125), no slot wrapper."""
    lines = repo.dry("RUNNER=docker", "GPUS=", "quantize", "validate", "eval", "report")
    for stage in ("quantize", "validate", "score", "aggregate"):
        for ln in stage_lines(lines, stage):
            assert "--gpus" not in ln and "jobs.runs.slots" not in ln, ln
    lines = repo.dry("RUNNER=local", "GPUS=", "eval")
    assert all(s.startswith(".venv/bin/python -m jobs score") for s in stage_lines(lines, "score"))


def test_large_models_take_several_gpus_and_shards_split_a_model(repo):
    lines = repo.dry("RUNNER=docker", "TENSOR_PARALLEL_SIZE=2", "GPUS=0,1,2,3", "eval")
    for s in stage_lines(lines, "score"):
        assert "jobs.runs.slots --gpus '0,1,2,3' --per-job 2 --" in s and "--tensor-parallel-size 2" in s
    scores = stage_lines(repo.dry("RUNNER=local", "SHARDS=2", "MODELS=big=models/big", "eval"), "score")
    assert sorted(opt(s, "--shard") for s in scores) == ["1/2", "2/2"]
    assert len(repo.var("EVAL_STAMPS", "SHARDS=2", "MODELS=big=models/big").split()) == 4  # (set, shard)


def test_plan_lists_the_jobs_make_runs(repo):
    import json

    jobs = [json.loads(ln) for ln in repo.make("plan", "WEIGHT_ONLY=llmc-nvfp4").stdout.splitlines()]
    assert [j["id"] for j in jobs] == ["score.bf16", "score.llmc-nvfp4", "score.nvidia-nvfp4", "score.llmc-nvfp4-w4a16"]
    assert jobs[3]["args"][-2:] == ["--nvfp4-compute", "weight-only"] and jobs[3]["model"] == "models/Qwen3-14B-NVFP4"
    assert jobs[0]["outputs"] == ["results/logprobs/model=bf16/dataset=wikitext2", "results/logprobs/model=bf16/dataset=ultrachat"]
    stamps = repo.var("EVAL_STAMPS", "WEIGHT_ONLY=llmc-nvfp4").split()
    assert stamps == [s for j in jobs for s in j["stamps"]]
    r = repo.make("-n", "eval", "MODELS=oops", check=False)
    assert r.returncode != 0 and "MODELS entry 'oops' is not label=path" in r.stderr
    r = repo.make("-n", "eval", "WEIGHT_ONLY=nope", check=False)
    assert r.returncode != 0 and "WEIGHT_ONLY names labels that are not in MODELS" in r.stderr


def test_cluster_renders(repo):
    repo.make("k8s", "SHARDS=2")
    text = (repo.path / "results" / "cluster" / "qscore-k8s.yaml").read_text()
    assert "completionMode: \"Indexed\"" in text and "completions: 6" in text
    repo.make("slurm")
    text = (repo.path / "results" / "cluster" / "qscore.sbatch").read_text()
    assert "#SBATCH --array=0-2" in text and "SLURM_ARRAY_TASK_ID" in text
