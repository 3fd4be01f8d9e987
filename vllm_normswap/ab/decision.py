"""The decision rules, as data in and data out: which option is the most defensible first experiment.

The case study asks which change to try first to reduce post-activation outliers while preserving quality;
"change nothing" (the baseline) is one of the answers. For each option other than the baseline, three criteria,
each True, False or None (the data cannot tell):
- reduces:  its act_out outlier rate (bf16, the quality documents, |x| > tau) is below REDUCTION x the baseline's;
- quality:  its bf16 perplexity is not worse than the baseline's by more than PPL_MARGIN: the ratio PPL / baseline
            PPL on the same documents, with a paired CI: False when the CI lies wholly above 1 + PPL_MARGIN, True
            when wholly below, None when it straddles the bound;
- int8:     its int8 cost (KL(bf16 || int8)) is not clearly larger than the baseline's: False when its CI lies
            wholly above the baseline's.
Choice: among options meeting all three, single changes before "both" (one change is the cleaner experiment),
then the lowest outlier ratio. If none qualifies and every criterion was decidable, the answer is the baseline:
change nothing. "inconclusive" only when a criterion that could have made an option qualify is None.
The prose lives in analysis.py; this module only decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_normswap.registry import BASELINE, BOTH_ROLE, OPTIONS

REDUCTION = 0.9  # an option must cut the baseline's act_out outlier rate by at least 10%
PPL_MARGIN = 0.05  # bf16 perplexity may be up to 5% worse than the baseline's


@dataclass
class Evidence:
    """What the run measured for one option (None where it measured nothing)."""
    option: str
    outlier_rate: float | None = None  # act_out elements with |x| > tau over elements, bf16, quality documents
    ppl: dict | None = None  # bf16 perplexity {"value", "lo", "hi"}
    ppl_ratio: dict | None = None  # bf16 perplexity / the baseline's on the same documents (paired CI)
    int8_kl: dict | None = None  # KL(bf16 || int8) per token, with CI
    floor_kl: dict | None = None  # KL(fp32 || bf16) per token: the precision floor
    int8_vs_floor: dict | None = None  # int8_kl / floor_kl with a paired CI
    mu_slope: float | None = None  # d mu(norm_out) / dc under the mean-shift probe
    throughput: dict | None = None  # int8 / bf16 output tokens/s with CI and label


@dataclass
class Criteria:
    option: str
    outlier_ratio: float | None = None  # rate / baseline rate
    reduces: bool | None = None
    quality: bool | None = None
    int8: bool | None = None

    @property
    def qualifies(self) -> bool:
        return bool(self.reduces and self.quality and self.int8 is not False)


@dataclass
class Verdict:
    verdict: str  # "decided" | "inconclusive"
    choice: str | None  # the chosen option id (the baseline means: change nothing)
    criteria: dict[str, Criteria] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # the measurements that would settle an inconclusive run


def _above(a: dict | None, b: dict | None, factor: float = 1.0) -> bool | None:
    """Whether CI a lies wholly above factor x CI b; None without both."""
    if not a or not b:
        return None
    return a["lo"] > factor * b["hi"]


def criteria(ev: Evidence, base: Evidence) -> Criteria:
    c = Criteria(ev.option)
    if ev.outlier_rate is not None and base.outlier_rate is not None:
        if base.outlier_rate > 0:
            c.outlier_ratio = ev.outlier_rate / base.outlier_rate
            c.reduces = c.outlier_ratio < REDUCTION
        else:  # nothing to reduce at the baseline
            c.outlier_ratio = float("inf") if ev.outlier_rate > 0 else 1.0
            c.reduces = False
    if ev.ppl_ratio:
        if ev.ppl_ratio["lo"] > 1.0 + PPL_MARGIN:
            c.quality = False
        elif ev.ppl_ratio["hi"] <= 1.0 + PPL_MARGIN:
            c.quality = True
    worse_int8 = _above(ev.int8_kl, base.int8_kl)
    c.int8 = None if worse_int8 is None else not worse_int8
    return c


def decide(evidence: dict[str, Evidence], baseline: str = BASELINE) -> Verdict:
    base = evidence.get(baseline)
    if base is None or base.outlier_rate is None:
        return Verdict("inconclusive", None, missing=[f"observer counts for the baseline {baseline} (its bf16 server "
                                                      "failed or ran without the observer)"])
    crit = {o: criteria(ev, base) for o, ev in evidence.items() if o != baseline}
    good = [c for c in crit.values() if c.qualifies]
    if good:
        best = min(good, key=lambda c: (OPTIONS[c.option].role == BOTH_ROLE if c.option in OPTIONS else False,
                                        c.outlier_ratio))
        return Verdict("decided", best.option, crit)
    missing = []
    for c in crit.values():
        if c.reduces is None:
            missing.append(f"observer counts for {c.option}")
        elif c.reduces and c.quality is None:
            missing.append(f"a tighter perplexity CI for {c.option} against the baseline's +{PPL_MARGIN:.0%} bound "
                           "(more documents: --docs)")
    if missing or not crit:
        return Verdict("inconclusive", None, crit, missing or ["at least one option besides the baseline"])
    return Verdict("decided", baseline, crit)
