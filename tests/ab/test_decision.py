"""The decision rules on hand-made evidence tables: each of the four answers and "inconclusive" is reachable,
and the prose names the choice, the evidence chain and what would change it."""

import pytest

from vllm_normswap.ab import analysis
from vllm_normswap.ab.decision import Evidence, decide
from vllm_normswap.registry import BASELINE, OPTIONS


def ci(value, half=0.01):
    return {"value": value, "lo": value - half, "hi": value + half}


def table(rates: dict, ppl: dict | None = None, int8_kl: dict | None = None) -> dict[str, Evidence]:
    """Evidence for the four options: act_out outlier rates, bf16 PPL (default: all equal), int8 KL."""
    ppl = ppl or {}
    int8_kl = int8_kl or {}
    return {o: Evidence(o, outlier_rate=rates.get(o), ppl=ci(ppl.get(o, 100.0), 1.0),
                        ppl_ratio=ci(ppl.get(o, 100.0) / 100.0, 0.01), int8_kl=ci(int8_kl.get(o, 1e-3), 1e-4))
            for o in OPTIONS}


def test_change_the_activation():
    v = decide(table({"ln-gelu": 1e-3, "ln-swiglu": 1e-4, "rms-gelu": 2e-3, "rms-swiglu": 5e-5}))
    # rms-swiglu cuts more, but a single change is the cleaner first experiment
    assert (v.verdict, v.choice) == ("decided", "ln-swiglu")
    assert v.criteria["ln-swiglu"].outlier_ratio == pytest.approx(0.1)


def test_change_the_norm():
    v = decide(table({"ln-gelu": 1e-3, "ln-swiglu": 2e-3, "rms-gelu": 5e-4, "rms-swiglu": 3e-3}))
    assert (v.verdict, v.choice) == ("decided", "rms-gelu")


def test_change_both_when_only_both_helps():
    v = decide(table({"ln-gelu": 1e-3, "ln-swiglu": 2e-3, "rms-gelu": 1e-3, "rms-swiglu": 1e-4}))
    assert (v.verdict, v.choice) == ("decided", "rms-swiglu")


def test_change_nothing_when_the_changes_add_outliers_or_cost_quality():
    # SwiGLU multiplies outliers; RMSNorm cuts them but its perplexity is 30% worse: the baseline stands
    v = decide(table({"ln-gelu": 1e-4, "ln-swiglu": 5e-2, "rms-gelu": 5e-5, "rms-swiglu": 1e-2},
                     ppl={"rms-gelu": 130.0}))
    assert (v.verdict, v.choice) == ("decided", BASELINE)
    assert v.criteria["rms-gelu"].reduces and v.criteria["rms-gelu"].quality is False
    assert v.criteria["ln-swiglu"].reduces is False


def test_change_nothing_when_int8_costs_more_on_the_change():
    v = decide(table({"ln-gelu": 1e-3, "ln-swiglu": 1e-4, "rms-gelu": 2e-3, "rms-swiglu": 2e-3},
                     int8_kl={"ln-swiglu": 5e-3}))
    assert v.choice == BASELINE and v.criteria["ln-swiglu"].int8 is False


def test_no_outliers_at_the_baseline_means_change_nothing():
    v = decide(table({"ln-gelu": 0.0, "ln-swiglu": 0.0, "rms-gelu": 0.0, "rms-swiglu": 1e-5}))
    assert (v.verdict, v.choice) == ("decided", BASELINE)


def test_inconclusive_without_baseline_counts():
    v = decide(table({"ln-swiglu": 1e-4, "rms-gelu": 1e-4, "rms-swiglu": 1e-4}))
    assert v.verdict == "inconclusive" and v.choice is None and BASELINE in v.missing[0]


def test_inconclusive_when_a_reducing_option_straddles_the_quality_bound():
    ev = table({"ln-gelu": 1e-3, "ln-swiglu": 2e-3, "rms-gelu": 1e-4, "rms-swiglu": 2e-3})
    ev["rms-gelu"].ppl_ratio = {"value": 1.05, "lo": 1.01, "hi": 1.09}  # straddles the +5% bound
    v = decide(ev)
    assert v.verdict == "inconclusive" and "rms-gelu" in v.missing[0] and "--docs" in v.missing[0]


def test_inconclusive_when_an_option_has_no_counts():
    v = decide(table({"ln-gelu": 1e-3, "ln-swiglu": 2e-3, "rms-gelu": None, "rms-swiglu": 2e-3}))
    assert v.verdict == "inconclusive" and v.missing == ["observer counts for rms-gelu"]


def test_a_fifth_option_in_the_registry_is_judged_too(monkeypatch):
    from vllm_normswap import registry

    extra = registry.Option("ln-geglu", 5, "layernorm", "geglu", registry.ACTIVATION_ROLE, "change to GeGLU", "k")
    monkeypatch.setitem(registry.OPTIONS, "ln-geglu", extra)
    ev = table({"ln-gelu": 1e-3, "ln-swiglu": 2e-3, "rms-gelu": 2e-3, "rms-swiglu": 2e-3, "ln-geglu": 1e-4})
    assert set(ev) == set(OPTIONS) and "ln-geglu" in ev
    v = decide(ev)
    assert v.choice == "ln-geglu" and set(v.criteria) == set(OPTIONS) - {BASELINE}


@pytest.mark.parametrize("rates,first", [
    ({"ln-gelu": 1e-3, "ln-swiglu": 1e-4, "rms-gelu": 2e-3, "rms-swiglu": 2e-3}, "Decision: change the activation"),
    ({"ln-gelu": 1e-4, "ln-swiglu": 5e-2, "rms-gelu": 5e-3, "rms-swiglu": 1e-2}, "Decision: change nothing"),
    ({"ln-swiglu": 1e-4, "rms-gelu": 1e-4, "rms-swiglu": 1e-4}, "Decision: inconclusive"),
])
def test_prose_states_choice_evidence_and_what_would_change_it(rates, first):
    ev = table(rates)
    v = decide(ev)
    stats = {o: {"mu_norm_in": 1.0, "mu_norm_out": 0.1, f"rate_act_out_6": r} for o, r in rates.items()}
    text = analysis.explain(v, ev, stats, {}, {}, 6.0)
    assert text[0].startswith(first)
    assert any(line.startswith("(i) Mean subtraction") for line in text)
    assert any(line.startswith("(ii) Gating") for line in text)
    assert text[-1].startswith(("What would change it", "What would settle it"))
