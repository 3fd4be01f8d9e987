"""Step runner and JSON writer of benchmarks/gpu_check.sh (standard library only: it runs before the GPU
environment exists). The pytest report conversion is junit_report.py; the GPU and version probes, gpu_probe.py.

    python benchmarks/gpu_check.py step --out DIR --name NAME --limit S [--stdout-json | --junit] [--dry-run]
                                        -- CMD...
    python benchmarks/gpu_check.py finish --out DIR

Every step leaves steps/NAME.json (status, duration, limit, command, the paths of its files) and rewrites
summary.json, so whatever ends the run early, the results so far are on disk. Data files: NAME.json (the command's
stdout with --stdout-json; with --junit, the pytest report converted: one entry per test), logs/NAME.log.

A step runs in its own process group. At its limit minus GRACE_S it gets SIGINT, so pytest still writes its
report for the tests that finished; at the limit the whole group gets SIGKILL. The group is killed after every
step too: a vLLM engine process left behind would hold the GPU's memory and fail the next step.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from junit_report import junit_to_json

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 600  # the whole check must fit in a GPU for 10 minutes
GRACE_S = 10
FILE_SUFFIXES = (".py", ".sh")  # command arguments with these endings are repository files that must exist


def write_json(path: Path, obj) -> None:
    """Write atomically: a run killed mid-write leaves the previous version, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def rel(path: Path, out: Path) -> str:
    """Paths in the JSON are relative to the output dir: it is copied off the machine as a whole."""
    return str(Path(os.path.relpath(path, out)))


# ---------------- one step ----------------

