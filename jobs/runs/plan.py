"""The job plan: which scoring jobs a run needs, from the same variables and parsing the stages use.

    python -m jobs plan                       # JSON lines, one scoring job each
    python3 -m jobs.runs.plan --format make        # what the Makefile evaluates (standard library only)

One job per model (an engine start is the costly part: every set of DATASETS goes through one
engine), or per (model, shard) with SHARDS=N for one large model over N GPUs. Each job has a stable id,
its command line, the (model, set) outputs it writes and the stamps Make keeps for them. MODELS
entries are ``label=path``; labels listed in WEIGHT_ONLY are scored a second time as
``<label>-w4a16`` with ``--nvfp4-compute weight-only``, beside the declared (W4A4) run.

Only the standard library (and qscore's own evalsets parsing) is imported, so the Makefile can run
it with the host's python3 before any virtualenv or image exists.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field

from jobs.core.errors import QscoreError, SettingsError
from jobs.texts.evalsets import parse_specs

WEIGHT_ONLY_SUFFIX = "-w4a16"
# Scoring settings a job depends on: the score stage's own variables (see .env.example)
SETTINGS = ("TOKENIZER", "MAX_MODEL_LEN", "BACKEND", "TOPK", "N_WIKITEXT", "N_ULTRACHAT", "GPU_MEMORY_UTILIZATION",
            "NVFP4_COMPUTE", "TENSOR_PARALLEL_SIZE", "SCORE_ARGS")


@dataclass(frozen=True)
class Job:
    id: str
    label: str
    model: str
    datasets: list[str]  # DATASETS words: NAME, NAME=PATH or PATH
    set_names: list[str]
    shard: str | None  # "i/N"
    nvfp4_compute: str
    gpus: int
    args: list[str] = field(default_factory=list)  # `python -m jobs <args>`
    outputs: list[str] = field(default_factory=list)  # dataset (or shard) directories it completes
    stamps: list[str] = field(default_factory=list)  # one per (model, set): Make's targets

    @property
    def command(self) -> str:
        return shlex.join(["python", "-m", "jobs", *self.args])


def parse_models(text: str) -> list[tuple[str, str]]:
    """``label=path`` words (pure)."""
    out = []
    for word in text.split():
        label, sep, path = word.partition("=")
        if not sep or not label or not path:
            raise SettingsError(f"MODELS entry {word!r} is not label=path")
        out.append((label, path))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise SettingsError(f"MODELS labels repeat: {labels}")
    return out


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


def _san(text: str) -> str:
    return text.replace("/", "_").replace(":", "_")


def plan(env: dict[str, str]) -> list[Job]:
    """The scoring jobs of ``env`` (MODELS, DATASETS, WEIGHT_ONLY, SHARDS, RESULTS_DIR and SETTINGS)."""
    models = parse_models(env.get("MODELS", ""))
    if not models:
        raise SettingsError("MODELS is empty: nothing to score")
    words = env.get("DATASETS", "").split()
    specs = parse_specs(" ".join(words))  # the score stage's own parsing: names, paths, repeats refused
    weight_only = env.get("WEIGHT_ONLY", "").split()
    unknown = sorted(set(weight_only) - {label for label, _ in models})
    if unknown:
        raise SettingsError(f"WEIGHT_ONLY names labels that are not in MODELS: {unknown}")
    try:
        shards = int(env.get("SHARDS") or 1)
        tp = int(env.get("TENSOR_PARALLEL_SIZE") or 1)
    except ValueError:
        raise SettingsError("SHARDS and TENSOR_PARALLEL_SIZE must be whole numbers") from None
    if shards < 1:
        raise SettingsError("SHARDS must be at least 1")
    results = env.get("RESULTS_DIR") or "results"
    settings = {k: env.get(k, "") for k in SETTINGS}
    mode = settings["NVFP4_COMPUTE"] or "declared"
    runs = [(label, path, mode) for label, path in models]
    runs += [(label + WEIGHT_ONLY_SUFFIX, path, "weight-only") for label, path in models if label in weight_only]
    jobs = []
    for label, path, job_mode in runs:
        for i in range(1, shards + 1):
            shard = f"{i}/{shards}" if shards > 1 else None
            jid = f"score.{label}" + (f".shard-{i}-of-{shards}" if shard else "")
            args = _score_args(path, label, words, settings, results, job_mode, shard)
            outputs, stamps = [], []
            for word, (name, _) in zip(words, specs):
                d = f"{results}/logprobs/model={label}/dataset={name}" + (f"/shard={i}-of-{shards}" if shard else "")
                outputs.append(d)
                key = _hash(path, label, word, settings, job_mode, shard)
                stamps.append(f"{results}/.stamps/score/{_san(label)}/{_san(name)}"
                              + (f".shard-{i}-of-{shards}" if shard else "") + f".{key}.ok")
            jobs.append(Job(jid, label, path, list(words), [n for n, _ in specs], shard, job_mode, tp, args,
                            outputs, stamps))
    return jobs


def _score_args(model: str, label: str, words: list[str], settings: dict, results: str, mode: str,
                shard: str | None) -> list[str]:
    args = ["score", "--model", model, "--label", label, "--datasets", ",".join(words)]
    if settings["TOKENIZER"]:
        args += ["--tokenizer", settings["TOKENIZER"]]
    for flag, key in (("--max-model-len", "MAX_MODEL_LEN"), ("--backend", "BACKEND"), ("--topk", "TOPK")):
        if settings[key]:
            args += [flag, settings[key]]
    args += ["--results-dir", results]
    names = " ".join(words)
    if settings["N_WIKITEXT"] and "wikitext2" in names.split():
        args += ["--n-wikitext", settings["N_WIKITEXT"]]
    if settings["N_ULTRACHAT"] and "ultrachat" in names.split():
        args += ["--n-ultrachat", settings["N_ULTRACHAT"]]
    if settings["GPU_MEMORY_UTILIZATION"]:
        args += ["--gpu-memory-utilization", settings["GPU_MEMORY_UTILIZATION"]]
    if settings["TENSOR_PARALLEL_SIZE"] and settings["TENSOR_PARALLEL_SIZE"] != "1":
        args += ["--tensor-parallel-size", settings["TENSOR_PARALLEL_SIZE"]]
    if mode != "declared":
        args += ["--nvfp4-compute", mode]
    if shard:
        args += ["--shard", shard]
    return args + shlex.split(settings["SCORE_ARGS"])


def as_make(jobs: list[Job]) -> str:
    """Make assignments (``@@`` separates lines: $(shell) folds newlines into spaces)."""
    lines = [f"QS_JOBS := {' '.join(j.id for j in jobs)}"]
    for j in jobs:
        p = f"QS.{j.id}"
        lines += [f"{p}.label := {j.label}", f"{p}.model := {j.model}", f"{p}.sets := {' '.join(j.datasets)}",
                  f"{p}.shard := {j.shard or ''}", f"{p}.mode := {j.nvfp4_compute}", f"{p}.gpus := {j.gpus}",
                  f"{p}.outputs := {' '.join(j.outputs)}", f"{p}.stamps := {' '.join(j.stamps)}"]
    return "@@".join(lines)


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m jobs plan", description=__doc__.splitlines()[0])
    ap.add_argument("--format", choices=["jsonl", "make", "k8s", "slurm"], default="jsonl")
    ap.add_argument("--index", type=int, default=None, help="print only the job of this 0-based index (jsonl)")
    a = ap.parse_args(argv)
    env = dict(os.environ if env is None else env)
    try:
        jobs = plan(env)
        if a.index is not None and not 0 <= a.index < len(jobs):
            raise SettingsError(f"job index {a.index} out of range: the plan has {len(jobs)} jobs")
        if a.format == "make":
            print(as_make(jobs))
        elif a.format in ("k8s", "slurm"):
            from jobs.runs import executors

            print(executors.render(a.format, jobs, env), end="")
        else:
            for i, j in enumerate(jobs):
                if a.index is None or a.index == i:
                    print(json.dumps({"index": i, **asdict(j), "command": j.command}))
    except QscoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
