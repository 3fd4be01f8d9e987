"""Worker side of the metrics bridge: a daemon thread that copies the device counters to Prometheus
multiprocess files every ``publish_interval_s``, outside the forward pass.

Files go to the operator's PROMETHEUS_MULTIPROC_DIR when set (vLLM's /metrics then reads that directory), else to
the private directory that ``bridge.register_metrics_bridge`` created in the API server and passed down in
NORMSWAP_METRICS_DIR. File names follow prometheus_client's scheme (``{type}_[{mode}_]{id}.db``) with an id of
``normswap-{pid}``, so the bridge can remove our own stale files and nothing else.

The absmax gauge is a windowed max: each publish reads and resets the device max of the interval and publishes
the max of the intervals in the last ``absmax_window_s``. (A forward step that updates the max between our
read and our reset is lost for that gauge only; counters are read, never reset.)
"""

from __future__ import annotations

import collections
import math
import os
import threading
from collections.abc import Mapping
from typing import Protocol

import torch

from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.utils import floatToGoString

from vllm_normswap.logs import plugin_logger
from vllm_normswap.observe.config import ObserverConfig, threshold_label
from vllm_normswap.observe.metric_files import DIR_ENV, FILE_ID
from vllm_normswap.observe.site_stats import SiteLayout, decode
from vllm_normswap.registry import ABSMAX, ELEMENTS, HELP, LABELS, OUTLIERS, TOKEN_HISTOGRAMS

log = plugin_logger(__name__)  # under vLLM's "vllm" logger: see vllm_normswap.logs

_publisher: "Publisher | None" = None


class Source(Protocol):
    """What the publisher reads: one decoder layer's device counters (``layer_stats.LayerStats`` is one)."""

    layer: int
    layouts: dict[str, SiteLayout]  # site -> the layout of its state vector

    def state(self, site: str) -> torch.Tensor: ...


def metrics_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(DIR_ENV)


def ensure_publisher(config: ObserverConfig, model_name: str, sources: Mapping[str, Source]) -> "Publisher | None":
    """Start this process's publisher once (called at model construction). ``sources`` is read at every publish,
    so layers added to it after the start are published too."""
    global _publisher
    if _publisher is None:
        path = metrics_dir()
        if path is None:
            log.warning("normswap observer: no metrics directory (vllm_normswap.register() did not run in the "
                        "API server?); counters stay on the device and are not published")
            return None
        _publisher = Publisher(config, model_name, path, sources)
        _publisher.start()
    return _publisher


class Publisher(threading.Thread):
    def __init__(self, config: ObserverConfig, model_name: str, path: str, sources: Mapping[str, Source]):
        super().__init__(name="normswap-metrics", daemon=True)
        self.config, self.model_name, self.path, self.sources = config, model_name, path, sources
        ident = FILE_ID.format(pid=os.getpid())
        self.files = {kind: os.path.join(path, f"{kind}_{ident}.db")
                      for kind in ("counter", "histogram", "gauge_max")}
        n = max(1, math.ceil(config.absmax_window_s / config.publish_interval_s))
        self.window: dict[tuple, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=n))
        self.stopped = threading.Event()
        self._keys: dict[tuple, str] = {}  # sample -> its mmap key, built once
        self._last: dict[tuple, float] = {}  # sample -> the value last written

    def run(self):
        dicts = {kind: MmapedDict(f) for kind, f in self.files.items()}
        try:
            while not self.stopped.wait(self.config.publish_interval_s):
                self.publish(dicts)
        except OSError as e:  # the API server removed the directory at shutdown
            log.info("normswap metrics publisher stopped: %s", e)
        finally:
            for d in dicts.values():
                d.close()

    def publish(self, dicts):
        write = self._writer(dicts)
        for stats in list(self.sources.values()):
            for site, layout in stats.layouts.items():
                state = stats.state(site)
                snapshot = state.to("cpu", copy=True)
                state[layout.absmax].zero_()  # start the next absmax interval
                self.write_site(write, str(stats.layer), site, decode(snapshot, layout))

    def write_site(self, write, layer: str, site: str, values: dict):
        labels = (self.model_name, layer, site)
        write("counter", ELEMENTS, ELEMENTS + "_total", LABELS, labels, values["elements"])
        for tau, count in values["outliers"].items():
            write("counter", OUTLIERS, OUTLIERS + "_total", LABELS + ("threshold",),
                  labels + (threshold_label(tau),), count)
        window = self.window[labels]
        window.append(values["absmax"])
        write("gauge_max", ABSMAX, ABSMAX, LABELS, labels, max(window))
        for stat, (buckets, total) in values["hist"].items():
            name = TOKEN_HISTOGRAMS[stat]
            edges = [floatToGoString(e) for e in self.config.buckets[stat]] + ["+Inf"]
            for le, count in zip(edges, buckets):
                write("histogram", name, name + "_bucket", LABELS + ("le",), labels + (le,), count)
            write("histogram", name, name + "_sum", LABELS, labels, total)


    def _writer(self, dicts):
        """write(kind, metric, sample, labelnames, labelvalues, value): only values that changed since the last
        publish are written, with each sample's mmap key built once (this thread shares the GIL with the
        model runner: on a CPU server its cost is taken from decoding)."""
        keys, last = self._keys, self._last

        def write(kind, metric, sample, labelnames, labelvalues, value):
            ident = (kind, sample, labelvalues)
            key = keys.get(ident)
            if key is None:
                key = keys[ident] = mmap_key(metric, sample, list(labelnames), list(labelvalues), HELP[metric])
            value = float(value)
            if last.get(ident) != value:
                dicts[kind].write_value(key, value, 0.0)
                last[ident] = value

        return write
