"""The job plan: every job of a run, from the variables a user sets (the Makefile's, `.env`, the environment).

    python -m jobs plan                        # JSON lines: one job each, with its command for every runner
    python -m jobs plan --format make          # the makefile fragment the Makefile includes (its path)
    python -m jobs plan --format k8s | slurm   # the scoring jobs for a cluster (jobs.runs.executors)

Jobs: ``quantize`` (MODEL_ID -> QUANT_OUTPUT), ``validate`` (QUANT_OUTPUT), one ``score.<label>`` per model
of MODELS (or per model and shard with SHARDS=N; WEIGHT_ONLY labels again as ``<label>-w4a16``), one
``tasks.<label>`` per model, ``report`` (aggregate against BASELINE), and the ones a command asks for:
``single.<LABEL>`` (`make score MODEL=… LABEL=…`), ``noise.<NOISE_LABEL>`` (`make noise-floor`),
``compare.<BASE>`` (`make compare BASE=… LABEL=…`) and ``serve``. Each job has its stage arguments, the
complete command for each runner (local: the venv; docker: the image), the files it reads (inputs),
writes (outputs) and the stamp make keeps for it.

Every variable is checked here, before anything is rendered: a bad one is one line and exit status 1.
Defaults of stage options live in the stage's click option only: an empty variable passes no option.
The defaults here are the pipeline's own (what to quantize and compare), which no stage option has.
Standard library only (and qscore's evalsets parsing): the Makefile runs it with the host's python3
before any virtualenv or image exists.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from jobs.checkpoints import recipes
from jobs.core.errors import QscoreError, SettingsError
from jobs.core.settings import Nvfp4Compute, QuantizeSettings
from jobs.texts.evalsets import parse_specs

WEIGHT_ONLY_SUFFIX = "-w4a16"
IMAGE_UID = "10001:10001"  # the images' USER: who a container runs as when the caller is root
# The pipeline's own defaults (no stage option has them): what `make quantize eval report` compares.
DEFAULT_MODEL_ID = "Qwen/Qwen3-14B"
DEFAULT_NVIDIA_MODEL = "nvidia/Qwen3-14B-NVFP4"
DEFAULT_SCHEME = next(f.default for f in fields(QuantizeSettings) if f.name == "scheme")
DEFAULT_RESULTS_DIR = "results"
BACKENDS = ("auto", "transformers", "vllm")
RUNNERS = ("local", "docker")
# Labels and set names become directory names (model=<label>) and make targets: no path separators,
# no shell or make metacharacters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")
# A path that becomes a make target or prerequisite: make cannot quote spaces, ':' or '=' in one.
_MAKE_PATH = re.compile(r"[A-Za-z0-9._/+~@,-]+")


@dataclass(frozen=True)
class Job:
    id: str
    stage: str  # what `python -m jobs <stage>` runs (serve: `vllm serve`)
    group: str  # the make target that runs it: quantize, validate, eval, tasks, report, score, noise, compare
    args: list[str]  # the stage's arguments, paths as on this host
    commands: dict[str, str]  # runner -> the complete shell command line
    inputs: list[str] = field(default_factory=list)  # files it reads that make knows (prerequisites)
    outputs: list[str] = field(default_factory=list)  # directories or files it writes
    stamp: str | None = None  # the file make keeps once it succeeded (None: always runs)
    needs: list[str] = field(default_factory=list)  # ids of jobs whose outputs it reads
    gpus: int = 0  # GPUs it takes (0: CPU only)
    overwritable: bool = True  # takes --overwrite when redone because an input changed

    @property
    def command(self) -> str:
        return shlex.join(["python", "-m", "jobs", self.stage, *self.args])


@dataclass(frozen=True)
class Variables:
    """The user's variables, checked and with the pipeline's defaults filled in."""

    env: dict  # every variable as given (empty = unset)
    runner: str
    results: str
    report: str
    scheme: str
    quant_output: str
    models: list[tuple[str, str]]
    baseline: str
    tokenizer: str
    datasets: list[str]  # DATASETS words: NAME, NAME=PATH or PATH
    set_names: list[str]
    weight_only: list[str]
    shards: int
    tp: int
    sweep: list  # recipes.SweepEntry: the checkpoints of SWEEP (empty: no sweep)

    def get(self, name: str) -> str:
        return (self.env.get(name) or "").strip()


# -- checking -----------------------------------------------------------------------------------------------
def _int(env: dict, name: str, low: int) -> None:
    value = (env.get(name) or "").strip()
    if value and (not re.fullmatch(r"-?\d+", value) or int(value) < low):
        raise SettingsError(f"{name} must be a whole number >= {low}, not {value!r}")


def _fraction(env: dict, name: str) -> None:
    value = (env.get(name) or "").strip()
    if not value:
        return
    try:
        ok = 0 < float(value) <= 1
    except ValueError:
        ok = False
    if not ok:
        raise SettingsError(f"{name} must be a number in (0, 1], not {value!r}")


def _choice(env: dict, name: str, choices) -> None:
    value = (env.get(name) or "").strip()
    if value and value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def check_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value) or ".." in value:
        raise SettingsError(f"{kind} {value!r} is not a plain name (letters, digits and . _ + ~ -, no '/' or '..')")
    return value


def check_make_path(name: str, value: str) -> str:
    if not _MAKE_PATH.fullmatch(value):
        raise SettingsError(f"{name} {value!r} has a character make cannot use in a path (space, quote, ':', "
                            "'=', '$' ...): choose a plain path")
    return value


def parse_models(text: str) -> list[tuple[str, str]]:
    """``label=path`` words (pure)."""
    out = []
    for word in text.split():
        label, sep, path = word.partition("=")
        if not sep or not label or not path:
            raise SettingsError(f"MODELS entry {word!r} is not label=path")
        out.append((check_name("label", label), path))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise SettingsError(f"MODELS labels repeat: {labels}")
    return out


def resolve(env: dict[str, str]) -> Variables:
    """Check every variable and fill in the pipeline's defaults (pure but for the environment given)."""
    env = {k: v for k, v in env.items() if isinstance(v, str)}
    g = lambda name: (env.get(name) or "").strip()  # noqa: E731
    for name in ("N_WIKITEXT", "N_ULTRACHAT", "NUM_FEWSHOT"):
        _int(env, name, 0)
    for name in ("MAX_MODEL_LEN", "TOPK", "NUM_CALIBRATION_SAMPLES", "MAX_SEQUENCE_LENGTH", "CALIBRATION_BATCH_SIZE",
                 "SHARDS", "TENSOR_PARALLEL_SIZE", "PORT", "LIMIT"):
        _int(env, name, 1)
    for name in ("GPU_MEMORY_UTILIZATION", "RECOVERY_MIN"):
        _fraction(env, name)
    for name in ("BACKEND", "NOISE_BACKEND"):
        _choice(env, name, BACKENDS)
    _choice(env, "NVFP4_COMPUTE", tuple(m.value for m in Nvfp4Compute))
    _choice(env, "RUNNER", RUNNERS)
    for name in ("QUANTIZE_ARGS", "SCORE_ARGS", "TASKS_ARGS", "BENCH_ARGS", "NOISE_ARGS", "DOCKER_ARGS", "SLURM_PREFIX"):
        try:
            shlex.split(env.get(name) or "")
        except ValueError as exc:
            raise SettingsError(f"{name} is not a valid shell word list ({exc}): {env.get(name)!r}") from None
    results = g("RESULTS_DIR") or DEFAULT_RESULTS_DIR
    report = g("REPORT_DIR") or f"{results}/report"
    for name, value in (("RESULTS_DIR", results), ("REPORT_DIR", report), ("VENV", g("VENV") or ".venv"),
                        ("VLLM_VENV", g("VLLM_VENV") or ".venv"), ("HF_HOME", g("HF_HOME") or "x"),
                        ("CACHE_DIR", g("CACHE_DIR") or "x")):
        check_make_path(name, value)
    scheme = g("SCHEME") or DEFAULT_SCHEME
    if not re.fullmatch(r"[A-Za-z0-9_]+", scheme):
        raise SettingsError(f"SCHEME {scheme!r} is not a scheme name")
    model_id = g("MODEL_ID") or DEFAULT_MODEL_ID
    quant_output = check_make_path("QUANT_OUTPUT", g("QUANT_OUTPUT") or f"models/{Path(model_id).name}-{scheme}")
    lc = scheme.lower()
    sweep = recipes.parse_sweep(g("SWEEP"), g("SWEEP_SEEDS"))
    if sweep:  # the base model and every checkpoint of the sweep (MODELS adds others)
        made = [f"{e.label}={e.path or sweep_output(model_id, e.label, quant_output)}" for e in sweep]
        models = parse_models(" ".join([g("MODELS") or f"bf16={model_id}", *made]))
    else:
        models = parse_models(g("MODELS") or f"bf16={model_id} llmc-{lc}={quant_output} "
                                             f"nvidia-{lc}={g('NVIDIA_MODEL') or DEFAULT_NVIDIA_MODEL}")
    for _, path in models:
        _check_input_path("MODELS path", path)
    labels = [label for label, _ in models]
    baseline = check_name("BASELINE", g("BASELINE") or labels[0])
    tokenizer = g("TOKENIZER") or dict(models).get(baseline, "")
    words = g("DATASETS").split() or ["wikitext2", "ultrachat"]
    specs = parse_specs(" ".join(words))  # the score stage's own parsing: names, paths, repeats refused
    for name, path in specs:
        check_name("evaluation set name", name)
        if path:
            _check_input_path("DATASETS path", path)
    weight_only = g("WEIGHT_ONLY").split()
    unknown = sorted(set(weight_only) - set(labels))
    if unknown:
        raise SettingsError(f"WEIGHT_ONLY names labels that are not in MODELS: {unknown}")
    for name in ("LABEL", "NOISE_LABEL", "BASE"):
        if g(name):
            for word in g(name).split() if name == "LABEL" else [g(name)]:
                check_name(name, word)
    for name in ("MODEL", "TOKENIZER", "SERVE_MODEL", "CALIBRATION_DATASET", "MODEL_ID"):
        if g(name):
            _check_input_path(name, g(name))
    return Variables(env=env, runner=g("RUNNER") or "local", results=results, report=report, scheme=scheme,
                     quant_output=quant_output, models=models, baseline=baseline, tokenizer=tokenizer,
                     datasets=words, set_names=[n for n, _ in specs], weight_only=weight_only,
                     shards=int(g("SHARDS") or 1), tp=int(g("TENSOR_PARALLEL_SIZE") or 1), sweep=sweep)


