"""The aggregate stage reads one model at a time beside the baseline (issue #24): memory follows the
models in flight, not the models in the archive, and the report is the one each model gets on its own."""
import gc
import json
import weakref

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import cli
from jobs.stages import aggregate
from jobs.stats import quant as quant_stats
from test_report_stats import write_model

# q1 sorts between q and its twins, so taking the labels in name order would hold q past q1; q~a has a
# twin of its own, so q is let go while q~a~b is compared and must be read again for q~c.
LABELS = ("bf16", "bf16~noise", "q", "q1", "q~a", "q~a~b", "q~c")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    rng = np.random.default_rng(5)
    v, n_texts, length = 30, 6, 20
    texts = [rng.integers(0, v, length) for _ in range(n_texts)]
    logits = rng.normal(0, 3, (n_texts * length, v))
    root = tmp_path_factory.mktemp("many")
    for i, label in enumerate(LABELS):
        x = logits + rng.normal(0, 0.02 * i, logits.shape)
        dtype = "bfloat16" if "~" in label else "float32"  # what the twins' path changed
        write_model(root, label, x - np.log(np.exp(x).sum(1, keepdims=True)), texts, 4, runtime={"dtype": dtype})
    return root


@pytest.fixture(scope="module")
def streamed(archive):
    """The full report, counting the models whose top-K matrices are alive at once."""
    alive, seen, reads = set(), [], []
    real = quant_stats.topk_matrices

    def counted(table, where):
        label = where.parent.name.removeprefix("model=")
        out = real(table, where)
        reads.append(label)
        for mat in out.values():
            key = (label, id(mat))
            alive.add(key)
            weakref.finalize(mat, alive.discard, key)
        gc.collect()  # reachable, not merely not yet collected: a cycle's matrices wait for the collector's turn
        seen.append(len({k[0] for k in alive}))
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(quant_stats, "topk_matrices", counted)
    try:
        r = cli("aggregate", "--results-dir", archive, "--baseline", "bf16", "--bootstrap", 100)
    finally:
        mp.undo()
    assert r.exit_code == 0, r.output
    return {"max_alive": max(seen), "reads": reads}


def test_at_most_three_models_are_in_memory_at_once(streamed):
    assert streamed["max_alive"] <= 3
    # every model read once per set (two sets), q once more for its second twin
    assert sorted(set(streamed["reads"])) == sorted(LABELS)
    assert streamed["reads"].count("q") == 4 and all(streamed["reads"].count(m) == 2 for m in LABELS if m != "q")


@pytest.mark.parametrize("alone", ["q", "q1"])
def test_each_model_gets_the_report_it_gets_alone(archive, streamed, tmp_path, alone):
    """A report of the baseline and one model (with their twins) holds the same figures for them as the
    report of every model: nothing of one model leaks into another's, whatever order they are read in."""
    r = cli("aggregate", "--results-dir", archive, "--baseline", "bf16", "--bootstrap", 100, "--labels", alone,
            "--report-dir", tmp_path / "alone")
    assert r.exit_code == 0, r.output
    full = json.loads((archive / "report" / "summary.json").read_text())
    part = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert list(full["models"]) == list(LABELS)
    mine = [m for m in LABELS if m.split("~")[0] in ("bf16", alone)]
    assert list(part["models"]) == mine
    for m in mine:
        assert part["models"][m] == full["models"][m], m
        assert part["statistics"]["topk"][m] == full["statistics"]["topk"][m]
    for key in ("where_it_hurts", "verdict", "path_noise"):
        assert list(part[key]) == [m for m in full[key] if m in mine]
        assert all(part[key][m] == full[key][m] for m in part[key]), key
    assert full["path_noise"]["q~a~b"]["reference"] == "q~a" and full["path_noise"]["q~c"]["reference"] == "q"
    assert "dtype float32 → bfloat16" in full["path_noise"]["q~c"]["path"]
    rows = [pq.read_table(d / "worst_tokens.parquet").to_pandas() for d in (archive / "report", tmp_path / "alone")]
    a, b = (t[t.model.isin(mine)].reset_index(drop=True) for t in rows)
    assert len(a) and a.equals(b)


def test_order_puts_each_twin_after_its_reference():
    seq, refs = aggregate.order(list(LABELS), "bf16")
    assert seq == ["bf16", "bf16~noise", "q", "q~a", "q~a~b", "q~c", "q1"]
    assert refs["q~a~b"] == "q~a" and refs["q~c"] == "q" and refs["q1"] is None
    # a baseline that is itself a twin is read first; its own twins follow it, its reference comes later
    seq, refs = aggregate.order(["q~f32", "q", "q~f32~x", "r"], "q~f32")
    assert seq == ["q~f32", "q~f32~x", "q", "r"] and refs["q~f32"] == "q"
