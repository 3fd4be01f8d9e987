"""`normswap ab --endpoint NAME=URL` against servers this test starts itself (nothing started by `ab`), and
`normswap ab --compare` on two real run folders: this one and the shared short run."""

import json
from pathlib import Path

import pytest

from ab_helpers import AB_ARGS, run_ab
from utils import get_open_port, make_checkpoint
from vllm_normswap.ab import compare
from vllm_normswap.ab.loadstats import LATENCY_KEYS
from vllm_normswap.ab.servers import ServerRun, ServerSpec

pytestmark = pytest.mark.server
# What this file checks (endpoints measured, not started; the comparison's bookkeeping) does not depend on how
# long the load ran: two rounds of 4 s per server are enough to give every latency a CI and a label.
ENDPOINT_LOAD = ["--load-seconds", "4", "--rounds", "2"]


@pytest.fixture(scope="module")
def endpoint_run(tmp_path_factory, ab):
    ckpts, _, _, _ = ab
    root = tmp_path_factory.mktemp("endpoint")
    specs = [ServerSpec("ln-gelu", str(ckpts["ln-gelu"]), p, extra=["--enforce-eager"]) for p in ("bf16", "int8")]
    runs = [ServerRun(s, get_open_port(), root / "logs").start() for s in specs]
    try:
        urls = [r.wait() for r in runs]
        argv = AB_ARGS + ["--endpoint", f"ln-gelu-bf16={urls[0]}", "--endpoint", f"ln-gelu-int8={urls[1]}",
                          "--option", f"ln-gelu={ckpts['ln-gelu']}", "--out", str(root / "runs"),
                          *ENDPOINT_LOAD]
        proc, summary = run_ab(argv)
    finally:
        for r in runs:
            r.stop()
    assert proc.returncode == 0 and summary, proc.stderr[-4000:]
    return json.loads(Path(summary["results"]).read_text()), Path(summary["run_dir"]), urls


def test_endpoints_are_measured_not_started(endpoint_run):
    results, run_dir, urls = endpoint_run
    assert [(r["name"], r["url"], r["status"]) for r in results["runs"]] == [
        ("ln-gelu-bf16", urls[0], "ok"), ("ln-gelu-int8", urls[1], "ok")]
    assert not any("command" in r or "log" in r for r in results["runs"])  # nothing was started
    assert not (run_dir / "logs").exists()
    comp = results["comparisons"]["ln-gelu"]
    assert comp["load"]["labels"]["throughput"] in ("better", "worse", "no difference")
    assert comp["precision_floor"]["kl"]["value"] > 0  # the checkpoint given with --option feeds the fp32 floor
    # the bf16 endpoint scored the documents as the shared run's bf16 server did (same checkpoint, same tokens)
    assert results["runs"][0]["quality"]["tokens"] > 0


def test_compare_two_real_runs(endpoint_run, ab):
    results_b, run_b, _ = endpoint_run
    _, results_a, run_a, _ = ab
    assert compare.compare_runs(str(run_a), str(run_b)) == 0
    out = json.loads((run_b / "compare.json").read_text())
    rows = {(r["option"], r["measure"]): r for r in out["rows"]}
    a, b = results_a["comparisons"]["ln-gelu"]["load"], results_b["comparisons"]["ln-gelu"]["load"]
    for key in LATENCY_KEYS:
        row = rows[("ln-gelu", f"int8÷bf16 {key}")]
        outside = not (a[key]["lo"] <= b[key]["value"] <= a[key]["hi"]) or \
            not (b[key]["lo"] <= a[key]["value"] <= b[key]["hi"])
        assert row["changed"] == (a["labels"][key] != b["labels"][key] or outside)
    assert ("rms-gelu", "int8÷bf16 throughput") not in rows  # only options both runs measured
    da, db = results_a["analysis"]["decision"], results_b["analysis"]["decision"]
    assert rows[("(all)", "decision")]["changed"] == ((da["verdict"], da["choice"]) != (db["verdict"], db["choice"]))
    assert out["changed"] == sum(r["changed"] for r in out["rows"])
    assert (run_b / "compare.md").read_text().count("\n|") == len(out["rows"]) + 2  # header, rule, rows
