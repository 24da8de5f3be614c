"""The aggregate stage's quantization statistics on a small synthetic archive: noise-floor row, sections,
worst tokens, plots, top-K read back from Parquet."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import cli
from jobs.archive import logprobs
from jobs.engines.base import SequenceScores


def write_model(root, label, dists, texts, k, sets=("a", "b"), tokenizer_path=None, runtime=None, dataset=None):
    """dists: (n_tokens, V) log-probabilities per position of each text, laid out text after text."""
    for name in sets:
        seqs, row = [], 0
        for sid, ids in enumerate(texts):
            n = len(ids)
            lp = dists[row:row + n]
            row += n
            top = np.argsort(-lp, axis=1)[:, :k]
            actual = np.full(n, np.nan, np.float32)
            actual[1:] = lp[np.arange(n - 1), ids[1:]]
            rank = np.full(n, -1, np.int32)
            rank[1:] = (lp[:-1] > actual[1:, None]).sum(1) + 1
            tk_ids = np.vstack([np.full((1, k), -1), top[:-1]]).astype(np.int32)
            tk_lp = np.vstack([np.full((1, k), np.nan), np.take_along_axis(lp, top, 1)[:-1]]).astype(np.float32)
            seqs.append(SequenceScores(sid, np.asarray(ids, np.int32), actual, rank, tk_ids[:, 0], tk_lp[:, 0],
                                              tk_ids if k > 1 else None, tk_lp if k > 1 else None))
        table = logprobs.sequences_to_table(seqs, topk=k)
        meta = {"fingerprint": label, "model": {"ref": label}, "tokenizer": {"path": str(tokenizer_path or "")},
                "dataset": {"name": name, **((dataset or {}).get(name) or {})}, "runtime": runtime or {},
                "counts": {"rows_total": table.num_rows}}
        logprobs.atomic_write_table(table, logprobs.dataset_dir(root, label, name) / "part-00000.parquet", meta)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    rng = np.random.default_rng(0)
    v, n_texts, length = 50, 12, 30
    texts = [rng.integers(0, v, length) for _ in range(n_texts)]
    logits = rng.normal(0, 3, (n_texts * length, v))
    base = logits - np.log(np.exp(logits).sum(1, keepdims=True))

    def shifted(scale):
        x = logits + rng.normal(0, scale, logits.shape)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    root = tmp_path_factory.mktemp("archive")
    write_model(root, "bf16", base, texts, 8)
    write_model(root, "bf16~noise", shifted(0.01), texts, 8)
    write_model(root, "q4", shifted(0.5), texts, 8)
    r = cli("aggregate", "--results-dir", root, "--baseline", "bf16", "--bootstrap", 200)
    assert r.exit_code == 0, r.output
    return root


def test_summary_holds_every_statistic_with_intervals(archive):
    s = json.loads((archive / "report" / "summary.json").read_text())
    assert s["noise_floor"] == ["bf16~noise"]
    assert s["statistics"]["topk"] == {"bf16": 8, "bf16~noise": 8, "q4": 8}
    for m in ("bf16~noise", "q4"):
        for block in [s["models"][m]["sets"]["a"], s["models"][m]["sets"]["b"], s["models"][m]["overall"]]:
            c = block["comparison"]
            for key in ("kld", "delta_p"):
                assert set(c[key]["quantiles"]) == {"99.9", "99", "95", "90", "50", "10", "5", "1", "0.1"}
                assert c[key]["mean"]["lo"] <= c[key]["mean"]["value"] <= c[key]["mean"]["hi"]
            assert c["kld_reverse"]["mean"]["value"] > 0 and c["delta_p"]["rms"]["value"] > 0
            assert [a["k"] for a in c["topk_agreement"]] == list(range(1, 9))
            assert c["ln_ppl_ratio"]["value"] == pytest.approx(block["paired"]["delta_nll"], abs=1e-9)
            assert c["by_confidence"] and c["by_position"]
    noise, q4 = (s["models"][m]["overall"]["comparison"] for m in ("bf16~noise", "q4"))
    assert noise["kld"]["mean"]["hi"] < q4["kld"]["mean"]["lo"]  # the noise floor is far below a real change
    assert noise["topk_agreement"][0]["value"] > q4["topk_agreement"][0]["value"]


def test_report_opens_with_the_verdict_then_core_tables_then_the_appendix(archive):
    md = (archive / "report" / "report.md").read_text()
    order = ["## Verdict", "## Perplexity", "## Distribution shift", "## Path noise", "## Per set, paired",
             "## Provenance", "## Plots", "# Appendix", "### KLD and Δp percentiles", "### Top-k agreement",
             "### By the baseline's confidence", "### By context length", "### Where it hurts"]
    assert [md.index(t) for t in order] == sorted(md.index(t) for t in order)
    verdict = md.split("## Verdict")[1].split("## Perplexity")[0]
    assert "- **q4**" in verdict and "noise floor (bf16~noise" in verdict and "exceeds it in Δnll" in verdict
    section = md.split("## Distribution shift")[1].split("## Path noise")[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| bf16~noise") or ln.startswith("| q4")]
    assert rows[0].startswith("| bf16~noise *(noise floor)* |") and rows[-1].startswith("| q4 |")
    assert "lower bound" in md
    assert "pass `--tokenizer" in md  # no tokenizer recorded here: ids only, and the report says how to decode
    for png in ("kld_cdf.png", "topk_agreement.png", "delta_nll_by_confidence.png"):
        assert (archive / "report" / png).stat().st_size > 1000 and f"]({png})" in md


def test_worst_tokens_parquet(archive):
    t = pq.read_table(archive / "report" / "worst_tokens.parquet").to_pandas()
    assert set(t["model"]) == {"bf16~noise", "q4"} and set(t["criterion"]) == {"delta_nll", "kld"}
    q = t[(t.model == "q4") & (t.criterion == "delta_nll") & (t.dataset == "a")]
    assert len(q) == 12 * 29  # fewer positions than the cap: all of them, worst first
    assert q["delta_nll"].is_monotonic_decreasing
    assert (q["delta_nll"] == q["base_logprob"] - q["model_logprob"]).all()
    assert all(len(c) <= 12 for c in q["context_ids"])


def test_context_is_decoded_with_a_tokenizer(tmp_path, tiny_model):
    rng = np.random.default_rng(1)
    texts = [rng.integers(5, 200, 20) for _ in range(3)]
    lg = rng.normal(0, 2, (60, 256))
    base = lg - np.log(np.exp(lg).sum(1, keepdims=True))
    write_model(tmp_path, "bf16", base, texts, 4, sets=("a",), tokenizer_path=tiny_model)
    write_model(tmp_path, "q", base[::-1].copy(), texts, 4, sets=("a",), tokenizer_path=tiny_model)
    r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "bf16", "--bootstrap", 100)
    assert r.exit_code == 0, r.output
    t = pq.read_table(tmp_path / "report" / "worst_tokens.parquet").to_pandas()
    assert t["token"].notna().all() and t["context"].notna().all()
    assert "pass `--tokenizer" not in (tmp_path / "report" / "report.md").read_text()
    r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "bf16", "--tokenizer", tmp_path / "nothing")
    assert r.exit_code == 1 and "no tokenizer.json" in r.stderr


def test_top1_only_archives_still_get_a_bound(tmp_path):
    rng = np.random.default_rng(2)
    texts = [rng.integers(0, 20, 25) for _ in range(4)]
    lg = rng.normal(0, 2, (100, 20))
    base = lg - np.log(np.exp(lg).sum(1, keepdims=True))
    write_model(tmp_path, "bf16", base, texts, 1, sets=("a",))
    write_model(tmp_path, "q", base + 0.0, texts, 1, sets=("a",))
    r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "bf16", "--bootstrap", 100)
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "report" / "summary.json").read_text())
    c = s["models"]["q"]["overall"]["comparison"]
    assert s["statistics"]["topk"] == {"bf16": 1, "q": 1} and c["kld"]["mean"]["value"] == pytest.approx(0, abs=1e-6)
    assert [a["k"] for a in c["topk_agreement"]] == [1]
