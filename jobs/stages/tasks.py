"""Tasks stage: task accuracy beside perplexity, from lm-evaluation-harness, with per-sample Parquet.

For one model, each lm-eval task of ``tasks`` (default gsm8k 5-shot and arc_challenge; the bundled
offline tasks are ``qscore_local``) is evaluated with lm-eval's own prompts, filters and metrics, on
vLLM (lm-eval's ``vllm`` model) or transformers (its ``hf`` model around the model qscore's scoring
loads). Every document's record goes to ``results/tasks/model=<label>/task=<task>/`` (``taskarchive``)
with the run's provenance.

Resume is per task: a task already evaluated with the same inputs (checkpoint and tokenizer hashes,
task config and documents, lm-eval version, shots, limit, chat template, BOS, backend, dtype, context)
is skipped; with other inputs it is refused unless ``overwrite``. A task's directory appears only
when complete, so an interrupted run keeps the tasks it finished and redoes the one it was in. One run at
a time writes a task's directory: a second stops with an error naming the first (``jobs.core.locks``).

``quality_gate`` (validate's ``--baseline-tasks``) reruns a baseline's tasks, with the baseline's
settings, on a checkpoint and fails when its recovery is below the minimum.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.core import atomic, hub, locks, progress, provenance
from jobs.core.phases import Phases
from jobs import engines
from jobs.archive import tasks as task_archive
from jobs.archive.fingerprint import fingerprint
from jobs.engines import lmeval
from jobs.stats import tasks as task_stats
from jobs.checkpoints.checkpoint import inspect, tokenizer_hash
from jobs.core.errors import SettingsError, ValidationError
from jobs.core.settings import EngineOptions

log = logging.getLogger("qscore.tasks")

DEFAULT_TASKS = ("gsm8k", "arc_challenge")
LOCAL_TASKS = ("qscore_local",)


@dataclass(frozen=True)
class TasksSettings:
    """Everything one run of the tasks stage depends on (the CLI builds it from options / env vars)."""

    model: str
    label: str
    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: int | None = None  # first N documents of each task (a quick look; not comparable to full runs)
    num_fewshot: int | None = None  # None: each task's own (gsm8k 5); tasks pinned to 0 stay at 0
    chat_template: str = "none"  # none | default | <name of one of the tokenizer's templates>
    fewshot_as_multiturn: bool = False  # with a chat template: few-shot examples as earlier turns
    add_bos_token: bool = True  # as llm-compressor's CI and vLLM's docs advise (a no-op for Qwen: no BOS)
    backend: str = "auto"
    batch_size: int = 16  # transformers; vLLM schedules every request at once
    include_path: str | None = None  # directory of YAML tasks; None: the bundled data/tasks
    results_dir: str = "results"
    overwrite: bool = False
    engine: EngineOptions = field(default_factory=EngineOptions)  # dtype, context, NVFP4 mode, vLLM's settings
    engine_kwargs: dict = field(default_factory=dict)  # vLLM: the user's extra engine arguments


@dataclass
class TaskRun:
    name: str
    task: object
    info: dict
    final: Path
    fingerprint: str
    skip: bool = False


def check(settings: TasksSettings) -> None:
    if settings.limit is not None and settings.limit < 1:
        raise SettingsError("--limit must be at least 1 (or unset for every document)")
    if settings.num_fewshot is not None and settings.num_fewshot < 0:
        raise SettingsError("--num-fewshot must be 0 or more")
    if settings.batch_size < 1:
        raise SettingsError("--batch-size must be at least 1")
    if settings.engine.max_model_len < 16:
        raise SettingsError("--max-model-len must be at least 16")


def include_path(settings: TasksSettings):
    return settings.include_path if settings.include_path else lmeval.default_include_path()


def _common(settings: TasksSettings, ckpt, tok_hash: str, backend: str, arith) -> dict:
    return {"schema": task_archive.SCHEMA_VERSION, "model_hash": ckpt.content_hash, "tokenizer_hash": tok_hash,
            "lm_eval": provenance.versions("lm_eval")["lm_eval"], "chat_template": settings.chat_template,
            "fewshot_as_multiturn": settings.fewshot_as_multiturn, "add_bos_token": settings.add_bos_token,
            "backend": backend, "dtype": settings.engine.dtype, "max_model_len": settings.engine.max_model_len,
            "nvfp4_compute": settings.engine.nvfp4_compute.value, **arith.fingerprint_fields(),
            "batch_size": settings.batch_size if backend == "transformers" else "auto", "seeds": lmeval.SEEDS}


def prepare_task(name, task, settings, common) -> TaskRun:
    info = lmeval.describe_task(task, num_fewshot=settings.num_fewshot, limit=settings.limit)
    fp = fingerprint({**common, "task": name, "task_version": info["version"], "config_hash": info["config_hash"],
                      "docs_digest": info["docs_digest"], "num_fewshot": info["num_fewshot"],
                      "limit": settings.limit})
    final = task_archive.task_dir(settings.results_dir, settings.label, name)
    atomic.remove_stale_temporaries(final)
    taskrun = TaskRun(name, task, info, final, fp)
    if final.exists():
        old = task_archive.read_fingerprint(final)
        if old == fp and not settings.overwrite:
            taskrun.skip = True
        elif not settings.overwrite:
            raise SettingsError(
                f"{final} already holds a run with other settings (fingerprint {old} != {fp}); "
                "pass --overwrite to replace it, or use another --label")
    return taskrun


def run(*, settings: TasksSettings) -> list[Path]:
    phases = Phases()
    check(settings)
    names = lmeval.parse_tasks(settings.tasks)
    progress.quiet_third_party()
    with contextlib.ExitStack() as held:
        try:
            return _run(settings, names, held, phases)
        finally:
            phases.log(log, settings.label)


def _run(settings: TasksSettings, names, held: contextlib.ExitStack, phases: Phases) -> list[Path]:
    t_read = time.perf_counter()  # the checkpoint's config, lm-eval's task configs and their documents
    model_path = hub.resolve(settings.model, "model")
    ckpt = inspect(model_path)
    tok_hash = tokenizer_hash(model_path)
    backend = engines.pick(settings.backend)
    tm, tasks = lmeval.load_tasks(names, include_path(settings))
    t_imports = time.perf_counter()  # vLLM's platform module, imported to read the GPU: start-up, not reading
    arith = engines.arithmetic_for(backend, ckpt.quant, settings.engine)
    t_imports = time.perf_counter() - t_imports
    phases.add("startup", t_imports)
    common = _common(settings, ckpt, tok_hash, backend, arith)
    for name in tasks:  # before anything already there is looked at
        held.enter_context(locks.hold(task_archive.task_dir(settings.results_dir, settings.label, name), what="task"))
    taskruns = [prepare_task(name, task, settings, common) for name, task in tasks.items()]
    for p in taskruns:
        if p.skip:
            log.info("%s: already evaluated with the same inputs, skipped (%s)", p.final, p.fingerprint)
    todo = [p for p in taskruns if not p.skip]
    phases.add("read", time.perf_counter() - t_read - t_imports)
    if not todo:
        return [p.final for p in taskruns]
    with phases("engine_start"):
        lm, engine = lmeval.load_lm(backend, ckpt, settings.engine, arith, batch_size=settings.batch_size,
                                    add_bos_token=settings.add_bos_token, engine_kwargs=settings.engine_kwargs)
    try:
        with phases("engine_start"):
            runtime = {**engine.describe(), **provenance.versions("vllm", "transformers", "torch",
                                                                  "compressed-tensors", "lm_eval")}
        for i, p in enumerate(todo):
            log.info("%s: task %d/%d", p.name, i + 1, len(todo))  # a batch log's progress: lm-eval's bars are off
            try:
                with phases("score"):
                    records, entry = lmeval.evaluate(lm, tm, p.task, num_fewshot=settings.num_fewshot,
                                                     limit=settings.limit, chat_template=settings.chat_template,
                                                     fewshot_as_multiturn=settings.fewshot_as_multiturn)
            except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM through the CLI's handler
                log.warning("interrupted — %d of %d tasks kept, run the same command again to resume",
                            len(taskruns) - len(todo) + i, len(taskruns))
                raise
            with phases("write"):
                write(p, records, entry, settings, ckpt, model_path, tok_hash, runtime, phases.snapshot())
    finally:
        with phases("shutdown"):
            engine.close()
    return [p.final for p in taskruns]


def write(taskrun: TaskRun, records, entry, settings: TasksSettings, ckpt, model_path, tok_hash, runtime,
          phases: dict) -> None:
    metrics = lmeval.per_sample_metrics(records, taskrun.info["metrics"])
    names = [m["name"] for m in metrics]
    table = task_archive.rows_to_table(lmeval.sample_rows(taskrun.task, records, names), names)
    if entry.get("n-shot") is not None and entry["n-shot"] != taskrun.info["num_fewshot"]:
        log.warning("%s: lm-eval used %s shots, planned %s", taskrun.name, entry["n-shot"], taskrun.info["num_fewshot"])
    q = ckpt.quant
    meta = {
        "schema_version": task_archive.SCHEMA_VERSION,
        "fingerprint": taskrun.fingerprint,
        "model": {"label": settings.label, "ref": settings.model, "path": str(model_path),
                  "content_hash": ckpt.content_hash, "architecture": ckpt.architecture},
        "quantization": {"method": q.method, "format": q.format, "scheme": q.scheme, "group_size": q.group_size,
                         "ignore": q.ignore},
        "tokenizer": {"path": str(model_path), "hash": tok_hash},
        "task": {**{k: v for k, v in taskrun.info.items() if k != "metrics"}, "num_fewshot_used": entry.get("n-shot")},
        "metrics": metrics,
        "lm_eval": {"version": runtime.get("lm_eval"), "chat_template": settings.chat_template,
                    "chat_template_sha256": entry.get("chat_template_sha256"),
                    "fewshot_as_multiturn": settings.fewshot_as_multiturn, "add_bos_token": settings.add_bos_token,
                    "batch_size": settings.batch_size if runtime.get("backend") == "transformers" else "auto",
                    "max_model_len": settings.engine.max_model_len, "seeds": lmeval.SEEDS,
                    "bootstrap_iters": lmeval.BOOTSTRAP_ITERS},
        "results": {"lm_eval": entry.get("results"), "n_samples": entry.get("n-samples"),
                    "higher_is_better": entry.get("higher_is_better")},
        "runtime": runtime,
        "phases": phases,
        "counts": {"docs": len({r.as_py() for r in table.column("doc_id")}), "rows_total": table.num_rows},
        "command": provenance.command_line(),
        "created": provenance.now(),
    }
    task_archive.write_task(taskrun.final, table, meta)
    acc = ", ".join(f"{k}={v:.4f}" for k, v in (entry.get("results") or {}).items()
                    if isinstance(v, float) and "_stderr" not in k)
    log.info("wrote %s (%d documents; %s)", taskrun.final, meta["counts"]["docs"], acc)


# -- validate's quality gate ------------------------------------------------------------------------------
def _baseline_dirs(baseline: Path) -> list[Path]:
    if baseline.name.startswith("task=") and baseline.is_dir():
        return [baseline]
    dirs = sorted(d for d in baseline.glob("task=*") if d.is_dir())
    if not dirs:
        raise ValidationError(f"quality gate: {baseline} holds no task results (results/tasks/model=<label>)")
    return dirs


def quality_gate(*, ckpt, baseline: str, recovery_min: float, backend: str, options: EngineOptions, arithmetic,
                 include: str | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Evaluate the checkpoint on the tasks of a baseline's results, with the baseline's settings (shots, limit,
    chat template, BOS, context), computing the ``arithmetic`` validate resolved, and fail unless every
    measure's recovery is at least ``recovery_min``."""
    from jobs.report import tasks as task_report

    base = {}
    for d in _baseline_dirs(Path(baseline)):
        table, meta = task_archive.read_task(d)
        base[meta["task"]["name"]] = (table, meta)
    first = next(iter(base.values()))[1]
    lm_settings = first["lm_eval"]
    backend = engines.pick(backend)
    if include is None:  # where the baseline's YAML files were read, if they exist here (/data/tasks in a container)
        sources = [Path(m["task"]["config_source"]).parent for _, m in base.values() if m["task"].get("config_source")]
        include = list(dict.fromkeys(str(d) for d in sources if d.is_dir())) or lmeval.default_include_path()
    tm, tasks = lmeval.load_tasks(list(base), include)
    for name, (_, meta) in base.items():
        if lmeval.config_hash(tasks[name]) != meta["task"]["config_hash"]:
            raise ValidationError(f"quality gate: task {name}'s definition differs from the one the baseline "
                                  f"{baseline} was evaluated with (config hash)")
    batch_size = lm_settings.get("batch_size")
    options = options.replace(max_model_len=lm_settings.get("max_model_len") or options.max_model_len)
    lm, engine = lmeval.load_lm(backend, ckpt, options, arithmetic,
                                batch_size=batch_size if isinstance(batch_size, int) else 16,
                                add_bos_token=lm_settings["add_bos_token"])
    result = {"recovery_min": recovery_min, "baseline": str(baseline), "measures": []}
    failures = []
    try:
        for name, (btable, bmeta) in base.items():
            t = bmeta["task"]
            records, _ = lmeval.evaluate(lm, tm, tasks[name], num_fewshot=t["num_fewshot"], limit=t["limit"],
                                           chat_template=bmeta["lm_eval"]["chat_template"],
                                           fewshot_as_multiturn=bmeta["lm_eval"]["fewshot_as_multiturn"])
            metrics = lmeval.per_sample_metrics(records, bmeta["metrics"])
            names = [m["name"] for m in metrics]
            mtable = task_archive.rows_to_table(lmeval.sample_rows(tasks[name], records, names), names)
            bm = task_report.measures(btable, bmeta)
            mm = task_report.measures(mtable, {**bmeta, "metrics": metrics})
            for key in bm:
                if key not in mm:
                    continue
                c = task_stats.compare(bm[key], mm[key], recovery_min, n_boot, seed, what=f"{name}: ")
                entry = {"task": name, "metric": key[0], "filter": key[1], **c}
                result["measures"].append(entry)
                if c["verdict"] in ("fail", "inconclusive"):  # a pass needs the interval's lower end to clear it
                    failures.append(entry)
    finally:
        engine.close()
    if failures:
        f = failures[0]
        rec = f["recovery"]
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ValidationError(
            f"quality gate: {f['task']} {f['metric']} ({f['filter']}) recovery {rec['value']:.3f} "
            f"{'<' if f['verdict'] == 'fail' else 'with an interval that does not clear'} {recovery_min} "
            f"(model {f['accuracy_paired']:.4f} vs baseline {f['baseline_accuracy_paired']:.4f} on {rec['n']} "
            f"documents of {baseline}){more}")
    return result
