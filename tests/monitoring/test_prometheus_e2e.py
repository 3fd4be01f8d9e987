"""End to end: a real Prometheus (the committed config and rules, 1 s intervals) scrapes a real vLLM server
started the way the images start it (deploy/entrypoint.py, observer on), traffic flows, and then:
  - every panel query of the committed dashboard JSON returns finite data, for every value of its variables
    (as Grafana would substitute them: option, site, threshold, repeated panels one option per copy);
  - every recording rule evaluates without error and its recorded series has finite data; no alert about a
    missing observer or a down server is pending;
  - Prometheus' stored counters equal the server's own /metrics, and the generated-token counter equals what
    the client received (requests x max_tokens, ignore_eos), an independent count;
  - the whole-run outlier-ratio rule equals outliers / elements computed in Python from /metrics;
  - docs/monitoring.md's PNG of the key panels renders from this Prometheus with data in every panel.
One server (ln-gelu, small random checkpoint); about a minute on 2 cores.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "monitoring"))
from local_stack import Prometheus, option_server, send_traffic  # noqa: E402
from promql import dashboard_queries, dashboard_variables, substitute  # noqa: E402
from render_panels import render  # noqa: E402

from utils import KV_CACHE_GB, get_open_port  # noqa: E402
from vllm_normswap.ab import metrics as server_metrics  # noqa: E402

pytestmark = [pytest.mark.server,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus not on PATH (Debian: apt-get install prometheus)")]
OPTION = "ln-gelu"
THRESHOLDS = [1.0, 3.0, 6.0]
MAX_TOKENS = 8
RATE_INTERVAL = "15s"  # Grafana's $__rate_interval at a 1 s scrape interval and a short time range


def finite(series: list[dict]) -> list[dict]:
    """Series with at least one finite value (a ratio of zero rates is NaN: no data, as Grafana shows it)."""
    def values(s):
        return [v for _, v in s["values"]] if "values" in s else [s["value"][1]]
    return [s for s in series if any(math.isfinite(float(v)) for v in values(s))]


@pytest.fixture(scope="module")
def stack(checkpoints, tmp_path_factory):
    work = tmp_path_factory.mktemp("prom-e2e")
    server = option_server(OPTION, checkpoints[OPTION], get_open_port(), work,
                           observe={"thresholds": THRESHOLDS, "publish_interval_s": 1.0},
                           extra=["--enforce-eager", "--max-model-len", "512"])
    server.env["VLLM_CPU_KVCACHE_SPACE"] = KV_CACHE_GB
    try:
        server.start().wait_healthy()
        with Prometheus({OPTION: f"127.0.0.1:{server.port}"}, work, get_open_port()) as prom:
            prom.wait_scraped(1)
            t0 = time.time()
            done = send_traffic({OPTION: server.url}, seconds=12, concurrency=2, max_tokens=MAX_TOKENS)
            # counters settle: the observer publishes every 1 s; then >= 2 scrapes and a rule evaluation
            time.sleep(4)
            yield dict(server=server, prom=prom, api=prom.api, t0=t0, t1=time.time(), requests=done[OPTION])
    finally:
        server.stop()


def variable_values(api) -> dict[str, list[str]]:
    """Each dashboard variable's options, resolved as Grafana resolves them (label_values queries against
    this Prometheus, custom lists as written)."""
    out = {}
    for name, var in dashboard_variables().items():
        if var["type"] == "query":
            metric, label = var["query"].removeprefix("label_values(").removesuffix(")").split(", ")
            out[name] = sorted(api.label_values(label, metric))
        elif var["type"] == "custom":
            out[name] = var["query"].split(",")
    return out


def test_every_dashboard_panel_has_data(stack):
    api = stack["api"]
    options = variable_values(api)
    assert options["model_name"] == [OPTION]
    assert sorted(map(float, options["threshold"])) == THRESHOLDS
    assert set(options["site"]) == {"norm_in", "norm_out", "act_in", "act_out", "ffn_out"}
    queries = dashboard_queries()
    assert len(queries) >= 20, "the dashboard lost panels"
    empty = []
    for q in queries:
        for site in options["site"] if "$site" in q.expr else [None]:
            for threshold in options["threshold"] if "$threshold" in q.expr else [None]:
                values = {"model_name": OPTION if q.repeat == "model_name" else [OPTION],
                          "site": site, "threshold": threshold}
                expr = substitute(q.expr, values, RATE_INTERVAL)
                if not finite(api.query_range(expr, stack["t0"], stack["t1"], 1.0)):
                    empty.append(f"{q.panel!r} [{q.ref}] site={site} threshold={threshold}: {expr}")
    assert not empty, "panel queries without data:\n" + "\n".join(empty)


def test_every_recording_rule_evaluates(stack):
    api = stack["api"]
    committed = yaml.safe_load((REPO / "monitoring/prometheus/rules/recording.yml").read_text())
    names = [r["record"] for g in committed["groups"] for r in g["rules"]]
    loaded = {r["name"]: r for g in api.rule_groups() for r in g["rules"]}
    assert set(names) <= set(loaded), f"rules not loaded by Prometheus: {set(names) - set(loaded)}"
    bad = [f"{n}: health={loaded[n]['health']} {loaded[n].get('lastError', '')}" for n in loaded
           if loaded[n]["health"] != "ok"]
    assert not bad, "\n".join(bad)
    empty = [n for n in names if not finite(api.query_range(n, stack["t0"], stack["t1"], 1.0))]
    assert not empty, f"recording rules without data: {empty}"
    for alert in ("NormSwapObserverMetricsMissing", "NormSwapServerDown"):
        assert loaded[alert]["state"] == "inactive", f"{alert} is {loaded[alert]['state']}: {loaded[alert]}"


def test_prometheus_matches_the_server(stack):
    api, direct = stack["api"], server_metrics.parse(server_metrics.scrape(stack["server"].url))
    generated = direct["vllm"]["vllm:generation_tokens_total"]
    # independent count: every request generated exactly MAX_TOKENS tokens (ignore_eos) and nothing else ran
    assert stack["requests"] >= 4, f"too little traffic: {stack['requests']} requests"
    assert generated == stack["requests"] * MAX_TOKENS

    def stored(expr: str) -> float:
        result = api.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    assert stored(f'sum(vllm:generation_tokens_total{{model_name="{OPTION}"}})') == generated
    assert stored(f'sum(vllm:prompt_tokens_total{{model_name="{OPTION}"}})') == direct["vllm"]["vllm:prompt_tokens_total"]
    assert stored(f'normswap_activation_elements_total{{model_name="{OPTION}",layer="1",site="act_out"}}') \
        == direct["elements"][(1, "act_out")] > 0

    # the whole-run outlier ratio rule against outliers / elements from the server's own text, every series
    rule = {(int(s["metric"]["layer"]), s["metric"]["site"], float(s["metric"]["threshold"])): float(s["value"][1])
            for s in api.query(f'normswap:activation_outlier_ratio:total{{model_name="{OPTION}"}}')}
    expected = {k: n / direct["elements"][k[:2]] for k, n in direct["outliers"].items()}
    assert rule.keys() == expected.keys()
    assert any(v > 0 for v in expected.values()), "no outliers at any threshold: the ratio check is vacuous"
    for key, value in expected.items():
        assert rule[key] == pytest.approx(value, rel=1e-12, abs=0), key


def test_key_panels_png(stack, tmp_path):
    out = tmp_path / "panels.png"
    empty = render(stack["api"], [OPTION], stack["t0"], stack["t1"], out)
    assert not empty, f"key panels drawn without data: {empty}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < out.stat().st_size < 300_000