def sweep_output(model_id: str, label: str, quant_output: str) -> str:
    """Where a sweep's recipe is quantized to: beside QUANT_OUTPUT (models/ by default), as
    <name of MODEL_ID>-<label>."""
    return os.path.join(os.path.dirname(quant_output) or ".", f"{Path(model_id).name}-{label}")


def _check_input_path(name: str, value: str) -> None:
    if is_local(value):
        check_make_path(name, value)
    elif not re.fullmatch(r"[A-Za-z0-9._/-]+", value):
        raise SettingsError(f"{name} {value!r} is neither a local path nor a hub id (org/name)")


# -- paths --------------------------------------------------------------------------------------------------
def is_local(path: str) -> bool:
    """A local path (vs a hub id): absolute, ./ ../ models/ data/, or existing."""
    return path.startswith(("/", "./", "../", "models/", "data/")) or os.path.exists(path)


def container_path(path: str) -> str:
    """A path as a container sees it: models/x -> /models/x, data/x -> /data/x, another local path is
    mounted read-only at /mnt/host<absolute path>; a hub id passes through."""
    if not is_local(path):
        return path
    full = os.path.abspath(path)
    rel = os.path.relpath(full, os.getcwd())
    if rel.split(os.sep, 1)[0] in ("models", "data") and not rel.startswith(".."):
        return "/" + rel
    return "/mnt/host" + full


