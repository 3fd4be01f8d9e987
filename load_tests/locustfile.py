"""Locust user for an OpenAI-compatible server: streaming /v1/completions with a fixed, seeded workload.

    LT=$(python -m vllm_normswap.load_tests)    # the directory of these files, in a wheel or a checkout
    locust -f "$LT/locustfile.py" --headless -u 4 -r 4 -t 30s -H http://127.0.0.1:8000 \
        --workload prompts.jsonl --records-dir out/ --csv out/locust
    # request-rate sweep: add the shape file    -f "$LT/locustfile.py,$LT/rate_sweep.py"
    # a keyed server: NORMSWAP_API_KEY=KEY in the environment (not --api-key KEY: argv shows in `ps` and logs)
    # distributed: same file on both sides      locust -f ... --master --expect-workers 1 --headless ...
    #                                           locust -f ... --worker --master-host HOST

Every request sends the next prompt of a seeded permutation of the workload (JSONL lines {"prompt", "max_tokens"},
written by `vllm_normswap.ab.workload`), with ``ignore_eos`` so each generates exactly max_tokens tokens.
Per request it measures TTFT, inter-token latency per TOKEN (a streamed chunk may carry several tokens: the
server's continuous usage stats say how many), TPOT, end-to-end latency and output tokens. They go to locust's
own statistics as request types TTFT / ITL / TPOT / E2E (so --csv and the master's aggregate have them) and, one
JSON line per request, to ``--records-dir`` for exact percentiles and goodput (vllm_normswap.ab.loadgen).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import time
from pathlib import Path

import gevent
import requests
from locust import User, constant, constant_throughput, events, task
from locust.exception import StopUser
from locust.runners import LocalRunner, MasterRunner
from locust.stats import CSV_STATS_INTERVAL_SEC


@events.init_command_line_parser.add_listener
def _(parser):
    parser.add_argument("--workload", env_var="NORMSWAP_WORKLOAD", default="", help="prompts JSONL")
    parser.add_argument("--model-name", env_var="NORMSWAP_MODEL", default="", help="default: first of /v1/models")
    parser.add_argument("--records-dir", env_var="NORMSWAP_RECORDS", default="", help="per-request JSONL dir")
    parser.add_argument("--workload-seed", type=int, env_var="NORMSWAP_SEED", default=0)
    parser.add_argument("--max-requests", type=int, env_var="NORMSWAP_MAX_REQUESTS", default=0,
                        help="stop after this many requests per locust process (0 = until --run-time)")
    # a secret: masked in locust's web UI; pass it by environment (NORMSWAP_API_KEY), not on the command line
    parser.add_argument("--api-key", env_var="NORMSWAP_API_KEY", default="", is_secret=True,
                        help="sent as 'Authorization: Bearer KEY' (a server started with --api-key / VLLM_API_KEY)")
    parser.add_argument("--per-user-rate", type=float, env_var="NORMSWAP_PER_USER_RATE", default=0.0,
                        help="requests/s each user aims at (0 = closed loop, no wait); rate_sweep.py sets users")


class _Workload:
    """Per-process state: the prompt sequence, the request budget, the records file."""

    def __init__(self, opts):
        if not opts.workload or not Path(opts.workload).is_file():
            raise SystemExit(f"--workload {opts.workload!r}: give the prompts JSONL (NORMSWAP_WORKLOAD)")
        items = [json.loads(line) for line in Path(opts.workload).read_text().splitlines() if line.strip()]
        if not items:
            raise SystemExit(f"--workload {opts.workload}: no prompts")
        order = list(range(len(items)))
        random.Random(opts.workload_seed).shuffle(order)
        self.items, self.next = items, itertools.cycle(order)
        self.remaining = opts.max_requests or None
        self.records = None
        if opts.records_dir:
            Path(opts.records_dir).mkdir(parents=True, exist_ok=True)
            # host + pid: containerised workers all run as pid 1 and may share the records volume
            self.records = open(Path(opts.records_dir) / f"records-{socket.gethostname()}-{os.getpid()}.jsonl", "a",
                                buffering=1)

    def take(self):
        if self.remaining is not None:
            if self.remaining <= 0:
                return None
            self.remaining -= 1
        return self.items[next(self.next)]

    def write(self, record: dict):
        if self.records:
            self.records.write(json.dumps(record) + "\n")


_STATE: _Workload | None = None


@events.test_start.add_listener
def _on_start(environment, **kw):
    global _STATE
    if environment.parsed_options is None or isinstance(environment.runner, MasterRunner):
        return  # the master sends no requests (workers are WorkerRunner, a single process LocalRunner)
    _STATE = _Workload(environment.parsed_options)
    _STATE.write({"event": "test_start", "t": time.time()})


def _fire(env, kind, name, ms, length=0, exc=None):
    env.events.request.fire(request_type=kind, name=name, response_time=ms, response_length=length,
                            exception=exc, context={})


class CompletionsUser(User):
    """One simulated client. Closed loop by default; with --per-user-rate, paced at that many requests/s."""

    def __init__(self, environment):
        super().__init__(environment)
        opts = environment.parsed_options
        rate = getattr(opts, "per_user_rate", 0.0) if opts is not None else 0.0
        # locust's own wait-time helpers: constant_throughput waits the rest of each 1/rate period
        self._wait = constant_throughput(rate) if rate else constant(0)

    def wait_time(self):
        return self._wait(self)

    def on_start(self):
        self.session = requests.Session()
        opts = self.environment.parsed_options
        if getattr(opts, "api_key", ""):
            self.session.headers["Authorization"] = f"Bearer {opts.api_key}"
        self.model = opts.model_name or self.session.get(f"{self.host}/v1/models", timeout=30).json()["data"][0]["id"]

    @task
    def completion(self):
        item = _STATE.take() if _STATE else None
        if item is None:
            runner = self.environment.runner
            if isinstance(runner, LocalRunner) and not getattr(runner, "_normswap_quitting", False):
                # quit once the CSV writer has written the final numbers (it writes every CSV_STATS_INTERVAL_SEC
                # and not at exit), so --csv files hold the whole run
                runner._normswap_quitting = True
                gevent.spawn_later(CSV_STATS_INTERVAL_SEC + 1.0, runner.quit)
            raise StopUser()
        self._t0 = time.time()
        payload = {"model": self.model, "prompt": item["prompt"], "max_tokens": item["max_tokens"],
                   "ignore_eos": True, "temperature": 0.0, "stream": True,
                   "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        rec = {"t_start": self._t0, "max_tokens": item["max_tokens"], "ok": False}
        start = time.perf_counter()
        try:
            rec.update(self._stream(payload, start))
        except Exception as e:  # recorded, counted as a failure by locust; the run goes on
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
            _fire(self.environment, "E2E", "completions", (time.perf_counter() - start) * 1e3, 0, e)
        _STATE.write(rec)

    def _stream(self, payload, start) -> dict:
        times, tokens, ttft, done = [], 0, None, 0
        with self.session.post(f"{self.host}/v1/completions", json=payload, stream=True, timeout=600) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or {}
                n = usage.get("completion_tokens")
                if n is None or n <= done:  # a usage-only chunk, or one without new tokens
                    continue
                if ttft is None:
                    ttft = now - start
                else:  # n - done tokens arrived together: each gets an equal share of the gap
                    times += [(now - times_last) / (n - done)] * (n - done)
                times_last, done = now, n
                tokens = n
        e2e = time.perf_counter() - start
        if ttft is None:
            raise RuntimeError("stream ended without a token")
        tpot = (e2e - ttft) / (tokens - 1) if tokens > 1 else 0.0
        env = self.environment
        _fire(env, "TTFT", "completions", ttft * 1e3)
        _fire(env, "TPOT", "completions", tpot * 1e3)
        for itl in times:
            _fire(env, "ITL", "per-token", itl * 1e3)
        _fire(env, "E2E", "completions", e2e * 1e3, tokens)
        return {"ok": True, "ttft": ttft, "itl": times, "tpot": tpot, "e2e": e2e, "output_tokens": tokens}
