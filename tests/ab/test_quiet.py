"""servers.wait_quiet on real processes: it waits while a process tree computes and not once it is idle."""

import subprocess
import sys
import time

import psutil
import pytest

from vllm_normswap.ab.servers import wait_quiet

pytestmark = pytest.mark.exclusive  # the CPU use of a process that competes with nothing else

BURN = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < {s}: pass\ntime.sleep(60)"


def _kill_tree(p: subprocess.Popen) -> None:
    for child in psutil.Process(p.pid).children(recursive=True):
        child.kill()
    p.kill()


def test_idle_process_does_not_wait():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)  # past the interpreter's start-up
        assert wait_quiet([p.pid]) < 0.6
    finally:
        _kill_tree(p)


def test_waits_for_a_child_that_computes_then_idles():
    # the computing process is a child of the one named, as a vLLM worker is of its API server
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys\n"
                               f"subprocess.run([sys.executable, '-c', {BURN.format(s=1.5)!r}])"])
    try:
        time.sleep(0.3)
        waited = wait_quiet([parent.pid])
        assert 0.9 < waited < 3.0, waited  # the child computes until ~1.5 s after its start
    finally:
        _kill_tree(parent)


def test_gives_up_after_max_s():
    p = subprocess.Popen([sys.executable, "-c", BURN.format(s=30)])
    try:
        time.sleep(0.3)
        assert 1.0 <= wait_quiet([p.pid], max_s=1.0) < 1.6
    finally:
        _kill_tree(p)
