"""Quantize stage: llm-compressor ``oneshot`` on a Hugging Face model, saved compressed with a manifest.

The output directory appears only when complete (saved under a temporary name, then renamed), and
carries ``qscore.json``: the recipe, the scheme, the calibration data and sizes, versions, time, memory.
One run at a time writes an output: a second stops with an error naming the first (``jobs.core.locks``).
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from jobs.core import atomic, hub, locks, progress, provenance
from jobs.texts import evalsets
from jobs.checkpoints import batching, recipes
from jobs.core.errors import QuantizeError
from jobs.core.settings import QuantizeSettings

log = logging.getLogger("qscore.quantize")
MANIFEST = "qscore.json"


def calibration_rows(source: str, split: str):
    """The calibration set's rows, read before the model is loaded: a bad file fails in seconds."""
    rows = evalsets.load_rows(source, None, split)
    if "messages" not in rows.column_names and "text" not in rows.column_names:
        raise QuantizeError(f"calibration set {source!r} needs a 'messages' or 'text' column")
    return rows


def calibration_set(source: str, split: str, n: int, max_len: int, tokenizer, seed: int = 42, rows=None):
    """``n`` chats rendered through the model's chat template, tokenized to at most ``max_len`` tokens."""
    from datasets import Dataset

    rows = calibration_rows(source, split) if rows is None else rows
    if "messages" not in rows.column_names and "text" not in rows.column_names:
        raise QuantizeError(f"calibration set {source!r} needs a 'messages' or 'text' column")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    texts = []
    for i in order:
        row = rows[i]
        if row.get("messages"):
            if not getattr(tokenizer, "chat_template", None):
                raise QuantizeError("the tokenizer has no chat template to render calibration chats with")
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif (row.get("text") or "").strip():
            texts.append(row["text"])
        if len(texts) >= n:
            break
    if not texts:
        raise QuantizeError(f"calibration set {source!r} split {split!r} has no usable rows")
    if len(texts) < n:
        log.warning("calibration set has %d usable rows, fewer than the %d asked for", len(texts), n)
    enc = [tokenizer(t, max_length=max_len, truncation=True, add_special_tokens=False) for t in texts]
    return Dataset.from_list([{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in enc]), len(texts)


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def choose_pipeline(asked: str, *, cuda_bytes: int | None, weight_bytes: int, samples: int, seq_len: int,
                    hidden: int) -> tuple[str, str, str]:
    """(pipeline, offload device, why) for llm-compressor's calibration (pure).

    llm-compressor's default, ``sequential``, calibrates one decoder layer at a time over every sample, then
    runs the layer again to pass its outputs on (measured on an H100, 14B shape, 1024 x 2048 tokens: 31 s
    per layer, ~21 min). ``basic`` runs the whole model once per sample: no layer-by-layer onloading and no
    second pass, so the model must fit on the GPU. Both calibrate with quantization disabled
    (llmcompressor/pipelines/*/pipeline.py, ``DisableQuantization``), and the QuantizationModifier changes
    no weight while calibrating, so they observe the same activations and write the same checkpoint: on
    the demo's model the two wrote identical bytes (docs/quantize.md). For the same reason the sequential
    pipeline's propagation pass is skipped (``propagate_error=False``): it would recompute the outputs
    the calibration pass already produced.
    """
    act_bytes = samples * seq_len * max(hidden, 1) * 2
    if asked in ("basic", "sequential"):
        pipeline, why = asked, "asked for (--pipeline)"
    elif cuda_bytes and weight_bytes <= 0.7 * cuda_bytes:
        pipeline, why = "basic", f"the model ({weight_bytes / 2**30:.1f} GiB) fits on the GPU: one pass, no onloading"
    else:
        pipeline, why = "sequential", ("no GPU: llm-compressor's default" if not cuda_bytes else
                                       f"the model ({weight_bytes / 2**30:.1f} GiB) does not fit on the GPU")
    offload = "cpu"
    if pipeline == "sequential" and cuda_bytes and weight_bytes / 40 + act_bytes <= 0.5 * cuda_bytes:
        offload = "cuda"  # the layer inputs of every sample stay on the GPU between layers
    return pipeline, offload, why


def run(*, settings: QuantizeSettings) -> Path:
    recipes.check_scheme(settings.scheme)
    progress.quiet_third_party()
    with locks.hold(settings.output, what="checkpoint"):  # before the output's existence is looked at
        return _run(settings)


def _run(s: QuantizeSettings) -> Path:
    scheme = recipes.check_scheme(s.scheme)
    out = Path(s.output)
    if out.exists() and not s.overwrite:
        raise QuantizeError(f"output {out} already exists: pass --overwrite to replace it")
    if s.num_calibration_samples < 1 or s.max_sequence_length < 16:
        raise QuantizeError("--num-calibration-samples must be >= 1 and --max-sequence-length >= 16")
    if s.calibration_batch_size < 1:
        raise QuantizeError("--calibration-batch-size must be at least 1")
    model_path = hub.resolve(s.model_id, "model")
    calibrate = recipes.needs_calibration(scheme, s.no_calibration)
    rows = None
    if calibrate:
        evalsets.check_local_source(s.calibration_dataset, "calibration")
        rows = calibration_rows(s.calibration_dataset, s.calibration_split)
    t0 = time.time()

    import torch
    from llmcompressor import oneshot
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cuda_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    try:
        config = AutoConfig.from_pretrained(model_path)
        hidden = getattr(config.get_text_config(), "hidden_size", 0) or 0
    except Exception as exc:
        raise hub.CheckpointError(f"{s.model_id}: cannot read its config ({type(exc).__name__})") from None
    pipeline, offload, why = choose_pipeline(
        s.pipeline if calibrate else "sequential", cuda_bytes=cuda_bytes, weight_bytes=weights_bytes(model_path),
        samples=s.num_calibration_samples, seq_len=s.max_sequence_length, hidden=hidden)
    if s.offload != "auto":
        offload = s.offload
    try:
        load_kw = {"device_map": "cuda"} if pipeline == "basic" and cuda_bytes else {}
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", **load_kw)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as exc:
        raise hub.CheckpointError(f"{s.model_id}: cannot load the model ({type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:200]})") from None
    t_load = time.time()
    dataset, n_used = (None, 0)
    if calibrate:
        dataset, n_used = calibration_set(s.calibration_dataset, s.calibration_split, s.num_calibration_samples,
                                          s.max_sequence_length, tokenizer, seed=s.calibration_seed, rows=rows)
    recipe = recipes.build(scheme, list(s.ignore), s.spinquant)
    kwargs, lengths = {}, []
    if calibrate:
        # SpinQuant's rotations are data-free: llm-compressor's "independent" pipeline runs them apart
        # from the sequential calibration, which an explicit "sequential" would merge.
        arg = "independent" if s.spinquant and pipeline == "sequential" else pipeline
        pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        loader, lengths = batching.loader(dataset, s.calibration_batch_size, pad_id)
        kwargs = {"dataset": loader, "pipeline": arg}
        if pipeline == "sequential":
            kwargs.update(sequential_offload_device=offload, propagate_error=False)
        log.info("calibration: %s pipeline (%s), activations offloaded to %s, batch size %d", pipeline, why,
                 offload if pipeline == "sequential" else "-", s.calibration_batch_size)
    # what the calibration forwards run: the model's own attention in the basic pipeline, else llm-compressor's eager
    attention = (model.config._attn_implementation if pipeline == "basic" else "eager") if calibrate else None
    t_data = time.time()
    try:
        # the sequential pipeline traces each layer and needs llm-compressor's eager attention
        with batching.padding_hidden(model, lengths), batching.model_attention(calibrate and pipeline == "basic"):
            oneshot(model=model, recipe=recipe, **kwargs)
    except ValueError as exc:  # llm-compressor's own checks of the model against the scheme
        # The whole message in the log (a group-size error lists the layers after its first line), the
        # first line as the stage's one-line error.
        log.error("llm-compressor refused the model:\n%s", str(exc).strip(), exc_info=log.isEnabledFor(logging.DEBUG))
        raise QuantizeError(f"llm-compressor: {(str(exc).splitlines() or [''])[0][:400]}") from None
    t_calib = time.time()

    print(f"Saving compressed model to: {out}", flush=True)
    with atomic.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
        recipe_yaml = (tmp / "recipe.yaml").read_text() if (tmp / "recipe.yaml").exists() else None
        manifest = {
            "scheme": scheme,
            "model_id": s.model_id,
            "model_path": str(model_path),
            "recipe": recipe_yaml,
            "spinquant": s.spinquant,
            "ignore": list(s.ignore),
            # a local file has no splits: its rows are read whole
            "calibration": {"dataset": s.calibration_dataset, "samples": n_used,
                            "split": None if Path(s.calibration_dataset).expanduser().exists() else s.calibration_split,
                            "samples_requested": s.num_calibration_samples, "seed": s.calibration_seed,
                            "max_sequence_length": s.max_sequence_length, "rendering": "chat template",
                            "pipeline": pipeline, "pipeline_reason": why, "attention": attention,
                            "batch_size": s.calibration_batch_size,
                            "batches": len(lengths), "padding_tokens": sum(max(b) - x for b in lengths for x in b),
                            "sequential_offload_device": offload if pipeline == "sequential" else None}
            if calibrate else None,
            "versions": provenance.versions("llmcompressor", "compressed-tensors", "transformers", "torch"),
            "wall_time_s": round(time.time() - t0, 2),
            "phases_s": {"load_model": round(t_load - t0, 2), "prepare_data": round(t_data - t_load, 2),
                         "calibrate_and_quantize": round(t_calib - t_data, 2),
                         "save": round(time.time() - t_calib, 2)},
            "peak_rss_gib": round(provenance.peak_rss_gib(), 3),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
            **provenance.gpu_info(),
            "host": provenance.host(),
            "command": provenance.command_line(),
            "created": provenance.now(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print("Done.", flush=True)
    return out
