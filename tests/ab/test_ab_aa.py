"""`normswap ab --aa` on a tiny random checkpoint: one option's bf16 server against a second bf16 server of the same
configuration, real servers and locust, short settings (no probe servers; the load as in the shared run).

The labels cannot flake. With Holm at 5%, an A/A report shows a false label in at most 5% of runs (the adjustment's
guarantee, checked by simulation in test_family.py and measured by benchmarks/ab_error_rates.py), so "every label
reads 'no difference'" is asserted wherever the run's own p-values say Holm rejects nothing, which is what the
guarantee makes certain. A label other than "no difference" passes only if an independent Holm on those p-values
rejects it (the rare, allowed false alarm), and its throughput p-value is recomputed from the raw locust records."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from ab_helpers import AB_ARGS, run_ab
from utils import make_checkpoint
from vllm_normswap.ab import compare, loadgen, loadstats
from vllm_normswap.ab.loadstats import LATENCY_KEYS

pytestmark = pytest.mark.server

OPTION = "ln-gelu"
NO_PROBE = ["--probe-shifts", "", "--probe-grid", "0"]


@pytest.fixture(scope="module")
def aa(tmp_path_factory):
    root = tmp_path_factory.mktemp("aa")
    ckpt = make_checkpoint(root / OPTION, OPTION)
    proc, summary = run_ab(AB_ARGS + NO_PROBE + ["--aa", "--option", f"{OPTION}={ckpt}", "--out", str(root / "runs")])
    assert proc.returncode == 0 and summary, proc.stderr[-4000:]
    return json.loads(Path(summary["results"]).read_text()), Path(summary["run_dir"])


def _without_port(argv: list[str]) -> list[str]:
    i = argv.index("--port")
    return argv[:i] + argv[i + 2:]


def test_both_sides_are_one_configuration(aa):
    results, _ = aa
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {f"{OPTION}-bf16", f"{OPTION}-bf16-aa"} and results["meta"]["args"]["aa"]
    assert all(r["status"] == "ok" for r in runs.values())
    a, b = runs[f"{OPTION}-bf16"], runs[f"{OPTION}-bf16-aa"]
    assert _without_port(a["command"]) == _without_port(b["command"]) and a["log"] != b["log"]
    # the same weights in the same precision score the documents identically (bf16 on CPU is deterministic):
    # an int8 server in B's place would give KL > 0 (test_ab_run.py)
    q = results["comparisons"][OPTION]["int8_vs_bf16"]
    assert q["kl"]["hi"] <= 1e-9 and q["ppl_a"]["value"] == pytest.approx(q["ppl_b"]["value"], rel=1e-9)


def test_locust_placement_splits_the_cores(aa):
    """vLLM bound each server's worker, forked as these servers are (runtime/engine_fork.py applies the binding
    the forked worker's OpenMP runtime would miss), and locust ran on the other cores: the two recorded sets split
    this machine's cores. The reading itself: tests/serving/test_placement.py."""
    results, _ = aa
    cores = sorted(os.sched_getaffinity(0))
    for r in results["runs"]:
        placed = r["load_placement"]
        if len(cores) < 2:
            assert placed["locust_cores"] == "any"
        else:
            assert placed["worker_cores"], placed  # empty: the worker ran unbound
            assert sorted(placed["worker_cores"] + placed["locust_cores"]) == cores


def _holm(pvalues: dict, alpha: float = 0.05) -> set:
    """Independent Holm: the keys rejected."""
    out = set()
    for i, (k, p) in enumerate(sorted(pvalues.items(), key=lambda kv: kv[1])):
        if p >= alpha / (len(pvalues) - i):
            break
        out.add(k)
    return out


