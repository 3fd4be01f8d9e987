"""Derived numbers for the report: per-option outlier rates and token means, probe curves, the evidence table
the decision rules read (ab/decision.py), and the Decision in words.

Input is results (run records with parsed /metrics differences); output is plain data. The outlier measure is the
act_out rate at the LLM.int8() threshold 6 (falling back to the largest threshold with counts at the baseline),
over the quality documents: identical tokens for every option.
"""

from __future__ import annotations

import math

from vllm_normswap.ab import metrics, premise
from vllm_normswap.ab.decision import PPL_MARGIN, REDUCTION, Evidence, Verdict, decide
from vllm_normswap.registry import BASELINE, DECISION_SITE, DECISION_THRESHOLD, OPTIONS, SITES, TOKEN_HISTOGRAMS


def pooled_rate(diff: dict, site: str, tau: float) -> float | None:
    n = sum(v for (l, s, t), v in diff["outliers"].items() if s == site and t == tau)
    e = sum(v for (l, s), v in diff["elements"].items() if s == site)
    return n / e if e else None


def pooled_hist_mean(diff: dict, family: str, site: str) -> float | None:
    hs = [h for (l, s), h in diff["hist"].get(family, {}).items() if s == site and h["count"]]
    c = sum(h["count"] for h in hs)
    return sum(h["sum"] for h in hs) / c if c else None


def thresholds(diff: dict) -> list[float]:
    return sorted({t for (_, _, t) in diff["outliers"]})


def option_stats(run: dict) -> dict:
    d = run.get("observer")
    if not d or not d["elements"]:
        return {}
    out = {"thresholds": thresholds(d)}
    for tau in out["thresholds"]:
        for site in SITES:
            out[f"rate_{site}_{tau:g}"] = pooled_rate(d, site, tau)
    out["mu_norm_in"] = pooled_hist_mean(d, TOKEN_HISTOGRAMS["mean"], "norm_in")
    out["mu_norm_out"] = pooled_hist_mean(d, TOKEN_HISTOGRAMS["mean"], "norm_out")
    out["sigma_norm_in"] = pooled_hist_mean(d, TOKEN_HISTOGRAMS["std"], "norm_in")
    out["act_out_token_absmax"] = pooled_hist_mean(d, TOKEN_HISTOGRAMS["absmax"], "act_out")
    out["act_out_absmax"] = max((v for (l, s), v in d["absmax"].items() if s == "act_out"), default=None)
    return out


def probe_curves(runs: list[dict], tau: float) -> dict[str, list[dict]]:
    curves: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("precision") != "bf16" or r.get("status") == "failed" or not r.get("observer"):
            continue
        s = option_stats(r)
        if not s:
            continue
        curves.setdefault(r["option"], []).append({
            "c": r["probe_shift"], "mu_norm_in": s["mu_norm_in"], "mu_norm_out": s["mu_norm_out"],
            "act_out_rate": s.get(f"rate_act_out_{tau:g}"), "act_out_token_absmax": s["act_out_token_absmax"],
            "ppl": (r.get("quality") or {}).get("ppl_a", {}).get("value")})
    for pts in curves.values():
        pts.sort(key=lambda p: p["c"])
    return curves


def slope(points: list[dict], key: str) -> float | None:
    pts = [p for p in points if p[key] is not None]
    if len(pts) < 2 or pts[-1]["c"] == pts[0]["c"]:
        return None
    return (pts[-1][key] - pts[0][key]) / (pts[-1]["c"] - pts[0]["c"])


def _overlap(a: dict | None, b: dict | None) -> bool:
    return bool(a and b) and a["lo"] <= b["hi"] and b["lo"] <= a["hi"]


