"""Load ratios and their CIs over paired rounds against independent computations on synthetic per-request
records, and the vectorised paired bootstrap against a plain loop."""

import numpy as np
import pytest

from vllm_normswap.ab import loadstats, quality


def closed_loop(users: int, seconds: float, step_s: float, tokens: int, t0: float = 1000.0, ttft_s: float = 0.05,
                jitter: float = 0.0, seed: int = 0) -> list[dict]:
    """Records of ``users`` closed-loop clients: each request = TTFT, then tokens - 1 steps of step_s."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(users):
        t = t0
        while t < t0 + seconds:
            itl = list(step_s * (1 + jitter * rng.standard_normal(tokens - 1)))
            e2e = ttft_s + sum(itl)
            out.append({"ok": True, "t_start": t, "ttft": ttft_s, "itl": itl, "tpot": sum(itl) / (tokens - 1),
                        "e2e": e2e, "output_tokens": tokens, "max_tokens": tokens})
            t += e2e
    return out


def test_round_throughput_is_the_token_rate_of_the_steady_state():
    recs = closed_loop(users=4, seconds=20, step_s=0.01, tokens=16)
    m = loadstats.round_measures(recs)
    # 4 users x 16 tokens per (0.05 + 15 x 0.01 = 0.2 s) = 320 tokens/s
    assert m["throughput"] == pytest.approx(4 * 16 / 0.2, rel=0.03)
    assert m["ttft_p50"] == pytest.approx(0.05) and m["tpot_mean"] == pytest.approx(0.01)
    assert m["e2e_p50"] == pytest.approx(0.2)


def rounds(step_s, n, t0, seed, drift=()):
    """n rounds of closed-loop load; round i's step time scaled by drift[i] (the box's conditions that round)."""
    return [closed_loop(4, 10, step_s * (drift[i] if drift else 1.0), 16, t0=t0 + 100 * i, jitter=0.1,
                        seed=seed + i) for i in range(n)]


def test_paired_rounds_find_a_real_speedup_despite_drift_and_no_difference_where_there_is_none():
    drift = (1.0, 1.3, 0.8, 1.1, 0.9, 1.2)  # both servers see each round's conditions: pairing cancels them
    a = rounds(0.010, 6, 1000.0, 0, drift)
    b = rounds(0.007, 6, 1050.0, 10, drift)
    same = rounds(0.010, 6, 1050.0, 20, drift)
    faster = loadstats.pair_ratios(a, b)
    # independent: per round, the ratio of the two request times (tokens per request are equal); geometric mean
    per_round = [(0.05 + 15 * 0.010 * d) / (0.05 + 15 * 0.007 * d) for d in drift]
    expected = float(np.exp(np.mean(np.log(per_round))))
    assert faster["throughput"]["lo"] <= expected <= faster["throughput"]["hi"]
    assert faster["throughput"]["value"] == pytest.approx(expected, rel=0.03)
    assert faster["labels"] == {"throughput": "better", "ttft_p50": "no difference", "tpot_mean": "better",
                                "e2e_p50": "better"}
    assert faster["tpot_mean"]["value"] == pytest.approx(0.7, rel=0.05)
    equal = loadstats.pair_ratios(a, same)
    assert equal["labels"]["throughput"] == "no difference"
    assert equal["rounds"] == {"a": 6, "b": 6} and equal["throughput"]["rounds"] == 6


def test_paired_t_interval_against_a_direct_computation():
    ratios = [1.10, 1.30, 0.95, 1.20]
    ci = loadstats.paired_ratio([1.0] * 4, ratios)
    logs = np.log(ratios)
    half = 3.18245 * logs.std(ddof=1) / 2  # t(0.975, 3) = 3.18245 (tables)
    assert ci["value"] == pytest.approx(np.exp(logs.mean()))
    assert (ci["lo"], ci["hi"]) == pytest.approx((np.exp(logs.mean() - half), np.exp(logs.mean() + half)), rel=1e-5)
    assert loadstats.label(ci, True) == "no difference"  # spans 1


def test_labels():
    assert loadstats.label({"value": 1.5, "lo": 1.2, "hi": 1.8}, True) == "better"
    assert loadstats.label({"value": 1.5, "lo": 1.2, "hi": 1.8}, False) == "worse"
    assert loadstats.label({"value": 1.1, "lo": 0.9, "hi": 1.3}, True) == "no difference"  # CI spans 1
    assert loadstats.label({"value": 1.02, "lo": 1.01, "hi": 1.03}, True) == "no difference"  # within ±5%
    assert loadstats.label(None, True) == "unknown"


def test_vectorised_bootstrap_matches_a_loop():
    rng = np.random.default_rng(3)
    k = 30
    sums = {"n": rng.integers(50, 255, k).astype(float)}
    sums["nll_a"] = sums["n"] * rng.uniform(3, 5, k)
    sums["nll_b"] = sums["nll_a"] + sums["n"] * rng.normal(0.01, 0.02, k)
    sums["kl"] = sums["n"] * rng.uniform(0, 1e-3, k)
    sums["agree"] = sums["n"] * rng.uniform(0.9, 1.0, k)
    fast = quality.summarize_sums(sums, n_boot=500, seed=7)
    idx = np.random.default_rng(7).integers(0, k, (500, k))
    loop_kl = [sums["kl"][i].sum() / sums["n"][i].sum() for i in idx]
    loop_dppl = [np.exp(sums["nll_b"][i].sum() / sums["n"][i].sum()) - np.exp(sums["nll_a"][i].sum() /
                                                                               sums["n"][i].sum()) for i in idx]
    assert fast["kl"]["lo"] == pytest.approx(np.percentile(loop_kl, 2.5), rel=1e-9)
    assert fast["delta_ppl"]["hi"] == pytest.approx(np.percentile(loop_dppl, 97.5), rel=1e-9)
    assert fast["resamples"] == 500


def test_kl_ratio_against_the_floor():
    rng = np.random.default_rng(4)
    k = 40
    n = rng.integers(100, 255, k).astype(float)
    floor = {"n": n, "kl": n * rng.uniform(1e-4, 2e-4, k)}
    int8 = {"n": n, "kl": floor["kl"] * rng.uniform(4, 6, k)}
    r = quality.ratio_of_kl(int8, floor)
    assert r["value"] == pytest.approx(int8["kl"].sum() / floor["kl"].sum())
    assert 4 < r["lo"] < r["value"] < r["hi"] < 6
