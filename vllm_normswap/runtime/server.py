"""``VLLMServer``: a vLLM OpenAI-compatible server process, as the tests, the A/B driver and the monitoring stack
run it: start it in its own process group, wait until /health answers, stop it (SIGINT, then SIGKILL), keep its log.
``ServerFailed`` carries the tail of the log when the process dies (or never becomes healthy).

With NORMSWAP_FORKSERVER=1, a ``python -m MODULE`` command line (the server entrypoint) is forked from a process
that imported vLLM once (``vllm_normswap.runtime.forkserver``) instead of started anew.

The command line comes from elsewhere (``vllm_normswap.serve.server_argv``, ``deploy/entrypoint.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from vllm_normswap.runtime import forkserver
from vllm_normswap.serve import CPU_KV_CACHE_GB


class VLLMServer:
    """A vLLM server process. ``with VLLMServer(argv, log) as s: s.url`` waits until /health answers and stops
    the server on exit. If the process dies first, ``ServerFailed`` carries the tail of its log."""

    def __init__(self, argv: list[str], log_path: str | Path, env: dict | None = None, port: int | None = None,
                 startup_timeout: float = 600.0, cwd: str | Path | None = None):
        self.argv, self.log_path = argv, Path(log_path)
        self.port = port if port is not None else int(argv[argv.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GB)
        self.startup_timeout = startup_timeout
        self.cwd = cwd  # working directory of the server (None: this process's)
        self.proc: subprocess.Popen | forkserver.ForkedProcess | None = None

    def start(self) -> "VLLMServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        # own process group (session): stop() must also reach EngineCore and workers
        if forkserver.can_fork(self.argv, self.env) is None:  # NORMSWAP_FORKSERVER=1: vLLM is imported already
            self.proc = forkserver.get().spawn(self.argv, self.env, self.cwd, stdout=self.log_path)
        else:
            self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.cwd, start_new_session=True)
        return self

    def wait_healthy(self) -> "VLLMServer":
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(self.proc.returncode, self.log_tail())
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerFailed(None, f"no /health within {self.startup_timeout:.0f}s\n" + self.log_tail())

    def wait_exit(self, timeout: float) -> int:
        """For servers expected to fail: the exit code (raises TimeoutError if still running)."""
        return self.proc.wait(timeout=timeout)

    def signal_group(self, sig: int) -> None:
        """``sig`` to the server's process group (API server, EngineCore, workers); nothing if it is empty."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT to the group, SIGKILL after ``timeout`` s; then SIGKILL to whatever of the group outlived its
        leader (an engine process that missed the shutdown), so that nothing of the server is left."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal_group(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait()
        self.signal_group(signal.SIGKILL)
        self._log.close()
        return self.proc.returncode

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self):
        return self.start().wait_healthy()

    def __exit__(self, *exc):
        self.stop()


def stop_all(servers: list[VLLMServer], timeout: float = 30.0) -> None:
    """Stop several servers at once: SIGINT to every group first, then wait for each (one shared deadline)."""
    for s in servers:
        if s.proc is not None and s.proc.poll() is None:
            s.signal_group(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for s in servers:
        s.stop(timeout=max(deadline - time.monotonic(), 0.1))


class ServerFailed(RuntimeError):
    def __init__(self, returncode, log_tail: str):
        super().__init__(f"vLLM server exited with code {returncode} before serving; log tail:\n{log_tail}")
        self.returncode, self.log = returncode, log_tail
