"""``python -m jobs <stage>``: one click command per stage; every option also reads an environment variable."""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

import click

from jobs.core.settings import Nvfp4Compute

if TYPE_CHECKING:
    from jobs.core.settings import EngineOptions

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}
# a share of the baseline's accuracy: above 1 no model could pass, at 0 every model would
RECOVERY = click.FloatRange(0, 1, min_open=True)


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
        from jobs.core import provenance
        from jobs.core.errors import QscoreError

        from jobs.core import caches

        signal.signal(signal.SIGTERM, _on_sigterm)
        caches.use(os.environ.get("CACHE_DIR"))
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

    Stages: quantize → validate → score (once per model) → aggregate; bench (once per model, a GPU of its own)
    measures the cost of serving. Each writes files the next reads.
    """
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)


def engine_options(f):
    """Settings of the engine that runs the model (vLLM's; the transformers backend reads dtype and context)."""
    for o in reversed([
        opt("--dtype", env="DTYPE", default="auto", help="Compute dtype: auto, bfloat16, float16, float32."),
        opt("--max-model-len", env="MAX_MODEL_LEN", type=int, default=2048,
            help="Context of the engine; texts are cut to max_model_len - 8 tokens."),
        opt("--gpu-memory-utilization", env="GPU_MEMORY_UTILIZATION", type=float, default=0.85,
            help="vLLM: share of GPU memory the engine may take."),
        opt("--tensor-parallel-size", env="TENSOR_PARALLEL_SIZE", type=int, default=1, help="vLLM: GPUs per model."),
        opt("--enforce-eager/--no-enforce-eager", env="ENFORCE_EAGER", default=None,
            help="vLLM: eager (no torch.compile) or compiled; unset: eager unless the run scores enough tokens "
                 "for compiling to pay off."),
        opt("--max-num-batched-tokens", env="MAX_NUM_BATCHED_TOKENS", type=int, default=None,
            help="vLLM: tokens per engine step (default: vLLM's choice)."),
        opt("--kv-cache-memory-bytes", env="KV_CACHE_MEMORY_BYTES", type=int, default=None,
            help="vLLM: a KV cache of this size instead of one sized by profiling (set by slots on a shared GPU)."),
        opt("--quantization", env="QUANTIZATION", default=None,
            help="vLLM: quantization method (default: detected from the checkpoint)."),
    ]):
        f = o(f)
    return f


ENGINE_KEYS = ("dtype", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "enforce_eager",
               "max_num_batched_tokens", "kv_cache_memory_bytes", "quantization")


def _engine(kw: dict, **more) -> EngineOptions:
    from jobs.core.settings import EngineOptions

    return EngineOptions.from_mapping({**{k: kw.pop(k) for k in ENGINE_KEYS}, **more})


@main.command(context_settings=CONTEXT)
@opt("--model-id", env="MODEL_ID", required=True, help="Hub id or local directory of the model to quantize.")
@opt("--quant-output", "--output", "output", env="QUANT_OUTPUT", required=True,
     help="Directory for the compressed checkpoint.")
@opt("--scheme", env="SCHEME", default="NVFP4", help="NVFP4, NVFP4A16, FP8_DYNAMIC, FP8, W4A16, W8A16, W8A8, MXFP4 or MXFP4A16.")
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
@opt("--calibration-pipeline", "--pipeline", "pipeline", env="CALIBRATION_PIPELINE", default="auto", type=click.Choice(["auto", "basic", "sequential"]),
     help="llm-compressor calibration pipeline; auto: basic (one pass) when the model fits on the GPU, "
          "else sequential (layer by layer).")
@opt("--calibration-batch-size", "--batch-size", "calibration_batch_size", env="CALIBRATION_BATCH_SIZE", type=int,
     default=16, help="Calibration samples per forward pass (llm-compressor's batch_size); padding never reaches "
                      "the observers, so the scales are batch size 1's (docs/quantize.md).")
@opt("--calibration-seed", env="CALIBRATION_SEED", type=int, default=42,
     help="Seed of the calibration subsample (which samples, in which order): a sweep's seeds measure a recipe's spread.")
@opt("--calibration-offload", "--offload", "offload", env="CALIBRATION_OFFLOAD", default="auto", type=click.Choice(["auto", "cpu", "cuda"]),
     help="Sequential pipeline: where layer inputs wait between layers; auto: the GPU when they fit.")
@opt("--overwrite", env="OVERWRITE", is_flag=True, default=False, help="Replace an existing output directory.")
@stage
def quantize(ignore, **kw):
    """Quantize a model with llm-compressor and save it compressed (with qscore.json beside the weights)."""
    from jobs.core.settings import QuantizeSettings
    from jobs.stages import quantize as q

    q.run(settings=QuantizeSettings(ignore=tuple(x for x in ignore.split(",") if x), **kw))


@main.command(context_settings=CONTEXT)
@opt("--model", env="MODEL", required=True, help="Checkpoint directory or hub id.")
@opt("--backend", env="BACKEND", default="auto", type=click.Choice(["auto", "transformers", "vllm"]),
     help="auto: vLLM where installed with a GPU, else transformers.")
@opt("--expect-scheme", env="EXPECT_SCHEME", default=None, help="Fail unless the config claims this scheme.")
@opt("--max-new-tokens", env="MAX_NEW_TOKENS", type=int, default=16, help="Tokens generated per prompt.")
@opt("--baseline-logprobs", env="BASELINE_LOGPROBS", default=None,
     help="Quality gate: a baseline's dataset directory (results/logprobs/model=L/dataset=D).")
@opt("--max-nll-increase", env="MAX_NLL_INCREASE", type=float, default=0.1,
     help="Quality gate: largest NLL increase (nats/token) allowed over the baseline.")
@opt("--gate-texts", env="GATE_TEXTS", type=int, default=16, help="Quality gate: texts of the baseline to score.")
@opt("--baseline-tasks", env="BASELINE_TASKS", default=None,
     help="Task quality gate: a baseline's task results (results/tasks/model=L, or one task=T in it), rerun here.")
@opt("--recovery-min", env="RECOVERY_MIN", type=RECOVERY, default=0.95,
     help="Task quality gate: smallest accuracy recovery (model / baseline) allowed on every task and metric.")
@engine_options
@stage
def validate(**kw):
    """Check that a checkpoint loads, matches its quantization config, and generates sane text.
    NVFP4 is computed as the checkpoint declares (W4A4)."""
    from jobs.core.settings import ValidateSettings
    from jobs.stages import validate as v

    engine = _engine(kw)
    report = v.run(settings=ValidateSettings(engine=engine, **kw))
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
@opt("--backend", env="BACKEND", default="auto", type=click.Choice(["auto", "transformers", "vllm"]),
     help="auto: vLLM where installed with a GPU, else transformers.")
@opt("--nvfp4-compute", env="NVFP4_COMPUTE", default=Nvfp4Compute.DECLARED.value, type=click.Choice([m.value for m in Nvfp4Compute]),
     help="NVFP4 arithmetic: declared = as the checkpoint says (W4A4: native on Blackwell, emulated elsewhere); "
          "weight-only = W4A16, what Marlin serves on Hopper.")
@opt("--topk", env="TOPK", type=int, default=20,
     help="Candidates kept per position (topk_* columns; 1 = top-1 only). The report's KL divergence and "
          "top-k agreement need them on both sides of a comparison.")
@opt("--results-dir", env="RESULTS_DIR", default="results", help="Root of the Parquet archive.")
@opt("--part-size", env="PART_SIZE", type=int, default=32, help="Texts per Parquet part (the unit of resume).")
@opt("--shard", env="SHARD", default=None,
     help="i/N: score every N-th part of each set, starting with part i-1 (for N jobs in parallel).")
@opt("--max-batch-tokens", env="MAX_BATCH_TOKENS", type=int, default=8192,
     help="transformers: padded tokens per forward pass.")
@opt("--doc-stride", env="DOC_STRIDE", type=int, default=0,
     help="Document-level sets (wikitext2_doc): tokens newly scored per rolling window; 0 = disjoint windows "
          "as lm-eval (max_model_len - 9), smaller overlaps them so every token has longer context.")
@opt("--overwrite", env="OVERWRITE", is_flag=True, default=False,
     help="Replace a dataset scored with other settings.")
@engine_options
@stage
def score(n_wikitext, n_ultrachat, nvfp4_compute, max_batch_tokens, shard, **kw):
    """Score one model: per-token logprobs of each evaluation set to results/logprobs/model=LABEL/."""
    from jobs.core.settings import ScoreSettings, Shard
    from jobs.stages import score as s

    engine = _engine(kw, nvfp4_compute=nvfp4_compute, max_batch_tokens=max_batch_tokens)
    paths = s.run(settings=ScoreSettings(engine=engine, shard=Shard.parse(shard),
                                         limits=(("wikitext2", n_wikitext), ("ultrachat", n_ultrachat)), **kw))
    for p in paths:
        click.echo(str(p))


@main.command(context_settings=CONTEXT)
@opt("--results-dir", env="RESULTS_DIR", default="results", help="Root of the Parquet archive.")
@opt("--baseline", env="BASELINE", default=None, help="Label of the baseline model (default: bf16).")
@opt("--report-dir", env="REPORT_DIR", default=None, help="Where the report goes (default: RESULTS_DIR/report).")
@opt("--bootstrap", env="BOOTSTRAP", type=int, default=1000, help="Bootstrap replicates (resampling texts).")
@opt("--seed", env="SEED", type=int, default=0, help="Bootstrap seed.")
@opt("--recovery-min", env="RECOVERY_MIN", type=RECOVERY, default=0.95,
     help="Task accuracy: recovery (model / baseline) below which a task fails (llm-compressor's CI: 0.95).")
@opt("--labels", env="LABELS", default=None,
     help="Comma/space list of the labels to report (with the baseline); default: every label in the archive.")
@opt("--report-tokenizer", "--tokenizer", "report_tokenizer", env="REPORT_TOKENIZER", default=None,
     help="tokenizer.json (or its directory) to decode the worst tokens' context (default: the baseline's "
          "tokenizer recorded in its Parquet metadata, where readable here; else ids only).")
@stage
def aggregate(labels, **kw):
    """Tables, paired statistics and plots from the Parquet archive (no model needed)."""
    from jobs.core.settings import AggregateSettings
    from jobs.stages import aggregate as a

    kw["labels"] = tuple((labels or "").replace(",", " ").split())
    out = a.run(settings=AggregateSettings(**kw))
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
@opt("--tasks-include-path", "--include-path", "include_path", env="TASKS_INCLUDE_PATH", default=None,
     help="Directory of lm-eval YAML tasks (default: the bundled data/tasks).")
@opt("--tasks-batch-size", "--batch-size", "batch_size", env="TASKS_BATCH_SIZE", type=int, default=16, help="transformers: requests per forward pass.")
@opt("--backend", env="BACKEND", default="auto", type=click.Choice(["auto", "transformers", "vllm"]),
     help="auto: vLLM where installed with a GPU, else transformers.")
@opt("--nvfp4-compute", env="NVFP4_COMPUTE", default=Nvfp4Compute.DECLARED.value, type=click.Choice([m.value for m in Nvfp4Compute]),
     help="NVFP4 arithmetic, as for score: declared (W4A4) or weight-only (W4A16).")
@opt("--results-dir", env="RESULTS_DIR", default="results", help="Root of the Parquet archive.")
@opt("--overwrite", env="OVERWRITE", is_flag=True, default=False, help="Replace a task evaluated with other settings.")
@opt("--engine-kwargs", env="ENGINE_KWARGS", default=None,
     help='vLLM: extra engine arguments as JSON, e.g. \'{"max_num_seqs": 128}\'.')
@engine_options
@stage
def tasks(model, label, tasks, limit, num_fewshot, chat_template, fewshot_as_multiturn, add_bos_token,
          include_path, batch_size, backend, nvfp4_compute, results_dir, overwrite, engine_kwargs, **kw):
    """Task accuracy with lm-evaluation-harness: per-sample results to results/tasks/model=LABEL/task=T/."""
    from jobs.core.errors import SettingsError
    from jobs.stages import tasks as t

    engine = _engine(kw, nvfp4_compute=nvfp4_compute)
    try:
        extra = json.loads(engine_kwargs) if engine_kwargs else {}
    except json.JSONDecodeError as exc:
        raise SettingsError(f"--engine-kwargs is not JSON: {exc}") from None
    settings = t.TasksSettings(
        model=model, label=label, tasks=tuple(tasks.replace(",", " ").split()), limit=limit, num_fewshot=num_fewshot,
        chat_template=chat_template, fewshot_as_multiturn=fewshot_as_multiturn, add_bos_token=add_bos_token,
        backend=backend, batch_size=batch_size, include_path=include_path, results_dir=results_dir,
        overwrite=overwrite, engine=engine, engine_kwargs=extra)
    for p in t.run(settings=settings):
        click.echo(str(p))


@main.command(context_settings=CONTEXT)
@opt("--model", env="MODEL", required=True, help="Checkpoint directory or hub id (a hub id from the HF cache).")
@opt("--label", env="LABEL", required=True, help="Name of the model in results (model=<label>).")
@opt("--results-dir", env="RESULTS_DIR", default="results", help="Root of the Parquet archive.")
@opt("--bench-nvfp4-compute", "--nvfp4-compute", "nvfp4_compute", env="BENCH_NVFP4_COMPUTE", default="auto",
     type=click.Choice(["auto", *(m.value for m in Nvfp4Compute)]),
     help="NVFP4 arithmetic served: auto = what the GPU deploys (W4A4 native on Blackwell, W4A16 Marlin "
          "elsewhere); declared = W4A4 (emulated off Blackwell: not a deployment speed); weight-only = W4A16.")
@opt("--bench-input-len", "--input-len", "input_len", env="BENCH_INPUT_LEN", type=int, default=512, help="Prompt tokens per request.")
@opt("--bench-output-len", "--output-len", "output_len", env="BENCH_OUTPUT_LEN", type=int, default=256,
     help="Tokens decoded per request (EOS ignored: exactly these).")
@opt("--bench-loaded-concurrency", "--loaded-concurrency", "loaded_concurrency", env="BENCH_LOADED_CONCURRENCY", type=int, default=64,
     help="Requests in flight in the loaded and prefill runs.")
@opt("--bench-num-prompts", "--num-prompts", "num_prompts", env="BENCH_NUM_PROMPTS", type=int, default=256,
     help="Requests of the loaded run and of the prefill run.")
@opt("--bench-num-prompts-b1", "--num-prompts-b1", "num_prompts_b1", env="BENCH_NUM_PROMPTS_B1", type=int, default=16, help="Requests of the batch-1 run.")
@opt("--bench-timeout", "--timeout", "timeout", env="BENCH_TIMEOUT", type=float, default=1800.0,
     help="Seconds allowed for the server's start and for each benchmark run (--timeout).")
@opt("--overwrite", env="OVERWRITE", is_flag=True, default=False,
     help="Replace a benchmark measured with other settings.")
@engine_options
@stage
def bench(nvfp4_compute, **kw):
    """What a checkpoint costs to serve (vLLM serve + vLLM's benchmark, on a GPU of its own): bytes on disk, weight
    memory, KV-cache tokens, prefill and decode speed, TTFT and ITL, to results/bench/model=LABEL/bench.parquet."""
    from jobs.core.settings import BenchSettings
    from jobs.stages import bench as b

    engine = _engine(kw)
    click.echo(str(b.run(settings=BenchSettings(engine=engine, nvfp4_compute=nvfp4_compute, **kw))))


@main.command(context_settings={**CONTEXT, "ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def plan(args):
    """The job plan: every job of a run with its commands (jobs.runs.plan; `plan --help`)."""
    from jobs.runs import plan as p

    sys.exit(p.main(list(args)))


@main.command(context_settings={**CONTEXT, "ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def slots(args):
    """Run a command on GPUs nobody else is using (jobs.runs.slots; `slots --help`)."""
    from jobs.runs import slots as sl

    sys.exit(sl.main(list(args)))


if __name__ == "__main__":
    main()
