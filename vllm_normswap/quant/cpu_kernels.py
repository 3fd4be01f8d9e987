"""The CPU int8 weight-only matmul kernels that the dispatch (cpu_dispatch.py) chooses among. Each takes
x2 [M, K] and an int8 weight [N, K] with its scale [N, 1] or [N, K/G] and returns [M, N]; none of them reads the
environment or decides when it applies. Measurements: benchmarks/README.md.

- gemv_int8: Numba GEMV for bf16 activations, any scale granularity (batch-1 decode on one thread);
- small_m_int8: Numba kernels that widen each int8 weight once for four (mm4) or two (mm2) activation rows;
- int8pack_mm: torch's `aten._weight_int8pack_mm`, which reads the int8 weight directly (per-row scales);
- dequant_block_mm: dequantize the weight in cache-resident row blocks and run a dense GEMM per block (prefill).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# Dequantized block: ~2 MiB of fp32 so it stays in L2 while the GEMM streams activations over it.
_BLOCK_BYTES = 2 << 20


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """The CPU has native bf16 dot products (AVX512-BF16 / AMX)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def prefill_dtype() -> torch.dtype:
    """The block GEMM runs in bf16 where the CPU has native bf16 dot products (there vLLM's bf16 oneDNN path is
    fast, so we must be too), else in fp32 (MKL sgemm beats torch's bf16 fallback)."""
    return torch.bfloat16 if native_bf16() else torch.float32


# ---- Numba kernels (plain Python until compiled by _njit) ------------------------------------------------------

def _gemv_bf16_py(xbits, w, scale, out):
    """out[m, n] = bf16(sum_g scale[n, g] * sum_{k in group g} x[m, k] * w[n, k]); xbits/out: bf16 bit patterns
    (uint16), w int8, scale float32 [N, G] (G = 1: per channel or per tensor). fp32 accumulation; the result is
    rounded to nearest even, as torch rounds to bf16.

    One core pulls more bandwidth from four sequential streams than from one (the hardware prefetcher tracks each
    stream, so more misses are in flight): the rows are dealt in four quarters, n, n+Q, n+2Q, n+3Q, each with its
    own accumulator in one k loop. Each row's reduction order is unchanged, so the result is bitwise that of one
    row at a time. The loops run over slices so that every index starts at 0: Numba then knows it is not negative
    and LLVM vectorises (with `range(lo, hi)` it does not). Timings: benchmarks/README.md."""
    m_rows, k_dim = xbits.shape
    n_dim = w.shape[0]
    groups = scale.shape[1]
    gs = k_dim // groups
    q = n_dim // 4
    xb = np.empty(k_dim, np.uint32)
    xf = xb.view(np.float32)
    yb = np.empty(4, np.float32)
    ybits = yb.view(np.uint32)
    rnd, sh, one = np.uint32(0x7FFF), np.uint32(16), np.uint32(1)  # bf16 rounding: (b + rnd + lsb) >> 16
    for m in range(m_rows):
        for k in range(k_dim):
            xb[k] = np.uint32(xbits[m, k]) << sh
        for n in range(q):
            t0 = np.float32(0.0)
            t1 = np.float32(0.0)
            t2 = np.float32(0.0)
            t3 = np.float32(0.0)
            for g in range(groups):
                lo = g * gs
                xg = xf[lo:lo + gs]
                w0 = w[n, lo:lo + gs]
                w1 = w[n + q, lo:lo + gs]
                w2 = w[n + 2 * q, lo:lo + gs]
                w3 = w[n + 3 * q, lo:lo + gs]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for k in range(gs):
                    xk = xg[k]
                    a0 += xk * np.float32(w0[k])
                    a1 += xk * np.float32(w1[k])
                    a2 += xk * np.float32(w2[k])
                    a3 += xk * np.float32(w3[k])
                t0 += a0 * scale[n, g]
                t1 += a1 * scale[n + q, g]
                t2 += a2 * scale[n + 2 * q, g]
                t3 += a3 * scale[n + 3 * q, g]
            yb[0] = t0
            yb[1] = t1
            yb[2] = t2
            yb[3] = t3
            for i in range(4):
                b = ybits[i]
                out[m, n + i * q] = np.uint16((b + rnd + ((b >> sh) & one)) >> sh)
        for n in range(4 * q, n_dim):  # the n_dim % 4 rows left over
            t0 = np.float32(0.0)
            for g in range(groups):
                lo = g * gs
                xg = xf[lo:lo + gs]
                w0 = w[n, lo:lo + gs]
                a0 = np.float32(0.0)
                for k in range(gs):
                    a0 += xg[k] * np.float32(w0[k])
                t0 += a0 * scale[n, g]
            yb[0] = t0
            b = ybits[0]
            out[m, n] = np.uint16((b + rnd + ((b >> sh) & one)) >> sh)


def _mm4_py(xf, w, scale, out):
    """out[0:4, n] = scale[n] * (xf[0:4] . w[n]) in fp32 for four activation rows (xf/out float32, w int8, scale
    float32 [N]). Each int8 weight is widened once and feeds four FMAs; two row streams half the matrix apart keep
    the prefetcher busy (4 rows x 2 streams = 8 accumulators)."""
    n_dim, k_dim = w.shape
    h = n_dim // 2
    x0 = xf[0]
    x1 = xf[1]
    x2 = xf[2]
    x3 = xf[3]
    for n in range(h):
        wa = w[n]
        wb = w[n + h]
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
        for k in range(k_dim):
            u = np.float32(wa[k])
            v = np.float32(wb[k])
            a0 += x0[k] * u
            a1 += x1[k] * u
            a2 += x2[k] * u
            a3 += x3[k] * u
            b0 += x0[k] * v
            b1 += x1[k] * v
            b2 += x2[k] * v
            b3 += x3[k] * v
        s = scale[n]
        t = scale[n + h]
        out[0, n] = a0 * s
        out[1, n] = a1 * s
        out[2, n] = a2 * s
        out[3, n] = a3 * s
        out[0, n + h] = b0 * t
        out[1, n + h] = b1 * t
        out[2, n + h] = b2 * t
        out[3, n + h] = b3 * t
    for n in range(2 * h, n_dim):  # odd N: the last row
        wa = w[n]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for k in range(k_dim):
            u = np.float32(wa[k])
            a0 += x0[k] * u
            a1 += x1[k] * u
            a2 += x2[k] * u
            a3 += x3[k] * u
        s = scale[n]
        out[0, n] = a0 * s
        out[1, n] = a1 * s
        out[2, n] = a2 * s
        out[3, n] = a3 * s


