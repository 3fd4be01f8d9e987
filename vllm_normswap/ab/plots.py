"""Report figures (matplotlib, Agg) as PNG bytes. Each function takes results + analysis, returns PNG or None."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vllm_normswap.ab import metrics  # noqa: E402
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
    comp = {o: c for o, c in results.get("comparisons", {}).items() if c.get("int8_vs_bf16")}
    if not comp:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
    opts = list(comp)
    for ax, key, title in ((axes[0], "delta_ppl", "ΔPPL int8 − bf16"), (axes[1], "kl", "KL(bf16 ‖ int8) per token"),
                           (axes[2], "top1_agreement", "top-1 agreement")):
        for i, o in enumerate(opts):
            for dx, name, fmt in ((-0.12, "int8_vs_bf16", "o"), (0.12, "noise_floor", "s")):
                s = comp[o].get(name, {}).get(key)
                if s:
                    ax.errorbar(i + dx, s["value"], yerr=[[s["value"] - s["lo"]], [s["hi"] - s["value"]]], fmt=fmt,
                                color=COLORS.get(o), mfc="white" if name == "noise_floor" else COLORS.get(o),
                                capsize=4, label=("int8 vs bf16" if name == "int8_vs_bf16" else "bf16 noise floor")
                                if i == 0 else None)
        ax.set_xticks(range(len(opts)), opts)
        ax.set_title(title + " (95% CI)")
    axes[0].legend(fontsize=8)
    return _png(fig)


def serving(results, analysis) -> bytes | None:
    rows = [r for r in results["runs"] if r.get("load") and not r.get("probe_shift")]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
    labels = [f"{r['option']}\n{r['precision']}" for r in rows]
    colors = [COLORS.get(r["option"], "gray") for r in rows]
    hatches = ["" if r["precision"] == "bf16" else "//" for r in rows]
    xs = range(len(rows))
    bars = axes[0].bar(xs, [r["load"]["output_tokens_per_s"] for r in rows], color=colors)
    for b, h in zip(bars, hatches):
        b.set_hatch(h)
    axes[0].set_title("output tokens/s")
    for ax, key in ((axes[1], "ttft_ms"), (axes[2], "itl_ms")):
        for q, m in (("p50", "o"), ("p90", "^"), ("p99", "s")):
            ax.scatter(xs, [r["load"][key][q] or float("nan") for r in rows], marker=m, c=colors, label=q)
        ax.set_title(key.replace("_ms", " (ms)"))
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(list(xs), labels, fontsize=7)
    return _png(fig)


FIGURES = {
    "Outlier rate per layer, by site and option (bf16, quality documents)": outlier_rates,
    "Token-mean μ histograms at norm_in / norm_out (bf16)": token_means,
    "Mean-shift probe": probe,
    "int8 vs bf16 quality, with the bf16 noise floor": quality,
    "Throughput and latency percentiles, int8 vs bf16": serving,
}
