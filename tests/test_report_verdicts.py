"""The report's verdicts and yardsticks: three-way verdicts from intervals, per-model path noise, sets of one
text pooled once, context-length buckets of document windows, the dtype read from the archive; and the
aggregate's faults (a NaN logprob, a model equal to the baseline, a failed run over an existing report)."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import cli
from jobs.archive import logprobs
from jobs.stats import intervals, summary as S
from test_report_stats import write_model


# -- by hand, on small numbers ------------------------------------------------------------------------------------
def test_three_way_reads_the_interval():
    assert intervals.three_way(0.96, 1.10, 0.95) == "pass"
    assert intervals.three_way(0.95, 1.10, 0.95) == "pass"  # the lower end clears it exactly
    assert intervals.three_way(0.80, 0.94, 0.95) == "fail"
    assert intervals.three_way(0.90, 1.10, 0.95) == "inconclusive"
    assert intervals.three_way(None, None, 0.95) == "inconclusive"
    assert intervals.three_way(float("nan"), 1.0, 0.95) == "inconclusive"


def test_units_to_decide_is_the_normal_approximation():
    # half-width 0.1 on 100 texts, effect 0.05 from the line: n' = 100 · (0.1/0.05)² = 400 → 300 more
    assert intervals.units_to_decide(1.0, 0.9, 1.1, 0.95, 100) == 300
    assert intervals.units_to_decide(1.0, 0.96, 1.04, 0.95, 100) is None  # already decided
    assert intervals.units_to_decide(0.95, 0.9, 1.0, 0.95, 100) is None  # on the line: no n decides it


def test_within_a_noise_band():
    # noise ±0.01: an effect [0.02, 0.04] exceeds it, [-0.005, 0.008] is within, [0.005, 0.025] is open
    assert intervals.within(0.02, 0.04, 0.03, 0.01, 50)["outcome"] == "exceeds"
    assert intervals.within(-0.04, -0.02, -0.03, -0.01, 50)["outcome"] == "exceeds"  # the sign of the noise is not its size
    assert intervals.within(-0.005, 0.008, 0.001, 0.01, 50)["outcome"] == "within"
    w = intervals.within(0.005, 0.025, 0.015, 0.01, 50)
    # half-width 0.01, effect 0.005 beyond the edge: n' = 50 · (0.01/0.005)² = 200 → 150 more
    assert w == {"outcome": "inconclusive", "more": 150}


def test_noise_checks_and_perplexity_check_by_hand():
    overall = {"texts": 40, "score": 97.0, "paired": {"delta_nll": 0.03, "delta_nll_lo": 0.02, "delta_nll_hi": 0.04,
                                                      "score_lo": 96.0, "score_hi": 98.0},
               "comparison": {"kld": {"mean": {"value": 0.05, "lo": 0.04, "hi": 0.06}},
                              "delta_p": {"rms": {"value": 0.02, "lo": 0.018, "hi": 0.022}},
                              "same_top1": {"value": 0.9, "lo": 0.88, "hi": 0.92}}}
    noise = S.PathNoise("q~bf16", "q", "dtype float32 → bfloat16", {"value": -0.007, "lo": -0.01, "hi": -0.004},
                        kld=0.055, rms_delta_p=0.01, top1_disagreement=0.094, tokens=1000)
    got = {c.figure: c.outcome for c in S.noise_checks(overall, noise, "own path noise")}
    assert got == {"Δnll vs own path noise": "exceeds",  # [0.02, 0.04] lies beyond ±0.007
                   "mean KLD vs own path noise": "inconclusive",  # [0.04, 0.06] straddles 0.055
                   "RMS Δp vs own path noise": "exceeds",  # [0.018, 0.022] > 0.01
                   "top-1 disagreement vs own path noise": "inconclusive"}  # [0.08, 0.12] straddles 0.094
    c = S.perplexity_check(overall, 0.95)
    assert (c.outcome, c.against, c.more) == ("pass", 95.0, None)
    c = S.perplexity_check({**overall, "paired": {**overall["paired"], "score_lo": 94.0, "score_hi": 100.0}}, 0.95)
    # half-width 3, effect 2: n' = 40 · (3/2)² = 90 → 50 more texts
    assert (c.outcome, c.more) == ("inconclusive", 50)


def test_tasks_check_and_combine():
    rows = [{"model": "q", "task": "t", "metric": "acc", "filter": "none", "verdict": v, "recovery": 1.0,
             "recovery_lo": 0.9, "recovery_hi": 1.1, "more_documents": 7} for v in ("pass", "inconclusive")]
    c = S.tasks_check(rows, "q")
    assert c.outcome == "inconclusive" and c.more == 7 and c.unit == "documents"
    assert S.tasks_check([{**rows[0], "verdict": "fail"}] + rows, "q").outcome == "fail"
    assert S.combine("pass", None) == "pass" and S.combine("pass", "inconclusive") == "inconclusive"
    assert S.combine("inconclusive", "fail") == "fail"


def test_pooled_sets_by_text_identity_not_by_name():
    meta = {"wiki_mini": {"sha256": "aa"}, "wikitext2_doc": {"sha256": "aa", "kind": "document"},
            "chat_mini": {"sha256": "bb"}, "wiki_copy_named_differently": {"sha256": "cc"}}
    pooled, same = S.pooled_sets(sorted(meta), meta)
    assert pooled == ["chat_mini", "wiki_copy_named_differently", "wiki_mini"]
    assert same == {"wikitext2_doc": "wiki_mini"}


def test_context_lengths_of_rolling_windows():
    # a document of 12 tokens (positions 1..11 scored) in windows of 4 (stride 3): windows [0,4) [3,7) [6,10),
    # and the last one [8,12): as much context as fits
    sid = np.zeros(11, np.int64)
    pos = np.arange(1, 12)
    assert S.context_lengths(sid, pos, 4, None).tolist() == [1, 2, 3, 1, 2, 3, 1, 2, 3, 2, 3]


def test_near_uniform():
    assert S.near_uniform("b", np.log(1058), 1024, 1058, "x")  # the untrained model of issue #21
    assert S.near_uniform("b", np.log(120), 1024, 120, "x") is None


# -- through the CLI ---------------------------------------------------------------------------------------------
def _dists(rng, n, v, logits=None, scale=0.0):
    x = (rng.normal(0, 3, (n, v)) if logits is None else logits) + (rng.normal(0, scale, (n, v)) if scale else 0)
    return x - np.log(np.exp(x).sum(1, keepdims=True)), x


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """bf16 (scored in float32), q and q~bf16 (the same checkpoint in bfloat16), sets a and b of one text
    (same sha256) and c."""
    rng = np.random.default_rng(3)
    v, n_texts, length = 40, 10, 25
    texts = [rng.integers(0, v, length) for _ in range(n_texts)]
    base, logits = _dists(rng, n_texts * length, v)
    q, ql = _dists(rng, n_texts * length, v, logits, 0.5)
    qt, _ = _dists(rng, n_texts * length, v, ql, 0.05)
    ds = {"a": {"sha256": "same"}, "b": {"sha256": "same"}, "c": {"sha256": "other"}}
    root = tmp_path_factory.mktemp("twins")
    write_model(root, "bf16", base, texts, 6, sets=("a", "b", "c"), dataset=ds, runtime={"dtype": "float32"})
    write_model(root, "q", q, texts, 6, sets=("a", "b", "c"), dataset=ds, runtime={"dtype": "float32"})
    write_model(root, "q~bf16", qt, texts, 6, sets=("a", "b", "c"), dataset=ds, runtime={"dtype": "bfloat16"})
    r = cli("aggregate", "--results-dir", root, "--baseline", "bf16", "--bootstrap", 200)
    assert r.exit_code == 0, r.output
    return root, texts, q, qt


def test_a_models_twin_is_its_path_noise(twins):
    root, texts, q, qt = twins
    s = json.loads((root / "report" / "summary.json").read_text())
    pn = s["path_noise"]["q~bf16"]
    assert pn["reference"] == "q" and pn["path"] == "dtype float32 → bfloat16"
    # Δnll of the twin against q, by hand over the pooled sets a and c (b is a's text again)
    idx = np.concatenate([np.arange(i * 25, i * 25 + 24) for i in range(len(texts))])
    nxt = np.concatenate([t[1:] for t in texts])
    d = q[idx, nxt] - qt[idx, nxt]
    assert pn["delta_nll"]["value"] == pytest.approx(d.mean(), abs=1e-5)
    assert pn["tokens"] == 2 * len(d)
    v = s["verdict"]["q"]
    assert {c["figure"] for c in v["noise"]} >= {"Δnll vs own path noise", "mean KLD vs own path noise"}
    md = (root / "report" / "report.md").read_text()
    assert "own path noise (q~bf16: dtype float32 → bfloat16)" in md


def test_one_text_is_pooled_once_and_dtype_comes_from_the_archive(twins):
    root, texts, *_ = twins
    s = json.loads((root / "report" / "summary.json").read_text())
    assert s["overall_sets"] == ["a", "c"] and s["same_text"] == {"b": "a"}
    assert s["models"]["q"]["overall"]["tokens"] == 2 * len(texts) * 24
    md = (root / "report" / "report.md").read_text()
    row = next(ln for ln in md.split("## Perplexity")[1].splitlines() if ln.startswith("| bf16 |"))
    assert row.split("|")[2].strip() == "float32"  # the label says bf16; the archive says float32
    assert "b (the same text as a" in md


def _doc_archive(root, window):
    rng = np.random.default_rng(4)
    v = 30
    texts = [rng.integers(0, v, 20) for _ in range(3)] + [rng.integers(0, v, 200)]  # one long document
    n = sum(len(t) for t in texts)
    base, lg = _dists(rng, n, v)
    q, _ = _dists(rng, n, v, lg, 0.3)
    ds = {"d": {"kind": "document", "rolling": {"window": window, "stride": window - 1},
                "units": {"words": [10] * len(texts), "bytes": [50] * len(texts)}}}
    for label, dist in (("bf16", base), ("q", q)):
        write_model(root, label, dist, texts, 4, sets=("d",), dataset=ds)


def test_context_buckets_stop_at_the_window_and_one_text_buckets_have_no_interval(tmp_path):
    _doc_archive(tmp_path, 64)
    r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "bf16", "--bootstrap", 100)
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "report" / "summary.json").read_text())
    rows = s["models"]["q"]["overall"]["comparison"]["by_position"]
    assert max(b["hi_edge"] for b in rows) <= 64  # no token had more context than its window
    few = [b for b in rows if b["texts"] < 2]
    assert few and all(b["too_few_texts"] and b["delta_nll"]["lo"] is None for b in few)
    assert "(n too small)" in (tmp_path / "report" / "report.md").read_text()
    kld = s["models"]["q"]["overall"]["comparison"]["kld"]
    assert kld["min"] >= 0 and all(q["value"] >= 0 for q in kld["quantiles"].values())


def _small(root):
    rng = np.random.default_rng(5)
    texts = [rng.integers(0, 20, 15) for _ in range(4)]
    base, lg = _dists(rng, 60, 20)
    q, _ = _dists(rng, 60, 20, lg, 0.4)
    write_model(root, "bf16", base, texts, 4, sets=("a",))
    write_model(root, "q", q, texts, 4, sets=("a",))


def test_a_nan_logprob_is_one_line_and_leaves_the_previous_report(tmp_path):
    _small(tmp_path)
    assert cli("aggregate", "--results-dir", tmp_path, "--baseline", "bf16", "--bootstrap", 100).exit_code == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()}
    part = logprobs.dataset_dir(tmp_path, "q", "a") / "part-00000.parquet"
    t = pq.read_table(part)
    lp = t.column("logprob").to_numpy(zero_copy_only=False).copy()
    lp[5] = np.nan
    meta = logprobs.read_metadata(part)
    logprobs.atomic_write_table(t.set_column(t.schema.get_field_index("logprob"), "logprob",
                                             __import__("pyarrow").array(lp, t.schema.field("logprob").type)), part, meta)
    r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "bf16", "--bootstrap", 100)
    assert r.exit_code == 1 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "logprob is nan" in r.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report") and p.suffix != ".lock"]  # the lock file stays by design
    shutil.rmtree(tmp_path / "report")
    r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "bf16", "--bootstrap", 100)
    assert r.exit_code == 1 and not (tmp_path / "report").exists()


def test_a_model_identical_to_the_baseline(tmp_path):
    _small(tmp_path)
    shutil.copytree(logprobs.dataset_dir(tmp_path, "bf16", "a"), logprobs.dataset_dir(tmp_path, "same", "a"))
    r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "bf16", "--bootstrap", 100)
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "report" / "summary.json").read_text())
    o = s["models"]["same"]["overall"]
    assert o["score"] == pytest.approx(100) and o["paired"]["delta_nll"] == 0
    assert (tmp_path / "report" / "score.png").stat().st_size > 1000


def test_a_failing_aggregate_leaves_the_old_report_whole(tmp_path, monkeypatch):
    _small(tmp_path)
    assert cli("aggregate", "--results-dir", tmp_path, "--baseline", "bf16", "--bootstrap", 100).exit_code == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()}
    from jobs.report import outputs

    def boom(*a, **k):
        raise KeyboardInterrupt  # killed after the plots and summary.json were staged
    monkeypatch.setattr(outputs, "render_markdown", boom)
    r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "bf16", "--bootstrap", 100, "--seed", 1)
    assert r.exit_code != 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report") and p.suffix != ".lock"]


def test_a_twin_scored_on_fewer_sets_is_left_out_not_narrowing_the_comparison(tmp_path):
    _small(tmp_path)
    rng = np.random.default_rng(6)
    texts = [rng.integers(0, 20, 15) for _ in range(4)]
    base, _ = _dists(rng, 60, 20)
    for label in ("bf16", "q"):
        write_model(tmp_path, label, base, texts, 4, sets=("b",))
    write_model(tmp_path, "q~bf16", base, texts, 4, sets=("b",))  # only on b
    r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "bf16", "--bootstrap", 100)
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert s["sets"] == ["a", "b"] and "q~bf16" not in s["models"]
    assert any("q~bf16 is left out" in w and "a missing" in w for w in s["warnings"])


def test_kill_9_of_aggregate_mid_write_leaves_the_old_report_whole(tmp_path):
    """SIGKILL while the new report directory is being staged: the old report stays byte for byte (or, if the
    kill came too late, the new one is whole); the next run clears the stale staging and writes a whole report."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    _small(tmp_path)
    args = ["aggregate", "--results-dir", str(tmp_path), "--baseline", "bf16", "--bootstrap", "100"]
    assert cli(*args).exit_code == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()}
    proc = subprocess.Popen([sys.executable, "-m", "jobs", *args, "--seed", "1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = False
    while proc.poll() is None and not staged:
        staged = any(p.is_dir() and p.name.startswith(".report") for p in tmp_path.iterdir())
        time.sleep(0.002)
    if staged:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after = {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()}
    if staged:
        assert after == before
    else:  # finished before the staging directory could be seen: then it is the whole new report
        assert set(after) == set(before) and proc.returncode == 0
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert set(p.name for p in (tmp_path / "report").iterdir()) == set(before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report") and p.suffix != ".lock"]
