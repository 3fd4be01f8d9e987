"""Real locust against a real vLLM server (one tiny random checkpoint, shared by the module): headless fixed
concurrency, a rate sweep, and distributed mode with 1 master + 1 worker. Numbers are checked against the
server's own token counters (vllm:generation_tokens_total), which locust never sees, and our TTFT/TPOT medians and
goodput against `vllm bench serve` on the same server and workload."""

import json
import subprocess
import sys
import time

import pytest

from utils import VLLM_CLI, get_open_port, make_checkpoint
from vllm_normswap.ab import loadgen, metrics
from vllm_normswap.ab.servers import ServerRun, ServerSpec
from vllm_normswap.ab.workload import build_workload

pytestmark = pytest.mark.server
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("locust")
    ckpt = make_checkpoint(root / "ln-gelu", "ln-gelu")
    wl = build_workload(n_docs=1, n_prompts=12, prompt_chars=120, max_tokens=MAX_TOKENS, seed=3)
    prompts = wl.save_prompts(root / "prompts.jsonl")
    spec = ServerSpec("ln-gelu", str(ckpt), extra=["--enforce-eager"])
    with ServerRun(spec, get_open_port(), root / "logs") as url:
        yield url, prompts, root, ckpt


def _generated(url):
    return metrics.parse(metrics.scrape(url))["vllm"]["vllm:generation_tokens_total"]


def test_headless_fixed_concurrency(server):
    url, prompts, root, _ = server
    before = _generated(url)
    proc = loadgen.run_locust(url, prompts, root / "fixed", users=3, run_time_s=60, max_requests=9)
    assert proc.returncode == 0, (root / "fixed" / "locust.log").read_text()[-2000:]
    records, start = loadgen.read_records(root / "fixed" / "records")
    assert start is not None and len(records) == 9
    s = loadgen.summarize(records, slo_ttft_ms=1e9, slo_tpot_ms=1e9)
    assert s["ok"] == 9 and s["errors"] == 0 and s["max_tokens_mismatch"] == 0
    assert s["output_tokens"] == 9 * MAX_TOKENS
    time.sleep(1.5)
    assert _generated(url) - before == 9 * MAX_TOKENS  # the server generated exactly what locust counted
    for r in records:  # per-token ITL: one gap per token after the first; gaps + TTFT add up to e2e
        assert len(r["itl"]) == MAX_TOKENS - 1
        assert r["ttft"] + sum(r["itl"]) == pytest.approx(r["e2e"], abs=0.05)
        assert r["tpot"] == pytest.approx(sum(r["itl"]) / (MAX_TOKENS - 1), abs=0.05)
    assert s["goodput_rps"] == pytest.approx(s["requests_per_s"])  # infinite SLO: every request is good
    assert loadgen.summarize(records, slo_ttft_ms=0.0)["goodput_rps"] == 0
    # locust's own statistics carry the same request count for the custom request types
    stats = (root / "fixed" / "locust_stats.csv").read_text().splitlines()
    e2e = [line for line in stats if line.startswith("E2E,")]
    assert e2e and int(e2e[0].split(",")[2]) == 9
    itl = [line for line in stats if line.startswith("ITL,")]
    assert int(itl[0].split(",")[2]) == 9 * (MAX_TOKENS - 1)


def test_rate_sweep_shape(server):
    url, prompts, root, _ = server
    table = [(4, 1.0), (4, 2.0)]
    proc = loadgen.run_locust(url, prompts, root / "sweep", rate_table=table, per_user_rate=1.0)
    assert proc.returncode == 0, (root / "sweep" / "locust.log").read_text()[-2000:]
    records, start = loadgen.read_records(root / "sweep" / "records")
    stages = loadgen.summarize_sweep(records, start, table, slo_ttft_ms=1e9, slo_tpot_ms=1e9)
    assert [s["offered_rps"] for s in stages] == [1.0, 2.0]
    n1, n2 = stages[0]["requests"], stages[1]["requests"]
    assert 2 <= n1 <= 6 and n2 > n1  # ~4 then ~8 requests offered (paced users; tiny model keeps up)


