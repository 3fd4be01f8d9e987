"""int8 ÷ bf16 load ratios with confidence intervals, from locust's per-request records of alternating rounds.

Each round has a steady state, from one ramp-up after its first request to its last request start (after that,
locust stops sending and concurrency drains). A round's throughput counts the output tokens that arrive inside it
(request start + TTFT + the inter-token gaps) over its length; its latencies are the TTFT median, the TPOT mean
and the end-to-end median of the requests started inside it.
CIs are over rounds, the independent unit: tokens and requests within a round share its conditions (the box's
other load, the server's state), so treating them as independent gave CIs too narrow to repeat. Round i of B is
paired with round i of A, measured right after it, and the ratio's CI is a paired t interval on the log ratios:
exp(mean ± t(0.975, n - 1) · sd / √n). A ratio whose CI contains 1, or lies wholly within ±EQUIVALENCE of 1,
reads "no difference".
"""

from __future__ import annotations

import functools
import math

import numpy as np

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


def steady_requests(records: list[dict]) -> list[dict]:
    span = steady_span(records, ramp_s=0.0)
    ok = [r for r in records if r.get("ok")]
    return ok if span is None else [r for r in ok if r["t_start"] <= span[1]]


def label(ci: dict | None, higher_is_better: bool) -> str:
    """'better' / 'worse' / 'no difference' for B against A; 'unknown' without a CI."""
    if not ci:
        return "unknown"
    if ci["lo"] <= 1.0 <= ci["hi"] or (1 - EQUIVALENCE <= ci["lo"] and ci["hi"] <= 1 + EQUIVALENCE):
        return "no difference"
    up = ci["lo"] > 1.0
    return "better" if up == higher_is_better else "worse"


LATENCY_KEYS = ("throughput", "ttft_p50", "tpot_mean", "e2e_p50")  # the ratios reported, throughput first
HIGHER_IS_BETTER = {"throughput": True, "ttft_p50": False, "tpot_mean": False, "e2e_p50": False}

def t_abs_cdf(t, df: int):
    """P(|T| <= t) for Student's t with integer df: the finite series of Abramowitz & Stegun 26.7.3 (odd df) and
    26.7.4 (even df) in theta = atan(t / sqrt(df)); exact, and vectorised over t (scipy is not a dependency)."""
    theta = np.arctan(np.abs(np.asarray(t, dtype=float)) / math.sqrt(df))
    c2, s = np.cos(theta) ** 2, np.sin(theta)
    term = total = 1.0  # broadcasts to theta's shape in the first product
    if df % 2:  # 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... ))
        for k in range(1, (df - 1) // 2):
            term = term * c2 * (2 * k) / (2 * k + 1)
            total = total + term
        return 2 / math.pi * (theta + (s * np.cos(theta) * total if df > 1 else 0.0))
    for k in range(1, df // 2):  # sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... )
        term = term * c2 * (2 * k - 1) / (2 * k)
        total = total + term
    return s * total


def t_p_two_sided(t, df: int):
    """Two-sided p-value of a t statistic."""
    return 1.0 - t_abs_cdf(t, df)


@functools.lru_cache(maxsize=4096)
def t_quantile(alpha: float, df: int) -> float:
    """The t with P(|T| > t) = alpha (so t_quantile(0.05, df) = t(0.975, df)), by bisection on t_abs_cdf."""
    if not 0 < alpha < 1 or df < 1:
        raise ValueError(f"t_quantile: need 0 < alpha < 1 and df >= 1, got alpha={alpha}, df={df}")
    lo, hi = 0.0, 1.0
    while t_p_two_sided(hi, df) > alpha:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_p_two_sided(mid, df) > alpha else (lo, mid)
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2


def t975(df: int) -> float:
    return t_quantile(0.05, df)


def round_measures(records: list[dict]) -> dict[str, float] | None:
    """One round's throughput (tokens/s in its steady state) and latencies (s)."""
    span = steady_span(records)
    if span is None:
        return None
    t0, t1 = span
    ok = [r for r in records if r.get("ok")]
    times = np.concatenate([token_times(r) for r in ok])
    req = steady_requests(records)
    return {"throughput": float(((times >= t0) & (times < t1)).sum() / (t1 - t0)),
            "ttft_p50": float(np.median([r["ttft"] for r in req])),
            "tpot_mean": float(np.mean([r["tpot"] for r in req])),
            "e2e_p50": float(np.median([r["e2e"] for r in req]))}


def paired_ratio(a: list[float], b: list[float], alpha: float = 0.05) -> dict | None:
    """B ÷ A over paired rounds: geometric mean of the round ratios with a paired t CI on their logs at level
    1 - alpha, and what a family-wise adjustment (ab/family.py) needs to redo the CI at another level: the mean
    and standard error of the log ratios, the degrees of freedom and the two-sided p-value of "ratio = 1"."""
    pairs = [(x, y) for x, y in zip(a, b) if x and y and x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    logs = np.log([y / x for x, y in pairs])
    m, se, df = float(logs.mean()), float(logs.std(ddof=1) / math.sqrt(len(logs))), len(logs) - 1
    half = t_quantile(alpha, df) * se
    p = float(t_p_two_sided(abs(m) / se, df)) if se > 0 else float(m == 0)
    return {"value": math.exp(m), "lo": math.exp(m - half), "hi": math.exp(m + half), "rounds": len(pairs),
            "log_mean": m, "log_se": se, "df": df, "p": p}


def pair_ratios(rounds_a: list[list[dict]], rounds_b: list[list[dict]]) -> dict:
    """B ÷ A for throughput, TTFT p50, mean TPOT and end-to-end p50, each with a CI over paired rounds."""
    ma = [round_measures(r) or {} for r in rounds_a]
    mb = [round_measures(r) or {} for r in rounds_b]
    out = {k: paired_ratio([m.get(k) for m in ma], [m.get(k) for m in mb]) for k in LATENCY_KEYS}
    out["labels"] = {k: label(out[k], HIGHER_IS_BETTER[k]) for k in LATENCY_KEYS}
    out["rounds"] = {"a": len(ma), "b": len(mb)}
    out["per_round_tokens_per_s"] = {"a": [m.get("throughput") for m in ma], "b": [m.get("throughput") for m in mb]}
    return out
