"""ObserverConfig validation: off by default, every bad value named with its fix."""

from __future__ import annotations

import pytest

from vllm_normswap.observe.bridge import remove_stale_files
from vllm_normswap.observe.config import ObserverConfig
from vllm_normswap.registry import ConfigError


def test_absent_or_disabled_means_off():
    assert ObserverConfig.from_hf_value(None) is None
    assert ObserverConfig.from_hf_value(False) is None
    assert ObserverConfig.from_hf_value({"enabled": False}) is None
    on = ObserverConfig.from_hf_value(True)
    assert 6.0 in on.thresholds and on.sites == ("norm_in", "norm_out", "act_in", "act_out", "ffn_out")


def test_values_are_normalised():
    c = ObserverConfig.from_hf_value({"thresholds": [6, 1, 6], "sites": ["act_out", "norm_in"], "layers": [1]})
    assert c.thresholds == (1.0, 6.0) and c.sites == ("norm_in", "act_out") and c.observes_layer(1)
    assert not c.observes_layer(0)


@pytest.mark.parametrize("value, words", [
    ({"thresholds": []}, "thresholds"), ({"thresholds": [-1]}, "positive"), ({"thresholds": ["x"]}, "numbers"),
    ({"sites": ["ffn_in"]}, "ffn_in"), ({"sample_every": 0}, "sample_every"), ({"sample_every": 1.5}, "integer"),
    ({"layers": "0"}, "layers"), ({"publish_interval_s": 0}, "publish_interval_s"), ({"typo": 1}, "typo"),
    ({"buckets": {"mean": [1, 0]}}, "increasing"), ({"buckets": {"median": [1]}}, "median"), ("on", "JSON object"),
])
def test_bad_values_name_the_field(value, words):
    with pytest.raises(ConfigError, match=words):
        ObserverConfig.from_hf_value(value)


def test_layers_outside_the_model_are_rejected():
    with pytest.raises(ConfigError, match="outside 0..1"):
        ObserverConfig.from_hf_value({"layers": [2]}).check_layers(2)


def test_stale_file_removal_touches_only_our_files(tmp_path):
    ours = [tmp_path / "counter_normswap-12.db", tmp_path / "gauge_max_normswap-12.db"]
    theirs = [tmp_path / "counter_12.db", tmp_path / "histogram_99.db"]
    for f in ours + theirs:
        f.write_bytes(b"")
    assert sorted(remove_stale_files(str(tmp_path))) == sorted(map(str, ours))
    assert all(f.exists() for f in theirs) and not any(f.exists() for f in ours)
