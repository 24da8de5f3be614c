"""lm-evaluation-harness, driven for qscore: its tasks, its model classes, its metrics and filters, none of
them reimplemented. Its ``HFLM`` wraps the model the score stage's transformers backend loads (so an NVFP4
checkpoint is evaluated with the same arithmetic as its logprobs); its ``VLLM`` gets the engine options
qscore's vLLM backend uses. One task at a time, its per-sample records turned into archive rows."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable

from jobs.core.errors import OfflineError, SettingsError, first_line
from jobs.core.settings import EngineOptions

log = logging.getLogger("qscore.tasks")

BUNDLED_TASKS = Path(__file__).resolve().parents[2] / "data" / "tasks"  # the repository's (or image's) data/
# lm-eval's defaults (simple_evaluate), fixed and recorded: the few-shot examples drawn for each
# document depend on them.
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
BOOTSTRAP_ITERS = 1000  # lm-eval's own stderr (recorded beside its scores); qscore's intervals are its own


def default_include_path() -> Path | None:
    return BUNDLED_TASKS if BUNDLED_TASKS.is_dir() else None


def parse_tasks(spec: str | Iterable[str]) -> list[str]:
    items = spec.replace(",", " ").split() if isinstance(spec, str) else [s for s in spec if s]
    if not items:
        raise SettingsError("no tasks given (TASKS)")
    return list(dict.fromkeys(items))


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def task_manager(names: list[str], include_path):
    """A TaskManager that knows ``names``. Indexing lm-eval's ~15,000 built-in tasks takes ~20 s, so
    when every name is under ``include_path`` (a directory, or a list of them) only that is indexed."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in (include_path if isinstance(include_path, (list, tuple)) else [include_path]) if p]
    for p in paths:
        if not Path(p).is_dir():
            raise SettingsError(f"task include path {p} is not a directory")
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(n in local.all_tasks or _is_yaml(n) for n in names):
            return local
    return TaskManager(include_path=paths or None)


def load_tasks(names: list[str], include_path) -> tuple[Any, dict[str, Any]]:
    """The TaskManager and {task name: lm-eval Task} for task, group or tag names (or YAML paths).

    Building a task loads its documents: a hub dataset comes from the datasets cache under HF_HOME,
    or is downloaded there."""
    tm = task_manager(names, include_path)
    unknown = [n for n in names if n not in tm.all_tasks and not _is_yaml(n)]
    if unknown:
        where = f" nor under {include_path}" if include_path else ""
        raise SettingsError(f"unknown task {unknown[0]!r}: not an lm-eval task, group or tag{where}")
    try:
        loaded = tm.load(list(names))
    except Exception as exc:
        raise _dataset_error(names, exc) from None
    if not loaded["tasks"]:
        raise SettingsError(f"tasks {names} name no task to evaluate")
    return tm, dict(loaded["tasks"])


def _dataset_error(names, exc: BaseException) -> BaseException:
    from datasets.exceptions import DatasetNotFoundError

    from jobs.core.hub import unreachable

    # offline, a dataset the cache lacks is "not found" to datasets too: both get the same advice
    if unreachable(exc) or isinstance(exc, DatasetNotFoundError):
        return OfflineError(
            f"tasks {' '.join(names)}: a dataset is not in the Hugging Face cache and cannot be downloaded "
            f"({type(exc).__name__}: {first_line(exc)[:200]}): run once online with HF_HOME pointing at the cache "
            "you mount, or use the bundled local tasks (qscore_local)")
    return exc


def _jsonable(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)


def config_hash(task) -> str:
    """Hash of the task's full configuration (prompt templates, filters, metrics, generation settings).

    lm-eval writes functions into it as their source, so it is stable; the path the YAML was read
    from is left out, so the bundled tasks hash the same in the repository and in a container."""
    cfg = task.dump_config()
    meta = dict(cfg.get("metadata") or {})
    meta.pop("config_source", None)
    cfg["metadata"] = meta
    return hashlib.sha256(_jsonable(cfg).encode()).hexdigest()


def effective_fewshot(configured: int | None, requested: int | None) -> int:
    """The shots lm-eval's simple_evaluate will use: the request, except for tasks whose config pins 0."""
    if requested is None:
        return configured or 0
    return 0 if configured == 0 else requested


def describe_task(task, *, num_fewshot: int | None, limit: int | None) -> dict:
    docs = task.eval_docs
    n_total = len(docs)
    n = min(limit, n_total) if limit else n_total
    digest = hashlib.sha256()
    for i in range(n):
        digest.update(_jsonable(docs[i]).encode() + b"\n")
    aggregation = task.aggregation()
    higher = task.higher_is_better()
    metrics = [{"name": m, "aggregation": getattr(aggregation.get(m), "__name__", str(aggregation.get(m))),
                "higher_is_better": bool(higher.get(m, True))} for m in aggregation]
    return {
        "name": task.task_name,
        "version": task.VERSION,
        "output_type": task.OUTPUT_TYPE,
        "config_hash": config_hash(task),
        "config_source": (task.config.metadata or {}).get("config_source"),
        "dataset": task.config.dataset_path,
        "num_fewshot": effective_fewshot(task.config.num_fewshot, num_fewshot),
        "limit": limit,
        "n_docs": n,
        "n_docs_total": n_total,
        "docs_digest": digest.hexdigest(),
        "filters": [f.name for f in getattr(task, "_filters", [])],
        "metrics": metrics,
    }