def test_distributed_master_and_one_worker(server):
    url, prompts, root, _ = server
    d = root / "dist"
    d.mkdir()
    # a request budget the worker spends well before the time limit: its periodic stats reports (every 3 s) then
    # carry every event. At the limit, the master waits only 0.5 s for a worker's final report, and requests that
    # end after the quit message are never reported (a busy CI box lost 4 of 92 that way). 20 requests took 0.9 s
    # on the idle 2-core box; with one core's worth of CPU for the whole suite (scripts/cpu_share.sh 1) requests
    # took 1.1-1.4 s each, 13 in 8 s: 10 requests on 2 users in 20 s leave a margin of about 3x over that.
    budget, limit = 10, "20s"
    env = {"NORMSWAP_WORKLOAD": str(prompts), "NORMSWAP_RECORDS": str(d / "records"), "PATH": "/usr/bin:/bin",
           "NORMSWAP_MAX_REQUESTS": str(budget)}
    common = [sys.executable, "-m", "locust", "-f", str(loadgen.LOCUSTFILE)]
    master_port = get_open_port()
    master = subprocess.Popen(common + ["--master", "--headless", "--expect-workers", "1", "-u", "2", "-r", "2",
                                        "-t", limit, "-H", url, "--csv", str(d / "locust"), "--master-bind-port",
                                        str(master_port), "--only-summary"],
                              stdout=open(d / "master.log", "w"), stderr=subprocess.STDOUT, env=env)
    worker = subprocess.Popen(common + ["--worker", "--master-host", "127.0.0.1", "--master-port", str(master_port)],
                              stdout=open(d / "worker.log", "w"), stderr=subprocess.STDOUT, env=env)
    try:
        assert master.wait(timeout=90) == 0, (d / "master.log").read_text()[-2000:]
        worker.wait(timeout=30)
    finally:
        for p in (master, worker):
            if p.poll() is None:
                p.kill()
    records, _ = loadgen.read_records(d / "records")
    files = list((d / "records").glob("records-*.jsonl"))
    assert len(files) == 1 and str(master.pid) not in files[0].name  # only the worker sent requests
    done = [r for r in records if r.get("ok")]
    assert len(done) == len(records) == budget, f"{len(done)} ok of {len(records)} requests, budget {budget}"
    stats = (d / "locust_stats.csv").read_text().splitlines()
    e2e = [line for line in stats if line.startswith("E2E,")]
    # the master aggregated the worker's custom events
    assert int(e2e[0].split(",")[2]) == len(done)
    json.dumps(loadgen.summarize(records))


# Both clients time the same server, ours before and after bench serve (so drift hits both), on the same two cores
# as the server: a client's scheduling delays of ~10 ms were seen (TTFT medians 35 against 23 ms in one run, within
# 11% in two others; TPOT ~5 ms within 22%). A definition mistake (seconds vs ms, TTFT inside TPOT, per-request vs
# per-token) moves a median by a factor. Bench serve's medians are the reference.
MEDIAN_RTOL, MEDIAN_ATOL_MS = 0.5, 2.0
# Tokens per request in this comparison: with the module's 6 (about 20 ms of decode on this tiny model) a stall of
# the server's API process or of a client longer than the decode delivered whole requests in one burst: TPOT
# medians of 0.03 ms in two CI runs (2026-12-07 and stop 39's), from both clients (bench serve's once 0.00), in all
# three attempts of one run. With 32 (100+ ms of decode) a stall shorter than the decode only shifts time between a
# request's gaps, and TPOT, their mean, keeps its value. A longer one still swallows requests: with a busy loop on one
# of the two cores, both clients' TPOT medians fell to 0.01-1.2 ms (they then agree within the 2 ms bound).
VS_TOKENS = 32
# Noise on a 2-core box (the client's scheduling, the other pytest worker's idle servers) now and then moves one
# median past the bound (49 against 27 ms once); a definition mistake moves it in every attempt. So the medians
# get up to ATTEMPTS tries, each ours / bench serve / ours, and one that agrees passes. (Three attempts all missed in
# one CI run of 2026-12-07, within 45 s: whatever starved the clients lasted that long; five span about 75 s.)
ATTEMPTS = 5


