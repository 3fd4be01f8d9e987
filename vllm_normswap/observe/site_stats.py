"""The statistics of one observation site, as one float64 vector updated in place. Torch only.

Layout of a site's state vector (``SiteLayout`` holds the offsets):

    [elements, outliers(tau_1) .. outliers(tau_k), absmax, steps,
     per token statistic s (mean | std | absmax): bucket counts (len(edges_s) + 1, last = +Inf), sum of s]

float64 holds integer counts exactly up to 2**53. Every update is an in-place tensor op with no host read, so the
same code is safe eagerly, under torch.compile (inside an opaque custom op) and under CUDA-graph capture.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from vllm_normswap.observe import host_kernel


@dataclasses.dataclass(frozen=True)
class SiteLayout:
    thresholds: tuple[float, ...]
    token_stats: dict[str, int]  # statistic -> number of finite bucket edges, for the statistics this site records

    @property
    def k(self) -> int:
        return len(self.thresholds)

    @property
    def absmax(self) -> int:
        return 1 + self.k

    @property
    def steps(self) -> int:
        return 2 + self.k

    def hist(self, stat: str) -> slice:
        """Bucket counts of ``stat``; the sum follows at ``.stop``."""
        start = 3 + self.k
        for name, n_edges in self.token_stats.items():
            if name == stat:
                return slice(start, start + n_edges + 1)
            start += n_edges + 2
        raise KeyError(stat)

    @property
    def size(self) -> int:
        return 3 + self.k + sum(n + 2 for n in self.token_stats.values())


def token_statistics(x: torch.Tensor, stats: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Per-token statistics across features (last dim), in float32: mean, population std (as in LayerNorm's
    sigma), max |x|."""
    xf = x.float()
    out = {}
    if "mean" in stats or "std" in stats:
        mean = xf.mean(-1)
        d = xf - mean[..., None]  # two passes: 5x faster than torch.std_mean on CPU, as accurate
        out.update(mean=mean, std=(d * d).mean(-1).sqrt())
    if "absmax" in stats:
        out["absmax"] = xf.abs().amax(-1)
    return out


