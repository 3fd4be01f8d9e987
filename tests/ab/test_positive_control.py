"""The A/B sees the case study when it is there (the positive control): `normswap plant` plants massive act_out
outliers into the zoo's ln-gelu and rms-swiglu, and a short `normswap ab` on the planted copies and one on the
originals must find: the fp32 function unchanged, an int8 regression on the planted copies only, the planted layer
at the top of the int8 attribution, and the planted layer's act_out counters on /metrics jumping.

`normswap ab` takes one checkpoint per option, so planted and original are two runs; they share nothing and run at
the same time (each starts its own servers, two at a time), which costs less wall time than one after the other.
Short settings: four documents, one short load round, no probe servers; the originals' run skips attribution.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from ab_helpers import ab_command
from vllm_normswap.ab.quality import reference_scores
from vllm_normswap.checkpoints import zoo
from vllm_normswap.checkpoints.files import load_arch, load_tensors
from vllm_normswap.checkpoints.plant import TOLERANCE, plant
from vllm_normswap.model.reference import ReferenceModel

OPTIONS = ("ln-gelu", "rms-swiglu")  # the baseline and one SwiGLU option
SHORT = ["--docs", "4", "--doc-tokens", "96", "--prompts", "8", "--users", "2", "--max-tokens", "4",
         "--load-seconds", "3", "--rounds", "1", "--min-requests", "1", "--warmup-max-s", "5",
         "--probe-shifts", "", "--probe-grid", "0"]
TAU = 20.0  # the observer's highest default threshold: the zoo's act_out never reaches it, M = 2^14 always does


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    root = tmp_path_factory.mktemp("positive-control")
    plants = {o: plant(zoo.option_dir(o), root / "planted" / o, check=False) for o in OPTIONS}
    procs = {}
    for kind in ("planted", "original"):
        argv = SHORT + ["--out", str(root / f"runs-{kind}")] + (["--attribution", "off"] if kind == "original" else [])
        for o in OPTIONS:
            argv += ["--option", f"{o}={root / 'planted' / o if kind == 'planted' else zoo.option_dir(o)}"]
        procs[kind] = subprocess.Popen(ab_command(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=1200)
        lines = out.strip().splitlines()
        assert proc.returncode == 0 and lines, f"{kind} run: exit {proc.returncode}\n{err[-4000:]}"
        results[kind] = json.loads(Path(json.loads(lines[-1])["results"]).read_text())
    return root, plants, results


def test_fp32_function_kept(control):
    """The A/B's own fp32 scorer on the run's documents: planted and original logprobs agree within plant.py's
    stated tolerance (a quarter of what bf16 rounding alone moves a token's logprob on these documents)."""
    root, plants, results = control
    docs = results["planted"]["meta"]["documents_token_ids"]
    assert docs == results["original"]["meta"]["documents_token_ids"]
    for o in OPTIONS:
        orig = torch.tensor([lp for d in reference_scores(zoo.option_dir(o), docs) for lp in d.token_logprobs])
        planted = torch.tensor([lp for d in reference_scores(root / "planted" / o, docs) for lp in d.token_logprobs])
        bf16 = ReferenceModel(load_arch(zoo.option_dir(o)), dtype=torch.bfloat16).eval()
        bf16.load_checkpoint_tensors(load_tensors(zoo.option_dir(o)))
        with torch.no_grad():
            lp16 = torch.cat([bf16(torch.tensor(ids)).float().log_softmax(-1)[:-1][torch.arange(len(ids) - 1),
                                                                                   torch.tensor(ids[1:])]
                              for ids in docs])
        assert float((planted - orig).abs().max()) <= TOLERANCE * float((lp16 - orig).abs().max()), o


def test_int8_regression_found_on_planted_only(control):
    _, _, results = control
    for o in OPTIONS:
        planted = results["planted"]["analysis"]["int8_regression"][o]
        original = results["original"]["analysis"]["int8_regression"][o]
        assert planted["present"] is True, (o, planted)
        assert original["present"] is False, (o, original)
        assert planted["kl_over_floor"]["lo"] >= 20, planted  # the positive control's bar, on the served KL


def test_attribution_names_the_planted_layer(control):
    _, plants, results = control
    for o in OPTIONS:
        top = results["planted"]["analysis"]["attribution"][o][0]
        assert (top["layer"], top["linear"]) == (plants[o]["layer"], "down_proj"), (o, top)


def test_observer_counters_jump(control):
    """/metrics of both servers, over the quality eval (the same tokens in both runs): at the planted layer every
    token adds one act_out outlier per planted channel; the original has none there."""
    _, plants, results = control
    for o in OPTIONS:
        layer, n = plants[o]["layer"], len(plants[o]["channels"])
        width = load_arch(zoo.option_dir(o)).intermediate_size
        for precision in ("bf16", "int8"):
            runs = {kind: next(r for r in results[kind]["runs"] if r["name"] == f"{o}-{precision}")
                    for kind in results}
            obs = {kind: r["observer"] for kind, r in runs.items()}
            tokens = obs["planted"]["elements"][f"{layer}/act_out"] / width
            assert tokens == obs["original"]["elements"][f"{layer}/act_out"] / width > 0
            planted = obs["planted"]["outliers"][f"{layer}/act_out/{TAU}"]
            original = obs["original"]["outliers"][f"{layer}/act_out/{TAU}"]
            assert planted >= n * tokens and original < 0.01 * planted, (o, precision, planted, original, tokens)
            assert obs["planted"]["absmax"][f"{layer}/act_out"] == plants[o]["magnitude"]
