"""NVFP4 checkpoints scored with the arithmetic they declare, the libraries as the oracle.

- declared (W4A4): the transformers backend must equal compressed-tensors' own quantized forward;
- weight-only (W4A16): it must equal the plain forward of the weights compressed-tensors dequantizes;
- ModelOpt checkpoints: converted by compressed-tensors' converter, their weights must equal what
  nvidia-modelopt's own NVFP4 tensor dequantizes;
- export-modelopt: a real nvidia-modelopt export, checked by the project's one layout checker.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, fixtures_subprocess
from jobs.texts import evalsets, sampling
from jobs.archive import logprobs
from jobs.checkpoints.checkpoint import inspect
from jobs.stages.aggregate import COLUMNS

DATA = Path(__file__).resolve().parent.parent / "data"


def _samples(tokenizer_dir: Path, n: int = 12):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = evalsets.read_local_texts(DATA / "wiki_mini.txt")[:n]
    return sampling.select(sampling.tokenize(texts, sampling.hf_encoder(tok)), 2048)


def _library_model(path: Path, *, activations: bool, dtype=torch.float32):
    """transformers + compressed-tensors on their own: weights decompressed by the library, and its
    quantized forward as installed (activations quantized as declared), or all quantization switched off."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    if dtype == torch.float32:
        model = model.float()  # fp8 group scales and bf16 weights are exact in float32
    model = model.eval()
    if not activations:
        for m in model.modules():
            if getattr(m, "quantization_scheme", None) is not None:
                m.quantization_enabled = False
    return model


def _oracle_logprobs(model, samples) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for s in samples:
            ids = torch.tensor([s.token_ids])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            out.append(lp.gather(-1, ids[0, 1:, None])[:, 0].numpy())
    return np.concatenate(out)


def _scored(results: Path, label: str, n: int) -> np.ndarray:
    table, meta = logprobs.read_dataset(logprobs.dataset_dir(results, label, "wiki"))
    t = {c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}
    keep = t["position"] > 0
    order = np.lexsort((t["position"][keep], t["sample_id"][keep]))
    return t["logprob"][keep][order], meta


@pytest.fixture(scope="module")
def wiki_file(tmp_path_factory, tiny_model) -> tuple[Path, list]:
    samples = _samples(tiny_model)
    texts = evalsets.read_local_texts(DATA / "wiki_mini.txt")[:12]
    path = tmp_path_factory.mktemp("sets") / "wiki.txt"
    path.write_text("\n".join(texts) + "\n")
    return path, samples


def _score(model: Path, label: str, results: Path, wiki: Path, tokenizer: Path, mode: str, *more):
    r = cli("score", "--model", model, "--label", label, "--datasets", f"wiki={wiki}", "--results-dir", results,
            "--backend", "transformers", "--tokenizer", tokenizer, "--nvfp4-compute", mode,
            *(more or ("--dtype", "float32")))
    assert r.exit_code == 0, r.output


def test_w4a4_on_the_cpu_computes_the_gpus_arithmetic(tiny_nvfp4, tiny_model, wiki_file, tmp_path):
    """Issue #22: the dtype left to qscore (``auto``) computes a W4A4 model's activations in bfloat16 on the CPU
    too, as every GPU does before quantizing them, and the run records it. The oracle: compressed-tensors' own
    quantized forward in bfloat16, text by text (one text per batch here, so only the attention mask differs)."""
    wiki, samples = wiki_file
    _score(tiny_nvfp4, "w4a4", tmp_path, wiki, tiny_model, "declared", "--max-batch-tokens", 1)
    ours, meta = _scored(tmp_path, "w4a4", len(samples))
    assert meta["runtime"]["dtype"] == "bfloat16" and meta["runtime"]["arithmetic"] == "W4A4 (emulated)"
    ref = _oracle_logprobs(_library_model(tiny_nvfp4, activations=True, dtype=torch.bfloat16), samples)
    f32 = _oracle_logprobs(_library_model(tiny_nvfp4, activations=True), samples)
    assert ours.shape == ref.shape
    gap, f32_gap = np.abs(ours - ref).mean(), np.abs(f32 - ref).mean()
    assert gap < 0.01 and np.abs(ours - ref).max() < 0.25, (gap, np.abs(ours - ref).max())
    assert gap < f32_gap / 3, (gap, f32_gap)  # the float32 arithmetic is another one, and measurably so
    # the baseline and the weight-only arithmetic keep float32 on the CPU (exact, and as before)
    _score(tiny_nvfp4, "w4a16", tmp_path, wiki, tiny_model, "weight-only", "--max-batch-tokens", 1)
    _score(tiny_model, "bf16", tmp_path, wiki, tiny_model, "declared", "--max-batch-tokens", 1)
    assert {_scored(tmp_path, m, len(samples))[1]["runtime"]["dtype"] for m in ("w4a16", "bf16")} == {"float32"}


