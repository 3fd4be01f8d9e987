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
- vLLM binds its CPU worker through OpenMP variables it sets around the worker's creation
  (``vllm/utils/ompmultiprocessing.py``: ``OMP_NUM_THREADS`` and ``OMP_PLACES`` + ``OMP_PROC_BIND``, or
  ``GOMP_CPU_AFFINITY`` / ``KMP_AFFINITY`` when that runtime is preloaded). A spawned worker's OpenMP runtime reads
  them when it loads; a forked one inherits a runtime loaded before they were set, so they would do nothing and
  the worker would run unbound on every core (seen with ``taskset``, docs/environment.md). The child therefore
  applies them itself, right after the fork and before any parallel region: its cores as the affinity of its one
  thread (threads created later inherit it) and the thread count through ``torch.set_num_threads``.

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


def _ids(text: str) -> set[int]:
    """'0,2-3' or '0 2 3' (an OpenMP CPU list) as {0, 2, 3}, through vLLM's own parser of such lists; ValueError on
    anything else."""
    from vllm.utils.cpu_resource_utils import parse_id_list  # loaded already where a worker forks

    ids = set(parse_id_list(",".join(text.replace(",", " ").split())))
    if not ids:
        raise ValueError(text)
    return ids


def omp_binding(env) -> tuple[set[int] | None, int | None]:
    """(cores, threads) that the OpenMP variables in ``env`` bind a process to, in the forms vLLM writes them
    (utils/ompmultiprocessing.py); None for what they leave open. Where vLLM gives one core per thread
    (GOMP_CPU_AFFINITY, KMP_AFFINITY's proclist) the cores are returned as one set: threads share them."""
    cores = None
    if env.get("OMP_PLACES") and env.get("OMP_PROC_BIND", "").lower() == "true":
        places = env["OMP_PLACES"].strip()
        if not (places.startswith("{") and places.endswith("}")):
            raise ValueError(f"OMP_PLACES={places!r}: expected one place, '{{0,1,...}}', as vLLM writes it")
        cores = _ids(places[1:-1])
    elif env.get("GOMP_CPU_AFFINITY"):
        cores = _ids(env["GOMP_CPU_AFFINITY"])
    elif "proclist=[" in env.get("KMP_AFFINITY", ""):
        cores = _ids(env["KMP_AFFINITY"].split("proclist=[", 1)[1].split("]", 1)[0])
    threads = int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS") else None
    return cores, threads


def apply_omp_binding() -> None:
    """In a forked child: what its OpenMP runtime would have done with vLLM's variables, had it loaded now."""
    try:
        cores, threads = omp_binding(os.environ)
        if cores is not None:
            os.sched_setaffinity(0, cores)
        if threads is not None:
            import torch  # loaded already: the parent imported vLLM

            torch.set_num_threads(threads)
    except (ValueError, OSError) as err:  # a binding we cannot read or apply: run unbound, as before, and say so
        log.warning("forked process %d left unbound: %s", os.getpid(), err)


def _after_fork_in_child() -> None:
    close_inherited_server_sockets()
    apply_omp_binding()


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
    os.register_at_fork(after_in_child=_after_fork_in_child)
    _state["installed"] = True
    return True
