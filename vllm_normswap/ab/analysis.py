"""Derived numbers for the report: per-option outlier rates and token means, probe curves, and the Decision.

Input is results (run records with parsed /metrics differences); output is plain data. The decision rules are
written out here so the report can quote them:
- the outlier measure is the act_out rate at the LLM.int8() threshold 6 (falling back to the largest threshold
  with counts at the baseline), over the quality documents, identical tokens for every option;
- a single change "reduces outliers" if its rate is below 0.9x the baseline's;
- it "preserves quality" if its bf16 perplexity CI does not lie entirely above 1.05x the baseline's, and its int8
  ΔPPL CI does not lie entirely above the baseline's ΔPPL CI;
- quality differences are "inconclusive" when the int8-vs-bf16 ΔPPL/KL CIs overlap the bf16 noise floor's.
"""

from __future__ import annotations

import math

from vllm_normswap.ab import metrics

BASELINE, ACTIVATION_ONLY, NORM_ONLY, BOTH = "ln-gelu", "ln-swiglu", "rms-gelu", "rms-swiglu"
REDUCTION = 0.9


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
        for site in ("norm_out", "act_in", "act_out", "ffn_out"):
            out[f"rate_{site}_{tau:g}"] = pooled_rate(d, site, tau)
    out["mu_norm_in"] = pooled_hist_mean(d, "normswap_token_mean", "norm_in")
    out["mu_norm_out"] = pooled_hist_mean(d, "normswap_token_mean", "norm_out")
    out["sigma_norm_in"] = pooled_hist_mean(d, "normswap_token_std", "norm_in")
    out["act_out_token_absmax"] = pooled_hist_mean(d, "normswap_token_absmax", "act_out")
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
    taus = base.get("thresholds") or next((s["thresholds"] for s in stats.values() if s), [6.0])
    tau = 6.0 if 6.0 in taus else taus[-1]
    if base and not base.get(f"rate_act_out_{tau:g}"):  # nothing above 6 at the baseline: use a lower threshold
        tau = max((t for t in taus if base.get(f"rate_act_out_{t:g}")), default=tau)
    comp = results.get("comparisons", {})
    curves = probe_curves(runs, tau)
    ref = reference_curves(results.get("probe_reference", {}), tau)
    agreement = probe_agreement(curves, ref)
    slopes_from = {o: ref[o] if len(ref.get(o, [])) > 1 else curves.get(o, []) for o in set(curves) | set(ref)}
    decision = decide(stats, comp, slopes_from, tau, main)
    if agreement:
        decision["text"].insert(1, "Probe check: the servers' μ(norm_out) matches the reference-model curve within "
                                + ", ".join(f"{o} {_fmt(v)}" for o, v in agreement.items())
                                + " (slopes above use the reference curve, c grid from --probe-grid).")
    return {"tau": tau, "stats": stats, "probe": curves, "probe_reference": ref, "probe_agreement": agreement,
            "decision": decision}


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