def _model_input(path: str, produced: dict[str, str]) -> list[str]:
    """What make waits for before a job reads a model: the stamp of the job making it, else its
    config.json where it is a local directory."""
    key = os.path.normpath(path)
    if key in produced:
        return [produced[key]]
    config = os.path.join(path, "config.json")
    return [os.path.normpath(config)] if is_local(path) and os.path.exists(config) else []


def _file_input(path: str | None) -> list[str]:
    return [os.path.normpath(path)] if path and is_local(path) and os.path.isfile(path) else []


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


# -- commands -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """How one stage runs: which image and venv, and what it may write."""

    image: str  # quantize | vllm | aggregate
    python: str  # VENV | VLLM: which local venv
    gpu: bool  # asks for GPUs (GPUS)
    slot: bool = False  # waits for its share of a GPU, or whole GPUs (jobs.runs.slots), under make -j
    models_rw: bool = False  # writes under models/ (quantize)
    caches: bool = True  # a model stage: the HF and compile caches, models/ and data/


STAGES = {
    "quantize": Stage("quantize", "VENV", gpu=True, slot=True, models_rw=True),  # every GPU of GPUS, alone
    "validate": Stage("vllm", "VLLM", gpu=True, slot=True),
    "score": Stage("vllm", "VLLM", gpu=True, slot=True),
    "tasks": Stage("vllm", "VLLM", gpu=True, slot=True),
    "bench": Stage("vllm", "VLLM", gpu=True, slot=True),  # a whole GPU: its speed is the GPU's alone
    "aggregate": Stage("aggregate", "VENV", gpu=False, caches=False),
    "serve": Stage("vllm", "VLLM", gpu=True),
}
_PATH_FLAGS = ("--model", "--model-id", "--tokenizer", "--calibration-dataset", "--quant-output")


def to_container(args: list[str], results: str) -> tuple[list[str], list[str]]:
    """Stage arguments with paths as a container sees them (results at /results, a report directory
    outside it at /report), and the read-only mounts of paths outside models/ and data/."""
    out, mounts = [], []
    results_abs = os.path.abspath(results)

    def move(value: str) -> str:
        path = container_path(value)
        if path.startswith("/mnt/host/"):
            mounts.append(f"{os.path.abspath(value)}:{path}:ro")
        return path

    flag = None
    for a in args:
        if flag in _PATH_FLAGS:
            a = move(a)
        elif flag == "--results-dir":
            a = "/results"
        elif flag == "--report-dir":
            rel = os.path.relpath(os.path.abspath(a), results_abs)
            a = "/report" if rel.startswith("..") else f"/results/{rel}"
        elif flag == "--datasets":
            items = []
            for item in a.split(","):
                name, sep, path = item.partition("=")
                items.append(f"{name}={move(path)}" if sep else (move(item) if is_local(item) else item))
            a = ",".join(items)
        elif flag == "--tasks":
            a = ",".join(move(t) if is_local(t) else t for t in a.split(","))
        out.append(a)
        flag = a if a.startswith("--") else None
    return out, sorted(set(mounts))


