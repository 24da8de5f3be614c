"""The quantize stage's schemes and options, each checked by reading back what it saved."""
import json
import os

import pytest

from conftest import DATA, cli
from jobs.checkpoints import quantcheck
from jobs.checkpoints.checkpoint import inspect

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wide_model(tiny_model, tmp_path_factory):
    """A random model whose Linear dims divide by 128, for INT4's default group size."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("wide")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = Qwen3Config(vocab_size=((len(tok) + 15) // 16) * 16, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("scheme,fmt", [("NVFP4A16", "nvfp4-pack-quantized"), ("FP8_DYNAMIC", "float-quantized"),
                                        ("W4A16", "pack-quantized")])
def test_weight_only_and_dynamic_schemes(wide_model, tmp_path, scheme, fmt):
    out = tmp_path / scheme
    r = cli("quantize", "--model-id", wide_model, "--output", out, "--scheme", scheme, "--no-calibration")
    assert r.exit_code == 0, r.output
    assert f"Saving compressed model to: {out}" in r.stdout and r.stdout.rstrip().endswith("Done.")
    ck = inspect(out)
    assert ck.quant.scheme == scheme and ck.quant.format == fmt and ck.quant.ignore == ["lm_head"]
    assert quantcheck.check(ck.tensors, ck.quant, scheme) == []
    m = json.loads((out / "qscore.json").read_text())
    assert m["calibration"] is None and m["scheme"] == scheme


def test_spinquant_puts_rotations_before_quantization(tiny_model, tmp_path):
    out = tmp_path / "spin"
    r = cli("quantize", "--model-id", tiny_model, "--output", out, "--spinquant", "--calibration-dataset",
            DATA / "calib_mini.jsonl", "--num-calibration-samples", 8, "--max-sequence-length", 64)
    assert r.exit_code == 0, r.output
    recipe = json.loads((out / "qscore.json").read_text())["recipe"]
    assert recipe.index("SpinQuantModifier") < recipe.index("QuantizationModifier")
    assert inspect(out).quant.scheme == "NVFP4"


def test_indivisible_group_size_fails_cleanly(tiny_model, tmp_path):
    out = tmp_path / "w4"
    r = cli("quantize", "--model-id", tiny_model, "--output", out, "--scheme", "W4A16")
    assert r.exit_code == 1 and "not divisible by group_size" in r.stderr
    # llm-compressor's message whole in the log (the layers come after its first line), its first line as the error
    assert "model.layers.0.mlp.down_proj (columns=192, group_size=128)" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: llm-compressor: The following layers")
    assert not out.exists() and [p.name for p in tmp_path.glob(".*")] == [".w4.lock"]  # the lock file, released


def test_a_checkpoint_being_written_stops_a_second_run(tiny_model, tmp_path):
    from jobs.core import locks

    with locks.hold(tmp_path / "q"):
        r = cli("quantize", "--model-id", tiny_model, "--output", tmp_path / "q", "--scheme", "NVFP4A16")
    assert r.exit_code == 1 and f"checkpoint is being written by pid {os.getpid()} " in r.stderr.splitlines()[-1]
    assert not (tmp_path / "q").exists()


def test_existing_output_needs_overwrite(tiny_model, tmp_path):
    (tmp_path / "o").mkdir()
    r = cli("quantize", "--model-id", tiny_model, "--output", tmp_path / "o", "--scheme", "NVFP4A16")
    assert r.exit_code == 1 and "--overwrite" in r.stderr


def test_unknown_scheme(tiny_model, tmp_path):
    r = cli("quantize", "--model-id", tiny_model, "--output", tmp_path / "x", "--scheme", "NVFP8")
    assert r.exit_code == 1 and "unknown scheme 'NVFP8'" in r.stderr


@pytest.fixture(scope="module")
def spiked_pad_model(tiny_model, tmp_path_factory):
    """The tiny model whose padding token (never in the calibration chats) embeds as one large spike: had
    padded positions reached llm-compressor's observers, the input scales would grow."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("spiked") / "m"
    shutil.copytree(tiny_model, out)
    pad = AutoTokenizer.from_pretrained(out).pad_token_id
    w = load_file(out / "model.safetensors")
    name = next(k for k in w if k.endswith("embed_tokens.weight"))
    w[name][pad] = 0
    w[name][pad, 0] = 100.0
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("pipeline", ["basic", "sequential"])
def test_batched_calibration_writes_the_batch_size_1_checkpoint(spiked_pad_model, tmp_path, pipeline):
    from jobs.checkpoints import batching

    outs = {}
    for bs in (1, 8):
        outs[bs] = tmp_path / f"bs{bs}"
        r = cli("quantize", "--model-id", spiked_pad_model, "--output", outs[bs], "--scheme", "NVFP4",
                "--calibration-dataset", DATA / "calib_mini.jsonl", "--num-calibration-samples", 32,
                "--max-sequence-length", 128, "--pipeline", pipeline, "--calibration-batch-size", bs)
        assert r.exit_code == 0, r.output
    calib = json.loads((outs[8] / "qscore.json").read_text())["calibration"]
    assert calib["batch_size"] == 8 and calib["batches"] == 4 and calib["padding_tokens"] > 0
    assert set(batching.drift(outs[1], outs[8]).values()) == {0.0}
    assert (outs[1] / "model.safetensors").read_bytes() == (outs[8] / "model.safetensors").read_bytes()


