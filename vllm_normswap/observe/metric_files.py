"""Where the worker processes write their Prometheus multiprocess files, and how our files are named.

The metric names, labels and help texts are in ``vllm_normswap.registry``.
"""

from __future__ import annotations

DIR_ENV = "NORMSWAP_METRICS_DIR"  # private multiprocess directory, created by the first process of a run
FILE_ID = "normswap-{pid}"  # our files' id: no underscore, prometheus_client splits file names on "_"
