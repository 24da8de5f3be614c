"""The tasks stage's vLLM path on the CPU: lm-eval's VLLM model gets the score stage's engine options, and the
engine it built describes itself (kernel path) and shuts down through qscore's backend. lm-eval's VLLM
and vLLM itself are stand-ins here; tests/test_gpu_tasks.py runs the real ones."""
import sys
import types

import pytest

from jobs.engines import lmeval


class FakeEngine:
    def __init__(self):
        self.shut = False
        self.model_config = type("Cfg", (), {"dtype": "torch.bfloat16", "quantization": "compressed-tensors"})
        self.engine_core = self

    def shutdown(self):
        self.shut = True


class FakeVLLM:
    """The shape of lm_eval.models.vllm_causallms.VLLM: builds vllm.LLM and keeps it as .model."""

    def __init__(self, **kwargs):
        import os

        self.kwargs = kwargs
        self.logging_stream = os.environ.get("VLLM_LOGGING_STREAM")
        engine = FakeEngine()
        self.model = types.SimpleNamespace(llm_engine=engine, apply_model=lambda fn: [
            {"CompressedTensorsLinearMethod/CompressedTensorsW4A4Fp4/MarlinNvFp4LinearKernel": 6}])


@pytest.fixture
def fake_lm_eval_vllm(monkeypatch):
    mod = types.ModuleType("lm_eval.models.vllm_causallms")
    mod.VLLM = FakeVLLM
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", mod)
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.26.0"
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.delenv("VLLM_LOGGING_STREAM", raising=False)
    return mod


def test_lm_evals_vllm_model_is_built_with_qscores_options(fake_lm_eval_vllm, tmp_path, monkeypatch):
    """The tasks stage's engine: the score stage's builder (``vllm.engine_spec``) with the same typed options,
    the arithmetic the stage resolved, and the user's --engine-kwargs."""
    import json

    import torch

    from jobs.checkpoints.checkpoint import Checkpoint, describe_quantization
    from jobs.core.settings import EngineOptions
    from jobs.engines import arithmetic_for

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}}))
    quant = describe_quantization(json.loads((tmp_path / "config.json").read_text()))
    ckpt = Checkpoint(tmp_path, {}, {}, quant, "hash")
    options = EngineOptions(max_model_len=1024, gpu_memory_utilization=0.4, enforce_eager=True,
                            nvfp4_compute="weight-only")
    lm, backend = lmeval.load_lm("vllm", ckpt, options, arithmetic_for("vllm", quant, options), batch_size=16,
                                 add_bos_token=True, engine_kwargs={"max_num_seqs": 8})
    assert lm.kwargs == {"pretrained": str(tmp_path), "dtype": "auto", "max_model_len": 1024, "add_bos_token": True,
                         "batch_size": "auto", "gpu_memory_utilization": 0.4, "tensor_parallel_size": 1,
                         "enforce_eager": True, "enable_prefix_caching": False, "max_num_seqs": 8,
                         "linear_backend": "marlin"}
    assert backend.arithmetic.label == "W4A16 (weight-only)"
    assert lm.logging_stream == "ext://sys.stderr"  # the stage's stdout is its result
    props = type("Props", (), {"name": "NVIDIA H100 80GB HBM3", "major": 9, "minor": 0})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    rt = backend.describe()
    assert rt["backend"] == "vllm" and rt["backend_version"] == "0.26.0" and rt["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert rt["kernel_path"].startswith("weight-only FP4 (W4A16) via Marlin") and "sm_90" in rt["kernel_path"]
    assert rt["engine"]["enable_prefix_caching"] is False and rt["engine"]["max_model_len"] == 1024
    assert "model" not in rt["engine"] and rt["gpu_count"] == 1
    engine = lm.model.llm_engine
    backend.close()
    assert engine.shut


def test_chat_template_choice():
    assert lmeval.chat_template_arg("none") is False and lmeval.chat_template_arg("") is False
    assert lmeval.chat_template_arg("default") is True
    assert lmeval.chat_template_arg("tool_use") == "tool_use"


def test_effective_shots_follow_lm_evals_rule():
    assert lmeval.effective_fewshot(5, None) == 5  # gsm8k's own
    assert lmeval.effective_fewshot(None, None) == 0
    assert lmeval.effective_fewshot(5, 8) == 8
    assert lmeval.effective_fewshot(0, 8) == 0  # a task pinned to 0 stays 0, as simple_evaluate does
