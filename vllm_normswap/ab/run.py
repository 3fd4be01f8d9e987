"""`normswap ab`: every option x {bf16, int8} through a real vLLM server, the precision floor, the mean-shift
probe, and the decision report.

A straight line of steps (``run``):
1. arguments are checked before anything is created (``targets``): option ids, precisions, checkpoints, endpoints;
2. per option, its bf16 and int8 servers start together, then each is warmed up (ab/warmup.py), scored on the
   held-out documents (quality, observer counts for exactly those tokens), and load-tested by locust in
   alternating rounds (bf16, int8, bf16, int8, ...) until both have run --load-seconds and --min-requests, with
   --rounds pairs of rounds that each have a steady state;
3. probe servers (probe_shift = c) score the same documents for one LayerNorm and one RMSNorm option;
4. in-process: the fp32 reference model scores the documents (the precision floor) and draws the probe curve;
5. comparisons, the decision and the report; the exit code is 1 if any server run failed.
With --endpoint NAME=URL nothing is started: the same steps run against servers that already run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vllm_normswap.ab import auth, family, loadgen, loadstats, metrics, quality, record
from vllm_normswap.ab.servers import ServerRun, ServerSpec, free_port, log_errors, wait_quiet
from vllm_normswap.ab.warmup import warm_up
from vllm_normswap.ab.workload import build_workload
from vllm_normswap.registry import BASELINE, NORM_ROLE, OPTIONS, PRECISIONS, parse_list
from vllm_normswap.runtime.server import stop_all


def _list_of(flag: str, allowed):
    def parse(text: str) -> list[str]:
        try:
            return parse_list(flag, text, allowed) if text.strip() else []
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of numbers, e.g. 0,2,4") from None


def _layer_list(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of layer indices, e.g. 0,2") from None
    if any(i < 0 for i in layers):
        raise argparse.ArgumentTypeError(f"{text!r}: layer indices start at 0")
    return layers


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0")
    return int(text)


def _pair(flag: str):
    def parse(text: str) -> tuple[str, str]:
        if "=" not in text:
            raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE (see {flag} in --help)")
        key, value = text.split("=", 1)
        return key.strip(), value.strip()
    return parse


def add_arguments(p) -> None:
    g = p.add_argument_group("what to measure")
    g.add_argument("--option", action="append", default=[], type=_pair("--option"), metavar="ID=PATH",
                   help="an option's checkpoint (repeatable); default: the embedded zoo models")
    g.add_argument("--options", default=list(OPTIONS), type=_list_of("--options", tuple(OPTIONS)),
                   help="option ids to run (comma list)")
    g.add_argument("--precisions", default=list(PRECISIONS), type=_list_of("--precisions", PRECISIONS),
                   help="comma list of " + ", ".join(PRECISIONS))
    g.add_argument("--endpoint", action="append", default=[], type=_pair("--endpoint"), metavar="NAME=URL",
                   help="measure a server that already runs (repeatable; NAME is OPTION-PRECISION, e.g. "
                        "ln-gelu-bf16=http://host:8000); nothing is started")
    g.add_argument("--aa", action="store_true",
                   help="A/A run: each option's bf16 server against a second bf16 server of the same configuration "
                        "(OPTION-bf16-aa) in place of int8, everything else unchanged; every load label should read "
                        "'no difference' (docs/ab-error-rates.md)")
    g.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="compare two report folders (runs/<timestamp>) and exit: which labels and ratios changed")
    g.add_argument("--report", metavar="RUN",
                   help="re-render report.md, report.html and figures/ from RUN/results.json and exit (an "
                        "interrupted run, or one whose report failed)")
    q = p.add_argument_group("quality")
    q.add_argument("--docs", type=int, default=64, help="held-out documents for the quality eval")
    q.add_argument("--doc-tokens", type=int, default=256, help="tokens per document (incl. the prefix token)")
    q.add_argument("--top-k", type=int, default=20, help="top-k logprobs per position (server cap: max-logprobs)")
    q.add_argument("--self-noise", choices=("auto", "on", "off"), default="auto",
                   help="also score bf16 against itself (other batch shapes): non-zero only with batch-variant "
                        "kernels, so 'auto' = on with a GPU")
    q.add_argument("--corpus", help="held-out text source (default: the zoo corpus's held-out split)")
    ld = p.add_argument_group("load")
    ld.add_argument("--users", type=int, default=4, help="load-test concurrency")
    ld.add_argument("--prompts", type=int, default=64, help="load-test prompts in the workload")
    ld.add_argument("--max-tokens", type=int, default=16, help="output tokens per load-test request")
    ld.add_argument("--load-seconds", type=float, default=30.0, help="measured load per server (after warm-up)")
    ld.add_argument("--min-requests", type=int, default=200, help="at least this many measured requests per server")
    ld.add_argument("--rounds", type=int, default=6,
                    help="alternating load rounds per server: the ratio CIs are over these pairs of rounds")
    ld.add_argument("--warmup-max-s", type=float, default=120.0, help="give up settling the warm-up after this")
    ld.add_argument("--rate-sweep", default="", help="also run a rate sweep: 'dur:rate,dur:rate' (e.g. 10:1,10:4)")
    ld.add_argument("--slo-ttft-ms", type=float, default=1000.0,
                    help="goodput SLO on time to first token (as `vllm bench serve --goodput ttft:MS`)")
    ld.add_argument("--slo-tpot-ms", type=float, default=200.0,
                    help="goodput SLO on time per output token (as `vllm bench serve --goodput tpot:MS`)")
    pr = p.add_argument_group("mean-shift probe")
    pr.add_argument("--probe-shifts", default=[8.0], type=_floats,
                    help="probe servers: constants c > 0, one server start each ('' = none)")
    pr.add_argument("--probe-options", default="auto",
                    help="options that get probe servers: 'auto' = the baseline and one RMSNorm option, 'all', or "
                         "a comma list; the fine curve for every option comes from the reference model")
    pr.add_argument("--probe-grid", default=[0.0, 1.0, 2.0, 4.0, 8.0, 16.0], type=_floats,
                    help="c values of the reference-model probe curve")
    pr.add_argument("--probe-layers", default="", help="layers the probe shifts (comma list; default all)")
    at = p.add_argument_group("int8 attribution (in-process, docs/attribution.md)")
    at.add_argument("--attribution", choices=("on", "off"), default="on",
                    help="per-linear int8 KL with the fp32 reference model, after the servers (off: large models)")
    at.add_argument("--attribution-layers", default=[], type=_layer_list, metavar="L,L",
                    help="only these layers' linears, e.g. 0,2 (default all; the all-int8 total is always whole)")
    at.add_argument("--attribution-docs", type=_count, default=32, metavar="N",
                    help="the first N quality documents (0 = all); cost ~ forward passes x documents")
    s = p.add_argument_group("servers")
    s.add_argument("--seed", type=int, default=0, help="workload seed")
    s.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM -tp for every server")
    s.add_argument("--compiled", action="store_true",
                   help="let vLLM compile (default: --enforce-eager, ~50 s less per server start on CPU)")
    s.add_argument("--port", type=int, default=0, help="first port (0: free ports)")
    s.add_argument("--parallel-starts", type=int, default=0,
                   help="servers started together (0: 2 on CPU with >= 12 GB free memory, 1 with a GPU)")
    s.add_argument("--out", default="runs", help="parent directory of runs/<timestamp>/")
    p.epilog = ("Further vLLM server flags go after --, e.g.  -- --device cuda --gpu-memory-utilization 0.5\n"
                "API keys (docs/security.md): --endpoint NAME uses $NORMSWAP_API_KEY_<NAME> (e.g. "
                "NORMSWAP_API_KEY_LN_GELU_INT8), else $NORMSWAP_API_KEY, else $OPENAI_API_KEY; servers started here "
                "get a random key. Ctrl-C / SIGTERM: servers stopped, results.json kept, exit 130.")


INTERRUPT_STOP_S = 5.0  # on Ctrl-C / SIGTERM: SIGINT to every server, SIGKILL to what is left after this


B_SIDE = {False: "int8", True: "bf16-aa"}  # the B side of every comparison: int8, or in an A/A run a bf16 copy


@dataclass
class Target:
    """One server to measure: started here (spec) or already running (url)."""
    name: str
    option: str
    precision: str
    probe_shift: float = 0.0
    spec: ServerSpec | None = None
    url: str | None = None


def _checkpoints(args) -> dict[str, str]:
    given = {}
    for oid, path in args.option:
        if oid not in OPTIONS:
            raise SystemExit(f"--option {oid}=...: unknown option id; choose from {', '.join(OPTIONS)}")
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"--option {oid}={path}: no config.json there (a checkpoint directory is needed)")
        given[oid] = path
    if given or args.endpoint:
        return given
    from vllm_normswap.checkpoints import zoo

    paths = {o: Path(zoo.option_dir(o)) for o in args.options}
    missing = [o for o, p in paths.items() if not (p / "config.json").is_file()]
    if missing:
        raise SystemExit(f"the embedded zoo has no checkpoint for {', '.join(missing)} (looked in "
                         f"{paths[missing[0]].parent}); run `normswap zoo build` or pass --option ID=PATH")
    return {o: str(p) for o, p in paths.items()}


def _endpoint_targets(args) -> list[Target]:
    out = []
    for name, url in args.endpoint:
        option, _, precision = name.rpartition("-")
        if option not in OPTIONS or precision not in PRECISIONS:
            raise SystemExit(f"--endpoint {name}={url}: NAME must be OPTION-PRECISION with OPTION in "
                             f"{', '.join(OPTIONS)} and PRECISION in {', '.join(PRECISIONS)}, e.g. ln-gelu-bf16")
        if not url.startswith(("http://", "https://")):
            raise SystemExit(f"--endpoint {name}={url}: the URL must start with http:// or https://")
        out.append(Target(name, option, precision, url=url.rstrip("/")))
    return out


def probe_options(args, options: list[str]) -> list[str]:
    if args.probe_options == "all":
        return options
    if args.probe_options == "auto":  # one LayerNorm (the baseline) and one RMSNorm option cross-check the curve
        rms = [o for o in options if OPTIONS[o].role == NORM_ROLE] or [o for o in options
                                                                        if OPTIONS[o].norm_type == "rmsnorm"]
        return [o for o in options if o == BASELINE] + rms[:1]
    return [o for o in parse_list("--probe-options", args.probe_options, options)]


def targets(args, extra: list[str]) -> tuple[list[list[Target]], list[Target], dict[str, str]]:
    """Measured groups (an option's precisions together), probe servers, checkpoints. Exits 2 on bad input."""
    ckpts = _checkpoints(args)
    if args.endpoint:
        if getattr(args, "aa", False):
            raise SystemExit("--aa starts its two servers per option itself; it cannot be combined with --endpoint "
                             "(drop --endpoint, or drop --aa)")
        eps = _endpoint_targets(args)
        groups = [[t for t in eps if t.option == o] for o in dict.fromkeys(t.option for t in eps)]
        return groups, [], ckpts
    layers = [int(x) for x in args.probe_layers.split(",") if x.strip()] or None
    options = list(ckpts)
    groups = [[Target(f"{o}-{p}", o, p, spec=ServerSpec(o, ckpts[o], p, extra=extra)) for p in args.precisions]
              for o in options]
    if getattr(args, "aa", False):  # A/A: the int8 side becomes a second bf16 server (record precision "bf16-aa")
        if args.precisions != list(PRECISIONS):
            raise SystemExit("--aa measures bf16 against a second bf16 server; --precisions does not apply (drop it)")
        groups = [[Target(f"{o}-bf16", o, "bf16", spec=ServerSpec(o, ckpts[o], "bf16", extra=extra)),
                   Target(f"{o}-bf16-aa", o, "bf16-aa", spec=ServerSpec(o, ckpts[o], "bf16", extra=extra, tag="aa"))]
                  for o in options]
    probes = [Target(f"{o}-bf16-probe{c:g}", o, "bf16", c, spec=ServerSpec(o, ckpts[o], "bf16", c, layers,
                                                                                extra=extra))
              for o in (probe_options(args, options) if args.probe_shifts else []) for c in args.probe_shifts]
    return groups, probes, ckpts


def default_parallel_starts() -> int:
    import psutil
    import torch

    if torch.cuda.is_available():
        return 1
    return 2 if psutil.virtual_memory().available >= 12 * 2**30 else 1


def _self_noise(args) -> bool:
    if args.self_noise == "auto":
        import torch

        return torch.cuda.is_available()
    return args.self_noise == "on"


class Runner:
    def __init__(self, args, run_dir: Path):
        self.args, self.dir = args, run_dir
        self.workload = build_workload(n_docs=args.docs, doc_chars=args.doc_tokens * 8, n_prompts=args.prompts,
                                       max_tokens=args.max_tokens, seed=args.seed, corpus=args.corpus)
        self.prompts_path = self.workload.save_prompts(run_dir / "workload" / "prompts.jsonl")
        self.doc_ids: list[list[int]] | None = None  # tokenized once, by the first server (shared tokenizer)
        self.scored: dict[str, list] = {}  # run name -> scored documents
        self.rounds: dict[str, list[list[dict]]] = defaultdict(list)  # run name -> locust records per round
        self.timing: dict[str, float] = defaultdict(float)  # seconds per phase (the report's time split)
        self.noise = _self_noise(args)
        self.last_scrape: dict[str, dict] = {}  # run name -> /metrics after its quality eval
        self.next_port = args.port
        self.pids: dict[str, int] = {}  # run name -> server process of the current group (for wait_quiet)
        self.current: dict[str, dict] = {}  # the records of the group being measured (saved if interrupted)
        self.checkpoint = lambda: None  # called after every phase: writes results.json (set by run())

    def port(self) -> int:
        if not self.next_port:
            return free_port()
        self.next_port += 1
        return self.next_port - 1

    # ---- one group of servers: start together, then warm up, score, load in alternating rounds, stop ----

    def group(self, group: list[Target], load: bool) -> list[dict]:
        recs = {t.name: {"name": t.name, "option": t.option, "precision": t.precision, "probe_shift": t.probe_shift,
                         **({"url": t.url} if t.url else {"checkpoint": t.spec.model})} for t in group}
        self.current = recs
        runs = self._start(group, recs)
        self.pids = {name: run.pid for name, run in runs.items() if run.pid}  # --endpoint servers have none
        try:
            live = [t for t in group if recs[t.name].get("status") != "failed"]
            for t in live:
                self._step(recs[t.name], "warmup" if load else None, lambda t=t: self._warm(t, recs[t.name]))
                self._step(recs[t.name], "quality" if load else "probe", lambda t=t: self._quality(t, recs[t.name]))
            if load:
                live = [t for t in live if recs[t.name].get("status") != "failed"]
                self._step_all(live, recs, lambda: self._load(live, recs))
        except BaseException:  # interrupted: every server down at once, quickly
            stop_all([run.server for run in runs.values()], timeout=INTERRUPT_STOP_S)
            raise
        finally:
            stop_all([run.server for run in runs.values()])
        for r in recs.values():
            r.setdefault("status", "ok")
        self.current = {}
        return list(recs.values())

    def _start(self, group: list[Target], recs: dict) -> dict[str, ServerRun]:
        runs = {}
        for t in group:
            if t.url:
                continue
            rec = recs[t.name]
            try:
                # a fresh key per server, in memory only (an --api-key passed through after -- wins in vLLM)
                run = ServerRun(t.spec, self.port(), self.dir / "logs",
                                api_key=auth.argv_key(t.spec.extra) or auth.new_key())
                rec["command"], rec["log"] = auth.redact_argv(run.argv), str(run.log.relative_to(self.dir))
                runs[t.name] = run.start()
            except Exception as e:
                self._failed(rec, e)
        t0 = time.monotonic()

        def wait(item):
            name, run = item
            try:
                return name, run.wait()
            except Exception as e:
                return name, e

        pool = ThreadPoolExecutor(max(len(runs), 1))
        try:
            for name, url in pool.map(wait, runs.items()):
                t = next(t for t in group if t.name == name)
                if isinstance(url, Exception):
                    self._failed(recs[name], url)
                else:
                    t.url = url
                    auth.register(url, runs[name].api_key, "the key normswap ab gave the server it started")
                    recs[name]["startup_s"] = runs[name].startup_s
        except BaseException:  # interrupted while the servers start: stop them, so the waiting threads end
            stop_all([run.server for run in runs.values()], timeout=INTERRUPT_STOP_S)
            raise
        finally:
            pool.shutdown(wait=True)
        self.timing["startup"] += time.monotonic() - t0
        return runs

    def _step(self, rec: dict, phase: str | None, fn) -> None:
        if rec.get("status") == "failed":
            return
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:
            self._failed(rec, e)
        if phase:
            self.timing[phase] += time.monotonic() - t0
        rec.setdefault("phases_done", []).append(phase or "warmup")
        self.checkpoint()

    def _step_all(self, live, recs, fn) -> None:
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:
            for t in live:
                self._failed(recs[t.name], e)
        self.timing["load"] += time.monotonic() - t0
        for t in live:
            recs[t.name].setdefault("phases_done", []).append("load")
        self.checkpoint()

    def _warm(self, t: Target, rec: dict) -> None:
        model = quality.model_info(t.url)["id"]
        rec["served_model"] = model
        rec["warmup"] = warm_up(t.url, model, self.workload.prompts, self.args.users, self.args.max_tokens,
                                max_seconds=self.args.warmup_max_s)

    def _quality(self, t: Target, rec: dict) -> None:
        model = rec.get("served_model") or quality.model_info(t.url)["id"]
        rec["served_model"] = model
        m0 = metrics.settled_scrape(t.url, tries=2)
        docs = self.documents(t.url, model)
        self.scored[t.name] = quality.score(t.url, model, docs, self.args.top_k)
        rec["quality"] = quality.summarize(self.scored[t.name])
        if self.noise and t.precision == "bf16" and not t.probe_shift:
            self.scored[t.name + "#repeat"] = quality.score(t.url, model, docs, self.args.top_k, batch=1,
                                                            order=list(range(len(docs)))[::-1])
        m1 = metrics.settled_scrape(t.url)
        rec["observer"] = metrics.diff(m1, m0)
        rec["observer_present"] = metrics.has_observer(m1)
        self.last_scrape[t.name] = m1

    def _load(self, live: list[Target], recs: dict) -> None:
        """Alternating rounds, each server in turn, until each has --load-seconds and --min-requests measured, and
        --rounds rounds of every server have a steady span (the pairs the ratio CIs are computed over)."""
        a = self.args
        per_round = max(a.load_seconds / max(a.rounds, 1), 3.0)
        done = defaultdict(int)
        quiet = defaultdict(list)  # run name -> seconds waited for an idle group before each round
        rounds = 0

        def paired() -> int:  # a round whose requests all started inside its ramp-up has no steady span
            return sum(all(loadstats.steady_span(self.rounds[t.name][i]) for t in live) for i in range(rounds))

        while live and (rounds < a.rounds or min(done[t.name] for t in live) < a.min_requests
                        or paired() < a.rounds):
            if rounds >= 4 * max(a.rounds, 1):  # a server too slow for --min-requests: stop, and say so
                for t in live:
                    recs[t.name]["load_note"] = (f"{done[t.name]} requests and {paired()} measurable rounds after "
                                                 f"{rounds} rounds, fewer than --min-requests {a.min_requests} "
                                                 f"or --rounds {a.rounds}")
                break
            for t in live:
                # every server of the group idle first: the one measured before goes on computing for up to a
                # second after its last request, on the same core (servers.wait_quiet)
                quiet[t.name].append(wait_quiet(list(self.pids.values())))
                d = self.dir / "load" / t.name / f"round{rounds}"
                proc = loadgen.run_locust(t.url, self.prompts_path, d, users=a.users, run_time_s=math.ceil(per_round),
                                          model=recs[t.name]["served_model"], seed=a.seed + rounds)
                records, _ = loadgen.read_records(d / "records")
                if not records:
                    raise RuntimeError(f"locust produced no requests (exit {proc.returncode}); see {d / 'locust.log'}")
                self.rounds[t.name].append(records)
                recs[t.name]["load_rounds_done"] = len(self.rounds[t.name])  # per-request records: load/NAME/
                self.checkpoint()
                done[t.name] += len(loadstats.steady_requests(records))
            rounds += 1
        for t in live:
            rec = recs[t.name]
            records = [r for rnd in self.rounds[t.name] for r in loadstats.steady_requests(rnd)]
            summary = loadgen.summarize(records, a.slo_ttft_ms, a.slo_tpot_ms)
            summary["rounds"] = len(self.rounds[t.name])
            summary["round_seconds"] = per_round
            summary["requests_all"] = sum(len(r) for r in self.rounds[t.name])
            summary["quiet_wait_s"] = [round(x, 2) for x in quiet[t.name]]
            if a.rate_sweep:
                table = [tuple(map(float, x.split(":"))) for x in a.rate_sweep.split(",")]
                ds = self.dir / "load" / t.name / "sweep"
                loadgen.run_locust(t.url, self.prompts_path, ds, model=rec["served_model"], seed=a.seed,
                                   rate_table=table, per_user_rate=0.5)
                recs_s, st = loadgen.read_records(ds / "records")
                summary["sweep"] = loadgen.summarize_sweep(recs_s, st, table, slo_ttft_ms=a.slo_ttft_ms,
                                                           slo_tpot_ms=a.slo_tpot_ms) if st else []
            loadgen.to_csv(summary, self.dir / "load" / t.name / "latency.csv")
            rec["load"] = summary
            m2 = metrics.settled_scrape(t.url, tries=2)
            rec["observer_load"] = metrics.diff(m2, self.last_scrape[t.name])

    # ---- shared pieces ----

    def documents(self, url: str, model: str) -> list[list[int]]:
        info = quality.model_info(url)
        window = min(self.args.doc_tokens, int(info.get("max_model_len") or self.args.doc_tokens) - 1)
        docs = quality.prepare_documents(url, model, self.workload.documents, window, _eos_id(url, model))
        if self.doc_ids is not None and docs != self.doc_ids:
            raise RuntimeError("this checkpoint tokenizes the documents differently from the first one: "
                               "ΔPPL/KL compare only models with the same tokenizer")
        self.doc_ids = self.doc_ids or docs
        return docs

    def _failed(self, rec: dict, e: BaseException) -> None:
        rec["status"] = "failed"
        causes = log_errors(self.dir / rec["log"]) if "log" in rec else []
        rec["error"] = "; ".join(causes) + (" | " if causes else "") + f"{type(e).__name__}: {e}"[-1500:]
        rec["traceback"] = traceback.format_exc()[-3000:]

    # ---- in-process: the fp32 precision floor and the reference probe curve ----

    def reference(self, ckpts: dict[str, str], layers) -> tuple[dict, dict]:
        import torch

        floor, probe = {}, {}
        if not self.doc_ids:
            return floor, probe
        # one thread: on a shared 2-core box OpenMP's spinning threads made this small model's elementwise ops
        # 50x slower (1.5 s instead of 27 ms a document) whenever anything else ran
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._reference(ckpts, layers, floor, probe)
        finally:
            torch.set_num_threads(threads)
        return floor, probe

    def _reference(self, ckpts, layers, floor, probe) -> None:
        from vllm_normswap.ab.probe import reference_curve
        from vllm_normswap.registry import DEFAULT_THRESHOLDS

        for option, path in tqdm(ckpts.items(), desc="fp32 reference (floor + probe)", unit="option"):
            t0 = time.monotonic()
            try:
                self.scored[f"{option}-fp32"] = quality.reference_scores(path, self.doc_ids, self.args.top_k)
            except Exception as e:  # e.g. a checkpoint the reference cannot load: no floor for it, said so
                floor[option] = f"{type(e).__name__}: {e}"
            self.timing["quality"] += time.monotonic() - t0
            t0 = time.monotonic()
            try:
                probe[option] = reference_curve(path, self.doc_ids, self.args.probe_grid, DEFAULT_THRESHOLDS, layers)
            except Exception as e:
                probe[option] = {"error": f"{type(e).__name__}: {e}"}
            self.timing["probe"] += time.monotonic() - t0

    def comparisons(self, runs: list[dict], floor_errors: dict) -> dict:
        out = {}
        for option in dict.fromkeys(r["option"] for r in runs):
            c: dict = {}
            bf16, int8, fp32 = f"{option}-bf16", f"{option}-{B_SIDE[bool(getattr(self.args, 'aa', False))]}", \
                f"{option}-fp32"
            s = self.scored
            if bf16 in s and int8 in s:
                c["int8_vs_bf16"] = quality.summarize(s[bf16], s[int8])
            if fp32 in s and bf16 in s:
                c["precision_floor"] = quality.summarize(s[fp32], s[bf16])
                if int8 in s:
                    c["int8_kl_vs_floor"] = quality.ratio_of_kl(quality.per_doc_sums(s[bf16], s[int8]),
                                                                quality.per_doc_sums(s[fp32], s[bf16]))
            elif option in floor_errors or bf16 in s:
                c["precision_floor_skipped"] = floor_errors.get(option) or (
                    "no checkpoint for the fp32 reference model (pass --option ID=PATH with --endpoint)")
            base = f"{BASELINE}-bf16"
            if option != BASELINE and base in s and bf16 in s:  # paired: the same documents, option vs baseline
                c["bf16_vs_baseline"] = quality.summarize(s[base], s[bf16])
            if bf16 + "#repeat" in s:
                c["noise_floor"] = quality.summarize(s[bf16], s[bf16 + "#repeat"])
            if self.rounds.get(bf16) and self.rounds.get(int8):
                c["load"] = loadstats.pair_ratios(self.rounds[bf16], self.rounds[int8])
            out[option] = c
        family.adjust(out)  # the report's load labels as one family (Holm), with each ratio's resolution
        return out


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


def endpoint_keys(groups: list[list[Target]]) -> list[str]:
    """Register each --endpoint's key (from the environment, auth.key_from_env) and ask each server for its models
    once: the 401 messages (naming the variable to set) of those that refuse it. Unreachable servers are left to
    the run, which records them as failed."""
    refused = []
    for t in (t for g in groups for t in g if t.url):
        key, var = auth.key_from_env(t.name, os.environ)
        auth.register(t.url, key, var)
        try:
            quality.model_info(t.url)
        except auth.Unauthorized as e:
            refused.append(f"--endpoint {t.name}: {e}")
        except Exception:
            pass
    return refused


def _timing(runner: Runner, wall: float) -> dict:
    timing = {k: round(v, 1) for k, v in runner.timing.items()}
    timing["total"] = round(wall, 1)
    timing["other"] = round(wall - sum(v for k, v in runner.timing.items()), 1)
    timing["measuring_fraction"] = round(sum(runner.timing[k] for k in ("warmup", "quality", "load", "probe"))
                                         / wall, 3) if wall else None
    return timing


def rerender(run_dir: Path) -> int:
    """`normswap ab --report RUN`: the report again from RUN/results.json (nothing is measured)."""
    from vllm_normswap.ab import report

    results = record.load(run_dir)
    paths = report.write(results, run_dir)
    print(json.dumps({"run_dir": str(run_dir), **{k: str(v) for k, v in paths.items()},
                      "status": results["meta"].get("status"), "decision": results["analysis"]["decision"]["verdict"],
                      "figure_errors": results["analysis"].get("figure_errors", {})}))
    return 0


def run(args) -> int:
    if args.compare:
        from vllm_normswap.ab.compare import compare_runs

        return compare_runs(*args.compare)
    if args.report:
        return rerender(Path(args.report))
    from vllm_normswap.ab import report

    t_start = time.monotonic()
    extra = ([] if args.compiled else ["--enforce-eager"]) + (
        ["--tensor-parallel-size", str(args.tensor_parallel_size)] if args.tensor_parallel_size > 1 else []) \
        + list(getattr(args, "passthrough", []) or [])
    groups, probes, ckpts = targets(args, extra)  # exits on bad input before any folder exists
    refused = endpoint_keys(groups)
    if refused:
        print("normswap ab: error: " + "\n".join(refused), file=sys.stderr)
        return 1
    run_dir = record.new_run_dir(Path(args.out))  # never an existing folder, even within the same second
    runner = Runner(args, run_dir)
    layers = [int(x) for x in args.probe_layers.split(",") if x.strip()] or None

    runs: list[dict] = []
    results = {
        "probe_reference": {},
        "meta": {"timestamp": run_dir.name, "status": "running",
                 "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                 "workload": runner.workload.describe(), "self_noise": runner.noise},
        "runs": runs,
        "comparisons": {},
    }

    def checkpoint() -> None:  # results.json with what is measured so far (redacted, atomic: record.save)
        wall = time.monotonic() - t_start
        results["meta"].update(wall_s=wall, timing=_timing(runner, wall), documents_token_ids=runner.doc_ids)
        record.save(run_dir, {**results, "runs": runs + [r for r in runner.current.values() if r not in runs]})

    runner.checkpoint = checkpoint
    together = args.parallel_starts or default_parallel_starts()
    with record.interruptible():
        try:
            bar = tqdm(total=sum(map(len, groups)) + len(probes), desc="normswap ab", unit="server")
            batches = [(g, True) for g in groups] + [(probes[i:i + together], False)
                                                     for i in range(0, len(probes), together)]
            for group, load in batches:
                bar.set_postfix_str(" + ".join(t.name for t in group))
                for rec in runner.group(group, load):
                    runs.append(rec)
                    bar.update(1)
                    tqdm.write(f"{rec['name']}: {rec['status']}" + (f" ({rec['error'][:200]})" if rec.get("error")
                                                                    else ""),
                               file=sys.stderr)  # stdout carries only the final JSON line
            bar.close()
            floor_errors, results["probe_reference"] = runner.reference(ckpts, layers)
            from vllm_normswap.ab import attribution  # torch: only once the servers are done (fast --help)

            results["attribution"] = attribution.for_run(ckpts, runner.doc_ids, runner.scored, args, runner.timing)
            results["comparisons"] = runner.comparisons(runs, floor_errors)
            results["meta"]["status"] = "measured"
            checkpoint()  # the raw measurements are on disk before any analysis or plot
            paths = report.write(results, run_dir)
            results["meta"]["status"] = "complete"
            record.save(run_dir, results)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (record.Interrupted): the servers are stopped already
            signame = getattr(e, "signame", "SIGINT")
            for r in runner.current.values():
                if r.get("status") != "failed":
                    r["status"] = "interrupted"
            results["meta"].update(status="interrupted", interrupted_by=signame)
            checkpoint()
            record.scrub(run_dir)
            print(f"normswap ab: interrupted ({signame}): every server it started is stopped; what was measured "
                  f"is in {run_dir / record.RESULTS} (render it with `normswap ab --report {run_dir}`)",
                  file=sys.stderr)
            return record.EXIT_INTERRUPTED
    record.scrub(run_dir)
    wall = results["meta"]["wall_s"]
    failed = [r["name"] for r in runs if r["status"] != "ok"]
    print(json.dumps({"run_dir": str(run_dir), **{k: str(v) for k, v in paths.items()}, "wall_s": round(wall, 1),
                      "decision": results["analysis"]["decision"]["verdict"],
                      "choice": results["analysis"]["decision"]["choice"], "failed": failed}))
    return 1 if failed else 0