def _mm2_py(xf, w, scale, out):
    """As _mm4_py for two activation rows, with four row streams (2 rows x 4 streams = 8 accumulators)."""
    n_dim, k_dim = w.shape
    q = n_dim // 4
    x0 = xf[0]
    x1 = xf[1]
    for n in range(q):
        w0 = w[n]
        w1 = w[n + q]
        w2 = w[n + 2 * q]
        w3 = w[n + 3 * q]
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
        for k in range(k_dim):
            u0 = np.float32(w0[k])
            u1 = np.float32(w1[k])
            u2 = np.float32(w2[k])
            u3 = np.float32(w3[k])
            p = x0[k]
            r = x1[k]
            a0 += p * u0
            a1 += p * u1
            a2 += p * u2
            a3 += p * u3
            b0 += r * u0
            b1 += r * u1
            b2 += r * u2
            b3 += r * u3
        out[0, n] = a0 * scale[n]
        out[1, n] = b0 * scale[n]
        out[0, n + q] = a1 * scale[n + q]
        out[1, n + q] = b1 * scale[n + q]
        out[0, n + 2 * q] = a2 * scale[n + 2 * q]
        out[1, n + 2 * q] = b2 * scale[n + 2 * q]
        out[0, n + 3 * q] = a3 * scale[n + 3 * q]
        out[1, n + 3 * q] = b3 * scale[n + 3 * q]
    for n in range(4 * q, n_dim):  # the N % 4 rows left over
        wa = w[n]
        a0 = b0 = np.float32(0.0)
        for k in range(k_dim):
            u = np.float32(wa[k])
            a0 += x0[k] * u
            b0 += x1[k] * u
        out[0, n] = a0 * scale[n]
        out[1, n] = b0 * scale[n]


def _njit(fn):
    import numba

    fastmath = {"reassoc", "nsz", "contract", "arcp"}  # lets LLVM vectorise the dot products
    try:
        return numba.njit(cache=True, nogil=True, fastmath=fastmath)(fn)
    except RuntimeError:  # no writable cache location
        return numba.njit(nogil=True, fastmath=fastmath)(fn)


@functools.lru_cache(maxsize=None)
def compiled_gemv():
    """The compiled GEMV, or None without Numba. Imported on first use, not with the plugin (see
    observe/host_kernel.py: vLLM's start-up kernel scan trips over llvmlite)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return None
    return _njit(_gemv_bf16_py)


@functools.lru_cache(maxsize=None)
def compiled_small_m():
    """The compiled (mm4, mm2) kernels, or None without Numba."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return None
    return _njit(_mm4_py), _njit(_mm2_py)


# ---- the kernels as torch functions ---------------------------------------------------------------------------

def gemv_int8(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] bf16 @ int8 weight [N, K] with scale [N, 1] or [N, K/G] -> [M, N] bf16, via the Numba GEMV."""
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=torch.bfloat16)
    compiled_gemv()(x2.contiguous().view(torch.int16).numpy().view(np.uint16), weight.numpy(),
                    scale.float().contiguous().numpy(), out.view(torch.int16).numpy().view(np.uint16))
    return out


def small_m_int8(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] bf16 (M small) @ int8 weight [N, K] with per-row scale [N, 1] -> [M, N] bf16: the rows in fours
    (mm4), then a pair (mm2), then a single row (the GEMV)."""
    mm4, mm2 = compiled_small_m()
    m = x2.shape[0]
    xf = x2.float().contiguous()
    out = torch.empty((m, weight.shape[0]), dtype=torch.float32)
    w, s = weight.numpy(), scale.view(-1).float().numpy()
    r = 0
    for kernel, rows in ((mm4, 4), (mm2, 2)):
        while m - r >= rows:
            kernel(xf[r:r + rows].numpy(), w, s, out[r:r + rows].numpy())
            r += rows
    if r < m:
        out[r:] = gemv_int8(x2[r:], weight, scale).float()
    return out.to(torch.bfloat16)


def int8pack_mm(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch's int8 weight-only kernel; per-row scales only, K a multiple of INT8PACK_K_MULTIPLE (cpu_dispatch)."""
    return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), weight, scale.view(-1))


def dequant_block_mm(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x2 @ (weight * scale)^T with the weight dequantized one row block at a time (no full-size copy)."""
    m, k = x2.shape
    n = weight.shape[0]
    groups = scale.shape[1]
    rows = max(16, _BLOCK_BYTES // (4 * k))
    dtype = prefill_dtype()
    xc = x2.to(dtype)
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        q = weight[start:stop].to(dtype)
        s = scale[start:stop].to(dtype)
        if groups == 1:
            w = q * s
        else:
            w = (q.view(stop - start, groups, k // groups) * s.unsqueeze(-1)).view(stop - start, k)
        out[:, start:stop] = torch.mm(xc, w.t())
    return out
