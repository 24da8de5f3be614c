"""The vLLM backend on the CPU: logprob parsing, kernel-path wording, the engine loop against a stand-in."""
from dataclasses import dataclass, field

import os
import numpy as np
import pytest

from jobs.checkpoints.arithmetic import kernel_problem, resolve
from jobs.checkpoints.checkpoint import Quantization
from jobs.core.errors import ScoreError

from jobs.engines.vllm import LogprobLookupError, describe_kernels, parse_prompt_logprobs
from jobs.texts.sampling import Sample
from jobs.core.settings import EngineOptions, Nvfp4Compute

BF16 = resolve(Quantization(None, None, "bf16"), Nvfp4Compute.DECLARED, backend="vllm", capability=9.0)


@dataclass
class Logprob:  # the shape of vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class Flat:  # the shape of vllm.logprobs.FlatLogprobs
    start_indices: list = field(default_factory=list)
    end_indices: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    ranks: list = field(default_factory=list)

    def append(self, entries):  # as vLLM's append_fast: the actual token first, then ranks 1..k
        self.start_indices.append(len(self.token_ids))
        for t, lp, r in entries or []:
            self.token_ids.append(t)
            self.logprobs.append(lp)
            self.ranks.append(r)
        self.end_indices.append(len(self.token_ids))

    def __len__(self):
        return len(self.start_indices)


SAMPLE = Sample(3, (10, 11, 12), False)
# position 1: actual token 11 is rank 2 (top-1 is 99); position 2: actual 12 is the top-1
DICTS = [None, {11: Logprob(-1.5, 2), 99: Logprob(-0.4, 1)}, {12: Logprob(-0.1, 1)}]


def flat(k=1):
    f = Flat()
    f.append(None)
    f.append([(11, -1.5, 2), (99, -0.4, 1)] + ([(11, -1.5, 2)] if k > 1 else []))
    f.append([(12, -0.1, 1), (12, -0.1, 1)] + ([(7, -3.0, 2)] if k > 1 else []))
    return f


@pytest.mark.parametrize("pl", [DICTS, flat()], ids=["dict", "flat"])
def test_actual_token_is_looked_up_by_id_not_by_rank(pl):
    s = parse_prompt_logprobs(SAMPLE, pl)
    assert s.sample_id == 3 and s.token_ids.tolist() == [10, 11, 12]
    assert np.isnan(s.logprob[0]) and s.rank[0] == -1
    np.testing.assert_allclose(s.logprob[1:], [-1.5, -0.1])
    assert s.rank[1:].tolist() == [2, 1]
    assert s.top1_id[1:].tolist() == [99, 12]
    np.testing.assert_allclose(s.top1_logprob[1:], [-0.4, -0.1])


def test_reference_run_bug_is_not_reproduced():
    """A rank==0 lookup finds nothing and falls back to the top candidate: NLL 0.25 instead of 0.8."""
    s = parse_prompt_logprobs(SAMPLE, flat())
    assert -np.mean(s.logprob[1:]) == pytest.approx(0.8)
    assert -np.mean(s.top1_logprob[1:]) == pytest.approx(0.25)  # conf_nll: what the reference run reported


def test_topk_columns():
    s = parse_prompt_logprobs(SAMPLE, flat(k=2), topk=2)
    assert s.topk_ids[1].tolist() == [99, 11] and s.topk_ids[2].tolist() == [12, 7]
    np.testing.assert_allclose(s.topk_logprobs[2], [-0.1, -3.0])


def test_missing_or_wrong_entries_are_errors():
    with pytest.raises(LogprobLookupError, match="position 1: token 11 has no entry"):
        parse_prompt_logprobs(SAMPLE, [None, {99: Logprob(-0.4, 1)}, {12: Logprob(-0.1, 1)}])
    bad = flat()
    bad.token_ids[0] = 5
    with pytest.raises(LogprobLookupError, match="position 1: entry is token 5, expected 11"):
        parse_prompt_logprobs(SAMPLE, bad)
    with pytest.raises(LogprobLookupError, match="2 prompt-logprob positions for 3 tokens"):
        parse_prompt_logprobs(SAMPLE, DICTS[:2])


