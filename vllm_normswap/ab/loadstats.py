"""int8 ÷ bf16 load ratios with confidence intervals, from locust's per-request records of alternating rounds.

Throughput is counted per time window: every output token is placed at its arrival time (request start + TTFT +
the inter-token gaps), and each round contributes the windows that lie inside its steady state, from one ramp-up
after its first request to its last request start (after that, locust stops sending and concurrency drains).
Latencies (TTFT, TPOT, end-to-end) are per request, from requests started inside the steady state.
CIs: percentile bootstrap, resampling windows (throughput) or requests (latencies) of the two servers
independently. A ratio whose CI contains 1, or lies wholly within ±EQUIVALENCE of 1, reads "no difference".
"""

from __future__ import annotations

import numpy as np

N_BOOT = 2000
EQUIVALENCE = 0.05  # |ratio - 1| below this is not a difference a user would act on, however narrow the CI
RAMP_S = 1.0  # locust spawns all users within a second (-r = -u)


def token_times(record: dict) -> np.ndarray:
    """Arrival times (epoch s) of a request's output tokens."""
    first = record["t_start"] + record["ttft"]
    gaps = np.cumsum(record.get("itl") or [])
    rest = first + gaps
    extra = max(record.get("output_tokens", 1) - 1 - len(gaps), 0)  # tokens that came in the first chunk
    return np.concatenate([np.full(1 + extra, first), rest])


def steady_span(records: list[dict], ramp_s: float = RAMP_S) -> tuple[float, float] | None:
    ok = [r for r in records if r.get("ok")]
    if len(ok) < 2:
        return None
    t0 = min(r["t_start"] for r in ok) + ramp_s
    t1 = max(r["t_start"] for r in ok)
    return (t0, t1) if t1 > t0 else None


def window_rates(records: list[dict], window_s: float) -> np.ndarray:
    """Output tokens/s in consecutive windows of ``window_s`` inside one round's steady state."""
    span = steady_span(records)
    if span is None:
        return np.zeros(0)
    t0, t1 = span
    n = int((t1 - t0) // window_s)
    if n < 1:  # a round shorter than a window: the whole steady span is one window
        n, window_s = 1, t1 - t0
    times = np.concatenate([token_times(r) for r in records if r.get("ok")])
    counts, _ = np.histogram(times, bins=t0 + window_s * np.arange(n + 1))
    return counts / window_s


def steady_requests(records: list[dict]) -> list[dict]:
    span = steady_span(records, ramp_s=0.0)
    ok = [r for r in records if r.get("ok")]
    return ok if span is None else [r for r in ok if r["t_start"] <= span[1]]


def ratio_ci(a: np.ndarray, b: np.ndarray, stat=np.mean, n_boot: int = N_BOOT, seed: int = 0) -> dict | None:
    """stat(b) / stat(a) with a 95% percentile-bootstrap CI, a and b resampled independently."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2 or stat(a) <= 0:
        return None
    rng = np.random.default_rng(seed)
    ra = stat(a[rng.integers(0, len(a), (n_boot, len(a)))], axis=-1)
    rb = stat(b[rng.integers(0, len(b), (n_boot, len(b)))], axis=-1)
    boots = rb / np.maximum(ra, 1e-300)
    return {"value": float(stat(b) / stat(a)), "lo": float(np.percentile(boots, 2.5)),
            "hi": float(np.percentile(boots, 97.5)), "n_a": int(len(a)), "n_b": int(len(b))}


def label(ci: dict | None, higher_is_better: bool) -> str:
    """'better' / 'worse' / 'no difference' for B against A; 'unknown' without a CI."""
    if not ci:
        return "unknown"
    if ci["lo"] <= 1.0 <= ci["hi"] or (1 - EQUIVALENCE <= ci["lo"] and ci["hi"] <= 1 + EQUIVALENCE):
        return "no difference"
    up = ci["lo"] > 1.0
    return "better" if up == higher_is_better else "worse"


LATENCY_KEYS = ("throughput", "ttft_p50", "tpot_mean", "e2e_p50")  # the ratios reported, throughput first


def pair_ratios(rounds_a: list[list[dict]], rounds_b: list[list[dict]], window_s: float) -> dict:
    """B ÷ A for throughput (windows), TTFT p50, mean TPOT and end-to-end p50 (requests), each with CI and label."""
    rates_a = np.concatenate([window_rates(r, window_s) for r in rounds_a] or [np.zeros(0)])
    rates_b = np.concatenate([window_rates(r, window_s) for r in rounds_b] or [np.zeros(0)])
    req_a = [r for rnd in rounds_a for r in steady_requests(rnd)]
    req_b = [r for rnd in rounds_b for r in steady_requests(rnd)]
    out = {"throughput": ratio_ci(rates_a, rates_b),
           "ttft_p50": ratio_ci([r["ttft"] for r in req_a], [r["ttft"] for r in req_b], stat=np.median),
           # the mean, not the median: the server may send a request's tokens in one burst, so many TPOTs are ~0
           "tpot_mean": ratio_ci([r["tpot"] for r in req_a], [r["tpot"] for r in req_b], stat=np.mean),
           "e2e_p50": ratio_ci([r["e2e"] for r in req_a], [r["e2e"] for r in req_b], stat=np.median)}
    out["labels"] = {k: label(out[k], higher_is_better=k == "throughput") for k in LATENCY_KEYS}
    out["windows"] = {"a": int(len(rates_a)), "b": int(len(rates_b)), "window_s": window_s}
    out["per_round_tokens_per_s"] = {"a": [_round_rate(r) for r in rounds_a], "b": [_round_rate(r) for r in rounds_b]}
    return out


def _round_rate(records: list[dict], window_s: float = 1e9) -> float | None:
    rates = window_rates(records, window_s)
    return float(rates[0]) if len(rates) else None
