"""Soak scenario: good completions (plain and streaming) mixed with bad requests against one server.

    LT=$(python -m vllm_normswap.load_tests)    # the directory of these files, in a wheel or a checkout
    locust -f "$LT/soak_locustfile.py" --headless -u 4 -r 4 -t 10m -H http://127.0.0.1:8000 \
        --model-name ln-gelu [--api-key KEY] --csv out/soak
    # or let soak.py start the server, run this, and sample memory and /metrics (JSON summary)

Request types in locust's statistics: "good" and "good-stream" (a failure is any non-200 or a wrong token
count: the soak requires 0), "bad:<name>" (a failure is any status other than the one bad_requests.py
expects, e.g. a 500 or a 200), and "bad:disconnect" (a streaming request the client abandons after two chunks).
The server must run with --max-model-len 256 --max-logprobs 20 (bad_requests.MAX_MODEL_LEN / MAX_LOGPROBS).
"""

from __future__ import annotations

import importlib.util
import itertools
import random
import time
from pathlib import Path

import requests
from locust import HttpUser, events, task

from vllm_normswap.registry import BASELINE


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bad = _load("bad_requests")
GOOD_MAX_TOKENS = 16


@events.init_command_line_parser.add_listener
def _(parser):
    parser.add_argument("--model-name", env_var="NORMSWAP_MODEL", default=BASELINE, help="served model name")
    parser.add_argument("--api-key", env_var="NORMSWAP_API_KEY", default="", help="if the server has --api-key")


def _opts(user):
    o = user.environment.parsed_options
    return (o.model_name, o.api_key or None) if o else (BASELINE, None)


class GoodUser(HttpUser):
    """A well-behaved client: greedy completions of random prompts, a third of them streamed."""

    weight = 3

    def on_start(self):
        self.rng = random.Random()
        self.model, self.key = _opts(self)

    def _prompt(self):
        return [self.rng.randrange(1, bad.VOCAB) for _ in range(self.rng.randrange(8, 96))]

    @task(2)
    def complete(self):
        body = {"model": self.model, "prompt": self._prompt(), "max_tokens": GOOD_MAX_TOKENS, "temperature": 0.0,
                "ignore_eos": True}
        with self.client.post("/v1/completions", json=body, headers=bad.headers(self.key), name="good",
                              catch_response=True, timeout=300) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}: {r.text[:200]}")
            elif r.json()["usage"]["completion_tokens"] != GOOD_MAX_TOKENS:
                r.failure(f"completion_tokens {r.json()['usage']['completion_tokens']}")

    @task(1)
    def stream(self):
        body = {"model": self.model, "prompt": self._prompt(), "max_tokens": GOOD_MAX_TOKENS, "temperature": 0.0,
                "ignore_eos": True, "stream": True}
        with self.client.post("/v1/completions", json=body, headers=bad.headers(self.key), name="good-stream",
                              catch_response=True, stream=True, timeout=300) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}")
                return
            chunks = [line for line in r.iter_lines() if line.startswith(b"data: ")]
            if not chunks or chunks[-1] != b"data: [DONE]":
                r.failure("stream ended without [DONE]")


class BadUser(HttpUser):
    """A misbehaving client: every bad request of the table in turn, and streams it abandons."""

    weight = 1

    def on_start(self):
        self.model, self.key = _opts(self)
        self.session = requests.Session()  # not self.client: locust's session would count every 4xx as failed
        names = list(bad.BAD_REQUESTS) + ["disconnect"]
        self.cases = itertools.cycle(random.sample(names, len(names)))

    @task
    def misbehave(self):
        name = next(self.cases)
        t0 = time.perf_counter()
        exc = None
        try:
            if name == "disconnect":
                chunks = bad.disconnect_mid_stream(self.host, self.model, self.key)
                if chunks != 2:
                    exc = RuntimeError(f"stream ended after {chunks} chunks")
            else:
                status, allowed, text = bad.send_bad(self.session, self.host, name, self.model, self.key)
                if not allowed:
                    exc = RuntimeError(f"status {status}: {text}")
        except Exception as err:  # a connection error on a bad request is also a failure of the server
            exc = err
        events.request.fire(request_type="POST", name=f"bad:{name}", response_time=(time.perf_counter() - t0) * 1e3,
                            response_length=0, exception=exc, context={})
