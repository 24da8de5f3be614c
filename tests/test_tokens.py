"""The token cache (jobs.archive.tokens) and the job phases (jobs.core.phases): a set is tokenized once per
(set content, tokenizer) and reused by the next job; an edited set, another tokenizer or a damaged file
misses; every part and the log say where the job's time went."""
from __future__ import annotations

import json
import logging
import shutil

import pyarrow.parquet as pq
from conftest import DATA, cli

from jobs.archive import logprobs, tokens
from jobs.core.phases import ORDER, Phases, process_age_s

SOURCE = {"dataset": "/data/wiki.txt", "split": None, "sha256": "ab" * 32, "n": None}


class Counter:
    def __init__(self, ids):
        self.calls, self.ids = 0, ids

    def __call__(self):
        self.calls += 1
        return self.ids


def test_reused_by_the_next_job(tmp_path):
    key = tokens.cache_key(SOURCE, "tok1", "default")
    first = Counter([[1, 2, 3], [4, 5]])
    ids, reused = tokens.token_lists(tmp_path, key, first)
    assert (ids, reused, first.calls) == ([[1, 2, 3], [4, 5]], False, 1)
    second = Counter([[9]])
    ids, reused = tokens.token_lists(tmp_path, key, second)
    assert (ids, reused, second.calls) == ([[1, 2, 3], [4, 5]], True, 0)


def test_key_names_content_not_place():
    moved = {**SOURCE, "dataset": "data/wiki.txt"}  # the same bytes, mounted elsewhere (a container)
    assert tokens.cache_key(moved, "tok1", "default") == tokens.cache_key(SOURCE, "tok1", "default")
    edited = {**SOURCE, "sha256": "cd" * 32}
    assert tokens.cache_key(edited, "tok1", "default") != tokens.cache_key(SOURCE, "tok1", "default")
    assert tokens.cache_key(SOURCE, "tok2", "default") != tokens.cache_key(SOURCE, "tok1", "default")
    assert tokens.cache_key(SOURCE, "tok1", "document") != tokens.cache_key(SOURCE, "tok1", "default")
    hub = {"dataset": "wikitext", "fingerprint": "f1"}  # no bytes hashed: the name is part of the content
    assert tokens.cache_key(hub, "t", "default") != tokens.cache_key({**hub, "dataset": "other"}, "t", "default")


def test_damaged_or_foreign_file_is_tokenized_again(tmp_path, caplog):
    key = tokens.cache_key(SOURCE, "tok1", "default")
    tokens.token_lists(tmp_path, key, Counter([[1, 2, 3]]))
    path = tokens.path_for(tmp_path, key)
    path.write_bytes(path.read_bytes()[:40])  # cut short
    again = Counter([[1, 2, 3]])
    with caplog.at_level(logging.WARNING):
        assert tokens.token_lists(tmp_path, key, again) == ([[1, 2, 3]], False)
    assert again.calls == 1 and "unreadable token cache" in caplog.text
    assert tokens.read(path, key) == [[1, 2, 3]]  # replaced by a whole file
    other = tokens.cache_key(SOURCE, "tok2", "default")
    shutil.copy(path, tokens.path_for(tmp_path, other))  # another entry's file under this name
    assert tokens.read(tokens.path_for(tmp_path, other), other) is None


def test_unwritable_cache_is_not_an_error(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the directory should be")
    assert tokens.token_lists(blocker, "k", Counter([[1]])) == ([[1]], False)


def test_phases_in_order_and_accounting_for_the_wall():
    ph = Phases()
    with ph("score"):
        pass
    ph.add("read", 0.5)
    snap = ph.snapshot()
    assert list(snap)[:3] == ["startup", "read", "score"] and list(snap)[-2:] == ["other", "wall"]
    assert abs(sum(v for k, v in snap.items() if k != "wall") - snap["wall"]) < 0.01 + 0.5
    assert set(ORDER) >= {k for k in snap if k not in ("other", "wall")}
    age = process_age_s()
    assert age is None or age > 0


def test_second_score_job_reuses_the_tokens_and_records_its_phases(tiny_model, tmp_path):
    sets = f"wiki={DATA / 'wiki_mini.txt'}"
    first = cli("score", "--model", tiny_model, "--label", "a", "--datasets", sets, "--results-dir", tmp_path)
    assert first.exit_code == 0, first.output
    assert "wiki: 143 texts tokenized" in first.stderr, first.stderr
    second = cli("score", "--model", tiny_model, "--label", "b", "--datasets", sets, "--results-dir", tmp_path)
    assert second.exit_code == 0, second.output
    assert "wiki: 143 texts from the token cache" in second.stderr
    line = next(ln for ln in second.stderr.splitlines() if "phases b " in ln)
    logged = json.loads(line.split("phases b ", 1)[1])
    assert {"startup", "read", "engine_start", "score", "write", "shutdown", "wall"} <= set(logged)
    parts = [logprobs.part_files(logprobs.dataset_dir(tmp_path, label, "wiki")) for label in "ab"]
    meta = logprobs.read_metadata(parts[1][-1])
    assert {"startup", "read", "engine_start", "score"} <= set(meta["phases"])
    # the same tokens either way
    ids = [pq.read_table(p[0], columns=["token_id"]).column(0).to_pylist() for p in parts]
    assert ids[0] == ids[1]
    assert len(list((tmp_path / ".cache" / "tokens").glob("*.arrow"))) == 1


def test_a_set_known_only_by_its_name_is_not_cached():
    assert tokens.cacheable(SOURCE) and tokens.cacheable({"dataset": "wikitext", "fingerprint": "f1"})
    assert not tokens.cacheable({"dataset": "wikitext", "fingerprint": None})


def test_a_killed_writers_temporary_is_cleared_and_never_read(tmp_path):
    key = tokens.cache_key(SOURCE, "tok1", "default")
    path = tokens.path_for(tmp_path, key)
    stale = path.with_name(f".{path.name}.tmp-999999999-abcdef")  # no such pid: its writer is gone
    stale.write_bytes(b"half a file")
    assert tokens.token_lists(tmp_path, key, Counter([[7, 8]])) == ([[7, 8]], False)
    assert not stale.exists() and tokens.read(path, key) == [[7, 8]]