class Commands:
    """The command lines of stages on this host, for each runner."""

    def __init__(self, v: Variables, uid: int):
        self.v, self.uid = v, uid
        g = v.get
        self.venv = g("VENV") or ".venv"
        self.vllm_venv = g("VLLM_VENV") or ".venv-vllm"
        vllm_python = f"{self.vllm_venv}/bin/python"
        self.python = {"VENV": f"{self.venv}/bin/python",
                       "VLLM": vllm_python if os.path.exists(vllm_python) else f"{self.venv}/bin/python"}
        self.gpus = g("GPUS") if "GPUS" in v.env else "all"
        self.hf_home = g("HF_HOME") or os.path.expanduser("~/.cache/huggingface")
        self.cache_dir = g("CACHE_DIR") or os.path.expanduser("~/.cache/qscore")
        prefix, tag = g("IMAGE_PREFIX") or "qscore", g("TAG") or "latest"
        self.images = {s: g(f"{s.upper()}_IMAGE") or f"{prefix}-{s}:{tag}" for s in ("quantize", "vllm", "aggregate")}
        self.python3 = g("PYTHON3") or "python3"

    def slot(self, stage: str, args: list[str]) -> list[str]:
        if not self.gpus:
            return []
        per_job = "all" if stage == "quantize" else str(self.v.tp)  # llm-compressor spreads over what it sees
        return [self.python3, "-m", "jobs", "slots", "--gpus", self.gpus, "--per-job", per_job,
                *self.share(stage, args), "--"]

    def share(self, stage: str, args: list[str]) -> list[str]:
        """What slots estimates a prompt-scoring job's share of one GPU from (its checkpoint, read when the
        job starts, and the engine's sizes). None, so whole GPUs, for lm-eval's tasks (they generate: their
        KV cache grows with every sequence batched), tensor parallelism, the transformers backend (no vLLM
        budget) and a GPU_MEMORY_UTILIZATION the user set."""
        opts = dict(zip(args, args[1:]))  # a flag's value is the word after it; the last one wins, as in click
        if stage not in ("score", "validate") or self.v.tp > 1 or "--gpu-memory-utilization" in args \
                or opts.get("--backend") == "transformers":
            return []
        out = ["--model", opts["--model"]]  # a hub id's snapshot: slots looks in HF_HOME (make exports it)
        for flag, name in (("--max-model-len", "MAX_MODEL_LEN"),
                           ("--max-num-batched-tokens", "MAX_NUM_BATCHED_TOKENS")):
            if opts.get(flag) or self.v.get(name):
                out += [flag, opts.get(flag) or self.v.get(name)]
        return out + (["--weight-only"] if opts.get("--nvfp4-compute") == "weight-only" else [])

    def local(self, stage: str, args: list[str]) -> str:
        if stage == "serve":
            return shlex.join([f"{self.vllm_venv}/bin/vllm", "serve", *args])
        s = STAGES[stage]
        slot = self.slot(stage, args) if s.slot else []
        return shlex.join([*slot, self.python[s.python], "-m", "jobs", stage, *args])

    def docker(self, stage: str, args: list[str], reads_hub: bool) -> str:
        """``docker run`` of a stage: models, data and the HF cache read-only unless the stage writes them
        (quantize its checkpoint; a hub model or set not cached yet is downloaded into HF_HOME), results
        writable; as the caller's uid, or as the images' own user when the caller is root."""
        s, v = STAGES[stage], self.v
        cwd = os.getcwd()
        raw = args
        args, mounts = to_container(args[1:] if stage == "serve" else args, v.results)
        if stage == "serve":  # its first argument is the model
            model, more = to_container(["--model", raw[0]], v.results)
            args, mounts = [model[1], *args], mounts + more
        results = os.path.abspath(v.results)
        writable = [results] + ([f"{cwd}/models"] if s.models_rw else [])
        if s.caches:
            writable += [self.cache_dir] + ([self.hf_home] if reads_hub else [])
        made = ["models", v.results] + ([self.hf_home, self.cache_dir] if s.caches else [])
        if "/report" in args:  # a report directory outside RESULTS_DIR
            path = os.path.abspath(_after(raw, "--report-dir"))
            mounts.append(f"{path}:/report")
            made.append(path)
            writable.append(path)
        root = self.uid == 0
        user = IMAGE_UID if root else "$(id -u):$(id -g)"
        if v.get("DOCKER_USER"):
            user, root = v.get("DOCKER_USER"), False
        cmd = ["docker", "run", "--rm", "--pull", "never"]
        if s.gpu and self.gpus:
            cmd += ["--gpus", "{gpus}" if s.slot else self.gpus]
        if s.gpu:
            cmd += ["--ipc=host"]
        if os.path.exists(".env"):  # the stage settings of .env (never .env.example: it only documents)
            cmd += ["--env-file", ".env"]
        if s.caches:
            cmd += ["-e", "HF_TOKEN", "-e", "HF_HUB_OFFLINE", "-e", "HF_DATASETS_OFFLINE", "-e", "TRANSFORMERS_OFFLINE"]
        if s.slot and self.gpus and self.share(stage, raw):  # the share slots gives it (a variable it sets)
            cmd += ["-e", "GPU_MEMORY_UTILIZATION", "-e", "KV_CACHE_MEMORY_BYTES"]
        cmd += ["-u", user]
        ro = lambda write: "" if write else ":ro"  # noqa: E731
        if s.caches:
            cmd += ["-e", "HF_HOME=/hf", "-v", f"{self.hf_home}:/hf{ro(reads_hub)}", "-e", "CACHE_DIR=/cache",
                    "-v", f"{self.cache_dir}:/cache", "-v", f"{cwd}/models:/models{ro(s.models_rw)}",
                    "-v", f"{cwd}/data:/data:ro"]
        else:  # aggregate: the baseline's tokenizer decodes the worst tokens' context
            cmd += ["-v", f"{cwd}/models:/models:ro", "-v", f"{self.hf_home}:/hf:ro"]
        cmd += ["-v", f"{results}:/results"]
        for m in mounts:
            cmd += ["-v", m]
        cmd += shlex.split(v.get("DOCKER_ARGS"))
        if stage == "serve":
            port = v.get("PORT") or "8000"
            cmd += ["-p", f"{port}:{port}", "--entrypoint", "vllm", self.images[s.image], "serve", *args]
        else:
            cmd += [self.images[s.image], stage, *args]
            if stage == "tasks":  # the bundled tasks, as the container sees them
                cmd += ["--tasks-include-path", "/data/tasks"]
        line = shlex.join(cmd).replace(f"'{user}'", f'"{user}"')
        if s.slot and self.gpus:
            line = shlex.join(self.slot(stage, raw)) + " " + line
        pre = shlex.join(["mkdir", "-p", *made])
        if root:  # the images' user writes there
            pre += " && " + shlex.join(["chown", "-R", IMAGE_UID, *writable])
        return f"{pre} && {line}"

    def both(self, stage: str, args: list[str], reads_hub: bool) -> dict[str, str]:
        return {"local": self.local(stage, args), "docker": self.docker(stage, args, reads_hub)}


