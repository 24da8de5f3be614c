"""The demo pipeline end to end on the CPU: quantize → validate → score (3 models) → aggregate."""
import json

import numpy as np
import pyarrow.dataset as pads
import pytest

from conftest import cli
from jobs.archive import logprobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_model, tiny_nvfp4, tiny_modelopt, eval_files):
    out = tmp_path_factory.mktemp("results")
    for label, path in [("bf16", tiny_model), ("llmc-nvfp4", tiny_nvfp4), ("modelopt-nvfp4", tiny_modelopt)]:
        r = cli("score", "--model", path, "--label", label, "--datasets", eval_files, "--tokenizer", tiny_model,
                "--results-dir", out, "--part-size", 16)
        assert r.exit_code == 0, r.output
    r = cli("aggregate", "--results-dir", out, "--baseline", "bf16", "--bootstrap", 500)
    assert r.exit_code == 0, r.output
    return out


def test_scored_nll_equals_an_independent_forward_pass(results, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    table, _ = logprobs.read_dataset(results / "logprobs" / "model=bf16" / "dataset=wiki")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    sid = table.column("sample_id").to_numpy()
    for s in np.unique(sid)[:4]:
        rows = sid == s
        ids = torch.tensor(table.column("token_id").to_numpy()[rows])[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)  # one sequence, no padding
        expected = lp.gather(-1, ids[0, 1:, None])[:, 0].numpy()
        got = table.column("logprob").to_numpy(zero_copy_only=False)[rows][1:]
        np.testing.assert_allclose(got, expected, atol=2e-4)
        top1 = lp.argmax(-1).numpy()
        assert (table.column("top1_id").to_numpy(zero_copy_only=False)[rows][1:] == top1).mean() > 0.99
        ranks = (lp > lp.gather(-1, ids[0, 1:, None])).sum(-1).numpy() + 1
        assert (table.column("rank").to_numpy(zero_copy_only=False)[rows][1:] == ranks).mean() > 0.99


def test_hive_layout_is_readable_as_one_dataset(results):
    ds = pads.dataset(results / "logprobs", format="parquet", partitioning="hive")
    t = ds.to_table(columns=["model", "dataset", "logprob"])
    assert set(t.column("model").to_pylist()) == {"bf16", "llmc-nvfp4", "modelopt-nvfp4"}
    assert set(t.column("dataset").to_pylist()) == {"wiki", "chat"}


def test_metadata_records_provenance(results):
    part = sorted((results / "logprobs" / "model=llmc-nvfp4" / "dataset=chat").glob("part-*.parquet"))[0]
    m = logprobs.read_metadata(part)
    assert m["schema_version"] == logprobs.SCHEMA_VERSION
    assert m["model"]["label"] == "llmc-nvfp4" and len(m["model"]["content_hash"]) == 64
    assert m["quantization"]["method"] == "compressed-tensors" and m["quantization"]["scheme"] == "NVFP4"
    assert m["quantization"]["group_size"] == 16 and m["quantization"]["ignore"] == ["lm_head"]
    assert len(m["tokenizer"]["hash"]) == 64
    assert m["dataset"]["name"] == "chat" and m["dataset"]["sha256"]
    assert m["sampling"]["max_model_len"] == 2048 and m["sampling"]["min_tokens"] == 16
    assert m["runtime"]["backend"] == "transformers" and m["runtime"]["backend_version"]
    assert "dequantized" in m["runtime"]["kernel_path"]
    assert m["counts"]["texts_total"] > 0 and m["counts"]["rows_total"] > 0
    assert "score" in m["command"]


def test_nvfp4_models_lose_quality_with_intervals(results):
    s = json.loads((results / "report" / "summary.json").read_text())
    bf16 = s["models"]["bf16"]["overall"]
    assert bf16["score"] == pytest.approx(100.0)
    for label in ("llmc-nvfp4", "modelopt-nvfp4"):
        o = s["models"][label]["overall"]
        assert o["nll"] > bf16["nll"]
        p = o["paired"]
        assert p["delta_nll_lo"] > 0 and p["delta_nll_lo"] <= p["delta_nll"] <= p["delta_nll_hi"]
        assert o["score"] < 100 and p["score_lo"] <= o["score"] <= p["score_hi"]
        assert 0.5 < p["same_top1"] < 1.0
        assert p["delta_p"] < 0


def test_report_files(results):
    rep = results / "report"
    md = (rep / "report.md").read_text()
    assert "| llmc-nvfp4 |" in md and "| modelopt-nvfp4 |" in md and "conf_ppl" in md
    assert "95 % CI" in md
    csv = (rep / "summary.csv").read_text().splitlines()
    assert csv[0].startswith("model,dataset,tokens") and len(csv) == 1 + 3 * 3
    assert csv[0].endswith(",kld,kld_lo,kld_hi,kld_reverse,delta_p_rms,topk")
    for png in ["score.png", "delta_nll_wiki.png", "delta_nll_chat.png"]:
        assert (rep / png).read_bytes()[:4] == b"\x89PNG"


def test_top20_by_default_gives_every_statistic(results):
    s = json.loads((results / "report" / "summary.json").read_text())
    assert s["statistics"]["topk"] == {"bf16": 20, "llmc-nvfp4": 20, "modelopt-nvfp4": 20}
    for label in ("llmc-nvfp4", "modelopt-nvfp4"):
        c = s["models"][label]["overall"]["comparison"]
        assert 0 < c["kld"]["mean"]["lo"] <= c["kld"]["mean"]["value"] <= c["kld"]["mean"]["hi"]
        assert len(c["topk_agreement"]) == 10 and c["topk_agreement"][0]["value"] > c["topk_agreement"][9]["value"]
    md = (results / "report" / "report.md").read_text()
    assert "## Distribution shift" in md and "### Where it hurts" in md and "⟦" in md


def test_validate_passes_on_both_nvfp4_formats(tiny_nvfp4, tiny_modelopt):
    for path in (tiny_nvfp4, tiny_modelopt):
        r = cli("validate", "--model", path, "--expect-scheme", "NVFP4", "--max-new-tokens", 8)
        assert r.exit_code == 0, r.output
        report = json.loads(r.stdout)
        assert all(g.strip() for g in report["generations"])


def test_quality_gate(results, tiny_nvfp4):
    base = results / "logprobs" / "model=bf16" / "dataset=wiki"
    ok = cli("validate", "--model", tiny_nvfp4, "--baseline-logprobs", base, "--max-nll-increase", 5)
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["quality_gate"]["delta_nll"] > 0
    bad = cli("validate", "--model", tiny_nvfp4, "--baseline-logprobs", base, "--max-nll-increase", 0)
    assert bad.exit_code == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: quality gate: NLL")


def test_quantize_manifest(tiny_nvfp4):
    m = json.loads((tiny_nvfp4 / "qscore.json").read_text())
    assert m["scheme"] == "NVFP4" and "QuantizationModifier" in m["recipe"]
    assert m["calibration"]["samples"] == 32 and m["calibration"]["max_sequence_length"] == 128
    assert m["calibration"]["split"] is None  # a local file has no splits (not the hub default train_sft)
    assert m["versions"]["llmcompressor"] == "0.14.0.1" and m["wall_time_s"] > 0 and m["peak_rss_gib"] > 0
