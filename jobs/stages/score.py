"""Score stage: one model, one or more evaluation sets, per-token logprobs to the Parquet archive.

One engine serves every set of the run. Each (model, set) is written in parts of ``part_size`` texts
into a hidden staging directory ``model=L/.dataset=D.partial/``; when the last part lands the directory
is renamed to ``dataset=D``. A run that is killed resumes from its complete parts (each checked against
the digest recorded when it was written); a finished dataset is skipped when asked for again with the same
inputs, and refused (unless --overwrite) when they differ. One run at a time writes a dataset: a second
stops with an error naming the first (``jobs.core.locks``).

With ``--shard i/N`` the run scores every N-th part of each set (parts i-1, i-1+N, …) into
``dataset=D/shard=i-of-N/``. Parts are the unit of batching too (a batch never straddles a part), so a
part computes the same numbers in whichever shard it lands, and the shards' union is the unsharded run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.core import atomic, hub, locks, progress, provenance
from jobs.core.phases import Phases
from jobs import engines
from jobs.texts import evalsets, sampling
from jobs.engines import rolling
from jobs.archive import logprobs, tokens
from jobs.archive.fingerprint import fingerprint
from jobs.checkpoints.checkpoint import Checkpoint, check_dir, check_max_model_len, inspect, tokenizer_hash
from jobs.core.errors import ScoreError, SettingsError
from jobs.core.settings import ScoreSettings, Shard

log = logging.getLogger("qscore.score")
STAGING_SUFFIX = ".partial"
PROGRESS = "_progress.json"


@dataclass
class SetRun:
    name: str
    samples: list[sampling.Sample]  # every scored text of the set, in order
    evalset: evalsets.EvalSet
    parts: list[int]  # the part indices this run scores (all of them, or one shard's)
    part_size: int
    final: Path
    staging: Path
    fingerprint: str  # this run's output (the shard's, when sharded)
    set_fingerprint: str  # the whole set's: every shard of one run carries the same
    done: set[int] = field(default_factory=set)
    digests: dict[str, str] = field(default_factory=dict)  # staged part name -> sha256 of its bytes as written
    skip: bool = False
    rolling: tuple[int, int] | None = None  # (window, stride): a document-level set, scored in rolling windows

    def part_samples(self, k: int) -> list[sampling.Sample]:
        return self.samples[k * self.part_size:(k + 1) * self.part_size]

    @property
    def todo(self) -> list[int]:
        return [k for k in self.parts if k not in self.done]

    @property
    def rows_total(self) -> int:
        return sum(len(s.token_ids) for k in self.parts for s in self.part_samples(k))


def staging_dir(final: Path) -> Path:
    # A leading dot keeps Hive readers (pyarrow, DuckDB, pandas) from picking up unfinished work.
    return final.with_name(f".{final.name}{STAGING_SUFFIX}")


def n_parts(n_samples: int, part_size: int) -> int:
    return (n_samples + part_size - 1) // part_size


def output_dir(results_dir, label: str, name: str, shard: Shard | None) -> Path:
    final = logprobs.dataset_dir(results_dir, label, name)
    return final if shard is None else final / f"shard={shard.name}"


def shard_parts(total: int, shard: Shard | None) -> list[int]:
    """The part indices of ``shard`` (pure): every N-th part, starting at part i-1."""
    if shard is None:
        return list(range(total))
    return list(range(shard.index - 1, total, shard.count))


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


def token_cache_dir(results_dir) -> Path:
    return Path(results_dir) / ".cache" / "tokens"


def encode(evalset: evalsets.EvalSet, tok, tok_hash: str, cache_dir: Path | None, *, document: bool) -> list:
    """The set's texts as token ids, from the token cache when another job already tokenized them."""
    if document:  # lm-eval's rolling inputs: no special tokens (a prefix token is added per document)
        encoder = lambda t: tok(t, add_special_tokens=False, verbose=False)["input_ids"]  # noqa: E731
    else:
        encoder = sampling.hf_encoder(tok)
    key = tokens.cache_key(evalset.source, tok_hash, "document" if document else "default")
    cache_dir = cache_dir if tokens.cacheable(evalset.source) else None
    ids, reused = tokens.token_lists(cache_dir, key, lambda: sampling.tokenize(evalset.texts, encoder))
    log.info("%s: %d texts %s", evalset.name, len(ids), f"from the token cache ({key})" if reused else "tokenized")
    return ids


