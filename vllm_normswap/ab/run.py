"""`normswap ab`: every option x {bf16, int8} through a real vLLM server, the precision floor, the mean-shift
probe, and the decision report. The subcommand's module (cli.py): ``add_arguments`` (ab/arguments.py) and ``run``.

A straight line of steps (``run``):
1. arguments are checked before anything is created (ab/arguments.py, ``targets``): option ids, precisions,
   checkpoints, endpoints, counts;
2. per option, its bf16 and int8 servers start together (on CPU forked from a helper that imported vLLM once:
   ``server_starts``), then each is warmed up, scored on the held-out documents, and load-tested in alternating
   rounds (ab/runner.py ``Runner.group``);
3. probe servers (probe_shift = c) score the same documents for one LayerNorm and one RMSNorm option;
4. in-process, options side by side in one-thread workers (ab/inprocess.py): the fp32 reference model scores the
   documents (the precision floor) and draws the probe curve, and the per-linear int8 attribution runs;
5. comparisons, the decision and the report; the exit code is 1 if any server run failed.
With --endpoint NAME=URL nothing is started: the same steps run against servers that already run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from vllm_normswap.ab import auth, quality, record
from vllm_normswap.ab.arguments import add_arguments  # noqa: F401  (cli.py: the subcommand's flags)
from vllm_normswap.ab.arguments import check_combinations, checkpoints, endpoints, probe_options
from vllm_normswap.ab.runner import Runner, Target
from vllm_normswap.ab.servers import ServerSpec
from vllm_normswap.runtime import forkserver


def targets(args, extra: list[str]) -> tuple[list[list[Target]], list[Target], dict[str, str]]:
    """Measured groups (an option's precisions together), probe servers, checkpoints. Exits 2 on bad input."""
    check_combinations(args)
    ckpts = checkpoints(args)
    if args.endpoint:
        eps = [Target(name, option, precision, url=url) for name, option, precision, url in endpoints(args)]
        groups = [[t for t in eps if t.option == o] for o in dict.fromkeys(t.option for t in eps)]
        return groups, [], ckpts
    options = list(ckpts)
    if args.aa:  # A/A: the int8 side becomes a second bf16 server (record precision "bf16-aa")
        groups = [[Target(f"{o}-bf16", o, "bf16", spec=ServerSpec(o, ckpts[o], "bf16", extra=extra)),
                   Target(f"{o}-bf16-aa", o, "bf16-aa", spec=ServerSpec(o, ckpts[o], "bf16", extra=extra, tag="aa"))]
                  for o in options]
    else:
        groups = [[Target(f"{o}-{p}", o, p, spec=ServerSpec(o, ckpts[o], p, extra=extra)) for p in args.precisions]
                  for o in options]
    layers = list(args.probe_layers) or None
    probes = [Target(f"{o}-bf16-probe{c:g}", o, "bf16", c, spec=ServerSpec(o, ckpts[o], "bf16", c, layers,
                                                                                extra=extra))
              for o in (probe_options(args, options) if args.probe_shifts else []) for c in args.probe_shifts]
    return groups, probes, ckpts


def default_parallel_starts() -> int:
    import psutil

    if _has_gpu():
        return 1
    return 2 if psutil.virtual_memory().available >= 12 * 2**30 else 1


FORK_ENGINE_ENV = "NORMSWAP_FORK_ENGINE"  # vllm_normswap/runtime/engine_fork.py ENV (that module imports vLLM)


def server_start_env(choice: str, environ, gpu: bool) -> dict[str, str]:
    """The variables that make the servers start as --server-start CHOICE says; set in this process's environment,
    which every server and the fork helper inherit.

    fork (the default on CPU): vLLM's import costs about 13 s of CPU on a 2-core box and a fresh server pays it three
    times (API server, then EngineCore, then the worker, spawned one after the other: docs/environment.md), while
    a tiny model is healthy half a second after the import. Forked from a helper that imported vLLM once, with
    EngineCore and the worker forked, the run pays the import once. The servers run the same code with the same
    flags, and both sides of every comparison start the same way. A variable the user set wins
    (NORMSWAP_FORKSERVER=0 still gives fresh processes). With a GPU nothing is set: forking EngineCore is a CPU
    platform matter (vLLM forks on GPU already), and the fork helper is untested there."""
    if choice == "fresh":
        return {forkserver.ENV: "0", FORK_ENGINE_ENV: "0"}
    if gpu:
        return {}
    return {var: environ.get(var, "1") for var in (forkserver.ENV, FORK_ENGINE_ENV)}


def server_starts(args) -> str:
    """Applies ``server_start_env``; with the fork helper on, starts it now, so that it imports vLLM while the
    workload is built. What the servers got, for results.json."""
    env = server_start_env(args.server_start, os.environ, _has_gpu())
    os.environ.update(env)
    if forkserver.enabled():
        forkserver.get()
    return ", ".join(f"{k}={v}" for k, v in env.items()) or "vLLM's default (a GPU)"


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


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
    starts = server_starts(args) if any(t.spec for g in groups for t in g) else None
    refused = endpoint_keys(groups)
    if refused:
        print("normswap ab: error: " + "\n".join(refused), file=sys.stderr)
        return 1
    run_dir = record.new_run_dir(Path(args.out))  # never an existing folder, even within the same second
    runner = Runner(args, run_dir)

    runs: list[dict] = []
    results = {
        "probe_reference": {},
        "meta": {"timestamp": run_dir.name, "status": "running",
                 "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                 "workload": runner.workload.describe(), "self_noise": runner.noise, "server_starts": starts},
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
            floor_errors, results["probe_reference"], results["attribution"] = runner.in_process(ckpts)
            results["meta"]["in_process"] = runner.in_process_info
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
