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
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..sampling import Sample
from ..schema import SequenceScores
from .base import Generation, runtime_info

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


# -- the engine --------------------------------------------------------------------------------------------
class VllmBackend:
    name = "vllm"

    def __init__(self, model_path, dtype: str = "auto", max_model_len: int = 2048,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1, enforce_eager: bool = False,
                 max_num_batched_tokens: int | None = None, quantization: str | None = None,
                 load_format: str | None = None, max_logprobs: int | None = None, **_ignored):
        # apply_model ships a function to the engine's worker; vLLM refuses pickled callables without this.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        # vLLM logs to stdout by default; stdout is the stages' JSON result, so its logs go to stderr.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from vllm import LLM

        kwargs = dict(model=str(model_path), dtype=dtype or "auto", max_model_len=max_model_len,
                      gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                      enforce_eager=enforce_eager, enable_prefix_caching=False)  # cached prefixes get no prompt logprobs
        if not any((Path(model_path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            kwargs["skip_tokenizer_init"] = True  # scoring takes token ids; a bare checkpoint needs no tokenizer
        if max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = max_num_batched_tokens
        if quantization:
            kwargs["quantization"] = quantization
        if max_logprobs and max_logprobs > 20:  # vLLM refuses more prompt logprobs than max_logprobs (20)
            kwargs["max_logprobs"] = max_logprobs
        if load_format:  # "dummy": random weights from the config alone (bench/, never for results)
            kwargs["load_format"] = load_format
        self.kwargs = kwargs
        self.llm = LLM(**kwargs)
        self._kernels: dict[str, int] | None = None

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
                            engine={k: v for k, v in self.kwargs.items() if k != "model"})

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
