"""The report's load labels as one family: Holm–Bonferroni over every int8 ÷ bf16 ratio of the report, the CIs shown
at the level each label was decided at, and the resolution each ratio had.

Each ratio (option × throughput/TTFT/TPOT/E2E) comes from ab/loadstats.py with the paired t statistic on its round
log ratios. Tested one by one at 95%, a report of m = 16 ratios shows about 0.8 false "better"/"worse" labels when
nothing differs. Holm's step-down (Holm 1979) keeps the chance of ANY false label in a report at most ALPHA, for
any dependence between the ratios (TTFT, TPOT and E2E of one option move together):
sort the p-values p(1) <= ... <= p(m); reject while p(i) < ALPHA / (m - i + 1); at the first failure stop.

The CIs match the labels by construction. A rejected ratio's CI is drawn at the level it was tested at,
1 - ALPHA/(m - i + 1), so it excludes 1. Every ratio not rejected gets the CI of the first failed step,
1 - ALPHA/(m - k + 1) (its p-value is at least p(k), so that CI contains 1). Labels are then read off the CI
shown, with the ±EQUIVALENCE band, exactly as for a single test; a label cannot contradict its CI. Where nothing
is rejected every CI is the Bonferroni interval at 1 - ALPHA/m.

Resolution, for every ratio: "detectable" = exp(half-width of the log CI) - 1, the smallest change that, observed,
would have been labelled (a true change of that size is found about half the time; twice it, nearly always);
"bound" = the CI's farthest end from 1, so "no difference" reads "no difference larger than ±bound" (past 100%,
"a factor F" with F = max(hi, 1/lo)).
For int8's KL against the precision floor (a 95% bootstrap CI, not a load label): "at most" = its upper end.
"""

from __future__ import annotations

import math

from vllm_normswap.ab.loadstats import EQUIVALENCE, HIGHER_IS_BETTER, LATENCY_KEYS, label, t_quantile

ALPHA = 0.05  # family-wise error rate: at most this share of no-effect reports shows any "better"/"worse" load label


def holm(pvalues: dict, alpha: float = ALPHA) -> dict:
    """key -> (rejected, level alpha_j the key's CI is drawn at). Ties keep their input order."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m = len(order)
    out, stop = {}, None
    for i, k in enumerate(order):
        step = alpha / (m - i)
        if stop is None and pvalues[k] < step:
            out[k] = (True, step)
            continue
        stop = step if stop is None else stop
        out[k] = (False, stop)
    return out


def interval(stat: dict, alpha_j: float) -> dict:
    """The ratio's CI at level 1 - alpha_j, from its log mean and standard error."""
    half = t_quantile(alpha_j, stat["df"]) * stat["log_se"]
    m = stat["log_mean"]
    return {**stat, "lo": math.exp(m - half), "hi": math.exp(m + half), "level": 1 - alpha_j}


def resolution(ci: dict) -> dict:
    half = (math.log(ci["hi"]) - math.log(ci["lo"])) / 2
    return {"detectable": math.exp(half) - 1, "bound": max(ci["hi"] - 1, 1 - ci["lo"])}


def adjust(comparisons: dict, alpha: float = ALPHA) -> dict:
    """Holm over every load ratio of the report, in place: each comparisons[option]["load"] gets its CIs and
    labels at the adjusted levels (the 95% ones kept under "unadjusted"), "resolution" per ratio and "family";
    comparisons[option]["kl_resolution"] from int8's KL ÷ floor CI. Returns the family's description."""
    stats = {(o, k): c["load"][k] for o, c in comparisons.items() if c.get("load")
             for k in LATENCY_KEYS if c["load"].get(k) and "p" in c["load"][k]}
    decided = holm({key: s["p"] for key, s in stats.items()}, alpha)
    family = {"method": "holm", "alpha": alpha, "size": len(stats), "equivalence": EQUIVALENCE,
              "rejected": sum(r for r, _ in decided.values())}
    for o, c in comparisons.items():
        ld = c.get("load")
        if ld:
            if "unadjusted" not in ld:  # the 95% CIs each ratio had on its own, kept once (adjust is idempotent)
                ld["unadjusted"] = {"labels": dict(ld.get("labels", {})),
                                    **{k: {"lo": ld[k]["lo"], "hi": ld[k]["hi"]} for k in LATENCY_KEYS if ld.get(k)}}
            ld["resolution"], ld["family"] = {}, family
            for k in LATENCY_KEYS:
                if (o, k) not in decided:
                    continue
                ld[k] = interval(ld[k], decided[(o, k)][1])
                ld["labels"][k] = label(ld[k], HIGHER_IS_BETTER[k])
                ld["resolution"][k] = resolution(ld[k])
        kl = c.get("int8_kl_vs_floor")
        if kl:
            c["kl_resolution"] = {"at_most": kl["hi"], "at_least": kl["lo"], "level": 0.95}
    return family


