"""The scoring jobs of the plan handed to a cluster's scheduler: a Kubernetes Indexed Job, or a Slurm job array.

Each renders one array of scoring jobs (element i runs job i, chosen by ``JOB_COMPLETION_INDEX`` /
``SLURM_ARRAY_TASK_ID``) and an aggregate job after it. A sweep adds its quantize jobs before them (their
own Indexed Job in the quantize image; on Slurm the first elements of the array, submitted first) and its
tasks and bench jobs beside the scoring ones (the vLLM image runs every one of them). Paths are those the jobs see there: on
Kubernetes the models, data and results live on one shared volume (a PVC) whose models/ and data/ are
mounted read-only and whose results directory is the only one written, under /workspace; on Slurm the
repository is on a shared filesystem and jobs run in it. Kubernetes manifests are JSON documents
(a ``kind: List``), which kubectl reads as it reads YAML. Standard library only.
"""
from __future__ import annotations

import json
import os
import shlex

from jobs.core.errors import SettingsError

WORKSPACE = "/workspace"
IMAGE_USER = 10001  # the images' USER


def render(kind: str, jobs: list, v) -> str:
    if kind == "k8s":
        return kubernetes(jobs, v)
    if kind == "slurm":
        return slurm(jobs, v)
    raise SettingsError(f"unknown executor {kind!r}")


# -- paths as a job sees them -------------------------------------------------------------------------------
_PATH_FLAGS = ("--model", "--tokenizer", "--results-dir", "--model-id", "--quant-output", "--calibration-dataset")


def relocate(args: list[str], root: str) -> list[str]:
    """Job arguments with the repository's relative paths (models/…, data/…, results) put under ``root``;
    hub ids and absolute paths pass through (pure)."""
    def move(value: str) -> str:
        if value.startswith("/"):
            return value
        rel = value.removeprefix("./")
        if rel.split("/", 1)[0] in ("models", "data", "results") or os.path.exists(value):
            return f"{root}/{rel}"
        return value  # org/name: a hub id

    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a in _PATH_FLAGS:
            out[i + 1] = move(out[i + 1])
        elif a == "--datasets":
            items = []
            for item in out[i + 1].split(","):
                name, sep, path = item.partition("=")
                items.append(f"{name}={move(path)}" if sep else (move(item) if "/" in item else item))  # a name
            out[i + 1] = ",".join(items)
    return out


def dispatch(jobs: list, index_var: str, prefix: list[str], root: str | None, prefixes: dict | None = None) -> str:
    """A POSIX shell ``case`` running job ``$index_var`` of the plan (pure); ``prefixes``: another launcher
    for a stage (Slurm: quantize in the venv with llm-compressor)."""
    lines = [f'case "${{{index_var}}}" in']
    for i, j in enumerate(jobs):
        args = relocate([j.stage, *j.args], root) if root else [j.stage, *j.args]
        lines.append(f"  {i}) exec {shlex.join([*(prefixes or {}).get(j.stage, prefix), *args])} ;;  # {j.id}")
    lines.append(f'  *) echo "no job {index_var}=${{{index_var}}} in this plan of {len(jobs)}" >&2; exit 2 ;;')
    lines.append("esac")
    return "\n".join(lines)


def _image(v, stage: str) -> str:
    return f"{v.get('K8S_REGISTRY')}{v.get('IMAGE_PREFIX') or 'qscore'}-{stage}:{v.get('TAG') or 'latest'}"


def _gpus(jobs: list) -> int:
    return max((j.gpus for j in jobs), default=1)


# -- Kubernetes -------------------------------------------------------------------------------------------
# Least privilege: never root, no privilege escalation, no capabilities, a read-only root filesystem with
# writable scratch (emptyDir) where programs write: /tmp, HOME (caches of torch, triton, matplotlib).
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": IMAGE_USER, "runAsGroup": IMAGE_USER, "fsGroup": IMAGE_USER,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                      "capabilities": {"drop": ["ALL"]}}
SCRATCH = [("tmp", "/tmp"), ("home", "/home/qscore")]


def _mounts(results_top: str, *, models_rw: bool = False, caches: bool = True) -> list[dict]:
    m = [{"name": "workspace", "mountPath": f"{WORKSPACE}/models", "subPath": "models", "readOnly": not models_rw},
         {"name": "workspace", "mountPath": f"{WORKSPACE}/data", "subPath": "data", "readOnly": True},
         {"name": "workspace", "mountPath": f"{WORKSPACE}/{results_top}", "subPath": results_top}]
    if caches:  # a hub model or set is downloaded on first use; compile caches are reused
        m += [{"name": "workspace", "mountPath": f"{WORKSPACE}/.cache", "subPath": ".cache"}]
    return m + [{"name": name, "mountPath": path} for name, path in SCRATCH]