def accumulate(state: torch.Tensor, layout: SiteLayout, x: torch.Tensor, edges: dict[str, torch.Tensor],
               valid: torch.Tensor | None = None, token_absmax: torch.Tensor | None = None,
               sample_every: int = 1, sparse_rows: bool = False) -> None:
    """Add one step's observation of ``x`` [tokens, features] to ``state``.

    valid: float [tokens], 1 for real rows, 0 for padding (None = all real). token_absmax: per-token max |x|
    over the full (unsharded) feature axis when ``x`` is one tensor-parallel shard. sample_every > 1: count
    only steps whose device-side step counter is a multiple of it (used under CUDA graphs, where no host code
    runs per step). sparse_rows: scan only rows whose max |x| exceeds tau (data-dependent shapes: eager host
    code only, e.g. CPU; the cost then scales with the rows that hold outliers, not with all rows).
    """
    x = x.reshape(-1, x.shape[-1])
    n, width = x.shape
    if n == 0:
        return
    if valid is not None:
        x = x * valid[:, None].to(x.dtype)  # padded rows become 0: never > tau (tau > 0), never the max
    gate = None
    if sample_every > 1:
        step = state[layout.steps]
        gate = (torch.remainder(step, sample_every) == 0).double()
        state[layout.steps].add_(1)

    def scaled(t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        return t if gate is None else t * gate

    # per-row max |x| from two reductions (cheaper than materialising |x|): gives the site max, act_out's
    # per-token max, and on the host-side path the rows that can hold an outlier at all
    row_absmax = torch.maximum(x.amax(-1), -x.amin(-1)).float()
    taus = thresholds_in(x.dtype, layout.thresholds)
    if sparse_rows:  # eager on CPU: only rows whose max exceeds tau are scanned (data-dependent shapes)
        over = torch.stack([torch.count_nonzero(x.index_select(0, (row_absmax > tau).nonzero().squeeze(-1))
                                                .abs() > tau) for tau in taus])
    else:  # graph-safe dense path (GPU, CUDA graphs)
        a = x.abs()
        over = torch.stack([torch.count_nonzero(a > tau) for tau in taus])
    state[1:1 + layout.k].add_(scaled(over))
    if valid is None and gate is None:
        state[0].add_(n * width)
    else:
        rows = valid.sum() if valid is not None else torch.tensor(float(n), device=x.device)
        state[0].add_(scaled(rows * width))
    absmax = state[layout.absmax:layout.absmax + 1]
    torch.maximum(absmax, scaled(row_absmax.amax()).reshape(1), out=absmax)

    if not layout.token_stats:
        return
    values = token_statistics(x, tuple(s for s in layout.token_stats if s != "absmax"))
    if "absmax" in layout.token_stats:
        values["absmax"] = token_absmax if token_absmax is not None else row_absmax
    weight = valid.double() if valid is not None else torch.ones(n, dtype=torch.float64, device=x.device)
    if gate is not None:
        weight = weight * gate
    for stat in layout.token_stats:
        v = values[stat].float().reshape(-1)
        sl = layout.hist(stat)
        state[sl].index_add_(0, torch.bucketize(v, edges[stat]), weight)  # bucket i: edges[i-1] < v <= edges[i]
        state[sl.stop].add_((v.double() * weight).sum())


@dataclasses.dataclass(frozen=True)
class HostPlan:
    """A site's layout and bucket edges as the arrays the CPU kernel takes (built once per site)."""
    taus: np.ndarray        # float32 [k], in layout order
    codes: np.ndarray       # int64 [m]: host_kernel.MEAN | STD | ABSMAX per histogram
    pos: np.ndarray         # int64 [m]: first bucket of histogram m in the state vector
    edges: np.ndarray       # float32: all histograms' finite edges, concatenated
    edge_start: np.ndarray  # int64 [m + 1]: histogram m's edges are edges[edge_start[m]:edge_start[m + 1]]
    absmax_pos: int
    empty: np.ndarray       # float32 [0]: "no per-token max from other ranks"


def host_plan(layout: SiteLayout, edges: dict[str, torch.Tensor]) -> HostPlan:
    stats = list(layout.token_stats)
    bounds = [edges[s].detach().float().cpu().numpy() for s in stats]
    return HostPlan(taus=np.asarray(thresholds_in(torch.float32, layout.thresholds), np.float32),
                    codes=np.asarray([host_kernel.STAT_CODES[s] for s in stats], np.int64),
                    pos=np.asarray([layout.hist(s).start for s in stats], np.int64),
                    edges=np.concatenate(bounds).astype(np.float32) if bounds else np.zeros(0, np.float32),
                    edge_start=np.cumsum([0] + [len(b) for b in bounds]).astype(np.int64),
                    absmax_pos=layout.absmax, empty=np.zeros(0, np.float32))


def accumulate_host(state: torch.Tensor, layout: SiteLayout, x: torch.Tensor, edges: dict[str, torch.Tensor],
                    token_absmax: torch.Tensor | None = None, plan: HostPlan | None = None) -> None:
    """``accumulate`` for CPU tensors with every row real and every step counted, on the state's own memory.

    With Numba (it ships with vLLM) this is one compiled pass over the activations (host_kernel.py); without
    it, about a dozen NumPy operations. Either way far fewer calls than the torch path: on CPU, where decode
    batches are small, per-call overhead is most of the observer's cost. float32 holds every bf16/fp16 value
    exactly, so the threshold counts are exact."""
    kernel = host_kernel.compiled()
    if kernel is None:
        return _accumulate_numpy(state, layout, x, edges, token_absmax)
    plan = plan or host_plan(layout, edges)
    if x.requires_grad:
        x = x.detach()
    width = x.shape[-1]
    if x.dtype == torch.bfloat16:  # the kernel widens the bits itself: no float32 copy
        a, bf16 = x.view(torch.int16).numpy().view(np.uint16), True
    else:
        a, bf16 = x.float().numpy(), False
    a = np.ascontiguousarray(a.reshape(-1, width))
    ext = token_absmax.float().reshape(-1).numpy() if token_absmax is not None else plan.empty
    kernel(a, bf16, plan.taus, state.numpy(), plan.absmax_pos, plan.codes, plan.pos, plan.edges, plan.edge_start,
           ext)


@functools.lru_cache(maxsize=None)
def warm_host_kernel() -> None:
    """Compile (or load from Numba's cache) the CPU kernel for bf16 and float32 input, once per process, while
    the model is built: the first request must not wait for a compiler."""
    if host_kernel.compiled() is None:
        return
    layout = SiteLayout((1.0,), {"mean": 1, "std": 1, "absmax": 1})
    edges = {s: torch.zeros(1) for s in layout.token_stats}
    for dtype in (torch.bfloat16, torch.float32):
        accumulate_host(torch.zeros(layout.size, dtype=torch.float64), layout, torch.ones(1, 2, dtype=dtype), edges)


def _accumulate_numpy(state: torch.Tensor, layout: SiteLayout, x: torch.Tensor, edges: dict[str, torch.Tensor],
                      token_absmax: torch.Tensor | None = None) -> None:
    st = state.numpy()  # shares memory with the buffer
    a = x.detach().reshape(-1, x.shape[-1]).float().numpy()
    n, width = a.shape
    mags = np.abs(a)
    row_absmax = mags.max(axis=1) if n else np.zeros(0, np.float32)
    taus = thresholds_in(torch.float32, layout.thresholds)
    lowest = min(range(layout.k), key=lambda i: taus[i])
    top = float(row_absmax.max()) if n else 0.0
    if top > taus[lowest]:  # else no element can count
        above = mags[mags > np.float32(taus[lowest])]  # usually few elements: the higher thresholds scan these
        for i, tau in enumerate(taus):
            st[1 + i] += above.size if i == lowest else np.count_nonzero(above > np.float32(tau))
    st[0] += n * width
    st[layout.absmax] = max(st[layout.absmax], top)
    if not layout.token_stats:
        return
    values = {}
    if "mean" in layout.token_stats or "std" in layout.token_stats:
        mean = a.sum(axis=1) / np.float32(width)
        d = a - mean[:, None]
        values.update(mean=mean, std=np.sqrt(np.einsum("ij,ij->i", d, d) / np.float32(width)))
    if "absmax" in layout.token_stats:
        values["absmax"] = token_absmax.float().reshape(-1).numpy() if token_absmax is not None else row_absmax
    for stat in layout.token_stats:
        sl = layout.hist(stat)
        bounds = edges[stat].numpy()
        # bucket i: edges[i-1] < v <= edges[i], as torch.bucketize(right=False)
        st[sl] += np.bincount(np.searchsorted(bounds, values[stat], side="left"), minlength=len(bounds) + 1)
        st[sl.stop] += float(values[stat].astype(np.float64).sum())


@functools.lru_cache(maxsize=None)
def thresholds_in(dtype: torch.dtype, thresholds: tuple[float, ...]) -> tuple[float, ...]:
    """Each tau rounded DOWN to ``dtype``: for x representable in dtype, |x| > tau  <=>  |x| > tau_dtype, so the
    comparison can run in the activation's own dtype (no float32 copy) and still count exactly."""
    out = []
    for tau in thresholds:
        t = torch.tensor(tau, dtype=torch.float64).to(dtype)
        if float(t) > tau:
            t = torch.nextafter(t, torch.tensor(-float("inf"), dtype=dtype))
        out.append(float(t))
    return tuple(out)


def decode(state: torch.Tensor, layout: SiteLayout) -> dict:
    """Host-side view of a state vector (a CPU copy): plain Python numbers."""
    s = state.tolist()
    out = {"elements": s[0], "outliers": dict(zip(layout.thresholds, s[1:1 + layout.k])),
           "absmax": s[layout.absmax], "hist": {}}
    for stat in layout.token_stats:
        sl = layout.hist(stat)
        out["hist"][stat] = (s[sl], s[sl.stop])
    return out