@pytest.mark.parametrize("mode", ["declared", "weight-only"])
def test_llm_compressor_nvfp4_is_scored_as_the_library_computes_it(tiny_nvfp4, tiny_model, wiki_file, tmp_path, mode):
    wiki, samples = wiki_file
    _score(tiny_nvfp4, "m", tmp_path, wiki, tiny_model, mode)
    ours, meta = _scored(tmp_path, "m", len(samples))
    ref = _oracle_logprobs(_library_model(tiny_nvfp4, activations=mode == "declared"), samples)
    assert ours.shape == ref.shape
    # float32 both ways; what is left is summation order between padded batches and single texts
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)
    label = "W4A4 (emulated)" if mode == "declared" else "W4A16 (weight-only)"
    assert meta["runtime"]["arithmetic"] == label and meta["runtime"]["nvfp4_compute"] == mode


def test_the_activation_half_of_nvfp4_costs_something(tiny_nvfp4, tiny_model, wiki_file, tmp_path):
    """W4A4 and W4A16 differ (by ~0.05 nats on the tiny model): the mode is recorded in the fingerprint,
    so one label can never mix the two."""
    wiki, samples = wiki_file
    _score(tiny_nvfp4, "w4a4", tmp_path, wiki, tiny_model, "declared")
    _score(tiny_nvfp4, "w4a16", tmp_path, wiki, tiny_model, "weight-only")
    a, ma = _scored(tmp_path, "w4a4", len(samples))
    b, mb = _scored(tmp_path, "w4a16", len(samples))
    assert -a.mean() > -b.mean() + 0.005
    assert ma["fingerprint"] != mb["fingerprint"]
    r = cli("score", "--model", tiny_nvfp4, "--label", "w4a4", "--datasets", f"wiki={wiki}", "--results-dir", tmp_path,
            "--backend", "transformers", "--dtype", "float32", "--tokenizer", tiny_model, "--nvfp4-compute",
            "weight-only")
    assert r.exit_code == 1 and "already holds a run with other settings" in r.output


def test_modelopt_checkpoint_converts_to_what_modelopt_dequantizes(tiny_modelopt):
    """compressed-tensors' converter + decompression give the weights nvidia-modelopt's own NVFP4 tensor
    dequantizes, to within bf16 rounding (compressed-tensors decompresses in bf16: scale / global scale,
    then times the FP4 value, each rounded once)."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    from safetensors.torch import load_file

    from jobs.engines import arithmetic_for
    from jobs.engines.hf import TransformersBackend
    from jobs.core.settings import EngineOptions

    raw = load_file(tiny_modelopt / "model.safetensors")
    ckpt, opts = inspect(tiny_modelopt), EngineOptions(dtype="float32", nvfp4_compute="weight-only")
    backend = TransformersBackend(ckpt, opts, arithmetic=arithmetic_for("transformers", ckpt.quant, opts))
    state = backend.model.state_dict()
    n = 0
    for name, t in raw.items():
        if not name.endswith(".weight_scale_2"):
            continue
        mod = name.rpartition(".")[0]
        w = raw[f"{mod}.weight"]
        qt = NVFP4QTensor(torch.Size((w.shape[0], w.shape[1] * 2)), torch.float32, w)
        ref = qt.dequantize(dtype=torch.float32, scale=raw[f"{mod}.weight_scale"], double_scale=t, block_sizes={-1: 16})
        ours = state[f"{mod}.weight"].float()
        assert torch.allclose(ours, ref, rtol=2 ** -7, atol=0), mod  # two bf16 roundings: scale, product
        n += 1
    assert n == 14
    assert backend.describe()["arithmetic"] == "W4A16 (weight-only)"


def test_modelopt_checkpoint_declares_w4a4_too(tiny_modelopt, tiny_model, wiki_file, tmp_path):
    wiki, samples = wiki_file
    _score(tiny_modelopt, "w4a4", tmp_path, wiki, tiny_model, "declared")
    _score(tiny_modelopt, "w4a16", tmp_path, wiki, tiny_model, "weight-only")
    a, ma = _scored(tmp_path, "w4a4", len(samples))
    b, _ = _scored(tmp_path, "w4a16", len(samples))
    assert -a.mean() > -b.mean() + 0.005 and ma["runtime"]["arithmetic"] == "W4A4 (emulated)"


def test_export_modelopt_is_nvidia_modelopt_and_passes_the_checker(tiny_modelopt, tiny_model):
    from jobs.checkpoints import quantcheck

    meta = json.loads((tiny_modelopt / "qscore_export.json").read_text())
    assert meta["modelopt_version"] and meta["calibration"]["tokens"] > 0 and meta["quantized_layers"] == 14
    ckpt = inspect(tiny_modelopt)
    assert ckpt.quant.method == "modelopt" and ckpt.quant.scheme == "NVFP4"
    assert ckpt.quant.raw["producer"]["name"] == "modelopt"
    assert quantcheck.check(ckpt.tensors, ckpt.quant, "NVFP4") == []
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tiny_modelopt / f).read_bytes() == (tiny_model / f).read_bytes()
    assert not list(tiny_modelopt.parent.glob(f".{tiny_modelopt.name}.*"))


def test_export_modelopt_refuses_bad_input_in_one_line(tiny_modelopt, tmp_path):
    for args, msg in [(["--model", tmp_path / "nowhere", "--output", tmp_path / "x"], "no config.json"),
                      (["--model", tiny_modelopt, "--output", tmp_path / "y"], "already quantized"),
                      (["--model", tiny_modelopt.parent / "tiny-nvfp4-missing", "--output", tmp_path / "z"],
                       "no config.json")]:
        r = fixtures_subprocess("export-modelopt", *args)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error:") and msg in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
