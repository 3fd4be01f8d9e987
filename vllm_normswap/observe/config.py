"""Observer config: which sites to count, thresholds, sampling, histogram buckets. Torch-free and vLLM-free.

Set through the serving config's hf-overrides (the model's HF config carries it), e.g.

    --hf-overrides '{"normswap_observe": {"enabled": true, "thresholds": [3.0, 6.0], "sample_every": 1}}'

Absent (or ``enabled: false``) means the observer is off: no buffers, no ops, zero cost.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from vllm_normswap.registry import DEFAULT_THRESHOLDS, SHARDED_SITES, SITES, TOKEN_HIST_SITES, ConfigError

HF_KEY = "normswap_observe"  # key in the HF config (--hf-overrides) that carries this config

# Histogram upper bounds (Prometheus `le`), chosen around the case study's regime: token means of a few units,
# spreads near 1 after a norm, post-activation maxima up to hundreds.
DEFAULT_BUCKETS = {
    "mean": (-16.0, -8.0, -4.0, -2.0, -1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
    "std": (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 64.0),
    "absmax": (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0, 128.0, 256.0),
}


@dataclasses.dataclass(frozen=True)
class ObserverConfig:
    enabled: bool = True  # false: observer off (same as leaving normswap_observe out)
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS  # count |x| > tau for each
    sites: tuple[str, ...] = SITES  # which of the five FFN sites to observe
    sample_every: int = 1  # observe one forward step in N (1 = every step)
    layers: tuple[int, ...] | None = None  # decoder layers to observe (None = all)
    publish_interval_s: float = 1.0  # how often each worker copies its counters to the metrics files
    absmax_window_s: float = 15.0  # normswap_activation_absmax = max |x| over this many recent seconds
    buckets: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_BUCKETS))

    def __post_init__(self):
        fix = f"fix {HF_KEY!r} in --hf-overrides (see docs/metrics.md)"
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"{HF_KEY}.enabled = {self.enabled!r} must be true or false; {fix}")
        thresholds = _float_tuple("thresholds", self.thresholds, fix)
        if not thresholds or any(not (t > 0 and math.isfinite(t)) for t in thresholds):
            raise ConfigError(f"{HF_KEY}.thresholds = {list(self.thresholds)!r} must be a non-empty list of "
                              f"positive finite numbers (|x| > tau is counted); {fix}")
        object.__setattr__(self, "thresholds", tuple(sorted(set(thresholds))))
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        bad = [s for s in sites if s not in SITES]
        if bad or not sites:
            raise ConfigError(f"{HF_KEY}.sites = {list(sites)!r}: unknown site(s) {bad}; allowed: "
                              f"{', '.join(SITES)} (at least one); {fix}")
        object.__setattr__(self, "sites", tuple(s for s in SITES if s in sites))
        if isinstance(self.sample_every, bool) or not isinstance(self.sample_every, int) or self.sample_every < 1:
            raise ConfigError(f"{HF_KEY}.sample_every = {self.sample_every!r} must be an integer >= 1; {fix}")
        if self.layers is not None:
            if isinstance(self.layers, (str, int)) or any(isinstance(i, bool) or not isinstance(i, int)
                                                          for i in self.layers):
                raise ConfigError(f"{HF_KEY}.layers = {self.layers!r} must be a list of layer indices; {fix}")
            object.__setattr__(self, "layers", tuple(self.layers))
        for name in ("publish_interval_s", "absmax_window_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{HF_KEY}.{name} = {value!r} must be a positive number of seconds; {fix}")
        buckets = dict(DEFAULT_BUCKETS)
        for stat, edges in dict(self.buckets).items():
            if stat not in DEFAULT_BUCKETS:
                raise ConfigError(f"{HF_KEY}.buckets has unknown statistic {stat!r}; allowed: "
                                  f"{', '.join(DEFAULT_BUCKETS)}; {fix}")
            edges = _float_tuple(f"buckets.{stat}", edges, fix)
            if not edges or list(edges) != sorted(set(edges)) or not all(math.isfinite(e) for e in edges):
                raise ConfigError(f"{HF_KEY}.buckets.{stat} = {list(edges)!r} must be strictly increasing finite "
                                  f"upper bounds (+Inf is added); {fix}")
            buckets[stat] = edges
        object.__setattr__(self, "buckets", buckets)

    def check_layers(self, num_layers: int) -> None:
        bad = [i for i in self.layers or () if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"{HF_KEY}.layers {bad} outside 0..{num_layers - 1}; list layers the model has")

    def observes_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    @classmethod
    def from_hf_value(cls, value: Any) -> "ObserverConfig | None":
        """The config for ``hf_config.normswap_observe``; None when absent or disabled (observer off)."""
        if value is None:
            return None
        if isinstance(value, bool):
            value = {"enabled": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{HF_KEY} = {value!r} must be a JSON object such as "
                              f'{{"enabled": true, "thresholds": [6.0]}}, or true/false')
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ConfigError(f"{HF_KEY} has unknown key(s) {unknown}; allowed: {', '.join(sorted(fields))}")
        config = cls(**value)
        return config if config.enabled else None


def _float_tuple(name: str, values, fix: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        values = (values,)
    try:
        return tuple(float(v) for v in values if not isinstance(v, bool) or _reject(v))
    except (TypeError, ValueError):
        raise ConfigError(f"{HF_KEY}.{name} = {values!r} must be a list of numbers; {fix}") from None


def _reject(v):
    raise TypeError(v)


def threshold_label(tau: float) -> str:
    """The `threshold` label value: shortest form ("6", "0.5", "20")."""
    return f"{tau:g}"
