"""Errors from the hub and from datasets, classified by their types (huggingface_hub.errors, datasets.exceptions),
never by words in their messages: each becomes one QscoreError that says what to do."""
import httpx
import pytest
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError)

from jobs.core import hub
from jobs.core.errors import CheckpointError, EvalSetError, OfflineError
from jobs.engines import lmeval
from jobs.texts import evalsets


def _response(status: int):
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/a/b"))


@pytest.mark.parametrize("exc, kind, words", [
    (LocalEntryNotFoundError("not cached"), OfflineError, "not in the Hugging Face cache"),
    (RepositoryNotFoundError("404", response=_response(404)), CheckpointError, "no such repository"),
    (GatedRepoError("403", response=_response(403)), CheckpointError, "gated (set HF_TOKEN)"),
    (HfHubHTTPError("500 Server Error", response=_response(500)), CheckpointError, "download failed (HfHubHTTPError"),
])
def test_hub_errors_by_type(monkeypatch, exc, kind, words):
    import huggingface_hub

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(kind, match=words.replace("(", r"\(").replace(")", r"\)")):
        hub.resolve("no-such-org/no-such-model")


def test_what_counts_as_unreachable():
    assert hub.unreachable(ConnectionError("Couldn't reach 'x' on the Hub (OfflineModeIsEnabled)"))  # datasets'
    assert hub.unreachable(LocalEntryNotFoundError("x")) and hub.unreachable(OfflineModeIsEnabled("x"))
    assert not hub.unreachable(ValueError("connection refused in a column name"))  # words are not a type


@pytest.mark.parametrize("exc, kind, words", [
    (ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)"), OfflineError, "_SOURCE"),
    (DatasetNotFoundError("Dataset 'x' doesn't exist on the Hub"), EvalSetError, "no such dataset on the hub"),
    # once classified by its words ("connection", "resolve"): an ordinary failure is reported as one
    (ValueError("cannot resolve the connection column"), EvalSetError, "cannot load dataset"),
])
def test_dataset_errors_by_type(monkeypatch, exc, kind, words):
    import datasets

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(datasets, "load_dataset", fail)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(kind, match=words) as info:
        evalsets.load_rows("some-org/some-set", None, "test")
    assert type(info.value) is kind


def test_offline_a_local_copys_failure_is_its_own(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 makes any failure of a hub set the cache's, never a local file's."""
    bad = tmp_path / "rows.jsonl"
    bad.write_text("not json\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalSetError, match="unreadable as .jsonl") as info:
        evalsets.load_rows(str(bad), None, "test")
    assert type(info.value) is EvalSetError


def test_task_dataset_errors_by_type():
    offline = lmeval._dataset_error(["gsm8k"], ConnectionError("Couldn't reach 'gsm8k' on the Hub"))
    assert isinstance(offline, OfflineError) and "qscore_local" in str(offline)
    assert isinstance(lmeval._dataset_error(["x"], DatasetNotFoundError("gone")), OfflineError)
    other = KeyError("Offline column")  # its words once made it an offline error
    assert lmeval._dataset_error(["x"], other) is other
