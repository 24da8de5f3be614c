"""Calibration batches of several samples whose padding no observer sees.

llm-compressor (0.14) batches calibration samples itself, but its default collator cuts every sample of
a batch to the shortest one (tokens dropped) and its ``padding`` collator pads; its observers then take
the min/max over every position of a Linear's input, padding included (``llmcompressor/observers``:
nothing there reads the attention mask). qscore builds the DataLoader instead (``oneshot`` takes one):
samples of neighbouring lengths, longest first, padded on the right, and a forward pre-hook on every
Linear, run before llm-compressor's observer hook, zeroes the padded positions' inputs. A zero moves no
absolute maximum; right padding keeps every real token's positions; the causal mask keeps the padding
out of every real token's attention. So the observers see the activations batch size 1 shows them, up
to the rounding of batched kernels (docs/quantize.md has the measurements).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

from jobs.core.errors import QuantizeError


def batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sample indices in batches of neighbouring lengths, longest first (pure; every sample once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _collate(rows: list[dict], pad_id: int) -> dict:
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, r in enumerate(rows):
        ids[row, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[row, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def loader(dataset, batch_size: int, pad_id: int):
    """(DataLoader for ``oneshot``, the sample lengths of each of its batches in order)."""
    from torch.utils.data import DataLoader

    sizes = [len(x) for x in dataset["input_ids"]]
    groups = batches(sizes, batch_size)
    lengths = [[sizes[i] for i in g] for g in groups]
    return DataLoader(dataset, batch_sampler=groups, collate_fn=partial(_collate, pad_id=pad_id)), lengths


@contextmanager
def padding_hidden(model, lengths: list[list[int]]):
    """Zero the padded positions' input of every observed Linear while ``oneshot`` calibrates.

    The batch being run is llm-compressor's ``session.state.current_batch_idx``, which both its basic
    and sequential pipelines set before each forward (its AWQ token masking reads it the same way).
    Fails, when the calibration ends, if a padded batch was never masked or an observed Linear saw
    one in another shape (a mixture of experts' token-routed experts, say): then padding would have
    reached the observers.
    """
    import torch
    from llmcompressor.core import active_session

    padded = {b for b, lens in enumerate(lengths) if min(lens) != max(lens)}
    names = {id(m): n for n, m in model.named_modules()}
    seen, missed, cache = set(), set(), {}

    def hook(module, args):
        b = active_session().state.current_batch_idx
        if b not in padded or not hasattr(module, "input_observer") or not args:
            return None
        x, lens = args[0], lengths[b]
        if not isinstance(x, torch.Tensor):  # a tracer's proxy
            return None
        if x.dim() < 3 or tuple(x.shape[:2]) != (len(lens), max(lens)):
            missed.add(names.get(id(module), "?"))
            return None
        if (b, x.device) not in cache:
            cache.clear()
            keep = torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]
            cache[(b, x.device)] = keep.to(x.device)[..., None]
        seen.add(b)
        return (x.masked_fill(~cache[(b, x.device)], 0), *args[1:])

    handles = [m.register_forward_pre_hook(hook, prepend=True)
               for m in model.modules() if isinstance(m, torch.nn.Linear)] if padded else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    if missed or padded - seen:
        raise QuantizeError(f"calibration padding would reach the observers ({len(padded - seen)} padded batches "
                            f"unmasked; inputs of another shape at {', '.join(sorted(missed)[:3]) or '-'}): "
                            "use --calibration-batch-size 1")


@contextmanager
def model_attention(enabled: bool):
    """Keep the model's own attention (SDPA) in llm-compressor's calibration forwards when ``enabled``.

    llm-compressor 0.14 switches every calibration forward to eager attention
    (``llmcompressor.utils.helpers.use_eager_attention``) because the sequential pipeline's traced graphs
    bake in eager's mask. The basic pipeline traces nothing, and eager attention writes every head's
    L x L scores to memory and runs softmax over them apart: most of calibration's time beyond the
    Linear layers on a GPU (bench/RESULTS.md). The observers watch Linear inputs; only ``o_proj``'s is
    attention's output, the same values up to the two kernels' rounding (docs/quantize.md). Patched with
    compressed-tensors' ``patch_attr``, the helper llm-compressor patches models with: the version has no
    option for it.
    """
    if not enabled:
        yield
        return
    from compressed_tensors.utils import patch_attr
    from llmcompressor.utils import helpers

    @contextmanager
    def unchanged(model):
        yield

    with patch_attr(helpers, "use_eager_attention", unchanged):
        yield


def drift(a, b) -> dict[str, float]:
    """How far checkpoint ``b``'s tensors are from ``a``'s, per kind (the name's last part, e.g.
    ``input_global_scale``): the largest relative difference of any element for floating tensors, the
    share of elements that differ for integer ones (packed weights). Reads one tensor at a time."""
    from pathlib import Path

    import torch
    from safetensors import safe_open

    from jobs.checkpoints.checkpoint import weight_files

    def where(path):
        return {k: f for f in weight_files(Path(path)) for k in safe_open(f, "pt").keys()}

    wa, wb = where(a), where(b)
    if set(wa) != set(wb):
        raise QuantizeError(f"{a} and {b} hold different tensors: {sorted(set(wa) ^ set(wb))[:3]}")
    out: dict[str, float] = {}
    for name in sorted(wa):
        x, y = (safe_open(w[name], "pt").get_tensor(name) for w in (wa, wb))
        if x.dtype.is_floating_point:
            x, y = x.float(), y.float()
            d = ((x - y).abs() / x.abs().clamp_min(torch.finfo(torch.float32).tiny)).max().item() if x.numel() else 0.0
        else:
            d = (x != y).float().mean().item() if x.numel() else 0.0
        kind = name.rsplit(".", 1)[-1]
        out[kind] = max(out.get(kind, 0.0), d)
    return out
