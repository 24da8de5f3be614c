"""Checkpoints are readable by whoever may read their directory: safetensors >= 0.8 creates its files
0600 (safetensors/safetensors#782), which breaks a models/ directory shared with another uid, such as the
scoring container run with DOCKER_USER (make test-images found it)."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from jobs import atomic


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
