"""The report's "Which recipe to deploy" section and its Pareto plots, from ``stats.deploy`` (computes nothing)."""
from __future__ import annotations

from jobs.report.fmt import ci, sig
from jobs.stats.summary import Summary

MARK = "◆"  # Pareto-optimal


def _gib(b) -> str:
    return "—" if b is None else f"{b / 2**30:.3g}" if b >= 2**27 else f"{b / 2**20:.3g} MiB"


def _speed(r, key: str) -> str:
    v = r.cost.get(key)
    if v is None:
        return "—"
    return sig(v, 4) + ("" if r.cost.get("deployment_speed", True) else "*")


def _mark(flag) -> str:
    return f" {MARK}" if flag else ""


def markdown(s: Summary, plot_names: list[str]) -> list[str]:
    d = s.deploy
    if d is None:
        return []
    L = ["## Which recipe to deploy", "",
         f"One row per recipe against **{s.baseline}**: quality as the mean over its calibration seeds "
         "(interval: the envelope of the seeds' 95 % intervals; spread: max − min over the seeds), cost from the "
         f"bench stage (its first checkpoint), each with its arithmetic: *scored as* (quality), *served as* (cost). {MARK} marks the Pareto-optimal recipes of {d.loss} against bytes "
         "(B) and against decode speed at batch 1 (1) and loaded (L): no other recipe is at least as good on both "
         "and better on one. * an emulated arithmetic's speed: not a deployment speed.", ""]
    L += ["| recipe | seeds | scored as | served as | GiB on disk | GPU weights GiB | decode tok/s b1 | decode tok/s loaded "
          "| Δnll | spread | mean KLD | spread | task recovery | Pareto |",
          "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in d.rows:
        kld = ci(r.kld["value"], r.kld["lo"], r.kld["hi"], 3) if r.kld and not r.baseline else ("0" if r.kld else "—")
        dn = "0" if r.baseline else ci(r.delta_nll["value"], r.delta_nll["lo"], r.delta_nll["hi"], 3, sign=True)
        marks = "".join(k for k, f in (("B", r.pareto_bytes), ("1", r.pareto_speed_b1), ("L", r.pareto_speed_loaded)) if f)
        name = f"**{r.recipe}** (baseline)" if r.baseline else f"**{r.recipe}**"
        L.append(f"| {name}{_mark(marks)} | {len(r.labels)} | {r.scored_as or '—'} | {r.cost.get('arithmetic') or '—'} "
                 f"| {_gib(r.cost.get('bytes_on_disk'))} | {_gib(r.cost.get('weight_memory_bytes'))} "
                 f"| {_speed(r, 'decode_tokens_per_s_b1')} | {_speed(r, 'decode_tokens_per_s_loaded')} "
                 f"| {dn} | {sig(r.spread_delta_nll, 2)} | {kld} | {sig(r.spread_kld, 2)} "
                 f"| {sig(r.task_recovery, 3)} | {marks or ''} |")
    L.append("")
    gpus = sorted({r.cost["gpu"] for r in d.rows if r.cost.get("gpu") and r.cost["gpu"] != "none"})
    loaded = sorted({r.cost["loaded_concurrency"] for r in d.rows if r.cost.get("loaded_concurrency")})
    if gpus:
        L.append(f"Speed measured on {', '.join(gpus)} with vLLM's benchmark (`python -m jobs bench`; loaded: "
                 f"{', '.join(map(str, loaded))} requests at once).")
    if d.speed_note:
        L.append(f"No speed figures: {d.speed_note}.")
    L.append("**Cannot be told apart:** " + ("; ".join(d.apart) if d.apart else "no pair of recipes within their seeds' spread"
                                             if any(r.spread_delta_nll is not None for r in d.rows) else
                                             "not measured (one seed per recipe: set SWEEP_SEEDS to two or more)")
             + ". **Within the noise floor:** " + ("; ".join(d.noise) if d.noise else
                                                 "none" if s.noise_floor else "not measured (`make noise-floor`)") + ".")
    L.append("")
    return L + [f"![{name[:-4]}]({name})" for name in plot_names if name.startswith("deploy_")] + [""]


def plots(s: Summary) -> dict[str, bytes]:
    """deploy_bytes.png, and deploy_speed.png where any recipe has a decode speed."""
    from jobs.report.plots import _plt, save

    d = s.deploy
    if d is None:
        return {}
    plt = _plt()
    out = {}

    def loss(r):
        return (r.kld if r.kld is not None else r.delta_nll)

    def panel(ax, key, flag, xlabel, scale):
        pts = [(r, r.cost.get(key)) for r in d.rows if r.cost.get(key) is not None]
        front = sorted([(x * scale, loss(r)["value"]) for r, x in pts if getattr(r, flag)])
        if len(front) > 1:
            ax.plot(*zip(*front), color="#888888", lw=1, ls="--", zorder=1, label="Pareto front")
        for r, x in pts:
            y = loss(r)
            on = getattr(r, flag)
            ax.errorbar([x * scale], [y["value"]], yerr=[[y["value"] - y["lo"]], [y["hi"] - y["value"]]],
                        fmt="D" if on else "o", ms=8 if on else 5, color="#000000" if r.baseline else
                        ("#d62728" if on else "#1f77b4"), capsize=3, zorder=2)
        # labels of points that (nearly) coincide are stacked, not drawn over each other
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        placed: list[tuple[float, float]] = []
        for r, x in pts:
            nx, ny = (x * scale - x0) / ((x1 - x0) or 1), (loss(r)["value"] - y0) / ((y1 - y0) or 1)
            near = sum(abs(nx - px) < 0.12 and abs(ny - py) < 0.06 for px, py in placed)
            placed.append((nx, ny))
            emulated = not r.cost.get("deployment_speed", True) and key != "bytes_on_disk"
            ax.annotate(r.recipe + (" (emulated)" if emulated else ""), (x * scale, loss(r)["value"]),
                        textcoords="offset points", xytext=(6, 4 - 11 * near), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{d.loss} vs {s.baseline} (nats/token)")
        ax.grid(alpha=0.3)

    biggest = max((r.cost.get("bytes_on_disk") or 0 for r in d.rows), default=0)
    if biggest:
        unit, scale = ("GiB", 1 / 2**30) if biggest >= 2**30 else ("MiB", 1 / 2**20)
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        panel(ax, "bytes_on_disk", "pareto_bytes", f"bytes on disk ({unit})", scale)
        ax.set_title("Quality loss against size (red diamonds: Pareto-optimal)", fontsize=10)
        out["deploy_bytes.png"] = save(fig)
    if any(r.cost.get("decode_tokens_per_s_b1") for r in d.rows):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        panel(axes[0], "decode_tokens_per_s_b1", "pareto_speed_b1", "decode output tokens/s, batch 1", 1.0)
        panel(axes[1], "decode_tokens_per_s_loaded", "pareto_speed_loaded", "decode output tokens/s, loaded", 1.0)
        fig.suptitle("Quality loss against decode speed (red diamonds: Pareto-optimal; right is faster)", fontsize=10)
        out["deploy_speed.png"] = save(fig)
    return out
