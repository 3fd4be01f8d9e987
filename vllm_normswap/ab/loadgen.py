"""Run locust headless against a server and aggregate its per-request records.

Latency summaries: p50/p90/p99 of TTFT, ITL (per token), TPOT and end-to-end latency; output tokens/s and
requests/s over the run's wall time; goodput = requests/s that met the SLOs, with the definitions of
`vllm bench serve --goodput ttft:MS tpot:MS` (a request is good when TTFT <= ttft_ms and TPOT <= tpot_ms, where
TPOT = (end-to-end - TTFT) / (output tokens - 1), and 0 for a one-token output) and the fraction that met them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

from vllm_normswap.ab import auth

LOAD_TESTS = Path(str(resources.files("vllm_normswap.load_tests")))  # package data: works from a wheel
LOCUSTFILE = LOAD_TESTS / "locustfile.py"
RATE_SWEEP = LOAD_TESTS / "rate_sweep.py"


def run_locust(url: str, workload_path, out_dir, users: int = 2, run_time_s: int = 30, max_requests: int = 0,
               model: str = "", seed: int = 0, rate_table=None, per_user_rate: float = 0.0,
               extra: list[str] | None = None, timeout: float | None = None,
               cpus: list[int] | None = None) -> subprocess.CompletedProcess:
    """One headless locust process (the load generator shares the box with the server: keep it light). ``cpus``:
    bind it to these cores, the ones vLLM's worker is not bound to (runtime/placement.py says why)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = str(LOCUSTFILE) + ("," + str(RATE_SWEEP) if rate_table else "")
    env = {**os.environ, "NORMSWAP_WORKLOAD": str(workload_path), "NORMSWAP_RECORDS": str(out_dir / "records"),
           "NORMSWAP_SEED": str(seed), "NORMSWAP_MAX_REQUESTS": str(max_requests), "NORMSWAP_MODEL": model,
           "NORMSWAP_PER_USER_RATE": str(per_user_rate)}
    # the key goes by environment, never argv: locust would show it in `ps` and log it with its options
    env.pop(auth.ALL, None)
    if auth.key(url):
        env[auth.ALL] = auth.key(url)
    if rate_table:
        (out_dir / "rate_table.json").write_text(json.dumps(rate_table))
        env["NORMSWAP_RATE_TABLE"] = str(out_dir / "rate_table.json")
        run_time_s = int(sum(d for d, _ in rate_table)) + 5
    argv = [sys.executable, "-m", "locust", "-f", files, "--headless", "-H", url, "--csv", str(out_dir / "locust"),
            "--json-file", str(out_dir / "locust"),
            "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "30", "-t", f"{run_time_s}s"]
    if not rate_table:
        argv += ["-u", str(users), "-r", str(users)]
    argv += list(extra or [])
    with open(out_dir / "locust.log", "w") as log:
        return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout or run_time_s + 120,
                              preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)


def read_records(records_dir) -> tuple[list[dict], float | None]:
    records, start = [], None
    for f in sorted(Path(records_dir).glob("records-*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r.get("event") == "test_start":
                start = r["t"] if start is None else min(start, r["t"])
            else:
                records.append(r)
    return records, start


def _pct(values) -> dict:
    if not len(values):
        return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    a = np.asarray(values, dtype=float) * 1e3  # milliseconds
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


def summarize(records: list[dict], slo_ttft_ms: float = 1000.0, slo_tpot_ms: float = 200.0) -> dict:
    ok = [r for r in records if r.get("ok")]
    errors = len(records) - len(ok)
    if ok:
        t0 = min(r["t_start"] for r in ok)
        t1 = max(r["t_start"] + r["e2e"] for r in ok)
        wall = max(t1 - t0, 1e-9)
    else:
        wall = None
    good = [r for r in ok if r["ttft"] * 1e3 <= slo_ttft_ms and r["tpot"] * 1e3 <= slo_tpot_ms]
    out_tokens = sum(r["output_tokens"] for r in ok)
    return {
        "requests": len(records), "ok": len(ok), "errors": errors, "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / wall if wall else 0.0,
        "ttft_ms": _pct([r["ttft"] for r in ok]), "itl_ms": _pct([x for r in ok for x in r["itl"]]),
        "tpot_ms": _pct([r["tpot"] for r in ok]), "e2e_ms": _pct([r["e2e"] for r in ok]),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "goodput_rps": len(good) / wall if wall else 0.0, "slo_attainment": len(good) / len(ok) if ok else 0.0,
        "max_tokens_mismatch": sum(r["output_tokens"] != r["max_tokens"] for r in ok),
        "errors_sample": [r.get("error") for r in records if not r.get("ok")][:3],
    }


def summarize_sweep(records: list[dict], start: float, table, **slo) -> list[dict]:
    """One summary per stage of the rate table, by request start time."""
    out, t = [], start
    for duration, rate in table:
        stage = [r for r in records if t <= r["t_start"] < t + duration]
        out.append({"offered_rps": rate, "duration_s": duration, **summarize(stage, **slo)})
        t += duration
    return out


def to_csv(summary: dict, path) -> None:
    rows = ["metric,p50,p90,p99,mean,n"]
    for name in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        s = summary[name]
        rows.append(",".join([name] + ["" if s[k] is None else f"{s[k]:.3f}" for k in ("p50", "p90", "p99", "mean")]
                             + [str(s["n"])]))
    Path(path).write_text("\n".join(rows) + "\n")
