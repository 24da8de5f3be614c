"""Document-level WikiText-2 (lm-eval's `wikitext` task): pages, detokenizer, rolling windows, the metrics."""
import json
import math
import os

import numpy as np
import pytest

from conftest import cli
from jobs.stats import docppl
from jobs.texts import evalsets, sampling
from jobs.engines import rolling
from jobs.archive import logprobs
from jobs.core.errors import SettingsError
from jobs.engines.base import SequenceScores

RAW = [" ", " = Alpha = ", " ", " The alpha @-@ beta test , in 1990 . ", " ", " = = History = = ", " ",
       " It 's \" quoted \" ( here ) . ", " ", " = Beta = ", " ", " Second page : done ! ", " "]


def test_pages_are_joined_at_level_one_headings():
    pages = evalsets.join_wikitext_pages(RAW)
    assert len(pages) == 2
    assert pages[0].startswith(" = Alpha = \n \n The alpha") and " = = History = = " in pages[0]
    assert pages[1] == " = Beta = \n \n Second page : done ! \n "
    # the `wikitext` dataset's rows: lines with their newline, blank lines empty
    rows = [ln + "\n" if ln.strip() else "" for ln in RAW]
    assert evalsets.join_wikitext_pages(evalsets.wikitext_rows_to_lines(rows)) == pages


def test_detokenizer_and_units_follow_lm_eval():
    page = evalsets.join_wikitext_pages(RAW)[0]
    text = evalsets.wikitext_detokenizer(page)
    assert "alpha-beta test, in 1990." in text and "It's \"quoted\" (here)." in text and "== History ==" in text
    assert "\n\n" in text and " \n" not in text
    words, nbytes = evalsets.lm_eval_units(page)  # counted on the original page, as lm-eval does
    assert words == len(__import__("re").split(r"\s+", page)) and nbytes == len(page.encode())


def test_document_set_from_a_local_copy(tmp_path):
    pages = evalsets.join_wikitext_pages(RAW)
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"page": p}) + "\n" for p in pages))
    raw = tmp_path / "wiki.test.raw.txt"
    raw.write_text("\n".join(RAW) + "\n")
    for path in (jl, raw):
        es = evalsets.load_set("wikitext2_doc", str(path), {})
        assert es.texts == [evalsets.wikitext_detokenizer(p) for p in pages], path
        assert es.source["kind"] == "document"
        assert es.source["units"]["bytes"] == [len(p.encode()) for p in pages]
    assert evalsets.parse_specs("wikitext2_doc") == [("wikitext2_doc", None)]


def test_a_local_copy_is_named_by_its_bytes_not_its_path(tmp_path):
    # the same file mounted at /data/x in a container must record the same identity as data/x locally
    a, b = tmp_path / "a" / "wiki.txt", tmp_path / "b" / "wiki.txt"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text("\n".join(RAW) + "\n")
    os.utime(b, (1, 1))
    sa, sb = (evalsets.load_set("wikitext2_doc", str(p), {}).source for p in (a, b))
    assert sa["sha256"] == sb["sha256"] and "fingerprint" not in sa
    assert {k: v for k, v in sa.items() if k != "dataset"} == {k: v for k, v in sb.items() if k != "dataset"}
    b.write_text("\n".join(RAW[:-2]) + "\n")
    assert evalsets.load_set("wikitext2_doc", str(b), {}).source["sha256"] != sa["sha256"]


def test_disjoint_windows_are_lm_evals():
    # lm-eval, max_length L = 3, 8 tokens t0..t7 after the prefix (stream D = [prefix, t0..t7], n = 9):
    # window 1 predicts t0..t2 from [prefix, t0, t1]; window 2 t3..t5 from [t2..t4]; window 3 t6, t7 from
    # [t4, t5, t6] (the last window keeps a full context). In D positions, as (start, end, first_scored):
    assert sampling.rolling_windows(9, 4) == [(0, 4, 1), (3, 7, 1), (5, 9, 2)]
    assert sampling.rolling_windows(3, 4) == [(0, 3, 1)]
    assert sampling.rolling_windows(1, 4) == []


@pytest.mark.parametrize("n,window,stride", [(50, 8, None), (50, 8, 3), (17, 16, 1), (100, 10, 9), (9, 4, 2)])
def test_every_position_is_scored_once_with_the_context_asked_for(n, window, stride):
    w = sampling.rolling_windows(n, window, stride)
    scored = np.concatenate([np.arange(s + f, e) for s, e, f in w])
    assert scored.tolist() == list(range(1, n))
    assert all(e - s <= window for s, e, _ in w)
    if stride and stride < window - 1:
        for s, e, f in w[1:]:
            assert f >= window - stride or s == 0  # every later token sees ≥ window - stride tokens


def test_bad_stride_is_refused():
    with pytest.raises(SettingsError, match="stride"):
        sampling.rolling_windows(10, 8, 8)