def test_calibration_batches_use_every_sample_once():
    from jobs.checkpoints import batching

    lengths = [5, 9, 9, 1, 7, 3, 9]
    groups = batching.batches(lengths, 3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [len(g) for g in groups] == [3, 3, 1]
    assert [[lengths[i] for i in g] for g in groups] == [[9, 9, 9], [7, 5, 3], [1]]


def test_calibration_batch_size_reaches_the_planned_quantize_job():
    from jobs.core.errors import SettingsError
    from jobs.runs import plan

    job = next(j for j in plan.build({"CALIBRATION_BATCH_SIZE": "4"}, uid=1000) if j.stage == "quantize")
    assert job.args[job.args.index("--calibration-batch-size") + 1] == "4"
    with pytest.raises(SettingsError, match="CALIBRATION_BATCH_SIZE"):
        plan.build({"CALIBRATION_BATCH_SIZE": "0"}, uid=1000)


def test_padding_that_would_reach_the_observers_stops_the_stage(monkeypatch):
    """A padded batch never masked, or an observed Linear fed a padded batch in another shape (a mixture of
    experts' routed tokens): the stage stops with one line naming the way out, before anything is saved."""
    import types

    import torch
    from llmcompressor import core

    from jobs.checkpoints import batching
    from jobs.core.errors import QuantizeError

    state = types.SimpleNamespace(current_batch_idx=0)
    monkeypatch.setattr(core, "active_session", lambda: types.SimpleNamespace(state=state))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model[0].input_observer = object()  # what llm-compressor's calibration attaches
    lengths = [[3, 2]]  # one batch of two samples, the second padded by one
    with pytest.raises(QuantizeError, match="1 padded batches unmasked.*--calibration-batch-size 1"):
        with batching.padding_hidden(model, lengths):
            pass  # the batch never ran
    with pytest.raises(QuantizeError, match="another shape at 0"):
        with batching.padding_hidden(model, lengths):
            model(torch.ones(6, 4))  # the batch's tokens flattened: (2 x 3) rows
    with batching.padding_hidden(model, lengths):
        x = torch.ones(2, 3, 4)
        seen = []
        model[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        model(x)
    assert seen[0][1, 2].abs().sum() == 0 and seen[0][0].abs().sum() == 12  # the padded position zeroed


@pytest.mark.parametrize("keep", [True, False])
def test_the_basic_pipeline_calibrates_with_the_models_own_attention(tiny_model, keep):
    """llm-compressor's calibration context switches the model to eager attention; qscore keeps the model's
    own (SDPA) where nothing is traced, and leaves llm-compressor's choice alone otherwise."""
    from llmcompressor.utils import calibration_forward_context
    from transformers import AutoModelForCausalLM

    from jobs.checkpoints import batching

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    with batching.model_attention(keep), calibration_forward_context(model):
        during = model.config._attn_implementation
    assert during == ("sdpa" if keep else "eager")
    assert model.config._attn_implementation == "sdpa"