def _pct(x: float) -> str:
    """±X% for a change below 100%; beyond that a percentage misleads (a ratio cannot fall 100%): a factor."""
    if x >= 1:
        return f"a factor {1 + x:.3g}"
    return "±" + (f"{100 * x:.0f}%" if x >= 0.095 else f"{100 * x:.1f}%")


def cell(ld: dict, key: str) -> str:
    """A load table cell: the adjusted CI, its label and, for "no difference", how large a difference it excludes."""
    ci, lab = ld.get(key), ld["labels"].get(key)
    if not ci:
        return f"–: {lab}"
    text = f"{ci['value']:.4g} [{ci['lo']:.4g}, {ci['hi']:.4g}]: {lab}"
    res = (ld.get("resolution") or {}).get(key)
    if res and lab == "no difference":  # the CI's farthest end from 1; as a factor when the CI spans 2x or more
        text += " larger than " + (_pct(res["bound"]) if res["bound"] < 1 else
                                   f"a factor {max(ci['hi'], 1 / ci['lo']):.3g}")
    return text


def describe(family: dict | None) -> str:
    """The load table's title: which adjustment the CIs carry, so a reader knows what a label promises."""
    if not family:
        return ("Load: int8 ÷ bf16 over alternating rounds (95% paired CIs over rounds, each ratio on its own; a CI "
                "containing 1 or within ±5% reads 'no difference')")
    m, a = family["size"], family["alpha"]
    return (f"Load: int8 ÷ bf16 over alternating rounds (paired t CIs over rounds, Holm-adjusted over the report's "
            f"{m} load ratios: with no real difference, at most {a:.0%} of reports show any 'better'/'worse'. "
            f"{family['rejected']} ratio(s) labelled at their Holm step; every other CI is at "
            f"{_level(family)} and contains 1. A CI containing 1 or within ±{family['equivalence']:.0%} reads "
            f"'no difference')")


def _level(family: dict) -> str:
    level = 1 - family["alpha"] / max(family["size"] - family["rejected"], 1)
    return f"{100 * level:.4g}%"


def resolution_table(comparisons: dict) -> tuple[str, list[str], list[list[str]]] | None:
    """Per option: the smallest int8 ÷ bf16 change each load ratio could have detected, and int8's KL bound."""
    head = ["option"] + [f"{k} change" for k in LATENCY_KEYS] + ["int8 KL ÷ floor at most"]
    rows = []
    for o, c in comparisons.items():
        res = (c.get("load") or {}).get("resolution") or {}
        kl = c.get("kl_resolution")
        if not res and not kl:
            continue
        rows.append([o] + [_pct(res[k]["detectable"]) if k in res else "–" for k in LATENCY_KEYS]
                    + [f"{kl['at_most']:.3g}x (95%)" if kl else "–"])
    if not rows:
        return None
    return ("Resolution: the smallest int8 ÷ bf16 change this run could detect (half-width of the adjusted CI; a "
            "true change twice this size is found nearly always), and int8's KL bound", head, rows)


def of(results: dict) -> dict | None:
    """The report's family (None for a run made before the adjustment: its CIs are 95% each)."""
    return next((c["load"]["family"] for c in results.get("comparisons", {}).values()
                 if (c.get("load") or {}).get("family")), None)


def aa_note(meta: dict) -> str:
    """The report's first paragraph says when it is an A/A run, and what its labels should read."""
    if not (meta.get("args") or {}).get("aa"):
        return ""
    return (" A/A run: each option's bf16 server against a second bf16 server of the same configuration "
            "(OPTION-bf16-aa); the columns named int8 hold that copy. Every load label should read 'no difference' "
            "(at most 5% of A/A runs show any other; docs/ab-error-rates.md).")
