"""Scoring throughput on one GPU: bare vLLM, the score stage's path, and the transformers backend.

    python bench/bench_score.py --shape 8B --formats bf16,nvfp4 --n 256 --len 1024 --out bench.jsonl

A randomly initialised Qwen3 of the given shape scores N×L random tokens:
  bare   ``LLM.generate`` with ``SamplingParams(max_tokens=1, prompt_logprobs=1)``, outputs discarded
  stage  the score stage's own loop on the same engine: ``VllmBackend.score`` → Parquet parts
         (``jobs.stages.score.write_dataset``): submission, parsing by token id, writing
  hf     the transformers backend (bf16 forward, float32 log-softmax, batches of ``--hf-batch-tokens``)
Per run it prints tokens/s, the share of the bf16 peak (2 · matmul parameters · tokens / time / the
measured rate of an 8192³ bf16 matmul on the same GPU; attention's own FLOPs are not counted, so this
understates the GPU's work) and peak GPU memory. Engine start is timed apart.

Weights are vLLM's ``load_format="dummy"`` (random, from the config alone): writing and reloading a 14B
checkpoint would cost minutes of GPU time and does not change the speed. NVFP4 takes the
``quantization_config`` of a checkpoint llm-compressor wrote (``--quant-config``), else the one
``jobs quantize --scheme NVFP4`` writes; it is run weight-only (Marlin on Hopper) and as declared (W4A4:
vLLM's emulation backend on Hopper, native FP4 on Blackwell). The transformers backend runs bf16 only.
Entry points that build vLLM engines need ``if __name__ == "__main__"``.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # Qwen3 configs: hidden, intermediate, layers, heads, kv heads, tied embeddings
    "1.7B": (2048, 6144, 28, 16, 8, True),
    "8B": (4096, 12288, 36, 32, 8, False),
    "14B": (5120, 17408, 40, 40, 8, False),
}
VOCAB = 151936


def config(shape: str) -> dict:
    h, inter, layers, heads, kv, tied = SHAPES[shape]
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": h,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": 128, "vocab_size": VOCAB, "tie_word_embeddings": tied,
            "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
            "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_bias": False,
            "bos_token_id": 151643, "eos_token_id": 151645}


def matmul_params(cfg: dict) -> int:
    """Parameters in the forward's matmuls per token, lm_head included (every position's logits are
    needed for prompt logprobs); the embedding lookup is not a matmul."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    return L * (h * q + 2 * h * kv + q * h + 3 * h * i) + h * cfg["vocab_size"]


# llm-compressor's NVFP4 (W4A4) quantization_config, as `jobs quantize --scheme NVFP4` writes it
NVFP4_CONFIG = {
    "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "nvfp4-pack-quantized", "output_activations": None,
        "weights": {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                    "dynamic": False, "observer": "memoryless_minmax", "scale_dtype": "torch.float8_e4m3fn"},
        "input_activations": {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16,
                              "strategy": "tensor_group", "dynamic": "local", "observer": "static_minmax",
                              "scale_dtype": "torch.float8_e4m3fn"}}},
}
# --formats: what each vLLM run computes (the NVFP4 ones differ only in --nvfp4-compute)
FORMATS = {"bf16": ("bf16", "declared"), "nvfp4-w4a16": ("nvfp4", "weight-only"), "nvfp4-w4a4": ("nvfp4", "declared"),
           "nvfp4": ("nvfp4", "weight-only")}


def nvfp4_quant_config(path: str | None) -> dict:
    return json.loads(Path(path).read_text())["quantization_config"] if path else NVFP4_CONFIG


def config_dir(work: Path, shape: str, fmt: str, quant_config: str | None) -> Path:
    """A checkpoint directory with a config.json and no weights (vLLM loads it with load_format=dummy)."""
    out = work / f"qwen3-{shape}-{fmt}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(shape)
    if fmt == "nvfp4":
        cfg["quantization_config"] = nvfp4_quant_config(quant_config)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