def _throughput_p(run_dir: Path) -> float:
    """The throughput p-value from locust's raw records: tokens inside each round's steady span over its length."""
    per = {}
    for name in (f"{OPTION}-bf16", f"{OPTION}-bf16-aa"):
        dirs = sorted((run_dir / "load" / name).glob("round*"), key=lambda d: int(d.name.removeprefix("round")))
        per[name] = []
        for d in dirs:
            rnd = loadgen.read_records(d / "records")[0]
            span = loadstats.steady_span(rnd)
            times = np.concatenate([loadstats.token_times(x) for x in rnd if x.get("ok")])
            per[name].append(span and ((times >= span[0]) & (times < span[1])).sum() / (span[1] - span[0]))
    logs = np.array([math.log(b / a) for a, b in zip(*per.values()) if a and b])
    t = abs(logs.mean()) / (logs.std(ddof=1) / math.sqrt(len(logs)))
    return float(loadstats.t_p_two_sided(t, len(logs) - 1))


def test_every_load_label_reads_no_difference_unless_holm_rejects(aa):
    results, run_dir = aa
    ld = results["comparisons"][OPTION]["load"]
    assert ld["family"]["method"] == "holm" and ld["family"]["size"] == len(LATENCY_KEYS)
    assert ld["throughput"]["p"] == pytest.approx(_throughput_p(run_dir), rel=1e-6)
    rejected = _holm({k: ld[k]["p"] for k in LATENCY_KEYS})
    for k in LATENCY_KEYS:
        if k not in rejected:
            assert ld["labels"][k] == "no difference", (k, ld[k])
            assert ld[k]["lo"] <= 1 <= ld[k]["hi"] and ld[k]["level"] == pytest.approx(1 - 0.05 / (4 - len(rejected)))
    if rejected:  # allowed in at most 5% of A/A runs; said, not failed
        import warnings

        warnings.warn(f"A/A false alarm (allowed in <= 5% of runs): {sorted(rejected)}")


def test_the_report_states_its_resolution_and_that_it_is_an_a_a_run(aa):
    results, run_dir = aa
    md = (run_dir / "report.md").read_text()
    assert "A/A run" in md and "Holm-adjusted over the report's 4 load ratios" in md
    ld = results["comparisons"][OPTION]["load"]
    row = next(line for line in md.splitlines() if line.startswith(f"| {OPTION} |") and "no difference" in line)
    for k in LATENCY_KEYS:
        res = ld["resolution"][k]
        # "detectable" is the adjusted CI's half-width on the log scale; "bound" its farthest end from 1
        assert res["detectable"] == pytest.approx(math.sqrt(ld[k]["hi"] / ld[k]["lo"]) - 1, rel=1e-9)
        assert res["bound"] == pytest.approx(max(ld[k]["hi"] - 1, 1 - ld[k]["lo"]), rel=1e-9)
        if ld["labels"][k] == "no difference":  # "±X%", or "a factor F" once the CI spans 2x or more
            lo, hi = ld[k]["lo"], ld[k]["hi"]
            said = f"±{100 * res['bound']:.0f}%" if res["bound"] < 1 else f"a factor {max(hi, 1 / lo):.3g}"
            assert f"no difference larger than {said}" in row or res["bound"] < 0.095, (k, said, row)
    assert "## Resolution: the smallest int8 ÷ bf16 change this run could detect" in md
    assert results["comparisons"][OPTION]["kl_resolution"]["at_most"] <= 1e-3  # KL 0 against a positive floor


def test_compare_works_on_an_a_a_run(aa):
    _, run_dir = aa
    assert compare.compare_runs(str(run_dir), str(run_dir)) == 0
    out = json.loads((run_dir / "compare.json").read_text())
    assert out["changed"] == 0 and {r["option"] for r in out["rows"]} == {OPTION, "(all)"}


@pytest.mark.parametrize("argv,said", [(["--endpoint", "ln-gelu-bf16=http://127.0.0.1:1"], "cannot be combined"),
                                       (["--precisions", "int8"], "--precisions does not apply")])
def test_aa_with_what_it_replaces_exits_before_any_folder(tmp_path, argv, said):
    proc, _ = run_ab(["--aa", *argv, "--out", str(tmp_path / "runs")], timeout=120)
    assert proc.returncode != 0 and said in proc.stderr and "--aa" in proc.stderr
    assert not (tmp_path / "runs").exists()
