"""NORMSWAP_FORK_ENGINE's at-fork hook (vllm_normswap/runtime/engine_fork.py) on real sockets in a real forked child: it
closes the TCP server sockets the child inherited (bound, or listening) and nothing else, and applies the OpenMP
binding vLLM set for it, which its already-loaded OpenMP runtime would ignore. The servers started by
the suite run forked (tests/conftest.py); tests/serving/test_openai_server.py checks one of them from outside."""

import json
import os
import socket
import subprocess
import sys

import pytest

from vllm_normswap.runtime.engine_fork import close_inherited_server_sockets, omp_binding


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_child_closes_bound_and_listening_tcp_sockets_only():
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))  # what vLLM's API server holds when it starts the engine: bound, not listening
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    client = socket.create_connection(listening.getsockname())
    accepted, _ = listening.accept()
    unix_a, unix_b = socket.socketpair(socket.AF_UNIX)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    closed_fds = {bound.fileno(), listening.fileno()}
    kept_fds = {client.fileno(), accepted.fileno(), unix_a.fileno(), unix_b.fileno(), udp.fileno()}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports through the pipe and never returns into pytest
        try:
            n = close_inherited_server_sockets()
            wrong = [fd for fd in closed_fds if _open(fd)] + [fd for fd in kept_fds if not _open(fd)]
            os.write(w, f"{n} {wrong}".encode())
        finally:
            os._exit(0)
    os.close(w)
    report = os.read(r, 1000).decode()
    os.waitpid(pid, 0)
    os.close(r)
    n, wrong = report.split(" ", 1)
    assert wrong == "[]", f"fds wrongly closed or kept in the child: {wrong}"
    assert int(n) >= 2, report  # ours, and any server socket the test process held already
    # the parent's sockets are untouched: its listener still accepts
    with socket.create_connection(listening.getsockname()) as again:
        conn, _ = listening.accept()
        conn.close()
    assert bound.getsockname()[1] > 0
    for s in (bound, listening, client, accepted, unix_a, unix_b, udp):
        s.close()


# vLLM's binding, as utils/ompmultiprocessing.py writes it, and what a forked child must make of it
@pytest.mark.parametrize("env, want", [
    ({"OMP_PLACES": "{0,2,3}", "OMP_PROC_BIND": "true", "OMP_NUM_THREADS": "3"}, ({0, 2, 3}, 3)),
    ({"GOMP_CPU_AFFINITY": "1 3", "OMP_NUM_THREADS": "2"}, ({1, 3}, 2)),
    ({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[4,5]", "OMP_NUM_THREADS": "2"}, ({4, 5}, 2)),
    ({"GOMP_CPU_AFFINITY": "0-2"}, ({0, 1, 2}, None)),
    ({"OMP_PLACES": "{0}"}, (None, None)),  # places without OMP_PROC_BIND=true bind nothing
    ({}, (None, None)),  # VLLM_CPU_OMP_THREADS_BIND=nobind: vLLM sets nothing
])
def test_omp_binding_reads_what_vllm_writes(env, want):
    assert omp_binding(env) == want


def test_omp_binding_refuses_places_it_cannot_read():
    with pytest.raises(ValueError, match="OMP_PLACES"):
        omp_binding({"OMP_PLACES": "cores", "OMP_PROC_BIND": "true"})


CHILD = """
import json, os, sys
import torch
from vllm_normswap.runtime.engine_fork import apply_omp_binding
core, apply = int(sys.argv[1]), sys.argv[2] == "apply"
os.environ.update(OMP_PLACES="{%d}" % core, OMP_PROC_BIND="true", OMP_NUM_THREADS="1")  # set after the import
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        if apply:
            apply_omp_binding()
        torch.randn(512, 512) @ torch.randn(512, 512)  # a parallel region: the threads it starts inherit the core
        tasks = os.listdir("/proc/self/task")
        out = {"threads": torch.get_num_threads(), "affinity": sorted({c for t in tasks for c in os.sched_getaffinity(int(t))})}
        os.write(w, json.dumps(out).encode())
    finally:
        os._exit(0)
os.close(w)
print(os.read(r, 10000).decode())
os.waitpid(pid, 0)
"""


def _forked_child(core: int, apply: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(core), "apply" if apply else "no"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to see a binding")
def test_forked_child_takes_the_binding_its_openmp_runtime_missed():
    """A new process whose torch (and libgomp) loaded before vLLM's variables were set, as in the API server: its
    forked child must end up on the one core they name, every thread of it, with one torch thread. Without the
    hook (the control) the same child runs on every core: the variables alone do nothing after the load."""
    allowed = os.sched_getaffinity(0)
    core = max(allowed)
    assert _forked_child(core, apply=True) == {"threads": 1, "affinity": [core]}
    # the control: every core, and as many torch threads as cores (OMP_NUM_THREADS=1 came too late)
    assert _forked_child(core, apply=False) == {"threads": len(allowed), "affinity": sorted(allowed)}
