"""Fixtures, and the per-file duration summary; the helpers the fixtures are built from live in utils.py
(re-exported here for tests/ab)."""

from __future__ import annotations

import os

import pytest

from utils import OPTION_VARIANTS, make_checkpoint, shared_tokenizer  # noqa: F401  (make_checkpoint: tests/ab)
from vllm_normswap.registry import OPTIONS

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """option -> checkpoint dir, one for every option of the registry, made once per test session (an option
    without an entry in utils.OPTION_VARIANTS gets the default settings)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {option: make_checkpoint(root / option, option) for option in OPTIONS}


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
