"""The scoring jobs of the plan handed to a cluster's scheduler: a Kubernetes Indexed Job, or a Slurm job array.

Each renders one array of scoring jobs (element i runs job i, chosen by ``JOB_COMPLETION_INDEX`` /
``SLURM_ARRAY_TASK_ID``) and an aggregate job after it. Paths are those the jobs see there: on
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
_PATH_FLAGS = ("--model", "--tokenizer", "--results-dir")


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


def dispatch(jobs: list, index_var: str, prefix: list[str], root: str | None) -> str:
    """A POSIX shell ``case`` running job ``$index_var`` of the plan (pure)."""
    lines = [f'case "${{{index_var}}}" in']
    for i, j in enumerate(jobs):
        args = relocate(["score", *j.args], root) if root else ["score", *j.args]
        lines.append(f"  {i}) exec {shlex.join([*prefix, *args])} ;;  # {j.id}")
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
    gpus = _gpus(jobs)
    score = _job(f"{name}-score", "score", {
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
                        "qscore/jobs": ", ".join(j.id for j in jobs),
                        "qscore/needs": f"PVC {pvc} holding models/, data/ and {top}/ at its root; "
                                        f"optional Secret {secret} (key token)"}},
           "items": [score, aggregate]}
    return json.dumps(doc, indent=2) + "\n"


# -- Slurm ------------------------------------------------------------------------------------------------
def slurm(jobs: list, v) -> str:
    """An ``sbatch`` script: the array of scoring jobs. The aggregate step is a job of its own, with no
    array and no GPU: ``aggregate_command``."""
    gpus = _gpus(jobs)
    runner = v.get("SLURM_PYTHON") or ".venv-vllm/bin/python"
    prefix = shlex.split(v.get("SLURM_PREFIX")) + [runner, "-m", "jobs"]
    extra = "\n".join(f"#SBATCH {line.strip()}" for line in v.get("SLURM_SBATCH").split(";") if line.strip())
    return f"""#!/bin/bash
# qscore on Slurm, rendered by `make slurm` from the job plan (`make plan`): {len(jobs)} scoring jobs,
# array element i runs job i ({', '.join(j.id for j in jobs)}).
# Submit from the repository (on a filesystem the nodes share), then the report after the array
# (one task, no GPU):
#   {aggregate_submit(v, "$jid")}
# Containers: set SLURM_PREFIX to the site's launcher, e.g. "srun --container-image=qscore-vllm.sqsh"
# (pyxis) or "apptainer exec --nv qscore-vllm.sif"; by default the local venv {runner} runs the jobs.
#SBATCH --job-name=qscore-score
#SBATCH --array=0-{len(jobs) - 1}
#SBATCH --gpus-per-task={gpus}
#SBATCH --ntasks=1
#SBATCH --output=slurm-%x-%A_%a.out
{extra}
set -euo pipefail
export CACHE_DIR="${{CACHE_DIR:-$HOME/.cache/qscore}}"
{dispatch(jobs, "SLURM_ARRAY_TASK_ID", prefix, None)}
"""


def aggregate_command(v) -> list[str]:
    python = v.get("SLURM_AGGREGATE_PYTHON") or ".venv/bin/python"
    return [python, "-m", "jobs", "aggregate", "--results-dir", v.results, "--baseline", v.baseline,
            "--report-dir", v.report]


def aggregate_submit(v, jid: str) -> str:
    """The aggregate as its own Slurm job: one task, no array, no GPU, after every array element succeeded."""
    return (f"sbatch --job-name=qscore-aggregate --ntasks=1 --dependency=afterok:{jid} "
            f"--wrap {shlex.quote(shlex.join(aggregate_command(v)))}")