def test_kernel_path_wording():
    hopper = describe_kernels({"ModelOptNvFp4LinearMethod/MarlinNvFp4LinearKernel": 14,
                               "UnquantizedLinearMethod": 1}, "9.0")
    assert hopper.startswith("weight-only FP4 (W4A16) via Marlin") and "sm_90" in hopper and "x14" in hopper
    blackwell = describe_kernels({"CompressedTensorsLinearMethod/CompressedTensorsW4A4Fp4/"
                                  "CutlassNvFp4LinearKernel": 14}, "10.0")
    assert blackwell.startswith("native FP4 (W4A4)") and "sm_100" in blackwell
    assert describe_kernels({"UnquantizedLinearMethod": 14, "UnquantizedEmbeddingMethod": 2},
                            "9.0").startswith("unquantized")
    assert describe_kernels({}, "9.0").startswith("unknown")


# -- the engine loop, against a stand-in for vllm.LLM --------------------------------------------------
class FakeLLM:
    """Records how it was built; finishes requests out of order, under the ids vLLM's outputs carry."""

    def __init__(self, **kwargs):
        import os

        self.kwargs = kwargs
        self.logging_stream = os.environ.get("VLLM_LOGGING_STREAM")
        self.llm_engine = self
        self.queue = []

    def enqueue(self, prompts, params, use_tqdm=False):
        self.queue = list(enumerate(prompts))
        return [f"{i}-1a2b3c4d" for i in range(len(prompts))]  # internal ids; outputs carry "0", "1", …

    def has_unfinished_requests(self):
        return bool(self.queue)

    def step(self):  # the last two submitted finish first
        done, self.queue = self.queue[-2:], self.queue[:-2]
        outs = []
        for i, prompt in reversed(done):
            ids = prompt["prompt_token_ids"]
            pl = [None] + [{t: Logprob(-0.5 - i, 2), 1: Logprob(-0.1, 1)} for t in ids[1:]]
            outs.append(type("Out", (), {"request_id": str(i), "finished": True, "prompt_logprobs": pl}))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, lambda **kw: kw
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.delenv("VLLM_LOGGING_STREAM", raising=False)
    return mod


def test_engine_loop_yields_in_input_order(fake_vllm, tmp_path):
    from jobs.engines.vllm import VllmBackend

    backend = VllmBackend(tmp_path, arithmetic=BF16, options=EngineOptions(max_model_len=64))
    samples = [Sample(i, (5, 6 + i, 7), False) for i in range(5)]
    out = list(backend.score(samples))
    assert [s.sample_id for s in out] == [0, 1, 2, 3, 4]
    assert [float(s.logprob[1]) for s in out] == [-0.5, -1.5, -2.5, -3.5, -4.5]  # each its own result
    assert all(s.top1_id[1] == 1 and s.rank[1] == 2 for s in out)


def test_engine_options(fake_vllm, tmp_path):
    from jobs.engines.vllm import VllmBackend

    kw = VllmBackend(tmp_path, arithmetic=BF16, options=EngineOptions(max_model_len=64, max_num_batched_tokens=8192)).llm.kwargs
    assert kw["enable_prefix_caching"] is False  # a cached prefix would get no prompt logprobs
    assert kw["skip_tokenizer_init"] is True  # no tokenizer files: token ids go in
    assert kw["max_num_batched_tokens"] == 8192 and "quantization" not in kw  # detected from the checkpoint
    (tmp_path / "tokenizer.json").write_text("{}")
    assert "skip_tokenizer_init" not in VllmBackend(tmp_path, arithmetic=BF16, options=EngineOptions()).llm.kwargs


def test_vllm_logs_leave_stdout_to_the_result(fake_vllm, tmp_path):
    """validate prints its JSON result on stdout; vLLM's logs (stdout by default) must not mix in."""
    from jobs.engines.vllm import VllmBackend

    assert VllmBackend(tmp_path, arithmetic=BF16, options=EngineOptions()).llm.logging_stream == "ext://sys.stderr"


