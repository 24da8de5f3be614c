"""The transformers backend: a plain forward pass, float32 log-softmax, the actual token's logprob gathered.

Runs on the CPU or one GPU. Quantized checkpoints load through transformers + compressed-tensors, whose
quantized forward is the arithmetic the checkpoint declares: NVFP4 (W4A4) quantizes each Linear's input
to FP4 in groups of 16 before multiplying by the dequantized weights. ModelOpt NVFP4 checkpoints are
first converted by compressed-tensors' own converter. In ``weight-only`` mode the activation
quantization is dropped from each layer's scheme, leaving dequantized weights times full-precision
activations (W4A16).
"""
from __future__ import annotations

import dataclasses
import gc
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jobs.checkpoints import arithmetic as arith_mod
from jobs.checkpoints.checkpoint import Checkpoint
from jobs.core.errors import CheckpointError, SettingsError, first_line
from jobs.core.settings import EngineOptions
from jobs.engines.base import Generation, SequenceScores, runtime_info
from jobs.texts.sampling import Sample

# compressed-tensors' quantization parameters: their dtypes are part of the arithmetic, never recast
_QPARAM_SUFFIXES = ("_scale", "_global_scale", "_zero_point", "weight_packed", "weight_shape")


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str, quantize_activations: bool = False):
    """The dtype the model computes in. ``auto``: bf16 on GPUs, the checkpoints' own precision; on CPUs
    float32 (faster there, and exact), except where activations are quantized: FP4/FP8 rounding of an
    activation flips at bin edges, so a W4A4 model computed from float32 activations is another arithmetic
    than every GPU's, which quantizes bf16 activations (issue #22: 0.055 nats of KL between the two)."""
    import torch

    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") or quantize_activations else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    except KeyError:
        raise SettingsError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32") from None


def with_activation_dtype(arith: arith_mod.Arithmetic, options: EngineOptions) -> arith_mod.Arithmetic:
    """``arith`` on this backend, with the dtype its activations are quantized from when it quantizes them."""
    if not arith.quantize_activations:
        return arith
    dtype = pick_dtype(options.dtype, pick_device(options.device), quantize_activations=True)
    return dataclasses.replace(arith, activation_dtype=str(dtype).replace("torch.", ""))


def load_model(ckpt: Checkpoint, dtype, device: str, arithmetic: arith_mod.Arithmetic):
    """A transformers model of ``ckpt`` computing ``arithmetic`` in ``dtype`` on ``device``."""
    q = ckpt.quant
    try:
        if q.method is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype).to(device)
        elif q.method == "compressed-tensors":
            model = _load_compressed_tensors(ckpt.path, dtype, device)
        elif q.method == "modelopt" and q.is_nvfp4:
            from jobs.checkpoints.formats import modelopt_to_compressed_tensors

            with tempfile.TemporaryDirectory(prefix="qscore-modelopt-") as tmp:
                model = _load_compressed_tensors(modelopt_to_compressed_tensors(ckpt, Path(tmp) / "ct"), dtype, device)
        else:
            raise CheckpointError(f"{ckpt.path}: the transformers backend cannot load {q.method} {q.scheme} "
                                  "checkpoints (use --backend vllm)")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{ckpt.path}: cannot load the model ({first_line(exc)[:300]})") from None
    if q.method is not None and not arithmetic.quantize_activations:
        _drop_activation_quantization(model)
    elif q.method is not None:
        check_activation_quantization(model, ckpt.path)
    model.eval()
    return model


