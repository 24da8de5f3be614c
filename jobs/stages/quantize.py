"""Quantize stage: llm-compressor ``oneshot`` on a Hugging Face model, saved compressed with a manifest.

The output directory appears only when complete (saved under a temporary name, then renamed), and
carries ``qscore.json``: the recipe, the scheme, the calibration data and sizes, versions, time, memory.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from .. import atomic, evalsets, hub, provenance, recipes
from ..errors import QuantizeError

log = logging.getLogger("qscore.quantize")
MANIFEST = "qscore.json"


def calibration_set(source: str, split: str, n: int, max_len: int, tokenizer, seed: int = 42):
    """``n`` chats rendered through the model's chat template, tokenized to at most ``max_len`` tokens."""
    from datasets import Dataset

    rows = evalsets.load_rows(source, None, split)
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


def run(model_id: str, output: str, scheme: str, calibration_dataset: str, calibration_split: str,
        num_samples: int, max_seq_len: int, no_calibration: bool, spinquant: bool, ignore: list[str],
        overwrite: bool) -> Path:
    scheme = recipes.check_scheme(scheme)
    out = Path(output)
    if out.exists() and not overwrite:
        raise QuantizeError(f"output {out} already exists: pass --overwrite to replace it")
    if num_samples < 1 or max_seq_len < 16:
        raise QuantizeError("--num-calibration-samples must be >= 1 and --max-sequence-length >= 16")
    model_path = hub.resolve(model_id, "model")
    t0 = time.time()

    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as exc:
        raise hub.CheckpointError(f"{model_id}: cannot load the model ({type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:200]})") from None
    calibrate = recipes.needs_calibration(scheme, no_calibration)
    dataset, n_used = (None, 0)
    if calibrate:
        dataset, n_used = calibration_set(calibration_dataset, calibration_split, num_samples, max_seq_len, tokenizer)
    recipe = recipes.build(scheme, ignore, spinquant)
    kwargs = {"dataset": dataset, "num_calibration_samples": n_used, "max_seq_length": max_seq_len} if calibrate else {}
    oneshot(model=model, recipe=recipe, **kwargs)

    print(f"Saving compressed model to: {out}", flush=True)
    with atomic.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
        recipe_yaml = (tmp / "recipe.yaml").read_text() if (tmp / "recipe.yaml").exists() else None
        manifest = {
            "scheme": scheme,
            "model_id": model_id,
            "model_path": str(model_path),
            "recipe": recipe_yaml,
            "spinquant": spinquant,
            "ignore": ignore,
            "calibration": {"dataset": calibration_dataset, "split": calibration_split, "samples": n_used,
                            "samples_requested": num_samples, "max_sequence_length": max_seq_len,
                            "rendering": "chat template"} if calibrate else None,
            "versions": provenance.versions("llmcompressor", "compressed-tensors", "transformers", "torch"),
            "wall_time_s": round(time.time() - t0, 2),
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
