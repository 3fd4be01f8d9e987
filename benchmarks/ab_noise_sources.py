"""Where the A/B's round-to-round throughput spread comes from, and whether moving processes off vLLM's worker
core removes it. One bf16 server of the zoo (the A/B's server command line, observer on), the A/B's own
workload and locust rounds (ab/loadgen.py), and per condition N rounds interleaved with the others:

- ``os``: as `normswap ab` runs today, the scheduler places every process;
- ``locust-spare``: locust bound to the cores vLLM's CPU worker is not bound to;
- ``all-spare``: locust and every thread of the server that vLLM did not bind (API server, EngineCore) there.

Per condition: mean tok/s, the sd of log tok/s over rounds (what the A/B's CIs are made of), and tok/s per second
of load inside the rounds (quantiles: two levels show as a wide gap between p10 and p90). Per process: cores used
during the rounds (CPU seconds ÷ wall). Prints one JSON object and writes benchmarks/results/ab_noise_sources_KIND.json.

    python benchmarks/ab_noise_sources.py                 # 10 rounds of 5 s per condition, ~6 min
    python benchmarks/ab_noise_sources.py --rounds 3 --conditions os,all-spare --result -
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import requests
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import cpu_info, kind_slug  # noqa: E402

from vllm_normswap.ab import loadgen, loadstats  # noqa: E402
from vllm_normswap.ab.servers import ServerRun, ServerSpec, free_port, wait_quiet  # noqa: E402
from vllm_normswap.ab.workload import build_workload  # noqa: E402
from vllm_normswap.checkpoints.zoo import option_dir  # noqa: E402
from vllm_normswap.runtime.placement import worker_and_spare  # noqa: E402

CONDITIONS = ("os", "locust-spare", "all-spare")


def tids(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def cpu_s(pid: int) -> float:
    return sum(psutil.Process(pid).cpu_times()[:2])


def role(proc: psutil.Process) -> str:
    """vLLM names its engine processes; the server's own process is the API server; the rest (multiprocessing's
    resource tracker) is "other"."""
    name = proc.name()
    return "worker" if "Worker" in name else "EngineCore" if "EngineCore" in name else "other"


def steady_tok_s(records: list[dict]) -> tuple[float, list[int]]:
    """The A/B's throughput of a round (ab/loadstats.round_measures), and the tokens of each whole second of its
    steady span."""
    span = loadstats.steady_span(records)
    t = np.concatenate([loadstats.token_times(r) for r in records if r.get("ok")])
    per_s = [int(((t >= a) & (t < a + 1)).sum()) for a in np.arange(span[0], span[1] - 1, 1.0)]
    return loadstats.round_measures(records)["throughput"], per_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="rounds per condition (interleaved)")
    p.add_argument("--round-seconds", type=int, default=5, help="as `normswap ab`'s default (30 s over 6 rounds)")
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--option", default="rms-gelu")
    p.add_argument("--work", default="runs/ab-noise-sources")
    p.add_argument("--result", default="", help="result file (default benchmarks/results/ab_noise_sources_KIND.json; "
                                                "'-' = none)")
    args = p.parse_args()
    conditions = args.conditions.split(",")
    if set(conditions) - set(CONDITIONS):
        raise SystemExit(f"--conditions: choose from {', '.join(CONDITIONS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = build_workload(n_prompts=64, max_tokens=16, seed=0).save_prompts(work / "prompts.jsonl")  # ab's defaults
    run = ServerRun(ServerSpec(args.option, str(option_dir(args.option)), "bf16"), free_port(), work)
    url = run.start().wait()
    try:
        model = requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        procs = [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]
        api = procs[0].pid
        allowed = os.sched_getaffinity(0)
        affinity = {(pr.pid, t): os.sched_getaffinity(t) for pr in procs for t in tids(pr.pid)}
        worker, spare = map(set, worker_and_spare([run.pid]))  # the cores the A/B's locust placement reads
        if not worker or not spare:
            raise SystemExit(f"worker cores {sorted(worker)}, spare {sorted(spare)}: nothing to compare here")

        def place(unbound_to: set[int]) -> None:
            for (_, t), a in affinity.items():
                if a == allowed:
                    try:
                        os.sched_setaffinity(t, unbound_to)
                    except OSError:
                        pass

        loadgen.run_locust(url, prompts, work / "warm", users=4, run_time_s=10, model=model)  # not measured
        tok, per_second = {c: [] for c in conditions}, {c: [] for c in conditions}
        busy = {c: {} for c in conditions}
        walls = {c: 0.0 for c in conditions}
        bar = tqdm(total=args.rounds * len(conditions), desc="rounds", unit="round")
        for i in range(args.rounds):
            for c in conditions:
                place(spare if c == "all-spare" else allowed)
                os.sched_setaffinity(0, allowed if c == "os" else spare)  # locust inherits this process's cores
                wait_quiet([run.pid])
                before = {pr.pid: cpu_s(pr.pid) for pr in procs}
                r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
                d = work / c / f"round{i}"
                loadgen.run_locust(url, prompts, d, users=4, run_time_s=args.round_seconds, model=model, seed=i)
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                walls[c] += time.monotonic() - t0
                for pr in procs:
                    k = "API server" if pr.pid == api else role(pr)
                    busy[c][k] = busy[c].get(k, 0.0) + cpu_s(pr.pid) - before[pr.pid]
                busy[c]["locust"] = busy[c].get("locust", 0.0) + r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
                rate, secs = steady_tok_s(loadgen.read_records(d / "records")[0])
                tok[c].append(rate)
                per_second[c] += secs
                bar.update(1)
        bar.close()
        os.sched_setaffinity(0, allowed)
    finally:
        run.stop()
    summary = {c: {"tok_s_mean": round(statistics.mean(tok[c]), 1),
                   "sd_log_tok_s": round(statistics.stdev(np.log(tok[c])), 3),
                   "per_second_p10_p50_p90": [int(np.percentile(per_second[c], q)) for q in (10, 50, 90)],
                   "cores_used": {k: round(v / walls[c], 2) for k, v in busy[c].items()},
                   "tok_s": [round(x, 1) for x in tok[c]]} for c in conditions}
    cpu = cpu_info()
    table = {"title": "Round-to-round throughput spread of one bf16 zoo server, by process placement",
             "benchmark": "benchmarks/ab_noise_sources.py " + " ".join(sys.argv[1:]),
             "machine": f"{cpu['model']}, {cpu['cores']} cores", "date": time.strftime("%Y-%m-%d"),
             "cpu_flags": cpu["kind"] + " (" + " ".join(cpu["flags"]) + ")",
             "notes": (f"{args.option} bf16, {args.rounds} rounds of {args.round_seconds} s per condition, interleaved; "
                       f"worker bound to cores {sorted(worker)}, spare {sorted(spare)}. tok/s as the A/B computes it "
                       f"(steady span). Cores used: CPU seconds over the rounds' wall time, per process."),
             "columns": ["placement", "tok/s mean", "sd of log tok/s per round", "tok/s per second p10 / p50 / p90",
                         "cores used: worker / EngineCore / API server / locust"],
             "rows": [[c, s["tok_s_mean"], s["sd_log_tok_s"], " / ".join(map(str, s["per_second_p10_p50_p90"])),
                       " / ".join(str(s["cores_used"].get(k, "–")) for k in ("worker", "EngineCore",
                                                                               "API server", "locust"))]
                      for c, s in summary.items()],
             "summary": summary, "cpu": cpu}
    result = args.result or str(HERE / "results" / f"ab_noise_sources_{kind_slug(cpu)}.json")
    if result != "-":
        Path(result).write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps({"result_file": None if result == "-" else result, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
