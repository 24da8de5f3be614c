"""Where a model or tokenizer reference points: a local directory, or a hub id resolved through the cache."""
from __future__ import annotations

import os
import re
from pathlib import Path

from jobs.core.errors import CheckpointError, OfflineError, first_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a scorer needs from a hub snapshot; skipping *.bin/*.pth avoids fetching duplicate weight formats.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def unreachable(exc: BaseException) -> bool:
    """Is ``exc`` what huggingface_hub or datasets raise for a file that is not cached while the hub cannot
    be reached (offline mode, no network)? datasets raises the builtin ConnectionError ("Couldn't reach")."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return isinstance(exc, (ConnectionError, LocalEntryNotFoundError, OfflineModeIsEnabled))


def looks_like_hub_id(ref: str) -> bool:
    if not _HUB_ID.match(ref) or Path(ref).exists():
        return False
    # "models/x" with an existing "models/" is a missing local checkpoint, not a hub repo.
    return not Path(ref.split("/", 1)[0]).is_dir()


def resolve(ref: str, what: str = "model") -> Path:
    """A local directory for ``ref``: the directory itself, or the hub snapshot in HF_HOME's cache."""
    if not ref:
        raise CheckpointError(f"no {what} given")
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{what} {ref!r} is a file, not a checkpoint directory")
        return path
    if not looks_like_hub_id(ref):
        raise CheckpointError(f"{what} directory not found: {ref}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(ref, allow_patterns=ALLOW_PATTERNS, local_files_only=hub_offline()))
    except LocalEntryNotFoundError:  # huggingface_hub's word for "not cached, and the hub cannot be reached"
        raise OfflineError(
            f"{what} {ref!r} is not in the Hugging Face cache and cannot be downloaded"
            f"{' (HF_HUB_OFFLINE=1)' if hub_offline() else ''}: download it once online with "
            "HF_HOME pointing at the cache you mount, or pass a local directory"
        ) from None
    except RepositoryNotFoundError:  # GatedRepoError is one too
        raise CheckpointError(
            f"{what} {ref!r}: no such repository on the hub, or it is gated (set HF_TOKEN)"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"{what} {ref!r}: download failed ({type(exc).__name__}: {first_line(exc)[:200]})") from None
