"""NVFP4 formats: our pack/unpack/quantize/dequantize against compressed-tensors, llm-compressor and
nvidia-modelopt themselves, and the ModelOpt-format exporter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.nvfp4 import (
    E2M1_VALUES,
    TensorMeta,
    check_quantization_claims,
    dequantize_compressed_tensors,
    dequantize_modelopt,
    dequantize_state_dict,
    describe_layers,
    e2m1_codes,
    load_dequantized_state_dict,
    matches_ignore,
    pack_fp4,
    quantize_nvfp4,
    read_safetensors_meta,
    summarize_layers,
    unpack_fp4,
)

transformers = pytest.importorskip("transformers")


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


needs_modelopt = pytest.mark.skipif(not _has("modelopt"), reason="nvidia-modelopt not installed")
needs_llmc = pytest.mark.skipif(not _has("llmcompressor"), reason="llm-compressor not installed")


# ---------------------------------------------------------------------------------------------------
# fixtures: a tiny Qwen3 (dims multiples of 16) with a byte-level tokenizer


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}  # exactly 256 tokens
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=sorted(alphabet)[0])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256,
        tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"],
    )
    model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny") / "bf16"
    model.save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path


def _original(tiny_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(tiny_dir / "model.safetensors")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def ct_dir(tiny_dir) -> Path:
    """llm-compressor NVFP4 (W4A4, calibrated) saved compressed: nvfp4-pack-quantized."""
    pytest.importorskip("llmcompressor")
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (8, 32), generator=g)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(
        model=model,
        recipe=QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]),
        dataset=ds, num_calibration_samples=8, max_seq_length=32,
    )
    out = tiny_dir.parent / "ct-nvfp4"
    model.save_pretrained(out, save_compressed=True)
    return out


@pytest.fixture(scope="module")
def mo_dir(tiny_dir) -> Path:
    """A real nvidia-modelopt export (mtq.quantize + export_hf_checkpoint) via our exporter."""
    if not _has("modelopt"):
        pytest.skip("nvidia-modelopt not installed")
    from jobs.modelopt_export import export_modelopt_nvfp4

    return export_modelopt_nvfp4(tiny_dir, tiny_dir.parent / "mo-nvfp4", method="modelopt")


@pytest.fixture(scope="module")
def rtn_dir(tiny_dir) -> Path:
    from jobs.modelopt_export import export_modelopt_nvfp4

    return export_modelopt_nvfp4(tiny_dir, tiny_dir.parent / "rtn-nvfp4", method="rtn")


# ---------------------------------------------------------------------------------------------------
# e2m1 codes, packing


def test_e2m1_table_and_rounding():
    assert E2M1_VALUES.tolist()[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert torch.equal(E2M1_VALUES[8:], -E2M1_VALUES[:8])
    x = torch.tensor([0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 100.0, -0.3, -2.9])
    want = torch.tensor([0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.5, -3.0])
    assert torch.equal(E2M1_VALUES[e2m1_codes(x).long()], want)  # ties to even, saturating


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.arange(16, dtype=torch.uint8)
    values = E2M1_VALUES[codes.long()].reshape(2, 8)
    packed = pack_fp4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 4)
    assert torch.equal(unpack_fp4(packed, (2, 8)), values)
    # element 2j in the low nibble, 2j+1 in the high one
    assert pack_fp4(torch.tensor([[0.5, 1.0]])).item() == 0x21
    assert unpack_fp4(torch.tensor([[0x7F]], dtype=torch.uint8)).tolist() == [[-6.0, 6.0]]
    g = torch.Generator().manual_seed(0)
    rnd = E2M1_VALUES[torch.randint(0, 16, (3, 5, 32), generator=g)]
    assert torch.equal(unpack_fp4(pack_fp4(rnd)), rnd)
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(pack_fp4(unpack_fp4(every_byte)), every_byte)


def test_pack_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
    g = torch.Generator().manual_seed(0)
    vals = E2M1_VALUES[torch.randint(0, 16, (32, 64), generator=g)]
    assert torch.equal(pack_fp4(vals), ct.pack_fp4_to_uint8(vals))
    packed = pack_fp4(vals)
    assert torch.equal(unpack_fp4(packed), ct.unpack_fp4_from_uint8(packed, 32, 64, dtype=torch.float32))


def test_pack_unpack_errors():
    with pytest.raises(ValueError, match="not e2m1"):
        pack_fp4(torch.tensor([[0.7, 1.0]]))
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.tensor([[1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="uint8"):
        unpack_fp4(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="unpacks to"):
        unpack_fp4(torch.zeros(2, 2, dtype=torch.uint8), (2, 8))


# ---------------------------------------------------------------------------------------------------
# RTN quantisation and single-tensor dequantisation


def test_quantize_rtn_error_small_but_nonzero():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.02
    q = quantize_nvfp4(w)
    assert q["weight_packed"].dtype == torch.uint8 and q["weight_packed"].shape == (96, 64)
    assert q["weight_scale"].dtype == torch.float8_e4m3fn and q["weight_scale"].shape == (96, 8)
    assert q["weight_scale_2"].dtype == torch.float32 and q["weight_scale_2"].shape == ()
    assert torch.allclose(q["weight_scale_2"], w.abs().max() / (6 * 448))
    err = _rel_err(q["dequantized"], w)
    assert 0.01 < err < 0.2, err
    deq = dequantize_modelopt(q["weight_packed"], q["weight_scale"], q["weight_scale_2"], torch.float32)
    assert torch.equal(deq, q["dequantized"])
    deq_ct = dequantize_compressed_tensors(
        q["weight_packed"], q["weight_scale"], q["weight_global_scale"], torch.float32
    )
    assert torch.allclose(deq_ct, deq, rtol=1e-6, atol=0)
    # exact zeros: a zero block stays zero, the all-zero tensor does not divide by zero
    z = quantize_nvfp4(torch.zeros(16, 32))
    assert torch.equal(z["dequantized"], torch.zeros(16, 32)) and torch.isfinite(z["weight_scale"].float()).all()


def test_quantize_shared_global_scale_and_errors():
    w = torch.randn(16, 32)
    q = quantize_nvfp4(w, global_scale=torch.tensor(0.01))
    assert float(q["weight_scale_2"]) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_nvfp4(torch.randn(4, 24))
    with pytest.raises(ValueError, match="2-D"):
        quantize_nvfp4(torch.randn(32))


@needs_modelopt
def test_quantize_matches_modelopt_bytes():
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    qt, scale, scale_2 = NVFP4QTensor.quantize(w, 16)
    ours = quantize_nvfp4(w)
    assert torch.equal(ours["weight_packed"], qt._quantized_data)
    assert torch.equal(ours["weight_scale"].view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(ours["weight_scale_2"], scale_2.float().reshape(()))
    ref = qt.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    assert torch.equal(dequantize_modelopt(ours["weight_packed"], scale, scale_2, torch.float32), ref)


def test_dequantize_shape_and_dtype_errors():
    packed = torch.zeros(8, 16, dtype=torch.uint8)
    scale = torch.ones(8, 2).to(torch.float8_e4m3fn)
    assert dequantize_modelopt(packed, scale, torch.tensor(1.0)).shape == (8, 32)
    with pytest.raises(ValueError, match="weight_scale shape"):
        dequantize_modelopt(packed, torch.ones(4, 2).to(torch.float8_e4m3fn), torch.tensor(1.0))
    with pytest.raises(ValueError, match="multiple"):
        dequantize_modelopt(packed, torch.ones(8, 3).to(torch.float8_e4m3fn), torch.tensor(1.0))
    with pytest.raises(ValueError, match="uint8"):
        dequantize_compressed_tensors(packed.float(), scale, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="one value"):
        dequantize_compressed_tensors(packed, scale, torch.ones(2))
    with pytest.raises(ValueError, match="unknown format"):
        dequantize_state_dict({}, "gguf", torch.float32)
    with pytest.raises(ValueError, match="without weight_scale"):
        dequantize_state_dict({"a.weight_packed": packed}, "compressed-tensors", torch.float32)


# ---------------------------------------------------------------------------------------------------
# compressed-tensors checkpoints made by llm-compressor


@needs_llmc
def test_compressed_tensors_matches_library_decompression(ct_dir, tiny_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    tensors = load_file(ct_dir / "model.safetensors")
    assert any(k.endswith(".input_global_scale") for k in tensors)  # W4A4 checkpoint
    ours = dequantize_state_dict(tensors, "compressed-tensors", torch.bfloat16)
    orig = _original(tiny_dir)
    assert set(ours) == set(orig)  # every scale dropped, nothing missing
    assert all(v.dtype == torch.bfloat16 for v in ours.values())

    # reference 1: transformers + compressed-tensors decompress the checkpoint themselves
    ref_model = AutoModelForCausalLM.from_pretrained(
        ct_dir, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    ref = ref_model.state_dict()
    for k, v in ours.items():
        assert torch.equal(v, ref[k]), k

    # reference 2: the NVFP4 compressor, module by module
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qc = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    group = dict(qc["config_groups"]["group_0"])
    group.pop("format", None)
    scheme = QuantizationScheme(**group)
    n = 0
    for name in tensors:
        if name.endswith(".weight_packed"):
            mod = name.rpartition(".")[0]
            sub = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == mod}
            w = NVFP4PackedCompressor.decompress(sub, scheme)["weight"]
            assert torch.equal(ours[f"{mod}.weight"], w), mod
            assert _rel_err(ours[f"{mod}.weight"], orig[f"{mod}.weight"]) < 0.2
            n += 1
    assert n == 14
    assert torch.equal(ours["lm_head.weight"], orig["lm_head.weight"])


@needs_llmc
def test_describe_compressed_tensors(ct_dir):
    meta = read_safetensors_meta(ct_dir)
    layers = describe_layers(meta)
    info = layers["model.layers.0.self_attn.q_proj"]
    assert (info.scheme, info.group_size, info.in_features, info.out_features) == ("nvfp4", 16, 64, 64)
    assert info.scale_dtype == "float8_e4m3fn" and info.has_global_scale and info.has_input_scale
    assert layers["lm_head"].scheme == "dense"
    summary = summarize_layers(layers)
    assert summary["schemes"] == {"nvfp4": 14, "dense": 2} and summary["group_sizes"] == [16]
    qc = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    assert check_quantization_claims(qc, layers) == []
    # false claims are caught
    bad = json.loads(json.dumps(qc))
    bad["config_groups"]["group_0"]["weights"]["group_size"] = 32
    assert any("group size 16" in p for p in check_quantization_claims(bad, layers))
    bad = dict(qc, ignore=["lm_head", "model.layers.1.mlp.down_proj"])
    assert any("listed as ignored" in p for p in check_quantization_claims(bad, layers))
    bad = dict(qc, ignore=[])
    assert any("lm_head" in p and "not in the ignore" in p for p in check_quantization_claims(bad, layers))
    bad = dict(qc, format="pack-quantized")
    assert any("disagrees" in p for p in check_quantization_claims(bad, layers))
    bad = json.loads(json.dumps(qc))
    bad["format"] = bad["config_groups"]["group_0"]["format"] = "float-quantized"
    assert any("not nvfp4-pack-quantized" in p for p in check_quantization_claims(bad, layers))


def test_describe_from_header_dicts_and_problems():
    tensors = {
        "m.q.weight_packed": {"dtype": "U8", "shape": [32, 16]},
        "m.q.weight_scale": {"dtype": "F8_E4M3", "shape": [32, 3]},  # 32 inputs, 3 scales: bad
        "m.q.weight_global_scale": {"dtype": "F32", "shape": [1]},
        "m.k.weight_packed": ((32, 16), torch.uint8),
        "m.k.weight_scale": ((32, 2), "F32"),  # not fp8
        "m.norm.weight": ((32,), "BF16"),
    }
    layers = describe_layers(tensors)
    assert "m.norm" not in layers
    assert any("do not divide" in p for p in layers["m.q"].problems)
    assert any("float8_e4m3fn" in p for p in layers["m.k"].problems)
    assert layers["m.k"].group_size == 16 and not layers["m.k"].has_global_scale
    assert describe_layers({"x.weight": TensorMeta((8, 16), "bfloat16")})["x"].scheme == "dense"
    assert matches_ignore("model.layers.0.mlp.gate", ["re:.*mlp.gate$"], "compressed-tensors")
    assert not matches_ignore("model.layers.0.mlp.gate", ["mlp.gate"], "compressed-tensors")
    assert matches_ignore("model.layers.0.mlp.gate", ["*mlp.gate*"], "modelopt")


# ---------------------------------------------------------------------------------------------------
# ModelOpt checkpoints (a real nvidia-modelopt export, and our RTN exporter)


def _check_modelopt_layout(path: Path, tiny_dir: Path):
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4"
    assert qc["group_size"] == 16 and qc["kv_cache_quant_algo"] is None
    assert "lm_head" in qc["exclude_modules"] and "lm_head" in qc["ignore"]
    hq = json.loads((path / "hf_quant_config.json").read_text())
    assert hq["quantization"]["quant_algo"] == "NVFP4" and hq["quantization"]["group_size"] == 16
    assert "lm_head" in hq["quantization"]["exclude_modules"]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (path / f).read_bytes() == (tiny_dir / f).read_bytes()
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))

    from safetensors.torch import load_file

    t = load_file(path / "model.safetensors")
    orig = _original(tiny_dir)
    for mod in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w0 = orig[f"{mod}.weight"]
        assert t[f"{mod}.weight"].dtype == torch.uint8 and t[f"{mod}.weight"].shape == (w0.shape[0], w0.shape[1] // 2)
        assert t[f"{mod}.weight_scale"].dtype == torch.float8_e4m3fn
        assert t[f"{mod}.weight_scale"].shape == (w0.shape[0], w0.shape[1] // 16)
        for s in ("weight_scale_2", "input_scale"):
            assert t[f"{mod}.{s}"].dtype == torch.float32 and t[f"{mod}.{s}"].numel() == 1
            assert float(t[f"{mod}.{s}"]) > 0
    # q/k/v and gate/up share one weight_scale_2 (vLLM's fused kernels take one per fused layer)
    p = "model.layers.0.self_attn."
    assert float(t[p + "q_proj.weight_scale_2"]) == float(t[p + "k_proj.weight_scale_2"]) == float(
        t[p + "v_proj.weight_scale_2"])
    assert t["lm_head.weight"].dtype == torch.bfloat16 and torch.equal(t["lm_head.weight"], orig["lm_head.weight"])
    assert "lm_head.weight_scale" not in t

    ours = dequantize_state_dict(t, "modelopt", torch.bfloat16)
    assert set(ours) == set(orig)
    n = 0
    for k, w0 in orig.items():
        if f"{k.rpartition('.')[0]}.weight_scale_2" in t:
            assert _rel_err(ours[k], w0) < 0.2, k
            n += 1
        else:
            assert torch.equal(ours[k], w0), k  # unquantized tensors pass through untouched
    assert n == 14
    layers = describe_layers(read_safetensors_meta(path))
    assert check_quantization_claims(qc, layers, hq) == []
    return t, ours, json.loads((path / "qscore_export.json").read_text())


@needs_modelopt
def test_modelopt_export_is_real_and_dequantizes_like_modelopt(mo_dir, tiny_dir):
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    t, ours, meta = _check_modelopt_layout(mo_dir, tiny_dir)
    assert meta["method"] == "modelopt" and meta["independent_modelopt_checkpoint"] is True
    assert meta["modelopt_version"] and meta["calibration"]["tokens"] > 0
    qc = json.loads((mo_dir / "config.json").read_text())["quantization_config"]
    assert qc["producer"]["name"] == "modelopt"
    for name in t:
        if name.endswith(".weight_scale_2"):
            mod = name.rpartition(".")[0]
            w = t[f"{mod}.weight"]
            qt = NVFP4QTensor(torch.Size((w.shape[0], w.shape[1] * 2)), torch.bfloat16, w)
            ref = qt.dequantize(dtype=torch.bfloat16, scale=t[f"{mod}.weight_scale"], double_scale=t[name],
                                block_sizes={-1: 16})
            assert torch.equal(ours[f"{mod}.weight"], ref), mod  # equal up to the sign of zero


def test_rtn_export_layout_and_closeness(rtn_dir, tiny_dir):
    t, ours, meta = _check_modelopt_layout(rtn_dir, tiny_dir)
    assert meta["method"] == "rtn" and meta["independent_modelopt_checkpoint"] is False
    assert meta["calibration"]["source"] == "builtin"
    assert [len(g) for g in meta["shared_scale_groups"]] == [3, 2, 3, 2]


@needs_modelopt
def test_rtn_export_matches_modelopt_bytes(rtn_dir, mo_dir):
    from safetensors.torch import load_file

    a, b = load_file(mo_dir / "model.safetensors"), load_file(rtn_dir / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].dtype.itemsize == 1:
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
        else:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-6, atol=0), k


def test_dequantized_checkpoint_runs_in_transformers(rtn_dir, tiny_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(rtn_dir)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_dequantized_state_dict(rtn_dir, dtype=torch.float32),
                                                strict=False)
    assert not missing and not unexpected
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    ids = torch.arange(0, 96).reshape(2, 48) % 256
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert 0 < _rel_err(a, b) < 0.5


def test_export_without_calibration_and_guards(tiny_dir, tmp_path):
    from jobs.modelopt_export import export_modelopt_nvfp4

    out = export_modelopt_nvfp4(tiny_dir, tmp_path / "nocal", calibration_texts=[], ignore=["lm_head"])
    meta = json.loads((out / "qscore_export.json").read_text())
    assert meta["method"] == "rtn" and meta["calibration"]["source"] == "none" and meta["fallback_reason"]
    from safetensors.torch import load_file

    t = load_file(out / "model.safetensors")
    assert all(float(v) == 1.0 for k, v in t.items() if k.endswith(".input_scale"))
    assert [len(g) for g in meta["shared_scale_groups"]] == [3, 2, 3, 2]  # by name without a forward pass
    with pytest.raises(FileExistsError):
        export_modelopt_nvfp4(tiny_dir, out, calibration_texts=[])
    with pytest.raises(ValueError, match="config.json"):
        export_modelopt_nvfp4(tmp_path / "nowhere", tmp_path / "x")
    with pytest.raises(ValueError, match="already quantized"):
        export_modelopt_nvfp4(out, tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nocal"]  # no temp dirs left behind