def _ours(url, prompts, out, n, users) -> list[dict]:
    proc = loadgen.run_locust(url, prompts, out, users=users, run_time_s=120, max_requests=n)
    assert proc.returncode == 0, (out / "locust.log").read_text()[-2000:]
    records, _ = loadgen.read_records(out / "records")
    assert len(records) == n and all(r.get("ok") for r in records)
    return records


def _bench_serve(url, prompts, ckpt, out, n, users, slos, tokens) -> dict:
    cmd = [sys.executable, str(VLLM_CLI), "bench", "serve", "--backend", "vllm",
           "--base-url", url, "--model", "ln-gelu", "--tokenizer", str(ckpt), "--dataset-name", "custom",
           "--dataset-path", str(prompts), "--custom-output-len", str(tokens), "--skip-chat-template",
           "--num-prompts", str(n), "--max-concurrency", str(users), "--request-rate", "inf", "--ignore-eos",
           "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50",
           "--save-result", "--save-detailed", "--result-dir", str(out), "--result-filename", "bench.json",
           "--goodput", f"ttft:{slos['slo_ttft_ms']}", f"tpot:{slos['slo_tpot_ms']}", "--disable-tqdm"]
    bench_proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert bench_proc.returncode == 0, bench_proc.stdout[-2000:] + bench_proc.stderr[-3000:]
    bench = json.loads((out / "bench.json").read_text())
    assert bench["completed"] == n and bench["total_output_tokens"] == n * tokens
    return bench


@pytest.mark.exclusive  # medians of two clients timed one after the other
def test_medians_and_goodput_agree_with_vllm_bench_serve(server):
    url, _, root, ckpt = server
    n, users = 48, 4
    wl = build_workload(n_docs=1, n_prompts=12, prompt_chars=120, max_tokens=VS_TOKENS, seed=3)
    prompts = wl.save_prompts(root / "prompts-vs-bench.jsonl")
    misses = []
    for attempt in range(ATTEMPTS):
        out = root / f"vs-bench-{attempt + 1}"
        records = _ours(url, prompts, out / "ours-1", n // 2, users)
        first = loadgen.summarize(records)
        slos = {"slo_ttft_ms": first["ttft_ms"]["p50"], "slo_tpot_ms": first["tpot_ms"]["p50"]}
        bench = _bench_serve(url, prompts, ckpt, out / "bench", n, users, slos, VS_TOKENS)
        records += _ours(url, prompts, out / "ours-2", n // 2, users)
        ours = loadgen.summarize(records)
        medians = {key: (ours[key]["p50"], bench[f"median_{key}"]) for key in ("ttft_ms", "tpot_ms")}
        print(f"attempt {attempt + 1}: " + ", ".join(
            f"{key} p50 ours {got:.2f}, vllm bench serve {want:.2f}" for key, (got, want) in medians.items()))
        off = {key: (got, want) for key, (got, want) in medians.items()
               if abs(got - want) > max(MEDIAN_RTOL * want, MEDIAN_ATOL_MS)}
        if not off:
            break
        misses.append(off)
    else:
        pytest.fail(f"our medians and vllm bench serve's (ms) disagree in all {ATTEMPTS} attempts: {misses}")

    # goodput: vLLM's own count (--goodput at our first medians, so that part of the requests are good) and ours on
    # the same requests, which bench serve's per-request times give us; TPOT as the locustfile computes it
    same = [{"ok": True, "ttft": t, "e2e": e2e, "output_tokens": k, "max_tokens": VS_TOKENS,
             "tpot": (e2e - t) / (k - 1) if k > 1 else 0.0, "t_start": t0, "itl": itl}
            for t, e2e, k, t0, itl in zip(bench["ttfts"], bench["latencies"], bench["output_lens"],
                                          bench["start_times"], bench["itls"])]
    mine = loadgen.summarize(same, **slos)
    theirs = bench["request_goodput"] / bench["request_throughput"]
    print(f"SLO attainment at TTFT {slos['slo_ttft_ms']:.1f} ms, TPOT {slos['slo_tpot_ms']:.1f} ms: "
          f"ours {mine['slo_attainment']:.3f}, vllm bench serve {theirs:.3f}")
    assert mine["slo_attainment"] == pytest.approx(theirs, abs=1e-9)
