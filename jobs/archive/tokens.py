"""Tokenized evaluation sets, kept once per (set content, tokenizer) in the results volume and reused by
every job that scores that set with that tokenizer (SPEC §3.5): a sweep's thirty scoring jobs tokenize
each set once, not thirty times, locally and in containers alike.

A cache file is ``<results>/.cache/tokens/<key>.arrow`` (Arrow IPC: one ``token_ids`` list per text, in
the set's order). Its key hashes what the ids depend on — the set's bytes (never its path, which differs
in a container), the tokenizer's files, the tokenizers release, how the texts are encoded — so an edited
set or another tokenizer misses. The file carries its key and a digest of its ids, checked on every read:
a damaged or foreign file is computed again and replaced, never trusted. Writers rename a complete file
into place, so two jobs filling one entry at once both leave a whole, identical file.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

from jobs.archive.fingerprint import fingerprint
from jobs.core import atomic
from jobs.core.provenance import versions

log = logging.getLogger("qscore.tokens")
VERSION = 1  # bump when the way texts become ids changes (rendering, encoding)
META = b"qscore-tokens"


def cacheable(source: dict) -> bool:
    """Whether the set's content has a name: its bytes' hash, or the hub dataset's fingerprint. A set known
    only by its name could change under it, so it is tokenized every time."""
    return bool(source.get("sha256") or source.get("fingerprint"))


def cache_key(source: dict, tokenizer_hash: str, encoding: str) -> str:
    """The entry's name (pure): content, not place — a local set's path is left out when its bytes are hashed."""
    content = {k: v for k, v in source.items() if not (k == "dataset" and "sha256" in source)}
    return fingerprint({"version": VERSION, "set": content, "tokenizer": tokenizer_hash, "encoding": encoding,
                        **versions("tokenizers")})


def ids_digest(token_lists) -> str:
    h = hashlib.sha256()
    for ids in token_lists:
        h.update(",".join(map(str, ids)).encode() + b";")
    return h.hexdigest()


def path_for(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.arrow"


def read(path: Path, key: str) -> list[list[int]] | None:
    """The cached ids, or None when the file is missing, unreadable, or not what its key and digest say."""
    import pyarrow as pa

    if not path.is_file():
        return None
    try:
        with pa.memory_map(str(path)) as src:
            table = pa.ipc.open_file(src).read_all()
        meta = dict(json.loads((table.schema.metadata or {}).get(META, b"{}")))
        ids = table.column("token_ids").to_pylist()
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        log.warning("%s: unreadable token cache (%s); tokenizing again", path, str(exc).splitlines()[0][:120])
        return None
    if meta.get("key") != key or meta.get("digest") != ids_digest(ids):
        log.warning("%s: token cache fails its check (key or digest); tokenizing again", path)
        return None
    return ids


def write(path: Path, key: str, token_lists) -> None:
    import pyarrow as pa

    table = pa.table({"token_ids": pa.array(token_lists, type=pa.list_(pa.int32()))})
    table = table.replace_schema_metadata({META: json.dumps({"key": key, "digest": ids_digest(token_lists)})})
    with atomic.atomic_file(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def token_lists(cache_dir: Path | None, key: str, compute: Callable[[], list[list[int]]]) -> tuple[list, bool]:
    """(ids, reused): the cached ids of ``key``, else ``compute()`` stored for the next job. With no
    ``cache_dir`` nothing is kept. A cache that cannot be written (a read-only volume) is not an error."""
    if cache_dir is None:
        return compute(), False
    path = path_for(cache_dir, key)
    ids = read(path, key)
    if ids is not None:
        return ids, True
    ids = compute()
    try:
        atomic.remove_stale_temporaries(path)  # a killed writer's: never renamed, never read
        write(path, key, ids)
    except OSError as exc:
        log.warning("%s: cannot keep the token cache (%s)", path, exc)
    return ids, False
