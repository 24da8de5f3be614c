"""Write a file or a directory so that no reader ever sees it half-written: into a hidden temporary
sibling first, renamed onto the real name only when complete (rename is atomic on one filesystem)."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}")


def remove_stale_temporaries(final: Path) -> None:
    """Remove the temporary siblings of ``final`` that a killed run left (SIGKILL skips the clean-up of
    ``atomic_file`` and ``atomic_dir``): never renamed, so never complete. Those of a process still alive are its work in progress."""
    for stale in Path(final).parent.glob(f".{Path(final).name}.tmp-*"):
        pid = stale.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and replaces ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; on success it takes ``path``'s place (an older
    ``path`` is removed only after that), on failure it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        umask_file_modes(tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the finished directory ``src`` onto ``dst``; an existing ``dst`` goes only after that."""
    old = None
    if dst.exists():
        old = _sibling(dst, "old")
        dst.rename(old)
    try:
        src.rename(dst)
    except BaseException:
        if old is not None and not dst.exists():
            old.rename(dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def umask_file_modes(root: Path) -> None:
    """Give every ``*.safetensors`` file under ``root`` the mode a plain ``open()`` would have (0o666 less
    the umask). safetensors >= 0.8 writes through a temporary file created 0600 and renamed into place
    (safetensors/safetensors#782), so a checkpoint's weights would be readable by their writer only: not
    by another user sharing models/, nor by a container running as another uid (make's DOCKER_USER)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in Path(root).rglob("*.safetensors"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)
