"""The observer's CPU kernel: one pass over a site's activations, compiled with Numba.

On CPU the device is the host, and decode batches are a few rows: a dozen NumPy or torch operations per site
cost more in per-call overhead than in arithmetic. This kernel reads each activation row from memory once (bf16
bits are widened into a float32 scratch row that stays in L1; a few vectorised loops then run over it) and
updates the site's state vector (site_stats.SiteLayout) in place:
threshold counts, max |x|, and the per-token mean / std / max |x| histograms with their sums. Per-token sums
are taken in float64. Nothing here allocates per element or touches Python objects, so the GIL is released.

``compiled()`` returns None when Numba cannot be imported; site_stats then falls back to NumPy. Numba is imported
on first use, while the model is built, never with the plugin: at start-up vLLM's worker scans every loaded
module for Triton kernels to override (vllm/triton_utils/dispatcher.py, vLLM 0.32), and that scan crashes on
llvmlite's ``ffi.lib`` object ("'_lib_fn_wrapper' object has no attribute 'get'").
"""

from __future__ import annotations

import functools

import numpy as np

MEAN, STD, ABSMAX = 0, 1, 2
STAT_CODES = {"mean": MEAN, "std": STD, "absmax": ABSMAX}


def _site_kernel(x, bf16, taus, state, absmax_pos, codes, pos, edges, edge_start, ext):
    """x: [n, w] uint16 (bf16 bits, bf16=True) or float32. taus: float32 [k]. state: float64, updated in place.
    Histogram m: statistic codes[m], buckets at state[pos[m] : pos[m] + n_edges + 1], its sum right after;
    edges[edge_start[m]:edge_start[m + 1]] ascending. ext: per-token max |x| over the unsharded axis (tensor
    parallel) or an empty array. Each loop below is a simple reduction that LLVM vectorises."""
    n, w = x.shape
    k = taus.shape[0]
    bits = np.empty(w, np.uint32)
    row = bits.view(np.float32)
    lowest = np.float32(np.inf)
    for t in range(k):
        lowest = min(lowest, taus[t])
    need_moments = False
    for m in range(codes.shape[0]):
        need_moments |= codes[m] != ABSMAX
    top = np.float32(0.0)
    for i in range(n):
        if bf16:
            for j in range(w):
                bits[j] = np.uint32(x[i, j]) << np.uint32(16)
        else:
            for j in range(w):
                row[j] = x[i, j]
        rmax = np.float32(0.0)
        for j in range(w):
            rmax = max(rmax, abs(row[j]))
        top = max(top, rmax)
        if rmax > lowest:  # else no element of this row can count
            for t in range(k):
                tau = taus[t]
                c = 0
                for j in range(w):
                    c += abs(row[j]) > tau
                state[1 + t] += c
        mean = std = 0.0
        if need_moments:
            total = 0.0
            for j in range(w):
                total += row[j]
            mean = total / w
            sq = 0.0
            for j in range(w):
                d = row[j] - mean
                sq += d * d
            std = np.sqrt(sq / w)
        for m in range(codes.shape[0]):
            c = codes[m]
            if c == MEAN:
                value = mean
            elif c == STD:
                value = std
            elif ext.shape[0] > 0:
                value = np.float64(ext[i])
            else:
                value = np.float64(rmax)
            lo, hi = edge_start[m], edge_start[m + 1]
            b = 0
            while lo + b < hi and edges[lo + b] < value:  # bucket b: edges[b-1] < v <= edges[b]
                b += 1
            state[pos[m] + b] += 1.0
            state[pos[m] + hi - lo + 1] += value
    state[0] += n * w
    if top > state[absmax_pos]:
        state[absmax_pos] = top


# reassociation lets LLVM vectorise the reductions; no "nnan": a NaN activation still reaches the max
_FASTMATH = {"reassoc", "nsz", "contract", "arcp"}


@functools.lru_cache(maxsize=None)
def compiled():
    """The Numba-compiled kernel (loaded from Numba's on-disk cache after the first build), or None."""
    try:
        import numba
    except ImportError:  # numba ships with vLLM; the NumPy path covers its absence
        return None
    try:  # cached next to this file, else in the user's cache dir (NUMBA_CACHE_DIR overrides both)
        return numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)(_site_kernel)
    except RuntimeError:  # "no locator available": nowhere writable; compile at every start (~2 s)
        return numba.njit(nogil=True, fastmath=_FASTMATH)(_site_kernel)
