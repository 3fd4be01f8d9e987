"""Warm a server up before anything is measured on it, and record how long that took.

A cold vLLM server compiles or specialises kernels on the first call of each shape (the Numba kernel of
the observer, oneDNN primitives, torch.compile graphs when compiled). The load test runs at ``users`` concurrent
requests, so every decode batch size from 1 to ``users`` and the prefill path must have run before the clock
starts. Then the same concurrency is driven in rounds until the per-step latency settles: the median end-to-end
time per output token of a round is within ``tolerance`` of the round before. None of this traffic enters any statistic: the A/B
scrapes /metrics and starts locust after the warm-up.
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from vllm_normswap.ab import auth


def stream_step_time(url: str, model: str, prompt: str, max_tokens: int) -> float | None:
    """One streamed completion; its end-to-end time per output token (s). End to end, not between chunks: under
    load the server may send several tokens in one chunk, which makes chunk gaps read zero."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
               "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    start, n = time.perf_counter(), 0
    with requests.post(f"{url}/v1/completions", json=payload, headers=auth.headers(url), stream=True,
                       timeout=600) as r:
        auth.check(r, url)
        if r.status_code != 200:
            raise RuntimeError(f"warm-up request answered {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                n = max(n, (json.loads(line[6:]).get("usage") or {}).get("completion_tokens") or 0)
    return (time.perf_counter() - start) / n if n else None


def _concurrent(url, model, prompts, n, max_tokens) -> list[float]:
    with ThreadPoolExecutor(n) as pool:
        steps = pool.map(lambda i: stream_step_time(url, model, prompts[i % len(prompts)], max_tokens), range(n))
        return [s for s in steps if s is not None]


def warm_up(url: str, model: str, prompts: list[str], users: int, max_tokens: int, tolerance: float = 0.1,
            min_rounds: int = 3, max_seconds: float = 180.0) -> dict:
    """Prefill, each batch size 1..users, then rounds at ``users`` until the median step time settles."""
    t0 = time.monotonic()
    for prompt in sorted(prompts, key=len)[-users:]:  # prefill alone, with the longest load-test prompts
        stream_step_time(url, model, prompt, 2)
    for batch in range(1, users + 1):
        _concurrent(url, model, prompts, batch, max_tokens)
    medians: list[float] = []
    settled = False
    while time.monotonic() - t0 < max_seconds:
        # two requests per user: a round long enough that its median is not one request's
        steps = _concurrent(url, model, prompts, 2 * users, max_tokens)
        medians.append(statistics.median(steps) if steps else 0.0)
        if len(medians) >= min_rounds and abs(medians[-1] - medians[-2]) <= tolerance * medians[-2]:
            settled = True
            break
    return {"seconds": time.monotonic() - t0, "rounds": len(medians), "settled": settled,
            "median_step_ms": [round(m * 1e3, 3) for m in medians], "batch_sizes": list(range(1, users + 1)),
            "tolerance": tolerance}
