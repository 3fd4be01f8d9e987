"""Render the dashboard's key panels to a PNG with matplotlib, from the Prometheus query API (Grafana itself
cannot run here). The queries are the committed dashboard's own (monitoring/promql.py substitutes variables).

    python monitoring/render_panels.py --prometheus http://127.0.0.1:9390 --minutes 15 --out docs/img/dashboard-panels.png
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from promql import PromAPI, dashboard_queries, legend, substitute  # noqa: E402

# (dashboard panel title, how to draw it); the grid is filled row by row, three panels a row
KEY_PANELS = [
    ("Whole-run outlier rate per layer at $site", "bars"),
    ("Outlier rate by site (all layers)", "lines"),
    ("max |x| per layer at $site", "lines"),
    ("Token mean μ at norm_in · $model_name", "distribution"),
    ("Token mean μ at norm_out · $model_name", "distribution"),
    ("act_out per-token max |x|, p99", "lines"),
    ("Time to first token", "lines"),
    ("Inter-token latency", "lines"),
    ("Throughput", "lines"),
]


def _values(models: list[str], site: str, threshold: str) -> dict:
    return {"model_name": models, "site": site, "threshold": threshold, "datasource": "prometheus"}


def draw_lines(ax, api, queries, values, start, end, step):
    for q in queries:
        expr = substitute(q.expr, values, rate_interval=f"{max(4 * step, 4):g}s")
        for s in api.query_range(expr, start, end, step):
            pts = [(float(t) - start, float(v)) for t, v in s["values"] if math.isfinite(float(v))]
            if pts:
                ax.plot(*zip(*pts), label=legend(q.legend, s["metric"]), lw=1.2)
    ax.set_xlabel("seconds")


def draw_bars(ax, api, queries, values, end):
    rows = []
    for q in queries:
        for s in api.query(substitute(q.expr, values, "1m"), end):
            rows.append((s["metric"].get("model_name", ""), int(s["metric"].get("layer", 0)), float(s["value"][1])))
    models = sorted({r[0] for r in rows})
    layers = sorted({r[1] for r in rows})
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        got = {layer: v for mm, layer, v in rows if mm == m}
        ax.bar([layer + i * width for layer in layers], [got.get(layer, 0.0) for layer in layers], width, label=m)
    ax.set_xticks([layer + 0.4 - width / 2 for layer in layers], [f"L{layer}" for layer in layers])


def draw_distribution(ax, api, queries, values, start, end):
    """A Prometheus histogram over the whole window: rate over [end - start] at `end`, differenced buckets."""
    window = f"{max(int(end - start), 10)}s"
    for model in values["model_name"]:
        for q in queries:
            result = api.query(substitute(q.expr, {**values, "model_name": model}, window), end)
            cum = sorted((float(s["metric"]["le"]), float(s["value"][1])) for s in result)
            if not cum or cum[-1][1] <= 0:
                continue
            edges = [le for le, _ in cum[:-1]]  # drop +Inf
            counts = [cum[0][1]] + [cum[i][1] - cum[i - 1][1] for i in range(1, len(edges))]
            total = cum[-1][1]
            ax.step(range(len(edges)), [c / total for c in counts], where="mid", label=model)
            ax.set_xticks(range(len(edges)), [f"{e:g}" for e in edges], rotation=90, fontsize=6)
    ax.set_xlabel("bucket upper bound (le)")
    ax.set_ylabel("fraction of tokens")


def render(api: PromAPI, models: list[str], start: float, end: float, out: Path, site: str = "act_out",
           threshold: str = "6") -> list[str]:
    """Draw KEY_PANELS over [start, end] into ``out``; returns the titles of panels that had no data."""
    by_title: dict[str, list] = {}
    for q in dashboard_queries():
        by_title.setdefault(q.panel, []).append(q)
    missing = [t for t, _ in KEY_PANELS if t not in by_title]
    if missing:
        raise KeyError(f"panels not in the dashboard JSON: {missing}")
    values = _values(models, site, threshold)
    step = max(1.0, (end - start) / 200)
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(KEY_PANELS) / cols), cols, figsize=(18, 13))
    empty = []
    for ax, (title, how) in zip(axes.flat, KEY_PANELS):
        queries = by_title[title]
        if how == "lines":
            draw_lines(ax, api, queries, values, start, end, step)
        elif how == "bars":
            draw_bars(ax, api, queries, values, end)
        else:
            draw_distribution(ax, api, queries, values, start, end)
        unit_log = title.startswith(("Outlier rate", "max |x|", "act_out"))
        if unit_log and ax.has_data():
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_title(substitute(title, {**values, "model_name": "each option"}, ""),
                     fontsize=10)
        if ax.has_data():
            ax.legend(fontsize=6, ncol=2)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
            empty.append(title)
    fig.suptitle(f"NormSwap dashboard, key panels (|x| > {threshold}, site {site}); rendered from Prometheus "
                 f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(end))}", fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    # a palette PNG is a third of the size, with no visible loss for line and bar charts (README image)
    from PIL import Image
    with Image.open(out) as img:
        img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return empty


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9390")
    p.add_argument("--minutes", type=float, default=15)
    p.add_argument("--models", nargs="*", help="served model names (default: all that vLLM reports)")
    p.add_argument("--site", default="act_out")
    p.add_argument("--threshold", default="6")
    p.add_argument("--out", type=Path, default=Path("docs/img/dashboard-panels.png"))
    args = p.parse_args(argv)
    api = PromAPI(args.prometheus)
    models = args.models or sorted(api.label_values("model_name", "vllm:num_requests_running"))
    if not models:
        sys.exit("no vllm:num_requests_running series in Prometheus: is it scraping a vLLM server?")
    end = time.time()
    empty = render(api, models, end - 60 * args.minutes, end, args.out, args.site, args.threshold)
    print(f"wrote {args.out}" + (f"; panels without data: {empty}" if empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