class PeakMemory:
    """Peak GPU memory in use (GiB) over the block, every process included (vLLM's engine runs in its
    own), sampled from cudaMemGetInfo every 50 ms."""

    def __enter__(self):
        import torch

        self.total = torch.cuda.mem_get_info(0)[1]
        self.peak, self.stop = 0, False
        self.t = threading.Thread(target=self.poll, daemon=True)
        self.t.start()
        return self

    def poll(self):
        import torch

        while not self.stop:
            free, total = torch.cuda.mem_get_info(0)
            self.peak = max(self.peak, total - free)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()

    @property
    def gib(self) -> float:
        return round(self.peak / 2**30, 1)


def bf16_peak_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    rate = 2 * 8192**3 * 20 / (time.perf_counter() - t) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return rate


def wait_for_free_gpu(limit_gib: float = 4.0, timeout_s: float = 60.0) -> None:
    """An engine's memory is returned when its process has gone; the next engine checks what is free."""
    import torch

    t = time.perf_counter()
    while time.perf_counter() - t < timeout_s:
        free, total = torch.cuda.mem_get_info(0)
        if (total - free) / 2**30 < limit_gib:
            return
        time.sleep(0.5)


def random_samples(n: int, length: int, seed: int = 0):
    import numpy as np

    from jobs.texts.sampling import Sample

    rng = np.random.default_rng(seed)
    return [Sample(i, tuple(int(t) for t in rng.integers(0, VOCAB - 1000, length)), False) for i in range(n)]


def run_vllm(path: Path, samples, options, results: Path) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from jobs.engines import arithmetic_for
    from jobs.engines.vllm import VllmBackend
    from jobs.checkpoints.checkpoint import describe_quantization
    from jobs.texts.evalsets import EvalSet
    from jobs.core.settings import ScoreSettings
    from jobs.stages import score as stage
    from jobs.core.phases import Phases

    tokens = sum(len(s.token_ids) for s in samples)
    topk = options.max_logprobs or 1
    quant = describe_quantization(json.loads((path / "config.json").read_text()))
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        eng = VllmBackend(path, options, arithmetic=arithmetic_for("vllm", quant, options), expected_tokens=tokens)
        start = time.perf_counter() - t0
        params = SamplingParams(max_tokens=1, prompt_logprobs=topk, detokenize=False, flat_logprobs=True)
        prompts = [TokensPrompt(prompt_token_ids=list(s.token_ids)) for s in samples]
        eng.llm.generate(prompts[:16], params, use_tqdm=False)  # warm-up: kernels chosen, caches allocated
        t = time.perf_counter()
        eng.llm.generate(prompts, params, use_tqdm=False)
        bare = time.perf_counter() - t
        shutil.rmtree(results, ignore_errors=True)
        final = results / "dataset=random"
        part_size = 32
        setrun = stage.SetRun("random", list(samples), EvalSet("random", [], {"dataset": "random tokens"}),
                              list(range(stage.n_parts(len(samples), part_size))), part_size, final,
                              stage.staging_dir(final), "bench", "bench")
        ckpt = SimpleNamespace(content_hash="bench", architecture="Qwen3ForCausalLM", path=path,
                               quant=SimpleNamespace(method=None, format=None, scheme=None, group_size=None, ignore=[]))
        settings = ScoreSettings(model=str(path), label="bench", engine=options, part_size=part_size, topk=topk)
        t = time.perf_counter()
        stage.write_dataset(setrun, eng, {"backend": "vllm"}, ckpt, settings, path, {"tokenizer_hash": "-"}, Phases())
        staged = time.perf_counter() - t
        info = eng.describe()
        eng.close()
        del eng
        gc.collect()
        wait_for_free_gpu()
    return {"engine_start_s": round(start, 1), "bare_tok_s": tokens / bare, "stage_tok_s": tokens / staged,
            "vllm_gpu_peak_gib": mem.gib, "kernel_path": info["kernel_path"], "arithmetic": info["arithmetic"],
            "compiled": not info["engine"]["enforce_eager"], "engine_start": info["engine_start"]}


