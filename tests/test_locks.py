"""One writer per output (jobs/core/locks.py): a second writer stops at once, naming the first."""
import os
import signal
import subprocess
import sys

import pytest

from jobs.core import locks
from jobs.core.errors import LockError, QscoreError


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "model=m" / "dataset=d"
    with locks.hold(out, what="dataset"):
        info = locks.holder(out)
        assert info["pid"] == os.getpid() and info["host"] and info["started"]
        with pytest.raises(LockError, match=rf"dataset is being written by pid {os.getpid()} on ") as e:
            with locks.hold(out, what="dataset"):
                pass
        assert isinstance(e.value, QscoreError) and "\n" not in str(e.value)
    with locks.hold(out):  # released: the next run goes ahead
        pass
    assert locks.holder(out) == {}  # a finished run is not named as a holder
    assert locks.lock_path(out).name == ".dataset=d.lock"  # hidden: Hive readers skip it


def test_shared_holders_exclude_an_exclusive_one(tmp_path):
    out = tmp_path / "dataset=d"
    with locks.hold(out, shared=True), locks.hold(out, shared=True):  # two shards of one set
        with pytest.raises(LockError, match="another run"):
            with locks.hold(out):
                pass
    with locks.hold(out):
        with pytest.raises(LockError):
            with locks.hold(out, shared=True):
                pass


def test_a_killed_holder_releases_its_lock(tmp_path):
    out = tmp_path / "ckpt"
    code = ("import sys, time; from jobs.core import locks\n"
            "with locks.hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=f"pid {proc.pid} "):
            with locks.hold(out):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with locks.hold(out):  # the kernel released it with the process: no stale lock to clear by hand
        pass


def test_aggregate_stops_while_its_report_is_being_written(tmp_path):
    import numpy as np

    from conftest import cli
    from jobs.archive import logprobs
    from jobs.engines.base import SequenceScores

    n = 20
    seqs = [SequenceScores(i, np.arange(n), -np.ones(n), np.ones(n, int), np.arange(n), -np.ones(n))
            for i in range(3)]
    ddir = logprobs.dataset_dir(tmp_path, "m", "wiki")
    logprobs.atomic_write_table(logprobs.sequences_to_table(seqs), ddir / "part-00000.parquet", {"fingerprint": "f"})
    with locks.hold(tmp_path / "report"):
        r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "m")
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'report'}: report is being written by pid")
    assert not (tmp_path / "report").exists()
