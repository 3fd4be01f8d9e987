"""The family-wise adjustment of the load labels (ab/family.py) and the Student t it rests on (ab/loadstats.py):
t against published table values and a Monte Carlo draw; Holm on hand-made reports (a known effect is labelled,
a chance p-value of 0.01 among 16 is not); and a simulation of null reports with correlated metrics, where the
share of reports with any false label stays at most 5% (and, unadjusted, is what two identical default runs showed: ~0.8 false
labels a report)."""

import math

import numpy as np
import pytest

from vllm_normswap.ab import family, loadstats
from vllm_normswap.ab.loadstats import LATENCY_KEYS

OPTIONS = ("ln-swiglu", "rms-gelu", "rms-swiglu", "ln-gelu")


@pytest.mark.parametrize("alpha,df,table", [(0.05, 1, 12.706), (0.05, 3, 3.182), (0.05, 5, 2.571),
                                            (0.01, 5, 4.032), (0.001, 5, 6.869), (0.05, 10, 2.228),
                                            (0.002, 2, 22.327), (0.05, 30, 2.042)])
def test_t_quantiles_match_the_published_table(alpha, df, table):
    assert loadstats.t_quantile(alpha, df) == pytest.approx(table, abs=1.5e-3)
    assert float(loadstats.t_p_two_sided(table, df)) == pytest.approx(alpha, rel=3e-3)


def test_t_distribution_against_a_monte_carlo_draw():
    rng = np.random.default_rng(0)
    for df in (2, 5, 7):
        draws = np.abs(rng.standard_t(df, 400_000))
        for t in (0.5, 2.0, 4.0):
            assert float(loadstats.t_abs_cdf(t, df)) == pytest.approx((draws <= t).mean(), abs=3e-3)


def _load(logs_by_key: dict[str, list[float]]) -> dict:
    """One option's load dict as ab/loadstats.pair_ratios makes it, from per-round log ratios (A = 1)."""
    ld = {k: loadstats.paired_ratio([1.0] * len(v), list(np.exp(v))) for k, v in logs_by_key.items()}
    ld["labels"] = {k: loadstats.label(ld[k], loadstats.HIGHER_IS_BETTER[k]) for k in logs_by_key}
    return ld


NULL_ROUNDS = [0.10, -0.12, 0.05, -0.03, 0.08, -0.09]  # mean ~0: no effect
CHANCE_ROUNDS = [0.05, 0.15, 0.08, 0.12, 0.02, 0.18]  # mean 0.1, t = 3.98 on 5 df: p = 0.011, as 1 in 16 null


def test_a_known_effect_is_labelled_and_a_chance_p_value_is_not():
    comps = {}
    for i, o in enumerate(OPTIONS):
        logs = {k: [x * (1 + 0.1 * i) for x in NULL_ROUNDS] for k in LATENCY_KEYS}
        if o == "ln-gelu":  # int8 30% faster, round to round ±5%: an effect no adjustment may hide
            logs["throughput"] = [0.30, 0.25, 0.33, 0.28, 0.31, 0.27]
            logs["tpot_mean"] = [-0.30, -0.26, -0.33, -0.27, -0.31, -0.29]
        if o == "rms-gelu":
            logs["ttft_p50"] = CHANCE_ROUNDS
        comps[o] = {"load": _load(logs)}
    assert comps["rms-gelu"]["load"]["labels"]["ttft_p50"] == "worse"  # unadjusted, the chance value is a label
    p_chance = comps["rms-gelu"]["load"]["ttft_p50"]["p"]
    assert 0.005 < p_chance < 0.02
    fam = family.adjust(comps)
    assert fam == {"method": "holm", "alpha": 0.05, "size": 16, "equivalence": 0.05, "rejected": 2}
    ln = comps["ln-gelu"]["load"]
    assert ln["labels"]["throughput"] == "better" and ln["labels"]["tpot_mean"] == "better"  # lower TPOT: better
    # Holm: the two smallest p-values are tested at 0.05/16 and 0.05/15; their CIs are drawn at those levels
    levels = sorted([ln["throughput"]["level"], ln["tpot_mean"]["level"]])
    assert levels == pytest.approx([1 - 0.05 / 15, 1 - 0.05 / 16])
    # everything else: the CI of the first failed step, 1 - 0.05/14, contains 1 and reads "no difference"
    for o in OPTIONS:
        ld = comps[o]["load"]
        for k in LATENCY_KEYS:
            if (o, k) in (("ln-gelu", "throughput"), ("ln-gelu", "tpot_mean")):
                continue
            assert ld[k]["level"] == pytest.approx(1 - 0.05 / 14)
            assert ld[k]["lo"] <= 1 <= ld[k]["hi"] and ld["labels"][k] == "no difference", (o, k)
    # the chance value's adjusted CI, recomputed by hand: exp(mean ± t(1 - 0.05/28, 5) · sd/√6)
    logs = np.array(CHANCE_ROUNDS)
    half = loadstats.t_quantile(0.05 / 14, 5) * logs.std(ddof=1) / math.sqrt(6)
    ci = comps["rms-gelu"]["load"]["ttft_p50"]
    assert (ci["lo"], ci["hi"]) == pytest.approx((math.exp(logs.mean() - half), math.exp(logs.mean() + half)))
    assert comps["rms-gelu"]["load"]["unadjusted"]["labels"]["ttft_p50"] == "worse"
    # resolution: the half-width of the adjusted log CI, and the bound "no difference larger than ±X%"
    res = comps["rms-gelu"]["load"]["resolution"]["ttft_p50"]
    assert res["detectable"] == pytest.approx(math.exp(half) - 1)
    assert res["bound"] == pytest.approx(max(ci["hi"] - 1, 1 - ci["lo"]))
    assert "no difference larger than ±" in family.cell(comps["rms-gelu"]["load"], "ttft_p50")
    # idempotent: a second pass (a re-rendered report) changes nothing
    before = {o: {k: dict(comps[o]["load"][k]) for k in LATENCY_KEYS} for o in OPTIONS}
    family.adjust(comps)
    assert before == {o: {k: comps[o]["load"][k] for k in LATENCY_KEYS} for o in OPTIONS}


