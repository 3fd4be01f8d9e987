"""Load ratios and their CIs against independent computations on synthetic per-request records, and the
vectorised paired bootstrap against a plain loop."""

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


def test_window_rate_is_the_token_rate_of_the_steady_state():
    recs = closed_loop(users=4, seconds=20, step_s=0.01, tokens=16)
    rates = loadstats.window_rates(recs, 2.0)
    # 4 users x (16 tokens per 0.05 + 15 x 0.01 = 0.2 s) = 320 tokens/s, independent of the windowing
    assert len(rates) >= 8
    assert rates.mean() == pytest.approx(4 * 16 / 0.2, rel=0.03)


def test_ratio_ci_finds_a_real_speedup_and_no_difference_where_there_is_none():
    a = [closed_loop(4, 15, 0.010, 16, t0=1000.0 + 100 * i, jitter=0.1, seed=i) for i in range(3)]
    b = [closed_loop(4, 15, 0.007, 16, t0=1050.0 + 100 * i, jitter=0.1, seed=10 + i) for i in range(3)]
    same = [closed_loop(4, 15, 0.010, 16, t0=1050.0 + 100 * i, jitter=0.1, seed=20 + i) for i in range(3)]
    faster = loadstats.pair_ratios(a, b, 2.0)
    expected = (0.05 + 15 * 0.010) / (0.05 + 15 * 0.007)  # throughput ratio of the two step times
    assert faster["throughput"]["lo"] <= expected <= faster["throughput"]["hi"]
    assert faster["labels"] == {"throughput": "better", "ttft_p50": "no difference", "tpot_mean": "better",
                                "e2e_p50": "better"}
    assert faster["tpot_mean"]["value"] == pytest.approx(0.7, rel=0.05)
    assert faster["e2e_p50"]["value"] == pytest.approx((0.05 + 15 * 0.007) / (0.05 + 15 * 0.010), rel=0.05)
    equal = loadstats.pair_ratios(a, same, 2.0)
    assert equal["labels"]["throughput"] == "no difference"
    assert equal["throughput"]["lo"] <= 1.0 <= equal["throughput"]["hi"] or \
        0.95 <= equal["throughput"]["lo"] and equal["throughput"]["hi"] <= 1.05


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
