"""The A/B's false-alarm rates, measured: N runs of `normswap ab --aa` (every option's bf16 server against a second
bf16 server of the same configuration, on the default settings), and how often a load label reads anything but
"no difference". Prints one JSON object.

    python benchmarks/ab_error_rates.py                      # 20 A/A runs, default `normswap ab` settings
    python benchmarks/ab_error_rates.py --runs 2 --work /tmp/aa -- --options ln-gelu --load-seconds 6 --rounds 2

Per label (option × throughput/TTFT/TPOT/E2E) and pooled: the false-alarm rate with the Holm adjustment the
report uses (ab/family.py) and, from the same runs, what the 95%-per-label labels of earlier reports would have
said; per run: the share with at least one false label (the family-wise error rate the adjustment promises to
keep at or below 5%). Binomial CIs are Clopper–Pearson (exact). Labels within one run share its conditions, so
the pooled per-label CI treats them as independent and is too narrow; the per-run rate has no such caveat.

Resumable: each finished run appends one line to WORK/runs.jsonl at once; a rerun with the same --work skips
what is there. Arguments after -- go to `normswap ab`. The probe servers, the reference probe curve and the int8
attribution are skipped by default (--probe-shifts '' --probe-grid 0 --attribution off: they run after every
load round and cannot move a load label, and save ~3.5 min a run); --with-probe keeps them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import cpu_info, kind_slug  # noqa: E402  (benchmarks/ is on sys.path when this file runs)

LATENCY_KEYS = ("throughput", "ttft_p50", "tpot_mean", "e2e_p50")


def _head() -> str | None:
    """The commit the run measured (the A/A runs of one --work folder may span several)."""
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    return r.stdout.strip() or None


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial CI for k successes in n: the p where P(X >= k) and P(X <= k) reach (1 - level) / 2,
    by bisection on the binomial CDF (no scipy)."""
    if n <= 0:
        return (0.0, 1.0)
    a = (1 - level) / 2

    def cdf(x: int, p: float) -> float:  # P(X <= x)
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(x + 1))

    def solve(f) -> float:  # f decreasing in p, root in [0, 1]
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: (1 - cdf(k - 1, p)) * -1 + a)  # P(X >= k; p) = a
    upper = 1.0 if k == n else solve(lambda p: cdf(k, p) - a)  # P(X <= k; p) = a
    return lower, upper


def run_record(results: dict, summary: dict, wall_s: float) -> dict:
    """What one A/A run adds to runs.jsonl: its labels adjusted and unadjusted, p-values and resolution."""
    rec = {"run_dir": summary.get("run_dir"), "wall_s": round(wall_s, 1), "failed": summary.get("failed", []),
           "cpu_kind": cpu_info()["kind"], "commit": _head(),
           "load_avg_1m_after": round(os.getloadavg()[0], 2),
           "labels": {}, "unadjusted": {}, "p": {}, "detectable": {}}
    for option, c in results.get("comparisons", {}).items():
        ld = c.get("load") or {}
        for k in LATENCY_KEYS:
            if not ld.get(k):
                continue
            key = f"{option}/{k}"
            rec["labels"][key] = ld["labels"][k]
            rec["unadjusted"][key] = (ld.get("unadjusted") or {}).get("labels", {}).get(k, ld["labels"][k])
            rec["p"][key] = ld[k].get("p")
            rec["detectable"][key] = (ld.get("resolution") or {}).get(k, {}).get("detectable")
    return rec


def _rate(k: int, n: int) -> dict:
    lo, hi = clopper_pearson(k, n)
    return {"false": k, "of": n, "rate": k / n if n else None, "ci95": [lo, hi]}


