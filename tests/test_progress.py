"""What a stage says in a batch log: progress lines per part, and no third-party bars or warnings."""
import io
import logging
import warnings
import sys

from jobs.core import progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_part_lines_are_throttled_with_rate_and_eta(caplog):
    clock = Clock()
    log = logging.getLogger("qscore.test")
    p = progress.PartProgress(log, "m/wiki", parts_total=10, parts_done=2, tokens_todo=8000, every=30, now=clock)
    with caplog.at_level(logging.INFO, "qscore.test"):
        clock.t = 10.0
        p.part(1000)  # the first line always: 1000 tokens in 10 s
        clock.t = 20.0
        p.part(1000)  # 10 s after the last line: none
        clock.t = 45.0
        p.part(1000)
        for _ in range(5):
            p.part(1000)  # the last part always
    assert caplog.messages == ["m/wiki: 3/10 parts, 100 tokens/s, ETA 0:01:10",
                               "m/wiki: 5/10 parts, 67 tokens/s, ETA 0:01:15",
                               "m/wiki: 10/10 parts, 178 tokens/s, ETA 0:00:00"]


def test_clock():
    assert progress.clock(0) == "0:00:00" and progress.clock(3725.4) == "1:02:05"


def test_batch_logs_get_no_library_bars_or_warnings(monkeypatch):
    from tqdm.std import tqdm

    monkeypatch.setattr(tqdm, "__init__", getattr(tqdm.__init__, "__wrapped__", tqdm.__init__))  # restored after
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)
    with warnings.catch_warnings():
        progress.quiet_third_party()
        out = io.StringIO()
        for _ in tqdm(range(3), desc="calibrating", file=out, disable=False):  # a library that insists
            pass
        assert out.getvalue() == ""
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn("a library's warning")  # catch_warnings(record) keeps the filters: ignored
        assert not [w for w in seen if "a library's warning" in str(w.message)]


def test_debug_keeps_library_bars(monkeypatch):
    from tqdm.std import tqdm

    # an earlier stage run in this process may have quieted tqdm already: start from its own __init__
    monkeypatch.setattr(tqdm, "__init__", getattr(tqdm.__init__, "__wrapped__", tqdm.__init__))
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(logging.getLogger(), "level", logging.DEBUG)
    progress.quiet_third_party()
    out = io.StringIO()
    for _ in tqdm(range(3), desc="calibrating", file=out, disable=False):
        pass
    assert "calibrating" in out.getvalue()


def test_quiet_bars_still_keep_time(monkeypatch):
    """vLLM divides by a bar's elapsed seconds: a quieted bar must draw nothing and still count time."""
    import time

    from tqdm.std import tqdm

    monkeypatch.setattr(tqdm, "__init__", getattr(tqdm.__init__, "__wrapped__", tqdm.__init__))
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)
    logging.getLogger().manager._clear_cache()  # isEnabledFor caches what an earlier test's level said
    progress.quiet_third_party()
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = tqdm(total=2, desc="Processed prompts", disable=False)
    time.sleep(0.01)
    bar.update(1)
    assert bar.format_dict["elapsed"] > 0 and err.getvalue() == ""
    bar.close()