def prepare_set(name: str, evalset: evalsets.EvalSet, tok, s: ScoreSettings, common: dict) -> SetRun:
    roll = None
    cache = token_cache_dir(s.results_dir)
    if evalset.source.get("kind") == "document":
        ids = encode(evalset, tok, common["tokenizer_hash"], cache, document=True)
        samples, roll = document_samples(evalset, tok, ids, s.engine.max_model_len, s.doc_stride)
    else:
        ids = encode(evalset, tok, common["tokenizer_hash"], cache, document=False)
        samples = sampling.select(ids, s.engine.max_model_len)
    if not samples:
        raise ScoreError(
            f"evaluation set {name!r} is empty after filtering ({len(evalset.texts)} texts, none with "
            f"at least {sampling.MIN_TOKENS} tokens)"
        )
    set_fp = fingerprint({**common, "dataset": evalset.source, "tokens": token_digest(samples),
                          "part_size": s.part_size, **({"rolling": roll} if roll else {})})
    fp = set_fp if s.shard is None else fingerprint({"set": set_fp, "shard": str(s.shard)})
    final = output_dir(s.results_dir, s.label, name, s.shard)
    total = n_parts(len(samples), s.part_size)
    setrun = SetRun(name, samples, evalset, shard_parts(total, s.shard), s.part_size, final, staging_dir(final), fp, set_fp,
                rolling=roll)
    if not setrun.parts:
        raise ScoreError(f"{name}: shard {s.shard} is empty: the set has only {total} parts of {s.part_size} texts "
                         "(use fewer shards or a smaller --part-size)")
    if s.shard is not None and logprobs.part_files(final.parent) and not s.overwrite:
        raise ScoreError(f"{final.parent} holds an unsharded run; pass --overwrite to replace it with shards, "
                         "or use another --label")
    if final.exists():
        parts = logprobs.part_files(final)
        old = logprobs.read_metadata(parts[0]).get("fingerprint") if parts else None
        if old == fp and not s.overwrite:
            setrun.skip = True
            return setrun
        if not s.overwrite:
            raise ScoreError(
                f"{final} already holds a run with other settings (fingerprint {old} != {fp}); "
                "pass --overwrite to replace it, or use another --label"
            )
    if setrun.staging.exists():
        old = read_progress(setrun.staging).get("fingerprint")
        if old != fp:  # an interrupted run of the same inputs is always resumed, --overwrite or not
            if not s.overwrite:
                raise ScoreError(
                    f"{setrun.staging} holds an interrupted run with other settings; pass --overwrite "
                    "to discard it"
                )
            shutil.rmtree(setrun.staging)
    if setrun.staging.exists():
        for name in [PROGRESS, *(part_name(k) for k in setrun.parts)]:
            atomic.remove_stale_temporaries(setrun.staging / name)  # a killed run's: never renamed, never complete
        setrun.digests = read_progress(setrun.staging).get("parts", {})
        setrun.done = staged_parts(setrun)
    return setrun


