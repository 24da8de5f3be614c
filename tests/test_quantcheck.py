import pytest

from jobs.checkpoints import quantcheck
from jobs.checkpoints.checkpoint import describe_quantization


def ct_config(group=16, abits=4):
    acts = {"input_activations": {"num_bits": abits, "type": "float", "dynamic": "local", "strategy": "tensor_group",
                                   "group_size": 16}} if abits else {}
    return {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {"num_bits": 4, "type": "float", "group_size": group,
                                                  "strategy": "tensor_group"}, **acts}}}}


def fp4_layer(name, out=64, cols=64, group=16):
    return {f"{name}.weight_packed": {"dtype": "U8", "shape": [out, cols // 2]},
            f"{name}.weight_scale": {"dtype": "F8_E4M3", "shape": [out, cols // group]},
            f"{name}.weight_global_scale": {"dtype": "F32", "shape": [1]},
            f"{name}.input_global_scale": {"dtype": "F32", "shape": [1]}}


def tensors(**over):
    t = {"model.embed_tokens.weight": {"dtype": "BF16", "shape": [256, 64]},
         "model.norm.weight": {"dtype": "BF16", "shape": [64]},
         "lm_head.weight": {"dtype": "BF16", "shape": [256, 64]}}
    t.update(fp4_layer("model.layers.0.self_attn.q_proj"))
    t.update(fp4_layer("model.layers.0.mlp.down_proj", cols=192))
    t.update(over)
    return t


def test_scheme_names_from_configs():
    assert describe_quantization(ct_config()).scheme == "NVFP4"
    assert describe_quantization(ct_config(abits=None)).scheme == "NVFP4A16"
    assert describe_quantization({"quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4",
                                                          "group_size": 16}}).scheme == "NVFP4"
    assert describe_quantization({"torch_dtype": "bfloat16"}).method is None


def test_compressed_tensors_configs_are_read_by_compressed_tensors():
    """What compressed-tensors fills in or refuses, qscore takes from it: a config it cannot read is a one-line
    CheckpointError, not a scheme guessed from whatever keys are there."""
    from jobs.core.errors import CheckpointError

    fp8 = {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}}
    q = describe_quantization(fp8)
    assert (q.scheme, q.format, q.ignore, q.group_size) == ("FP8_DYNAMIC", None, [], None)
    bad = ct_config()
    bad["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = "four"
    with pytest.raises(CheckpointError, match="not one compressed-tensors can read .*num_bits"):
        describe_quantization(bad)


def test_a_matching_checkpoint_passes():
    assert quantcheck.check(tensors(), describe_quantization(ct_config()), "nvfp4") == []


def test_claimed_nvfp4_with_bf16_weights_is_caught():
    t = tensors()
    for k in [k for k in t if "q_proj" in k]:
        del t[k]
    t["model.layers.0.self_attn.q_proj.weight"] = {"dtype": "BF16", "shape": [64, 64]}
    (msg,) = quantcheck.check(t, describe_quantization(ct_config()))
    assert "q_proj" in msg and "unpacked BF16" in msg


def test_wrong_group_size_is_caught():
    t = tensors(**fp4_layer("model.layers.0.self_attn.q_proj", group=32))
    (msg,) = quantcheck.check(t, describe_quantization(ct_config(group=16)))
    assert "group size 32" in msg and "config says 16" in msg


def test_quantized_ignored_module_is_caught():
    t = tensors()
    del t["lm_head.weight"]
    t.update(fp4_layer("lm_head"))
    (msg,) = quantcheck.check(t, describe_quantization(ct_config()))
    assert msg.startswith("lm_head is listed as ignored")


def test_expected_scheme_mismatch():
    (msg,) = quantcheck.check(tensors(), describe_quantization(ct_config()), "FP8_DYNAMIC")
    assert msg == "config says NVFP4, expected FP8_DYNAMIC"


def test_w4a4_without_activation_scales_is_caught():
    t = tensors()
    del t["model.layers.0.mlp.down_proj.input_global_scale"]
    (msg,) = quantcheck.check(t, describe_quantization(ct_config()))
    assert msg == "model.layers.0.mlp.down_proj: config says W4A4 but the layer has no input_global_scale"
    assert quantcheck.check(t, describe_quantization(ct_config(abits=None))) == []  # NVFP4A16 needs none


NAMES = ["lm_head", "model.layers.0.mlp.gate", "model.layers.10.mlp.gate", "model.layers.1.self_attn.q_proj",
         "language_model.lm_head", "model.embed_tokens"]
PATTERNS = [["lm_head"], ["re:.*mlp\\.gate$"], ["*mlp.gate"], ["model.layers.1*"], ["self_attn"], []]


@pytest.mark.parametrize("patterns", PATTERNS)
def test_compressed_tensors_ignore_is_the_librarys(patterns):
    from compressed_tensors.utils.match import match_name

    for name in NAMES:
        assert quantcheck.matches_ignore(name, patterns, "compressed-tensors") == any(
            match_name(name, p) for p in patterns), (name, patterns)


def test_modelopt_exclusions_as_vllm_reads_them():
    m = lambda name, pats: quantcheck.matches_ignore(name, pats, "modelopt")  # noqa: E731
    assert m("language_model.lm_head", ["lm_head"])  # substring
    assert m("model.layers.10.mlp.gate", ["*mlp.gate"]) and not m("model.layers.10.mlp.up", ["*mlp.gate"])
    assert not m("model.layers.1.self_attn.q_proj", ["lm_head"])


@pytest.mark.parametrize("patterns", PATTERNS)
def test_modelopt_patterns_convert_to_compressed_tensors_unchanged(patterns):
    """Converting a ModelOpt checkpoint keeps exactly the same modules dense."""
    from compressed_tensors.utils.match import match_name

    converted = quantcheck.as_compressed_tensors_ignore(patterns)
    for name in NAMES:
        assert any(match_name(name, p) for p in converted) == quantcheck.matches_ignore(name, patterns, "modelopt")