# -- models ----------------------------------------------------------------------------------------------
def transformers_lm(ckpt, options: EngineOptions, arithmetic, *, batch_size: int, add_bos_token: bool):
    """lm-eval's HFLM around the model qscore's transformers backend loads (returned too: it describes
    the run and frees the model)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from jobs.engines.hf import TransformersBackend

    backend = TransformersBackend(ckpt, options, arithmetic=arithmetic)
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    # float32 log-softmax as in qscore's scoring (HFLM's default is the model's dtype, bf16 on a GPU)
    lm = HFLM(pretrained=backend.model, tokenizer=tokenizer, batch_size=batch_size, max_length=options.max_model_len,
              add_bos_token=add_bos_token, softmax_dtype="float32")
    return lm, backend


def vllm_lm(ckpt, options: EngineOptions, arithmetic, *, add_bos_token: bool, engine_kwargs: dict | None = None):
    """lm-eval's VLLM, built with the engine settings the score stage's vLLM backend builds from the same
    options (``vllm.engine_spec``); the returned backend describes the run (kernel path) and shuts the engine down."""
    from jobs.engines.vllm import VllmBackend, engine_spec

    spec = engine_spec(ckpt.path, options, arithmetic, scoring=False, extra=engine_kwargs)
    spec.apply_env()
    from lm_eval.models.vllm_causallms import VLLM

    kw = dict(spec.kwargs)
    lm = VLLM(pretrained=kw.pop("model"), add_bos_token=add_bos_token, batch_size="auto", **kw)
    return lm, VllmBackend.from_llm(lm.model, spec, arithmetic)


def load_lm(backend: str, ckpt, options: EngineOptions, arithmetic, *, batch_size: int, add_bos_token: bool,
            engine_kwargs: dict | None = None):
    """lm-eval's model of ``ckpt`` on ``backend`` computing ``arithmetic`` (resolved by the stage), and the
    qscore backend that describes and closes it."""
    if backend == "vllm":
        return vllm_lm(ckpt, options, arithmetic, add_bos_token=add_bos_token, engine_kwargs=engine_kwargs)
    return transformers_lm(ckpt, options, arithmetic, batch_size=batch_size, add_bos_token=add_bos_token)


def chat_template_arg(choice: str) -> bool | str:
    """CHAT_TEMPLATE: ``none`` (plain prompts, as llm-compressor's CI), ``default`` (the tokenizer's
    template) or the name of one of the tokenizer's named templates."""
    if choice in ("", "none"):
        return False
    return True if choice == "default" else choice


# -- evaluation ------------------------------------------------------------------------------------------
def evaluate(lm, tm, task, *, num_fewshot: int | None, limit: int | None, chat_template: str,
             fewshot_as_multiturn: bool) -> tuple[list[dict], dict]:
    """lm-eval on one task: its per-sample records and its own results entry for that task."""
    from lm_eval import simple_evaluate

    name = task.task_name
    apply = chat_template_arg(chat_template)
    out = simple_evaluate(model=lm, tasks=[task], task_manager=tm, num_fewshot=num_fewshot, limit=limit,
                          log_samples=True, apply_chat_template=apply,
                          fewshot_as_multiturn=bool(apply) and fewshot_as_multiturn,
                          bootstrap_iters=BOOTSTRAP_ITERS, **SEEDS)
    entry = {key: out.get(key, {}).get(name) for key in ("results", "versions", "n-shot", "higher_is_better",
                                                         "n-samples")}
    entry["chat_template_sha256"] = (hashlib.sha256(lm.chat_template(apply).encode()).hexdigest()
                                     if apply and lm.chat_template(apply) else None)
    return out["samples"][name], entry


def _number(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _text(v) -> str | None:
    return v if v is None or isinstance(v, str) else _jsonable(v)


def sample_rows(task, records: list[dict], metric_names: list[str]) -> list[dict]:
    """Archive rows (``taskarchive``) from lm-eval's logged samples: one per (document, filter)."""
    rows = []
    mc = task.OUTPUT_TYPE == "multiple_choice"
    for s in records:
        row = {"doc_id": int(s["doc_id"]), "filter": s.get("filter") or "none", "doc_hash": s.get("doc_hash"),
               "prompt_hash": s.get("prompt_hash"), "target": _text(s.get("target"))}
        resps = s.get("filtered_resps") or []
        if mc:
            choices = task.doc_to_choice(s["doc"]) if not task.multiple_input else None
            n = len(choices) if choices is not None else len(resps)
            lls = [float(r[0]) for r in resps[:n]]
            best = max(range(len(lls)), key=lls.__getitem__) if lls else None
            row.update(choice=best, choice_logprobs=lls,
                       response=_text(choices[best]) if choices is not None and best is not None else None)
        elif task.OUTPUT_TYPE == "generate_until":
            raw = (s.get("resps") or [[None]])[0]
            row.update(response=_text(resps[0] if len(resps) == 1 else resps),
                       raw_response=_text(raw[0] if len(raw) == 1 else raw))
        else:  # loglikelihood(_rolling): the continuation's loglikelihood
            row["choice_logprobs"] = [float(r[0] if isinstance(r, (tuple, list)) else r) for r in resps]
        for m in metric_names:
            row[m] = _number(s.get(m))
        first = row.get(metric_names[0]) if metric_names else None
        row["correct"] = bool(first == 1.0) if first in (0.0, 1.0) else None
        rows.append(row)
    return rows


def per_sample_metrics(records: list[dict], metrics: list[dict]) -> list[dict]:
    """The task's metrics, each marked with whether every sample holds a plain number for it (corpus-level
    metrics such as BLEU keep tuples per sample and are aggregated by lm-eval only)."""
    return [{**m, "per_sample": all(_number(s.get(m["name"])) is not None for s in records)} for m in metrics]
