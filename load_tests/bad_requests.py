"""Bad requests as a data table, and the few functions that send them, shared by the soak scenario
(soak_locustfile.py) and tests/robustness/test_bad_requests.py.

Every row must get a 4xx from the server (and the server keeps serving); the disconnect case is sent by
``disconnect_mid_stream``: the client reads two chunks of a streaming completion and hangs up.
"""

from __future__ import annotations

import json

import requests

# The server under test runs with --max-model-len MAX_MODEL_LEN and --max-logprobs MAX_LOGPROBS.
MAX_MODEL_LEN = 256
MAX_LOGPROBS = 20
VOCAB = 512  # token ids 1..VOCAB-1 are valid for the tests' random checkpoints and the zoo (vocab >= 512)


def _body(model: str, **fields) -> dict:
    return {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": 4, **fields}


# name -> (body maker(model) -> dict | bytes, allowed statuses, what it probes)
BAD_REQUESTS = {
    "prompt_over_context": (lambda m: _body(m, prompt=[(i % (VOCAB - 1)) + 1 for i in range(MAX_MODEL_LEN + 40)]),
                            {400}, "prompt longer than --max-model-len"),
    "negative_max_tokens": (lambda m: _body(m, max_tokens=-5), {400}, "max_tokens < 0"),
    "huge_max_tokens": (lambda m: _body(m, max_tokens=10**9), {400}, "max_tokens far beyond the context"),
    "negative_logprobs": (lambda m: _body(m, logprobs=-1), {400}, "logprobs < 0"),
    "too_many_logprobs": (lambda m: _body(m, logprobs=MAX_LOGPROBS + 1), {400}, "logprobs > --max-logprobs"),
    "too_many_prompt_logprobs": (lambda m: _body(m, prompt_logprobs=MAX_LOGPROBS + 1), {400},
                                 "prompt_logprobs > --max-logprobs"),
    "malformed_json": (lambda m: b'{"model": "' + m.encode() + b'", "prompt": [1, 2', {400}, "truncated JSON"),
    "wrong_type": (lambda m: _body(m, prompt={"not": "a prompt"}), {400}, "prompt of the wrong type"),
    "wrong_model": (lambda m: _body("no-such-model"), {404}, "unknown model name"),
}


def headers(api_key: str | None) -> dict:
    h = {"Content-Type": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


def send_bad(session: requests.Session, url: str, name: str, model: str, api_key: str | None = None,
             timeout: float = 60) -> tuple[int, bool, str]:
    """Send one bad request; returns (status, status allowed, first 200 chars of the body)."""
    make, allowed, _ = BAD_REQUESTS[name]
    body = make(model)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = session.post(f"{url}/v1/completions", data=data, headers=headers(api_key), timeout=timeout)
    return r.status_code, r.status_code in allowed, r.text[:200]


def disconnect_mid_stream(url: str, model: str, api_key: str | None = None, timeout: float = 60) -> int:
    """Start a long streaming completion, read two SSE chunks, hang up; returns the chunks read (2 expected)."""
    body = _body(model, max_tokens=128, stream=True, ignore_eos=True)
    with requests.post(f"{url}/v1/completions", json=body, headers=headers(api_key), stream=True,
                       timeout=timeout) as r:
        r.raise_for_status()
        chunks = 0
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                chunks += 1
                if chunks == 2:
                    break
    return chunks  # leaving the block closes the socket mid-stream


def good_completion(session: requests.Session, url: str, model: str, prompt: list[int], max_tokens: int = 8,
                    api_key: str | None = None, timeout: float = 120) -> int:
    """One good greedy completion; returns generated tokens (raises on any failure, which counts as failed)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    r = session.post(f"{url}/v1/completions", json=body, headers=headers(api_key), timeout=timeout)
    r.raise_for_status()
    usage = r.json()["usage"]
    if usage["completion_tokens"] != max_tokens:
        raise RuntimeError(f"asked for {max_tokens} tokens, got {usage['completion_tokens']}")
    return usage["completion_tokens"]
