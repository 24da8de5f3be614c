"""Which recipe to deploy: quality against cost, one row per recipe of a sweep (pure).

A recipe is a scheme with its options; its checkpoints are the labels ``<recipe>.s<seed>`` (one per
calibration seed, ``checkpoints.recipes.recipe_of``) or the label alone. Per recipe: Δnll and mean KLD
against the baseline (the mean over its seeds, with the envelope of the seeds' 95 % intervals), the
spread across seeds (max − min; none for one checkpoint), task recovery, and what its first checkpoint
costs to serve (the bench stage's row). Then the Pareto-optimal recipes — no other recipe is at least as
good on both quality loss and cost, and better on one — against bytes on disk and against decode speed,
and the recipes whose loss cannot be told apart: from each other within the seeds' spread, or from the
noise floor (the verdict's Δnll check against it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from jobs.checkpoints.recipes import recipe_of
from jobs.stats.summary import Summary, twin_of

COST_KEYS = ("bytes_on_disk", "weight_memory_bytes", "kv_cache_tokens", "decode_tokens_per_s_b1",
             "decode_tokens_per_s_loaded", "prefill_tokens_per_s", "itl_p50_ms_b1", "ttft_p50_ms_b1",
             "loaded_concurrency", "arithmetic", "gpu", "deployment_speed", "note")


@dataclass(frozen=True)
class RecipeRow:
    recipe: str
    labels: tuple[str, ...]  # its checkpoints: one per seed
    delta_nll: dict  # value (mean over the seeds), lo, hi (the envelope of their intervals)
    kld: dict | None  # the same for mean KLD (lower bound from top-K); None without top-K
    spread_delta_nll: float | None  # max − min over the seeds; None for one checkpoint
    spread_kld: float | None
    task_recovery: float | None  # mean over the task measures, then over the seeds
    cost: dict  # COST_KEYS from the bench row of its first checkpoint that has one; {} when not benched
    scored_as: str | None = None  # the arithmetic its quality was measured in (the cost's is cost["arithmetic"])
    baseline: bool = False
    pareto_bytes: bool | None = None  # None: not on that plot (no figure)
    pareto_speed_b1: bool | None = None
    pareto_speed_loaded: bool | None = None


@dataclass(frozen=True)
class Deploy:
    loss: str  # "mean KLD" or "Δnll": the quality loss the Pareto fronts use
    rows: list[RecipeRow]
    apart: list[str] = field(default_factory=list)  # recipe pairs not told apart by the seeds' spread
    noise: list[str] = field(default_factory=list)  # recipes whose Δnll is within the noise floor
    speed_note: str | None = None  # why there is no speed (no GPU in any bench row)


def pareto(points: list[tuple[float, float] | None]) -> list[bool | None]:
    """For (loss, cost) points, both lower-is-better: True where no other point is at least as good on
    both and better on one; None for a missing point (pure)."""
    out: list[bool | None] = []
    for i, p in enumerate(points):
        if p is None:
            out.append(None)
            continue
        out.append(not any(q is not None and j != i and q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])
                           for j, q in enumerate(points)))
    return out


def _envelope(blocks: list[dict]) -> dict:
    return {"value": float(np.mean([b["value"] for b in blocks])), "lo": min(b["lo"] for b in blocks),
            "hi": max(b["hi"] for b in blocks)}


def _spread(values: list[float]) -> float | None:
    return float(max(values) - min(values)) if len(values) > 1 else None


def _recovery(s: Summary, label: str) -> float | None:
    rows = [r["recovery"] for r in (s.tasks or {}).get("rows", [])
            if r["model"] == label and r.get("recovery") is not None and r["verdict"] not in ("baseline", None)]
    return float(np.mean(rows)) if rows else None


def compute(s: Summary, costs: dict[str, dict]) -> Deploy | None:
    """The deploy table of ``s``'s models (noise twins left out) and the bench rows ``costs`` (by label);
    None when it would add nothing to the verdicts: no bench row and no recipe with several seeds."""
    labels = [m for m in s.models if m != s.baseline and twin_of(m, s.models) is None]
    groups: dict[str, list[str]] = {}
    for m in labels:
        groups.setdefault(recipe_of(m), []).append(m)
    if not labels or not (costs or any(len(ms) > 1 for ms in groups.values())):
        return None
    with_kld = all(s.models[m]["overall"].get("comparison") for m in labels)
    rows = [RecipeRow(recipe=s.baseline, labels=(s.baseline,), delta_nll={"value": 0.0, "lo": 0.0, "hi": 0.0},
                      kld={"value": 0.0, "lo": 0.0, "hi": 0.0} if with_kld else None, spread_delta_nll=None,
                      spread_kld=None, task_recovery=1.0 if s.tasks else None,
                      cost=_cost(costs, [s.baseline]), scored_as=_arith(s, s.baseline), baseline=True)]
    for recipe, ms in groups.items():
        paired = [s.models[m]["overall"]["paired"] for m in ms]
        dn = [{"value": p["delta_nll"], "lo": p["delta_nll_lo"], "hi": p["delta_nll_hi"]} for p in paired]
        kl = [s.models[m]["overall"]["comparison"]["kld"]["mean"] for m in ms] if with_kld else None
        recs = [r for r in (_recovery(s, m) for m in ms) if r is not None]
        rows.append(RecipeRow(recipe=recipe, labels=tuple(ms), delta_nll=_envelope(dn),
                              kld=_envelope([{k: max(b[k], 0.0) for k in ("value", "lo", "hi")} for b in kl]) if kl else None,
                              spread_delta_nll=_spread([d["value"] for d in dn]),
                              spread_kld=_spread([b["value"] for b in kl]) if kl else None,
                              task_recovery=float(np.mean(recs)) if recs else None, cost=_cost(costs, ms),
                              scored_as=_arith(s, ms[0])))
    loss = "mean KLD" if with_kld else "Δnll"

    def lossv(r: RecipeRow) -> float:
        return (r.kld if with_kld else r.delta_nll)["value"]

    def front(key: str, sign: float) -> list[bool | None]:
        pts = [(lossv(r), sign * r.cost[key]) if r.cost.get(key) is not None else None for r in rows]
        return pareto(pts)

    fb, f1, fl = front("bytes_on_disk", 1.0), front("decode_tokens_per_s_b1", -1.0), front("decode_tokens_per_s_loaded", -1.0)
    rows = [replace(r, pareto_bytes=a, pareto_speed_b1=b, pareto_speed_loaded=c) for r, a, b, c in zip(rows, fb, f1, fl)]
    speed = None
    if costs and not any(c.get("decode_tokens_per_s_b1") is not None for c in costs.values()):
        speed = next((c.get("note") for c in costs.values() if c.get("note")), None) or "speed needs a GPU"
    return Deploy(loss=loss, rows=rows, apart=_not_apart(rows), noise=_within_noise(s, groups), speed_note=speed)


def _arith(s: Summary, label: str) -> str | None:
    p = s.provenance.get(label) or {}
    return p.get("arithmetic") or p.get("dtype")


def _cost(costs: dict[str, dict], labels: list[str]) -> dict:
    row = next((costs[m] for m in labels if m in costs), None)
    return {k: row.get(k) for k in COST_KEYS} if row else {}


def _not_apart(rows: list[RecipeRow]) -> list[str]:
    """Pairs of recipes whose Δnll differs by no more than the larger of their seeds' spreads (only recipes
    with a measured spread, i.e. more than one seed, can be judged so)."""
    out = []
    rs = [r for r in rows if not r.baseline]
    for i, a in enumerate(rs):
        for b in rs[i + 1:]:
            spread = max(x for x in (a.spread_delta_nll, b.spread_delta_nll, -1.0) if x is not None)
            diff = abs(a.delta_nll["value"] - b.delta_nll["value"])
            if spread >= 0 and diff <= spread:
                out.append(f"{a.recipe} and {b.recipe} (Δnll differs by {diff:.3g}, the seeds' spread is {spread:.3g})")
    return out


def _within_noise(s: Summary, groups: dict[str, list[str]]) -> list[str]:
    """Recipes every checkpoint of which has its Δnll within the noise floor (or not shown to exceed it)."""
    out = []
    for recipe, ms in groups.items():
        checks = [c for m in ms if m in s.verdict for c in s.verdict[m].noise
                  if c.figure == "Δnll vs noise floor"]
        if checks and len(checks) == len(ms) and all(c.outcome != "exceeds" for c in checks):
            how = "within" if all(c.outcome == "within" for c in checks) else "not shown to exceed"
            out.append(f"{recipe} ({how} the noise floor ±{checks[0].against:.3g} nats)")
    return out
