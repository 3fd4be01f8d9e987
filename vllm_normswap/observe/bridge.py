"""API-server side of the metrics bridge: make worker-side counters appear on vLLM's own /metrics.

vLLM serves /metrics from prometheus_client's global REGISTRY, or, when PROMETHEUS_MULTIPROC_DIR is set (by the
operator, or by vLLM itself for --api-server-count > 1), from a MultiProcessCollector over that directory.
Metrics created in EngineCore / worker processes reach neither by default. So:

- the first vLLM process of a run (the API server, or the launcher of several) creates a private directory and
  passes it to every child in NORMSWAP_METRICS_DIR; it removes the directory at exit;
- without PROMETHEUS_MULTIPROC_DIR, a MultiProcessCollector over the private directory joins REGISTRY, next to
  vLLM's in-memory metrics (we never set PROMETHEUS_MULTIPROC_DIR ourselves: that would hide them);
- with PROMETHEUS_MULTIPROC_DIR, workers write there and vLLM's collector reads them. An operator-set directory
  may hold files of a previous run: the first process removes ours (``*_normswap-*.db``), so a restart never
  shows old values (vLLM's own stale files are the operator's to wipe, as vLLM warns).
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import tempfile

from vllm_normswap.observe.metric_files import DIR_ENV, FILE_ID

_registered = False


def register_metrics_bridge() -> None:
    """Idempotent and cheap (no torch); runs in every vLLM process via ``vllm_normswap.register()``."""
    global _registered
    if _registered:
        return
    _registered = True
    path = os.environ.get(DIR_ENV)
    if not path or not os.path.isdir(path):  # first process of this run
        path = tempfile.mkdtemp(prefix="normswap-metrics-")
        os.environ[DIR_ENV] = path
        atexit.register(shutil.rmtree, path, True)
        operator_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if operator_dir:
            check_writable_dir(operator_dir)
            remove_stale_files(operator_dir)
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import REGISTRY
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(REGISTRY, path=path)


def check_writable_dir(directory: str) -> None:
    """PROMETHEUS_MULTIPROC_DIR must be a writable directory before vLLM starts; otherwise prometheus_client fails
    later, inside a worker, with a bare PermissionError."""
    probe = os.path.join(directory, f".normswap-write-probe-{os.getpid()}")
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as err:
        raise RuntimeError(
            f"PROMETHEUS_MULTIPROC_DIR={directory!r} is not a writable directory ({err.strerror}); create it with "
            "write permission for the server's user (mkdir -p DIR && chmod u+w DIR), or unset "
            "PROMETHEUS_MULTIPROC_DIR to let vLLM use its own temporary directory") from None


def remove_stale_files(directory: str) -> list[str]:
    """Remove the observer's files (only ours) from a multiprocess directory; returns the removed paths."""
    stale = glob.glob(os.path.join(directory, "*_" + FILE_ID.format(pid="*") + ".db"))
    for f in stale:
        os.remove(f)
    return stale
