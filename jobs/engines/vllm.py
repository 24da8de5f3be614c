"""The vLLM backend: the evaluation set's token ids in, prompt logprobs out, looked up by token id.

vLLM's prompt-logprob ranks start at 1. The reference run looked for ``rank == 0``, found nothing, and
fell back to the most likely candidate — the model's top-1 confidence, not the text's likelihood. Here
the actual token's entry is found by its token id (vLLM always includes it) and checked.

The parsing (``parse_prompt_logprobs``) and the kernel-path wording (``describe_kernels``) are pure and
tested on the CPU; the engine itself needs a GPU. Entry points that build an engine must run under
``if __name__ == "__main__":`` because vLLM spawns its engine core process.
"""
from __future__ import annotations

import gc
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jobs.checkpoints import arithmetic as arith_mod
from jobs.core.errors import ScoreError
from jobs.texts.sampling import Sample
from jobs.engines.base import SequenceScores
from jobs.core.settings import EngineOptions
from jobs.engines.base import Generation, runtime_info

log = logging.getLogger("qscore.vllm")


class LogprobLookupError(RuntimeError):
    pass


# -- pure parts ------------------------------------------------------------------------------------------
def parse_prompt_logprobs(sample: Sample, prompt_logprobs, topk: int = 1) -> SequenceScores:
    """SequenceScores from vLLM's ``prompt_logprobs`` (a FlatLogprobs or a list of {id: Logprob}|None).

    At each position p >= 1 the actual token ``token_ids[p]`` is looked up by id — never by rank — and
    its rank taken from its entry; the top-1 candidate is the entry of rank 1 (highest logprob on ties).
    """
    ids = np.asarray(sample.token_ids, dtype=np.int64)
    n = len(ids)
    if prompt_logprobs is None or len(prompt_logprobs) != n:
        got = None if prompt_logprobs is None else len(prompt_logprobs)
        raise LogprobLookupError(f"sample {sample.sample_id}: {got} prompt-logprob positions for {n} tokens")
    k = max(topk, 1)
    logprob = np.full(n, np.nan, np.float32)
    rank = np.full(n, -1, np.int32)
    top1_id = np.full(n, -1, np.int32)
    top1_lp = np.full(n, np.nan, np.float32)
    tk_ids = np.full((n, k), -1, np.int32)
    tk_lps = np.full((n, k), np.nan, np.float32)
    if _is_flat(prompt_logprobs):
        _parse_flat(prompt_logprobs, ids, k, logprob, rank, top1_id, top1_lp, tk_ids, tk_lps, sample.sample_id)
    else:
        for p in range(1, n):
            entries = prompt_logprobs[p]
            if not entries or int(ids[p]) not in entries:
                raise LogprobLookupError(f"sample {sample.sample_id} position {p}: token {int(ids[p])} has no entry")
            own = entries[int(ids[p])]
            logprob[p], rank[p] = own.logprob, own.rank
            ranked = sorted(entries.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                              -kv[1].logprob))
            top = [(t, lp) for t, lp in ranked if lp.rank is not None and lp.rank <= k][:k]
            if not top:
                raise LogprobLookupError(f"sample {sample.sample_id} position {p}: no rank-1 candidate")
            top1_id[p], top1_lp[p] = top[0][0], top[0][1].logprob
            for j, (t, lp) in enumerate(top):
                tk_ids[p, j], tk_lps[p, j] = t, lp.logprob
    return SequenceScores(sample.sample_id, ids.astype(np.int32), logprob, rank, top1_id, top1_lp,
                          tk_ids if topk > 1 else None, tk_lps if topk > 1 else None)


def _is_flat(pl) -> bool:
    return hasattr(pl, "start_indices") and hasattr(pl, "token_ids") and hasattr(pl, "ranks")


def _parse_flat(pl, ids, k, logprob, rank, top1_id, top1_lp, tk_ids, tk_lps, sid) -> None:
    """FlatLogprobs stores, per position, the actual token first and then ranks 1..k (duplicates kept)."""
    start = np.asarray(pl.start_indices[1:])
    end = np.asarray(pl.end_indices[1:])
    if np.any(end - start != 1 + k):
        raise LogprobLookupError(f"sample {sid}: expected {1 + k} entries per position (asked for {k})")
    tok = np.asarray(pl.token_ids, dtype=np.int64)
    lps = np.asarray(pl.logprobs, dtype=np.float64)
    rks = np.asarray([r if r is not None else -1 for r in pl.ranks], dtype=np.int64)
    actual = start
    bad = np.flatnonzero(tok[actual] != ids[1:])
    if bad.size:
        p = int(bad[0]) + 1
        raise LogprobLookupError(f"sample {sid} position {p}: entry is token {int(tok[actual[bad[0]]])}, "
                                 f"expected {int(ids[p])}")
    logprob[1:], rank[1:] = lps[actual], rks[actual]
    cols = start[:, None] + 1 + np.arange(k)[None, :]
    if np.any(rks[cols[:, 0]] != 1):
        raise LogprobLookupError(f"sample {sid}: the first candidate is not of rank 1")
    top1_id[1:], top1_lp[1:] = tok[cols[:, 0]], lps[cols[:, 0]]
    tk_ids[1:], tk_lps[1:] = tok[cols], lps[cols]


