"""Fixtures, and the per-file duration summary; the helpers the fixtures are built from live in utils.py
(re-exported here for tests/ab)."""

from __future__ import annotations

import fcntl
import os
import tempfile

import pytest

from utils import (  # noqa: F401  (make_checkpoint: tests/ab)
    KV_CACHE_GB, OPTION_VARIANTS, make_checkpoint, shared_tokenizer)
from vllm_normswap.registry import OPTIONS

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GB)
# The servers the tests start (directly, or through `normswap ab`) fork EngineCore and the worker instead of
# spawning them (vllm_normswap/runtime/engine_fork.py): a start no longer imports torch and vLLM three times over. The wheel
# test (tests/test_wheel.py) runs the default, spawn, as a user's install does.
os.environ.setdefault("NORMSWAP_FORK_ENGINE", "1")
# ...and `python -m vllm.entrypoints.launchers.api_server.entry` servers are forked from a process per pytest worker that
# imported vLLM once (vllm_normswap/runtime/forkserver.py), not started anew: about 9 s less CPU per server start.
os.environ.setdefault("NORMSWAP_FORKSERVER", "1")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """option -> checkpoint dir, one for every option of the registry, made once per test session (an option
    without an entry in utils.OPTION_VARIANTS gets the default settings)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {option: make_checkpoint(root / option, option) for option in OPTIONS}


# ---- tests that time something run alone ---------------------------------------------------------------------------
# CI runs the suite on two pytest-xdist workers (`-n 2`; `--dist loadfile` keeps a file's shared servers on one
# worker). A test marked `exclusive` compares timings taken at different moments (two load generators on one
# server, a process's CPU use), which the other worker's load would skew: it holds a lock exclusively while every
# other test holds it shared, so it runs while the other worker waits between two tests.

def _lock_path() -> str:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")
    return os.path.join(tempfile.gettempdir(), f"normswap-pytest-{run}.lock")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: nothing runs beside it
        return (yield)
    with open(_lock_path(), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if item.get_closest_marker("exclusive") else fcntl.LOCK_SH)
        try:
            return (yield)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- per-file durations (CI prints them: where the suite's time goes) --------------------------------------------

_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration  # setup + call + teardown


def pytest_terminal_summary(terminalreporter):
    if not _FILE_SECONDS:
        return
    total = sum(_FILE_SECONDS.values())
    terminalreporter.section(f"seconds per test file ({total:.0f} s in all)")
    for path, sec in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{sec:8.1f} s  {100 * sec / max(total, 1e-9):5.1f}%  {path}")
