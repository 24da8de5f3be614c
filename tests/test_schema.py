import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.archive import logprobs
from jobs.core.errors import ArchiveError, ScoreError, SettingsError
from jobs.engines.base import SequenceScores


def seq(sid, n, k=1, seed=0):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(size=n).astype(np.float32)
    lp[0] = np.nan
    s = SequenceScores(sid, np.arange(n, dtype=np.int32) + 5, lp, np.r_[-1, rng.integers(1, 9, n - 1)],
                              np.r_[-1, rng.integers(0, 99, n - 1)], lp / 2)
    if k > 1:
        s.topk_ids = rng.integers(0, 99, (n, k))
        s.topk_logprobs = -rng.exponential(size=(n, k)).astype(np.float32)
    return s


@pytest.mark.parametrize("k", [1, 3])
def test_round_trip(tmp_path, k):
    seqs = [seq(0, 5, k), seq(7, 3, k, seed=1)]
    table = logprobs.sequences_to_table(seqs, topk=k)
    assert table.schema == logprobs.arrow_schema(k)
    path = tmp_path / "model=a" / "dataset=b" / "part-00000.parquet"
    logprobs.atomic_write_table(table, path, {"fingerprint": "f", "counts": {"rows_total": 8}})
    back, meta = logprobs.read_dataset(path.parent)
    assert meta["fingerprint"] == "f"
    assert back.column("sample_id").to_pylist() == [0] * 5 + [7] * 3
    assert back.column("position").to_pylist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert back.column("token_id").to_pylist() == [5, 6, 7, 8, 9, 5, 6, 7]
    # position 0 has no context: its logprob, rank, top1_id and top1_logprob are null
    for col in ("logprob", "rank", "top1_id", "top1_logprob"):
        vals = back.column(col).to_pylist()
        assert vals[0] is None and vals[5] is None and None not in vals[1:5]
    np.testing.assert_allclose(back.column("logprob").to_pylist()[1:5], seqs[0].logprob[1:], rtol=1e-6)
    assert back.schema.field("sample_id").type == "int32" and back.schema.field("logprob").type == "float"
    if k > 1:
        assert back.column("topk_ids").to_pylist()[1] == seqs[0].topk_ids[1].tolist()
        assert back.column("topk_ids").to_pylist()[0] is None
    assert not list(path.parent.glob(".*"))  # no temporary file left behind


def test_nan_logprob_is_refused():
    s = seq(0, 5)
    s.logprob[3] = np.nan
    with pytest.raises(ScoreError, match="non-finite logprob in sample 0 at position 3"):
        logprobs.sequences_to_table([s])


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError):
        logprobs.atomic_write_table(logprobs.sequences_to_table([seq(0, 4)]), tmp_path / "part-00000.parquet", {})
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "part-00000.parquet"
    logprobs.atomic_write_table(logprobs.sequences_to_table([seq(0, 40)]), path, {"fingerprint": "f"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(logprobs.ArchiveError, match="part-00000.parquet"):
        logprobs.read_dataset(tmp_path)


def test_incomplete_dataset_is_refused(tmp_path):
    logprobs.atomic_write_table(logprobs.sequences_to_table([seq(0, 4)]), tmp_path / "part-00000.parquet",
                              {"fingerprint": "f", "counts": {"rows_total": 9}})
    with pytest.raises(logprobs.ArchiveError, match="4 rows but the run recorded 9"):
        logprobs.read_dataset(tmp_path)


@pytest.mark.parametrize("label", ["a/b", "x=y", "", "has space", "../up"])
def test_labels_that_would_break_the_hive_layout(label):
    with pytest.raises(SettingsError, match="bad model label"):
        logprobs.dataset_dir("results", label, "wiki")


def test_discover_lists_published_datasets_only(tmp_path):
    """pyarrow.dataset's Hive discovery: staging directories, lock files, temporaries and other files are not
    datasets; shards make one; labels and names stay strings ("1" is not the integer 1)."""
    from jobs.archive import tasks as task_archive

    def put(path):
        logprobs.atomic_write_table(logprobs.sequences_to_table([seq(0, 5)]), path, {"fingerprint": "f"})

    lp = tmp_path / "logprobs"
    put(lp / "model=1" / "dataset=wiki" / "part-00000.parquet")
    put(lp / "model=1" / "dataset=07" / "shard=1-of-2" / "part-00000.parquet")
    put(lp / "model=1" / "dataset=07" / "shard=2-of-2" / "part-00000.parquet")
    put(lp / "model=1" / ".dataset=chat.partial" / "part-00000.parquet")
    (lp / "model=1" / ".dataset=wiki.lock").write_text("")
    (lp / "model=1" / "dataset=wiki" / "notes.txt").write_text("not a part")
    (lp / "model=2" / "dataset=empty").mkdir(parents=True)
    assert logprobs.discover(tmp_path) == {"1": {"07": lp / "model=1" / "dataset=07",
                                                 "wiki": lp / "model=1" / "dataset=wiki"}}
    assert logprobs.discover(tmp_path / "nothing") == {}
    put(tmp_path / "tasks" / "model=m" / "task=arc" / "part-00000.parquet")
    put(tmp_path / "tasks" / "model=m" / ".task=gsm8k.tmp-1-abc" / "part-00000.parquet")
    assert task_archive.discover(tmp_path) == {"m": {"arc": tmp_path / "tasks" / "model=m" / "task=arc"}}


def test_a_part_without_a_required_column_is_named(tmp_path):
    d = tmp_path / "d"
    meta = {"fingerprint": "f"}
    logprobs.atomic_write_table(logprobs.sequences_to_table([seq(0, 5)]), d / "part-00000.parquet", meta)
    logprobs.atomic_write_table(logprobs.sequences_to_table([seq(1, 5)]).drop(["rank"]), d / "part-00001.parquet", meta)
    with pytest.raises(ArchiveError, match=r"part-00001.parquet: missing columns \['rank'\]"):
        logprobs.read_dataset(d)