def _after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# -- the jobs -----------------------------------------------------------------------------------------------
def build(env: dict[str, str], uid: int | None = None) -> list[Job]:
    """Every job of ``env``'s run, in the order they may run."""
    v = resolve(env)
    c = Commands(v, os.getuid() if uid is None else uid)
    g = v.get
    stamps = f"{v.results}/.stamps"
    offline = g("HF_HUB_OFFLINE") in ("1", "true", "yes")
    overwrite = ["--overwrite"] if g("OVERWRITE").lower() in ("1", "yes", "true") else []
    jobs: list[Job] = []

    def add(jid: str, stage: str, group: str, args: list[str], hub: bool, *, inputs=(), outputs=(),
            stamp=None, needs=(), overwritable=True):
        if jid in {j.id for j in jobs}:
            raise SettingsError(f"two jobs have the id {jid!r} (from the labels of MODELS, WEIGHT_ONLY's "
                                f"<label>{WEIGHT_ONLY_SUFFIX}, LABEL or NOISE_LABEL): give them different labels")
        gpus = (v.tp if stage in ("score", "tasks", "bench", "serve") else 1) if STAGES[stage].gpu else 0
        jobs.append(Job(jid, stage, group, args, c.both(stage, args, hub and not offline), sorted(set(inputs)),
                        list(outputs), stamp, list(needs), gpus, overwritable))

    def needs(*models: str) -> list[str]:
        return sorted({producer[os.path.normpath(m)] for m in models if m and os.path.normpath(m) in producer})

    def hub(*paths) -> bool:
        return any(p is None or not is_local(p) for p in paths)

    # quantize: its stamp is the qscore.json the stage writes last; never redone while it exists.
    # One job, or with SWEEP one per recipe and seed (quantize.<label>).
    model_id = g("MODEL_ID") or DEFAULT_MODEL_ID
    calib = g("CALIBRATION_DATASET")
    produced: dict[str, str] = {}  # a quantize job's output -> its stamp
    producer: dict[str, str] = {}  # ... -> its job id

    def quantize(jid: str, scheme: str, output: str, extra: list[str]) -> None:
        qargs = ["--model-id", model_id, "--quant-output", output, "--scheme", scheme]
        if calib:
            qargs += ["--calibration-dataset", calib]
        if g("CALIBRATION_SPLIT") and not (calib and is_local(calib)):
            qargs += ["--calibration-split", g("CALIBRATION_SPLIT")]
        for flag, name in (("--num-calibration-samples", "NUM_CALIBRATION_SAMPLES"),
                           ("--max-sequence-length", "MAX_SEQUENCE_LENGTH"),
                           ("--calibration-batch-size", "CALIBRATION_BATCH_SIZE")):
            if g(name) and flag not in extra:
                qargs += [flag, g(name)]
        stamp = os.path.normpath(f"{output}/qscore.json")
        add(jid, "quantize", "quantize", qargs + extra + shlex.split(g("QUANTIZE_ARGS")) + overwrite,
            hub(model_id, calib or None), inputs=_model_input(model_id, {}) + _file_input(calib),
            outputs=[output], stamp=stamp)
        produced[os.path.normpath(output)], producer[os.path.normpath(output)] = stamp, jid

    quantized = []  # (job id suffix, output, scheme): what validate checks
    for e in v.sweep:
        if e.scheme:
            extra = (["--num-calibration-samples", str(e.samples)] if e.samples else []) + \
                (["--calibration-seed", str(e.seed)] if e.seed is not None else []) + (["--spinquant"] if e.spinquant else [])
            output = dict(v.models)[e.label]
            quantize(f"quantize.{e.label}", e.scheme, output, extra)
            quantized.append((f".{e.label}", output, e.scheme))
    if not v.sweep:
        quantize("quantize", v.scheme, v.quant_output, [])
        quantized.append(("", v.quant_output, v.scheme))

    engine = []
    for flag, name in (("--max-model-len", "MAX_MODEL_LEN"), ("--gpu-memory-utilization", "GPU_MEMORY_UTILIZATION")):
        if g(name):
            engine += [flag, g(name)]
    if v.tp > 1:
        engine += ["--tensor-parallel-size", str(v.tp)]
    backend = ["--backend", g("BACKEND")] if g("BACKEND") else []

    for suffix, output, scheme in quantized:
        vargs = ["--model", output, *backend, "--expect-scheme", scheme, *engine]
        add(f"validate{suffix}", "validate", "validate", vargs, False, inputs=[produced[os.path.normpath(output)]],
            needs=[f"quantize{suffix}"], stamp=f"{stamps}/validate{suffix}.{_hash(vargs)}.log", overwritable=False)

    def score(jid, group, label, model, tokenizer, mode, shard, extra, backend_args):
        specs = parse_specs(" ".join(v.datasets))
        args = ["--model", model, "--label", label, "--datasets", ",".join(v.datasets)]
        if tokenizer:
            args += ["--tokenizer", tokenizer]
        # the order of the commands qscore has always recorded in each part's metadata
        args += engine[:2] if g("MAX_MODEL_LEN") else []
        args += backend_args + (["--topk", g("TOPK")] if g("TOPK") else []) + ["--results-dir", v.results]
        for name, var, flag in (("wikitext2", "N_WIKITEXT", "--n-wikitext"), ("ultrachat", "N_ULTRACHAT", "--n-ultrachat")):
            if g(var) and name in v.datasets:
                args += [flag, g(var)]
        args += engine[2:] if g("MAX_MODEL_LEN") else engine
        if mode:
            args += ["--nvfp4-compute", mode]
        if shard:
            args += ["--shard", shard]
        args += extra + overwrite
        suffix = f"/shard={shard.replace('/', '-of-')}" if shard else ""
        inputs = _model_input(model, produced) + (_model_input(tokenizer, produced) if tokenizer else [])
        inputs += [p for _, path in specs for p in _file_input(path)]
        add(jid, "score", group, args, hub(model, tokenizer or model, *(path for _, path in specs)),
            inputs=inputs, outputs=[f"{v.results}/logprobs/model={label}/dataset={n}{suffix}" for n, _ in specs],
            needs=needs(model, tokenizer), stamp=f"{stamps}/{jid}.{_hash(args)}.ok")

    mode = g("NVFP4_COMPUTE")
    mode = "" if mode == Nvfp4Compute.DECLARED.value else mode
    runs = [(label, path, mode) for label, path in v.models]
    runs += [(label + WEIGHT_ONLY_SUFFIX, path, "weight-only") for label, path in v.models if label in v.weight_only]
    for label, path, run_mode in runs:
        for i in range(1, v.shards + 1):
            shard = f"{i}/{v.shards}" if v.shards > 1 else ""
            jid = f"score.{label}" + (f".shard-{i}-of-{v.shards}" if shard else "")
            score(jid, "eval", label, path, v.tokenizer, run_mode, shard, shlex.split(g("SCORE_ARGS")), backend)

    # tasks: lm-eval task accuracy, one job per model of MODELS
    task_words = g("TASKS").split()
    bundled = sorted(str(p) for pat in ("*.yaml", "*.jsonl", "*.py") for p in Path("data/tasks").glob(pat))
    for label, path in v.models:
        targs = ["--model", path, "--label", label] + (["--tasks", ",".join(task_words)] if task_words else [])
        targs += backend + (engine[:2] if g("MAX_MODEL_LEN") else [])
        targs += ["--chat-template", g("CHAT_TEMPLATE")] if g("CHAT_TEMPLATE") else []
        targs += ["--results-dir", v.results]
        for flag, name in (("--limit", "LIMIT"), ("--num-fewshot", "NUM_FEWSHOT")):
            if g(name):
                targs += [flag, g(name)]
        targs += (engine[2:] if g("MAX_MODEL_LEN") else engine) + shlex.split(g("TASKS_ARGS")) + overwrite
        add(f"tasks.{label}", "tasks", "tasks", targs, hub(path) or not task_words or
            any(not is_local(t) and not t.startswith("qscore_") for t in task_words),
            inputs=_model_input(path, produced) + [p for t in task_words for p in _file_input(t)] + bundled,
            outputs=[f"{v.results}/tasks/model={label}"], needs=needs(path),
            stamp=f"{stamps}/tasks.{label}.{_hash(targs)}.ok")

    # bench: what each model costs to serve, alone on its GPU; of a recipe's seeds only the first (the others
    # have its size and arithmetic)
    later_seeds = {e.label for e in v.sweep if not e.first}
    for label, path in v.models:
        if label in later_seeds:
            continue
        bargs = ["--model", path, "--label", label, "--results-dir", v.results]
        bargs += shlex.split(g("BENCH_ARGS")) + overwrite
        add(f"bench.{label}", "bench", "bench", bargs, hub(path), inputs=_model_input(path, produced),
            outputs=[f"{v.results}/bench/model={label}"], needs=needs(path),
            stamp=f"{stamps}/bench.{label}.{_hash(bargs)}.ok")

    def aggregate_args(report_dir: str, baseline: str, models=()) -> list[str]:
        args = ["--results-dir", v.results, "--baseline", baseline, "--report-dir", report_dir]
        if models:
            args += ["--labels", ",".join(models)]
        return args + (["--recovery-min", g("RECOVERY_MIN")] if g("RECOVERY_MIN") else [])

    # every (model, set) and task result already there (from `make score` too): a newer one redoes the report
    done = sorted(str(p) for p in Path(v.results).glob("logprobs/model=*/dataset=*")) \
        + sorted(str(p) for p in Path(v.results).glob("tasks/model=*/task=*")) \
        + sorted(str(p) for p in Path(v.results).glob("bench/model=*/bench.parquet"))
    rargs = aggregate_args(v.report, v.baseline)
    add("report", "aggregate", "report", rargs, False, inputs=done, outputs=[f"{v.report}/summary.json"],
        needs=[j.id for j in jobs if j.group == "eval"], stamp=f"{stamps}/report.{_hash(rargs)}.ok",
        overwritable=False)

    # what single commands ask for
    if g("MODEL") or (g("LABEL") and not g("BASE")):
        if not (g("MODEL") and g("LABEL")):
            raise SettingsError("make score needs both MODEL=<hub id or local path> and LABEL=<name>")
        score(f"single.{g('LABEL')}", "score", g("LABEL"), g("MODEL"), g("TOKENIZER"), mode, "",
              shlex.split(g("SCORE_ARGS")), backend)
    # each model of NOISE_MODELS (default the baseline) scored again through another path, as <label>~noise:
    # the baseline's is the report's noise floor, any other model's is that model's own path noise
    models = dict(v.models)
    for label in g("NOISE_MODELS").split() or [m for m in [v.baseline] if m in models]:
        if label not in models:
            raise SettingsError(f"NOISE_MODELS: {label!r} is not a label of MODELS ({', '.join(models)})")
        noise = (g("NOISE_LABEL") or f"{label}~noise") if label == v.baseline else f"{label}~noise"
        score(f"noise.{noise}", "noise", noise, models[label], v.tokenizer, "", "",
              shlex.split(g("SCORE_ARGS")) + shlex.split(g("NOISE_ARGS")), ["--backend", g("NOISE_BACKEND") or "transformers"])
    if g("BASE"):
        labels = g("LABEL").split()
        cdir = f"{v.results}/compare/{g('BASE')}-vs-{'+'.join(labels) if labels else 'all'}"
        add(f"compare.{g('BASE')}", "aggregate", "compare", aggregate_args(cdir, g("BASE"), [g("BASE"), *labels]
                                                                            if labels else ()),
            False, outputs=[cdir], overwritable=False)
    serve_model = g("SERVE_MODEL") or v.quant_output
    sargs = [serve_model, "--host", "0.0.0.0", "--port", g("PORT") or "8000"]
    sargs += ["--max-model-len", g("MAX_MODEL_LEN")] if g("MAX_MODEL_LEN") else []
    add("serve", "serve", "serve", sargs, hub(serve_model), inputs=_model_input(serve_model, produced),
        needs=needs(serve_model), overwritable=False)
    return jobs


