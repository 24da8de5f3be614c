"""Score stage: one model, one or more evaluation sets, per-token logprobs to the Parquet archive.

Each (model, set) is written in parts of ``part_size`` texts into a hidden staging directory
``model=L/.dataset=D.partial/``; when the last part lands the directory is renamed to ``dataset=D``.
A run that is killed resumes from its last complete part; a finished dataset is skipped when asked
for again with the same inputs, and refused (unless --overwrite) when the inputs differ.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import atomic, backends, evalsets, hub, provenance, rolling, sampling, schema
from ..checkpoint import inspect, tokenizer_hash
from ..errors import ScoreError

log = logging.getLogger("qscore.score")
STAGING_SUFFIX = ".partial"
PROGRESS = "_progress.json"


@dataclass
class Plan:
    name: str
    samples: list[sampling.Sample]
    evalset: evalsets.EvalSet
    final: Path
    staging: Path
    fingerprint: str
    done_parts: int = 0
    skip: bool = False
    rolling: tuple[int, int] | None = None  # (window, stride): a document-level set, scored in rolling windows


def staging_dir(final: Path) -> Path:
    # A leading dot keeps Hive readers (pyarrow, DuckDB, pandas) from picking up unfinished work.
    return final.with_name(f".{final.name}{STAGING_SUFFIX}")


def n_parts(n_samples: int, part_size: int) -> int:
    return (n_samples + part_size - 1) // part_size


def fingerprint(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def token_digest(samples: list[sampling.Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.sample_id}:{','.join(map(str, s.token_ids))};".encode())
    return h.hexdigest()


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    path = hub.resolve(ref, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise hub.CheckpointError(f"tokenizer {ref!r}: cannot load ({type(exc).__name__})") from None
    return tok, path


def plan_dataset(name, evalset, tok, max_model_len, results_dir, label, common, overwrite, part_size,
                 doc_stride: int = 0) -> Plan:
    roll = None
    if evalset.source.get("kind") == "document":
        samples, roll = document_samples(evalset, tok, max_model_len, doc_stride)
    else:
        ids = sampling.tokenize(evalset.texts, sampling.hf_encoder(tok))
        samples = sampling.select(ids, max_model_len)
    if not samples:
        raise ScoreError(
            f"evaluation set {name!r} is empty after filtering ({len(evalset.texts)} texts, none with "
            f"at least {sampling.MIN_TOKENS} tokens)"
        )
    fp = fingerprint({**common, "dataset": evalset.source, "tokens": token_digest(samples), "part_size": part_size,
                      **({"rolling": roll} if roll else {})})
    final = schema.dataset_dir(results_dir, label, name)
    plan = Plan(name, samples, evalset, final, staging_dir(final), fp, rolling=roll)
    if final.exists():
        parts = schema.part_files(final)
        old = schema.read_metadata(parts[0]).get("fingerprint") if parts else None
        if old == fp and not overwrite:
            plan.skip = True
            return plan
        if not overwrite:
            raise ScoreError(
                f"{final} already holds a run with other settings (fingerprint {old} != {fp}); "
                "pass --overwrite to replace it, or use another --label"
            )
    if plan.staging.exists():
        progress = plan.staging / PROGRESS
        old = json.loads(progress.read_text()).get("fingerprint") if progress.exists() else None
        if old != fp:  # an interrupted run of the same inputs is always resumed, --overwrite or not
            if not overwrite:
                raise ScoreError(
                    f"{plan.staging} holds an interrupted run with other settings; pass --overwrite "
                    "to discard it"
                )
            shutil.rmtree(plan.staging)
    if plan.staging.exists():
        for stale in plan.staging.glob(".part-*.tmp-*"):
            stale.unlink()  # a temporary file of a killed run: never renamed, so never complete
        done = len(schema.part_files(plan.staging))
        plan.done_parts = done
    return plan


def document_samples(evalset, tok, max_model_len: int, doc_stride: int):
    """lm-eval's rolling loglikelihood inputs: each document tokenized without special tokens, after one
    prefix token (BOS, else EOS), cut into windows of max_model_len - 8 tokens."""
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if prefix is None:
        raise ScoreError(f"{evalset.name}: the tokenizer has neither a BOS nor an EOS token to start a document")
    # whole documents are longer than the model: no truncation warning, they are scored in windows
    ids = [tok(t, add_special_tokens=False, verbose=False)["input_ids"] for t in evalset.texts]
    window = sampling.max_tokens(max_model_len)
    sampling.rolling_windows(2, window, doc_stride)  # a bad stride fails here, before any model is loaded
    evalset.source["rolling"] = {"window": window, "stride": doc_stride or window - 1, "prefix_token": int(prefix)}
    return sampling.documents(ids, prefix), (window, doc_stride or window - 1)


def finish(plan: Plan) -> None:
    """Move the completed staging directory into place; an older dataset goes only after that."""
    old = None
    if plan.final.exists():
        old = plan.final.with_name(f".{plan.final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        plan.final.rename(old)
    (plan.staging / PROGRESS).unlink(missing_ok=True)
    plan.staging.rename(plan.final)
    if old is not None:
        shutil.rmtree(old)


def run(model: str, label: str, datasets: str, tokenizer: str | None, max_model_len: int,
        backend: str, topk: int, results_dir: str, dtype: str, part_size: int, overwrite: bool,
        limits: dict, engine_options: dict, doc_stride: int = 0) -> list[Path]:
    schema.check_label("model label", label)
    if topk < 1:
        raise ScoreError("--topk must be at least 1")
    if part_size < 1:
        raise ScoreError("--part-size must be at least 1")
    specs = evalsets.parse_specs(datasets)
    sampling.max_tokens(max_model_len)
    model_path = hub.resolve(model, "model")
    ckpt = inspect(model_path)
    tok, tok_path = load_tokenizer(tokenizer or model)
    backend_name = backends.pick(backend)
    common = {
        "schema": schema.SCHEMA_VERSION, "model_hash": ckpt.content_hash,
        "tokenizer_hash": tokenizer_hash(tok_path), "max_model_len": max_model_len, "topk": topk,
        "backend": backend_name, "dtype": dtype,
    }
    plans = []
    for name, path in specs:
        evalset = evalsets.load_set(name, path, limits)
        plans.append(plan_dataset(name, evalset, tok, max_model_len, results_dir, label, common, overwrite, part_size,
                                  doc_stride))
    vocab = ckpt.config.get("vocab_size") or ckpt.config.get("text_config", {}).get("vocab_size")
    for p in plans:
        top = max(max(s.token_ids) for s in p.samples)
        if vocab and top >= vocab:
            raise ScoreError(
                f"tokenizer {tokenizer or model!r} produces id {top} but the model's vocabulary has "
                f"{vocab}: score every model of a comparison with a tokenizer it shares"
            )
    todo = [p for p in plans if not p.skip]
    for p in plans:
        if p.skip:
            log.info("%s: already scored with the same inputs, skipped (%s)", p.final, p.fingerprint)
    if not todo:
        return [p.final for p in plans]

    # Batches never straddle a part boundary, so a resumed run computes each part exactly as an
    # uninterrupted one would (same batch shapes, same floating-point results).
    engine = backends.load(backend_name, model_path, dtype=dtype, max_model_len=max_model_len,
                           window=part_size, max_logprobs=topk, **engine_options)
    try:
        info = engine.describe()
        for p in todo:
            write_dataset(p, engine, info, ckpt, model, model_path, label, tokenizer or model, tok_path,
                          common, max_model_len, topk, part_size)
    finally:
        engine.close()
    return [p.final for p in plans]


def write_dataset(plan: Plan, engine, info, ckpt, model_ref, model_path, label, tok_ref, tok_path,
                  common, max_model_len, topk, part_size) -> None:
    from tqdm import tqdm

    plan.staging.mkdir(parents=True, exist_ok=True)
    atomic.write_text(plan.staging / PROGRESS, json.dumps({"fingerprint": plan.fingerprint}))
    total_parts = n_parts(len(plan.samples), part_size)
    start = plan.done_parts * part_size
    if plan.done_parts:
        log.info("%s: resuming after %d of %d parts", plan.name, plan.done_parts, total_parts)
    rows_total = sum(len(s.token_ids) for s in plan.samples)
    q = ckpt.quant
    base_meta = {
        "schema_version": schema.SCHEMA_VERSION,
        "fingerprint": plan.fingerprint,
        "model": {"label": label, "ref": model_ref, "path": str(model_path), "content_hash": ckpt.content_hash,
                  "architecture": ckpt.architecture},
        "quantization": {"method": q.method, "format": q.format, "scheme": q.scheme,
                         "group_size": q.group_size, "ignore": q.ignore},
        "tokenizer": {"name": tok_ref, "path": str(tok_path), "hash": common["tokenizer_hash"]},
        "dataset": {"name": plan.name, **plan.evalset.source},
        "sampling": {"max_model_len": max_model_len, "max_tokens": sampling.max_tokens(max_model_len),
                     "min_tokens": sampling.MIN_TOKENS, "topk": topk, "part_size": part_size,
                     "truncated_texts": sum(s.truncated for s in plan.samples)},
        "runtime": {**info, **provenance.versions("vllm", "transformers", "torch", "compressed-tensors")},
        "counts": {"rows_total": rows_total, "texts_total": len(plan.samples),
                   "texts_in_set": len(plan.evalset.texts), "parts_total": total_parts},
        "command": provenance.command_line(),
    }
    remaining = plan.samples[start:]
    bar = tqdm(total=len(plan.samples), initial=start, desc=f"{label}/{plan.name}", unit="text",
               file=sys.stderr, disable=None)
    buffer, part = [], plan.done_parts
    for seq in _scores(plan, engine, remaining, topk, part_size):
        buffer.append(seq)
        bar.update(1)
        if len(buffer) == part_size:
            _write_part(plan, part, buffer, topk, base_meta)
            part += 1
            buffer = []
    if buffer:
        _write_part(plan, part, buffer, topk, base_meta)
        part += 1
    bar.close()
    if part != total_parts:
        raise ScoreError(f"{plan.name}: the backend returned {part} of {total_parts} parts")
    finish(plan)
    log.info("wrote %s (%d texts, %d rows)", plan.final, len(plan.samples), rows_total)


def _scores(plan: Plan, engine, samples, topk: int, part_size: int):
    if plan.rolling is None:
        yield from engine.score(samples, topk=topk)
        return
    window, stride = plan.rolling
    for i in range(0, len(samples), part_size):  # one part's windows at a time: a resumed run batches alike
        yield from rolling.score_documents(engine, samples[i:i + part_size], topk, window, stride)


def _write_part(plan: Plan, k: int, seqs, topk: int, base_meta: dict) -> None:
    table = schema.sequences_to_table(seqs, topk)
    meta = {**base_meta, "created": provenance.now(),
            "part": {"index": k, "rows": table.num_rows, "texts": len(seqs),
                     "first_sample_id": seqs[0].sample_id, "last_sample_id": seqs[-1].sample_id}}
    schema.atomic_write_table(table, plan.staging / f"part-{k:05d}.parquet", meta)
