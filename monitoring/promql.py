"""The dashboard's PromQL, made concrete, and a small Prometheus HTTP API client.

Used by monitoring/render_panels.py (PNG of key panels) and tests/monitoring (every panel's query returns
data): both read the committed dashboard JSON, so what is checked and drawn is exactly what Grafana runs.
Grafana's template variables are substituted here the way Grafana does: `=~"$model_name"` becomes a regex
alternation of the selected options, a repeated panel gets one option per copy.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "normswap-ab.json"


@dataclass(frozen=True)
class PanelQuery:
    panel: str  # panel title (may contain $variables)
    kind: str  # timeseries | heatmap | bargauge
    repeat: str | None  # variable the panel repeats over
    ref: str
    expr: str
    legend: str
    heatmap_format: bool  # Prometheus buckets (format=heatmap): one series per `le`


def dashboard_queries(path: Path = DASHBOARD) -> list[PanelQuery]:
    board = json.loads(Path(path).read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append(PanelQuery(panel["title"], panel["type"], panel.get("repeat"), target["refId"],
                                  target["expr"], target.get("legendFormat", ""),
                                  target.get("format") == "heatmap"))
    return out


def dashboard_variables(path: Path = DASHBOARD) -> dict:
    board = json.loads(Path(path).read_text())
    return {v["name"]: v for v in board["templating"]["list"]}


def substitute(text: str, values: dict[str, str | list[str]], rate_interval: str) -> str:
    """Grafana's interpolation for the variables this dashboard uses. A list value becomes (a|b) in regex
    matchers (regex-escaped, backslashes doubled for the PromQL string), a scalar is inserted as is (a
    repeated panel's copy, `="$model_name"`); an unknown $variable is an error, not silently left for Prometheus to reject."""
    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name == "__rate_interval":
            return rate_interval
        if name not in values:
            raise KeyError(f"dashboard uses ${name}, no value given")
        value = values[name]
        if isinstance(value, (list, tuple)):  # a multi-value variable: regex alternation inside a PromQL string
            return "|".join(re.escape(v).replace("\\", "\\\\") for v in value)
        return value
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


class PromAPI:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _get(self, path: str, **params) -> dict | list:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, time: float | None = None) -> list[dict]:
        params = {"query": expr}
        if time is not None:
            params["time"] = f"{time:.3f}"
        return self._get("/api/v1/query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                         step=f"{step:g}")["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": match})

    def rule_groups(self) -> list[dict]:
        return self._get("/api/v1/rules")["groups"]

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets")["activeTargets"]