def describe_kernels(kernels: dict[str, int], capability: str | None) -> str:
    """One line naming what ran the quantized layers, from the classes found in the loaded model."""
    if not kernels:
        return "unknown (the model could not be inspected)"
    parts = [f"{name} x{count}" for name, count in sorted(kernels.items(), key=lambda kv: -kv[1])]
    names = " ".join(kernels)
    if "Fp4" in names or "FP4" in names or "NvFp4" in names:
        if "Marlin" in names:
            verdict = "weight-only FP4 (W4A16) via Marlin: activations stay bf16"
        elif "Emulation" in names:
            verdict = "W4A4 emulated: activations quantized to FP4 in groups of 16, weights dequantized, bf16 GEMM"
        else:
            verdict = "native FP4 (W4A4) GEMM"
    elif all(n.startswith("Unquantized") for n in kernels):  # embeddings and lm_head count too
        verdict = "unquantized"
    else:
        verdict = "quantized linear layers"
    cc = f" on sm_{capability.replace('.', '')}" if capability else ""
    return f"{verdict}{cc} [{'; '.join(parts)}]"


def linear_kernels(model) -> dict[str, int]:
    """Run inside the worker (through ``LLM.apply_model``): which method/scheme/kernel classes each
    Linear layer got. Module-level so that it pickles by reference."""
    counts: dict[str, int] = {}
    for _, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None or not hasattr(module, "weight") and not hasattr(module, "weight_packed"):
            continue
        names = [type(method).__name__]
        scheme = getattr(module, "scheme", None)
        if scheme is not None:
            names.append(type(scheme).__name__)
        kernel = getattr(scheme, "kernel", None) or getattr(method, "kernel", None)
        if kernel is not None:
            names.append(type(kernel).__name__)
        key = "/".join(names)
        counts[key] = counts.get(key, 0) + 1
    return counts


# -- start-up: what the engine is built with, and where its start went -------------------------------------
# Measured on an H100 (bench/RESULTS.md): torch.compile costs 35-45 s cold and 7-10 s from its cache,
# and buys 10-25 % throughput; below this many prompt tokens eager mode finishes first.
COMPILE_MIN_TOKENS = 2_000_000

_START_LOG = {  # vLLM's own log lines (vLLM 0.26) → the engine-start breakdown
    "weights_load_s": re.compile(r"Loading weights took ([\d.]+) seconds"),
    "model_load_s": re.compile(r"Model loading took .* and ([\d.]+) seconds"),
    "compile_s": re.compile(r"torch\.compile(?: and initial profiling/warmup run together)? took ([\d.]+) s in total"),
    "graph_capture_s": re.compile(r"Graph capturing finished in ([\d.]+) secs"),
    "init_engine_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"),
}


def parse_start_log(lines: Sequence[str]) -> dict[str, float]:
    """The engine-start breakdown from vLLM's log lines (pure)."""
    out: dict[str, float] = {}
    for line in lines:
        for key, pattern in _START_LOG.items():
            m = pattern.search(line)
            if m:
                out[key] = out.get(key, 0.0) + float(m.group(1))
    return out


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        try:
            self.lines.append(record.getMessage())
        except Exception:  # a malformed record must not break the engine's start
            pass


# vLLM's environment, for every engine qscore builds (score, validate, tasks); set before vLLM is imported.
ENGINE_ENV = {
    # apply_model ships linear_kernels to the engine's worker; vLLM refuses pickled callables without this.
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    # vLLM logs to stdout by default; stdout is the stages' JSON result, so its logs go to stderr.
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
    # Prompt scoring samples one token it throws away and greedy generation samples nothing FlashInfer's
    # sampler is needed for: its JIT (~110 s on a fresh cache) would only add to the start.
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
}
# Prompt scoring only: the engine core in this process, so that its start-up log lines (weights, compile, KV
# cache) can be timed here and no spawned process outlives a killed stage; scoring has no server loop to
# overlap with. lm-eval's generation keeps vLLM's default (a separate core overlaps scheduling with the GPU).
SCORING_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# lm-eval's engine core is a separate process, forked by default. Building an NVFP4 engine with the emulation
# backend touches CUDA in this process first, and a forked child then cannot use CUDA ("Cannot re-initialize
# CUDA in forked subprocess", seen on the H200): spawned, it starts clean (jobs/__main__.py is guarded).
GENERATION_ENV = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


