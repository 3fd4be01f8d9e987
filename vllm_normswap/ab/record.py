"""Nothing lost: the run folder, results.json written as the run goes, and a clean stop on SIGINT / SIGTERM.

- ``new_run_dir``: runs/<timestamp>, or runs/<timestamp>-2, -3, ... when that folder exists (two runs started in
  the same second get distinct folders: ``mkdir`` without ``exist_ok`` is the atomic claim).
- ``save``: results.json (the raw measurements) after every phase, before any analysis or plot, written to a
  temporary file and renamed over the old one (vllm_normswap/atomic.py), so a crash or a kill mid-write leaves
  the previous complete file. Everything written is redacted (``auth.redact``): no API key reaches disk.
- ``load``: results.json back, observer counts with their tuple keys again, for ``normswap ab --report RUN``.
- ``interruptible``: SIGINT and SIGTERM raise ``Interrupted`` in the main thread (SIGTERM would otherwise end the
  process without running any ``finally``); a second signal while the run stops is noted and ignored, so the
  servers are stopped and the results written even when the user presses Ctrl-C twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
import sys
from pathlib import Path

from vllm_normswap.atomic import write_text_atomic
from vllm_normswap.ab import auth, metrics

RESULTS = "results.json"
OBSERVER_KEYS = ("observer", "observer_load")
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2); cli.py's too


def new_run_dir(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"{parent}: 999 run folders named {stamp}*; remove some")


def serializable(results: dict) -> dict:
    """results with observer counts keyed by strings (JSON has no tuple keys), redacted."""
    out = dict(results)
    out["runs"] = [{k: metrics.to_jsonable(v) if k in OBSERVER_KEYS and isinstance(v, dict) else v
                    for k, v in r.items()} for r in results.get("runs", [])]
    return auth.redact(out)


def save(run_dir: Path, results: dict) -> Path:
    path = Path(run_dir) / RESULTS
    write_text_atomic(path, json.dumps(serializable(results), indent=1, default=str))
    return path


def load(run_dir: Path) -> dict:
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise SystemExit(f"--report {run_dir}: no {RESULTS} there; give a runs/<timestamp> folder of normswap ab")
    results = json.loads(path.read_text())
    for r in results.get("runs", []):
        for k in OBSERVER_KEYS:
            if isinstance(r.get(k), dict):
                r[k] = metrics.from_jsonable(r[k])
    return results


def scrub(run_dir: Path) -> list[Path]:
    """Redact every text file under ``run_dir`` that holds a key in use (a server log in which vLLM printed an
    --api-key passed through after --, say); the files rewritten."""
    keys = auth.secrets_in_use()
    done = []
    if not keys:
        return done
    for path in Path(run_dir).rglob("*"):
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if any(k in text for k in keys):
            write_text_atomic(path, auth.redact_text(text))
            done.append(path)
    return done


# ---- signals ----

class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during the run (a KeyboardInterrupt, so code that handles Ctrl-C handles both)."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


@contextlib.contextmanager
def interruptible():
    """SIGINT and SIGTERM raise ``Interrupted`` once; later ones are ignored until the block ends."""
    state = {"raised": None}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if state["raised"]:
            print(f"normswap ab: {name} again: still stopping the servers and writing results.json",
                  file=sys.stderr)
            return
        state["raised"] = name
        raise Interrupted(name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in old.items():
            signal.signal(s, h)
