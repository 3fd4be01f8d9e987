"""Report figures (matplotlib, Agg) as PNG bytes. Each function takes results + analysis, returns PNG or None."""

from __future__ import annotations

import io

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vllm_normswap.ab import metrics  # noqa: E402
from vllm_normswap.ab.loadstats import LATENCY_KEYS  # noqa: E402
from vllm_normswap.ab.premise import matrix  # noqa: E402
from vllm_normswap.registry import OPTIONS, SITES, TOKEN_HISTOGRAMS  # noqa: E402

COLORS = {o.id: o.color for o in OPTIONS.values()}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _main_runs(results, precision="bf16"):
    return {r["option"]: r for r in results["runs"] if r.get("precision") == precision and not r.get("probe_shift")
            and r.get("observer") and r["observer"]["elements"]}


def outlier_rates(results, analysis) -> bytes | None:
    runs = _main_runs(results)
    if not runs:
        return None
    tau = analysis["tau"]
    fig, axes = plt.subplots(1, len(SITES), figsize=(15, 3.2), sharey=False)
    for ax, site in zip(axes, SITES):
        for o, r in runs.items():
            rates = metrics.outlier_rates(r["observer"], site, tau)
            if rates:
                ax.plot(list(rates), list(rates.values()), "o-", label=o, color=COLORS.get(o))
        ax.set_title(f"{site}: |x| > {tau:g}")
        ax.set_xlabel("layer")
    axes[0].set_ylabel("fraction of elements")
    axes[-1].legend(fontsize=8)
    return _png(fig)


def token_means(results, analysis) -> bytes | None:
    runs = _main_runs(results)
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
    for ax, site in zip(axes, ("norm_in", "norm_out")):
        for o, r in runs.items():
            bounds, counts = metrics.hist_pooled(r["observer"], TOKEN_HISTOGRAMS["mean"], site)
            total = sum(counts)
            if total:
                xs = list(range(len(bounds)))
                ax.step(xs, [c / total for c in counts], where="mid", label=o, color=COLORS.get(o))
                ax.set_xticks(xs, [f"≤{b:g}" for b in bounds], rotation=70, fontsize=7)
        ax.set_title(f"per-token mean μ at {site} (all layers)")
        ax.set_ylabel("fraction of tokens")
    axes[-1].legend(fontsize=8)
    return _png(fig)


def probe(results, analysis) -> bytes | None:
    """Lines: the reference model over the c grid; markers: the servers (c = 0 run and the probe servers)."""
    server, ref = analysis["probe"], analysis.get("probe_reference", {})
    if not any(len(p) > 1 for p in list(server.values()) + list(ref.values())):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
    panels = ((axes[0], "mu_norm_out", "token mean μ at norm_out"),
              (axes[1], "act_out_rate", f"act_out |x| > {analysis['tau']:g} rate"), (axes[2], "ppl", "perplexity"))
    for curves, style, suffix in ((ref, "-", " reference"), (server, "o", " server")):
        for o, pts in curves.items():
            cs = [p["c"] for p in pts]
            for ax, key, title in panels:
                ys = [p[key] for p in pts]
                if any(y is not None for y in ys):
                    ax.plot(cs, [float("nan") if y is None else y for y in ys], style, label=o + suffix,
                            color=COLORS.get(o), mfc="none", ms=8)
                ax.set_title(title)
                ax.set_xlabel("probe shift c")
    axes[0].legend(fontsize=7)
    return _png(fig)


def quality(results, analysis) -> bytes | None:
    """int8's cost next to the precision floor (fp32 vs bf16), per option, with 95% CIs; KL on a log axis."""
    comp = {o: c for o, c in results.get("comparisons", {}).items() if c.get("int8_vs_bf16")}
    if not comp:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
    opts = list(comp)
    pairs = ((-0.12, "int8_vs_bf16", "o", "int8 vs bf16"), (0.12, "precision_floor", "s", "floor: bf16 vs fp32"))
    for ax, key, title in ((axes[0], "delta_ppl", "ΔPPL"), (axes[1], "kl", "KL per token"),
                           (axes[2], "top1_agreement", "top-1 agreement")):
        for i, o in enumerate(opts):
            for dx, name, fmt, label in pairs:
                s = comp[o].get(name, {}).get(key)
                if s:
                    ax.errorbar(i + dx, s["value"], yerr=[[s["value"] - s["lo"]], [s["hi"] - s["value"]]], fmt=fmt,
                                color=COLORS.get(o), mfc="white" if name != "int8_vs_bf16" else COLORS.get(o),
                                capsize=4, label=label if i == 0 else None)
        ax.set_xticks(range(len(opts)), opts)
        ax.set_title(title + " (95% CI)")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    return _png(fig)


