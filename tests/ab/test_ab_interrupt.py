"""Ctrl-C in the middle of the load test: SIGINT to `normswap ab`'s process group, as a terminal sends it, with
the fork server on (the servers are children of the fork helper, which must survive the Ctrl-C to stop them) and
off (a fresh process per server, whose log is then a default server log: no deprecation or duplicate-key
warning). Ten seconds later no process of the run is alive and nothing listens on its servers' ports;
results.json holds the phases that finished; the exit code is 130."""

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from ab_helpers import ab_command
from utils import make_checkpoint

pytestmark = pytest.mark.server
OPTION = "ln-gelu"
# one server, the smallest quality eval, and a load phase far longer than the test waits: the SIGINT lands in it
ARGV = ["--options", OPTION, "--precisions", "bf16", "--probe-shifts", "", "--docs", "2", "--doc-tokens", "64",
        "--prompts", "8", "--users", "2", "--max-tokens", "4", "--warmup-max-s", "10", "--load-seconds", "600",
        "--rounds", "2", "--min-requests", "8"]
GONE_S = 10.0  # every process of the run must be gone this long after the SIGINT


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


def _listening(ports: set[int]) -> list[int]:
    return sorted({c.laddr.port for c in psutil.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port in ports})


@pytest.mark.parametrize("forkserver", ["1", "0"], ids=["forkserver", "fresh-process"])
def test_sigint_mid_load_stops_everything_and_keeps_the_results(tmp_path, forkserver):
    ckpt = make_checkpoint(tmp_path / OPTION, OPTION)
    out = tmp_path / "runs"
    log = open(tmp_path / "ab.log", "w")
    proc = subprocess.Popen(ab_command([*ARGV, "--option", f"{OPTION}={ckpt}", "--out", str(out)]),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "NORMSWAP_FORKSERVER": forkserver})
    try:
        deadline = time.monotonic() + 600
        while not list(out.glob(f"*/load/{OPTION}-bf16/round0")):  # locust has started: the load phase runs
            assert proc.poll() is None, (tmp_path / "ab.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the load phase never started"
            time.sleep(0.5)
        time.sleep(2)  # mid-round
        procs = _tree(proc.pid)
        ports = {c.laddr.port for p in procs for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert ports, "no server port found in the run's process tree"
        t_sigint = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        rc = proc.wait(timeout=60)
        exited_s = time.monotonic() - t_sigint
        time.sleep(max(GONE_S - exited_s, 0))
        assert rc == 130, (tmp_path / "ab.log").read_text()[-3000:]
        assert not _alive(procs), _alive(procs)
        assert not _listening(ports)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    run_dir = next(out.iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["meta"]["status"] == "interrupted" and results["meta"]["interrupted_by"] == "SIGINT"
    run = results["runs"][0]
    assert run["status"] == "interrupted" and run["phases_done"][:2] == ["warmup", "quality"]
    assert run["quality"]["tokens"] > 0 and run["warmup"]["rounds"] >= 1  # the finished phases' numbers
    assert "interrupted (SIGINT)" in (tmp_path / "ab.log").read_text()
    if forkserver == "0":  # a server started the way a user's is: no warning about how it was started
        server_log = (run_dir / run["log"]).read_text()
        for warning in ("DeprecationWarning", "entrypoints.openai.api_server", "Found duplicate keys",
                        "option will be removed"):
            assert warning not in server_log, warning
