"""Where the round-to-round spread of `normswap ab` load rounds comes from, read from existing run folders (no
server, no CPU needed); prints one JSON object.

    python benchmarks/ab_spread.py runs/20261202-124202 runs/20261202-125742

From each results.json's per-round throughput (comparisons[option]["load"]["per_round_tokens_per_s"], A = bf16,
B = int8 or the A/A copy, measured A then B in every round), on log tokens/s:
- per server: the round-to-round standard deviation, and how much of it is a linear drift over the rounds
  (slope per round, share of the variance the trend explains) or the first round;
- per option: the correlation of A's and B's rounds. Drift the two sides share cancels in the paired ratio; with
  correlation rho the ratio's variance is var_A + var_B - 2 rho sd_A sd_B, so rho near 0 means pairing removes
  nothing and the noise is each round's own;
- across folders of the same settings: how far one configuration's mean moves between runs (server to server and
  time of day), against what its rounds alone would give;
- the rounds a ratio needs for a CI half-width of ±10% at the observed spread, alone (95%) and Holm-adjusted over
  16 labels (the report's first step: 1 - 0.05/16).

    python benchmarks/ab_spread.py runs/aa-unbound/runs/* --vs runs/aa-bound/runs/* --names unbound bound \
        --save benchmarks/results/ab_spread_KIND.json        # two sets side by side, as a README table
"""

from __future__ import annotations

import argparse
import json
import math
import statistics as st
import sys
import time
from pathlib import Path

from vllm_normswap.ab.loadstats import t_quantile


def _trend(y: list[float]) -> tuple[float, float]:
    """Least-squares slope per round and the share of the variance the line explains."""
    x = list(range(len(y)))
    mx, my = st.fmean(x), st.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    syy = sum((b - my) ** 2 for b in y)
    return slope, (slope ** 2 * sxx / syy) if syy else 0.0


def rounds_for(sd: float, half_width: float, alpha: float) -> int:
    """Paired rounds n with t(alpha, n - 1) · sd / √n <= log(1 + half_width)."""
    target = math.log(1 + half_width)
    n = 2
    while t_quantile(alpha, n - 1) * sd / math.sqrt(n) > target and n < 10_000:
        n += 1
    return n


def analyse(folders: list[Path]) -> dict:
    servers, options, by_config, detectable = [], [], {}, []
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        for option, c in results.get("comparisons", {}).items():
            per = (c.get("load") or {}).get("per_round_tokens_per_s")
            if not per:
                continue
            det = ((c["load"].get("resolution") or {}).get("throughput") or {}).get("detectable")
            if det is not None:
                detectable.append(det)
            logs = {side: [math.log(x) for x in per[side] if x] for side in ("a", "b")}
            for side, y in logs.items():
                slope, r2 = _trend(y)
                dev = [v - st.fmean(y) for v in y]
                servers.append({"run": folder.name, "option": option, "side": side, "rounds": len(y),
                                "tok_s_mean": math.exp(st.fmean(y)), "sd_log": st.stdev(y),
                                "drift_per_round": slope, "drift_share": r2, "first_round_dev": dev[0]})
                by_config.setdefault((option, side), []).append((st.fmean(y), st.variance(y) / len(y)))
            n = min(len(logs["a"]), len(logs["b"]))
            a, b = logs["a"][:n], logs["b"][:n]
            diff = [y - x for x, y in zip(a, b)]
            options.append({"run": folder.name, "option": option, "corr_ab": st.correlation(a, b),
                            "sd_log_ratio": st.stdev(diff),
                            "sd_log_ratio_if_unpaired": math.sqrt(st.variance(a) + st.variance(b))})
    between = []
    for (option, side), means in by_config.items():
        if len(means) > 1:  # run-to-run variance of the configuration's mean, less what its rounds explain
            observed = st.variance([m for m, _ in means])
            from_rounds = st.fmean([v for _, v in means])
            between.append({"option": option, "side": side, "means_tok_s": [round(math.exp(m)) for m, _ in means],
                            "sd_log_between_runs": math.sqrt(observed),
                            "sd_log_expected_from_rounds": math.sqrt(from_rounds)})
    sd_ratio = st.median([o["sd_log_ratio"] for o in options]) if options else None
    pooled_first = st.fmean([s["first_round_dev"] for s in servers]) if servers else None
    return {
        "folders": [str(f) for f in folders],
        "summary": {
            "servers": len(servers),
            "tok_s_median": st.median([s["tok_s_mean"] for s in servers]),
            "detectable_throughput_median": st.median(detectable) if detectable else None,
            "sd_log_round_median": st.median([s["sd_log"] for s in servers]),
            "sd_log_round_by_side": {side: st.median([s["sd_log"] for s in servers if s["side"] == side])
                                     for side in ("a", "b")},
            "drift_share_median": st.median([s["drift_share"] for s in servers]),
            "drift_per_round_mean": st.fmean([s["drift_per_round"] for s in servers]),
            "first_round_dev_mean": pooled_first,
            "corr_ab_median": st.median([o["corr_ab"] for o in options]),
            "sd_log_ratio_median": sd_ratio,
            "rounds_for_10pct_95": rounds_for(sd_ratio, 0.10, 0.05) if sd_ratio else None,
            "rounds_for_10pct_holm16": rounds_for(sd_ratio, 0.10, 0.05 / 16) if sd_ratio else None},
        "servers": servers, "options": options, "between_runs": between}