def test_describe_records_gpu_and_kernel_path(fake_vllm, tmp_path, monkeypatch):
    import torch

    from jobs.engines.vllm import VllmBackend

    props = type("Props", (), {"name": "NVIDIA H100 80GB HBM3", "major": 9, "minor": 0})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    fake_vllm.__version__ = "0.26.0"
    backend = VllmBackend(tmp_path, arithmetic=BF16, options=EngineOptions(max_model_len=64))
    backend.llm.model_config = type("Cfg", (), {"dtype": torch.bfloat16, "quantization": "modelopt_fp4"})
    backend.llm.apply_model = lambda fn: [{"ModelOptNvFp4LinearMethod/MarlinNvFp4LinearKernel": 4}]
    backend._kernels = None  # inspected again, now that the stand-in has layers
    rt = backend.describe()
    assert rt["backend"] == "vllm" and rt["backend_version"] == "0.26.0" and rt["dtype"] == "bfloat16"
    assert (rt["gpu_name"], rt["compute_capability"], rt["quantization"]) == ("NVIDIA H100 80GB HBM3", "9.0",
                                                                             "modelopt_fp4")
    assert rt["kernel_path"].startswith("weight-only FP4 (W4A16) via Marlin") and "sm_90" in rt["kernel_path"]
    assert rt["engine"]["enable_prefix_caching"] is False and "model" not in rt["engine"]


# -- engine settings, start-up breakdown and the arithmetic asked for ---------------------------------------
NVFP4 = Quantization("compressed-tensors", "nvfp4-pack-quantized", "NVFP4", 16, 4, 4)


def test_engine_is_eager_for_small_workloads_and_compiled_without_graphs_for_large(tmp_path):
    from jobs.engines.vllm import COMPILE_MIN_TOKENS, engine_spec

    small = engine_spec(tmp_path, EngineOptions(), BF16, scoring=True, expected_tokens=250_000)
    assert small.kwargs["enforce_eager"] is True and "compilation_config" not in small.kwargs
    assert "250,000" in small.compile_reason
    big = engine_spec(tmp_path, EngineOptions(), BF16, scoring=True, expected_tokens=COMPILE_MIN_TOKENS).kwargs
    assert big["enforce_eager"] is False and big["compilation_config"] == {"cudagraph_mode": "NONE"}
    forced = engine_spec(tmp_path, EngineOptions(enforce_eager=False), BF16, scoring=True, expected_tokens=10)
    assert forced.kwargs["enforce_eager"] is False and forced.compile_reason.startswith("asked for")
    assert "linear_backend" not in small.kwargs


def test_one_builder_for_scoring_and_tasks(tmp_path):
    """Score/validate and lm-eval's tasks get vLLM's settings from one function: the same options give the same
    engine, except what only prompt scoring wants (eager by workload, no CUDA graphs, token ids in, the engine
    core in-process)."""
    from jobs.engines.vllm import ENGINE_ENV, GENERATION_ENV, SCORING_ENV, engine_spec

    opts = EngineOptions(dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.5, tensor_parallel_size=2,
                         max_num_batched_tokens=4096, quantization="modelopt_fp4", nvfp4_compute="weight-only",
                         kv_cache_memory_bytes=3 << 30)
    wo = resolve(NVFP4, opts.nvfp4_compute, backend="vllm", capability=9.0)
    score = engine_spec(tmp_path, opts, wo, scoring=True, expected_tokens=10)
    tasks = engine_spec(tmp_path, opts, wo, scoring=False, extra={"max_num_seqs": 8})
    shared = {"model": str(tmp_path), "dtype": "bfloat16", "max_model_len": 1024, "gpu_memory_utilization": 0.5,
              "tensor_parallel_size": 2, "enable_prefix_caching": False, "max_num_batched_tokens": 4096,
              "quantization": "modelopt_fp4", "linear_backend": "marlin", "kv_cache_memory_bytes": 3 << 30}
    assert score.kwargs == {**shared, "enforce_eager": True, "skip_tokenizer_init": True}
    # generation is decode-bound: compiled, with CUDA graphs; the user's --engine-kwargs pass through
    assert tasks.kwargs == {**shared, "enforce_eager": False, "max_num_seqs": 8}
    assert score.env == {**ENGINE_ENV, **SCORING_ENV} and tasks.env == {**ENGINE_ENV, **GENERATION_ENV}
    assert engine_spec(tmp_path, EngineOptions(enforce_eager=True), BF16, scoring=False).kwargs["enforce_eager"] is True
    # --engine-kwargs win over qscore's choices, but not over the arithmetic asked for
    over = engine_spec(tmp_path, opts, wo, scoring=False, extra={"enable_prefix_caching": True, "linear_backend": "x"})
    assert over.kwargs["enable_prefix_caching"] is True and over.kwargs["linear_backend"] == "marlin"


def test_engine_environment_leaves_what_the_user_set(tmp_path, monkeypatch):
    from jobs.engines.vllm import engine_spec

    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "1")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    engine_spec(tmp_path, EngineOptions(), BF16, scoring=True).apply_env()
    import os

    assert os.environ["VLLM_USE_FLASHINFER_SAMPLER"] == "1" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