def serving(results, analysis) -> bytes | None:
    """int8 ÷ bf16 ratios with 95% CIs (left), and every round's throughput in the order it ran (right)."""
    comp = {o: c["load"] for o, c in results.get("comparisons", {}).items() if c.get("load")}
    if not comp:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(15, 3.8))
    ax = axes[0]
    for i, o in enumerate(comp):
        for dx, key, m in zip((-0.24, -0.08, 0.08, 0.24), LATENCY_KEYS, "o^sD"):
            s = comp[o].get(key)
            if s:
                ax.errorbar(i + dx, s["value"], yerr=[[s["value"] - s["lo"]], [s["hi"] - s["value"]]], fmt=m,
                            color=COLORS.get(o), capsize=4, label=key if i == 0 else None)
    ax.axhline(1.0, color="gray", lw=1)
    ax.axhspan(0.95, 1.05, color="gray", alpha=0.15, lw=0)
    ax.set_xticks(range(len(comp)), list(comp))
    ax.set_title("int8 ÷ bf16 (throughput: higher is better; latency: lower)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for o, ld in comp.items():
        per = ld["per_round_tokens_per_s"]
        ax.plot(range(len(per["a"])), per["a"], "o-", color=COLORS.get(o), label=f"{o} bf16")
        ax.plot(range(len(per["b"])), per["b"], "s--", color=COLORS.get(o), mfc="white", label=f"{o} int8")
    ax.set_xlabel("round (bf16 and int8 alternate)")
    ax.set_title("output tokens/s per round")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def attribution(results, analysis) -> bytes | None:
    """Per option: int8 KL per token with only one linear in int8, layer x linear (log scale; ab/attribution.py),
    and beside it the observer's per-layer act_out outlier rate and mean per-token max |act_out| (bf16 server;
    the fp32 reference's where the run has no observer)."""
    att = {o: rows for o, rows in (analysis.get("attribution") or {}).items() if rows}
    if not att:
        return None
    fig, axes = plt.subplots(len(att), 2, figsize=(13, 2.6 * len(att) + 0.6), squeeze=False)
    for (ax, ax2), (o, rows) in zip(axes, att.items()):
        layers, linears, m = matrix(rows)
        im = ax.imshow(np.log10(np.maximum(m, 1e-12)), aspect="auto", cmap="magma")
        ax.set_xticks(range(len(linears)), linears, fontsize=8)
        ax.set_yticks(range(len(layers)), [str(l) for l in layers])
        ax.set_ylabel(f"{o}\nlayer")
        fig.colorbar(im, ax=ax, label="log10 KL(bf16‖int8) / token")
        det = analysis["attribution_detail"][o]
        obs, ref = det.get("act_out_observer") or {}, det["act_out_reference"]
        rate = {int(k): v for k, v in obs.get("rate", {}).items()} or dict(enumerate(ref["rate"]))
        peak = {int(k): v for k, v in obs.get("token_absmax", {}).items()} or dict(enumerate(ref["token_absmax"]))
        src = "observer" if obs.get("rate") else "fp32 reference"
        ax2.plot(list(rate), list(rate.values()), "o-", color=COLORS.get(o),
                 label=f"act_out rate |x|>{analysis['tau']:g} ({src})")
        positive = [v for v in rate.values() if v and v > 0]  # symlog: a layer without outliers shows as 0
        ax2.set_yscale("symlog", linthresh=min(positive) / 2 if positive else 1e-6)
        ax2.set_xlabel("layer")
        ax2.set_xticks(sorted(rate))
        twin = ax2.twinx()
        twin.plot(list(peak), list(peak.values()), "s--", color="gray", label="mean per-token max |act_out|")
        c = det.get("correlation")
        ax2.set_title("Spearman ρ(down_proj KL, act_out rate) = " + (
            f"{c['rho']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]" if c and c["rho"] is not None and c["lo"] is not None
            else "n/a"), fontsize=9)
        ax2.legend(fontsize=7, loc="upper left")
        twin.legend(fontsize=7, loc="upper right")
    return _png(fig)


FIGURES = {
    "Outlier rate per layer, by site and option (bf16, quality documents)": outlier_rates,
    "Token-mean μ histograms at norm_in / norm_out (bf16)": token_means,
    "Mean-shift probe": probe,
    "int8 vs bf16 quality, against the precision floor (fp32 vs bf16)": quality,
    "Throughput and latency, int8 ÷ bf16 with CIs, and every round": serving,
    "int8 attribution: KL per layer x linear, beside the act_out outliers per layer": attribution,
}
