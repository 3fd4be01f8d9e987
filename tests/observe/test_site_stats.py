"""site_stats.accumulate against direct counting (torch, no vLLM): thresholds, absmax, padding rows, histogram
buckets with Prometheus `le` semantics (v <= edge), device-side sampling."""

from __future__ import annotations

import torch

import pytest

from vllm_normswap.observe import host_kernel
from vllm_normswap.observe.site_stats import SiteLayout, _accumulate_numpy, accumulate, accumulate_host, decode

THRESHOLDS = (0.5, 1.0, 2.5)
EDGES = {"mean": torch.tensor([-0.5, 0.0, 0.5]), "std": torch.tensor([0.5, 1.0, 2.0]),
         "absmax": torch.tensor([1.0, 2.0, 4.0])}


def layout(stats=("mean", "std"), thresholds=THRESHOLDS):
    return SiteLayout(thresholds, {s: len(EDGES[s]) for s in stats})


def _accumulate(path: str, state, lay, x) -> None:
    if path == "host":  # the compiled kernel the model uses on CPU (host_kernel.py)
        assert host_kernel.compiled() is not None, "numba is a vLLM dependency and must import here"
        accumulate_host(state, lay, x, EDGES)
    elif path == "numpy":  # the host path's fallback without numba
        _accumulate_numpy(state, lay, x, EDGES)
    else:
        accumulate(state, lay, x, EDGES, sparse_rows=path == "sparse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("path", ["dense", "sparse", "host", "numpy"])
def test_counts_absmax_and_histograms_match_direct_counting(path, dtype):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 24, generator=g) * 1.3 + 0.2 for n in (5, 1, 9, 0)]
    thresholds = (2.5, 0.5, 1.0)  # any order
    lay = layout(("mean", "std", "absmax"), thresholds)
    state = torch.zeros(lay.size, dtype=torch.float64)
    for x in xs:
        _accumulate(path, state, lay, x.to(dtype))
    got = decode(state, lay)
    allx = torch.cat(xs).to(dtype).float()
    assert got["elements"] == allx.numel()
    for tau in thresholds:
        assert got["outliers"][tau] == int((allx.abs() > tau).sum())
    assert got["absmax"] == float(allx.abs().max())
    mean, std = allx.mean(-1), allx.std(-1, correction=0)
    for stat, v in (("mean", mean), ("std", std), ("absmax", allx.abs().amax(-1))):
        buckets, total = got["hist"][stat]
        lower = torch.cat([torch.tensor([-float("inf")]), EDGES[stat]])
        upper = torch.cat([EDGES[stat], torch.tensor([float("inf")])])
        want = [int(((v > lo) & (v <= hi)).sum()) for lo, hi in zip(lower, upper)]
        assert buckets == want
        assert abs(total - float(v.sum())) < 1e-4


@pytest.mark.parametrize("sparse_rows", [False, True])
def test_padding_rows_are_not_counted(sparse_rows):
    x = torch.tensor([[0.1, 3.0], [9.0, 9.0], [-2.0, 0.7]])
    valid = torch.tensor([1.0, 0.0, 1.0])  # row 1 is CUDA-graph padding
    lay = layout(("absmax",))
    state = torch.zeros(lay.size, dtype=torch.float64)
    accumulate(state, lay, x, EDGES, valid=valid, sparse_rows=sparse_rows)
    got = decode(state, lay)
    assert got["elements"] == 4
    assert got["outliers"] == {0.5: 3, 1.0: 2, 2.5: 1}
    assert got["absmax"] == 3.0
    assert got["hist"]["absmax"][0] == [0, 1, 1, 0]  # token maxima 3.0 (le 4) and 2.0 (le 2); padding absent


def test_device_side_sampling_counts_every_nth_step():
    lay = layout(())
    state = torch.zeros(lay.size, dtype=torch.float64)
    for step in range(7):
        accumulate(state, lay, torch.full((2, 3), float(step + 1)), EDGES, sample_every=3)
    got = decode(state, lay)
    assert got["elements"] == 3 * 6  # steps 0, 3, 6
    assert got["outliers"] == {0.5: 18, 1.0: 12, 2.5: 12}  # sampled values 1, 4, 7
    assert got["absmax"] == 7.0


@pytest.mark.parametrize("path", ["dense", "host", "numpy"])
def test_token_absmax_from_other_ranks_feeds_the_histogram(path):
    """Tensor parallel: the act_out shard's own row maxima are 3.0 and 0.7, but the all-gathered maxima over the
    full feature axis (5.0, 1.5) are what the per-token histogram must count; the site max stays the shard's."""
    x = torch.tensor([[0.1, 3.0], [-0.7, 0.2]])
    full = torch.tensor([5.0, 1.5])
    lay = layout(("absmax",))
    state = torch.zeros(lay.size, dtype=torch.float64)
    if path == "host":
        accumulate_host(state, lay, x, EDGES, token_absmax=full)
    elif path == "numpy":
        _accumulate_numpy(state, lay, x, EDGES, token_absmax=full)
    else:
        accumulate(state, lay, x, EDGES, token_absmax=full)
    got = decode(state, lay)
    assert got["hist"]["absmax"] == ([0, 1, 0, 1], 6.5)  # 1.5 in (1, 2], 5.0 in (4, +Inf)
    assert got["absmax"] == 3.0
