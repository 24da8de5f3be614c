"""Validate stage: the checkpoint loads, is quantized as its config claims, predicts plain text well
below a uniform guess, and generates finite, non-empty text."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from jobs import engines
from jobs.core import hub, progress
from jobs.checkpoints import quantcheck
from jobs.texts import sampling
from jobs.archive import logprobs
from jobs.checkpoints.checkpoint import check_max_model_len, inspect
from jobs.core.errors import ValidationError
from jobs.core.settings import Nvfp4Compute, ValidateSettings

log = logging.getLogger("qscore.validate")

PROMPTS = [
    [{"role": "user", "content": "Write one sentence about rivers."}],
    [{"role": "user", "content": "What is the capital of a small coastal town?"}],
    [{"role": "user", "content": "Give me a short list of three colours."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain in a few words what a ship is."}],
]
# Plain encyclopedic English: any language model predicts it, and so does the demo's tiny model, which was
# trained on this register only (on a sentence of another register it does worse than a uniform guess).
PROBE_TEXT = ("The town had a population of 15,210 at the 2001 census. The railway reached the town in 1867, and "
              "the parish church dates largely from the 14th century.")
# A model that guesses uniformly scores ln(vocabulary) per token (a random-weight one about the same); the
# probe must be well below: the tiny model scores 0.42 of ln(1024), an untrained one 1.0.
SANE_NLL_FRACTION = 0.6


def check_sane(nll: float, vocab_size: int | None, where) -> None:
    """Raise unless the probe's NLL is well below a uniform guess's ln(vocabulary) (pure)."""
    if not vocab_size:
        return
    uniform = math.log(vocab_size)
    if not nll <= SANE_NLL_FRACTION * uniform:
        raise ValidationError(
            f"{where}: probe NLL {nll:.2f} is not well below ln(vocabulary {vocab_size}) = {uniform:.2f}, a uniform "
            f"guess (limit {SANE_NLL_FRACTION} of it, {SANE_NLL_FRACTION * uniform:.2f}): the model does not "
            "predict plain text (untrained or broken weights?)")


def quality_gate(engine, baseline_dir: Path, max_increase: float, n_texts: int) -> dict:
    """Score the baseline's own token ids for its first texts and compare NLL on exactly those."""
    table, meta = logprobs.read_dataset(baseline_dir, ["sample_id", "position", "token_id", "logprob"])
    sid = table.column("sample_id").to_numpy()
    keep_ids = list(dict.fromkeys(sid.tolist()))[:n_texts]
    mask = np.isin(sid, keep_ids)
    tok = table.column("token_id").to_numpy()[mask]
    lp_base = table.column("logprob").to_numpy(zero_copy_only=False)[mask]
    sid_m = sid[mask]
    samples = [sampling.Sample(int(s), tuple(int(t) for t in tok[sid_m == s]), False) for s in keep_ids]
    lps = np.concatenate([seq.logprob[1:] for seq in engine.score(samples)])
    base = lp_base[~np.isnan(lp_base)]
    nll_b, nll_m = float(-base.mean()), float(-lps.mean())
    result = {"texts": len(samples), "tokens": int(len(lps)), "baseline_nll": nll_b, "nll": nll_m,
              "delta_nll": nll_m - nll_b, "max_nll_increase": max_increase}
    if nll_m - nll_b > max_increase:
        raise ValidationError(
            f"quality gate: NLL {nll_m:.4f} is {nll_m - nll_b:+.4f} above the baseline's {nll_b:.4f} on "
            f"{len(samples)} texts of {baseline_dir} (allowed {max_increase})"
        )
    return result


def run(*, settings: ValidateSettings) -> dict:
    s = settings
    progress.quiet_third_party()
    path = hub.resolve(s.model, "model")
    ckpt = inspect(path)
    check_max_model_len(ckpt, s.engine.max_model_len)
    problems = quantcheck.check(ckpt.tensors, ckpt.quant, s.expect_scheme)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValidationError(f"{path}: not quantized as its config claims: {problems[0]}{more}")
    log.info("layout matches the config: %s (%s, group %s, ignore %s)", ckpt.quant.scheme,
             ckpt.quant.format, ckpt.quant.group_size, ckpt.quant.ignore)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "chat_template", None):
        raise ValidationError(f"{path}: the tokenizer has no chat template")
    prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in PROMPTS]
    # The quality gate judges the arithmetic the checkpoint declares (W4A4 for NVFP4), whatever a
    # score run may have been asked to compute.
    options = s.engine.replace(nvfp4_compute=Nvfp4Compute.DECLARED)
    arith = engines.arithmetic_for(s.backend, ckpt.quant, options)
    engine = engines.load(s.backend, ckpt, options, arithmetic=arith)
    report = {"model": str(path), "scheme": ckpt.quant.scheme, "backend": engine.describe()}
    try:
        probe = sampling.Sample(0, tuple(tok(PROBE_TEXT)["input_ids"]), False)
        (seq,) = list(engine.score([probe]))
        if not np.all(np.isfinite(seq.logprob[1:])):
            raise ValidationError(f"{path}: non-finite logprobs on a plain sentence (broken weights?)")
        report["probe_nll"] = float(-np.mean(seq.logprob[1:]))
        vocab = ckpt.config.get("vocab_size") or ckpt.config.get("text_config", {}).get("vocab_size")
        check_sane(report["probe_nll"], vocab, path)
        gens = engine.generate(prompts, s.max_new_tokens)
        for g in gens:
            if not g.text.strip():
                raise ValidationError(f"{path}: empty generation for prompt {g.prompt[-60:]!r}")
            if not all(math.isfinite(x) for x in g.logprobs):
                raise ValidationError(f"{path}: non-finite logprobs while generating")
            log.info("generated: %r", g.text[:120])
        report["generations"] = [g.text for g in gens]
        if s.baseline_logprobs:
            report["quality_gate"] = quality_gate(engine, Path(s.baseline_logprobs), s.max_nll_increase, s.gate_texts)
    finally:
        engine.close()
    if s.baseline_tasks:  # lm-eval builds its own model, so only after this one is gone
        from jobs.stages.tasks import quality_gate as task_gate

        report["task_gate"] = task_gate(ckpt=ckpt, baseline=s.baseline_tasks, recovery_min=s.recovery_min,
                                        backend=s.backend, options=options, arithmetic=arith)
    return report
