"""Watch a server's /metrics: scrape latency, and that every counter only goes up (shared by the soak driver and
tests/robustness). Counters are samples of counter families and the _bucket/_count samples of histograms (a
histogram's _sum may fall: normswap_token_mean observes negative values)."""

from __future__ import annotations

import threading
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

OUTLIER_PREFIX = "normswap_activation_"


def scrape(url: str, timeout: float = 30) -> tuple[dict[tuple, float], float]:
    """({(sample name, labels): value} of monotonic samples, seconds the scrape took)."""
    t0 = time.monotonic()
    r = requests.get(f"{url}/metrics", timeout=timeout)
    r.raise_for_status()
    seconds = time.monotonic() - t0
    out = {}
    for family in text_string_to_metric_families(r.text):
        if family.type not in ("counter", "histogram"):
            continue
        for s in family.samples:
            if s.name.endswith(("_total", "_bucket", "_count")):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out, seconds


def decreases(before: dict, after: dict) -> list[str]:
    """Samples that went down, or disappeared, between two scrapes."""
    bad = []
    for key, value in before.items():
        if key not in after:
            bad.append(f"{key[0]}{dict(key[1])} vanished (was {value})")
        elif after[key] < value:
            bad.append(f"{key[0]}{dict(key[1])} fell {value} -> {after[key]}")
    return bad


class MetricsWatcher(threading.Thread):
    """Scrape every ``interval`` s until stopped; keeps scrape latencies, violations and the last scrape."""

    def __init__(self, url: str, interval: float = 1.0):
        super().__init__(name="metrics-watch", daemon=True)
        self.url, self.interval = url, interval
        self.latencies: list[tuple[float, float]] = []  # (time since start, seconds)
        self.violations: list[str] = []
        self.errors: list[str] = []
        self.last: dict = {}
        self.t0 = time.monotonic()
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            try:
                cur, seconds = scrape(self.url)
                self.latencies.append((time.monotonic() - self.t0, seconds))
                if self.last:
                    self.violations += decreases(self.last, cur)
                self.last = cur
            except requests.RequestException as err:
                self.errors.append(f"{time.monotonic() - self.t0:.1f}s: {err}")
            self.stopped.wait(self.interval)

    def stop(self):
        self.stopped.set()
        self.join(timeout=60)

    def outlier_total(self) -> float:
        return sum(v for (name, _), v in self.last.items() if name.startswith(OUTLIER_PREFIX + "outliers"))
