"""The /metrics parser on text produced by a real prometheus_client registry with the observer's families."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vllm_normswap.ab import metrics


def _exposition(scale):
    reg = CollectorRegistry()
    out = Counter("normswap_activation_outliers", "x", ["model_name", "layer", "site", "threshold"], registry=reg)
    el = Counter("normswap_activation_elements", "x", ["model_name", "layer", "site"], registry=reg)
    am = Gauge("normswap_activation_absmax", "x", ["model_name", "layer", "site"], registry=reg)
    mu = Histogram("normswap_token_mean", "x", ["model_name", "layer", "site"], buckets=(-1, 0, 1, 4), registry=reg)
    for layer in (0, 1):
        el.labels("m", str(layer), "act_out").inc(1000 * scale)
        out.labels("m", str(layer), "act_out", "6.0").inc((layer + 1) * 3 * scale)
        out.labels("m", str(layer), "act_out", "3.0").inc((layer + 1) * 10 * scale)
        am.labels("m", str(layer), "act_out").set(7.5 + layer)
        for v in [0.5, 2.0, 3.0][: 1 + scale]:
            mu.labels("m", str(layer), "norm_out").observe(v)
    return generate_latest(reg).decode()


def test_parse_diff_rates_and_histograms():
    before, after = metrics.parse(_exposition(1)), metrics.parse(_exposition(2))
    assert before["elements"][(1, "act_out")] == 1000
    assert before["outliers"][(1, "act_out", 6.0)] == 6
    d = metrics.diff(after, before)
    assert d["elements"][(0, "act_out")] == 1000
    assert metrics.outlier_rates(d, "act_out", 6.0) == {0: 3 / 1000, 1: 6 / 1000}
    h = d["hist"]["normswap_token_mean"][(0, "norm_out")]
    # negative buckets: client_python exposes no _sum, so the mean is estimated from bucket midpoints
    assert h["count"] == 1 and h["sum_estimated"] and h["sum"] == 2.5  # 3.0 falls in (1, 4]: midpoint 2.5
    assert metrics.hist_mean(after, "normswap_token_mean", "norm_out") == {0: (0.5 + 2.5 * 2) / 3, 1: (0.5 + 5) / 3}
    bounds, counts = metrics.hist_pooled(after, "normswap_token_mean", "norm_out")
    assert bounds[:4] == [-1.0, 0.0, 1.0, 4.0] and counts[:4] == [0, 0, 2, 4]
    assert after["absmax"][(1, "act_out")] == 8.5
    js = metrics.to_jsonable(d)
    assert js["outliers"]["1/act_out/6.0"] == 6


def test_settled_scrape_waits_for_two_equal_pairs(monkeypatch):
    """Pure logic of the settle rule, with the scrapes replaced by a sequence (the real scrapes: test_ab_run.py and
    test_positive_control.py). A publisher late by one interval shows as one equal pair, then a jump: not settled."""
    seq = iter([{"elements": {k: v}, "outliers": {}} for k, v in
                [("x", 1), ("x", 2), ("x", 2), ("x", 5), ("x", 5), ("x", 5), ("x", 9)]])
    monkeypatch.setattr(metrics, "scrape", lambda url: url)
    monkeypatch.setattr(metrics, "parse", lambda text: next(seq))
    monkeypatch.setattr(metrics.time, "sleep", lambda s: None)
    assert metrics.settled_scrape("u")["elements"] == {"x": 5}