def summarize(records: list[dict]) -> dict:
    """Per-label and per-run false-alarm rates of the A/A runs, adjusted and unadjusted."""
    ok = [r for r in records if r["labels"] and not r["failed"]]
    keys = sorted({k for r in ok for k in r["labels"]})
    out = {"runs": len(ok), "runs_failed": len(records) - len(ok), "labels_per_run": len(keys)}
    for kind in ("labels", "unadjusted"):
        false = [[r[kind].get(k, "no difference") != "no difference" for k in keys] for r in ok]
        out[kind] = {
            "per_label": {k: _rate(sum(f[i] for f in false), len(ok)) for i, k in enumerate(keys)},
            "pooled_per_label": _rate(sum(map(sum, false)), len(ok) * len(keys)),
            "runs_with_any": _rate(sum(any(f) for f in false), len(ok)),
            "false_labels_per_run": sum(map(sum, false)) / len(ok) if ok else None}
    det = [r["detectable"].get(k) for r in ok for k in keys if r["detectable"].get(k) is not None]
    out["detectable_median"] = sorted(det)[len(det) // 2] if det else None
    out["wall_s_median"] = sorted(r["wall_s"] for r in ok)[len(ok) // 2] if ok else None
    return out


def result_table(summary: dict, cpu: dict, ab_args: list[str]) -> dict:
    """benchmarks/results/ format (render_readme.py): one row per label kind, per-run rate last."""
    def cell(r: dict) -> str:
        return f"{r['rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] ({r['false']}/{r['of']})" if r["of"] else "–"

    rows = [[("Holm over the report's labels (today)" if kind == "labels" else "95% per label (before)"),
             cell(summary[kind]["pooled_per_label"]), f"{summary[kind]['false_labels_per_run']:.2f}",
             cell(summary[kind]["runs_with_any"])] for kind in ("labels", "unadjusted")]
    settings = "default settings" if not ab_args else "settings: " + " ".join(ab_args)
    return {"title": f"A/A false alarms of the load labels (normswap ab --aa, {settings})",
            "benchmark": "benchmarks/ab_error_rates.py " + " ".join(ab_args),
            "machine": f"{cpu['model']}, {cpu['cores']} cores",
            "date": time.strftime("%Y-%m-%d"),
            "cpu_flags": cpu["kind"] + " (" + " ".join(cpu["flags"]) + ")",
            "notes": (f"{summary['runs']} A/A runs of {summary['labels_per_run']} load labels each; the goal is a "
                      f"per-run rate at most 0.05. Clopper–Pearson 95% CIs; the pooled per-label CI treats the "
                      f"labels of one run as independent (too narrow). Median smallest detectable change: "
                      f"±{100 * (summary['detectable_median'] or 0):.0f}%; median wall {summary['wall_s_median']} s."),
            "columns": ["labels", "false-alarm rate per label", "false labels per run", "runs with >= 1 false label"],
            "rows": rows, "summary": summary, "cpu": cpu}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20, help="A/A runs to have in WORK/runs.jsonl (>= 20 for the README)")
    p.add_argument("--work", default="", help="run folders and runs.jsonl (resumable; default "
                                             "runs/ab-error-rates-KIND, one per CPU kind)")
    p.add_argument("--result", default="", help="result file (default benchmarks/results/ab_error_rates_KIND.json; "
                                                "'-' = none)")
    p.add_argument("--with-probe", action="store_true",
                   help="keep the probe servers and curve (default: --probe-shifts '' --probe-grid 0)")
    p.add_argument("ab_args", nargs=argparse.REMAINDER, help="after --: further `normswap ab` arguments")
    args = p.parse_args()
    ab_args = [a for a in args.ab_args if a != "--"]
    if "--aa" in ab_args or "--out" in ab_args:
        raise SystemExit("--aa and --out are set by this script; drop them from the arguments after --")
    work = Path(args.work or f"runs/ab-error-rates-{kind_slug(cpu_info())}")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "runs.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    kinds = {r.get("cpu_kind") for r in records} - {None}
    if kinds and kinds != {cpu_info()["kind"]}:  # the box's kind changed under a kept --work folder
        raise SystemExit(f"{log} holds A/A runs measured on {sorted(kinds)}, this CPU is {cpu_info()['kind']}: "
                         f"give another --work (the default has the kind in its name)")
    cmd = [sys.executable, "-m", "vllm_normswap.cli", "ab", "--aa", "--out", str(work / "runs"),
           *([] if args.with_probe else ["--probe-shifts", "", "--probe-grid", "0", "--attribution", "off"]), *ab_args]
    bar = tqdm(total=args.runs, initial=min(len(records), args.runs), desc="A/A runs", unit="run")
    while len(records) < args.runs:
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
        if not summary or not Path(summary.get("results", "")).is_file():
            raise SystemExit(f"normswap ab --aa failed (exit {proc.returncode}); nothing appended. stderr tail:\n"
                             + proc.stderr[-3000:])
        rec = run_record(json.loads(Path(summary["results"]).read_text()), summary, time.monotonic() - t0)
        with log.open("a") as f:  # one line per finished run: an interrupted benchmark keeps what it measured
            f.write(json.dumps(rec) + "\n")
        records.append(rec)
        bar.update(1)
        bar.set_postfix_str(f"runs with a false label: {summarize(records)['labels']['runs_with_any']['false']}")
    bar.close()
    cpu = cpu_info()
    summary = summarize(records[:args.runs] if args.runs else records)
    table = result_table(summary, cpu, ab_args)
    result = args.result or str(HERE / "results" / f"ab_error_rates_{kind_slug(cpu)}.json")
    if result != "-":
        Path(result).write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps({"result_file": None if result == "-" else result, **summary, "cpu": cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
