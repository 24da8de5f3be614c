"""The transformers backend: a plain forward pass, float32 log-softmax, the actual token's logprob gathered.

Runs on the CPU or one GPU. NVFP4 checkpoints (compressed-tensors and ModelOpt) are dequantised to the
compute dtype on load, so it scores what the weights say, not what a particular FP4 kernel computes.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..checkpoint import Checkpoint, inspect
from ..errors import CheckpointError, SettingsError
from ..sampling import Sample
from ..schema import SequenceScores
from .base import Generation, runtime_info


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype in (None, "", "auto"):
        # bf16 is the checkpoints' own precision on GPUs; on CPUs float32 is both faster and exact.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    except KeyError:
        raise SettingsError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32") from None


def load_model(ckpt: Checkpoint, dtype, device: str):
    """A transformers model from any checkpoint qscore scores; NVFP4 weights dequantised on load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    q = ckpt.quant
    try:
        if q.is_nvfp4 and q.method in ("compressed-tensors", "modelopt"):
            from safetensors.torch import load_file

            from ..nvfp4 import dequantize_state_dict

            config = AutoConfig.from_pretrained(ckpt.path)
            for attr in ("quantization_config", "compression_config"):
                if hasattr(config, attr):
                    delattr(config, attr)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            tensors = {}
            for f in sorted({t["file"] for t in ckpt.tensors.values()}):
                tensors.update(load_file(ckpt.path / f))
            state = dequantize_state_dict(tensors, q.method, dtype)
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [m for m in missing if not _is_tied(model, m)]
            if missing or unexpected:
                raise CheckpointError(
                    f"{ckpt.path}: weights do not match the config (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]})"
                )
        else:
            model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype).to(device)
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{ckpt.path}: cannot load the model ({first[:300]})") from None
    model.eval()
    return model


def _is_tied(model, name: str) -> bool:
    return name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


class TransformersBackend:
    name = "transformers"

    def __init__(self, model_path, dtype: str = "auto", device: str = "auto",
                 max_batch_tokens: int = 8192, window: int = 64, **_ignored):
        import torch

        self.path = Path(model_path)
        self.ckpt = inspect(self.path)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model = load_model(self.ckpt, self.dtype, self.device)
        self.max_batch_tokens = max_batch_tokens
        self.window = window  # samples sorted by length within a window: little padding, in-order output
        self._torch = torch

    @classmethod
    def from_model(cls, model, device: str, max_batch_tokens: int = 8192, window: int = 64):
        """Wrap a model already in memory, with no checkpoint behind it (the benchmark's randomly
        initialised ones): it scores and describes itself, nothing else."""
        import torch

        self = cls.__new__(cls)
        self.path, self.ckpt, self.model, self.device = None, None, model.eval(), device
        self.dtype = next(model.parameters()).dtype
        self.max_batch_tokens, self.window, self._torch = max_batch_tokens, window, torch
        return self

    # -- scoring ---------------------------------------------------------------------------------
    def _batches(self, samples: Sequence[Sample]):
        for start in range(0, len(samples), self.window):
            chunk = sorted(range(start, min(start + self.window, len(samples))),
                           key=lambda i: -len(samples[i].token_ids))
            batch: list[int] = []
            for i in chunk:
                longest = max([len(samples[j].token_ids) for j in batch] + [len(samples[i].token_ids)])
                if batch and longest * (len(batch) + 1) > self.max_batch_tokens:
                    yield start, batch
                    batch = []
                batch.append(i)
            if batch:
                yield start, batch

    def _score_batch(self, samples: Sequence[Sample], batch: list[int], topk: int) -> dict[int, SequenceScores]:
        torch = self._torch
        lengths = [len(samples[i].token_ids) for i in batch]
        width = max(lengths)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : lengths[row]] = torch.tensor(samples[i].token_ids)
            mask[row, : lengths[row]] = 1
        with torch.inference_mode():
            # Right padding keeps every real token's positions 0..L-1; the causal mask hides the pad.
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out = {}
            for row, i in enumerate(batch):
                n = lengths[row]
                lp = torch.log_softmax(logits[row, : n - 1].float(), dim=-1)
                target = ids[row, 1:n].to(lp.device)
                actual = lp.gather(-1, target[:, None])[:, 0]
                rank = (lp > actual[:, None]).sum(-1) + 1
                k = max(topk, 1)
                top_lp, top_id = lp.topk(k, dim=-1)
                out[i] = _to_scores(samples[i], actual, rank, top_id, top_lp, topk)
            del logits
        return out

    def score(self, samples: Sequence[Sample], topk: int = 1) -> Iterator[SequenceScores]:
        pending: dict[int, SequenceScores] = {}
        next_out = 0
        for _, batch in self._batches(samples):
            pending.update(self._score_batch(samples, batch, topk))
            while next_out in pending:
                yield pending.pop(next_out)
                next_out += 1

    # -- generation (validate) ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], max_new_tokens: int, tokenizer=None) -> list[Generation]:
        torch = self._torch
        from transformers import AutoTokenizer

        tok = tokenizer or AutoTokenizer.from_pretrained(self.path)
        results = []
        for prompt in prompts:
            enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                out = self.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                    return_dict_in_generate=True, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                )
            new = out.sequences[0, enc["input_ids"].shape[1]:]
            lps = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, new)]
            results.append(Generation(prompt, tok.decode(new, skip_special_tokens=True), new.tolist(), lps))
        return results

    def describe(self) -> dict:
        import transformers

        q = self.ckpt.quant if self.ckpt else None
        kernel = "none (unquantized)" if q is None or q.method is None else (
            f"dequantized to {str(self.dtype).replace('torch.', '')} on load ({q.scheme} weights "
            "expanded; no low-precision kernel)")
        return runtime_info("transformers", transformers.__version__, self.dtype, self.device, kernel)

    def close(self) -> None:
        del self.model
        gc.collect()
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def _to_scores(sample: Sample, actual, rank, top_id, top_lp, topk: int) -> SequenceScores:
    n = len(sample.token_ids)

    def pad(x, fill, dtype):
        arr = np.empty((n,) + tuple(x.shape[1:]), dtype=dtype)
        arr[0] = fill
        arr[1:] = x.cpu().numpy()
        return arr

    return SequenceScores(
        sample_id=sample.sample_id,
        token_ids=np.asarray(sample.token_ids, dtype=np.int32),
        logprob=pad(actual, np.nan, np.float32),
        rank=pad(rank, -1, np.int32),
        top1_id=pad(top_id[:, 0], -1, np.int32),
        top1_logprob=pad(top_lp[:, 0], np.nan, np.float32),
        topk_ids=pad(top_id, -1, np.int32) if topk > 1 else None,
        topk_logprobs=pad(top_lp, np.nan, np.float32) if topk > 1 else None,
    )
