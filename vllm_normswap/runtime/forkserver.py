"""Faster vLLM process starts: a fork server that imports vLLM once and forks a child per command line. Opt-in,
NORMSWAP_FORKSERVER=1 (the test suite sets it; docs/environment.md has the figures).

Why: importing vLLM's API server costs about 13 s of CPU on a 2-core box, and a tiny model's
server is healthy 0.5 s after the import ends. A process that starts many servers or offline engines (the test
suite, ``normswap ab``) pays that import each time. Here it pays it once: the fork server imports vLLM, and each
request forks a child that runs ``python -m MODULE ARGS`` or ``python SCRIPT ARGS`` from there, with vLLM's modules
already in ``sys.modules``.

Why it is safe:
- The fork server runs no torch parallel region (it only imports), so the libgomp thread pool a child creates
  later is its own. vLLM's plugins are not loaded before the fork: our ``register()`` runs in the child.
- A child gets exactly the environment it asked for, its own session (``VLLMServer.stop()`` signals its process
  group), its own working directory, and its output in the files it named. What the import itself read from the
  environment cannot change after the fork, so a request whose environment differs from the fork server's in any
  variable but the ``LATE_READ`` ones is started as a new process instead (``can_fork`` says why).
- The child ends the way ``python -m`` ends (``SystemExit`` out of the fork server's main, atexit hooks, flushed
  streams), so its exit status is the program's. The fork server reaps it and hands the status back.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENV = "NORMSWAP_FORKSERVER"
# imported once: torch, vLLM's engine and its API server, i.e. what the server entrypoint
# (vllm_normswap.serve.ENTRYPOINT) imports, but not the entrypoint module itself: runpy runs it as __main__ in the
# child and warns ("found in sys.modules ... prior to execution") when it was imported already
PRELOAD = ("vllm.engine.arg_utils", "vllm.v1.engine.async_llm", "vllm.entrypoints.launchers.api_server.app_state",
           "vllm.entrypoints.launchers.app", "vllm.entrypoints.launchers.launcher",
           "vllm.entrypoints.launchers.cli_args")
# Variables read only after the import (when the engine is configured, the worker binds its threads, or our plugin
# registers in the child), so a child may set them differently from the fork server. Anything else must match.
# VLLM_API_KEY: read when the app is built (vllm/entrypoints/serve/middleware/register.py), so each server forked
# for the A/B gets its own random key.
LATE_READ = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "PYTEST_CURRENT_TEST", "VLLM_API_KEY")
LATE_READ_PREFIXES = ("NORMSWAP_",)  # our package reads its variables when the plugin registers, in the child


def enabled(env: dict | None = None) -> bool:
    return (os.environ if env is None else env).get(ENV, "0") == "1"


def env_mismatch(want: dict, have: dict) -> list[str]:
    """The variables that differ between ``want`` and ``have`` and may have been read when vLLM was imported (so a
    forked child could not see ``want``'s value); empty when a child can be forked."""
    return sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k) and not _late_read(k))


def _late_read(key: str) -> bool:
    return key in LATE_READ or key.startswith(LATE_READ_PREFIXES)