def run_hf(cfg: dict, samples, batch_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from jobs.engines.hf import TransformersBackend

    tokens = sum(len(s.token_ids) for s in samples)
    torch.cuda.reset_peak_memory_stats()
    c = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**c), dtype=torch.bfloat16)
    eng = TransformersBackend.from_model(model, "cuda", max_batch_tokens=batch_tokens, window=64)
    list(eng.score(samples[:4]))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in eng.score(samples):
        pass
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30
    eng.close()
    del model, eng
    gc.collect()
    torch.cuda.empty_cache()
    return {"hf_tok_s": tokens / dt, "hf_gpu_peak_gib": round(peak, 1), "hf_batch_tokens": batch_tokens}


def emit(row: dict, out: str | None) -> None:
    print("BENCH " + json.dumps(row), flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), required=True)
    ap.add_argument("--formats", default="bf16,nvfp4-w4a16,nvfp4-w4a4",
                    help="vLLM runs (comma list): bf16, nvfp4-w4a16 (weight-only, Marlin), nvfp4-w4a4 (declared: "
                         "native on Blackwell, emulated elsewhere)")
    ap.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="also time the transformers backend")
    ap.add_argument("--n", type=int, default=256, help="sequences")
    ap.add_argument("--len", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--work", default="/tmp/qscore-bench")
    ap.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                    help="eager / compiled; unset: the score stage's own choice for this many tokens")
    ap.add_argument("--max-num-batched-tokens", default="", help="comma list: one engine per value (empty: vLLM's default)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--hf-batch-tokens", type=int, default=16384)
    ap.add_argument("--quant-config", default=None, help="config.json of an NVFP4 checkpoint llm-compressor wrote")
    ap.add_argument("--out", default=None, help="append one JSON line per run here")
    ap.add_argument("--topk", default="1", help="comma list: candidates per position (the score stage's --topk), "
                                                "one run per value")
    a = ap.parse_args()
    import torch

    work = Path(a.work)
    cfg = config(a.shape)
    peak = bf16_peak_tflops()
    samples = random_samples(a.n, a.len)
    flops_per_token = 2 * matmul_params(cfg)
    base = {"shape": a.shape, "n": a.n, "len": a.len, "gpu": torch.cuda.get_device_name(0),
            "bf16_peak_tflops": round(peak, 1), "matmul_params": matmul_params(cfg)}

    def share(tok_s: float) -> float:
        return round(flops_per_token * tok_s / (peak * 1e12), 3)

    from jobs.core.settings import EngineOptions

    for mnbt, fmt, topk in [(m, f, int(k)) for m in [int(x) for x in a.max_num_batched_tokens.split(",") if x] or [None]
                            for f in a.formats.split(",") for k in a.topk.split(",")]:
        weights, mode = FORMATS[fmt]
        options = EngineOptions(max_model_len=a.len + 8, gpu_memory_utilization=a.gpu_memory_utilization,
                                enforce_eager=a.enforce_eager, max_num_batched_tokens=mnbt, nvfp4_compute=mode,
                                load_format="dummy", max_logprobs=topk)
        row = {**base, "path": "vllm", "format": fmt, "max_num_batched_tokens": mnbt, "topk": topk}
        results = work / "results" / f"{a.shape}-{fmt}-top{topk}"
        row.update(run_vllm(config_dir(work, a.shape, weights, a.quant_config), samples, options, results))
        row["parquet_bytes_per_token"] = round(sum(p.stat().st_size for p in results.rglob("*.parquet"))
                                               / (a.n * a.len), 1)
        for k in ("bare", "stage"):
            row[f"{k}_peak_share"] = share(row[f"{k}_tok_s"])
            row[f"{k}_tok_s"] = round(row[f"{k}_tok_s"])
        row["stage_vs_bare"] = round(row["stage_tok_s"] / row["bare_tok_s"], 3)
        emit(row, a.out)
    if a.hf:
        row = {**base, "path": "transformers", "format": "bf16 (NVFP4 is dequantised to it)"}
        row.update(run_hf(cfg, samples, a.hf_batch_tokens))
        row["hf_peak_share"] = share(row["hf_tok_s"])
        row["hf_tok_s"] = round(row["hf_tok_s"])
        emit(row, a.out)


if __name__ == "__main__":
    main()