@pytest.mark.parametrize("mode, cap, backend, label, linear", [
    ("declared", 9.0, "vllm", "W4A4 (emulated)", "emulation"),
    ("declared", 10.0, "vllm", "W4A4 (native)", "auto"),
    ("weight-only", 9.0, "vllm", "W4A16 (weight-only)", "marlin"),
    ("weight-only", 12.0, "vllm", "W4A16 (weight-only)", "marlin"),
    ("declared", None, "transformers", "W4A4 (emulated)", "auto"),
    ("weight-only", None, "transformers", "W4A16 (weight-only)", "auto"),
])
def test_arithmetic_of_nvfp4(mode, cap, backend, label, linear, tmp_path):
    from jobs.engines.vllm import engine_spec

    a = resolve(NVFP4, Nvfp4Compute(mode), backend=backend, capability=cap)
    assert (a.label, a.vllm_linear_backend, a.mode) == (label, linear, Nvfp4Compute(mode))
    assert a.recorded_mode == mode
    if backend == "vllm":
        kw = engine_spec(tmp_path, EngineOptions(nvfp4_compute=mode), a, scoring=True, expected_tokens=1).kwargs
        assert kw.get("linear_backend", "auto") == linear


def test_weight_only_checkpoints_and_other_schemes_are_what_they_declare():
    a16 = Quantization("compressed-tensors", "nvfp4-pack-quantized", "NVFP4A16", 16, 4, None)
    assert resolve(a16, "declared", backend="vllm", capability=9.0).label == "W4A16 (weight-only)"
    fp8 = Quantization("compressed-tensors", "float-quantized", "FP8_DYNAMIC", None, 8, 8)
    assert resolve(fp8, "weight-only", backend="vllm", capability=9.0) == resolve(fp8, "declared", backend="vllm")
    assert resolve(fp8, "declared", backend="vllm").mode is None
    assert resolve(fp8, "declared", backend="vllm").recorded_mode == "n/a"


def test_a_silent_fallback_is_refused():
    emulated = resolve(NVFP4, "declared", backend="vllm", capability=9.0)
    marlin = {"CompressedTensorsLinearMethod/CompressedTensorsW4A4Fp4/MarlinNvFp4LinearKernel": 14}
    emul = {"CompressedTensorsLinearMethod/CompressedTensorsW4A4Fp4/EmulationNvFp4LinearKernel": 14}
    assert "MarlinNvFp4LinearKernel" in kernel_problem(emulated, marlin)
    assert kernel_problem(emulated, emul) is None
    wo = resolve(NVFP4, "weight-only", backend="vllm", capability=9.0)
    assert kernel_problem(wo, marlin) is None and kernel_problem(wo, emul)
    native = resolve(NVFP4, "declared", backend="vllm", capability=10.0)
    assert kernel_problem(native, marlin) and kernel_problem(native, {"X/CutlassNvFp4LinearKernel": 14}) is None
    assert "W4A4 emulated" in describe_kernels(emul, "9.0")


def test_engine_refuses_kernels_that_do_not_compute_the_mode(fake_vllm, tmp_path, monkeypatch):
    from jobs.engines import vllm as vb

    from jobs.engines import arithmetic_for

    monkeypatch.setattr(vb, "gpu_capability", lambda: 9.0)
    monkeypatch.setattr(FakeLLM, "apply_model", lambda self, fn: [{"A/B/MarlinNvFp4LinearKernel": 4}], raising=False)
    declared, weight_only = EngineOptions(), EngineOptions(nvfp4_compute="weight-only")
    with pytest.raises(ScoreError, match="W4A4 \\(emulated\\) asked for, but the FP4 layers run"):
        vb.VllmBackend(tmp_path, declared, arithmetic=arithmetic_for("vllm", NVFP4, declared))
    backend = vb.VllmBackend(tmp_path, weight_only, arithmetic=arithmetic_for("vllm", NVFP4, weight_only))
    assert backend.llm.kwargs["linear_backend"] == "marlin"


