"""Faster CPU server starts: fork vLLM's engine processes instead of spawning them. Opt-in, NORMSWAP_FORK_ENGINE=1
(the test suite sets it; docs/environment.md has the figures).

Why: vLLM's CPU platform forces the ``spawn`` start method (``CpuPlatform.check_and_update_config`` overwrites
VLLM_WORKER_MULTIPROC_METHOD), so one server start imports torch and vLLM three times in a row: the API server,
then EngineCore, then the worker, each for about 9 s on a 2-core box, and much longer when the box is busy.
Forked, EngineCore and the worker inherit the API server's imports. fork is vLLM's own default elsewhere (GPU).

Why it is safe here:
- libgomp's thread pool does not survive a fork. Neither the API server nor EngineCore runs a torch parallel
  region before it forks (they load no weights); the worker creates and binds its own threads after the fork.
- A forked child inherits the API server's socket. Left open, a dead API server's port stays bound by its engine
  processes, and clients hang instead of being refused; vLLM's shutdown also trips over the port's other holders
  (a traceback from psutil). The child closes the TCP server sockets it inherited, right after the fork.

vLLM internals touched (pinned 0.32): ``vllm.platforms.cpu.CpuPlatform.check_and_update_config``.
"""

from __future__ import annotations

import errno
import os
import socket

from vllm_normswap.logs import plugin_logger

log = plugin_logger(__name__)  # under vLLM's "vllm" logger: see vllm_normswap.logs
ENV = "NORMSWAP_FORK_ENGINE"
FORK_LOG = f"{ENV}=1: EngineCore and its workers start by fork"  # the log line tests look for
_state = {"installed": False}


def enabled() -> bool:
    return os.environ.get(ENV, "0") == "1"


def close_inherited_server_sockets() -> int:
    """Close the TCP server sockets (bound or listening, no peer) among this process's file descriptors; the number
    closed. The API server binds its port before it starts the engine and listens only later, so at the fork its
    socket is bound, not yet listening; connected TCP sockets and Unix sockets (ZeroMQ's) stay open."""
    closed = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            sock = socket.socket(fileno=fd)  # OSError where fd is not a socket (or already gone)
        except OSError:
            continue
        server = False
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            try:
                sock.getpeername()
            except OSError as err:
                server = err.errno == errno.ENOTCONN
        if server:
            sock.close()
            closed += 1
        else:
            sock.detach()  # leave the descriptor open: it belongs to someone else
    return closed


def install() -> bool:
    """Idempotent; a no-op unless NORMSWAP_FORK_ENGINE=1 and vLLM runs on its CPU platform."""
    if _state["installed"] or not enabled():
        return False
    from vllm.platforms import cpu, current_platform

    if not current_platform.is_cpu():
        return False

    original = cpu.CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        original(cls, vllm_config)
        if os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") != "fork":
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"  # undo the platform's "spawn"
            log.info("%s, not spawn (no second and third import of torch and vLLM)", FORK_LOG)

    cpu.CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    os.register_at_fork(after_in_child=close_inherited_server_sockets)
    _state["installed"] = True
    return True
