"""Shared by the robustness tests: the load-test helpers (bad requests, the /metrics watcher) and closed-loop
good traffic in threads."""

from __future__ import annotations

import random
import threading

import requests

from utils import random_prompt
from vllm_normswap.load_tests import bad_requests as bad
from vllm_normswap.load_tests import metrics_watch as watch

OPTION = "ln-gelu"
API_KEY = "test-key-robustness"


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
            prompt = random_prompt(rng, bad.VOCAB, (8, 64))
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
