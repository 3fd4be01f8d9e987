"""Scrape /metrics and turn the observer's families into plain dicts; differences between two scrapes.

Families (vllm_normswap.registry; README 'Activation metrics'):
  normswap_activation_outliers_total{model_name,layer,site,threshold}   counter
  normswap_activation_elements_total{model_name,layer,site}             counter
  normswap_activation_absmax{model_name,layer,site}                     gauge (recent window)
  normswap_token_{mean,std,absmax}{model_name,layer,site}               histograms
plus vLLM's own counters (prompt/generation tokens) for sanity checks.
"""

from __future__ import annotations

import time
from collections import defaultdict

import requests
from prometheus_client.parser import text_string_to_metric_families

from vllm_normswap.ab import auth

from vllm_normswap.registry import ABSMAX, ELEMENTS, OUTLIERS, TOKEN_HISTOGRAMS

HISTOGRAMS = tuple(TOKEN_HISTOGRAMS.values())


def scrape(url: str) -> str:
    # vLLM does not guard /metrics, but a proxy in front of a keyed server may: the key goes along
    r = requests.get(f"{url}/metrics", headers=auth.headers(url), timeout=30)
    auth.check(r, url)
    r.raise_for_status()
    return r.text


def parse(text: str) -> dict:
    """{"outliers": {(layer, site, threshold): n}, "elements": {(layer, site): n}, "absmax": {(layer, site): x},
    "hist": {family: {(layer, site): {"buckets": {le: cumulative}, "sum": s, "count": c}}}, "vllm": {name: v}}.
    Layer is an int, threshold a float; values are summed over model_name (one model per server)."""
    out = {"outliers": defaultdict(float), "elements": defaultdict(float), "absmax": {},
           "hist": {h: defaultdict(lambda: {"buckets": defaultdict(float), "sum": None, "count": 0.0})
                    for h in HISTOGRAMS}, "vllm": defaultdict(float)}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            lab = s.labels
            if s.name == OUTLIERS + "_total":
                out["outliers"][(int(lab["layer"]), lab["site"], float(lab["threshold"]))] += s.value
            elif s.name == ELEMENTS + "_total":
                out["elements"][(int(lab["layer"]), lab["site"])] += s.value
            elif s.name == ABSMAX:
                key = (int(lab["layer"]), lab["site"])
                out["absmax"][key] = max(out["absmax"].get(key, 0.0), s.value)
            elif fam.name in HISTOGRAMS and "layer" in lab:
                h = out["hist"][fam.name][(int(lab["layer"]), lab["site"])]
                if s.name.endswith("_bucket"):
                    h["buckets"][float(lab["le"])] += s.value
                elif s.name.endswith("_sum"):
                    h["sum"] = (h["sum"] or 0.0) + s.value
                elif s.name.endswith("_count"):
                    h["count"] += s.value
            elif s.name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                            "vllm:request_success_total"):
                out["vllm"][s.name] += s.value
    for series in out["hist"].values():  # a histogram with negative buckets exposes no _sum (client_python)
        for h in series.values():
            if h["sum"] is None:
                h["sum"], h["sum_estimated"] = estimate_sum(h["buckets"]), True
    return out


def estimate_sum(buckets: dict[float, float]) -> float:
    """Sum of observations from cumulative buckets, each bucket's count at its midpoint (open ends: at the bound)."""
    bounds = sorted(buckets)
    total, prev_b, prev_c = 0.0, None, 0.0
    for b in bounds:
        c = buckets[b] - prev_c
        x = b if prev_b is None else (prev_b if b == float("inf") else (prev_b + b) / 2)
        total += c * x
        prev_b, prev_c = b, buckets[b]
    return total


