"""A server that cannot start is recorded in results.json and the report, not a crash of `normswap ab`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_checkpoint

pytestmark = pytest.mark.server


def test_failed_server_is_recorded(tmp_path):
    ckpt = make_checkpoint(tmp_path / "broken", "ln-gelu")
    config = json.loads((ckpt / "config.json").read_text())
    config["norm_type"] = "batchnorm"  # the server refuses it at load
    (ckpt / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "vllm_normswap.cli", "ab", "--option", f"ln-gelu={ckpt}",
                           "--precisions", "bf16", "--probe-shifts", "", "--docs", "2", "--port", "8260",
                           "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failed"] == ["ln-gelu-bf16"]
    results = json.loads(Path(summary["results"]).read_text())
    run = results["runs"][0]
    assert run["status"] == "failed" and "batchnorm" in run["error"]  # the server's own message, from its log
    assert (Path(summary["run_dir"]) / run["log"]).is_file()
    assert results["analysis"]["decision"]["verdict"] == "inconclusive"
    html = Path(summary["report_html"]).read_text()
    assert "failed" in html and "no data for this figure" in html
