"""`normswap ab`: every option x {bf16, int8} through a real vLLM server, the mean-shift probe, and the report.

Per server: start, wait for /health, scrape /metrics, quality eval (prompt logprobs of the held-out documents),
scrape again (the observer's counts for exactly those tokens, identical across options), locust load test,
scrape, stop; the server log is kept. A server or eval that fails is recorded in results.json and the run goes on.
Servers start in groups (--parallel-starts, 2 on CPU): start-up overlaps, measurement never does.
Probe: for each option, bf16 servers with probe_shift = c for each c of --probe-shifts (c = 0 is the plain bf16
run), scoring the same documents: token means at norm_in/norm_out and act_out outliers as c grows.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from vllm_normswap.ab import loadgen, metrics, quality
from vllm_normswap.ab.servers import ServerRun, ServerSpec
from vllm_normswap.ab.workload import build_workload
from vllm_normswap.registry import OPTIONS


def add_arguments(p) -> None:
    p.add_argument("--option", action="append", default=[], metavar="ID=PATH",
                   help="an option's checkpoint (repeatable); default: the four embedded zoo models")
    p.add_argument("--options", default=",".join(OPTIONS), help="which option ids to run (comma list)")
    p.add_argument("--precisions", default="bf16,int8", help="comma list of bf16, int8")
    p.add_argument("--url", help="measure this running server instead of starting any (no int8 pair, no probe)")
    p.add_argument("--probe-shifts", default="8", help="probe servers: constants c > 0, one server start each "
                   "per option ('' = none); the fine curve comes from the reference model (--probe-grid)")
    p.add_argument("--probe-grid", default="0,1,2,4,8,16", help="c values of the reference-model probe curve")
    p.add_argument("--probe-layers", default="", help="layers the probe shifts (comma list; default all)")
    p.add_argument("--docs", type=int, default=16, help="held-out documents for the quality eval")
    p.add_argument("--doc-tokens", type=int, default=256, help="tokens scored per document (incl. prefix)")
    p.add_argument("--top-k", type=int, default=20, help="top-k logprobs per position (server cap: max-logprobs)")
    p.add_argument("--prompts", type=int, default=32, help="load-test prompts in the workload")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per load-test request")
    p.add_argument("--users", type=int, default=4, help="load-test concurrency")
    p.add_argument("--requests", type=int, default=24, help="load-test requests per server")
    p.add_argument("--load-seconds", type=int, default=40, help="load-test time limit per server")
    p.add_argument("--rate-sweep", default="", help="also run a rate sweep: 'dur:rate,dur:rate' (e.g. 10:1,10:4)")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-itl-ms", type=float, default=200.0)
    p.add_argument("--corpus", help="held-out text source (default: the zoo corpus's held-out split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--compiled", action="store_true",
                   help="let vLLM compile (default: --enforce-eager, ~50 s less per server start on CPU)")
    p.add_argument("--port", type=int, default=8200, help="first port; servers started together use the next ones")
    p.add_argument("--parallel-starts", type=int, default=0,
                   help="servers started together, then measured one at a time (default: 2 on CPU with >= 12 GB "
                        "free memory, 1 with a GPU, where each server claims most of its memory)")
    p.add_argument("--out", default="runs", help="parent directory of runs/<timestamp>/")
    p.epilog = "Further vLLM server flags go after --, e.g.  -- --device cuda --gpu-memory-utilization 0.5"


def _checkpoints(args) -> dict[str, str]:
    chosen = [o.strip() for o in args.options.split(",") if o.strip()]
    given = {}
    for item in args.option:
        if "=" not in item:
            raise SystemExit(f"--option {item!r}: expected ID=PATH, e.g. --option rms-gelu=./my-ckpt")
        oid, path = item.split("=", 1)
        if oid not in OPTIONS:
            raise SystemExit(f"--option {oid}=...: unknown option id; choose from {', '.join(OPTIONS)}")
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"--option {oid}={path}: no config.json there (a checkpoint directory is needed)")
        given[oid] = path
    if given:
        return given
    from vllm_normswap.checkpoints import zoo

    find = getattr(zoo, "zoo_path", None) or zoo.option_dir
    paths = {o: Path(find(o)) for o in chosen}
    missing = [o for o, p in paths.items() if not (p / "config.json").is_file()]
    if missing:
        raise SystemExit(f"the embedded zoo has no checkpoint for {', '.join(missing)} (looked in "
                         f"{paths[missing[0]].parent}); run `normswap zoo build` or pass --option ID=PATH")
    return {o: str(p) for o, p in paths.items()}


def default_parallel_starts() -> int:
    import psutil
    import torch

    if torch.cuda.is_available():
        return 1
    return 2 if psutil.virtual_memory().available >= 12 * 2**30 else 1


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


class Runner:
    def __init__(self, args, run_dir: Path):
        self.args, self.dir = args, run_dir
        self.workload = build_workload(n_docs=args.docs, doc_chars=args.doc_tokens * 8, n_prompts=args.prompts,
                                       max_tokens=args.max_tokens, seed=args.seed, corpus=args.corpus)
        self.prompts_path = self.workload.save_prompts(run_dir / "workload" / "prompts.jsonl")
        self.doc_ids: list[list[int]] | None = None  # tokenized once, by the first server (shared tokenizer)
        self.scored: dict[str, list] = {}  # run name -> scored documents (kept in memory for comparisons)
        self.port = args.port
        self.extra = ([] if args.compiled else ["--enforce-eager"]) + (
            ["--tensor-parallel-size", str(args.tensor_parallel_size)] if args.tensor_parallel_size > 1 else []) \
            + list(getattr(args, "passthrough", []) or [])

    def documents(self, url: str, model: str) -> list[list[int]]:
        info = quality.model_info(url)
        window = min(self.args.doc_tokens, int(info.get("max_model_len") or self.args.doc_tokens) - 1)
        eos = _eos_id(url, model)
        docs = quality.prepare_documents(url, model, self.workload.documents, window, eos)
        if self.doc_ids is not None and docs != self.doc_ids:
            raise RuntimeError("this checkpoint tokenizes the documents differently from the first one: "
                               "ΔPPL/KL compare only models with the same tokenizer")
        self.doc_ids = self.doc_ids or docs
        return docs

    def measure(self, url: str, name: str, load: bool, noise: bool) -> dict:
        """Everything one server is asked; failures of a step are recorded, later steps still run."""
        out: dict = {}
        model = quality.model_info(url)["id"]
        out["served_model"] = model
        m0 = metrics.settled_scrape(url, tries=2)
        try:
            docs = self.documents(url, model)
            self.scored[name] = quality.score(url, model, docs, self.args.top_k)
            out["quality"] = quality.summarize(self.scored[name], n_boot=200)
            if noise:  # bf16 vs itself: same documents, one per request in reverse order (other batch shapes)
                self.scored[name + "#repeat"] = quality.score(url, model, docs, self.args.top_k, batch=1,
                                                              order=list(range(len(docs)))[::-1])
        except Exception as e:
            out["quality_error"] = f"{type(e).__name__}: {e}"
        m1 = metrics.settled_scrape(url)
        out["observer"] = metrics.diff(m1, m0)
        out["observer_present"] = metrics.has_observer(m1)
        if load:
            try:
                out["load"] = self.load(url, name, model)
            except Exception as e:
                out["load_error"] = f"{type(e).__name__}: {e}"
            m2 = metrics.settled_scrape(url, tries=2)
            out["observer_load"] = metrics.diff(m2, m1)
        return out

    def load(self, url: str, name: str, model: str) -> dict:
        a = self.args
        d = self.dir / "load" / name
        proc = loadgen.run_locust(url, self.prompts_path, d, users=a.users, run_time_s=a.load_seconds,
                                  max_requests=a.requests, model=model, seed=a.seed)
        records, start = loadgen.read_records(d / "records")
        summary = loadgen.summarize(records, a.slo_ttft_ms, a.slo_itl_ms)
        summary["locust_exit_code"] = proc.returncode
        loadgen.to_csv(summary, d / "latency.csv")
        if a.rate_sweep:
            table = [tuple(map(float, s.split(":"))) for s in a.rate_sweep.split(",")]
            ds = d / "sweep"
            loadgen.run_locust(url, self.prompts_path, ds, model=model, seed=a.seed, rate_table=table,
                               per_user_rate=0.5)
            recs, st = loadgen.read_records(ds / "records")
            summary["sweep"] = loadgen.summarize_sweep(recs, st, table, slo_ttft_ms=a.slo_ttft_ms,
                                                       slo_itl_ms=a.slo_itl_ms) if st else []
        if not records:
            raise RuntimeError(f"locust produced no requests (exit {proc.returncode}); see {d / 'locust.log'}")
        return summary

    def server_runs(self, group: list[tuple[ServerSpec, bool, bool]]) -> list[dict]:
        """Start the servers of ``group`` together (vLLM's start-up is mostly single-threaded imports in three
        processes, so starts overlap well), then measure them one at a time: while one is measured the others
        sit idle and healthy, so load numbers are not shared with another server's work."""
        started = []
        for i, (spec, _, _) in enumerate(group):
            rec = {"name": spec.name, "option": spec.option, "precision": spec.precision,
                   "probe_shift": spec.probe_shift, "checkpoint": spec.model, "started_with": len(group)}
            try:
                run = ServerRun(spec, self.port + i, self.dir / "logs")
                rec["command"] = run.argv
                rec["log"] = str(run.log.relative_to(self.dir))
                run.start()
            except Exception as e:
                run = None
                self._failed(rec, e)
            started.append((rec, run, time.monotonic()))

        def wait(run):  # all of the group at once, so each startup_s is its own
            try:
                return run.wait() if run is not None else None
            except Exception as e:
                return e

        with ThreadPoolExecutor(len(group)) as pool:
            ready = list(pool.map(wait, [run for _, run, _ in started]))
        out = []
        try:
            for (spec, load, noise), (rec, run, t), url in zip(group, started, ready):
                if run is not None:
                    try:
                        if isinstance(url, Exception):
                            raise url
                        rec["startup_s"] = run.startup_s
                        rec.update(self.measure(url, spec.name, load, noise))
                        rec["status"] = "ok" if "quality_error" not in rec and "load_error" not in rec else "partial"
                    except Exception as e:
                        self._failed(rec, e)
                    finally:
                        run.stop()
                rec["wall_s"] = time.monotonic() - t
                out.append(rec)
        finally:
            for _, run, _ in started:
                if run is not None:
                    run.stop()
        return out

    def _failed(self, rec: dict, e: BaseException) -> None:
        rec["status"] = "failed"
        causes = _log_errors(self.dir / rec["log"]) if "log" in rec else []
        rec["error"] = "; ".join(causes) + (" | " if causes else "") + f"{type(e).__name__}: {e}"[-1500:]
        rec["traceback"] = traceback.format_exc()[-3000:]


