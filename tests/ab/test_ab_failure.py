"""A server that cannot start is recorded in results.json and the report, and `normswap ab` exits 1; bad option
ids or precisions exit 2 at parse time and leave no run folder."""

import json
from pathlib import Path

import pytest

from ab_helpers import run_ab
from utils import make_checkpoint


@pytest.mark.server
def test_failed_server_is_recorded_and_the_exit_code_says_so(tmp_path):
    ckpt = make_checkpoint(tmp_path / "broken", "ln-gelu")
    config = json.loads((ckpt / "config.json").read_text())
    config["norm_type"] = "batchnorm"  # the server refuses it at load
    (ckpt / "config.json").write_text(json.dumps(config))
    proc, summary = run_ab(["--option", f"ln-gelu={ckpt}", "--precisions", "bf16", "--probe-shifts", "", "--docs",
                            "2", "--out", str(tmp_path / "runs")], timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert summary["failed"] == ["ln-gelu-bf16"]
    results = json.loads(Path(summary["results"]).read_text())
    run = results["runs"][0]
    assert run["status"] == "failed" and "batchnorm" in run["error"]  # the server's own message, from its log
    assert (Path(summary["run_dir"]) / run["log"]).is_file()
    assert results["analysis"]["decision"]["verdict"] == "inconclusive"
    html = Path(summary["report_html"]).read_text()
    assert "failed" in html and "no data for this figure" in html


@pytest.mark.parametrize("argv,bad", [(["--options", "ln-gelu,ln-gleu"], "ln-gleu"),
                                      (["--precisions", "bf16,fp8"], "fp8"),
                                      (["--endpoint", "nonsense"], "NAME=VALUE")])
def test_bad_lists_exit_2_before_any_folder(tmp_path, argv, bad):
    proc, _ = run_ab(argv + ["--out", str(tmp_path / "runs")], timeout=120)
    assert proc.returncode == 2 and bad in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_endpoint_name_exits_before_any_folder(tmp_path):
    proc, _ = run_ab(["--endpoint", "ln-gelu-fp8=http://127.0.0.1:1", "--out", str(tmp_path / "runs")], timeout=120)
    assert proc.returncode == 2 and "OPTION-PRECISION" in proc.stderr
    assert not (tmp_path / "runs").exists()
