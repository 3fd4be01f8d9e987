"""Two replicas of one option behind one scrape config (docs/scaling.md): Prometheus sees two instances with the
same model_name, and the recording rules add them up: the whole-run outlier ratio equals (outliers of A + B) /
(elements of A + B) computed from the two servers' own /metrics, and the token counter is the sum of both.
Slow (two vLLM servers, ~2 min on 2 cores): pytest -m slow tests/monitoring/test_replicas.py
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "monitoring"))
from local_stack import Prometheus, core_share, option_server, send_traffic  # noqa: E402

from utils import get_open_port  # noqa: E402
from vllm_normswap.ab import metrics as server_metrics  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus not on PATH (Debian: apt-get install prometheus)")]
OPTION = "rms-gelu"


def test_replicas_add_up(checkpoints, tmp_path):
    servers = []
    try:
        for i in range(2):
            s = option_server(OPTION, checkpoints[OPTION], get_open_port(), tmp_path / f"r{i}",
                              observe={"thresholds": [1.0, 3.0]}, extra=["--enforce-eager", "--max-model-len", "512"],
                              cores=core_share(i, 2, os.cpu_count() or 1))
            servers.append(s)
            s.start().wait_healthy()
        # one scrape config: both replicas are targets of one option (as targets/*.yml or k8s pods would be)
        targets = {OPTION: [f"127.0.0.1:{s.port}" for s in servers]}
        with Prometheus(targets, tmp_path, get_open_port()) as prom:
            prom.wait_scraped(2)
            # the servers differ in traffic: replica 0 gets two concurrent clients, replica 1 one
            send_traffic({OPTION: servers[0].url}, seconds=8, concurrency=2, max_tokens=8)
            send_traffic({OPTION: servers[1].url}, seconds=4, concurrency=1, max_tokens=8, seed=1)
            time.sleep(4)
            direct = [server_metrics.parse(server_metrics.scrape(s.url)) for s in servers]
            instances = {r["metric"]["instance"] for r in
                         prom.api.query(f'vllm:num_requests_running{{model_name="{OPTION}"}}')}
            assert instances == {f"127.0.0.1:{s.port}" for s in servers}

            generated = sum(d["vllm"]["vllm:generation_tokens_total"] for d in direct)
            (total,) = prom.api.query(f'sum by (model_name) (vllm:generation_tokens_total{{model_name="{OPTION}"}})')
            assert float(total["value"][1]) == generated

            rule = {(int(r["metric"]["layer"]), r["metric"]["site"], float(r["metric"]["threshold"])):
                    float(r["value"][1]) for r in prom.api.query("normswap:activation_outlier_ratio:total")}
            assert rule, "the rule has no data"
            for (layer, site, tau), value in rule.items():
                outliers = sum(d["outliers"][(layer, site, tau)] for d in direct)
                elements = sum(d["elements"][(layer, site)] for d in direct)
                assert value == pytest.approx(outliers / elements, rel=1e-12, abs=0), (layer, site, tau)
            # not the mean of per-replica ratios (which differ, since the traffic differs)
            key = max(rule, key=lambda k: rule[k])
            per_replica = [d["outliers"][key] / d["elements"][key[:2]] for d in direct]
            assert per_replica[0] != per_replica[1]
    finally:
        for s in servers:
            s.stop()