def _log_errors(log: Path, limit: int = 4) -> list[str]:
    """The exception lines of a server log ('XError: message'), first occurrences: the root cause comes first,
    vLLM's 'Engine core initialization failed' wrapper last."""
    import re

    if not log.is_file():
        return []
    found: list[str] = []
    for line in log.read_text(errors="replace").splitlines():
        m = None if " WARNING " in line else re.search(r"\b([A-Za-z_.]*(?:Error|Exception)): (.+)$", line)
        if m and m.group(0) not in found:
            found.append(m.group(0)[:400])
    return found[:limit]


def _eos_id(url: str, model: str) -> int | None:
    """The end-of-text token id (lm-eval's rolling-loglikelihood prefix), via the server's tokenizer."""
    for text in ("<|endoftext|>", "</s>"):
        try:
            ids = quality.tokenize(url, model, text)
        except Exception:
            return None
        if len(ids) == 1:
            return ids[0]
    return None


def comparisons(scored: dict, runs: list[dict]) -> dict:
    out = {}
    for option in dict.fromkeys(r["option"] for r in runs):
        c = {}
        bf16, int8 = f"{option}-bf16", f"{option}-int8"
        if bf16 in scored and int8 in scored:
            c["int8_vs_bf16"] = quality.summarize(scored[bf16], scored[int8])
        if bf16 in scored and bf16 + "#repeat" in scored:
            c["noise_floor"] = quality.summarize(scored[bf16], scored[bf16 + "#repeat"])
        out[option] = c
    return out