@dataclass(frozen=True)
class EngineSpec:
    """What one vLLM engine is built with: ``LLM(**kwargs)`` under ``env``, and why eager or compiled."""

    kwargs: dict
    env: dict
    compile_reason: str

    def apply_env(self) -> None:
        for key, value in self.env.items():
            os.environ.setdefault(key, value)  # a value the user set wins


def engine_spec(path: Path, options: EngineOptions, arith: arith_mod.Arithmetic, *, scoring: bool,
                expected_tokens: int | None = None, extra: dict | None = None) -> EngineSpec:
    """The one builder of vLLM engine settings (pure): prompt scoring (score, validate; ``scoring``) or lm-eval's
    tasks. ``extra``: the user's --engine-kwargs, passed through last (they win)."""
    if options.enforce_eager is not None:
        eager, why = options.enforce_eager, "asked for (--enforce-eager / --no-enforce-eager)"
    elif not scoring:
        # generation (gsm8k) is decode-bound: compiled, with CUDA graphs, pays off
        eager, why = False, "lm-eval's tasks generate: compiled, with CUDA graphs"
    elif expected_tokens is not None and expected_tokens >= COMPILE_MIN_TOKENS:
        eager, why = False, f"{expected_tokens:,} tokens to score >= {COMPILE_MIN_TOKENS:,}: compiling pays off"
    else:
        eager, why = True, (f"{expected_tokens:,} tokens to score < {COMPILE_MIN_TOKENS:,}: compiling would cost "
                            "more than it saves" if expected_tokens is not None else "a small workload")
    kwargs = dict(model=str(path), dtype=options.dtype or "auto", max_model_len=options.max_model_len,
                  gpu_memory_utilization=options.gpu_memory_utilization,
                  tensor_parallel_size=options.tensor_parallel_size, enforce_eager=eager,
                  enable_prefix_caching=False)  # cached prefixes get no prompt logprobs (lm-eval reads them too)
    if scoring and not eager:
        # Scoring steps are prefills of thousands of tokens; CUDA graphs only serve steps of up to a few
        # hundred, so capturing them is start-up time spent for nothing.
        kwargs["compilation_config"] = {"cudagraph_mode": "NONE"}
    if scoring and not any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        kwargs["skip_tokenizer_init"] = True  # scoring takes token ids; a bare checkpoint needs no tokenizer
    if options.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = options.max_num_batched_tokens
    if options.kv_cache_memory_bytes:  # sized by slots: no profile that a neighbour on the GPU could disturb
        kwargs["kv_cache_memory_bytes"] = options.kv_cache_memory_bytes
    if options.quantization:
        kwargs["quantization"] = options.quantization
    if options.max_logprobs and options.max_logprobs > 20:  # vLLM refuses more prompt logprobs than max_logprobs (20)
        kwargs["max_logprobs"] = options.max_logprobs
    if options.load_format:  # "dummy": random weights from the config alone (bench/, never for results)
        kwargs["load_format"] = options.load_format
    kwargs.update(extra or {})
    if arith.vllm_linear_backend != "auto":  # NVFP4 as declared (emulated W4A4 off Blackwell), or Marlin
        kwargs["linear_backend"] = arith.vllm_linear_backend
    return EngineSpec(kwargs, {**ENGINE_ENV, **(SCORING_ENV if scoring else GENERATION_ENV)}, why)


def gpu_capability() -> float | None:
    """The first GPU's compute capability, read through NVML by vLLM's platform (no CUDA context)."""
    # Importing vLLM configures its logging from the environment once: without ENGINE_ENV first, its logs
    # would go to stdout, where the stages print their JSON result.
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        from vllm.platforms import current_platform

        cap = current_platform.get_device_capability()
        return None if cap is None else cap.major + cap.minor / 10
    except Exception:  # no GPU or no NVML: vLLM's own start will say what is wrong
        return None


