"""Faster server starts from one process: a fork server that imports vLLM's API server once and forks a server
per request. Opt-in, NORMSWAP_FORKSERVER=1 (the test suite sets it; docs/environment.md has the figures).

Why: importing ``vllm.entrypoints.openai.api_server`` costs about 13 s of CPU on a 2-core box, and a tiny model's
server is healthy 0.5 s after the import ends. A process that starts many servers (the test suite, ``normswap ab``)
pays that import once per server. Here it pays it once: the fork server imports the module, and each request forks a
child that runs the module as ``__main__``, as ``python -m vllm.entrypoints.openai.api_server ARGS`` would.

Why it is safe:
- The fork server runs no torch parallel region (it only imports), so the libgomp thread pool a server creates
  later is its own. vLLM's own plugins are not loaded before the fork: ``register()`` runs in the child.
- A child gets exactly the environment it asked for, its own session (``stop()`` signals its process group), its
  own working directory and its log on stdout/stderr. What the import itself read from the environment cannot
  change after the fork, so a request whose environment differs from the fork server's in any other variable
  than ``LATE_READ`` is started as a new process instead (``VLLMServer`` falls back to ``Popen``).
- The child ends the way ``python -m`` ends (``SystemExit`` out of the fork server's main, atexit hooks, flushed
  streams), so its exit status is the server's. The fork server reaps it and hands the status back.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ENV = "NORMSWAP_FORKSERVER"
MODULE = "vllm.entrypoints.openai.api_server"  # the one module it pre-imports and runs
# Variables read only after the import (when the engine is configured, the worker binds its threads, or our plugin
# registers in the child), so a child may set them differently from the fork server. Anything else must match.
LATE_READ = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "PYTEST_CURRENT_TEST")
LATE_READ_PREFIXES = ("NORMSWAP_",)


def enabled(env: dict | None = None) -> bool:
    return (os.environ if env is None else env).get(ENV, "0") == "1"


def env_mismatch(want: dict, have: dict) -> list[str]:
    """The variables that differ between ``want`` and ``have`` and are read when vLLM is imported (so a forked
    child would not see ``want``'s value); empty when a child can be forked."""
    keys = set(want) | set(have)
    return sorted(k for k in keys if want.get(k) != have.get(k)
                  and k not in LATE_READ and not k.startswith(LATE_READ_PREFIXES))


def module_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``python -m MODULE`` when ``argv`` runs MODULE with this interpreter, else None."""
    if len(argv) >= 3 and argv[1:3] == ["-m", MODULE] and os.path.realpath(argv[0]) == os.path.realpath(sys.executable):
        return argv[3:]
    return None


# ---- the client side: used by VLLMServer --------------------------------------------------------------------------

class ForkedProcess:
    """A child of the fork server, with the part of ``subprocess.Popen``'s interface that ``VLLMServer`` and the
    tests use: ``pid``, ``returncode``, ``poll()``, ``wait(timeout)``."""

    def __init__(self, server: "ForkServer", pid: int, args: list[str]):
        self._server, self.pid, self.args, self.returncode = server, pid, args, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.request(op="poll", pid=self.pid)["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The fork server process, started by ``get()`` (one per client process and environment). Requests are JSON
    lines on its stdin, answers JSON lines on its stdout; a lock keeps one request in flight."""

    def __init__(self, env: dict):
        self.env = dict(env)
        self.proc = subprocess.Popen([sys.executable, "-m", "vllm_normswap.forkserver"], env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._lock = threading.Lock()
        self._ready = False

    def request(self, **req) -> dict:
        with self._lock:
            if not self._ready:  # the first answer comes once the import is done
                self._read()
                self._ready = True
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server (pid {self.proc.pid}) exited with code {self.proc.wait()}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"fork server: {answer['error']}")
        return answer

    def spawn(self, argv: list[str], env: dict, cwd: str | Path | None, log_path: str | Path) -> ForkedProcess:
        args = module_args(argv)
        assert args is not None, f"not a `python -m {MODULE}` command line: {argv}"
        answer = self.request(op="spawn", args=args, env=env, cwd=str(cwd) if cwd else None, log=str(log_path))
        return ForkedProcess(self, answer["pid"], argv)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # EOF: the fork server exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_servers: dict[tuple, ForkServer] = {}
_servers_lock = threading.Lock()


def get(env: dict | None = None) -> ForkServer:
    """This process's fork server for ``env`` (default: this process's environment), started on first use. The
    import runs in the background: callers only wait for it at their first ``spawn``."""
    env = dict(os.environ if env is None else env)
    key = tuple(sorted((k, v) for k, v in env.items() if not k.startswith(LATE_READ_PREFIXES) and k not in LATE_READ))
    with _servers_lock:
        server = _servers.get(key)
        if server is None or server.proc.poll() is not None:
            server = _servers[key] = ForkServer(env)
        return server


def can_fork(argv: list[str], env: dict) -> str | None:
    """Why ``argv`` with ``env`` cannot be forked from this process's fork server (None when it can)."""
    if not enabled(env):
        return f"{ENV} is not 1"
    if module_args(argv) is None:
        return f"not `{sys.executable} -m {MODULE}`"
    mismatch = env_mismatch(env, dict(os.environ))
    if mismatch:
        return f"the environment differs in variables read at import: {', '.join(mismatch)}"
    return None


# ---- the fork server itself: `python -m vllm_normswap.forkserver` -------------------------------------------------

def _child(req: dict) -> None:
    """In the forked child: become ``python -m MODULE ARGS`` with the requested environment, directory and log. Never
    returns: SystemExit leaves through the fork server's main, so the interpreter ends as it would for ``python -m``."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(devnull)
    if req["cwd"]:
        os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.path[0] = os.getcwd()  # as `python -m` puts the working directory first
    sys.argv = [MODULE, *req["args"]]  # run_module sets argv[0] to the module's file, as `python -m` does
    runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
    sys.exit(0)


def _serve(requests, answers) -> None:
    def answer(**a):
        answers.write(json.dumps(a) + "\n")
        answers.flush()

    answer(ready=True)
    children: dict[int, int | None] = {}
    for line in requests:
        req = json.loads(line)
        if req["op"] == "spawn":
            sync_r, sync_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(sync_r)
                requests.close()
                answers.close()
                os.setsid()  # its own process group: VLLMServer.stop() signals the whole group
                os.close(sync_w)  # tells the fork server that the child leads its group, so the client can signal it
                _child(req)
            os.close(sync_w)
            os.read(sync_r, 1)  # EOF once the child has called setsid (or died)
            os.close(sync_r)
            children[pid] = None
            answer(pid=pid)
        elif req["op"] == "poll":
            pid = req["pid"]
            if children.get(pid) is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    children[pid] = os.waitstatus_to_exitcode(status)
            answer(returncode=children[pid])
        else:
            answer(error=f"unknown op {req['op']!r}")


def main() -> None:
    # The protocol gets its own descriptors; fds 0 and 1 become /dev/null and stderr, so nothing the import prints
    # can corrupt an answer, and a child's dup2 of its log over 0-2 drops every pipe to the client.
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    __import__(MODULE)
    _serve(requests, answers)


if __name__ == "__main__":
    main()