def _volumes(pvc: str, shm: bool) -> list[dict]:
    vols = [{"name": "workspace", "persistentVolumeClaim": {"claimName": pvc}}]
    vols += [{"name": name, "emptyDir": {}} for name, _ in SCRATCH]
    return vols + ([{"name": "dshm", "emptyDir": {"medium": "Memory"}}] if shm else [])


def _job(name: str, stage: str, pod: dict, spec: dict) -> dict:
    labels = {"app.kubernetes.io/name": "qscore", "qscore/stage": stage}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
            "spec": {**spec, "template": {"metadata": {"labels": labels},
                                          "spec": {"restartPolicy": "Never", "securityContext": POD_SECURITY, **pod}}}}


def kubernetes(jobs: list, v) -> str:
    name = v.get("K8S_NAME") or "qscore"
    pvc = v.get("K8S_PVC") or "qscore-workspace"
    secret = v.get("K8S_HF_SECRET") or "hf-token"
    if v.results.startswith("/") or v.results.startswith(".."):
        raise SettingsError(f"RESULTS_DIR {v.results!r}: make k8s needs a path inside the repository (on the PVC)")
    top = v.results.removeprefix("./").split("/", 1)[0]
    results = f"{WORKSPACE}/{v.results.removeprefix('./')}"
    env_vars = [{"name": "HF_HOME", "value": f"{WORKSPACE}/.cache/huggingface"},
                {"name": "CACHE_DIR", "value": f"{WORKSPACE}/.cache/qscore"},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token", "optional": True}}}]
    quant = [j for j in jobs if j.stage == "quantize"]
    jobs = [j for j in jobs if j.stage != "quantize"]
    gpus = _gpus(jobs)
    items = []
    init = []
    if quant:  # one pod per recipe and seed, then the vLLM jobs once every checkpoint is written
        items.append(_job(f"{name}-quantize", "quantize", {
            "containers": [{
                "name": "quantize", "image": _image(v, "quantize"), "workingDir": WORKSPACE,
                "command": ["/bin/sh", "-c", dispatch(quant, "JOB_COMPLETION_INDEX", ["python3", "-m", "jobs"], WORKSPACE)],
                "env": env_vars, "securityContext": CONTAINER_SECURITY,
                "resources": {"limits": {"nvidia.com/gpu": 1}, "requests": {"nvidia.com/gpu": 1}},
                "volumeMounts": _mounts(top, models_rw=True) + [{"name": "dshm", "mountPath": "/dev/shm"}]}],
            "volumes": _volumes(pvc, shm=True)}, {
            "completionMode": "Indexed", "completions": len(quant), "parallelism": len(quant),
            "backoffLimitPerIndex": 1, "maxFailedIndexes": 0}))
        stamps = " ".join(shlex.quote(f"{WORKSPACE}/{j.stamp}") for j in quant)
        init = [{"name": "wait-for-checkpoints", "image": _image(v, "aggregate"), "securityContext": CONTAINER_SECURITY,
                 "command": ["/bin/sh", "-c", f"for f in {stamps}; do until [ -f \"$f\" ]; do echo \"waiting for $f\"; "
                             "sleep 30; done; done"], "volumeMounts": _mounts(top, caches=False)}]
    score = _job(f"{name}-score", "score", {
        **({"initContainers": init} if init else {}),
        "containers": [{
            "name": "score", "image": _image(v, "vllm"), "workingDir": WORKSPACE,
            "command": ["/bin/sh", "-c", dispatch(jobs, "JOB_COMPLETION_INDEX", ["python3", "-m", "jobs"], WORKSPACE)],
            "env": env_vars, "securityContext": CONTAINER_SECURITY,
            "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}},
            "volumeMounts": _mounts(top) + [{"name": "dshm", "mountPath": "/dev/shm"}]}],
        "volumes": _volumes(pvc, shm=True)}, {
        "completionMode": "Indexed", "completions": len(jobs),
        "parallelism": int(v.get("K8S_PARALLELISM") or len(jobs)), "backoffLimitPerIndex": 2, "maxFailedIndexes": 0})
    outputs = " ".join(shlex.quote(relocate(["--results-dir", o], WORKSPACE)[1]) for j in jobs for o in j.outputs)
    wait = f"for d in {outputs}; do until [ -d \"$d\" ]; do echo \"waiting for $d\"; sleep 30; done; done"
    mounts = _mounts(top, caches=False)
    aggregate = _job(f"{name}-aggregate", "aggregate", {
        # Kubernetes orders no Jobs: this one waits until the score Job's outputs are all there
        "initContainers": [{"name": "wait-for-scores", "image": _image(v, "aggregate"), "command": ["/bin/sh", "-c", wait],
                            "securityContext": CONTAINER_SECURITY, "volumeMounts": mounts}],
        "containers": [{"name": "aggregate", "image": _image(v, "aggregate"), "workingDir": WORKSPACE,
                        "args": ["aggregate", "--results-dir", results, "--baseline", v.baseline],
                        "securityContext": CONTAINER_SECURITY, "volumeMounts": mounts}],
        "volumes": _volumes(pvc, shm=False)}, {"backoffLimit": 2})
    doc = {"apiVersion": "v1", "kind": "List", "metadata": {
        "annotations": {"qscore/rendered-by": "make k8s (python -m jobs plan --format k8s)",
                        "qscore/jobs": ", ".join(j.id for j in quant + jobs),
                        "qscore/needs": f"PVC {pvc} holding models/, data/ and {top}/ at its root; "
                                        f"optional Secret {secret} (key token)"}},
           "items": items + [score, aggregate]}
    return json.dumps(doc, indent=2) + "\n"


# -- Slurm ------------------------------------------------------------------------------------------------
def slurm(jobs: list, v) -> str:
    """An ``sbatch`` script: the array of the plan's jobs (a sweep's quantize jobs first). The aggregate step
    is a job of its own, with no array and no GPU: ``aggregate_command``; ``submit`` says how to submit."""
    gpus = _gpus(jobs)
    runner = v.get("SLURM_PYTHON") or ".venv-vllm/bin/python"
    prefix = shlex.split(v.get("SLURM_PREFIX")) + [runner, "-m", "jobs"]
    # quantize needs llm-compressor, which is not in vLLM's environment: the venv make setup creates
    quantize = shlex.split(v.get("SLURM_QUANTIZE_PREFIX")) + [f"{v.get('VENV') or '.venv'}/bin/python", "-m", "jobs"]
    extra = "\n".join(f"#SBATCH {line.strip()}" for line in v.get("SLURM_SBATCH").split(";") if line.strip())
    return f"""#!/bin/bash
# qscore on Slurm, rendered by `make slurm` from the job plan (`make plan`): {len(jobs)} jobs,
# array element i runs job i ({', '.join(j.id for j in jobs)}).
# Submit from the repository (on a filesystem the nodes share), then the report after the array
# (one task, no GPU):
#   {submit(jobs, v, "qscore.sbatch")}
# Containers: set SLURM_PREFIX to the site's launcher, e.g. "srun --container-image=qscore-vllm.sqsh"
# (pyxis) or "apptainer exec --nv qscore-vllm.sif"; by default the local venv {runner} runs the jobs
# (a sweep's quantize jobs: SLURM_QUANTIZE_PREFIX and VENV's python).
#SBATCH --job-name=qscore-score
#SBATCH --array=0-{len(jobs) - 1}
#SBATCH --gpus-per-task={gpus}
#SBATCH --ntasks=1
#SBATCH --output=slurm-%x-%A_%a.out
{extra}
set -euo pipefail
export CACHE_DIR="${{CACHE_DIR:-$HOME/.cache/qscore}}"
{dispatch(jobs, "SLURM_ARRAY_TASK_ID", prefix, None, {"quantize": quantize})}
"""


def submit(jobs: list, v, script: str) -> str:
    """The shell line that submits the array, a sweep's quantize elements first, and the report after it."""
    q = sum(j.stage == "quantize" for j in jobs)
    s = shlex.quote(script)
    if not q:
        return f"jid=$(sbatch --parsable {s}) && {aggregate_submit(v, '$jid')}"
    return (f"qjid=$(sbatch --parsable --array=0-{q - 1} {s}) && jid=$(sbatch --parsable --array={q}-{len(jobs) - 1} "
            f"--dependency=afterok:$qjid {s}) && {aggregate_submit(v, '$jid')}")


def aggregate_command(v) -> list[str]:
    python = v.get("SLURM_AGGREGATE_PYTHON") or ".venv/bin/python"
    return [python, "-m", "jobs", "aggregate", "--results-dir", v.results, "--baseline", v.baseline,
            "--report-dir", v.report]


def aggregate_submit(v, jid: str) -> str:
    """The aggregate as its own Slurm job: one task, no array, no GPU, after every array element succeeded."""
    return (f"sbatch --job-name=qscore-aggregate --ntasks=1 --dependency=afterok:{jid} "
            f"--wrap {shlex.quote(shlex.join(aggregate_command(v)))}")
