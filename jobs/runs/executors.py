"""The job plan handed to a cluster's scheduler: a Kubernetes Indexed Job, or a Slurm job array.

Each renders, from the same plan, one array of scoring jobs (element i runs job i of the plan, chosen by
``JOB_COMPLETION_INDEX`` / ``SLURM_ARRAY_TASK_ID``) and an aggregate job after it. Paths are those the
jobs see there: on Kubernetes the models, data and results live on one shared volume (a PVC) mounted at
/workspace; on Slurm the repository is on a shared filesystem and jobs run in it. Standard library only.
"""
from __future__ import annotations

import json
import os
import shlex

from jobs.core.errors import SettingsError

WORKSPACE = "/workspace"


def render(kind: str, jobs: list, env: dict[str, str]) -> str:
    if kind == "k8s":
        return kubernetes(jobs, env)
    if kind == "slurm":
        return slurm(jobs, env)
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
        args = relocate(j.args, root) if root else j.args
        lines.append(f"  {i}) exec {shlex.join([*prefix, *args])} ;;  # {j.id}")
    lines.append(f'  *) echo "no job {index_var}=${{{index_var}}} in this plan of {len(jobs)}" >&2; exit 2 ;;')
    lines.append("esac")
    return "\n".join(lines)


def _image(env: dict, stage: str) -> str:
    registry = env.get("K8S_REGISTRY", "")
    return f"{registry}{env.get('IMAGE_PREFIX') or 'qscore'}-{stage}:{env.get('TAG') or 'latest'}"


def _gpus(jobs: list) -> int:
    return max((j.gpus for j in jobs), default=1)


# -- Kubernetes -------------------------------------------------------------------------------------------
def kubernetes(jobs: list, env: dict[str, str]) -> str:
    name = env.get("K8S_NAME") or "qscore"
    pvc = env.get("K8S_PVC") or "qscore-workspace"
    hf_pvc = env.get("K8S_HF_PVC") or pvc
    secret = env.get("K8S_HF_SECRET") or "hf-token"
    results = f"{WORKSPACE}/{env.get('RESULTS_DIR') or 'results'}"
    volumes = [{"name": "workspace", "persistentVolumeClaim": {"claimName": pvc}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "workspace", "mountPath": WORKSPACE}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if hf_pvc != pvc:
        volumes.append({"name": "hf", "persistentVolumeClaim": {"claimName": hf_pvc}})
        mounts.append({"name": "hf", "mountPath": "/hf"})
        hf_home = "/hf"
    else:
        hf_home = f"{WORKSPACE}/.cache/huggingface"
    env_vars = [{"name": "HF_HOME", "value": hf_home}, {"name": "CACHE_DIR", "value": f"{WORKSPACE}/.cache/qscore"},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token", "optional": True}}}]
    gpus = _gpus(jobs)
    score = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{name}-score", "labels": {"app.kubernetes.io/name": "qscore", "qscore/stage": "score"}},
        "spec": {
            "completionMode": "Indexed", "completions": len(jobs),
            "parallelism": int(env.get("K8S_PARALLELISM") or len(jobs)),
            "backoffLimitPerIndex": 2, "maxFailedIndexes": 0,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "qscore", "qscore/stage": "score"}},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
                    "containers": [{
                        "name": "score", "image": _image(env, "vllm"), "workingDir": WORKSPACE,
                        "command": ["/bin/sh", "-c", dispatch(jobs, "JOB_COMPLETION_INDEX", ["python3", "-m", "jobs"],
                                                              WORKSPACE)],
                        "env": env_vars,
                        "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}},
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    }
    outputs = " ".join(shlex.quote(relocate(["--results-dir", o], WORKSPACE)[1]) for j in jobs for o in j.outputs)
    wait = (f"for d in {outputs}; do until [ -d \"$d\" ]; do echo \"waiting for $d\"; sleep 30; done; done")
    aggregate = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{name}-aggregate", "labels": {"app.kubernetes.io/name": "qscore",
                                                             "qscore/stage": "aggregate"}},
        "spec": {
            "backoffLimit": 2,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "qscore", "qscore/stage": "aggregate"}},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
                    # Kubernetes orders no Jobs: this one waits until the score Job's outputs are all there
                    "initContainers": [{"name": "wait-for-scores", "image": _image(env, "aggregate"),
                                        "command": ["/bin/sh", "-c", wait],
                                        "volumeMounts": [{"name": "workspace", "mountPath": WORKSPACE}]}],
                    "containers": [{
                        "name": "aggregate", "image": _image(env, "aggregate"), "workingDir": WORKSPACE,
                        "args": ["aggregate", "--results-dir", results, "--baseline", env.get("BASELINE") or "bf16"],
                        "volumeMounts": [{"name": "workspace", "mountPath": WORKSPACE}],
                    }],
                    "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": pvc}}],
                },
            },
        },
    }
    header = ("# qscore on Kubernetes, rendered by `make k8s` from the job plan (`make plan`).\n"
              f"# {len(jobs)} scoring jobs: index i of the Indexed Job runs job i ({', '.join(j.id for j in jobs)}).\n"
              f"# Needs: PVC {pvc} holding models/, data/ and results/ at its root; optional Secret {secret} (key token).\n")
    return header + "---\n" + to_yaml(score) + "---\n" + to_yaml(aggregate)


# -- Slurm ------------------------------------------------------------------------------------------------
def slurm(jobs: list, env: dict[str, str]) -> str:
    """An ``sbatch`` script: the array of scoring jobs; run with ``--aggregate`` it is the aggregate step."""
    gpus = _gpus(jobs)
    results = env.get("RESULTS_DIR") or "results"
    runner = env.get("SLURM_PYTHON") or ".venv-vllm/bin/python"
    agg_python = env.get("SLURM_AGGREGATE_PYTHON") or ".venv/bin/python"
    prefix = shlex.split(env.get("SLURM_PREFIX") or "") + [runner, "-m", "jobs"]
    extra = "\n".join(f"#SBATCH {line}" for line in (env.get("SLURM_SBATCH") or "").split(";") if line.strip())
    return f"""#!/bin/bash
# qscore on Slurm, rendered by `make slurm` from the job plan (`make plan`): {len(jobs)} scoring jobs,
# array element i runs job i ({', '.join(j.id for j in jobs)}).
# Submit from the repository (on a filesystem the nodes share), the report after the array:
#   jid=$(sbatch --parsable THIS_FILE) && sbatch --dependency=afterok:$jid THIS_FILE --aggregate
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
if [ "${{1:-}}" = "--aggregate" ]; then
  exec {agg_python} -m jobs aggregate --results-dir {shlex.quote(results)} --baseline {shlex.quote(env.get("BASELINE") or "bf16")}
fi
{dispatch(jobs, "SLURM_ARRAY_TASK_ID", prefix, None)}
"""


# -- a small YAML writer: the host has no PyYAML, and JSON strings are valid YAML scalars ---------------------
def to_yaml(value, indent: int = 0) -> str:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        out = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{k}:\n{to_yaml(v, indent + 2)}")
            else:
                out.append(f"{pad}{k}: {_scalar(v)}\n")
        return "".join(out)
    if isinstance(value, list):
        out = []
        for v in value:
            if isinstance(v, (dict, list)) and v:
                body = to_yaml(v, indent + 2)
                out.append(f"{pad}- {body[indent + 2:]}")
            else:
                out.append(f"{pad}- {_scalar(v)}\n")
        return "".join(out)
    return pad + _scalar(value) + "\n"


def _scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (dict, list)):
        return "{}" if isinstance(v, dict) else "[]"
    return json.dumps(v)
