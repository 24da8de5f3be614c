"""Facts recorded next to every result: versions, command line, host, peak memory."""
from __future__ import annotations

import importlib.metadata
import platform
import resource
import shlex
import sys
import time


def versions(*names: str) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


_COMMAND: list[str] | None = None


def record_command(stage: str, params: dict) -> None:
    """The stage as invoked, with every effective setting (options read from the environment too)."""
    global _COMMAND
    args = ["python", "-m", "jobs", stage]
    for key, value in params.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (None, False):
            args += [flag, str(value)]
    _COMMAND = args


def command_line() -> str:
    args = _COMMAND or [sys.executable.rsplit("/", 1)[-1], "-m", "jobs", *sys.argv[1:]]
    return " ".join(shlex.quote(a) for a in args)


def host() -> dict:
    return {"hostname": platform.node(), "python": platform.python_version(), "platform": platform.platform()}


def peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gpu_info() -> dict:
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
        props = torch.cuda.get_device_properties(0)
        return {"gpu_name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                "gpu_count": torch.cuda.device_count()}
    except Exception:
        return {}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
