"""runtime/placement.py on real processes: a 'server' whose child binds itself to one core (as vLLM's worker
does) while its own threads stay unbound; the worker's core and the spare ones must be read from the affinities
alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from vllm_normswap.runtime.placement import worker_and_spare

SERVER = """
import os, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c",
    "import os, time; os.sched_setaffinity(0, {%d}); print('bound', flush=True); time.sleep(60)"],
    stdout=subprocess.PIPE, text=True)
assert worker.stdout.readline().strip() == "bound"
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to tell the worker's from the spare")
def test_bound_child_gives_worker_and_spare_cores():
    allowed = os.sched_getaffinity(0)
    core = min(allowed)
    server = subprocess.Popen([sys.executable, "-c", SERVER % core], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        assert worker_and_spare([server.pid]) == ([core], sorted(allowed - {core}))
    finally:
        subprocess.run(["pkill", "-P", str(server.pid)])
        server.kill()


def test_nothing_bound_means_no_spare_core():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        assert worker_and_spare([proc.pid]) == ([], [])
        assert worker_and_spare([2 ** 22 + 12345]) == ([], [])  # a pid that does not exist
    finally:
        proc.kill()
