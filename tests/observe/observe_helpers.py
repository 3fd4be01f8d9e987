"""Helpers for the observer tests: run prompts through a real server, scrape /metrics, and compute the expected
counters independently with the pure-torch reference (``ReferenceModel(capture=...)``) on the same tokens.

"Exact" (documented in docs/metrics.md): the server runs in float32 and the reference in float32 on
the same weights; the two compute the same values up to float rounding (different matmul/attention kernels,
~1e-6 relative). A count can then only differ through elements whose |x| lies within that rounding of a
threshold (or a token statistic within rounding of a bucket edge). The tests count those "ambiguous" elements
in the reference (band AMBIGUOUS_RTOL) and require |server - reference| <= ambiguous; on these models the band is
almost always empty, so counts are equal.
"""

from __future__ import annotations

import json
import time
import urllib.request

import torch

from utils import metric_value as sample  # noqa: F401  (the observer tests' name for it)
from utils import random_prompts, scrape_metrics
from vllm_normswap.checkpoints.files import load_reference
from vllm_normswap.observe.config import DEFAULT_BUCKETS, TOKEN_HIST_SITES, threshold_label

THRESHOLDS = [0.5, 1.0, 3.0, 6.0]  # low ones too, so that the tiny random models give non-zero counts
AMBIGUOUS_RTOL = 1e-4  # eager float32 vs reference float32


def observe_overrides(**extra) -> dict:
    return {"normswap_observe": {"thresholds": THRESHOLDS, "publish_interval_s": 0.2, "absmax_window_s": 3600,
                                 **extra}}


def observe_prompts(n: int = 4, seed: int = 0) -> list[list[int]]:
    """Random token prompts of 20..59 tokens (utils.random_prompts)."""
    return random_prompts(n, seed, lengths=(20, 60))


def complete(url: str, model: str, prompt: list[int], max_tokens: int = 6) -> list[int]:
    """Greedy completion; returns the token ids the model computed: prompt + generated[:-1] (the last generated
    token is never fed back)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.loads(r.read())
    generated = out["choices"][0]["token_ids"]
    assert len(generated) == max_tokens, out
    return prompt + generated[:-1]


def scrape(url: str) -> dict[tuple, float]:
    """/metrics samples named normswap_* (utils.scrape_metrics)."""
    return scrape_metrics(url, prefix="normswap_")


def wait_for_elements(url: str, expected: float, model_name: str, layer: int = 0, site: str = "act_in",
                      timeout: float = 30.0) -> dict:
    """Scrape until the publisher has caught up with ``expected`` elements at one site (it publishes every
    publish_interval_s), then until two scrapes a second apart agree on every sample. The publisher writes site by
    site, so a scrape can land between two writes; once the traffic has stopped it writes nothing more (it writes
    only values that changed), so two equal scrapes hold every site's final value."""
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = sample(scrape(url), "normswap_activation_elements_total", model_name=model_name, layer=layer,
                     site=site)
        if got == expected:
            before, settle_by = scrape(url), time.monotonic() + timeout
            while time.monotonic() < settle_by:
                time.sleep(1.0)
                now = scrape(url)
                if now == before:
                    return now
                before = now
            raise AssertionError(f"normswap_* samples still changing {timeout}s after layer={layer},site={site} "
                                 f"reached {expected} elements")
        time.sleep(0.2)
    raise AssertionError(f"elements_total{{layer={layer},site={site}}} = {got}, expected {expected} "
                         f"after {timeout}s")


def reference_capture(ckpt, sequences: list[list[int]], **arch_changes) -> list[dict]:
    """Per sequence: {layer: {site: tensor [T, width]}} from the float32 reference (full act_in/act_out)."""
    ref = load_reference(ckpt)
    if arch_changes:
        ref.arch = ref.arch.replace(**arch_changes)
    captures = []
    with torch.no_grad():
        for ids in sequences:
            cap: dict = {}
            ref.forward(torch.tensor(ids), capture=cap)
            captures.append(cap)
    return captures


def token_values(x: torch.Tensor, stat: str) -> torch.Tensor:
    if stat == "mean":
        return x.mean(-1)
    if stat == "std":
        return x.std(-1, correction=0)
    return x.abs().amax(-1)