def decide(stats, comp, curves, tau, main) -> dict:
    key = f"rate_act_out_{tau:g}"
    lines, verdict, choice = [], "inconclusive", None
    base = stats.get(BASELINE, {})
    if not base or base.get(key) is None:
        return {"verdict": "inconclusive", "choice": None,
                "text": [f"No observer data for the baseline {BASELINE}: the run cannot answer the question "
                         "(see failed runs above)."]}
    # (i) mean subtraction
    ln = [o for o in (BASELINE, ACTIVATION_ONLY) if stats.get(o)]
    rms = [o for o in (NORM_ONLY, BOTH) if stats.get(o)]
    s_ln = [slope(curves.get(o, []), "mu_norm_out") for o in ln]
    s_rms = [slope(curves.get(o, []), "mu_norm_out") for o in rms]
    lines.append(
        "(i) Mean subtraction. Token mean μ entering the pre-FFN norm (norm_in): "
        + ", ".join(f"{o} {_fmt(stats[o]['mu_norm_in'])}" for o in ln + rms)
        + "; after the norm (norm_out): " + ", ".join(f"{o} {_fmt(stats[o]['mu_norm_out'])}" for o in ln + rms)
        + ". Under the mean-shift probe, dμ(norm_out)/dc = " + ", ".join(
            f"{o} {_fmt(s)}" for o, s in zip(ln + rms, s_ln + s_rms))
        + ": LayerNorm removes a token's mean (its norm_out μ stays at mean(β)), RMSNorm passes a shifted mean "
          "on to the FFN input.")
    # (ii) gating
    probe_rate = {o: slope(curves.get(o, []), "act_out_rate") for o in stats}
    lines.append(
        f"(ii) Gating. act_out elements with |x| > {tau:g}: " + ", ".join(
            f"{o} {_fmt(s.get(key), '.2e')}" for o, s in stats.items())
        + "; change per unit probe shift: " + ", ".join(f"{o} {_fmt(v, '.2e')}" for o, v in probe_rate.items())
        + ". Max |act_out| per token (mean): " + ", ".join(
            f"{o} {_fmt(s.get('act_out_token_absmax'))}" for o, s in stats.items()) + ".")
    # candidates: the two single changes
    cands = []
    for o, label in ((ACTIVATION_ONLY, "change the activation to SwiGLU"), (NORM_ONLY, "change the norm to RMSNorm")):
        s = stats.get(o)
        if not s or s.get(key) is None:
            lines.append(f"{o} ({label}): no data.")
            continue
        ratio = s[key] / base[key] if base[key] else (math.inf if s[key] else 1.0)
        q_ok, q_note = _quality_ok(o, main, comp)
        cands.append((ratio, o, label, q_ok))
        lines.append(f"{o} ({label}): act_out outlier rate {_fmt(ratio)}x the baseline's; quality {q_note}.")
    if not base[key]:
        lines.append(f"No act_out element exceeded |x| > {tau:g} at the baseline (nor any configured threshold): "
                     "these models have no post-activation outliers to reduce, so the outlier criterion cannot "
                     "separate the options; lower normswap_observe.thresholds or use the probe (c > 0).")
    good = sorted(c for c in cands if c[0] < REDUCTION and c[3] and base[key])
    if good:
        ratio, choice, label, _ = good[0]
        verdict = "decided"
        lines.append(f"Decision: {label} ({choice}) is the most defensible first experiment: it cuts post-activation "
                     f"outliers to {_fmt(ratio)}x the baseline while quality holds by the rules above.")
    else:
        lines.append("Decision: inconclusive. Neither single change both reduced act_out outliers below "
                     f"{REDUCTION}x the baseline and preserved quality on these models and documents.")
    noise = [o for o, c in comp.items() if _overlap(c.get("int8_vs_bf16", {}).get("kl"), c.get("noise_floor", {}).get("kl"))
             or _overlap(c.get("int8_vs_bf16", {}).get("delta_ppl"), c.get("noise_floor", {}).get("delta_ppl"))]
    if noise:
        lines.append("Caveat: the int8-vs-bf16 ΔPPL or KL CI overlaps the bf16 noise floor for " + ", ".join(noise)
                     + ": int8 quality differences there are inconclusive (within run-to-run noise).")
    return {"verdict": verdict, "choice": choice, "tau": tau, "text": lines}


def _quality_ok(option, main, comp) -> tuple[bool, str]:
    qb = (main.get(BASELINE, {}).get("quality") or {}).get("ppl_a")
    qo = (main.get(option, {}).get("quality") or {}).get("ppl_a")
    if not qb or not qo:
        return False, "unknown (no perplexity)"
    notes, ok = [f"bf16 PPL {_fmt(qo['value'])} vs baseline {_fmt(qb['value'])}"], True
    if qo["lo"] > 1.05 * qb["hi"]:
        ok = False
        notes.append("worse beyond 5%")
    db = comp.get(BASELINE, {}).get("int8_vs_bf16", {}).get("delta_ppl")
    do = comp.get(option, {}).get("int8_vs_bf16", {}).get("delta_ppl")
    if db and do:
        notes.append(f"int8 ΔPPL {_fmt(do['value'])} [{_fmt(do['lo'])}, {_fmt(do['hi'])}] vs baseline "
                     f"{_fmt(db['value'])} [{_fmt(db['lo'])}, {_fmt(db['hi'])}]")
        if do["lo"] > db["hi"]:
            ok = False
            notes.append("int8 loss clearly larger")
    return ok, ("holds: " if ok else "does not hold: ") + "; ".join(notes)
