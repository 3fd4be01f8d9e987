"""The cores vLLM's CPU worker is bound to, and the spare ones, read from a running server.

vLLM's CPU worker binds its OpenMP threads to cores (``VLLM_CPU_OMP_THREADS_BIND``, by default all but the
reserved ones); the API server and the EngineCore are left to the scheduler, and so is a load generator. On a
2-core box (AVX512-BF16 EPYC, benchmarks/ab_noise_sources.py) locust bound to the spare core made one bf16 zoo
server 1.6x faster (672 against 414 tok/s) with a smaller round-to-round spread (sd of log tok/s 0.19 against
0.24); the API server and EngineCore moved there too made it slower (359 tok/s): they need both cores. So the
A/B binds only its load generator (ab/loadgen.py). A forked worker (`normswap ab`'s default on CPU) binds itself
as a spawned one does (runtime/engine_fork.py); under ``VLLM_CPU_OMP_THREADS_BIND=nobind`` nothing is bound and
locust stays where the scheduler puts it.

The cores are read, not assumed: a thread whose affinity is narrower than this process's allowed set was bound
by vLLM; the union of those sets is the worker's. With no spare core (a worker bound to every core, or one
core in all) the spare set is empty and nothing is bound.
"""

from __future__ import annotations

import os

import psutil


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # the process ended
        return []


def worker_and_spare(server_pids) -> tuple[list[int], list[int]]:
    """(cores some server thread is bound to, this process's other cores); ([], []) when nothing is bound."""
    allowed = os.sched_getaffinity(0)
    bound: set[int] = set()
    for pid in server_pids:
        try:
            procs = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            for tid in _threads(p):
                try:
                    a = os.sched_getaffinity(tid)
                except OSError:
                    continue
                if a < allowed:  # narrower than the box: vLLM bound it
                    bound |= a
    return sorted(bound), sorted(allowed - bound) if bound else []