COLUMNS = ["runs", "servers", "median tok/s", "sd of log tok/s per round", "A-B round correlation",
           "sd of the paired log ratio", "rounds for ±10% (95% / Holm 16)", "median detectable throughput change"]


def table_row(name: str, n_runs: int, s: dict) -> list:
    det = s["detectable_throughput_median"]
    return [name, n_runs, s["servers"], round(s["tok_s_median"]), round(s["sd_log_round_median"], 3),
            round(s["corr_ab_median"], 2), round(s["sd_log_ratio_median"], 3),
            f"{s['rounds_for_10pct_95']} / {s['rounds_for_10pct_holm16']}", f"±{100 * det:.0f}%" if det else "–"]


def _command(sets, args) -> str:
    """The command line, each set of folders as PARENT/* where that is what it was."""
    def short(folders: list[Path]) -> str:
        parents = {f.parent for f in folders}
        if len(parents) == 1 and len(folders) == sum(1 for d in next(iter(parents)).iterdir() if d.is_dir()):
            return f"{next(iter(parents))}/*"
        return " ".join(map(str, folders))
    words = ["benchmarks/ab_spread.py", short(sets[0][1])]
    if len(sets) > 1:
        words += ["--vs", short(sets[1][1]), "--names", *(f'"{n}"' for n in args.names)]
    return " ".join(words)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="runs/<timestamp> folders of normswap ab")
    p.add_argument("--vs", nargs="+", type=Path, default=[],
                   help="a second set of folders (after a change): both sets summarized side by side")
    p.add_argument("--names", nargs=2, default=["before", "after"], help="the two sets' names (with --vs)")
    p.add_argument("--save", default="", help="write the sets' summaries as a benchmarks/results/ table "
                                              "(benchmarks/render_readme.py renders it)")
    p.add_argument("--title", default="A/B load-round spread", help="the saved table's title")
    args = p.parse_args()
    missing = [str(f) for f in [*args.folders, *args.vs] if not (f / "results.json").is_file()]
    if missing:
        raise SystemExit(f"no results.json in {', '.join(missing)}; give runs/<timestamp> folders of normswap ab")
    sets = [(args.names[0], args.folders)] + ([(args.names[1], args.vs)] if args.vs else [])
    out = {name: analyse(folders) for name, folders in sets}
    print(json.dumps(out if args.vs else out[args.names[0]], indent=1))
    if args.save:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from machine import cpu_info  # benchmarks/machine.py

        cpu = cpu_info()
        Path(args.save).write_text(json.dumps({
            "title": args.title, "benchmark": _command(sets, args),
            "machine": f"{cpu['model']}, {cpu['cores']} cores", "date": time.strftime("%Y-%m-%d"),
            "cpu_flags": cpu["kind"] + " (" + " ".join(cpu["flags"]) + ")",
            "notes": "Per server: the sd of log tokens/s over its load rounds; per option: the correlation of the "
                     "two sides' rounds and the sd of their paired log ratio, and the paired rounds a ratio needs for "
                     "a CI half-width of ±10%, alone and Holm-adjusted over 16 labels; medians over the set.",
            "columns": ["set", *COLUMNS],
            "rows": [table_row(name, len(folders), out[name]["summary"]) for name, folders in sets],
            "summaries": {name: out[name]["summary"] for name, _ in sets}}, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
