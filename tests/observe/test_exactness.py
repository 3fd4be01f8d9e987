"""Every normswap_* series on a real server's /metrics equals the count the pure-torch reference computes on the
same tokens (prompt + generated), for the four options, eager, float32 (what "exact" means: observe_helpers.py).

The same servers run the mean-shift probe (probe_shift c = 4 on every layer), so they also check the case study's
diagnostic: LayerNorm subtracts the token mean, so the norm_out token means do not move with c (they equal the
reference's at c = 0); RMSNorm does not, so they move (they equal the reference's at c, not at 0).
"""

from __future__ import annotations

import pytest
import torch

from observe_helpers import (compare, complete, expected_metrics, observe_overrides, observe_prompts,
                             reference_capture, sample, wait_for_elements)
from utils import RemoteOpenAIServer, ServerPairs
from vllm_normswap.registry import OPTIONS

pytestmark = pytest.mark.server
PROBE_C = 4.0


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    """One eager float32 server per option with the probe on, started two at a time (utils.ServerPairs)."""
    logs = tmp_path_factory.mktemp("logs")
    overrides = {**observe_overrides(), "probe_shift": PROBE_C}
    extra = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "512"]
    with ServerPairs.for_options(lambda o: RemoteOpenAIServer(o, checkpoints[o], logs / f"{o}.log",
                                                              hf_overrides=overrides, extra=extra)) as pairs:
        yield pairs


@pytest.fixture(scope="module", params=list(OPTIONS))
def probe_run(request, checkpoints, servers):
    option = request.param
    server = servers[option]
    sequences = [complete(server.url, option, p) for p in observe_prompts()]
    d = 128  # hidden size of the test checkpoints; act_in width differs per option, so wait on norm_in
    metrics = wait_for_elements(server.url, sum(map(len, sequences)) * d, option, site="norm_in")
    return option, checkpoints[option], sequences, metrics


def test_counters_equal_reference(probe_run):
    option, ckpt, sequences, metrics = probe_run
    expected = expected_metrics(reference_capture(ckpt, sequences, probe_shift=PROBE_C))
    n_series = sum(1 for key in metrics if key[0] == "normswap_activation_outliers_total")
    assert n_series == 2 * 5 * 4, f"expected 2 layers x 5 sites x 4 thresholds outlier series, got {n_series}"
    nonzero = [v for (name, _), v in metrics.items() if name == "normswap_activation_outliers_total" and v > 0]
    assert len(nonzero) >= 10, "too few non-zero outlier counters for the comparison to mean anything"
    errors = compare(metrics, expected, option)
    assert not errors, "\n".join(errors)


def test_probe_moves_norm_out_means_only_for_rmsnorm(probe_run):
    option, ckpt, sequences, metrics = probe_run
    at_c = expected_metrics(reference_capture(ckpt, sequences, probe_shift=PROBE_C))
    at_0 = expected_metrics(reference_capture(ckpt, sequences))
    for layer in (0, 1):
        lab = dict(model_name=option, layer=layer)
        n = at_0[(layer, "norm_out")]["hist"]["mean"]["count"]
        served = sample(metrics, "normswap_token_mean_sum", site="norm_out", **lab) / n
        unshifted = at_0[(layer, "norm_out")]["hist"]["mean"]["sum"] / n
        shifted = at_c[(layer, "norm_out")]["hist"]["mean"]["sum"] / n
        # the residual stream itself moves by about c in every option
        norm_in = sample(metrics, "normswap_token_mean_sum", site="norm_in", **lab) / n
        assert norm_in - at_0[(layer, "norm_in")]["hist"]["mean"]["sum"] / n > 0.9 * PROBE_C
        print(f"{option} layer {layer}: norm_out mean of token means served {served:.5f}, "
              f"reference c=0 {unshifted:.5f}, reference c={PROBE_C} {shifted:.5f}")
        if OPTIONS[option].norm_type == "layernorm":
            # LN(h + c) = LN(h) exactly (mean subtraction); only rounding separates the two
            assert abs(served - unshifted) < 1e-4
            per_token = at_c[(layer, "norm_out")]["hist"]["mean"]["values"]
            assert torch.allclose(per_token, at_0[(layer, "norm_out")]["hist"]["mean"]["values"], atol=1e-4)
        else:
            # RMS(h + c) keeps the shift's direction: the token means follow c
            assert abs(served - shifted) < 1e-4
            assert abs(served - unshifted) > 0.1, "RMSNorm output means should move with the probe shift"
