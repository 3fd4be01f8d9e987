"""The full path of "Bring your own model", short, on the zoo: `normswap swap` the zoo's ln-gelu to rms-swiglu,
`normswap heal` it for a few steps, then `normswap ab --option rms-swiglu=HEALED`. Both precisions of the healed
checkpoint are served (real vLLM servers, real locust) and scored. That the servers ran the healed weights is
checked against the pure-torch reference model on those weights: its perplexity on the run's documents."""

import json
import math
from pathlib import Path

import pytest

from ab_helpers import run_ab
from vllm_normswap.ab import loadgen
from vllm_normswap.checkpoints import zoo
from vllm_normswap.checkpoints.files import load_arch, load_reference
from vllm_normswap.checkpoints.heal import HealSpec, heal
from vllm_normswap.checkpoints.swap import SwapSpec, swap

pytestmark = pytest.mark.server

OPTION = "rms-swiglu"
# the shortest `normswap ab` of the suite (tests/test_wheel.py): one option, no probe, no attribution, one round
ARGV = ["--options", OPTION, "--probe-shifts", "", "--probe-grid", "0", "--attribution", "off", "--self-noise", "off",
        "--docs", "2", "--doc-tokens", "64", "--prompts", "4", "--max-tokens", "4", "--users", "1",
        "--min-requests", "4", "--load-seconds", "5", "--rounds", "1", "--warmup-max-s", "20"]


@pytest.fixture(scope="module")
def healed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("healed")
    teacher = zoo.option_dir("ln-gelu")
    swap(teacher, OPTION, root / "swapped", SwapSpec(calibration_docs=16, eval_docs=4, tokens=128), progress=False)
    healed = root / "healed"
    summary = heal(root / "swapped", teacher, healed, spec=HealSpec(tokens=4 * 32 * 3, batch_size=4, ctx=32,
                                                                   eval_steps=3, eval_windows=8), progress=False)
    assert summary["steps"] == 3
    proc, run = run_ab(ARGV + ["--option", f"{OPTION}={healed}", "--out", str(root / "runs")])
    assert proc.returncode == 0 and run, proc.stderr[-4000:]
    return healed, json.loads(Path(run["results"]).read_text()), Path(run["run_dir"])


def test_ab_serves_and_scores_the_healed_checkpoint(healed_run):
    healed, results, run_dir = healed_run
    assert load_arch(healed).option == OPTION
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {f"{OPTION}-bf16", f"{OPTION}-int8"}
    for name, r in runs.items():
        assert r["status"] == "ok" and r["phases_done"] == ["warmup", "quality", "load"], (name, r.get("error"))
        assert r["checkpoint"] == str(healed), r["checkpoint"]  # the healed directory, not the zoo's rms-swiglu
        records = loadgen.read_records(run_dir / "load" / name / "round0" / "records")[0]
        assert sum(1 for x in records if x.get("ok")) >= 4, name  # --min-requests
    kl = results["comparisons"][OPTION]["int8_vs_bf16"]["kl"]["value"]
    assert math.isfinite(kl) and kl > 0  # int8 changed the healed weights' predictions, by a finite amount

    # the bf16 server scored the healed weights: the reference model on them, on the same tokens (bf16 in vLLM
    # against the fp32 reference: within 2%, as tests/ab/test_ab_run.py allows)
    ref = load_reference(healed)
    docs = results["meta"]["documents_token_ids"]
    nll = sum(-sum(ref.prompt_logprobs(d)) for d in docs)
    ppl_ref = math.exp(nll / sum(len(d) - 1 for d in docs))
    assert runs[f"{OPTION}-bf16"]["quality"]["ppl_a"]["value"] == pytest.approx(ppl_ref, rel=0.02)
