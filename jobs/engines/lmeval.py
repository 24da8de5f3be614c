"""lm-evaluation-harness, driven for qscore: its tasks, its model classes, its metrics and filters.

qscore does not reimplement any of it. This module only
* finds tasks (lm-eval's own, plus YAML tasks under an include path such as the bundled ``data/tasks``),
* describes a task for provenance (version, config hash, digest of the documents evaluated),
* builds lm-eval's model: ``HFLM`` around the model the score stage's transformers backend loads (so an
  NVFP4 checkpoint is evaluated with the same arithmetic as its logprobs), or lm-eval's ``VLLM`` with
  the engine options qscore's vLLM backend uses,
* runs ``lm_eval.simple_evaluate`` on one task at a time (``log_samples=True``) and turns its per-sample
  records into archive rows (``taskarchive``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from jobs.core.errors import OfflineError, SettingsError

log = logging.getLogger("qscore.tasks")

BUNDLED_TASKS = Path(__file__).resolve().parents[2] / "data" / "tasks"  # jobs/engines/ -> the repository
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
    paths = paths or None
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(n in local.all_tasks or _is_yaml(n) for n in names):
            return local
    return TaskManager(include_path=paths)


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
    text = f"{type(exc).__name__}: {exc}"
    offline = any(w in text for w in ("offline", "Offline", "Connect", "LocalEntryNotFound", "couldn't reach",
                                      "Couldn't reach", "not find", "doesn't exist on the Hub"))
    if offline:
        return OfflineError(
            f"tasks {' '.join(names)}: a dataset is not in the Hugging Face cache and cannot be downloaded "
            f"({text.splitlines()[0][:200]}): run once online with HF_HOME pointing at the cache you mount, "
            "or use the bundled local tasks (qscore_local)")
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
def transformers_lm(model_path: Path, *, dtype: str, batch_size: int, max_model_len: int, add_bos_token: bool,
                    nvfp4_compute: str = "declared"):
    """lm-eval's HFLM around the model qscore's transformers backend loads (returned too: it describes
    the run and frees the model)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from jobs.engines.hf import TransformersBackend
    from jobs.checkpoints.checkpoint import inspect
    from jobs.core.settings import EngineOptions

    backend = TransformersBackend(inspect(model_path), EngineOptions(dtype=dtype, nvfp4_compute=nvfp4_compute))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # float32 log-softmax as in qscore's scoring (HFLM's default is the model's dtype, bf16 on a GPU)
    lm = HFLM(pretrained=backend.model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_model_len,
              add_bos_token=add_bos_token, softmax_dtype="float32")
    return lm, backend


def vllm_engine_kwargs(engine_options: dict) -> dict:
    """What the score stage gives vLLM's engine, in lm-eval's VLLM terms (it forwards unknown keys to LLM)."""
    opts = dict(engine_options)
    extra = opts.pop("engine_kwargs", None) or {}
    kw = {"gpu_memory_utilization": opts.pop("gpu_memory_utilization", 0.85),
          "tensor_parallel_size": opts.pop("tensor_parallel_size", 1),
          # unset: compiled, with CUDA graphs: generation (gsm8k) is decode-bound, where graphs pay off
          "enforce_eager": bool(opts.pop("enforce_eager", False)),
          # as in the score stage: cached prefixes get no prompt logprobs, and loglikelihoods are read from them
          "enable_prefix_caching": False}
    for key in ("max_num_batched_tokens", "quantization"):
        if opts.get(key):
            kw[key] = opts[key]
    return {**kw, **extra}


def vllm_lm(model_path: Path, *, dtype: str, max_model_len: int, add_bos_token: bool, engine_options: dict):
    """lm-eval's VLLM with qscore's engine options; the returned backend describes the run (kernel path)
    and shuts the engine down."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model, for the kernel path
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the stage's result
    from lm_eval.models.vllm_causallms import VLLM

    from jobs.engines.vllm import VllmBackend

    from jobs.engines import arithmetic_for
    from jobs.checkpoints.checkpoint import describe_quantization, read_json

    # greedy generation samples nothing FlashInfer's sampler is needed for; its JIT would only add minutes
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    quant = describe_quantization(read_json(Path(model_path) / "config.json"))
    arith = arithmetic_for("vllm", quant, engine_options.get("nvfp4_compute") or "declared")
    kw = vllm_engine_kwargs(engine_options)
    if arith.vllm_linear_backend != "auto":  # NVFP4 as declared (emulated W4A4 off Blackwell), or Marlin
        kw["linear_backend"] = arith.vllm_linear_backend
    lm = VLLM(pretrained=str(model_path), dtype=dtype or "auto", max_model_len=max_model_len,
              add_bos_token=add_bos_token, batch_size="auto", **kw)
    backend = VllmBackend.from_llm(lm.model, {"model": str(model_path), "dtype": dtype or "auto",
                                              "max_model_len": max_model_len, **kw}, arith)
    return lm, backend


def load_lm(backend: str, model_path: Path, *, dtype: str, batch_size: int, max_model_len: int,
            add_bos_token: bool, engine_options: dict):
    if backend == "vllm":
        return vllm_lm(model_path, dtype=dtype, max_model_len=max_model_len, add_bos_token=add_bos_token,
                       engine_options=engine_options)
    return transformers_lm(model_path, dtype=dtype, batch_size=batch_size, max_model_len=max_model_len,
                           add_bos_token=add_bos_token, nvfp4_compute=engine_options.get("nvfp4_compute") or "declared")


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
    if v is None:
        return None
    return v if isinstance(v, str) else _jsonable(v)


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
    out = []
    for m in metrics:
        values = [s.get(m["name"]) for s in records]
        out.append({**m, "per_sample": all(_number(v) is not None for v in values)})
    return out