# -- renderings ---------------------------------------------------------------------------------------------
def as_make(jobs: list[Job], v: Variables) -> str:
    """A makefile fragment: per group the stamps its target makes, then one explicit rule per job (stamp:
    inputs; its command for RUNNER). Prerequisites go through variables: a path with '=' (model=<label>)
    written on a rule line would read as a target-specific assignment."""
    runner = v.runner
    groups: dict[str, list[str]] = {}
    for j in jobs:
        if j.stamp:
            groups.setdefault(j.group, []).append(j.stamp)
    lines = ["# Generated by `python -m jobs plan --format make` from this make run's variables: do not edit.",
             f"RUNNER := {runner}", f"QS_RESULTS := {v.results}"]

    lines += [f"QS_{group} := {' '.join(stamps)}" for group, stamps in groups.items()]
    lines.append("")
    # Where the goals score (eval, report, sweep), a model's tasks and bench jobs wait for its scoring: they
    # take whole GPUs, and queued in slots beside the scoring jobs they took the GPU first while the jobs that
    # share it waited (bench/RESULTS.md, seventh session). `make tasks` or `make bench` alone scores nothing.
    def label(j: Job) -> str | None:
        return dict(zip(j.args, j.args[1:])).get("--label")

    scored: dict[str, list[str]] = {}
    for j in jobs:
        if j.group == "eval" and j.stamp:
            scored.setdefault(label(j), []).append(j.stamp)
    venv_python = f"{v.get('VENV') or '.venv'}/bin/python"
    for n, j in enumerate(jobs):
        cmd = j.commands[runner].replace("$", "$$")
        lines.append(f"# {j.id}")
        if j.stamp is None:  # run on every call (serve, compare)
            lines += [f"QS_CMD_{j.group} = {cmd}", ""]
            continue
        prereqs = list(j.inputs)
        if j.group == "report":
            prereqs += groups.get("eval", []) + ["$(if $(filter tasks sweep,$(MAKECMDGOALS)),$(QS_tasks))",
                                                 "$(if $(filter bench sweep,$(MAKECMDGOALS)),$(QS_bench))"]
        if any(not os.path.exists(o) for o in j.outputs):
            prereqs.append("FORCE")  # an output is gone: run (the stage resumes or skips what it has)
        order = ["$(SETUP_STAMP)"] if runner == "local" and venv_python in j.commands["local"] else []
        first = scored.get(label(j), []) if j.group in ("tasks", "bench") else []
        if first:
            lines.append(f"QS_FIRST_{n} := {' '.join(first)}")
            order.append(f"$(if $(filter eval report sweep,$(MAKECMDGOALS)),$(QS_FIRST_{n}))")
        lines += [f"QS_IN_{n} := {' '.join(prereqs)}",
                  f"{j.stamp}: $(QS_IN_{n})" + (f" | {' '.join(order)}" if order else "")]
        if j.stage != "quantize":  # (quantize makes its output directory itself, and refuses one that is there)
            lines.append("\t@mkdir -p $(@D)")
        if j.stage == "validate":  # its stamp is what it printed
            lines.append(f"\t{cmd} | tee $@.tmp && mv $@.tmp $@")
        elif j.stage == "quantize":  # its stamp is the qscore.json the stage writes last
            lines.append(f"\t{cmd}$(STALE)")
        else:
            lines += [f"\t{cmd}{'$(STALE)' if j.overwritable else ''}", "\t@touch $@"]
        lines.append("")
    report = next(j for j in jobs if j.id == "report")
    lines.append(f"QS_CMD_aggregate = {report.commands[runner].replace('$', '$$')}")
    return "\n".join(lines) + "\n"