def check_activation_quantization(model, path) -> None:
    """W4A4 is computed only where compressed-tensors attached each layer's activation quantization with its
    scale. transformers 5.24 loads NVFP4 checkpoints without it (``input_global_scale`` UNEXPECTED): the
    forward then multiplies full-precision activations, W4A16, while the run would record W4A4."""
    import transformers

    declared = [m for m in model.modules()
                if getattr(getattr(m, "quantization_scheme", None), "input_activations", None) is not None]
    missing = [m for m in declared if getattr(m.quantization_scheme.input_activations, "strategy", None) == "tensor_group"
               and not hasattr(m, "input_global_scale")]
    if not declared or missing:
        what = f"{len(missing)} layers without their input scale" if declared else "no layer quantizes its input"
        raise CheckpointError(
            f"{path}: transformers {transformers.__version__} did not attach the checkpoint's activation quantization "
            f"({what}): it would compute W4A16, not the declared W4A4; use transformers 5.17.0, "
            "or --nvfp4-compute weight-only")


def _load_compressed_tensors(path: Path, dtype, device: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    # dequantize=True: compressed-tensors decompresses the weights once at load (to bf16, its own
    # arithmetic); the quantized forward it installs then quantizes activations as the config declares.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != dtype and not name.endswith(_QPARAM_SUFFIXES):
            p.data = p.data.to(dtype)  # compute dtype for weights; scales keep their declared dtypes
    return model.to(device)


def _drop_activation_quantization(model) -> None:
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.input_activations is not None:
            module.quantization_scheme = scheme.model_copy(update={"input_activations": None})


class TransformersBackend:
    name = "transformers"

    def __init__(self, ckpt: Checkpoint, options: EngineOptions, *, arithmetic: arith_mod.Arithmetic):
        import torch

        self.ckpt = ckpt
        self.path = ckpt.path
        self.device = pick_device(options.device)
        self.dtype = pick_dtype(options.dtype, self.device, arithmetic.quantize_activations)
        self.arithmetic = arithmetic
        self.model = load_model(ckpt, self.dtype, self.device, self.arithmetic)
        self.max_batch_tokens = options.max_batch_tokens
        self.window = options.window
        self._torch = torch

    @classmethod
    def from_model(cls, model, device: str, max_batch_tokens: int = 8192, window: int = 64):
        """Wrap a model already in memory, with no checkpoint behind it (the benchmark's randomly
        initialised ones): it scores and describes itself, nothing else."""
        import torch

        self = cls.__new__(cls)
        self.path, self.ckpt, self.model, self.device = None, None, model.eval(), device
        self.dtype = next(model.parameters()).dtype
        self.arithmetic = None
        self.max_batch_tokens, self.window, self._torch = max_batch_tokens, window, torch
        return self

    # -- scoring ---------------------------------------------------------------------------------
    def _batches(self, samples: Sequence[Sample]):
        for start in range(0, len(samples), self.window):
            chunk = sorted(range(start, min(start + self.window, len(samples))),
                           key=lambda i: -len(samples[i].token_ids))
            batch: list[int] = []
            for i in chunk:  # longest first: a batch's first sample sets its padded width
                if batch and len(samples[batch[0]].token_ids) * (len(batch) + 1) > self.max_batch_tokens:
                    yield start, batch
                    batch = []
                batch.append(i)
            if batch:
                yield start, batch

    def _score_batch(self, samples: Sequence[Sample], batch: list[int], topk: int) -> dict[int, SequenceScores]:
        torch = self._torch
        lengths = [len(samples[i].token_ids) for i in batch]
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(samples[i].token_ids) for i in batch], batch_first=True)
        mask = (torch.arange(ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
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

        a = self.arithmetic
        dtype = str(self.dtype).replace("torch.", "")
        if a is None or self.ckpt is None or self.ckpt.quant.method is None:
            kernel = "none (unquantized)"
        elif a.quantize_activations:
            kernel = (f"compressed-tensors quantized forward: activations fake-quantized as declared "
                      f"({self.ckpt.quant.scheme}), weights dequantized to {dtype}; no low-precision kernel")
        else:
            kernel = f"compressed-tensors: weights dequantized to {dtype}, activations not quantized; no low-precision kernel"
        extra = {} if a is None else {"arithmetic": a.label, "nvfp4_compute": a.recorded_mode}
        return runtime_info("transformers", transformers.__version__, self.dtype, self.device, kernel, **extra)

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
