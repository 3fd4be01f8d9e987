"""The phases of `normswap ab` (``Runner``): per group of servers, start them together, then on each server the
warm-up (ab/warmup.py) and the quality eval (held-out documents, observer counts for exactly those tokens), then
locust in alternating rounds (bf16, int8, bf16, int8, ...) until each server has --load-seconds and
--min-requests measured in --rounds pairs of rounds with a steady state; stop them. After the servers, in-process
(ab/inprocess.py): the fp32 reference model's scores (the precision floor), its probe curve and the int8
attribution; then the comparisons.

Which servers form a group, and the order of the groups, is ab/run.py's; the flags are ab/arguments.py's.
"""

from __future__ import annotations

import math
import time
import traceback
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vllm_normswap.ab import auth, family, inprocess, loadgen, loadstats, metrics, quality
from vllm_normswap.ab.servers import ServerRun, ServerSpec, free_port, log_errors, wait_quiet
from vllm_normswap.ab.warmup import warm_up
from vllm_normswap.ab.workload import build_workload
from vllm_normswap.registry import BASELINE
from vllm_normswap.runtime.placement import worker_and_spare
from vllm_normswap.runtime.server import stop_all

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
        self.checkpoint = lambda: None  # called after every phase: writes results.json (set by run.py)
        self.in_process_info: dict = {}  # the in-process tail's workers and seconds (results.json meta)

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
                # the warm-up settles a server for the load rounds; a probe server is only scored, and its scores
                # and observer counts (scraped around exactly the documents) do not depend on it: none for it
                if load:
                    self._step(recs[t.name], "warmup", lambda t=t: self._warm(t, recs[t.name]))
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

    def _step(self, rec: dict, phase: str, fn) -> None:
        if rec.get("status") == "failed":
            return
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:
            self._failed(rec, e)
        self.timing[phase] += time.monotonic() - t0
        rec.setdefault("phases_done", []).append(phase)
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
        m0 = metrics.settled_scrape(t.url)
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
        # locust off the worker's cores, read from the running servers (runtime/placement.py: measured faster
        # and steadier on 2 cores); --endpoint servers have no pid here, and then it goes where the scheduler puts it
        worker, spare = worker_and_spare(self.pids.values())
        for t in live:
            recs[t.name]["load_placement"] = {"worker_cores": worker, "locust_cores": spare or "any"}

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
                                          model=recs[t.name]["served_model"], seed=a.seed + rounds, cpus=spare)
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
            m2 = metrics.settled_scrape(t.url, tries=4)
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

    # ---- in-process, after the servers: the fp32 precision floor, the probe curve, the int8 attribution ----

    def in_process(self, ckpts: dict[str, str]) -> tuple[dict, dict, dict]:
        """Floor errors, probe curves and attribution per option (ab/inprocess.py); the fp32 scores go to
        ``scored`` as OPTION-fp32. Options run side by side, so the tail's wall time is split between the phases
        in proportion to their seconds in the workers."""
        floor_errors, curves, attributions = {}, {}, {}
        if not self.doc_ids or not ckpts:  # no server scored, or --endpoint without --option: no checkpoint
            return floor_errors, curves, attributions
        settings = inprocess.Settings.from_args(self.args)
        n_workers = inprocess.workers(ckpts)
        t0 = time.monotonic()
        tails = inprocess.run_all(ckpts, self.doc_ids, settings, n_workers)
        wall = time.monotonic() - t0
        for option, tail in tails.items():
            if tail.scores is not None:
                self.scored[f"{option}-fp32"] = tail.scores
            if tail.floor_error:
                floor_errors[option] = tail.floor_error
            curves[option] = tail.curve
            if tail.attribution is not None:
                attributions[option] = tail.attribution
                self._served_check(option, tail.attribution, settings)
        busy = {k: sum(t.seconds.get(k, 0.0) for t in tails.values()) for k in inprocess.PHASES}
        for k in inprocess.PHASES if settings.attribution else inprocess.PHASES[:2]:
            self.timing[k] += wall * busy[k] / max(sum(busy.values()), 1e-9)
        self.in_process_info = {"workers": n_workers, "wall_s": round(wall, 1),
                                "worker_s": {k: round(v, 1) for k, v in busy.items()}}
        return floor_errors, curves, attributions

    def _served_check(self, option: str, res: dict, settings) -> None:
        """The servers' top-k KL(bf16‖int8) on exactly the attribution's documents, beside its all-int8 total."""
        bf16, int8 = self.scored.get(f"{option}-bf16"), self.scored.get(f"{option}-int8")
        if bf16 and int8 and "total" in res:
            n = settings.attribution_docs or len(self.doc_ids)
            res["total"]["served_topk_kl_docs"] = quality.per_doc_sums(bf16[:n], int8[:n])["kl"].tolist()

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

