"""The committed Prometheus files pass Prometheus' own checker: `promtool check config`, `check rules` and the
rule unit tests (monitoring/prometheus/tests/rules_test.yml, expected values worked out by hand there). Also the
committed dashboard JSON is exactly what monitoring/grafana/dashboard.py generates (no hand edits, no drift).

promtool comes with the Debian package `prometheus` (.ci/run installs it); without it these tests skip.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "monitoring" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (Debian: apt-get install prometheus)")


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"promtool {proc.args[1:]} failed:\n{proc.stdout}\n{proc.stderr}"


@needs_promtool
def test_check_config_file_sd():
    """The compose/one-machine config, its rule files included (promtool checks the referenced rules too)."""
    proc = promtool("check", "config", "prometheus.yml")
    assert_ok(proc)
    assert "2 rule files found" in proc.stdout + proc.stderr


@needs_promtool
def test_check_config_k8s(tmp_path):
    """The Kubernetes config. Debian's Prometheus build leaves out Kubernetes service discovery, so its promtool
    rejects `kubernetes_sd_configs` as an unknown field. Then the rest of the file (relabelling regexes, rule
    files) is checked with that one block replaced by an empty static_configs; an upstream promtool (from
    prometheus.io, or in the prom/prometheus image) checks the file verbatim."""
    proc = promtool("check", "config", "prometheus-k8s.yml")
    if proc.returncode == 0:
        return
    out = proc.stdout + proc.stderr
    assert "field kubernetes_sd_configs not found" in out, out  # any other error is a real one
    config = yaml.safe_load((PROM / "prometheus-k8s.yml").read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = [{"targets": []}]
    shutil.copytree(PROM / "rules", tmp_path / "rules")
    (tmp_path / "prometheus-k8s.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert_ok(promtool("check", "config", "prometheus-k8s.yml", cwd=tmp_path))


@needs_promtool
def test_check_rules():
    rules = sorted((PROM / "rules").glob("*.yml"))
    assert {p.name for p in rules} == {"recording.yml", "alerts.yml"}
    assert_ok(promtool("check", "rules", *map(str, rules)))


@needs_promtool
def test_rule_unit_tests():
    proc = promtool("test", "rules", "tests/rules_test.yml")
    assert_ok(proc)
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_dashboard_json_is_generated():
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk not installed (pip install .[test])")
    proc = subprocess.run([sys.executable, str(REPO / "monitoring" / "grafana" / "dashboard.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"committed dashboard JSON differs from the generator:\n{proc.stdout}{proc.stderr}"
