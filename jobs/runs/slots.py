"""Run a command on GPUs nobody else is using: one scoring job per GPU at a time, under ``make -j``.

    python3 -m jobs slots --gpus all --per-job 1 -- docker run --gpus {gpus} ... score ...

Each GPU is a lock file (``flock``, held while the command runs, released by the kernel if this process
dies); a job waits until it holds ``--per-job`` of them. The command gets the GPUs as
``CUDA_VISIBLE_DEVICES`` and, for docker, in place of ``{gpus}`` (``device=0`` or ``"device=0,1"``).
``--gpus`` takes the Makefile's GPUS: ``all`` (every GPU nvidia-smi lists), ``device=0``,
``"device=0,1"`` or ``0,1``. Standard library only: the Makefile runs it with the host's python3.

Written here rather than taken from a scheduler because on one host none is installed to take it
from; on a cluster, `make k8s` / `make slurm` hand the same jobs to Kubernetes or Slurm instead.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def parse_gpus(value: str, listed: list[str] | None = None) -> list[str]:
    """GPU ids from a GPUS value (pure): ``all`` means ``listed`` (what nvidia-smi reports)."""
    value = value.strip().strip("'\"")
    if value == "all":
        return list(listed or [])
    value = value.removeprefix("device=")
    return [g for g in re.split(r"[,\s]+", value) if g]


def nvidia_smi_gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in out.splitlines() if ln.strip()]


def docker_value(gpus: list[str]) -> str:
    return f"device={gpus[0]}" if len(gpus) == 1 else f'"device={",".join(gpus)}"'


def acquire(gpus: list[str], n: int, lock_dir: Path, poll_s: float = 2.0):
    """Hold ``n`` of ``gpus``: returns (ids, open lock files). Waits while they are busy."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    announced = False
    while True:
        held = []
        for g in gpus:
            fh = open(lock_dir / f"gpu{g}.lock", "w")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            held.append((g, fh))
            if len(held) == n:
                return [g for g, _ in held], [f for _, f in held]
        for _, fh in held:
            fh.close()
        if not announced:
            print(f"slots: waiting for {n} free GPU(s) of {','.join(gpus)}", file=sys.stderr, flush=True)
            announced = True
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs slots", description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", required=True)
    ap.add_argument("--per-job", type=int, default=1)
    ap.add_argument("--lock-dir", default=os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp",
                                                       f"qscore-gpu-locks-{os.getuid()}"))
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command given")
    gpus = parse_gpus(a.gpus, nvidia_smi_gpus() if a.gpus.strip().strip("'\"") == "all" else None)
    if not gpus:  # all, but nvidia-smi lists none: let the command find its GPUs itself
        return subprocess.call([c.replace("{gpus}", "all") for c in cmd])
    if a.per_job > len(gpus):
        print(f"error: a job needs {a.per_job} GPUs but GPUS lists {len(gpus)} ({','.join(gpus)})", file=sys.stderr)
        return 1
    ids, locks = acquire(gpus, a.per_job, Path(a.lock_dir))
    print(f"slots: GPU {','.join(ids)}", file=sys.stderr, flush=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(ids)}
    proc = subprocess.Popen([c.replace("{gpus}", docker_value(ids)) for c in cmd], env=env)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: proc.send_signal(s))
    code = proc.wait()
    for fh in locks:
        fh.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