def run_with_limit(cmd: list[str], limit: float, stdout, stderr, env: dict) -> tuple[int | None, bool, str]:
    """(returncode, timed_out, error): the command in its own process group, SIGINT at limit - GRACE_S,
    SIGKILL at the limit; the group is killed at the end in any case."""
    try:
        # SIGINT back to its default: a script started in the background (nohup, `&`) inherits it ignored, and a
        # Python child would then never turn it into KeyboardInterrupt, so pytest would write no report
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, cwd=ROOT, env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    except OSError as err:
        return None, False, f"could not start: {err}"
    timed_out = False
    try:
        rc = proc.wait(timeout=max(limit - GRACE_S, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    _kill_group(proc.pid, signal.SIGKILL)
    return rc, timed_out, ""


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def referenced_files(cmd: list[str]) -> list[str]:
    return [arg for arg in cmd if arg.endswith(FILE_SUFFIXES) and not arg.startswith("-")]


def collect(cmd: list[str], python: str) -> dict:
    """A dry run's check of a pytest step: the same selection, collected only, with this environment's
    interpreter (the GPU one does not exist yet)."""
    argv = [python] + [a for a in cmd[1:] if not a.startswith("--junitxml") and a != "-q"] + ["--collect-only", "-q"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    return {"returncode": proc.returncode, "tests": ids,
            **({"output": (proc.stdout + proc.stderr)[-3000:]} if proc.returncode or not ids else {})}


def step(a) -> int:
    out = Path(a.out).resolve()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    record = {"name": a.name, "limit_s": a.limit, "command": shlex.join(cmd)}
    if a.dry_run:
        missing = [f for f in referenced_files(cmd) if not (ROOT / f).is_file()]
        record.update(status="planned", files=referenced_files(cmd), problems=[f"missing file: {f}" for f in missing])
        if a.junit and not missing:
            record["collected"] = collect(cmd, a.python)
            if record["collected"]["returncode"] or not record["collected"]["tests"]:
                record["problems"].append("pytest selection does not collect")
        print(f"  [{a.limit:>4.0f} s] {a.name}: {record['command']}"
              + "".join(f"\n           PROBLEM: {p}" for p in record["problems"]), flush=True)
        save_step(out, record)
        return 1 if record["problems"] else 0

    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{a.name}.log"
    data = out / f"{a.name}.json"
    junit = out / f"{a.name}.junit.xml"
    for stale in (data, junit):  # a previous run's file must not pass for this run's result
        stale.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"gpu_check: {a.name} (limit {a.limit:.0f} s): {record['command']}", file=sys.stderr, flush=True)
    start_wall, t0 = time.time(), time.monotonic()
    with open(log, "w") as log_f:
        if a.stdout_json:
            with open(out / f"{a.name}.stdout", "w") as out_f:
                rc, timed_out, error = run_with_limit(cmd, a.limit, out_f, log_f, env)
        else:
            rc, timed_out, error = run_with_limit(cmd, a.limit, log_f, subprocess.STDOUT, env)
    duration = time.monotonic() - t0
    status = "timeout" if timed_out else "error" if error else "ok" if rc == 0 else "failed"
    record.update(status=status, returncode=rc, duration_s=round(duration, 1), started_unix=round(start_wall, 1),
                  log=rel(log, out))
    if error:
        record["error"] = error
    if a.stdout_json:
        raw = out / f"{a.name}.stdout"
        text = raw.read_text()
        try:
            write_json(data, json.loads(text))
            raw.unlink()
            record["json"] = rel(data, out)
        except json.JSONDecodeError:
            record["stdout"] = rel(raw, out)  # kept as it is: what the command printed instead of JSON
            if status == "ok":
                record.update(status="failed", error="stdout is not JSON")
    if a.junit:
        report = junit_to_json(junit)
        write_json(data, report)
        record.update(json=rel(data, out), tests=report["counts"])
        if junit.exists():
            record["junit"] = rel(junit, out)
    save_step(out, record)
    print(f"gpu_check: {a.name}: {record['status']} in {duration:.0f} s", file=sys.stderr, flush=True)
    return 0 if record["status"] == "ok" else 1


# ---------------- summary ----------------

def save_step(out: Path, record: dict) -> None:
    records = load_steps(out)
    record["index"] = next((r["index"] for r in records if r["name"] == record["name"]), len(records))
    write_json(out / "steps" / f"{record['name']}.json", record)
    write_json(out / "summary.json", summarize(load_steps(out), finished=False))


def load_steps(out: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted((out / "steps").glob("*.json"))]
    return sorted(records, key=lambda r: r["index"])


def summarize(records: list[dict], finished: bool) -> dict:
    """The run at a glance: each step's status, duration and files, and whether everything passed."""
    steps = [{k: r[k] for k in ("name", "status", "limit_s", "duration_s", "returncode", "json", "log", "tests",
                                "error", "problems") if k in r} for r in records]
    by_status: dict[str, list[str]] = {}
    for r in records:
        by_status.setdefault(r["status"], []).append(r["name"])
    planned = all(r["status"] == "planned" for r in records) and bool(records)
    ok = bool(records) and all(r["status"] in ("ok", "planned") and not r.get("problems") for r in records)
    return {"dry_run": planned, "finished": finished, "ok": ok, "budget_s": BUDGET_S,
            "limits_sum_s": sum(r["limit_s"] for r in records),
            "duration_sum_s": round(sum(r.get("duration_s", 0) for r in records), 1),
            "by_status": by_status, "steps": steps}


def finish(a) -> int:
    out = Path(a.out).resolve()
    summary = summarize(load_steps(out), finished=True)
    write_json(out / "summary.json", summary)
    print(f"gpu_check: {'all steps ok' if summary['ok'] else 'NOT all ok: ' + json.dumps(summary['by_status'])}; "
          f"limits {summary['limits_sum_s']:.0f} s of {BUDGET_S} s; summary: {out / 'summary.json'}", flush=True)
    if summary["limits_sum_s"] > BUDGET_S:
        print(f"gpu_check: the step limits add up to more than {BUDGET_S} s", file=sys.stderr)
        return 1
    return 0 if summary["ok"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step", help="run one step (or, with --dry-run, check and print it)")
    s.add_argument("--out", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--limit", type=float, required=True, help="seconds")
    kind = s.add_mutually_exclusive_group()
    kind.add_argument("--stdout-json", action="store_true", help="the command prints JSON on stdout")
    kind.add_argument("--junit", action="store_true", help="a pytest run writing OUT/NAME.junit.xml")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--python", default=sys.executable, help="dry run: the interpreter that collects pytest steps")
    s.add_argument("cmd", nargs=argparse.REMAINDER)
    f = sub.add_parser("finish", help="write the final summary.json; exit 0 when every step is ok")
    f.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.command == "step":
        return step(a)
    return finish(a)


if __name__ == "__main__":
    sys.exit(main())
