"""Checkpoints are readable by whoever may read their directory: safetensors >= 0.8 creates its files
0600 (safetensors/safetensors#782), which breaks a models/ directory shared with another uid, such as the
scoring container run with DOCKER_USER (make test-images found it). And the clean-up of the temporaries a
killed run leaves."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from jobs.core import atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_dir_gives_weights_the_umask_mode(tmp_path, umask_022):
    out = tmp_path / "ckpt"
    with atomic.atomic_dir(out) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "model-00001-of-00002.safetensors"))
        (tmp / "config.json").write_text("{}")
        (tmp / "secret.bin").write_bytes(b"")
        (tmp / "secret.bin").chmod(0o600)
    assert mode(out / "model.safetensors") == mode(out / "config.json") == 0o644
    assert mode(out / "sub" / "model-00001-of-00002.safetensors") == 0o644
    assert mode(out / "secret.bin") == 0o600  # only the weights' files are touched


def test_modes_follow_the_umask(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(f))
    old = os.umask(0o027)
    try:
        atomic.umask_file_modes(tmp_path)
    finally:
        os.umask(old)
    assert mode(f) == 0o640


def test_stale_temporaries_of_dead_runs_go_and_those_of_live_ones_stay(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    final = tmp_path / "task=x"
    gone_dir, gone_file = tmp_path / f".task=x.tmp-{dead}-abc123", tmp_path / f".task=x.tmp-{dead}-def456"
    live = tmp_path / f".task=x.tmp-{os.getpid()}-0a1b2c"
    other = tmp_path / f".task=y.tmp-{dead}-abc123"
    for d in (gone_dir, live, other):
        d.mkdir()
    gone_file.write_text("half")
    atomic.remove_stale_temporaries(final)
    assert not gone_dir.exists() and not gone_file.exists()
    assert live.is_dir() and other.is_dir()  # a live run's work, and another directory's temporaries


def test_datasets_cache_moves_under_cache_dir_when_hf_home_is_read_only(tmp_path, monkeypatch):
    """In a container whose HF cache is mounted read-only, datasets' Arrow cache (written even for a local
    file) goes under CACHE_DIR; with a writable HF_HOME it stays where datasets keeps it."""
    from jobs.core import caches

    hf = tmp_path / "hf"
    hf.mkdir()
    for key in ("HF_DATASETS_CACHE", *caches.cache_env(tmp_path).keys()):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf))
    assert "HF_DATASETS_CACHE" not in caches.use(tmp_path / "c1")
    monkeypatch.setattr(caches.os, "access", lambda path, mode: False)  # as on a read-only mount
    for key in caches.cache_env(tmp_path).keys():
        monkeypatch.delenv(key, raising=False)
    assert caches.use(tmp_path / "c2")["HF_DATASETS_CACHE"] == str(tmp_path / "c2" / "datasets")
