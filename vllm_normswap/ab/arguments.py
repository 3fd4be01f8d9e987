"""`normswap ab`'s argument surface: its flags and the checks that run before anything is created.

Two kinds of check, both exit 2 with a message that names the flag, the problem and the fix, before
runs/<timestamp>/ exists:
- one flag's value, in its argparse ``type`` (a comma list of known ids, a count at least its minimum);
- flags together, and flags against the disk (``checkpoints``, ``endpoints``, ``check_combinations``): an option id
  with a checkpoint directory, an endpoint name OPTION-PRECISION, --aa with --endpoint.
This file imports no torch and no vLLM, so `normswap ab --help` and its errors come fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from vllm_normswap.registry import BASELINE, NORM_ROLE, OPTIONS, PRECISIONS, parse_list



def usage_error(message: str) -> NoReturn:
    """Exit 2, as argparse does for a bad flag; ``message`` names the flag and the fix."""
    print(f"normswap ab: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---- one flag's value (argparse calls these; ArgumentTypeError becomes "argument --FLAG: MESSAGE", exit 2) ----

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


def _at_least(minimum: int, why: str = ""):
    """A whole number >= ``minimum``; ``why`` says what a smaller one would break."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= {minimum}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {n})" + (f": {why}" if why else ""))
        return n
    return parse


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds > 0") from None
    if not s > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds (got {text})")
    return s


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
    q.add_argument("--docs", type=_at_least(1), default=64, help="held-out documents for the quality eval")
    q.add_argument("--doc-tokens", type=_at_least(2, "a document needs its prefix token and one token to score"),
                   default=256, help="tokens per document (incl. the prefix token)")
    q.add_argument("--top-k", type=_at_least(1), default=20, help="top-k logprobs per position (server cap: max-logprobs)")
    q.add_argument("--self-noise", choices=("auto", "on", "off"), default="auto",
                   help="also score bf16 against itself (other batch shapes): non-zero only with batch-variant "
                        "kernels, so 'auto' = on with a GPU")
    q.add_argument("--corpus", help="held-out text source (default: the zoo corpus's held-out split)")
    ld = p.add_argument_group("load")
    ld.add_argument("--users", type=_at_least(1), default=4, help="load-test concurrency")
    ld.add_argument("--prompts", type=_at_least(1), default=64, help="load-test prompts in the workload")
    ld.add_argument("--max-tokens", type=_at_least(2, "TPOT is (end-to-end - TTFT) / (output tokens - 1)"),
                    default=16, help="output tokens per load-test request")
    ld.add_argument("--load-seconds", type=_seconds, default=30.0, help="measured load per server (after warm-up)")
    ld.add_argument("--min-requests", type=_at_least(0), default=200,
                    help="at least this many measured requests per server")
    # at least one round: the speeds and latencies are measured there (a quality-only run is --rounds 1 with a
    # short --load-seconds); the int8÷bf16 CIs are paired t intervals over the pairs of rounds (ab/loadstats.py
    # paired_ratio), so they need two
    ld.add_argument("--rounds", type=_at_least(1, "the servers' speed and latency are measured in the load rounds; "
                                                  "use --rounds 2 or more for the int8÷bf16 CIs"),
                    default=6, help="alternating load rounds per server: the ratio CIs are over these pairs of rounds "
                                    "(at least 2 for a CI)")
    ld.add_argument("--warmup-max-s", type=_seconds, default=120.0, help="give up settling the warm-up after this")
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
    pr.add_argument("--probe-layers", default=[], type=_layer_list, metavar="L,L",
                    help="layers the probe shifts (comma list; default all)")
    at = p.add_argument_group("int8 attribution (in-process, docs/attribution.md)")
    at.add_argument("--attribution", choices=("on", "off"), default="on",
                    help="per-linear int8 KL with the fp32 reference model, after the servers (off: large models)")
    at.add_argument("--attribution-layers", default=[], type=_layer_list, metavar="L,L",
                    help="only these layers' linears, e.g. 0,2 (default all; the all-int8 total is always whole)")
    at.add_argument("--attribution-docs", type=_at_least(0), default=32, metavar="N",
                    help="the first N quality documents (0 = all); cost ~ forward passes x documents")
    s = p.add_argument_group("servers")
    s.add_argument("--seed", type=int, default=0, help="workload seed")
    s.add_argument("--tensor-parallel-size", type=_at_least(1), default=1, help="vLLM -tp for every server")
    s.add_argument("--compiled", action="store_true",
                   help="let vLLM compile (default: --enforce-eager, ~50 s less per server start on CPU)")
    s.add_argument("--server-start", choices=("fork", "fresh"), default="fork",
                   help="fork: on CPU, vLLM is imported once by a helper process and each server is forked from it, "
                        "its EngineCore and worker forked too (NORMSWAP_FORKSERVER=1, NORMSWAP_FORK_ENGINE=1; "
                        "docs/serving.md); fresh: every server a new process, as `normswap serve` starts it (also "
                        "the choice with a GPU). The servers and their numbers are the same; fork starts faster")
    s.add_argument("--port", type=_at_least(0), default=0, help="first port (0: free ports)")
    s.add_argument("--parallel-starts", type=_at_least(0), default=0,
                   help="servers started together (0: 2 on CPU with >= 12 GB free memory, 1 with a GPU)")
    s.add_argument("--out", default="runs", help="parent directory of runs/<timestamp>/")
    p.epilog = ("Further vLLM server flags go after --, e.g.  -- --device cuda --gpu-memory-utilization 0.5\n"
                "API keys (docs/security.md): --endpoint NAME uses $NORMSWAP_API_KEY_<NAME> (e.g. "
                "NORMSWAP_API_KEY_LN_GELU_INT8), else $NORMSWAP_API_KEY, else $OPENAI_API_KEY; servers started here "
                "get a random key. Ctrl-C / SIGTERM: servers stopped, results.json kept, exit 130.")