def expected_metrics(captures: list[dict], thresholds=THRESHOLDS, buckets=DEFAULT_BUCKETS) -> dict:
    """{(layer, site): {"elements", "outliers": {label: (count, ambiguous)}, "absmax",
    "hist": {stat: {"le": {label: (cumulative count, ambiguous)}, "count", "sum"}}}}."""
    out = {}
    for layer, sites in captures[0].items():
        for site in sites:
            xs = torch.cat([c[layer][site].reshape(-1, c[layer][site].shape[-1]) for c in captures]).double()
            a = xs.abs()
            entry = {"elements": a.numel(), "absmax": float(a.max()), "outliers": {}, "hist": {}}
            for tau in thresholds:
                band = (a - tau).abs() <= AMBIGUOUS_RTOL * max(1.0, tau)
                entry["outliers"][threshold_label(tau)] = (int((a > tau).sum()), int(band.sum()))
            for stat in TOKEN_HIST_SITES.get(site, ()):
                v = token_values(xs, stat)
                le = {}
                for edge in list(buckets[stat]) + [float("inf")]:
                    band = (v - edge).abs() <= AMBIGUOUS_RTOL * max(1.0, abs(edge))
                    label = "+Inf" if edge == float("inf") else _go_float(edge)
                    le[label] = (int((v <= edge).sum()), int(band.sum()))
                entry["hist"][stat] = {"le": le, "count": v.numel(), "sum": float(v.sum()), "values": v}
            out[(layer, site)] = entry
    return out


def _go_float(x: float) -> str:
    from prometheus_client.utils import floatToGoString

    return floatToGoString(x)


HIST_NAMES = {"mean": "normswap_token_mean", "std": "normswap_token_std", "absmax": "normswap_token_absmax"}


def compare(metrics: dict, expected: dict, model_name: str, count_slack: float = 0.0) -> list[str]:
    """All mismatches between scraped metrics and the reference (empty list = pass). ``count_slack``: extra
    allowed relative difference on counts (compiled mode)."""
    errors, ambiguous_total, unequal = [], 0, 0
    for (layer, site), want in expected.items():
        lab = dict(model_name=model_name, layer=layer, site=site)
        got = sample(metrics, "normswap_activation_elements_total", **lab)
        if got != want["elements"]:
            errors.append(f"elements layer {layer} {site}: server {got}, reference {want['elements']}")
        for tau, (count, amb) in want["outliers"].items():
            ambiguous_total += amb
            got = sample(metrics, "normswap_activation_outliers_total", threshold=tau, **lab)
            unequal += got != count
            if got is None or abs(got - count) > amb + count_slack * count:
                errors.append(f"outliers layer {layer} {site} |x|>{tau}: server {got}, reference {count} "
                              f"(ambiguous {amb})")
        got = sample(metrics, "normswap_activation_absmax", **lab)
        if got is None or abs(got - want["absmax"]) > 1e-4 * max(1.0, want["absmax"]):
            errors.append(f"absmax layer {layer} {site}: server {got}, reference {want['absmax']}")
        for stat, h in want["hist"].items():
            name = HIST_NAMES[stat]
            got = sample(metrics, name + "_count", **lab)
            if got != h["count"]:
                errors.append(f"{name}_count layer {layer} {site}: server {got}, reference {h['count']}")
            got = sample(metrics, name + "_sum", **lab)
            if got is None or abs(got - h["sum"]) > 1e-3 * max(1.0, h["count"]):
                errors.append(f"{name}_sum layer {layer} {site}: server {got}, reference {h['sum']}")
            for le, (count, amb) in h["le"].items():
                got = sample(metrics, name + "_bucket", le=le, **lab)
                if got is None or abs(got - count) > amb + count_slack * h["count"]:
                    errors.append(f"{name} le={le} layer {layer} {site}: server {got}, reference {count} "
                                  f"(ambiguous {amb})")
    print(f"compared {len(expected)} (layer, site) pairs; outlier counters not exactly equal: {unequal}; "
          f"reference elements in the rounding band: {ambiguous_total}")
    return errors