def _fmt(x, spec=".3g"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def analyze(results: dict) -> dict:
    runs = results["runs"]
    main = {r["option"]: r for r in runs if r.get("precision") == "bf16" and not r.get("probe_shift")
            and r.get("status") != "failed"}
    stats = {o: option_stats(r) for o, r in main.items()}
    base = stats.get(BASELINE) or {}
    taus = base.get("thresholds") or next((s["thresholds"] for s in stats.values() if s), [DECISION_THRESHOLD])
    tau = DECISION_THRESHOLD if DECISION_THRESHOLD in taus else taus[-1]
    key = f"rate_{DECISION_SITE}_{tau:g}"
    if base and not base.get(key):  # nothing above 6 at the baseline: use a lower threshold
        tau = max((t for t in taus if base.get(f"rate_{DECISION_SITE}_{t:g}")), default=tau)
        key = f"rate_{DECISION_SITE}_{tau:g}"
    comp = results.get("comparisons", {})
    curves = probe_curves(runs, tau)
    ref = reference_curves(results.get("probe_reference", {}), tau)
    agreement = probe_agreement(curves, ref)
    slopes_from = {o: ref[o] if len(ref.get(o, [])) > 1 else curves.get(o, []) for o in set(curves) | set(ref)}
    evidence = {o: Evidence(
        option=o, outlier_rate=stats[o].get(key) if stats.get(o) else None,
        ppl=(main[o].get("quality") or {}).get("ppl_a"),
        ppl_ratio=comp.get(o, {}).get("bf16_vs_baseline", {}).get("ppl_ratio"),
        int8_kl=comp.get(o, {}).get("int8_vs_bf16", {}).get("kl"),
        floor_kl=comp.get(o, {}).get("precision_floor", {}).get("kl"),
        int8_vs_floor=comp.get(o, {}).get("int8_kl_vs_floor"),
        mu_slope=slope(slopes_from.get(o, []), "mu_norm_out"),
        throughput=(comp.get(o, {}).get("load") or {}).get("throughput")) for o in main}
    verdict = decide(evidence)
    text = explain(verdict, evidence, stats, comp, slopes_from, tau)
    if agreement:
        text.insert(1, "Probe check: the servers' μ(norm_out) matches the reference-model curve within "
                    + ", ".join(f"{o} {_fmt(v)}" for o, v in agreement.items())
                    + " (slopes use the reference curve, c grid from --probe-grid).")
    prem = premise.analyze(results, main, tau)  # is the case study's problem here at all? (ab/premise.py)
    text[:0] = premise.lines(prem, BASELINE, list(main))
    decision = {"verdict": verdict.verdict, "choice": verdict.choice, "tau": tau, "text": text,
                "criteria": {o: vars(c) for o, c in verdict.criteria.items()}, "missing": verdict.missing}
    return {"tau": tau, "stats": stats, "probe": curves, "probe_reference": ref, "probe_agreement": agreement,
            "decision": decision, **prem}


def reference_curves(raw: dict, tau: float) -> dict[str, list[dict]]:
    """The reference-model probe curves with the act_out rate at the report's threshold."""
    out = {}
    for option, pts in raw.items():
        if isinstance(pts, list):
            out[option] = [{**p, "act_out_rate": p["act_out_rate"].get(f"{tau:g}")} for p in pts]
    return out


def probe_agreement(server: dict, ref: dict) -> dict[str, float]:
    """Largest |μ(norm_out) server − reference| over the c values both have: the server checks the curve."""
    out = {}
    for option, pts in server.items():
        by_c = {p["c"]: p for p in ref.get(option, [])}
        diffs = [abs(p["mu_norm_out"] - by_c[p["c"]]["mu_norm_out"]) for p in pts
                 if p["c"] in by_c and p["mu_norm_out"] is not None]
        if diffs:
            out[option] = max(diffs)
    return out


def _ci(s, spec=".3g") -> str:
    return "n/a" if not s else f"{_fmt(s['value'], spec)} [{_fmt(s['lo'], spec)}, {_fmt(s['hi'], spec)}]"


def _yes(x) -> str:
    return {True: "yes", False: "no", None: "cannot tell"}[x]


def explain(v: Verdict, ev: dict[str, Evidence], stats: dict, comp: dict, curves: dict, tau: float) -> list[str]:
    """The decision in words: the choice, the evidence chain (i) mean subtraction, (ii) gating, int8's cost
    against the precision floor, throughput; and what would change the verdict."""
    order = [o for o in OPTIONS if o in ev] + [o for o in ev if o not in OPTIONS]
    lines = []
    if v.verdict == "inconclusive":
        lines.append("Decision: inconclusive: the data cannot separate the options. Missing: " + "; ".join(v.missing)
                     + ".")
    elif v.choice == BASELINE:
        lines.append(f"Decision: change nothing ({BASELINE}, the case study's option {OPTIONS[BASELINE].case_study}). "
                     f"No change cut act_out outliers below {REDUCTION}x the baseline while keeping quality.")
    else:
        o = OPTIONS.get(v.choice)
        name = f"{o.change} ({v.choice}, option {o.case_study})" if o else v.choice
        lines.append(f"Decision: {name} is the most defensible first experiment: act_out outliers at "
                     f"{_fmt(v.criteria[v.choice].outlier_ratio)}x the baseline, quality within the rules.")
    # (i) mean subtraction
    lines.append("(i) Mean subtraction. Token mean μ entering the pre-FFN norm (norm_in): "
                 + ", ".join(f"{o} {_fmt(stats[o].get('mu_norm_in'))}" for o in order if stats.get(o))
                 + "; after it (norm_out): "
                 + ", ".join(f"{o} {_fmt(stats[o].get('mu_norm_out'))}" for o in order if stats.get(o))
                 + ". Under the mean-shift probe, dμ(norm_out)/dc = "
                 + ", ".join(f"{o} {_fmt(ev[o].mu_slope)}" for o in order)
                 + ": LayerNorm removes a token's mean (slope ≈ 0), RMSNorm passes a shifted mean on to the FFN.")
    # (ii) gating
    key = f"rate_{DECISION_SITE}_{tau:g}"
    probe_rate = {o: slope(curves.get(o, []), "act_out_rate") for o in order}
    lines.append(f"(ii) Gating. {DECISION_SITE} elements with |x| > {tau:g}: " + ", ".join(
        f"{o} {_fmt((stats.get(o) or {}).get(key), '.2e')}" for o in order)
        + "; change per unit probe shift: " + ", ".join(f"{o} {_fmt(probe_rate[o], '.2e')}" for o in order)
        + f". Max |{DECISION_SITE}| per token (mean): " + ", ".join(
            f"{o} {_fmt((stats.get(o) or {}).get('act_out_token_absmax'))}" for o in order) + ".")
    # the rules, option by option
    for o, c in v.criteria.items():
        lines.append(f"{o}: outliers {_fmt(c.outlier_ratio)}x the baseline (reduces: {_yes(c.reduces)}); bf16 PPL "
                     f"{_ci(ev[o].ppl)}, {_ci(ev[o].ppl_ratio)}x the baseline's on the same documents (within "
                     f"+{PPL_MARGIN:.0%}: {_yes(c.quality)}); int8 KL no worse than the baseline's: {_yes(c.int8)}.")
    # int8's cost against the precision floor, and throughput
    for o in order:
        e = ev[o]
        if e.int8_kl or e.throughput:
            tp = e.throughput
            lines.append(f"int8 on {o}: KL(bf16‖int8) {_ci(e.int8_kl)} per token = {_ci(e.int8_vs_floor)}x the "
                         f"precision floor KL(fp32‖bf16) {_ci(e.floor_kl)}; throughput int8÷bf16 {_ci(tp)}"
                         + (f" ({(comp.get(o, {}).get('load') or {}).get('labels', {}).get('throughput')})"
                            if tp else "") + ".")
    # what would change it
    if v.verdict == "inconclusive":
        lines.append("What would settle it: " + "; ".join(v.missing) + ".")
    elif v.choice == BASELINE:
        why = [f"{o} cutting act_out outliers below {REDUCTION}x the baseline (now {_fmt(c.outlier_ratio)}x)"
               if not c.reduces else f"{o} keeping bf16 perplexity within +{PPL_MARGIN:.0%} of the baseline"
               for o, c in v.criteria.items()]
        lines.append("What would change it: " + "; or ".join(why) + ", on your model and documents "
                     "(--option ID=PATH, --corpus).")
    else:
        lines.append(f"What would change it: {v.choice}'s act_out rate rising above {REDUCTION}x the baseline's, or "
                     f"its perplexity CI moving above +{PPL_MARGIN:.0%} of the baseline's, on your model and "
                     "documents (--option ID=PATH, --corpus, more --docs).")
    return lines