# ---- flags together, and against the disk ----

def checkpoints(args) -> dict[str, str]:
    """Option id -> checkpoint directory: the --option pairs, else (without --endpoint) the embedded zoo's."""
    given = {}
    for oid, path in args.option:
        if oid not in OPTIONS:
            usage_error(f"--option {oid}=...: unknown option id; choose from {', '.join(OPTIONS)}")
        if not (Path(path) / "config.json").is_file():
            usage_error(f"--option {oid}={path}: no config.json there (a checkpoint directory is needed)")
        given[oid] = path
    if given or args.endpoint:
        return given
    from vllm_normswap.checkpoints import zoo

    paths = {o: Path(zoo.option_dir(o)) for o in args.options}
    missing = [o for o, p in paths.items() if not (p / "config.json").is_file()]
    if missing:
        usage_error(f"the embedded zoo has no checkpoint for {', '.join(missing)} (looked in "
                    f"{paths[missing[0]].parent}); run `normswap zoo build` or pass --option ID=PATH")
    return {o: str(p) for o, p in paths.items()}


def endpoints(args) -> list[tuple[str, str, str, str]]:
    """(name, option, precision, url) of every --endpoint NAME=URL."""
    out = []
    for name, url in args.endpoint:
        option, _, precision = name.rpartition("-")
        if option not in OPTIONS or precision not in PRECISIONS:
            usage_error(f"--endpoint {name}={url}: NAME must be OPTION-PRECISION with OPTION in "
                        f"{', '.join(OPTIONS)} and PRECISION in {', '.join(PRECISIONS)}, e.g. ln-gelu-bf16")
        if not url.startswith(("http://", "https://")):
            usage_error(f"--endpoint {name}={url}: the URL must start with http:// or https://")
        out.append((name, option, precision, url.rstrip("/")))
    return out


def check_combinations(args) -> None:
    if args.aa and args.endpoint:
        usage_error("--aa starts its two servers per option itself; it cannot be combined with --endpoint "
                    "(drop --endpoint, or drop --aa)")
    if args.aa and args.precisions != list(PRECISIONS):
        usage_error("--aa measures bf16 against a second bf16 server; --precisions does not apply (drop it)")


def probe_options(args, options: list[str]) -> list[str]:
    """The options that get probe servers, among ``options`` (those measured)."""
    if args.probe_options == "all":
        return options
    if args.probe_options == "auto":  # one LayerNorm (the baseline) and one RMSNorm option cross-check the curve
        rms = [o for o in options if OPTIONS[o].role == NORM_ROLE] or [o for o in options
                                                                        if OPTIONS[o].norm_type == "rmsnorm"]
        return [o for o in options if o == BASELINE] + rms[:1]
    try:
        return parse_list("--probe-options", args.probe_options, options)
    except ValueError as e:
        usage_error(f"{e} (the options this run measures), or 'auto' or 'all'")
