"""The bundled data (data/*.txt, *.jsonl) and the tiny Qwen3 demo model (jobs/tinymodel.py)."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

from fixtures import tinymodel
from fixtures.tinymodel import DATA_DIR, build_tiny_model, mean_nll, render_chat, train_tokenizer

DATA_FILES = ("wiki_mini.txt", "chat_mini.jsonl", "calib_mini.jsonl", "train_mini.txt")


def _lines(name):
    return (DATA_DIR / name).read_text(encoding="utf-8").splitlines()


def _rows(name):
    return [json.loads(l) for l in _lines(name) if l.strip()]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def test_data_files_exist_and_have_expected_shape():
    for name in DATA_FILES:
        assert (DATA_DIR / name).is_file(), name
    assert sum((DATA_DIR / n).stat().st_size for n in DATA_FILES) < 1_000_000

    wiki = _lines("wiki_mini.txt")
    assert 140 <= len(wiki) <= 160
    assert any(not l.strip() for l in wiki), "blank lines exercise the empty-row filter"
    assert any(0 < len(l.split()) < 8 for l in wiki), "short lines exercise the 16-token floor"
    assert sum(40 <= len(l.split()) <= 200 for l in wiki) > 0.7 * len(wiki)
    assert len(_lines("train_mini.txt")) >= 500

    for name, lo in (("chat_mini.jsonl", 100), ("calib_mini.jsonl", 100)):
        rows = _rows(name)
        assert len(rows) >= lo
        for row in rows:
            msgs = row["messages"]
            assert 2 <= len(msgs) <= 6
            assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
    chat = _rows("chat_mini.jsonl")
    assert sum(1 for r in chat if not render_chat(r["messages"])) == 1, "one row renders empty"


def test_generator_is_deterministic_and_matches_committed_files():
    spec = importlib.util.spec_from_file_location("make_text", DATA_DIR / "make_text.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    files = mod.build()
    assert files == mod.build()
    for name, text in files.items():
        assert (DATA_DIR / name).read_text(encoding="utf-8") == text, f"{name}: rerun data/make_text.py"


def test_eval_texts_disjoint_from_training_and_calibration():
    wiki = {l.strip() for l in _lines("wiki_mini.txt") if l.strip()}
    train = {l.strip() for l in _lines("train_mini.txt") if l.strip()}
    chat_rows, calib_rows = _rows("chat_mini.jsonl"), _rows("calib_mini.jsonl")
    chat = {render_chat(r["messages"]) for r in chat_rows} - {""}
    calib = {render_chat(r["messages"]) for r in calib_rows}
    assert not wiki & train
    assert not chat & calib
    assert not (wiki | chat) & (train | calib)
    # the opening request of each conversation differs too
    chat_open = {r["messages"][0]["content"] for r in chat_rows if r["messages"][0]["content"]}
    calib_open = {r["messages"][0]["content"] for r in calib_rows}
    assert not chat_open & calib_open
    # and no evaluation paragraph hides inside a calibration message
    calib_blob = "\n".join(m["content"] for r in calib_rows for m in r["messages"])
    assert not [l for l in wiki if len(l.split()) > 20 and l in calib_blob]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def test_tokenizer_round_trip_specials_and_chat_template():
    texts = _lines("train_mini.txt")[:200]
    tok = train_tokenizer(texts, vocab_size=512)
    assert len(tok) == 512
    sample = "The River Kelwy, 1,234 km long (1850 – 1901): café ° ü\nuser: hi"
    assert tok.decode(tok(sample)["input_ids"]) == sample
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok(special)["input_ids"]) == 1
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok("hello world")["input_ids"][0] != tok.convert_tokens_to_ids("<|endoftext|>"), "no BOS added"


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    logs = []
    path = build_tiny_model(out, steps=30, seed=0, log=logs.append)
    return path, logs


def test_build_writes_a_loadable_quantizable_model(tiny):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, logs = tiny
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "qscore-tiny.json"):
        assert (path / name).is_file(), name
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"
    assert any("final train loss" in line for line in logs)

    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "qwen3" and not cfg.tie_word_embeddings
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 192, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.max_position_embeddings == 2048 and cfg.vocab_size % 16 == 0

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1
    for name, lin in linears:
        assert lin.in_features % 16 == 0 and lin.out_features % 16 == 0, name

    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) <= cfg.vocab_size
    text = "Kelford is a market town in Osshire. user: How do I make lentil soup?"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token_id == cfg.eos_token_id == model.generation_config.pad_token_id
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x too


def test_trained_loss_below_untrained(tiny):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

    path, _ = tiny
    tok = AutoTokenizer.from_pretrained(path)
    texts = tinymodel.eval_texts()["wiki_mini"][:40]
    trained = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    untrained = Qwen3ForCausalLM(AutoConfig.from_pretrained(path)).float()
    with tinymodel.torch_threads(1):
        after, before = mean_nll(trained, tok, texts), mean_nll(untrained, tok, texts)
    assert before > math.log(len(tok)) - 0.5
    assert after < before - 0.5, (before, after)

    manifest = json.loads((path / "qscore-tiny.json").read_text())
    assert manifest["eval_loss"]["wiki_mini"] < manifest["eval_loss_initial"]["wiki_mini"]
    assert manifest["recipe"]["train"]["steps"] == 30


def test_build_is_cached(tiny):
    path, _ = tiny
    stamp = os.stat(path / "model.safetensors").st_mtime_ns
    logs = []
    assert build_tiny_model(path, steps=30, seed=0, log=logs.append) == path
    assert any("up to date" in line for line in logs)
    assert os.stat(path / "model.safetensors").st_mtime_ns == stamp
    assert tinymodel.recipe_hash(tinymodel.recipe(steps=31)) != tinymodel.recipe_hash(tinymodel.recipe(steps=30))
