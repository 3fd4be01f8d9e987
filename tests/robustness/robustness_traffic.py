"""Shared by the robustness tests: the load_tests/ helpers (loaded by path: tests/load_tests is another
package name) and closed-loop good traffic in threads."""

from __future__ import annotations

import importlib.util
import random
import threading
from pathlib import Path

import requests

OPTION = "ln-gelu"
API_KEY = "test-key-8620"
REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "load_tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bad = _load("bad_requests")
watch = _load("metrics_watch")


class GoodTraffic(threading.Thread):
    """Closed-loop good completions from ``users`` threads; counts successes and keeps every failure."""

    def __init__(self, url: str, users: int = 2, api_key: str | None = None):
        super().__init__(daemon=True)
        self.url, self.users, self.api_key = url, users, api_key
        self.ok, self.failures = 0, []
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def run(self):
        threads = [threading.Thread(target=self.user, args=(i,), daemon=True) for i in range(self.users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def user(self, seed: int):
        rng, session = random.Random(seed), requests.Session()
        while not self.stopped.is_set():
            prompt = [rng.randrange(1, bad.VOCAB) for _ in range(rng.randrange(8, 64))]
            try:
                bad.good_completion(session, self.url, OPTION, prompt, max_tokens=8, api_key=self.api_key)
                with self.lock:
                    self.ok += 1
            except Exception as err:  # every failure is a test failure: keep it for the report
                with self.lock:
                    self.failures.append(repr(err)[:300])

    def stop(self):
        self.stopped.set()
        self.join(timeout=180)