def probe_reference(args, ckpts: dict, docs, layers) -> dict:
    from vllm_normswap.ab.probe import reference_curve
    from vllm_normswap.ab.servers import OBSERVER_DEFAULT

    out = {}
    for option, path in tqdm(ckpts.items(), desc="probe (reference model)", unit="option"):
        try:
            out[option] = reference_curve(path, docs, _floats(args.probe_grid), OBSERVER_DEFAULT["thresholds"],
                                          layers)
        except Exception as e:  # e.g. a checkpoint the reference cannot load: the server points remain
            out[option] = {"error": f"{type(e).__name__}: {e}"}
    return out


def run(args) -> int:
    from vllm_normswap.ab import report

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    runner = Runner(args, run_dir)
    runs: list[dict] = []
    ckpts, layers = {}, None
    if args.url:
        rec = {"name": "url", "option": None, "precision": None, "probe_shift": 0.0, "url": args.url}
        try:
            rec.update(runner.measure(args.url.rstrip("/"), "url", load=True, noise=True))
            rec["status"] = "ok"
        except Exception as e:
            rec.update(status="failed", error=f"{type(e).__name__}: {e}")
        runs.append(rec)
    else:
        ckpts = _checkpoints(args)
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        for p in precisions:
            if p not in ("bf16", "int8"):
                raise SystemExit(f"--precisions: {p!r} is not bf16 or int8")
        layers = [int(x) for x in args.probe_layers.split(",") if x.strip()] or None
        specs = [(ServerSpec(o, path, p, extra=runner.extra), True, p == "bf16")
                 for o, path in ckpts.items() for p in precisions]
        specs += [(ServerSpec(o, path, "bf16", c, layers, extra=runner.extra), False, False)
                  for o, path in ckpts.items() for c in _floats(args.probe_shifts)]
        together = args.parallel_starts or default_parallel_starts()
        bar = tqdm(total=len(specs), desc="normswap ab", unit="server")
        for i in range(0, len(specs), together):
            group = specs[i:i + together]
            bar.set_postfix_str(" + ".join(spec.name for spec, _, _ in group))
            for rec in runner.server_runs(group):
                runs.append(rec)
                bar.update(1)
                tqdm.write(f"{rec['name']}: {rec['status']} in {rec['wall_s']:.0f}s"
                           + (f" ({rec['error'][:200]})" if rec.get("error") else ""))
        bar.close()
    if not args.url and runner.doc_ids:
        results_probe = probe_reference(args, ckpts, runner.doc_ids, layers)
    else:
        results_probe = {}
    results = {
        "probe_reference": results_probe,
        "meta": {"timestamp": stamp, "wall_s": time.monotonic() - t0, "args": {k: v for k, v in vars(args).items()
                                                                               if not k.startswith("_")},
                 "workload": runner.workload.describe(), "documents_token_ids": runner.doc_ids},
        "runs": runs,
        "comparisons": comparisons(runner.scored, runs),
    }
    paths = report.write(results, run_dir)
    print(json.dumps({"run_dir": str(run_dir), **{k: str(v) for k, v in paths.items()},
                      "wall_s": round(results["meta"]["wall_s"], 1),
                      "failed": [r["name"] for r in runs if r["status"] != "ok"]}))
    return 0
