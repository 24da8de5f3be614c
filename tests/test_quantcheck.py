from jobs import quantcheck
from jobs.checkpoint import describe_quantization


def ct_config(group=16, abits=4):
    return {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {"num_bits": 4, "type": "float", "group_size": group},
                                      "input_activations": {"num_bits": abits, "type": "float", "dynamic": "local"}}}}}


def fp4_layer(name, out=64, cols=64, group=16):
    return {f"{name}.weight_packed": {"dtype": "U8", "shape": [out, cols // 2]},
            f"{name}.weight_scale": {"dtype": "F8_E4M3", "shape": [out, cols // group]},
            f"{name}.weight_global_scale": {"dtype": "F32", "shape": [1]}}


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