# -- the engine --------------------------------------------------------------------------------------------
class VllmBackend:
    name = "vllm"

    def __init__(self, path, options: EngineOptions, *, arithmetic: arith_mod.Arithmetic,
                 expected_tokens: int | None = None):
        self.path = Path(path)
        self.arithmetic = arithmetic
        spec = engine_spec(self.path, options, arithmetic, scoring=True, expected_tokens=expected_tokens)
        spec.apply_env()
        t_import = time.perf_counter()
        from vllm import LLM  # timed: the first import of vLLM is a large part of a job's fixed cost

        import_s = round(time.perf_counter() - t_import, 2)
        self.kwargs = kwargs = spec.kwargs
        self.compile_reason = spec.compile_reason
        capture = _Capture()
        vllm_logger = logging.getLogger("vllm")
        level = vllm_logger.level
        if vllm_logger.getEffectiveLevel() > logging.INFO:
            vllm_logger.setLevel(logging.INFO)  # the start-up lines are INFO records
        vllm_logger.addHandler(capture)
        t0 = time.perf_counter()
        try:
            self.llm = LLM(**kwargs)
        except ValueError as exc:  # e.g. no kernel of the asked linear backend for this checkpoint
            if "linear-backend" in str(exc) or "linear_backend" in str(exc):
                raise ScoreError(f"{self.path}: vLLM cannot compute {self.arithmetic.label} for this checkpoint "
                                 f"({str(exc).splitlines()[0][:200]})") from None
            raise
        finally:
            vllm_logger.removeHandler(capture)
            vllm_logger.setLevel(level)
        self.start = {"engine_start_s": round(time.perf_counter() - t0, 2), "import_s": import_s,
                      **parse_start_log(capture.lines)}
        self._kernels: dict[str, int] | None = None
        problem = arith_mod.kernel_problem(self.arithmetic, self.kernels())
        if problem:
            self.close()
            raise ScoreError(f"{self.path}: {problem}; vLLM did not compute the arithmetic asked for")
        log.info("engine started in %.1f s %s (%s; %s)", self.start["engine_start_s"],
                 {k: v for k, v in self.start.items() if k != "engine_start_s"},
                 "eager" if kwargs["enforce_eager"] else "compiled", self.compile_reason)

    @classmethod
    def from_llm(cls, llm, spec: EngineSpec, arithmetic: arith_mod.Arithmetic):
        """Wrap an engine built elsewhere (lm-eval's VLLM model, by the tasks stage) from ``spec``: it
        describes itself (kernel path) and shuts down like one built here."""
        kwargs = spec.kwargs
        self = cls.__new__(cls)
        self.kwargs, self.llm, self._kernels = {"tensor_parallel_size": 1, **kwargs}, llm, None
        self.arithmetic, self.compile_reason, self.start = arithmetic, spec.compile_reason, {}
        problem = arith_mod.kernel_problem(arithmetic, self.kernels())
        if problem:
            raise ScoreError(f"{kwargs.get('model')}: {problem}; vLLM did not compute the arithmetic asked for")
        return self

    def _run(self, prompts: list, params) -> Iterator[tuple[int, object]]:
        """Submit every prompt at once (the engine schedules them); yield (index, output) as each finishes."""
        ids = self.llm.enqueue(prompts, params, use_tqdm=False)
        # enqueue returns the engine's internal ids ("7-1a2b3c4d"); outputs carry the caller's ("7").
        index = {}
        for i, r in enumerate(ids):
            index[str(r)] = index[str(r).rsplit("-", 1)[0]] = i
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    yield index[str(out.request_id)], out

    def score(self, samples: Sequence[Sample], topk: int = 1) -> Iterator[SequenceScores]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=max(topk, 1), detokenize=False, flat_logprobs=True)
        prompts = [TokensPrompt(prompt_token_ids=list(s.token_ids)) for s in samples]
        pending: dict[int, SequenceScores] = {}
        next_out = 0
        for i, out in self._run(prompts, params):
            pending[i] = parse_prompt_logprobs(samples[i], out.prompt_logprobs, topk)
            while next_out in pending:  # in input order, so parts can be written as results stream in
                yield pending.pop(next_out)
                next_out += 1

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, logprobs=1)
        outs = self.llm.generate(list(prompts), params, use_tqdm=False)
        gens = []
        for prompt, out in zip(prompts, outs):
            c = out.outputs[0]
            lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], c.token_ids)]
            gens.append(Generation(prompt, c.text, list(c.token_ids), lps))
        return gens

    def kernels(self) -> dict[str, int]:
        if self._kernels is None:
            try:
                per_worker = self.llm.apply_model(linear_kernels)
                self._kernels = per_worker[0] if per_worker else {}
            except Exception as exc:  # introspection is provenance, never a reason to fail a run
                log.warning("could not inspect the loaded model's kernels: %s", exc)
                self._kernels = {}
        return self._kernels

    def describe(self) -> dict:
        import torch
        import vllm

        props = torch.cuda.get_device_properties(0)
        cc = f"{props.major}.{props.minor}"
        cfg = self.llm.llm_engine.model_config
        return runtime_info("vllm", vllm.__version__, cfg.dtype, "cuda", describe_kernels(self.kernels(), cc),
                            quantization=cfg.quantization, gpu_count=self.kwargs["tensor_parallel_size"],
                            arithmetic=self.arithmetic.label, nvfp4_compute=self.arithmetic.recorded_mode,
                            engine={k: v for k, v in self.kwargs.items() if k != "model"},
                            compile_reason=self.compile_reason, engine_start=self.start)

    def close(self) -> None:
        """Stop the engine core before interpreter exit, so no 'EngineCore died' noise or stray process."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:
            log.debug("engine shutdown: %s", exc)
        del self.llm
        gc.collect()
