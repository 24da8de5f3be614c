"""One writer per output: an advisory lock on a hidden file beside each results directory, checkpoint or
report a stage writes, taken before the stage looks at what is already there and held until it is done.

The lock is ``fcntl.flock`` on ``<parent>/.<name>.lock``. The kernel releases it when the holder exits,
however it exits (SIGKILL included), so a lock is never stale and the file is never removed (removing
it while another process waits on it would let two processes hold "the" lock). The holder writes its
pid, host, command and start time into the file, so that a second run can name it in its one-line error.
Hidden names (a leading dot) keep Hive readers (pyarrow.dataset, DuckDB, pandas) from listing it.

Where it holds:
- one host, and containers on that host sharing the volume (bind mounts and Docker volumes are the
  same kernel's files): always.
- several hosts on NFS: Linux emulates ``flock`` with NFS byte-range locks (since 2.6.12), so NFSv4, and
  NFSv3 with lockd/NLM, lock across hosts; a mount with ``-o nolock`` (or ``local_lock=all``/``flock``)
  keeps locks on each client, and two hosts could then both write. A holder whose host dies keeps NFSv4's
  lock until its lease expires (about 90 s). Lustre needs its ``flock`` mount option; CephFS locks across
  clients.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

from jobs.core import provenance
from jobs.core.errors import LockError


def lock_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


def holder(output: str | os.PathLike) -> dict:
    """What the current holder of ``output``'s lock wrote about itself ({} if nothing readable)."""
    try:
        return json.loads(lock_path(output).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    if not info.get("pid"):
        return "another run"
    return (f"pid {info['pid']} on {info.get('host', '?')} since {info.get('started', '?')} "
            f"({info.get('command', '?')})")


@contextlib.contextmanager
def hold(output: str | os.PathLike, *, what: str = "output", shared: bool = False) -> Iterator[Path]:
    """Hold ``output``'s lock for the ``with`` block, or raise LockError naming the holder at once.

    ``shared``: several holders at once (the shards of one set share their set's directory) while an
    exclusive holder (an unsharded run of that set) excludes them all. Only exclusive holders sign the file.
    A second run stops rather than waits: the first one's output decides what the second should do
    (skip, resume or refuse), so it is simply run again."""
    output = Path(output)
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockError(f"{output}: {what} is being written by {describe(holder(output))}; "
                            "wait for it to finish, then run again") from None
        if not shared:
            info = {"pid": os.getpid(), "host": provenance.host()["hostname"], "command": provenance.command_line(),
                    "started": provenance.now()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield path
        finally:
            if not shared:
                os.ftruncate(fd, 0)  # unsigned before it is released: no later reader blames a finished run
    finally:
        os.close(fd)  # releases the lock