class FakeEngine:
    """logprob of window position j = -(j + 100·start), start = where the window sits in its document (the
    documents' tokens are distinct, so a window's ids say where it starts): tells which window scored what."""

    def __init__(self, docs):
        self.docs = {d.sample_id: d.token_ids for d in docs}

    def score(self, samples, topk=1):
        for s in samples:
            n, doc = len(s.token_ids), self.docs[s.sample_id]
            start = next(i for i in range(len(doc)) if doc[i:i + n] == s.token_ids)
            lp = -(np.arange(n) + 100.0 * start)
            yield SequenceScores(s.sample_id, np.asarray(s.token_ids), lp.astype(np.float32),
                                        np.ones(n, np.int32), np.asarray(s.token_ids), lp.astype(np.float32))


def test_windows_are_stitched_back_into_one_sequence_per_document():
    docs = sampling.documents([list(range(10, 19)), list(range(30, 33))], prefix_token=1)
    assert docs[0].token_ids[0] == 1 and len(docs[0].token_ids) == 10
    out = list(rolling.score_documents(FakeEngine(docs), docs, topk=1, window=4, stride=None))
    assert [o.sample_id for o in out] == [0, 1]
    np.testing.assert_array_equal(out[0].token_ids, docs[0].token_ids)
    # windows (0,4,1), (3,7,1), (6,10,1): D position p is window position p - start
    expected = [-(p - s + 100 * s) for p, s in zip(range(1, 10), [0, 0, 0, 3, 3, 3, 6, 6, 6])]
    np.testing.assert_allclose(out[0].logprob[1:], expected)
    assert np.isnan(out[0].logprob[0])
    np.testing.assert_allclose(out[1].logprob[1:], [-1, -2, -3])


def test_lm_eval_metrics_by_hand():
    sid = np.array([0, 0, 1, 1, 1])
    lp = np.array([-1.0, -2.0, -0.5, -0.5, -1.0])
    words, nbytes = [3, 5], [12, 20]
    m = docppl.metrics(sid, lp, words, nbytes, n_boot=200, seed=0)
    assert m["word_perplexity"]["value"] == pytest.approx(math.exp(5.0 / 8))
    assert m["byte_perplexity"]["value"] == pytest.approx(math.exp(5.0 / 32))
    assert m["bits_per_byte"]["value"] == pytest.approx(5.0 / 32 / math.log(2))
    assert m["word_perplexity"]["lo"] <= m["word_perplexity"]["value"] <= m["word_perplexity"]["hi"]
    assert (m["documents"], m["words"], m["bytes"]) == (2, 8, 32)


@pytest.mark.slow
def test_wikitext2_doc_scores_in_windows_end_to_end(tmp_path, tiny_model):
    """Scored through the CLI in windows of 24 tokens: each position's logprob is the model's under the
    window that scores it, and the report's word perplexity is lm-eval's formula on the archive."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = tmp_path / "wiki.txt"
    raw.write_text("\n".join(RAW) + "\n")
    out = tmp_path / "results"
    for label in ("bf16", "bf16~noise"):
        r = cli("score", "--model", tiny_model, "--label", label, "--datasets", f"wikitext2_doc={raw}",
                "--results-dir", out, "--max-model-len", 32, "--topk", 5,
                *(["--dtype", "bfloat16"] if "noise" in label else []))
        assert r.exit_code == 0, r.output
    table, meta = logprobs.read_dataset(out / "logprobs" / "model=bf16" / "dataset=wikitext2_doc")
    assert meta["dataset"]["rolling"]["window"] == 24 and meta["dataset"]["kind"] == "document"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    sid = table.column("sample_id").to_numpy()
    ids = table.column("token_id").to_numpy()[sid == 0]
    lps = table.column("logprob").to_numpy(zero_copy_only=False)[sid == 0]
    pages = evalsets.join_wikitext_pages(RAW)
    assert ids[1:].tolist() == tok(evalsets.wikitext_detokenizer(pages[0]), add_special_tokens=False)["input_ids"]
    for start, end, first in sampling.rolling_windows(len(ids), 24):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor(ids[start:end])[None]).logits[0, :-1].double(), -1)
        want = lp.gather(-1, torch.tensor(ids[start + 1:end])[:, None])[:, 0].numpy()[first - 1:]
        np.testing.assert_allclose(lps[start + first:end], want, atol=2e-4)
    r = cli("aggregate", "--results-dir", out, "--baseline", "bf16", "--bootstrap", 200)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "report" / "summary.json").read_text())
    doc = summary["models"]["bf16"]["sets"]["wikitext2_doc"]["document"]
    all_lp = table.column("logprob").to_numpy(zero_copy_only=False)
    total = np.nansum(all_lp)
    words = sum(evalsets.lm_eval_units(p)[0] for p in pages)
    assert doc["word_perplexity"]["value"] == pytest.approx(math.exp(-total / words), rel=1e-5)
    assert "Document-level perplexity" in (out / "report" / "report.md").read_text()
