"""The aggregate summary as one typed structure, computed once: what report.md, summary.json, summary.csv
and the plots show. Nothing downstream computes a statistic; the report modules only format.

``models`` keeps the JSON shape summary.json has always had (per model: ``sets`` and ``overall`` blocks of
``metrics``, ``comparison`` and ``docppl`` figures), so that users reading summary.json keep their keys;
the parts the report reasons with (pooling, path noise, verdicts, warnings) are typed here.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jobs.stats import intervals
from jobs.stats.metrics import text_starts

PATH_SEP = "~"  # <label>~<path>: <label>'s checkpoint scored again through another path
NEAR_UNIFORM = 0.9  # a baseline whose NLL is this share of ln(vocabulary) or more is close to guessing
# metadata that says how a scoring ran: the path of a ``<label>~<path>`` twin is where these differ
PATH_KEYS = (("runtime", "dtype"), ("runtime", "backend"), ("runtime", "backend_version"),
             ("runtime", "arithmetic"), ("runtime", "gpu_name"),  # not kernel_path: it repeats the dtype
             ("runtime", "batch_size"), ("runtime", "max_num_seqs"), ("runtime", "device"),
             ("sampling", "part_size"), ("sampling", "topk"))


@dataclass(frozen=True)
class Check:
    """One figure read against a threshold (``pass``/``fail``/``inconclusive``) or against a noise
    (``within``/``exceeds``/``inconclusive``); ``more``: units (texts, documents) that would decide an
    inconclusive one at the observed effect (``intervals.units_to_decide``)."""

    figure: str
    value: float | None
    lo: float | None
    hi: float | None
    against: float | None
    outcome: str
    more: int | None = None
    unit: str = "texts"
    note: str = ""


@dataclass(frozen=True)
class PathNoise:
    """A checkpoint scored twice, through two paths: the size of a difference that means none."""

    label: str  # the twin, <reference>~<path>
    reference: str
    path: str  # what differed, from the metadata ("dtype float32 → bfloat16")
    delta_nll: dict  # value, lo, hi: the twin against its reference
    kld: float
    rms_delta_p: float
    top1_disagreement: float
    tokens: int


@dataclass(frozen=True)
class ModelVerdict:
    model: str
    outcome: str  # pass / fail / inconclusive: from the thresholded checks (perplexity, tasks)
    ppl_change_pct: dict  # value, lo, hi
    perplexity: Check  # score against 100 · recovery_min
    kld: dict | None  # mean KLD value, lo, hi
    noise: tuple[Check, ...] = ()  # figures against the noise floor and the model's own path noise
    tasks: Check | None = None


@dataclass
class Summary:
    baseline: str
    sets: list[str]
    sets_not_in_every_model: list[str]
    bootstrap: dict
    models: dict
    recovery_min: float
    overall_sets: list[str] = field(default_factory=list)  # the sets pooled in "overall"
    same_text: dict = field(default_factory=dict)  # set -> the set holding the same text (pooled once)
    provenance: dict = field(default_factory=dict)
    tasks: dict | None = None
    noise_floor: list[str] = field(default_factory=list)  # <baseline>~<path>
    path_noise: dict = field(default_factory=dict)  # twin label -> PathNoise (the baseline's too)
    statistics: dict | None = None
    where_it_hurts: dict = field(default_factory=dict)
    where_it_hurts_decoded: bool = False
    verdict: dict = field(default_factory=dict)  # model -> ModelVerdict
    warnings: list[str] = field(default_factory=list)
    deploy: object | None = None  # stats.deploy.Deploy: which recipe to deploy (None: nothing to choose between)

    def compared(self) -> list[str]:
        """Noise-floor rows first (the yardstick), then the models paired with the baseline."""
        return self.noise_floor + [m for m in self.models if m != self.baseline and m not in self.noise_floor]

    def to_json(self) -> dict:
        out = {"baseline": self.baseline, "sets": self.sets, "sets_not_in_every_model": self.sets_not_in_every_model,
               "overall_sets": self.overall_sets, "same_text": self.same_text, "bootstrap": self.bootstrap,
               "recovery_min": self.recovery_min, "models": self.models, "provenance": self.provenance}
        if self.tasks is not None:
            out["tasks"] = self.tasks
        if self.statistics is not None:
            out.update(noise_floor=self.noise_floor, statistics=self.statistics, where_it_hurts=self.where_it_hurts,
                       where_it_hurts_decoded=self.where_it_hurts_decoded)
        out["path_noise"] = {k: dataclasses.asdict(v) for k, v in self.path_noise.items()}
        out["verdict"] = {k: dataclasses.asdict(v) for k, v in self.verdict.items()}
        out["warnings"] = self.warnings
        if self.deploy is not None:
            out["deploy"] = dataclasses.asdict(self.deploy)
        return _finite(out)


def _finite(x):
    """JSON has no NaN: undefined figures (an empty bucket's interval) are written as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# -- which sets are pooled -----------------------------------------------------------------------------------
def text_identity(dataset_meta: dict):
    """What a set's texts are, from its archive metadata: the file's sha256, else the hub dataset's
    fingerprint, else its (dataset, split); None when the metadata does not tell."""
    d = dataset_meta or {}
    if d.get("sha256"):
        return ("sha256", d["sha256"])
    if d.get("fingerprint"):
        return ("fingerprint", d["fingerprint"])
    if d.get("dataset"):
        return ("dataset", d["dataset"], d.get("split"))
    return None


def pooled_sets(sets: list[str], dataset_meta: dict[str, dict]) -> tuple[list[str], dict[str, str]]:
    """The sets the overall figures pool, and {left-out set: the set with the same text}. Two sets made from
    the same text (wiki_mini and wikitext2_doc from one file, one in chunks and one as whole documents)
    would count that text twice; the token-level set is kept (then the first by name)."""
    order = sorted(sets, key=lambda s: ((dataset_meta.get(s) or {}).get("kind") == "document", s))
    seen, keep, same = {}, [], {}
    for s in order:
        ident = text_identity(dataset_meta.get(s))
        if ident is not None and ident in seen:
            same[s] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = s
        keep.append(s)
    return [s for s in sets if s in keep], same


# -- context of document tokens --------------------------------------------------------------------------------
def context_lengths(sample_id: np.ndarray, position: np.ndarray, window: int, stride: int | None) -> np.ndarray:
    """How many tokens of context each token of a document-level set had: its position in the rolling
    window that scored it (``sampling.rolling_windows``), not its position in the document."""
    from jobs.texts.sampling import rolling_windows

    out = np.asarray(position, np.int64).copy()
    starts = text_starts(sample_id)
    for a, b in zip(starts, np.r_[starts[1:], len(sample_id)]):
        pos = out[a:b]
        n = int(pos.max()) + 1
        first = np.zeros(n, np.int64)  # the window start that scores each position
        for start, end, f in rolling_windows(n, window, stride):
            first[start + f:end] = start
        out[a:b] = pos - first[pos]
    return out


# -- path noise --------------------------------------------------------------------------------------------------
def twin_of(label: str, labels) -> str | None:
    """The reference of a ``<label>~<path>`` twin (the longest label it extends), else None."""
    refs = [r for r in labels if label.startswith(r + PATH_SEP) and r != label]
    return max(refs, key=len) if refs else None


def describe_path(ref_meta: dict, twin_meta: dict) -> str:
    diffs = []
    for section, key in PATH_KEYS:
        a, b = (ref_meta.get(section) or {}).get(key), (twin_meta.get(section) or {}).get(key)
        if a != b:
            diffs.append(f"{key} {a} → {b}")
    return ", ".join(diffs) or "no difference recorded in the metadata"


def path_noise(label: str, reference: str, path: str, paired: dict, comparison: dict) -> PathNoise:
    return PathNoise(label=label, reference=reference, path=path,
                     delta_nll={"value": paired["delta_nll"], "lo": paired["delta_nll_lo"], "hi": paired["delta_nll_hi"]},
                     kld=max(comparison["kld"]["mean"]["value"], 0.0),
                     rms_delta_p=comparison["delta_p"]["rms"]["value"],
                     top1_disagreement=1.0 - comparison["same_top1"]["value"], tokens=paired["tokens"])


def noise_checks(overall: dict, noise: PathNoise, what: str) -> tuple[Check, ...]:
    """Which of a model's figures (against the baseline) exceed a path noise: Δnll against ±|Δnll| of
    the noise, mean KLD, RMS Δp and top-1 disagreement against the noise's own, each from the model's
    interval (``intervals.within``)."""
    p, c = overall["paired"], overall.get("comparison")
    n = overall["texts"]
    figs = [("Δnll", p["delta_nll"], p["delta_nll_lo"], p["delta_nll_hi"], noise.delta_nll["value"])]
    if c:
        k, r, s = c["kld"]["mean"], c["delta_p"]["rms"], c["same_top1"]
        figs += [("mean KLD", k["value"], k["lo"], k["hi"], noise.kld),
                 ("RMS Δp", r["value"], r["lo"], r["hi"], noise.rms_delta_p),
                 ("top-1 disagreement", 1 - s["value"], 1 - s["hi"], 1 - s["lo"], noise.top1_disagreement)]
    out = []
    for name, v, lo, hi, nv in figs:
        w = intervals.within(lo, hi, v, nv, n)
        out.append(Check(figure=f"{name} vs {what}", value=v, lo=lo, hi=hi, against=abs(nv), outcome=w["outcome"],
                         more=w["more"], note=f"{noise.label}: {noise.path}"))
    return tuple(out)


# -- verdicts ----------------------------------------------------------------------------------------------------
def perplexity_check(overall: dict, recovery_min: float) -> Check:
    """The score (100 · PPL(baseline)/PPL(model)) read as a recovery: pass when its interval's lower end is at
    least 100 · RECOVERY_MIN (the task threshold: PPL at most 1/RECOVERY_MIN times the baseline's)."""
    p = overall["paired"]
    t = 100.0 * recovery_min
    outcome = intervals.three_way(p["score_lo"], p["score_hi"], t)
    more = intervals.units_to_decide(overall["score"], p["score_lo"], p["score_hi"], t, overall["texts"]) \
        if outcome == intervals.INCONCLUSIVE else None
    return Check("score", overall["score"], p["score_lo"], p["score_hi"], t, outcome, more)


def tasks_check(rows: list[dict], model: str) -> Check | None:
    """All of a model's task measures in one: fail if any fails, pass if all pass, else inconclusive (the
    first undecided measure named, with its documents to decide)."""
    mine = [r for r in rows if r["model"] == model and r["verdict"] not in ("baseline", None)]
    if not mine:
        return None
    decided = [r for r in mine if r["verdict"] != "undefined"]
    if not decided:
        return Check("task recovery", None, None, None, None, "undefined", note="no recovery defined")
    fail = [r for r in decided if r["verdict"] == "fail"]
    open_ = [r for r in decided if r["verdict"] == "inconclusive"]
    r = (fail or open_ or decided)[0]
    outcome = "fail" if fail else "inconclusive" if open_ else "pass"
    name = f"{r['task']} {r['metric']} ({r['filter']})"
    return Check(f"task recovery: {name}", r["recovery"], r["recovery_lo"], r["recovery_hi"], None, outcome,
                 r.get("more_documents"), unit="documents",
                 note=f"{len(decided)} measure(s): {sum(x['verdict'] == 'pass' for x in decided)} pass, "
                      f"{len(fail)} fail, {len(open_)} inconclusive")


def combine(*outcomes: str) -> str:
    outs = [o for o in outcomes if o not in (None, "undefined")]
    if any(o == "fail" for o in outs):
        return "fail"
    if outs and all(o == "pass" for o in outs):
        return "pass"
    return "inconclusive"


def model_verdict(s: Summary, m: str) -> ModelVerdict:
    overall = s.models[m]["overall"]
    p = overall["paired"]
    ppl = {"value": p["ppl_change_pct"], "lo": p["ppl_change_pct_lo"], "hi": p["ppl_change_pct_hi"]}
    perp = perplexity_check(overall, s.recovery_min)
    c = overall.get("comparison")
    kld = dict(c["kld"]["mean"]) if c else None
    group = twin_of(m, s.models) or m  # a twin's own path noise is its group's
    noise = [ch for label in s.noise_floor for ch in noise_checks(overall, s.path_noise[label], "noise floor")]
    noise += [ch for pn in s.path_noise.values() if pn.reference == group and pn.reference != s.baseline
              for ch in noise_checks(overall, pn, "own path noise")]
    tasks = tasks_check(s.tasks["rows"], m) if s.tasks else None
    return ModelVerdict(model=m, outcome=combine(perp.outcome, tasks.outcome if tasks else None),
                        ppl_change_pct=ppl, perplexity=perp, kld=kld, noise=tuple(noise), tasks=tasks)


def near_uniform(baseline: str, nll: float, vocab: int | None, ppl: float, where: str) -> str | None:
    if not vocab or vocab < 2 or nll < NEAR_UNIFORM * math.log(vocab):
        return None
    near, how = ("above", "no better than") if ppl > vocab else ("close to", "barely better than")
    return (f"the baseline {baseline}'s perplexity {ppl:.4g} is {near} its vocabulary size {vocab} ({where}): "
            f"it predicts {how} a uniform guess (ln {vocab} = {math.log(vocab):.3g} nats, its NLL "
            f"{nll:.3g}), so its comparisons say little about a quantization")


def vocabulary(meta: dict, max_token_id: int) -> tuple[int, str]:
    """The baseline's vocabulary size from its checkpoint's config.json where readable here, else the
    largest token id seen + 1 (a lower bound)."""
    path = (meta.get("model") or {}).get("path")
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
        v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
        if v:
            return int(v), "config.json"
    except (OSError, TypeError, ValueError):
        pass
    return int(max_token_id) + 1, "largest token id seen + 1"
