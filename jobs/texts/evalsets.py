"""Evaluation sets (SPEC §2): a registry of named sets plus local files, each a list of texts in fixed order.

Rendering is pure (``render_*``); loading goes through ``datasets.load_dataset`` for hub sets, which
also takes a local copy (a directory or data file) through the ``*_SOURCE`` settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from jobs.core.errors import EvalSetError, OfflineError, first_line
from jobs.core.hub import hub_offline, unreachable


@dataclass
class EvalSet:
    name: str
    texts: list[str]
    source: dict = field(default_factory=dict)  # provenance: dataset id, config, split, revision, n, file hash


def _first(texts: Iterable[str], n: int) -> list[str]:
    """The first n non-empty texts (reading no further)."""
    out = []
    for text in texts:
        if text:
            out.append(text)
            if len(out) >= n:
                break
    return out


def render_wikitext(rows: Iterable[str], n: int) -> list[str]:
    """Strip each row, drop empty rows, keep the first n."""
    return _first(((row or "").strip() for row in rows), n)


def render_messages(messages: list[dict]) -> str:
    """``{role}: {content}`` lines (both stripped), empty contents skipped, joined by newlines."""
    return "\n".join(f"{(m.get('role') or '').strip()}: {(m.get('content') or '').strip()}"
                     for m in messages or [] if (m.get("content") or "").strip())


def render_chats(rows: Iterable[list[dict]], n: int) -> list[str]:
    return _first((render_messages(messages) for messages in rows), n)


@dataclass(frozen=True)
class HubSet:
    name: str
    path: str
    config: str | None
    split: str
    kind: str  # "text" or "chat"
    source_env: str  # env var that may point at a local copy


REGISTRY: dict[str, HubSet] = {
    "wikitext2": HubSet("wikitext2", "wikitext", "wikitext-2-raw-v1", "test", "text", "WIKITEXT_SOURCE"),
    # lm-evaluation-harness's `wikitext` task: whole documents, scored in rolling windows (docs/statistics.md)
    "wikitext2_doc": HubSet("wikitext2_doc", "EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test",
                            "document", "WIKITEXT_DOC_SOURCE"),
    "ultrachat": HubSet(
        "ultrachat", "HuggingFaceH4/ultrachat_200k", None, "test_sft", "chat", "ULTRACHAT_SOURCE"
    ),
}


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def check_local_source(ref: str, what: str) -> None:
    """A reference that can only be a local path (absolute, ./, ../, ~, or a data file's suffix) must
    exist: otherwise the hub would be asked for it and the error would blame the cache, not the path."""
    looks_local = ref.startswith(("/", "./", "../", "~")) or Path(ref).suffix.lower() in LOCAL_SUFFIXES
    if looks_local and not Path(ref).expanduser().exists():
        raise EvalSetError(f"{what} file not found: {ref}")


def load_rows(path: str, config: str | None, split: str, revision: str | None = None):
    """``datasets.load_dataset`` on a hub id or a local directory/file; offline errors made plain."""
    import datasets

    check_local_source(path, "dataset")
    local = Path(path).expanduser()
    if local.is_file() and local.stat().st_size == 0:
        raise EvalSetError(f"{path}: empty file")
    try:
        if local.is_file():
            fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}[local.suffix]
            return datasets.load_dataset(fmt, data_files={split: str(local)}, split=split)
        if local.is_dir():
            return datasets.load_dataset(str(local), split=split)
        return datasets.load_dataset(path, config, split=split, revision=revision)
    except Exception as exc:
        from datasets.exceptions import DatasetNotFoundError

        # offline, datasets raises a bare ValueError ("Couldn't find cache") for a hub set whose loader but not
        # data is cached: any failure of a hub set in offline mode is the cache's. A local file's error is its own.
        if not local.exists() and (unreachable(exc) or hub_offline()):
            raise OfflineError(
                f"dataset {path!r} is not in the local cache and the hub cannot be reached"
                " (HF_HUB_OFFLINE=1?): run once online with HF_HOME set to a shared cache,"
                " or point the set's *_SOURCE variable at a local copy"
            ) from None
        if isinstance(exc, DatasetNotFoundError):
            raise EvalSetError(f"dataset {path!r}: no such dataset on the hub, or it is gated (set HF_TOKEN)") from None
        if local.is_file():
            root = exc
            while root.__cause__ is not None:  # datasets wraps the reader's own error
                root = root.__cause__
            raise EvalSetError(f"{path}: unreadable as {local.suffix} ({first_line(root)})") from None
        raise EvalSetError(f"cannot load dataset {path!r} split {split!r}: {first_line(exc)}") from None


def source_identity(path: str, ds) -> dict:
    """What names a set's content: the bytes of a local copy (file or directory), else the hub dataset's
    fingerprint. ``datasets`` fingerprints a local file by its path and modification time, so the same
    bytes mounted at /data in a container would look like another set."""
    local = Path(path).expanduser()
    if local.is_file():
        return {"sha256": hashlib.sha256(local.read_bytes()).hexdigest()}
    if local.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            h.update(f.relative_to(local).as_posix().encode() + b"\0" + f.read_bytes())
        return {"sha256": h.hexdigest()}
    return {"fingerprint": getattr(ds, "_fingerprint", None)}


def load_hub_set(spec: HubSet, n: int, source: str | None = None, revision: str | None = None) -> EvalSet:
    path = source or os.environ.get(spec.source_env) or spec.path
    config = spec.config if path == spec.path else None  # the registry's config names its own dataset only
    ds = load_rows(path, config, spec.split, revision)
    about = {"dataset": path, "config": config, "split": spec.split,
             "revision": revision, **source_identity(path, ds)}
    if spec.kind == "document":
        return document_set(spec.name, _pages(ds, path), about)
    column = "text" if spec.kind == "text" else "messages"
    if column not in ds.column_names:
        raise EvalSetError(f"dataset {path!r} has no {column!r} column (has {ds.column_names})")
    rows = (r[column] for r in ds)
    texts = render_wikitext(rows, n) if spec.kind == "text" else render_chats(rows, n)
    return EvalSet(spec.name, texts, {**about, "n": n, "kind": spec.kind})


def _utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvalSetError(f"{path}: not UTF-8 text (byte {exc.start}): a binary file?") from None


def read_local_texts(path: Path) -> list[str]:
    """A .txt (one text per line), .jsonl or .parquet (a ``text`` column, or ``messages`` chats)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return render_wikitext(_utf8(path).splitlines(), n=10**9)
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(_utf8(path).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise EvalSetError(f"{path}:{i}: not valid JSON") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise EvalSetError(f"{path}: unreadable Parquet ({first_line(exc)})") from None
    else:
        raise EvalSetError(f"{path}: unknown file type {suffix!r} (use .txt, .jsonl or .parquet)")
    if rows and "messages" in rows[0]:
        return render_chats((r.get("messages") for r in rows), n=10**9)
    if rows and "text" in rows[0]:
        return render_wikitext((r.get("text") for r in rows), n=10**9)
    raise EvalSetError(f"{path}: rows need a 'text' or a 'messages' field")


def load_local_set(name: str, path: Path, n: int | None = None) -> EvalSet:
    if not path.is_file():
        raise EvalSetError(f"evaluation file not found: {path}")
    texts = read_local_texts(path)
    if n is not None:
        texts = texts[:n]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return EvalSet(name, texts, {"dataset": str(path), "split": None, "sha256": digest, "n": n})


def parse_specs(spec: str) -> list[tuple[str, str | None]]:
    """``wikitext2,ultrachat``, ``NAME=PATH`` or ``PATH`` items, separated by commas or spaces."""
    items = [s for s in re.split(r"[,\s]+", spec or "") if s]
    if not items:
        raise EvalSetError("no evaluation set given")
    out = []
    for item in items:
        if "=" in item:
            name, path = item.split("=", 1)
            out.append((name, path))
        elif item in REGISTRY:
            out.append((item, None))
        elif Path(item).suffix.lower() in (".txt", ".jsonl", ".parquet"):
            out.append((re.sub(r"[^A-Za-z0-9._+-]", "-", Path(item).stem), item))
        else:
            raise EvalSetError(
                f"unknown evaluation set {item!r}: use one of {', '.join(REGISTRY)}, a .txt/.jsonl/"
                ".parquet file, or NAME=PATH"
            )
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise EvalSetError(f"evaluation set names repeat: {names}")
    return out


def load_set(name: str, path: str | None, limits: dict[str, int]) -> EvalSet:
    hub = REGISTRY.get(name)
    if path is None:
        return load_hub_set(REGISTRY[name], limits.get(name, 200))
    if hub is not None and not Path(path).exists():
        raise EvalSetError(f"evaluation file not found: {path}")
    if hub is not None and hub.kind == "document":
        return load_hub_set(hub, 0, source=path)
    if hub is not None and Path(path).is_dir():
        return load_hub_set(hub, limits.get(name, 200), source=path)
    return load_local_set(name, Path(path), limits.get(name))


# -- document-level WikiText-2, as lm-evaluation-harness 0.4.13 scores it (task `wikitext`) -----------------
def is_wikitext_title(line: str) -> bool:
    """A level-1 heading `` = Title = `` starts a new article (``= = Sub = =`` does not)."""
    r = line.replace("= = =", "===").replace("= =", "==").strip()
    return r.startswith("= ") and r.endswith(" =")


def join_wikitext_pages(lines: Iterable[str]) -> list[str]:
    """The raw file's lines (without their newline) joined into articles, one per level-1 heading, as
    ``EleutherAI/wikitext_document_level`` was built: a page is its lines joined by ``"\n"``."""
    groups = [[]]
    for line in lines:
        if is_wikitext_title(line):
            groups.append([])
        groups[-1].append(line)
    return [page for page in ("\n".join(g) for g in groups) if page.strip()]


def wikitext_rows_to_lines(rows: Iterable[str]) -> list[str]:
    """The ``wikitext`` dataset's rows back to the raw file's lines: a row is a line with its newline, and a
    blank line of the raw file (a single space) is an empty row."""
    return [r[:-1] if r.endswith("\n") else (r if r else " ") for r in rows]


def wikitext_detokenizer(page: str) -> str:
    """lm-eval's ``preprocess_wikitext.wikitext_detokenizer`` (0.4.13), step for step: the text scored."""
    # a copy, held equal to lm-eval's by tests/test_evalsets.py: the score stage also runs in the quantize
    # image (the docker demo), which has no lm-eval to import it from
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def lm_eval_units(page: str) -> tuple[int, int]:
    """(words, bytes) of the *original* page, as lm-eval's ``process_results`` counts them."""
    return len(re.split(r"\s+", page)), len(page.encode("utf-8"))


def document_set(name: str, pages: list[str], source: dict) -> EvalSet:
    if not pages:
        raise EvalSetError(f"{name}: no documents in {source.get('dataset')}")
    units = [lm_eval_units(p) for p in pages]
    return EvalSet(name, [wikitext_detokenizer(p) for p in pages], {
        **source, "kind": "document", "n": len(pages),
        "units": {"words": [w for w, _ in units], "bytes": [b for _, b in units]}})


def _pages(ds, path) -> list[str]:
    """Pages from a dataset with a ``page`` column (EleutherAI/wikitext_document_level or a copy), or from
    the raw ``wikitext`` rows (a ``text`` column, or a .txt copy of the raw file) joined into pages."""
    if "page" in ds.column_names:
        return [r["page"] for r in ds]
    if "text" in ds.column_names:
        return join_wikitext_pages(wikitext_rows_to_lines(r["text"] for r in ds))
    raise EvalSetError(f"dataset {path!r} has neither a 'page' nor a 'text' column (has {ds.column_names})")