def test_holm_steps_down_and_stops_at_the_first_failure():
    # thresholds 0.05/4, 0.05/3, 0.05/2, 0.05: the third fails, so the fourth is not rejected though p < 0.05
    got = family.holm({"a": 0.001, "b": 0.012, "c": 0.03, "d": 0.04})
    assert got == {"a": (True, 0.0125), "b": (True, 0.05 / 3), "c": (False, 0.025), "d": (False, 0.025)}


def _null_reports(n: int, rounds: int, seed: int, rho: float = 0.6) -> np.ndarray:
    """Per-round log ratios of n null reports: [n, option, round, metric], metrics correlated (rho) within a
    round as TTFT, TPOT and E2E are, the spread 2x between metrics."""
    cov = np.full((4, 4), rho) + (1 - rho) * np.eye(4)
    sd = np.array([0.15, 0.3, 0.25, 0.1])
    chol = np.linalg.cholesky(cov * np.outer(sd, sd))
    return np.random.default_rng(seed).standard_normal((n, 4, rounds, 4)) @ chol.T


def test_family_wise_rate_of_null_reports_is_at_most_5_percent():
    n = 2000
    sims = _null_reports(n, rounds=6, seed=1)
    any_adj = any_raw = raw_labels = 0
    for rep in sims:
        comps = {o: {"load": _load({k: list(rep[i, :, j]) for j, k in enumerate(LATENCY_KEYS)})}
                 for i, o in enumerate(OPTIONS)}
        raw = sum(lab != "no difference" for c in comps.values() for lab in c["load"]["labels"].values())
        family.adjust(comps)
        adj = sum(lab != "no difference" for c in comps.values() for lab in c["load"]["labels"].values())
        raw_labels += raw
        any_raw += raw > 0
        any_adj += adj > 0
    # unadjusted: 16 tests at 95% give 0.8 false labels a report, as two identical default runs showed (5 labels moved)
    assert raw_labels / n == pytest.approx(0.8, abs=0.08)
    assert 0.3 < any_raw / n < 0.56
    # Holm: at most 5% of null reports show any label (Monte Carlo SE at 5%: 0.5 points)
    assert any_adj / n <= 0.05, any_adj / n


def test_error_rate_benchmark_arithmetic():
    """benchmarks/ab_error_rates.py: Clopper–Pearson against closed forms and a published value, and the rates
    it reports from hand-made run lines."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from ab_error_rates import clopper_pearson, summarize

    assert clopper_pearson(0, 20) == pytest.approx((0.0, 1 - 0.025 ** (1 / 20)), abs=1e-9)  # 0.1684
    assert clopper_pearson(20, 20) == pytest.approx((0.025 ** (1 / 20), 1.0), abs=1e-9)
    assert clopper_pearson(1, 20) == pytest.approx((0.00127, 0.2487), abs=5e-5)
    nd = "no difference"
    runs = [{"labels": {"a/throughput": nd, "a/tpot_mean": nd}, "unadjusted": {"a/throughput": "better",
                                                                               "a/tpot_mean": nd},
             "failed": [], "detectable": {"a/throughput": 0.2}, "wall_s": 10.0} for _ in range(19)]
    runs.append({"labels": {"a/throughput": "worse", "a/tpot_mean": "worse"}, "unadjusted": {"a/throughput": "worse",
                                                                                          "a/tpot_mean": "worse"},
                 "failed": [], "detectable": {}, "wall_s": 12.0})
    out = summarize(runs)
    assert out["runs"] == 20 and out["labels_per_run"] == 2
    assert out["labels"]["runs_with_any"]["false"] == 1 and out["labels"]["pooled_per_label"]["false"] == 2
    assert out["labels"]["per_label"]["a/tpot_mean"]["rate"] == pytest.approx(0.05)
    assert out["unadjusted"]["runs_with_any"]["false"] == 20 and out["unadjusted"]["false_labels_per_run"] == pytest.approx(21 / 20)
