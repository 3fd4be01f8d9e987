"""benchmarks/gpu_check.sh, without a GPU: its dry run checks and prints the plan (files, pytest selections, time
limits within 10 minutes of a GPU), and its step runner records ok, failed and timed-out steps as JSON."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import junit_report  # noqa: E402

STEPS = ["gpu_info", "install", "versions", "test_int8_vllm", "test_int8_options", "bench_int8", "bench_observer"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    return proc, out, json.loads((out / "summary.json").read_text())


def test_dry_run_passes_and_prints_the_plan_with_limits(dry_run):
    proc, _, summary = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("  [")]
    assert [line.split("] ", 1)[1].split(":")[0] for line in lines] == STEPS
    assert "PROBLEM" not in proc.stdout
    assert summary["dry_run"] and summary["ok"] and summary["finished"]
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "planned" for s in summary["steps"])
    assert summary["limits_sum_s"] == sum(s["limit_s"] for s in summary["steps"]) <= 600


def test_every_referenced_file_exists_and_the_selections_collect(dry_run):
    _, out, _ = dry_run
    records = {name: json.loads((out / "steps" / f"{name}.json").read_text()) for name in STEPS}
    for name, r in records.items():
        assert r["files"], f"{name} names no script"
        assert all((ROOT / f).is_file() for f in r["files"]), r["files"]
    assert "scripts/install.sh" in records["install"]["files"]
    vllm_tests = records["test_int8_vllm"]["collected"]["tests"]
    assert vllm_tests and not [t for t in vllm_tests if "tp2" in t or "misconfiguration" in t]
    assert any("test_offline_checkpoint_equals_online_bitwise" in t for t in vllm_tests)
    assert len(records["test_int8_options"]["collected"]["tests"]) >= 4  # one per option of the registry


@pytest.mark.parametrize("name", ["bench_int8", "bench_observer"])
def test_benchmark_arguments_parse(dry_run, name):
    """The plan's flags exist in the benchmark (a typo would only show on the GPU)."""
    _, out, _ = dry_run
    argv = json.loads((out / "steps" / f"{name}.json").read_text())["command"].split()
    script = next(i for i, a in enumerate(argv) if a.endswith(f"{name}.py"))
    args = importlib.import_module(name).parser().parse_args(argv[script + 1:])
    if name == "bench_int8":
        assert args.device == "cuda" and args.compiled and args.batches == "1,8,32"
    else:
        assert not args.eager  # CUDA graphs on


# ---- the step runner and the JSON it writes ----

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="quant.test_int8_vllm" name="test_llama_kl_int8_vs_bf16[channel]" time="41.5">
<system-out>-------------------------------- Captured Out --------------------------------
Llama channel: mean KL(bf16 || int8) = 1.20e-03 nats/token
</system-out></testcase>
<testcase classname="quant.test_int8_vllm" name="test_llama_kl_int8_vs_bf16[group]" time="0.01">
<failure message="assert 0.02 &lt; 0.01">long traceback</failure></testcase>
<testcase classname="quant.test_int8_vllm" name="test_vllm_layers_hold_primitive_quantization[channel]" time="0">
<skipped type="pytest.skip" message="the int8 weights are in MacheteLinearKernel's layout"/></testcase>
</testsuite></testsuites>"""


def test_junit_report_to_json(tmp_path):
    (tmp_path / "r.xml").write_text(JUNIT)
    report = junit_report.junit_to_json(tmp_path / "r.xml")
    assert report["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    first, second, third = report["tests"]
    assert first["outcome"] == "passed" and first["duration_s"] == 41.5
    assert first["printed"] == ["Llama channel: mean KL(bf16 || int8) = 1.20e-03 nats/token"]
    assert second["outcome"] == "failed" and second["message"] == "assert 0.02 < 0.01"
    assert third["outcome"] == "skipped" and "Machete" in third["message"]
    missing = junit_report.junit_to_json(tmp_path / "none.xml")
    assert missing["tests"] == [] and "did not finish" in missing["error"]


def test_summary_of_hand_made_steps():
    records = [
        {"name": "install", "index": 0, "status": "ok", "limit_s": 170, "duration_s": 95.0, "returncode": 0,
         "log": "logs/install.log"},
        {"name": "test_int8_vllm", "index": 1, "status": "failed", "limit_s": 120, "duration_s": 80.2,
         "returncode": 1, "json": "test_int8_vllm.json", "tests": {"passed": 8, "failed": 1}},
        {"name": "bench_int8", "index": 2, "status": "timeout", "limit_s": 100, "duration_s": 100.0,
         "returncode": -9, "log": "logs/bench_int8.log"},
    ]
    summary = gpu_check.summarize(records, finished=True)
    assert not summary["ok"] and not summary["dry_run"] and summary["finished"]
    assert summary["by_status"] == {"ok": ["install"], "failed": ["test_int8_vllm"], "timeout": ["bench_int8"]}
    assert summary["limits_sum_s"] == 390 and summary["duration_sum_s"] == 275.2
    assert summary["steps"][1] == {"name": "test_int8_vllm", "status": "failed", "limit_s": 120, "duration_s": 80.2,
                                   "returncode": 1, "json": "test_int8_vllm.json",
                                   "tests": {"passed": 8, "failed": 1}}


def _step(out: Path, name: str, limit: float, code: str, *flags: str) -> int:
    return gpu_check.main(["step", "--out", str(out), "--name", name, "--limit", str(limit), *flags, "--",
                           sys.executable, "-c", code])


# a stand-in for pytest: on SIGINT (the step's limit is near) it still writes its report, as pytest does
INTERRUPTED_PYTEST = f"""
import sys, time
try:
    time.sleep(60)
except KeyboardInterrupt:
    open(sys.argv[1], "w").write('''{JUNIT}''')
    sys.exit(2)
"""


def test_steps_ok_failed_and_timed_out_are_recorded(tmp_path, monkeypatch):
    # SIGINT 4 s before the 8 s limit: late enough that the stand-in has started even on a busy box
    monkeypatch.setattr(gpu_check, "GRACE_S", 4)
    out = tmp_path / "out"
    assert _step(out, "info", 30, "import json; print(json.dumps({'gpus': 1}))", "--stdout-json") == 0
    assert _step(out, "broken", 30, "import sys; print('no GPU'); sys.exit(3)", "--stdout-json") == 1
    junit = out / "slow.junit.xml"
    code = INTERRUPTED_PYTEST.replace("sys.argv[1]", repr(str(junit)))
    assert _step(out, "slow", 8, code, "--junit") == 1
    steps = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["steps"]}
    assert list(steps) == ["info", "broken", "slow"]
    assert steps["info"]["status"] == "ok" and json.loads((out / steps["info"]["json"]).read_text()) == {"gpus": 1}
    assert steps["broken"]["status"] == "failed" and steps["broken"]["returncode"] == 3
    assert (out / "broken.stdout").read_text() == "no GPU\n"  # not JSON: kept as printed
    assert steps["slow"]["status"] == "timeout" and steps["slow"]["duration_s"] < 8.5
    assert steps["slow"]["tests"] == {"passed": 1, "failed": 1, "skipped": 1}  # the report written on SIGINT
    assert gpu_check.main(["finish", "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["by_status"] == {"ok": ["info"], "failed": ["broken"],
                                                            "timeout": ["slow"]}
