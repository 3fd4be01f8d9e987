"""Soak driver: one option's server, the mixed good/bad locust scenario for N minutes, and a sampler of server
memory and /metrics; prints a JSON summary (and writes it to OUT/summary.json).

    python -m vllm_normswap.load_tests.soak --option ln-gelu --minutes 10 --users 4 --out soak-out/ [--model DIR] [-- vLLM flags]

Pass criteria (issue: reliability), reported as "pass" with each figure:
- failed_good_requests == 0 (locust types good / good-stream), bad requests all got their expected 4xx;
- rss_growth_pct < 5: resident memory of the server's whole process tree (API server, EngineCore, workers;
  psutil RSS summed), median of the last 3 samples vs median of the first 3 after warm-up;
- counters_monotonic: no counter or histogram bucket on /metrics ever decreased (metrics_watch.py);
- /metrics latency stable: p50/p99 per minute, and the last minute's p99 < 3x the first minute's (or < 0.1 s).
Slow (minutes) and never run in CI; each start of vLLM should hold the machine's vLLM lock (flock) where shared.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from vllm_normswap.registry import BASELINE, OPTIONS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bad_requests  # noqa: E402
import metrics_watch  # noqa: E402


def tree_rss(pid: int) -> int:
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def locust_rows(csv_prefix: Path) -> dict[str, dict]:
    path = Path(f"{csv_prefix}_stats.csv")
    rows = {}
    for row in csv.DictReader(path.open()):
        if row["Name"] != "Aggregated":
            rows[row["Name"]] = {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                                 "p50_ms": float(row["50%"] or 0), "p99_ms": float(row["99%"] or 0)}
    return rows


def summarize(rows, samples, watcher, warmup_s, health_failures, server_exit) -> dict:
    good = {k: v for k, v in rows.items() if k.startswith("good")}
    badr = {k: v for k, v in rows.items() if k.startswith("bad:")}
    after = [s for s in samples if s["t"] >= warmup_s]
    base = statistics.median(s["rss"] for s in after[:3]) if len(after) >= 3 else float("nan")
    last = statistics.median(s["rss"] for s in after[-3:]) if len(after) >= 3 else float("nan")
    growth = 100.0 * (last - base) / base
    per_minute = {}
    for t, seconds in watcher.latencies:
        per_minute.setdefault(int(t // 60), []).append(seconds)
    lat = {m: {"p50_ms": round(1e3 * percentile(v, 0.5), 1), "p99_ms": round(1e3 * percentile(v, 0.99), 1),
               "n": len(v)} for m, v in sorted(per_minute.items())}
    first, final = lat[min(lat)]["p99_ms"], lat[max(lat)]["p99_ms"]
    stable = final < max(3 * first, 100.0)
    out = {
        "good_requests": sum(v["requests"] for v in good.values()),
        "failed_good_requests": sum(v["failures"] for v in good.values()),
        "bad_requests": sum(v["requests"] for v in badr.values()),
        "bad_requests_unexpected_outcome": sum(v["failures"] for v in badr.values()),
        "by_type": rows,
        "rss_mb_after_warmup": round(base / 2**20, 1), "rss_mb_end": round(last / 2**20, 1),
        "rss_growth_pct": round(growth, 2),
        "rss_mb_samples": [(round(s["t"]), round(s["rss"] / 2**20, 1)) for s in samples],
        "counters_monotonic": not watcher.violations, "counter_violations": watcher.violations[:10],
        "metrics_scrapes": len(watcher.latencies), "metrics_scrape_errors": watcher.errors[:5],
        "metrics_latency_per_minute": lat, "metrics_latency_stable": stable,
        "outlier_counter_total_end": watcher.outlier_total(),
        "health_failures": health_failures, "server_exit_during_soak": server_exit,
    }
    out["pass"] = (out["failed_good_requests"] == 0 and out["bad_requests_unexpected_outcome"] == 0
                   and growth < 5.0 and out["counters_monotonic"] and stable and not health_failures
                   and server_exit is None and out["good_requests"] > 0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--option", default=BASELINE, choices=list(OPTIONS))
    p.add_argument("--model", help="checkpoint dir (default: the option's embedded zoo model)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, default=2.0, help="memory growth is measured after this")
    p.add_argument("--users", type=int, default=4, help="locust users (3:1 good:bad)")
    p.add_argument("--sample-s", type=float, default=10.0, help="memory / health sampling period")
    p.add_argument("--metrics-s", type=float, default=2.0, help="/metrics scrape period")
    p.add_argument("--port", type=int, default=8650)
    p.add_argument("--out", default="soak-out")
    args, vllm_extra = p.parse_known_args(argv)
    vllm_extra = [a for a in vllm_extra if a != "--"]

    from vllm_normswap.serve import default_model, server_argv
    from vllm_normswap.runtime.server import VLLMServer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or default_model(args.option)
    argv = server_argv(args.option, model, args.port, extra=["--max-model-len", str(bad_requests.MAX_MODEL_LEN),
                                                              "--max-logprobs", str(bad_requests.MAX_LOGPROBS),
                                                              *vllm_extra])
    with VLLMServer(argv, out / "server.log") as server:
        watcher = metrics_watch.MetricsWatcher(server.url, interval=args.metrics_s)
        watcher.start()
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(HERE / "soak_locustfile.py"), "--headless",
             "-u", str(args.users), "-r", str(args.users), "-t", f"{int(args.minutes * 60)}s", "-H", server.url,
             "--model-name", server_model_name(server.url), "--csv", str(out / "soak"), "--only-summary",
             "--stop-timeout", "60"], stdout=open(out / "locust.log", "wb"), stderr=subprocess.STDOUT)
        t0, samples, health_failures, server_exit = time.monotonic(), [], [], None
        while locust.poll() is None:
            t = time.monotonic() - t0
            if server.proc.poll() is not None:
                server_exit = server.proc.returncode
                locust.terminate()
                break
            samples.append({"t": t, "rss": tree_rss(server.proc.pid)})
            try:
                if requests.get(f"{server.url}/health", timeout=10).status_code != 200:
                    health_failures.append(round(t))
            except requests.RequestException:
                health_failures.append(round(t))
            time.sleep(args.sample_s)
        locust.wait()
        watcher.stop()
    summary = summarize(locust_rows(out / "soak"), samples, watcher, args.warmup_minutes * 60, health_failures,
                        server_exit)
    summary.update(option=args.option, model=str(model), minutes=args.minutes, users=args.users)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rss_mb_samples"}, indent=2))
    return 0 if summary["pass"] else 1


def server_model_name(url: str) -> str:
    return requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


if __name__ == "__main__":
    sys.exit(main())