def target(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """("module", NAME, ARGS) for ``python -m NAME ARGS``, ("path", SCRIPT, ARGS) for ``python SCRIPT.py ARGS``,
    when ``python`` is this interpreter; None for any other command line (interpreter options included)."""
    if len(argv) < 2 or os.path.realpath(argv[0]) != os.path.realpath(sys.executable):
        return None
    if argv[1] == "-m" and len(argv) >= 3:
        return "module", argv[2], list(argv[3:])
    if argv[1].endswith(".py") and os.path.isfile(argv[1]):
        return "path", os.path.abspath(argv[1]), list(argv[2:])
    return None


def can_fork(argv: list[str], env: dict) -> str | None:
    """Why ``argv`` with ``env`` cannot be forked from this process's fork server; None when it can."""
    if not enabled(env):
        return f"{ENV} is not 1"
    if target(argv) is None:
        return f"not `{sys.executable} -m MODULE ...` or `{sys.executable} SCRIPT.py ...`"
    mismatch = env_mismatch(env, dict(os.environ))
    if mismatch:
        return f"the environment differs in variables read at import: {', '.join(mismatch)}"
    return None


# ---- the client side ----------------------------------------------------------------------------------------------

class ForkedProcess:
    """A child of the fork server, with the part of ``subprocess.Popen``'s interface that ``VLLMServer`` and the
    tests use: ``pid``, ``returncode``, ``poll()``, ``wait(timeout)``, ``send_signal``, ``terminate``, ``kill``."""

    def __init__(self, server: "ForkServer", pid: int, args: list[str]):
        self._server, self.pid, self.args, self.returncode = server, pid, args, None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = self._server.request(op="poll", pid=self.pid)["returncode"]
            except (RuntimeError, OSError, ValueError):
                # the fork server is gone (killed with its client's process group, say): its children were
                # re-parented and are reaped by init, so "alive" is all there is to know; the status is lost
                self.returncode = None if _alive(self.pid) else LOST_STATUS
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


LOST_STATUS = -1  # the exit status of a child whose fork server died before reaping it


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie ("Z") has exited: only its reaper is missing
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class ForkServer:
    """The fork server process (``get()`` starts one per client process). Requests are JSON lines on
    its stdin, answers JSON lines on its stdout; a lock keeps one request in flight."""

    def __init__(self, env: dict):
        # its own session: a Ctrl-C in the terminal (SIGINT to the foreground process group) must not kill it
        # while the client still needs it to poll and stop the servers it forked; it exits when the client
        # closes the pipe (EOF on its stdin), which also happens when the client dies
        self.proc = subprocess.Popen([sys.executable, "-m", "vllm_normswap.runtime.forkserver"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
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

    def spawn(self, argv: list[str], env: dict, cwd: str | Path | None, stdout: str | Path,
              stderr: str | Path | None = None) -> ForkedProcess:
        """Fork ``argv`` (see ``target``) with exactly ``env``; its stdout and stderr (default: stdout's file too)
        are appended to the files named."""
        kind, name, args = target(argv)
        answer = self.request(op="spawn", kind=kind, name=name, args=args, env=env, cwd=str(cwd) if cwd else None,
                              stdout=str(stdout), stderr=str(stderr or stdout))
        return ForkedProcess(self, answer["pid"], argv)


_servers: dict[tuple, ForkServer] = {}
_servers_lock = threading.Lock()


def get() -> ForkServer:
    """This process's fork server, started on first use with this process's environment. Keyed by the variables
    read at import, so a process that changes one of them gets a new fork server rather than a stale import."""
    env = dict(os.environ)
    key = tuple(sorted((k, v) for k, v in env.items() if not _late_read(k)))
    with _servers_lock:
        server = _servers.get(key)
        if server is None or server.proc.poll() is not None:
            server = _servers[key] = ForkServer(env)
        return server


def run(argv: list[str], env: dict, timeout: float, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)``, forked from the fork
    server when ``can_fork`` allows it. On timeout the child's process group is killed."""
    if can_fork(argv, env) is not None:
        return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="normswap-fork-") as d:
        out, err = Path(d, "stdout"), Path(d, "stderr")
        child = get().spawn(argv, env, cwd, out, err)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise
        return subprocess.CompletedProcess(argv, child.returncode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


# ---- the fork server itself: `python -m vllm_normswap.runtime.forkserver` -------------------------------------------------

def _child(req: dict) -> None:
    """In the forked child: become ``python -m NAME ARGS`` (or ``python SCRIPT ARGS``) with the requested
    environment, directory and output files. Never returns: SystemExit leaves through the fork server's main, so the
    interpreter ends as it would for ``python -m``."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(f, fd)
        os.close(f)
    if req["cwd"]:
        os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = [req["name"], *req["args"]]  # run_module sets argv[0] to the module's file, as `python -m` does
    if req["kind"] == "module":
        sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
        runpy.run_module(req["name"], run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = os.path.dirname(req["name"])  # `python SCRIPT` puts the script's directory first
        runpy.run_path(req["name"], run_name="__main__")
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
                os.close(sync_w)  # the client may signal the group from now on
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
    # The protocol gets descriptors of its own; fds 0 and 1 become /dev/null and stderr, so nothing the import prints
    # can corrupt an answer, and a child's dup2 of its files over 0-2 leaves it no pipe to the client.
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    for module in PRELOAD:
        __import__(module)
    _serve(requests, answers)  # a forked child leaves through here by SystemExit, as `python -m` would
    # EOF: the client is gone. Nothing here needs flushing, and tearing down the imported torch and vLLM takes
    # seconds: exit now, so that no process of the client outlives it
    os._exit(0)


if __name__ == "__main__":
    main()