def write_make(jobs: list[Job], v: Variables) -> str:
    """Write the fragment and return its path. It is named after its content (two make runs with other
    variables never read each other's) and kept outside RESULTS_DIR (results hold results only; it is
    written again on every make run anyway)."""
    import tempfile

    text = as_make(jobs, v)
    path = Path(tempfile.gettempdir()) / f"qscore-plan-{os.getuid()}" / f"jobs-{_hash(text)}.mk"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path)


def describe(v: Variables) -> dict[str, str]:
    """The pipeline's derived values, as `make help` shows them."""
    return {"RUNNER": v.runner, "RESULTS_DIR": v.results, "REPORT_DIR": v.report, "SCHEME": v.scheme,
            "QUANT_OUTPUT": v.quant_output, "MODELS": " ".join(f"{a}={b}" for a, b in v.models),
            "BASELINE": v.baseline, "TOKENIZER": v.tokenizer, "DATASETS": " ".join(v.datasets),
            "MODEL_ID": v.get("MODEL_ID") or DEFAULT_MODEL_ID,
            "NVIDIA_MODEL": v.get("NVIDIA_MODEL") or DEFAULT_NVIDIA_MODEL,
            "SERVE_MODEL": v.get("SERVE_MODEL") or v.quant_output,
            "NOISE_LABEL": v.get("NOISE_LABEL") or f"{v.baseline}~noise"}


