"""scripts/cpu_share.sh gives a command the CPU time of fewer cores than the box has: two busy processes, each
free to run on its own core, get together no more than the share; the exit status comes through, and the cgroup
is gone afterwards. The CPU time is read from the processes themselves (resource usage), not from the cgroup."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BUSY = """
import json, os, resource, sys, time
pids = []
for _ in range(2):  # two spinning children: without a share they would use two cores
    pid = os.fork()
    if pid == 0:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            pass
        os._exit(0)
    pids.append(pid)
t0 = time.monotonic()
for pid in pids:
    os.waitpid(pid, 0)
wall = time.monotonic() - t0
use = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"cpu": use.ru_utime + use.ru_stime, "wall": wall}))
sys.exit(3)
"""


def test_half_a_core_between_two_busy_processes():
    proc = subprocess.run(["scripts/cpu_share.sh", "0.5", sys.executable, "-c", BUSY], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode == 2 and "no writable cgroup cpu controller" in proc.stderr:  # the script's own check
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 3, proc.stderr[-2000:]  # the command's own exit status
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # each child spins until 2 s of wall time have passed, so together they get 2 x 2 s of CPU on two free cores
    # and 1 s under a half-core share (a little more within one 10 ms period)
    assert got["cpu"] / got["wall"] <= 0.6, got
    assert "nr_throttled" in proc.stderr and "still holds processes" not in proc.stderr, proc.stderr[-2000:]
    (group,) = re.findall(r"cores\) in (\S+)", proc.stderr)
    assert not Path(group).exists(), group