def test_start_up_breakdown_from_vllms_log_lines():
    from jobs.engines.vllm import parse_start_log

    lines = ["Loading weights took 3.21 seconds", "Model loading took 15.2 GiB memory and 4.500000 seconds",
             "torch.compile took 7.25 s in total", "Graph capturing finished in 6 secs, took 0.5 GiB",
             "init engine (profile, create kv cache, warmup model) took 20.10 s (compilation: 7.25 s)", "other"]
    assert parse_start_log(lines) == {"weights_load_s": 3.21, "model_load_s": 4.5, "compile_s": 7.25,
                                      "graph_capture_s": 6.0, "init_engine_s": 20.1}


def test_engine_records_its_start(fake_vllm, tmp_path):
    import logging

    from jobs.engines.vllm import VllmBackend

    class Logging(FakeLLM):
        def __init__(self, **kw):
            super().__init__(**kw)
            logging.getLogger("vllm.model_executor").info("Loading weights took 1.50 seconds")

    fake_vllm.LLM = Logging
    b = VllmBackend(tmp_path, arithmetic=BF16, options=EngineOptions(), expected_tokens=1000)
    assert b.start["weights_load_s"] == 1.5 and b.start["engine_start_s"] >= 0
    assert b.llm.kwargs["enforce_eager"] is True and "1,000 tokens" in b.compile_reason


def test_the_activation_dtype_is_chosen_only_where_activations_are_quantized():
    """transformers on the CPU, dtype auto: W4A4 quantizes bfloat16 activations as a GPU does (issue #22), and its
    archives' fingerprints say so; the baseline and weight-only keep float32 and the fingerprints they had."""
    import torch

    from jobs.engines import arithmetic_for
    from jobs.engines.hf import pick_dtype

    cpu = EngineOptions(device="cpu")
    w4a4 = arithmetic_for("transformers", NVFP4, cpu)
    assert w4a4.activation_dtype == "bfloat16" and w4a4.fingerprint_fields() == {"activation_dtype": "bfloat16"}
    assert arithmetic_for("transformers", NVFP4, cpu.replace(dtype="float32")).activation_dtype == "float32"
    for quiet in (arithmetic_for("transformers", NVFP4, cpu.replace(nvfp4_compute="weight-only")),
                  arithmetic_for("transformers", Quantization(None, None, "bf16"), cpu)):
        assert quiet.activation_dtype is None and quiet.fingerprint_fields() == {}
    assert pick_dtype("auto", "cpu") is torch.float32 and pick_dtype("auto", "cpu", True) is torch.bfloat16
    assert pick_dtype("auto", "cuda") is torch.bfloat16 and pick_dtype("float32", "cpu", True) is torch.float32


def test_vllm_is_imported_with_its_logs_on_stderr(monkeypatch):
    """vLLM configures its logging when first imported: the capability probe (the first import, before any
    engine) must already send its logs to stderr, or they land in stdout before the stage's JSON result."""
    import sys
    import types

    from jobs.engines import vllm as vb

    seen = {}

    class Platform:
        @staticmethod
        def get_device_capability():
            seen["stream"] = os.environ.get("VLLM_LOGGING_STREAM")
            return types.SimpleNamespace(major=9, minor=0)

    fake = types.ModuleType("vllm.platforms")
    fake.current_platform = Platform()
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.platforms", fake)
    monkeypatch.delenv("VLLM_LOGGING_STREAM", raising=False)
    assert vb.gpu_capability() == 9.0
    assert seen["stream"] == "ext://sys.stderr"


def test_w4a4_is_refused_when_transformers_drops_the_activation_quantization():
    """transformers 5.24 loads an NVFP4 checkpoint without its input scales: W4A16 computed under a W4A4 label.
    The transformers backend must refuse that model instead of scoring it."""
    import types

    import torch

    from jobs.core.errors import CheckpointError
    from jobs.engines.hf import check_activation_quantization

    def layer(with_scale: bool):
        m = torch.nn.Linear(4, 4)
        m.quantization_scheme = types.SimpleNamespace(input_activations=types.SimpleNamespace(strategy="tensor_group"))
        if with_scale:
            m.input_global_scale = torch.nn.Parameter(torch.ones(1))
        return m

    check_activation_quantization(torch.nn.Sequential(layer(True), layer(True)), "ckpt")
    with pytest.raises(CheckpointError, match="1 layers without their input scale.*W4A16"):
        check_activation_quantization(torch.nn.Sequential(layer(True), layer(False)), "ckpt")
    with pytest.raises(CheckpointError, match="no layer quantizes its input"):
        check_activation_quantization(torch.nn.Sequential(torch.nn.Linear(4, 4)), "ckpt")