def diff(after: dict, before: dict) -> dict:
    """Counter and histogram increments between two parsed scrapes (absmax: the later window's value)."""
    d = {"outliers": {k: v - before["outliers"].get(k, 0.0) for k, v in after["outliers"].items()},
         "elements": {k: v - before["elements"].get(k, 0.0) for k, v in after["elements"].items()},
         "absmax": dict(after["absmax"]), "hist": {}, "vllm": {k: v - before["vllm"].get(k, 0.0)
                                                             for k, v in after["vllm"].items()}}
    for fam, series in after["hist"].items():
        d["hist"][fam] = {}
        for key, h in series.items():
            b = before["hist"].get(fam, {}).get(key)
            d["hist"][fam][key] = {
                "buckets": {le: c - (b["buckets"].get(le, 0.0) if b else 0.0) for le, c in h["buckets"].items()},
                "sum": h["sum"] - (b["sum"] if b else 0.0), "count": h["count"] - (b["count"] if b else 0.0),
                "sum_estimated": h.get("sum_estimated", False)}
    return d


def settled_scrape(url: str, interval: float = 1.2, tries: int = 10, stable: int = 2) -> dict:
    """Parsed /metrics once the observer's counters stop moving: workers publish every publish_interval_s
    (default 1 s), so a scrape right after a request can miss its last tokens. Settled means ``stable`` scrapes in a
    row, ``interval`` apart, equal to the one before: one equal pair was not enough once workers were bound to one
    core (runtime/engine_fork.py), where a publisher thread can wait past an interval for its core."""
    prev = parse(scrape(url))
    same = 0
    for _ in range(tries):
        time.sleep(interval)
        cur = parse(scrape(url))
        same = same + 1 if cur["elements"] == prev["elements"] and cur["outliers"] == prev["outliers"] else 0
        if same >= stable:
            return cur
        prev = cur
    return prev


def has_observer(parsed: dict) -> bool:
    return bool(parsed["elements"])


def to_jsonable(d: dict) -> dict:
    """Tuple keys -> "layer/site[/threshold]" strings, for results.json."""
    def key(k):
        return "/".join(str(x) for x in k) if isinstance(k, tuple) else str(k)

    def conv(v):
        if isinstance(v, dict):
            return {key(k): conv(x) for k, x in v.items()}
        return v
    return conv(d)


def from_jsonable(d: dict) -> dict:
    """The inverse of ``to_jsonable`` for a parsed scrape or a diff: "layer/site[/threshold]" -> tuples, bucket
    bounds -> floats (``normswap ab --report`` re-renders a report from results.json)."""
    def layer_site(k: str) -> tuple:
        layer, site = k.split("/", 1)
        return int(layer), site

    def with_tau(k: str) -> tuple:
        layer, site, tau = k.split("/")
        return int(layer), site, float(tau)

    out = dict(d)
    out["outliers"] = {with_tau(k): v for k, v in d.get("outliers", {}).items()}
    out["elements"] = {layer_site(k): v for k, v in d.get("elements", {}).items()}
    out["absmax"] = {layer_site(k): v for k, v in d.get("absmax", {}).items()}
    out["hist"] = {fam: {layer_site(k): {**h, "buckets": {float(le): c for le, c in h.get("buckets", {}).items()}}
                         for k, h in series.items()} for fam, series in d.get("hist", {}).items()}
    return out


def outlier_rates(d: dict, site: str, threshold: float) -> dict[int, float]:
    """Per-layer fraction of elements with |x| > threshold at ``site`` (from a diff)."""
    rates = {}
    for (layer, s, tau), n in d["outliers"].items():
        if s == site and tau == threshold:
            total = d["elements"].get((layer, s), 0.0)
            rates[layer] = n / total if total else float("nan")
    return dict(sorted(rates.items()))


def hist_mean(d: dict, family: str, site: str) -> dict[int, float]:
    """Per-layer mean of a token histogram (sum/count), e.g. the average token mean μ at norm_out."""
    return {layer: h["sum"] / h["count"] for (layer, s), h in sorted(d["hist"].get(family, {}).items())
            if s == site and h["count"]}


def hist_pooled(d: dict, family: str, site: str) -> tuple[list[float], list[float]]:
    """Bucket bounds and per-bucket (non-cumulative) counts pooled over layers, for plotting."""
    pooled = defaultdict(float)
    for (layer, s), h in d["hist"].get(family, {}).items():
        if s == site:
            for le, c in h["buckets"].items():
                pooled[le] += c
    bounds = sorted(pooled)
    cum = [pooled[b] for b in bounds]
    counts = [c - (cum[i - 1] if i else 0.0) for i, c in enumerate(cum)]
    return bounds, counts
