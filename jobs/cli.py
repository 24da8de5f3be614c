"""``python -m jobs <stage>``: one click command per stage; every option also reads an environment variable."""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import signal
import sys

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


def opt(*names, env: str, **kw):
    """An option that reads ``env`` too, and says so in --help (the names match .env.example)."""
    return click.option(*names, envvar=env, show_envvar=True, **kw)


def _on_sigterm(signum, frame):
    # Turn `docker stop` / a scheduler's SIGTERM into an ordinary exit so cleanup (temp files, the vLLM
    # engine's processes) runs; completed parts are kept for resume.
    raise SystemExit(128 + signum)


def stage(fn):
    """Run a stage; a known failure becomes one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from . import provenance
        from .errors import QscoreError

        signal.signal(signal.SIGTERM, _on_sigterm)
        ctx = click.get_current_context(silent=True)
        if ctx is not None:
            provenance.record_command(ctx.info_name, ctx.params)
        try:
            result = fn(*args, **kwargs)
        except QscoreError as exc:
            click.echo(f"error: {_line(exc)}", err=True)
            _exit(1)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                click.echo(f"error: no space left on device while writing {exc.filename or ''}".rstrip(), err=True)
            else:
                click.echo(f"error: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}", err=True)
            _exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: completed parts are kept; run the same command again to resume", err=True)
            _exit(130)
        _exit(0)
        return result

    return wrapper


def _exit(code: int) -> None:
    """Exit with ``code``. After vLLM ran, leave without interpreter teardown: its engine's threads can
    abort the process there (exit 134, 'terminate called without an active exception') although the
    stage succeeded and the engine was shut down."""
    if "vllm" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


@click.group(context_settings=CONTEXT)
@opt("--log-level", env="LOG_LEVEL", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
     help="Logging detail on stderr.")
def main(log_level):
    """qscore: quantize a Hugging Face LLM, check that it loads, score it token by token, report the cost.

    Stages: quantize → validate → score (once per model) → aggregate. Each writes files the next reads.
    """
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)


def engine_options(f):
    """vLLM engine settings (the transformers backend ignores them)."""
    for o in reversed([
        opt("--gpu-memory-utilization", env="GPU_MEMORY_UTILIZATION", type=float, default=0.85,
            help="vLLM: share of GPU memory the engine may take."),
        opt("--tensor-parallel-size", env="TENSOR_PARALLEL_SIZE", type=int, default=1, help="vLLM: GPUs per model."),
        opt("--enforce-eager/--no-enforce-eager", env="ENFORCE_EAGER", default=False,
            help="vLLM: skip torch.compile and CUDA graphs (faster start, slower scoring)."),
        opt("--max-num-batched-tokens", env="MAX_NUM_BATCHED_TOKENS", type=int, default=None,
            help="vLLM: tokens per engine step (default: vLLM's choice)."),
        opt("--quantization", env="QUANTIZATION", default=None,
            help="vLLM: quantization method (default: detected from the checkpoint)."),
    ]):
        f = o(f)
    return f


def _engine_kw(kw: dict) -> dict:
    keys = ("gpu_memory_utilization", "tensor_parallel_size", "enforce_eager", "max_num_batched_tokens", "quantization")
    return {k: kw.pop(k) for k in keys}


@main.command(context_settings=CONTEXT)
@opt("--model-id", env="MODEL_ID", required=True, help="Hub id or local directory of the model to quantize.")
@opt("--output", env="QUANT_OUTPUT", required=True, help="Directory for the compressed checkpoint.")
@opt("--scheme", env="SCHEME", default="NVFP4", help="NVFP4, NVFP4A16, FP8_DYNAMIC, FP8, W4A16, W8A16 or W8A8.")
@opt("--calibration-dataset", env="CALIBRATION_DATASET", default="HuggingFaceH4/ultrachat_200k",
     help="Hub dataset or local .jsonl/.parquet file of chats ('messages') or 'text'.")
@opt("--calibration-split", env="CALIBRATION_SPLIT", default="train_sft", help="Split of the calibration dataset.")
@opt("--num-calibration-samples", env="NUM_CALIBRATION_SAMPLES", type=int, default=1024,
     help="Calibration samples (rendered through the model's chat template).")
@opt("--max-sequence-length", env="MAX_SEQUENCE_LENGTH", type=int, default=2048, help="Calibration tokens per sample.")
@opt("--no-calibration", env="NO_CALIBRATION", is_flag=True, default=False,
     help="Round to nearest, no calibration data (weight-only schemes never need it).")
@opt("--spinquant", env="SPINQUANT", is_flag=True, default=False,
     help="Apply SpinQuant Hadamard rotations (R1, R2) before quantizing.")
@opt("--ignore", env="IGNORE", default="lm_head", help="Comma-separated modules left unquantized.")
@opt("--overwrite", env="OVERWRITE", is_flag=True, default=False, help="Replace an existing output directory.")
@stage
def quantize(model_id, output, scheme, calibration_dataset, calibration_split, num_calibration_samples,
             max_sequence_length, no_calibration, spinquant, ignore, overwrite):
    """Quantize a model with llm-compressor and save it compressed (with qscore.json beside the weights)."""
    from .stages import quantize as q

    q.run(model_id, output, scheme, calibration_dataset, calibration_split, num_calibration_samples,
          max_sequence_length, no_calibration, spinquant, [s for s in ignore.split(",") if s], overwrite)


@main.command(context_settings=CONTEXT)
@opt("--model", env="MODEL", required=True, help="Checkpoint directory or hub id.")
@opt("--backend", env="BACKEND", default="auto", type=click.Choice(["auto", "transformers", "vllm"]),
     help="auto: vLLM where installed with a GPU, else transformers.")
@opt("--expect-scheme", env="EXPECT_SCHEME", default=None, help="Fail unless the config claims this scheme.")
@opt("--max-new-tokens", env="VALIDATE_MAX_NEW_TOKENS", type=int, default=16, help="Tokens generated per prompt.")
@opt("--baseline-logprobs", env="BASELINE_LOGPROBS", default=None,
     help="Quality gate: a baseline's dataset directory (results/logprobs/model=L/dataset=D).")
@opt("--max-nll-increase", env="MAX_NLL_INCREASE", type=float, default=0.1,
     help="Quality gate: largest NLL increase (nats/token) allowed over the baseline.")
@opt("--gate-texts", env="GATE_TEXTS", type=int, default=16, help="Quality gate: texts of the baseline to score.")
@opt("--baseline-tasks", env="BASELINE_TASKS", default=None,
     help="Task quality gate: a baseline's task results (results/tasks/model=L, or one task=T in it), rerun here.")
@opt("--recovery-min", env="RECOVERY_MIN", type=float, default=0.95,
     help="Task quality gate: smallest accuracy recovery (model / baseline) allowed on every task and metric.")
@opt("--dtype", env="DTYPE", default="auto", help="Compute dtype: auto, bfloat16, float16, float32.")
@opt("--max-model-len", env="MAX_MODEL_LEN", type=int, default=2048, help="vLLM: context length of the engine.")
@engine_options
@stage
def validate(model, backend, expect_scheme, max_new_tokens, baseline_logprobs, max_nll_increase, gate_texts,
             baseline_tasks, recovery_min, dtype, max_model_len, **kw):
    """Check that a checkpoint loads, matches its quantization config, and generates sane text."""
    from .stages import validate as v

    report = v.run(model, backend, expect_scheme, max_new_tokens, baseline_logprobs, max_nll_increase,
                   gate_texts, dtype, {**_engine_kw(kw), "max_model_len": max_model_len},
                   baseline_tasks=baseline_tasks, recovery_min=recovery_min)
    click.echo(json.dumps(report, indent=2))
    click.echo("OK", err=True)


@main.command(context_settings=CONTEXT)
@opt("--model", env="MODEL", required=True, help="Checkpoint directory or hub id.")
@opt("--label", env="LABEL", required=True, help="Name of the model in results (model=<label>).")
@opt("--datasets", env="DATASETS", default="wikitext2,ultrachat",
     help="Comma/space list: wikitext2, ultrachat, a .txt/.jsonl/.parquet file, or NAME=PATH.")
@opt("--n-wikitext", env="N_WIKITEXT", type=int, default=200, help="Texts kept from WikiText-2 test.")
@opt("--n-ultrachat", env="N_ULTRACHAT", type=int, default=200, help="Texts kept from UltraChat test_sft.")
@opt("--tokenizer", env="TOKENIZER", default=None,
     help="Tokenizer for the token stream; use the baseline's for every model of a comparison (default: the model's).")
@opt("--max-model-len", env="MAX_MODEL_LEN", type=int, default=2048,
     help="Texts are cut to max_model_len - 8 tokens.")
@opt("--backend", env="BACKEND", default="auto", type=click.Choice(["auto", "transformers", "vllm"]),
     help="auto: vLLM where installed with a GPU, else transformers.")
@opt("--topk", env="TOPK", type=int, default=1, help="Candidates kept per position (>1 adds topk_* columns).")
@opt("--results-dir", env="RESULTS_DIR", default="results", help="Root of the Parquet archive.")
@opt("--dtype", env="DTYPE", default="auto", help="Compute dtype: auto, bfloat16, float16, float32.")
@opt("--part-size", env="PART_SIZE", type=int, default=32, help="Texts per Parquet part (the unit of resume).")
@opt("--max-batch-tokens", env="MAX_BATCH_TOKENS", type=int, default=8192,
     help="transformers: padded tokens per forward pass.")
@opt("--overwrite", env="OVERWRITE", is_flag=True, default=False,
     help="Replace a dataset scored with other settings.")
@engine_options
@stage
def score(model, label, datasets, n_wikitext, n_ultrachat, tokenizer, max_model_len, backend, topk,
          results_dir, dtype, part_size, max_batch_tokens, overwrite, **kw):
    """Score one model: per-token logprobs of each evaluation set to results/logprobs/model=LABEL/."""
    from .stages import score as s

    opts = {**_engine_kw(kw), "max_batch_tokens": max_batch_tokens}
    paths = s.run(model, label, datasets, tokenizer, max_model_len, backend, topk, results_dir, dtype,
                  part_size, overwrite, {"wikitext2": n_wikitext, "ultrachat": n_ultrachat}, opts)
    for p in paths:
        click.echo(str(p))


@main.command(context_settings=CONTEXT)
@opt("--results-dir", env="RESULTS_DIR", default="results", help="Root of the Parquet archive.")
@opt("--baseline", env="BASELINE", default=None, help="Label of the baseline model (default: bf16).")
@opt("--report-dir", env="REPORT_DIR", default=None, help="Where the report goes (default: RESULTS_DIR/report).")
@opt("--bootstrap", env="BOOTSTRAP", type=int, default=1000, help="Bootstrap replicates (resampling texts).")
@opt("--seed", env="SEED", type=int, default=0, help="Bootstrap seed.")
@opt("--recovery-min", env="RECOVERY_MIN", type=float, default=0.95,
     help="Task accuracy: recovery (model / baseline) below which a task fails (llm-compressor's CI: 0.95).")
@stage
def aggregate(results_dir, baseline, report_dir, bootstrap, seed, recovery_min):
    """Tables, paired statistics and plots from the Parquet archive (no model needed)."""
    from .stages import aggregate as a

    out = a.run(results_dir, baseline, report_dir, bootstrap, seed, recovery_min=recovery_min)
    click.echo(str(out / "report.md"))


@main.command(context_settings=CONTEXT)
@opt("--model", env="MODEL", required=True, help="Checkpoint directory or hub id.")
@opt("--label", env="LABEL", required=True, help="Name of the model in results (model=<label>).")
@opt("--tasks", env="TASKS", default="gsm8k,arc_challenge",
     help="Comma/space list of lm-eval tasks, groups or tags (or YAML files); qscore_local: the bundled offline tasks.")
@opt("--limit", env="LIMIT", type=int, default=None,
     help="First N documents of each task: a quick look, not comparable with full runs (default: all).")
@opt("--num-fewshot", env="NUM_FEWSHOT", type=int, default=None,
     help="Few-shot examples per prompt (default: each task's own, gsm8k 5; tasks pinned to 0 stay 0).")
@opt("--chat-template", env="CHAT_TEMPLATE", default="none",
     help="none (plain prompts, as llm-compressor's CI), default (the tokenizer's), or a named template.")
@opt("--fewshot-as-multiturn/--no-fewshot-as-multiturn", env="FEWSHOT_AS_MULTITURN", default=False,
     help="With a chat template: few-shot examples as earlier conversation turns.")
@opt("--add-bos-token/--no-add-bos-token", env="ADD_BOS_TOKEN", default=True,
     help="Prepend the tokenizer's BOS token (lm-eval's add_bos_token; no-op for tokenizers without one, e.g. Qwen).")
@opt("--include-path", env="TASKS_INCLUDE_PATH", default=None,
     help="Directory of lm-eval YAML tasks (default: the bundled data/tasks).")
@opt("--batch-size", env="TASKS_BATCH_SIZE", type=int, default=16, help="transformers: requests per forward pass.")
@opt("--max-model-len", env="MAX_MODEL_LEN", type=int, default=2048, help="Context length (prompts are cut from the left).")
@opt("--backend", env="BACKEND", default="auto", type=click.Choice(["auto", "transformers", "vllm"]),
     help="auto: vLLM where installed with a GPU, else transformers.")
@opt("--dtype", env="DTYPE", default="auto", help="Compute dtype: auto, bfloat16, float16, float32.")
@opt("--results-dir", env="RESULTS_DIR", default="results", help="Root of the Parquet archive.")
@opt("--overwrite", env="OVERWRITE", is_flag=True, default=False, help="Replace a task evaluated with other settings.")
@opt("--engine-kwargs", env="ENGINE_KWARGS", default=None,
     help='vLLM: extra engine arguments as JSON, e.g. \'{"max_num_seqs": 128}\'.')
@engine_options
@stage
def tasks(model, label, tasks, limit, num_fewshot, chat_template, fewshot_as_multiturn, add_bos_token,
          include_path, batch_size, max_model_len, backend, dtype, results_dir, overwrite, engine_kwargs, **kw):
    """Task accuracy with lm-evaluation-harness: per-sample results to results/tasks/model=LABEL/task=T/."""
    from .errors import SettingsError
    from .stages import tasks as t

    try:
        extra = json.loads(engine_kwargs) if engine_kwargs else {}
    except json.JSONDecodeError as exc:
        raise SettingsError(f"--engine-kwargs is not JSON: {exc}") from None
    settings = t.TasksSettings(
        model=model, label=label, tasks=tuple(tasks.replace(",", " ").split()), limit=limit, num_fewshot=num_fewshot,
        chat_template=chat_template, fewshot_as_multiturn=fewshot_as_multiturn, add_bos_token=add_bos_token,
        backend=backend, dtype=dtype, max_model_len=max_model_len, batch_size=batch_size, include_path=include_path,
        results_dir=results_dir, overwrite=overwrite, engine_options={**_engine_kw(kw), "engine_kwargs": extra})
    for p in t.run(settings=settings):
        click.echo(str(p))


@main.command("build-tiny", context_settings=CONTEXT)
@opt("--output", env="TINY_MODEL", default="models/tiny-qwen3", help="Directory of the tiny model.")
@opt("--steps", env="TINY_STEPS", type=int, default=None, help="Training steps (default: the recipe's).")
@stage
def build_tiny(output, steps):
    """Build (once, cached) the tiny Qwen3 model and tokenizer that the demo and tests use."""
    from .tinymodel import build_tiny_model

    kw = {} if steps is None else {"steps": steps}
    click.echo(str(build_tiny_model(output, **kw)))


@main.command("export-modelopt", context_settings=CONTEXT)
@opt("--model", env="MODEL", required=True, help="BF16 checkpoint directory.")
@opt("--output", env="MODELOPT_OUTPUT", required=True, help="Directory for the ModelOpt NVFP4 checkpoint.")
@stage
def export_modelopt(model, output):
    """Write a ModelOpt-format NVFP4 copy of a BF16 checkpoint (the demo's stand-in for NVIDIA's)."""
    from .modelopt_export import export_modelopt_nvfp4

    click.echo(str(export_modelopt_nvfp4(model, output)))


if __name__ == "__main__":
    main()
