"""Generate the NormSwap A/B Grafana dashboard as code (grafana-foundation-sdk) and write its JSON.

    python monitoring/grafana/dashboard.py            # writes monitoring/grafana/dashboards/normswap-ab.json
    python monitoring/grafana/dashboard.py --check    # exit 1 if the committed JSON is not what this file makes

Layout: activation outliers (per-layer heatmap per option, by site, whole run), magnitudes (max |x|, act_out
per-token max), the case study's token mean/spread at norm_in/norm_out, then vLLM's own serving panels. The
`model_name` variable (served model names, one per option) repeats the per-option heatmaps side by side; `site`
and `threshold` pick the outlier counter. Queries read the recording rules of monitoring/prometheus/rules where
one exists, so the dashboard, the alerts and the A/B report agree on one definition of "outlier rate".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, common as cb, dashboard as db, heatmap, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from vllm_normswap.registry import (DECISION_SITE, DECISION_THRESHOLD, OUTLIERS, SITES, TOKEN_HIST_SITES,
                                    TOKEN_HISTOGRAMS)

OUT = Path(__file__).resolve().parent / "dashboards" / "normswap-ab.json"
UID = "normswap-ab"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
MEAN_SITES = tuple(s for s, stats in TOKEN_HIST_SITES.items() if "mean" in stats)  # the pre-FFN norm's in/out
ABSMAX_SITE = next(s for s, stats in TOKEN_HIST_SITES.items() if "absmax" in stats)  # the down projection's input
MODELS = 'model_name=~"$model_name"'


def query(expr: str, legend: str, ref: str = "A", fmt: PromQueryFormat = PromQueryFormat.TIME_SERIES):
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).format(fmt).datasource(DS)


def series(title: str, unit: str, *targets, log: bool = False, span: int = 12, desc: str = ""):
    panel = (timeseries.Panel().title(title).description(desc).datasource(DS).unit(unit).span(span).height(8)
             .legend(cb.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.TABLE)
                     .placement(common.LegendPlacement.RIGHT).calcs(["lastNotNull", "max"])))
    if log:
        panel = panel.scale_distribution(cb.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10))
    for t in targets:
        panel = panel.with_target(t)
    return panel


def per_option_heatmap(title: str, target, unit: str, desc: str, rows: bool):
    """One heatmap per selected option (repeat over model_name), four to a row.

    rows=True: each series is a row (a layer); rows=False: Prometheus histogram buckets (format=heatmap, `le`)."""
    layout = common.HeatmapCellLayout.UNKNOWN if rows else common.HeatmapCellLayout.LE
    return (heatmap.Panel().title(f"{title} · $model_name").description(desc).datasource(DS).with_target(target)
            .repeat("model_name").repeat_direction("h").max_per_row(4).span(24).height(9)
            .calculate(False).rows_frame(heatmap.RowsHeatmapOptions().layout(layout))
            .color(heatmap.HeatmapColorOptions().mode(heatmap_color_mode()).scheme("Oranges")
                   .scale(heatmap_color_scale()).exponent(0.5).steps(64))
            .cell_values(heatmap.CellValues().unit(unit)).y_axis(heatmap.YAxisConfig().unit("none" if rows else unit)))


def heatmap_color_mode():
    from grafana_foundation_sdk.models.heatmap import HeatmapColorMode
    return HeatmapColorMode.SCHEME


def heatmap_color_scale():
    from grafana_foundation_sdk.models.heatmap import HeatmapColorScale
    return HeatmapColorScale.EXPONENTIAL


def variables():
    return [
        db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"),
        db.QueryVariable("model_name").label("Option (served model)").datasource(DS)
        .query("label_values(vllm:num_requests_running, model_name)").multi(True).include_all(True)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
        .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"])),
        db.CustomVariable("site").label("Site").values(",".join(SITES))
        .current(dm.VariableOption(selected=True, text=DECISION_SITE, value=DECISION_SITE)),
        db.QueryVariable("threshold").label("|x| >").datasource(DS)
        .query(f"label_values({OUTLIERS}_total, threshold)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.NUMERICAL_ASC)
        .current(dm.VariableOption(selected=True, text=f"{DECISION_THRESHOLD:g}", value=f"{DECISION_THRESHOLD:g}")),
    ]


def outlier_row(d: db.Dashboard) -> db.Dashboard:
    d = d.with_row(db.Row("Activation outliers: |x| > $threshold at $site"))
    d = d.with_panel(per_option_heatmap(
        "Outlier rate per layer",
        query('normswap:activation_outlier_ratio:rate1m{model_name="$model_name", site="$site", '
              'threshold="$threshold"}', "{{layer}}"),
        "percentunit", "Fraction of elements with |x| > threshold at the chosen site, per decoder layer (rows), "
                       "over 1m (recording rule normswap:activation_outlier_ratio:rate1m).", rows=True))
    d = d.with_panel(series(
        "Outlier rate by site (all layers)", "percentunit",
        query(f'normswap:activation_outlier_ratio_by_site:rate1m{{{MODELS}, threshold="$threshold"}}',
              "{{model_name}} {{site}}"),
        log=True, desc="Outliers / elements over all layers, per site and option."))
    return d.with_panel(
        bargauge.Panel().title("Whole-run outlier rate per layer at $site").datasource(DS).unit("percentunit")
        .span(12).height(8).orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .description("Cumulative outliers / elements since the servers started: the A/B's per-layer comparison.")
        .with_target(query(f'normswap:activation_outlier_ratio:total{{{MODELS}, site="$site", '
                           f'threshold="$threshold"}}', "{{model_name}} L{{layer}}")))


def magnitude_row(d: db.Dashboard) -> db.Dashboard:
    d = d.with_row(db.Row("Activation magnitudes"))
    d = d.with_panel(series(
        "max |x| per layer at $site", "none",
        query(f'normswap:activation_absmax:max{{{MODELS}, site="$site"}}', "{{model_name}} L{{layer}}"),
        log=True, desc="Largest |x| seen at the site over the observer's absmax window (gauge, max over replicas)."))
    d = d.with_panel(series(
        f"{ABSMAX_SITE} per-token max |x|, p99", "none",
        query(f'normswap:token_absmax:p99_rate1m{{{MODELS}}}', "{{model_name}} L{{layer}}"),
        log=True, desc=f"99th percentile over tokens of max |x| across features at {ABSMAX_SITE} (the down "
                       "projection's input, which the int8 weights multiply)."))
    return d.with_panel(per_option_heatmap(
        f"{ABSMAX_SITE} per-token max |x|",
        query(f'sum by (le) (rate({TOKEN_HISTOGRAMS["absmax"]}_bucket{{model_name="$model_name", '
              f'site="{ABSMAX_SITE}"}}[$__rate_interval]))', "{{le}}", fmt=PromQueryFormat.HEATMAP),
        "none", f"Distribution over tokens (all layers) of max |x| at {ABSMAX_SITE}.", rows=False))


def token_stats_row(d: db.Dashboard) -> db.Dashboard:
    d = d.with_row(db.Row("Token mean μ and spread σ at the pre-FFN norm (the case study's diagnostic)"))
    for site in MEAN_SITES:
        d = d.with_panel(per_option_heatmap(
            f"Token mean μ at {site}",
            query(f'sum by (le) (rate({TOKEN_HISTOGRAMS["mean"]}_bucket{{model_name="$model_name", '
                  f'site="{site}"}}[$__rate_interval]))', "{{le}}", fmt=PromQueryFormat.HEATMAP),
            "none", f"Distribution over tokens (all layers) of the mean across features at {site}. With "
                    "LayerNorm, norm_out means stay near the bias; with RMSNorm they follow norm_in.", rows=False))
    d = d.with_panel(series(
        "Average token mean μ per layer", "none",
        query(f'normswap:token_mean:avg_rate1m{{{MODELS}}}', "{{model_name}} L{{layer}} {{site}}"), span=12))
    return d.with_panel(series(
        "Average token spread σ per layer", "none",
        query(f'normswap:token_std:avg_rate1m{{{MODELS}}}', "{{model_name}} L{{layer}} {{site}}"), span=12))


def quantiles(metric: str, qs=(0.5, 0.95)) -> list:
    return [query(f'histogram_quantile({q}, sum by (model_name, le) (rate({metric}_bucket{{{MODELS}}}'
                  f'[$__rate_interval])))', f"{{{{model_name}}}} p{round(q * 100)}", ref=chr(65 + i))
            for i, q in enumerate(qs)]


def serving_row(d: db.Dashboard) -> db.Dashboard:
    d = d.with_row(db.Row("Serving (vLLM)"))
    d = d.with_panel(series("Time to first token", "s", *quantiles("vllm:time_to_first_token_seconds"), span=8))
    d = d.with_panel(series("Inter-token latency", "s", *quantiles("vllm:inter_token_latency_seconds"), span=8))
    d = d.with_panel(series("End-to-end request latency", "s", *quantiles("vllm:e2e_request_latency_seconds"),
                            span=8))
    d = d.with_panel(series(
        "Throughput", "tokens/s",
        query(f'sum by (model_name) (rate(vllm:generation_tokens_total{{{MODELS}}}[$__rate_interval]))',
              "{{model_name}} generated"),
        query(f'sum by (model_name) (rate(vllm:prompt_tokens_total{{{MODELS}}}[$__rate_interval]))',
              "{{model_name}} prompt", ref="B"), span=8))
    d = d.with_panel(series(
        "Requests running / waiting", "none",
        query(f'sum by (model_name) (vllm:num_requests_running{{{MODELS}}})', "{{model_name}} running"),
        query(f'sum by (model_name) (vllm:num_requests_waiting{{{MODELS}}})', "{{model_name}} waiting", ref="B"),
        span=8))
    return d.with_panel(series(
        "KV cache usage", "percentunit",
        query(f'max by (model_name) (vllm:kv_cache_usage_perc{{{MODELS}}})', "{{model_name}}"), span=8))


def build() -> dict:
    d = (db.Dashboard("NormSwap A/B: activation outliers and serving").uid(UID)
         .tags(["normswap", "vllm"]).refresh("10s").time("now-30m", "now").timezone("browser")
         .tooltip(dm.DashboardCursorSync.CROSSHAIR).editable()
         .description("Per-layer activation outliers of the four NormSwap options (LayerNorm/RMSNorm x "
                      "GELU/SwiGLU) next to vLLM's serving metrics. Generated by monitoring/grafana/dashboard.py."))
    for v in variables():
        d = d.with_variable(v)
    for row in (outlier_row, magnitude_row, token_stats_row, serving_row):
        d = row(d)
    return json.loads(JSONEncoder(sort_keys=True).encode(d.build()))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing it")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is stale: run python monitoring/grafana/dashboard.py and commit it", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
