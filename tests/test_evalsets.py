import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.texts import evalsets


def test_wikitext_rendering_strips_drops_empty_keeps_first_n():
    rows = ["", "  = Title =  \n", " \n", "Body one. ", "Body two.", "Body three."]
    assert evalsets.render_wikitext(rows, 3) == ["= Title =", "Body one.", "Body two."]


def test_ultrachat_rendering():
    msgs = [{"role": " user ", "content": " Hi there "}, {"role": "assistant", "content": "  "},
            {"role": "assistant", "content": "Hello!\n"}]
    assert evalsets.render_messages(msgs) == "user: Hi there\nassistant: Hello!"


def test_ultrachat_skips_rows_that_render_empty_and_keeps_first_n():
    rows = [[{"role": "user", "content": ""}], [{"role": "user", "content": "a"}],
            [{"role": "user", "content": "b"}], [{"role": "user", "content": "c"}]]
    assert evalsets.render_chats(rows, 2) == ["user: a", "user: b"]


def test_local_files_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    pq.write_table(pa.table({"text": ["p", "", "q"]}), tmp_path / "c.parquet")
    assert evalsets.read_local_texts(tmp_path / "a.txt") == ["one", "two"]
    assert evalsets.read_local_texts(tmp_path / "b.jsonl") == ["user: x"]
    assert evalsets.read_local_texts(tmp_path / "c.parquet") == ["p", "q"]
    es = evalsets.load_set("a", str(tmp_path / "a.txt"), {})
    assert es.texts == ["one", "two"] and len(es.source["sha256"]) == 64


def test_hub_loader_reads_a_local_copy_through_datasets(tmp_path):
    """The real datasets.load_dataset path, on a local directory laid out like the hub's."""
    d = tmp_path / "wikitext"
    d.mkdir()
    pq.write_table(pa.table({"text": ["", " A line. ", "B line.", "C line."]}), d / "test.parquet")
    es = evalsets.load_hub_set(evalsets.REGISTRY["wikitext2"], n=2, source=str(d))
    assert es.texts == ["A line.", "B line."]
    assert es.source["split"] == "test" and es.source["n"] == 2


def test_parse_specs():
    assert evalsets.parse_specs("wikitext2, ultrachat") == [("wikitext2", None), ("ultrachat", None)]
    assert evalsets.parse_specs("x=data/a.jsonl data/wiki_mini.txt") == [("x", "data/a.jsonl"), ("wiki_mini", "data/wiki_mini.txt")]


@pytest.mark.parametrize("spec,msg", [("nosuchset", "unknown evaluation set 'nosuchset'"), ("", "no evaluation set"),
                                      ("a=x.txt,a=y.txt", "names repeat")])
def test_bad_specs(spec, msg):
    with pytest.raises(evalsets.EvalSetError, match=msg):
        evalsets.parse_specs(spec)


def test_offline_hub_set_names_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(evalsets.OfflineError, match="HF_HUB_OFFLINE=1.*_SOURCE"):
        evalsets.load_hub_set(evalsets.REGISTRY["wikitext2"], n=2)


def test_wikitext_detokenizer_is_lm_evals():
    """The copy (kept because the quantize image, where the docker demo scores, has no lm-eval) equals lm-eval's."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    pages = [" = Title = \n The cat 's hat @-@ band , 1 @,@ 000 @.@ 5 ( see [ x ] { y } \" q \" ' r ' ) . \n"
             " = = Sub = = \n Temperature 5 ° C ; a : b ! c ? N of s ' friends / ' 3 / \n = = = Deep = = = \n",
             "", " plain line \n\n two "]
    for page in pages:
        assert evalsets.wikitext_detokenizer(page) == wikitext_detokenizer({"page": page})