def cluster(jobs: list[Job], v: Variables) -> list[Job]:
    """What a cluster runs: the scoring jobs; with a sweep, its quantize, tasks and bench jobs too."""
    groups = ("quantize", "eval", "tasks", "bench") if v.sweep else ("eval",)
    return [j for j in jobs if j.group in groups]


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m jobs plan", description=__doc__.splitlines()[0])
    ap.add_argument("--format", choices=["jsonl", "make", "k8s", "slurm", "slurm-submit", "vars"], default="jsonl",
                    help="jsonl: every job; make: write the makefile fragment, print its path; k8s, slurm: the "
                         "scoring jobs for a cluster; slurm-submit: how to submit them and the report after; "
                         "vars: the resolved variables")
    ap.add_argument("--group", default=None, help="jsonl: only the jobs of this group (eval, tasks, ...)")
    ap.add_argument("--index", type=int, default=None, help="jsonl: only the job of this 0-based index")
    a = ap.parse_args(argv)
    env = dict(os.environ if env is None else env)
    try:
        v = resolve(env)
        jobs = build(env)
        if a.format == "make":
            print(write_make(jobs, v))
        elif a.format == "slurm-submit":
            from jobs.runs import executors

            print(executors.submit(cluster(jobs, v), v, f"{v.results}/cluster/qscore.sbatch"))
        elif a.format == "vars":
            for k, val in describe(v).items():
                print(f"{k}={val}")
        elif a.format in ("k8s", "slurm"):
            from jobs.runs import executors

            print(executors.render(a.format, cluster(jobs, v), v), end="")
        else:
            chosen = [j for j in jobs if a.group in (None, j.group)]
            if a.index is not None and not 0 <= a.index < len(chosen):
                raise SettingsError(f"job index {a.index} out of range: the plan has {len(chosen)} jobs")
            for i, j in enumerate(chosen):
                if a.index in (None, i):
                    print(json.dumps({"index": i, **asdict(j), "command": j.command}))
    except QscoreError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # a reader that stopped early (`| head`): nothing went wrong with the plan
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
    return 0


if __name__ == "__main__":
    sys.exit(main())