def part_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def read_progress(staging: Path) -> dict:
    """The staging directory's record: the run's fingerprint and the digest of every part it wrote."""
    try:
        return json.loads((staging / PROGRESS).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("%s: unreadable, the staged parts cannot be trusted", staging / PROGRESS)
        return {}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def staged_parts(setrun: SetRun) -> set[int]:
    """The staged parts a resumed run keeps: parts of this run whose bytes are those its writer recorded
    (the digest goes into the progress file before the part is renamed into place). Any other file there,
    damaged or made by hand, is removed and its part scored again: it never reaches the archive."""
    done = set()
    for p in logprobs.part_files(setrun.staging):
        m = re.fullmatch(r"part-(\d{5})\.parquet", p.name)
        k = int(m.group(1)) if m else None
        if k not in setrun.parts:
            why = "not a part of this run"
        elif setrun.digests.get(p.name) is None:
            why = "no digest was recorded for it"
        elif file_digest(p) != setrun.digests[p.name]:
            why = "its bytes differ from those written"
        else:
            done.add(k)
            continue
        log.warning("%s: %s; it is removed and its part scored again", p, why)
        p.unlink()
    return done


def document_samples(evalset, tok, ids, max_model_len: int, doc_stride: int):
    """lm-eval's rolling loglikelihood inputs: each document's ids (tokenized without special tokens; whole
    documents are longer than the model, so no truncation warning) after one prefix token (BOS, else EOS),
    cut into windows of max_model_len - 8 tokens."""
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if prefix is None:
        raise ScoreError(f"{evalset.name}: the tokenizer has neither a BOS nor an EOS token to start a document")
    window = sampling.max_tokens(max_model_len)
    sampling.rolling_windows(2, window, doc_stride)  # a bad stride fails here, before any model is loaded
    evalset.source["rolling"] = {"window": window, "stride": doc_stride or window - 1, "prefix_token": int(prefix)}
    return sampling.documents(ids, prefix), (window, doc_stride or window - 1)


def finish(setrun: SetRun) -> None:
    """Move the completed staging directory into place; an older dataset goes only after that."""
    (setrun.staging / PROGRESS).unlink(missing_ok=True)
    atomic.replace_dir(setrun.staging, setrun.final)


def run(*, settings: ScoreSettings) -> list[Path]:
    phases = Phases()
    s = settings
    logprobs.check_label("model label", s.label)
    specs = evalsets.parse_specs(s.datasets)
    sampling.max_tokens(s.engine.max_model_len)
    progress.quiet_third_party()
    with contextlib.ExitStack() as held:
        for name, _ in specs:  # before anything already there is looked at
            final = output_dir(s.results_dir, s.label, name, s.shard)
            if s.shard is not None:  # shards of a set write side by side; an unsharded run of it excludes them
                held.enter_context(locks.hold(final.parent, what="dataset", shared=True))
            held.enter_context(locks.hold(final, what="dataset"))
        try:
            return _run(s, specs, phases)
        finally:
            phases.log(log, s.label)


def _run(s: ScoreSettings, specs, phases: Phases) -> list[Path]:
    t_read = time.perf_counter()  # reading the checkpoint's config, the sets and the tokenizer; tokenizing
    model_path = check_dir(hub.resolve(s.model, "model"))
    # transformers (the tokenizer), vLLM's platform (the GPU) and so torch: start-up, not reading. Before the
    # checkpoint's inspection, whose compressed-tensors import would otherwise bring torch and transformers
    # (on the H200, 17 s of a quantized model's "read" and 0.1 s of bf16's)
    t_imports = time.perf_counter()
    tok, tok_path = load_tokenizer(s.tokenizer or s.model)
    backend_name = engines.pick(s.backend)
    t_imports = time.perf_counter() - t_imports
    phases.add("startup", t_imports)
    ckpt = inspect(model_path)
    check_max_model_len(ckpt, s.engine.max_model_len)
    vocab = ckpt.config.get("vocab_size") or ckpt.config.get("text_config", {}).get("vocab_size")
    if vocab and s.topk > vocab:
        raise SettingsError(f"--topk {s.topk} is above the vocabulary of {s.model} ({vocab} tokens)")
    arith = engines.arithmetic_for(backend_name, ckpt.quant, s.engine)
    common = {
        "schema": logprobs.SCHEMA_VERSION, "model_hash": ckpt.content_hash,
        "tokenizer_hash": tokenizer_hash(tok_path), "max_model_len": s.engine.max_model_len, "topk": s.topk,
        "backend": backend_name, "dtype": s.engine.dtype, "arithmetic": arith.label, **arith.fingerprint_fields(),
    }
    limits = dict(s.limits)
    setruns = [prepare_set(name, evalsets.load_set(name, path, limits), tok, s, common) for name, path in specs]
    for p in setruns:
        top = max(max(x.token_ids) for x in p.samples)
        if vocab and top >= vocab:
            raise ScoreError(
                f"tokenizer {s.tokenizer or s.model!r} produces id {top} but the model's vocabulary has "
                f"{vocab}: score every model of a comparison with a tokenizer it shares"
            )
    todo = [p for p in setruns if not p.skip]
    for p in setruns:
        if p.skip:
            log.info("%s: already scored with the same inputs, skipped (%s)", p.final, p.fingerprint)
    phases.add("read", time.perf_counter() - t_read - t_imports)
    if not todo:
        return [p.final for p in setruns]

    expected = sum(len(x.token_ids) for p in todo for k in p.todo for x in p.part_samples(k))
    # Batches never straddle a part boundary, so a resumed or sharded run computes each part exactly
    # as an uninterrupted one would (same batch shapes, same floating-point results).
    with phases("engine_start"):
        engine = engines.load(backend_name, ckpt, s.engine.replace(window=s.part_size, max_logprobs=s.topk),
                              arithmetic=arith, expected_tokens=expected)
    try:
        with phases("engine_start"):
            info = engine.describe()
        if info.get("arithmetic", arith.label) != arith.label:
            raise ScoreError(f"{s.model}: planned {arith.label} but the engine computes {info.get('arithmetic')}")
        for p in todo:
            write_dataset(p, engine, info, ckpt, s, tok_path, common, phases)
    finally:
        with phases("shutdown"):
            engine.close()
    return [p.final for p in setruns]


def write_dataset(setrun: SetRun, engine, info: dict, ckpt: Checkpoint, s: ScoreSettings, tok_path: Path,
                  common: dict, phases: Phases) -> None:
    from tqdm import tqdm

    setrun.staging.mkdir(parents=True, exist_ok=True)
    _record(setrun)
    if setrun.done:
        log.info("%s: resuming, %d of %d parts already written", setrun.name, len(setrun.done), len(setrun.parts))
    q = ckpt.quant
    base_meta = {
        "schema_version": logprobs.SCHEMA_VERSION,
        "fingerprint": setrun.fingerprint,
        "set_fingerprint": setrun.set_fingerprint,
        "shard": None if s.shard is None else {"index": s.shard.index, "count": s.shard.count},
        "model": {"label": s.label, "ref": s.model, "path": str(ckpt.path), "content_hash": ckpt.content_hash,
                  "architecture": ckpt.architecture},
        "quantization": {"method": q.method, "format": q.format, "scheme": q.scheme,
                         "group_size": q.group_size, "ignore": q.ignore},
        "tokenizer": {"name": s.tokenizer or s.model, "path": str(tok_path), "hash": common["tokenizer_hash"]},
        "dataset": {"name": setrun.name, **setrun.evalset.source},
        "sampling": {"max_model_len": s.engine.max_model_len, "max_tokens": sampling.max_tokens(s.engine.max_model_len),
                     "min_tokens": sampling.MIN_TOKENS, "topk": s.topk, "part_size": s.part_size,
                     "truncated_texts": sum(x.truncated for x in setrun.samples)},
        "runtime": {**info, **provenance.versions("vllm", "transformers", "torch", "compressed-tensors")},
        "counts": {"rows_total": setrun.rows_total, "texts_total": sum(len(setrun.part_samples(k)) for k in setrun.parts),
                   "texts_in_set": len(setrun.evalset.texts), "texts_scored_in_set": len(setrun.samples),
                   "parts_total": len(setrun.parts), "parts_in_set": n_parts(len(setrun.samples), setrun.part_size)},
        "command": provenance.command_line(),
    }
    todo = setrun.todo
    queue = [(k, x) for k in todo for x in setrun.part_samples(k)]
    t0, n_tokens = time.perf_counter(), sum(len(x.token_ids) for _, x in queue)
    # a bar on a terminal (tqdm draws nothing elsewhere), a line per part in a batch log
    bar = tqdm(total=len(queue), desc=f"{s.label}/{setrun.name}", unit="text", file=sys.stderr, disable=None)
    lines = None if progress.on_terminal() else progress.PartProgress(
        log, f"{s.label}/{setrun.name}", len(setrun.parts), len(setrun.done), n_tokens)
    buffer: list = []
    remaining = list(todo)
    scores = _scores(setrun, engine, todo, s.topk)
    try:
        for k, _ in queue:
            with phases("score"):
                seq = next(scores, None)
            if seq is None:
                break
            buffer.append(seq)
            bar.update(1)
            if len(buffer) == len(setrun.part_samples(k)):
                with phases("write"):
                    _write_part(setrun, k, buffer, s.topk, {**base_meta, "phases": phases.snapshot()})
                remaining.remove(k)
                if lines:
                    lines.part(sum(len(x.token_ids) for x in buffer))
                buffer = []
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM through the CLI's handler
        bar.close()
        kept = len(setrun.parts) - len(remaining)
        log.warning("%s: interrupted — %d of %d parts kept in %s, run the same command again to resume",
                    setrun.name, kept, len(setrun.parts), setrun.staging)
        raise
    bar.close()
    if remaining:
        raise ScoreError(f"{setrun.name}: the backend returned no results for parts {remaining}")
    seconds = time.perf_counter() - t0
    with phases("write"):
        finish(setrun)
    log.info("wrote %s (%d parts, %d rows): %d tokens scored in %.1f s, %.0f tokens/s", setrun.final, len(setrun.parts),
             setrun.rows_total, n_tokens, seconds, n_tokens / max(seconds, 1e-9))


def _scores(setrun: SetRun, engine, parts: list[int], topk: int):
    """The parts' sequences, in order: plain texts submitted at once; documents one part at a time, in
    rolling windows (a resumed or sharded run batches them alike)."""
    if setrun.rolling is None:
        yield from engine.score([x for k in parts for x in setrun.part_samples(k)], topk=topk)
        return
    window, stride = setrun.rolling
    for k in parts:
        yield from rolling.score_documents(engine, setrun.part_samples(k), topk, window, stride)


def _record(setrun: SetRun) -> None:
    atomic.write_text(setrun.staging / PROGRESS, json.dumps({"fingerprint": setrun.fingerprint, "parts": setrun.digests}))


def _write_part(setrun: SetRun, k: int, seqs, topk: int, base_meta: dict) -> None:
    table = logprobs.sequences_to_table(seqs, topk)
    meta = {**base_meta, "created": provenance.now(),
            "part": {"index": k, "rows": table.num_rows, "texts": len(seqs),
                     "first_sample_id": seqs[0].sample_id, "last_sample_id": seqs[-1].sample_id}}

    def record(tmp: Path) -> None:  # the digest is on disk before the part is: every part there has one
        setrun.digests[part_name(k)] = file_digest(tmp)
        _record(setrun)

    logprobs.atomic_write_table(table, setrun.staging / part_name(k), meta, before_rename=record)
