"""Write a randomly initialised Qwen3 checkpoint of a real model's shape to disk, as a user's would be.

    python bench/random_checkpoint.py --shape 14B --out /tmp/qwen3-14b --tokenizer models/tiny-qwen3

Random weights are enough for load, start-up, quantize and throughput timings (the arithmetic is the
same); the tokenizer files (and chat template) are copied from --tokenizer so the stages can run.
Initialised on the GPU when there is one (seconds, not minutes, for 14B), saved in bf16.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_score import SHAPES, config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True, help="a directory whose tokenizer files are copied")
    a = ap.parse_args()
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(a.out)
    if (out / "config.json").exists():
        print(f"{out} exists", flush=True)
        return
    t0 = time.time()
    cfg = {k: v for k, v in config(a.shape).items() if k not in ("architectures", "model_type", "torch_dtype")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(Qwen3Config(**cfg)).to(torch.bfloat16)
    t1 = time.time()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="5GB")
    for f in Path(a.tokenizer).iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    print(f"{a.shape}: init {t1 - t0:.1f} s, save {time.time() - t1:.1f} s -> {out}", flush=True)


if __name__ == "__main__":
    main()
