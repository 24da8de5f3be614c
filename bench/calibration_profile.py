"""Where calibration's time goes: a model of a real shape (fewer layers), plain forwards against `oneshot`.

    python3 bench/calibration_profile.py --shape 14B --layers 8 --samples 128 --seq-len 2048 \\
        --batch-sizes 1,16 [--profile]

Random weights on the GPU (no disk), random token ids of full length (no padding). For each batch size it
times, in one process: the model's plain forward with SDPA and with eager attention (what llm-compressor's
`calibration_forward_context` forces), and `oneshot` with qscore's NVFP4 recipe, DataLoader and padding
hook on the basic pipeline, as `python -m jobs quantize` runs it — once as llm-compressor ships it (eager
attention) and once keeping the model's own (SDPA), as the stage does (`jobs.checkpoints.batching.model_attention`).
Each run prints a `BENCH ` JSON line (seconds, tokens/s, TFLOP/s of the Linear layers, and for `oneshot` the
largest relative difference of an input_global_scale from the first batch size's eager run); `--profile` adds
torch.profiler's top CUDA kernels of one `oneshot` run. Per-layer work is uniform, so the whole model's
time is about layers/--layers times these.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_score import SHAPES, config  # noqa: E402

DEVICE = "cuda"


def build(shape: str, layers: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = {k: v for k, v in config(shape).items() if k not in ("architectures", "model_type", "torch_dtype")}
    cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen3ForCausalLM(Qwen3Config(**cfg)).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    # oneshot reads the model's config again from its path: a directory holding only the config
    where = Path(tempfile.mkdtemp(prefix="calib-profile-"))
    model.config.save_pretrained(where)
    model.config._name_or_path = str(where)
    return model.eval()


def linear_flops(model, tokens: int) -> float:
    import torch

    n = sum(m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    return 2.0 * n * tokens


def dataset(samples: int, seq_len: int, vocab: int, seed: int = 1):
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (samples, seq_len), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len] * samples})


def plain(model, data, bs: int, attention: str) -> float:
    import torch

    model.config._attn_implementation = attention
    ids = torch.tensor(data["input_ids"], device=DEVICE)
    with torch.no_grad():
        model(input_ids=ids[:bs], logits_to_keep=1)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(ids), bs):
            model(input_ids=ids[i:i + bs], logits_to_keep=1)
        torch.cuda.synchronize()
    model.config._attn_implementation = "sdpa"
    return time.perf_counter() - t0


def calibrate(shape, layers, data, bs: int, attention: str, profile: bool, tokenizer) -> tuple[float, str | None]:
    import torch
    from llmcompressor import oneshot

    from jobs.checkpoints import batching, recipes

    model = build(shape, layers)
    loader, lengths = batching.loader(data, bs, 0)
    recipe = recipes.build("NVFP4", ["lm_head"])
    table = None
    torch.cuda.synchronize()
    with contextlib.ExitStack() as stack:
        stack.enter_context(batching.model_attention(attention == "sdpa"))
        prof = None
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile
            prof = stack.enter_context(torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]))
        t0 = time.perf_counter()
        with batching.padding_hidden(model, lengths):
            oneshot(model=model, recipe=recipe, dataset=loader, pipeline="basic", processor=tokenizer)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    scales = {n: m.input_global_scale.detach().float().cpu() for n, m in model.named_modules()
              if hasattr(m, "input_global_scale")}
    if prof is not None:
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    from llmcompressor.core import active_session

    active_session().reset()  # the session holds the model: without this the next run's model would not fit
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return seconds, table, scales


def drift(a: dict, b: dict) -> float:
    """The largest relative difference of any Linear's input_global_scale between two calibrations."""
    return max(((a[k] - b[k]).abs() / a[k].abs()).max().item() for k in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="14B")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--tokenizer", default=os.environ.get("TOKENIZER_DIR", ".gpu-fixtures/tiny-bf16"),
                    help="any tokenizer directory: oneshot wants a processor beside a dataset, and uses none of it here")
    ap.add_argument("--no-forward", action="store_true", help="skip the plain forwards")
    ap.add_argument("--seed-spread", action="store_true",
                    help="one more SDPA calibration on other samples: how far the scales move with the data")
    ap.add_argument("--profile", action="store_true", help="torch.profiler's top kernels of the last oneshot run")
    a = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    global DEVICE
    if not torch.cuda.is_available():  # a smoke run of the script itself; the figures mean nothing on a CPU
        DEVICE = "cpu"
        torch.cuda.synchronize = lambda: None
        torch.cuda.get_device_name = lambda _=0: "cpu"
        torch.cuda.max_memory_allocated = lambda: 0

    full_layers = config(a.shape)["num_hidden_layers"]
    probe = build(a.shape, a.layers)
    vocab = probe.config.vocab_size
    data = dataset(a.samples, a.seq_len, vocab)
    tokens = a.samples * a.seq_len
    flops = linear_flops(probe, tokens)
    base = {"shape": a.shape, "layers": a.layers, "of_layers": full_layers, "samples": a.samples,
            "seq_len": a.seq_len, "gpu": torch.cuda.get_device_name(0)}

    def emit(kind, bs, seconds, **more):
        row = {**base, "run": kind, "batch_size": bs, "seconds": round(seconds, 2),
               "tokens_per_s": round(tokens / seconds), "linear_tflops": round(flops / seconds / 1e12, 1),
               "full_model_s_est": round(seconds * full_layers / a.layers, 1), **more}
        print("BENCH " + json.dumps(row), flush=True)

    sizes = [int(x) for x in a.batch_sizes.split(",") if x.strip()]
    for bs in [] if a.no_forward else sizes:
        for attention in ("sdpa", "eager"):
            emit(f"forward-{attention}", bs, plain(probe, data, bs, attention))
    del probe
    torch.cuda.empty_cache()
    table, tokenizer, first = None, AutoTokenizer.from_pretrained(a.tokenizer), None
    for bs in sizes:
        for attention in ("eager", "sdpa"):
            last = a.profile and bs == sizes[-1] and attention == "eager"
            seconds, t, scales = calibrate(a.shape, a.layers, data, bs, attention, last, tokenizer)
            table = t or table
            first = first or scales  # the reference: the first batch size, llm-compressor's eager attention
            emit(f"oneshot-{attention}", bs, seconds, peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                 input_global_scale_drift=drift(first, scales))
    if a.seed_spread:  # the same batch size and attention on other random samples: the data's own effect
        seconds, _, other = calibrate(a.shape, a.layers, dataset(a.samples, a.seq_len, vocab, seed=2), sizes[-1], "sdpa",
                                      False, tokenizer)
        emit("oneshot-sdpa-other-samples", sizes[-1], seconds, input_global_scale_drift=drift(scales, other))
    if table:
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
