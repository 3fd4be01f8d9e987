"""Metric names, types and help texts: the contract with monitoring/ (dashboards, rules) and the README."""

from __future__ import annotations

from vllm_normswap.registry import ABSMAX, ELEMENTS, HELP, LABELS, OUTLIERS, TOKEN_HISTOGRAMS  # noqa: F401

DIR_ENV = "NORMSWAP_METRICS_DIR"  # private multiprocess directory, created by the first process of a run
FILE_ID = "normswap-{pid}"  # our files' id: no underscore, prometheus_client splits file names on "_"
