"""benchmarks/ab_spread.py on a hand-made run folder: spread, drift, pairing and the rounds a ±10% CI needs, against
numpy."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from ab_spread import analyse  # noqa: E402


def test_spread_decomposition_of_a_hand_made_run(tmp_path):
    a = [400, 380, 360, 340, 320, 300]  # A drifts down ~5% a round
    b = [300, 420, 310, 400, 330, 390]  # B alternates: no drift
    run = tmp_path / "20260101-000000"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(
        {"comparisons": {"ln-gelu": {"load": {"per_round_tokens_per_s": {"a": a, "b": b},
                                              "resolution": {"throughput": {"detectable": 0.4}}}}}}))
    out = analyse([run])
    la, lb = np.log(a), np.log(b)
    sa, sb = next(s for s in out["servers"] if s["side"] == "a"), next(s for s in out["servers"] if s["side"] == "b")
    assert sa["sd_log"] == pytest.approx(la.std(ddof=1)) and sb["sd_log"] == pytest.approx(lb.std(ddof=1))
    assert sa["drift_per_round"] == pytest.approx(np.polyfit(range(6), la, 1)[0])
    assert sa["drift_share"] > 0.99 and sb["drift_share"] < 0.1
    opt = out["options"][0]
    assert opt["corr_ab"] == pytest.approx(np.corrcoef(la, lb)[0, 1])
    assert opt["sd_log_ratio"] == pytest.approx((lb - la).std(ddof=1))
    summary = out["summary"]  # two servers: the median of their geometric-mean tokens/s is the midpoint
    assert summary["tok_s_median"] == pytest.approx((np.exp(la.mean()) + np.exp(lb.mean())) / 2)
    assert summary["detectable_throughput_median"] == 0.4 and summary["servers"] == 2
    # rounds for ±10% at 95%: the smallest n with t(0.975, n-1)·sd/√n <= log 1.1 (sd 0.28 -> 36; t tables:
    # t(0.975, 34) = 2.032, t(0.975, 35) = 2.030)
    from ab_spread import rounds_for

    assert rounds_for(0.28, 0.10, 0.05) == 36
    assert 2.032 * 0.28 / math.sqrt(35) > math.log(1.1) >= 2.030 * 0.28 / math.sqrt(36)
