"""CPU int8 weight-only matmul, registered as one opaque custom op (`torch.ops.normswap.int8_linear`).

Why a custom op: the right kernel depends on the number of rows M (decode vs prefill); inside an op that
branch is plain Python, invisible to torch.compile (no shape guards, no recompiles).

Kernel choice, in the order int8_linear tries them (2-core AMD EPYC, torch 2.13, bf16 activations):
- M = 1, bf16, any scale granularity, at most GEMV_MAX_THREADS torch threads (one is vLLM's default on a small
  box: its CPU worker keeps a core for the scheduler): a Numba GEMV (`_gemv_bf16`) that widens x once and streams
  the int8 rows, four at a time; on one thread it reads ~25 GB/s, about what one core can pull from memory
  ([11264 x 2048]: 0.83-0.93 ms vs int8pack 2.4 ms, and vs 1.3 ms for int8pack on two threads). With more
  threads int8pack's parallel loop should win (not measured: this box has 2 cores). NORMSWAP_INT8_GEMV=int8pack
  turns the Numba kernels off.
- M = 2..SMALL_M_MAX_ROWS, bf16, per-row scales, one torch thread: Numba kernels that widen each weight once
  for four rows (`_mm4_py`) or two (`_mm2_py`); a last odd row takes the GEMV. [11264 x 2048], one thread:
  M=2 1.5 ms, M=4 2.5, M=8 4.9, vs int8pack 2.7 / 3.3 / 6.5. They are compute-bound (fp32 FMAs), so on two
  threads int8pack's parallel loop wins (1.35 / 1.65 / 3.7 ms).
- M <= DECODE_MAX_ROWS otherwise (more threads, fp16/fp32 activations, 9+ rows), per-row scales:
  `aten._weight_int8pack_mm` reads the int8 weight directly; on an AVX-512 CPU without AVX512-BF16 1.4-3x faster
  than bf16 F.linear at M = 1..64 (e.g. [11264 x 2048]: 9 vs 25 ms at M=8).
- otherwise (prefill, or per-group scales beyond M = 1): dequantize the weight in row blocks that stay
  cache-resident and run a dense GEMM per block. The block GEMM runs in bf16 where the CPU has native bf16 dot
  products (AVX512-BF16/AMX, where vLLM's bf16 oneDNN path is fast, so we must be too), else in fp32 (MKL
  sgemm): at M=512 on [11264 x 2048] 216 ms vs 1206 ms for bf16 F.linear and 450 ms for int8pack.

Without AVX512-BF16, vLLM's own bf16 linear cannot build its oneDNN matmul and falls back to torch F.linear, and
int8 wins at every M. With AVX512-BF16 vLLM's bf16 linear is oneDNN with prepacked weights and native bf16 dot
products, and the picture changes (one thread, [11264 x 2048], weights cycled through more than L3):
  M=1: Numba GEMV 0.83-0.93 ms, int8pack 2.52, vLLM bf16 2.99   M=8: mm4 x 2 4.9, int8pack 6.7, bf16 3.06
  M=64: block dequant 24.0, int8pack 53, bf16 14.6          M=512: block dequant 122, bf16 107
Batch 1-4 decode wins there. Beyond it int8 needs a kernel that widens int8 to bf16 in registers and feeds
the bf16 dot-product instructions (vdpbf16ps / AMX), which neither torch nor Numba can emit: a C++ op.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

# Dequantized block: ~2 MiB of fp32 so it stays in L2 while the GEMM streams activations over it.
_BLOCK_BYTES = 2 << 20


def _native_bf16() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


_PREFILL_DTYPE = torch.bfloat16 if _native_bf16() else torch.float32
# torch's int8pack CPU kernel reads past the end of the row when K is not a multiple of its block: on an AVX-512
# CPU (torch 2.13) K = 8, 40, 100, 136, 520 gave garbage or a segfault, multiples of 16 were exact. Other K take
# the block-dequantize path, which is right for any shape.
INT8PACK_K_MULTIPLE = 32
# Row count up to which the int8pack GEMV-style kernel wins (measured on [11264 x 2048], one thread): 64 where
# the block GEMM runs in fp32; 16 where it runs in bf16 (M=64: 24 ms vs int8pack 53 ms). Override for experiments.
DECODE_MAX_ROWS = int(os.environ.get("NORMSWAP_INT8_DECODE_MAX_ROWS", "16" if _native_bf16() else "64"))
GEMV = os.environ.get("NORMSWAP_INT8_GEMV", "auto")  # auto | numba | int8pack
# Thread counts up to which the one-thread GEMV beats int8pack's parallel loop (measured on the 2-core box).
GEMV_MAX_THREADS = int(os.environ.get("NORMSWAP_INT8_GEMV_MAX_THREADS", "2"))
# 2..SMALL_M_MAX_ROWS rows (small decode batches) take the Numba mm4/mm2 kernels, on one torch thread only.
SMALL_M_MAX_ROWS = int(os.environ.get("NORMSWAP_INT8_SMALL_M_MAX_ROWS", "8"))


def _gemv_bf16_py(xbits, w, scale, out):
    """out[m, n] = bf16(sum_g scale[n, g] * sum_{k in group g} x[m, k] * w[n, k]); xbits/out: bf16 bit patterns
    (uint16), w int8, scale float32 [N, G] (G = 1: per channel or per tensor). fp32 accumulation; the result is
    rounded to nearest even, as torch rounds to bf16.

    One core reads a single sequential stream at ~17 GB/s but four at ~25 (the hardware prefetcher tracks each
    stream; more misses are in flight). So the rows are dealt in four quarters, n, n+Q, n+2Q, n+3Q, each with its own
    accumulator in one k loop: [11264 x 2048] 1.1-1.8 ms -> 0.83 ms, [2048 x 5632] 1.1 -> 0.61 ms (one thread,
    AVX-512 EPYC), bitwise the same results as one row at a time (each row's reduction order is unchanged).
    Per group of 128: 1.1-1.2 ms (block dequantize: 11 ms). The loops run over slices so that every index
    starts at 0: Numba then knows it is not negative and LLVM vectorises (with `range(lo, hi)` it did not: 7 ms)."""
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
def _gemv_bf16():
    """The compiled GEMV, or None without Numba. Imported on first use, not with the plugin (see
    observe/host_kernel.py: vLLM's start-up kernel scan trips over llvmlite)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return None
    return _njit(_gemv_bf16_py)


@functools.lru_cache(maxsize=None)
def _small_m():
    """The compiled (mm4, mm2) kernels for 2..SMALL_M_MAX_ROWS rows, or None without Numba."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return None
    return _njit(_mm4_py), _njit(_mm2_py)


def _use_gemv(x2: torch.Tensor, scale: torch.Tensor) -> bool:
    if GEMV == "int8pack" or x2.shape[0] != 1 or x2.dtype != torch.bfloat16:
        return False
    return (GEMV == "numba" or torch.get_num_threads() <= GEMV_MAX_THREADS) and _gemv_bf16() is not None


def _use_small_m(x2: torch.Tensor, scale: torch.Tensor) -> bool:
    if GEMV == "int8pack" or not 2 <= x2.shape[0] <= SMALL_M_MAX_ROWS or x2.dtype != torch.bfloat16 \
            or scale.shape[1] != 1:
        return False
    return torch.get_num_threads() == 1 and _small_m() is not None


def small_m_int8(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] bf16 (M small) @ int8 weight [N, K] with per-row scale [N, 1] -> [M, N] bf16: the rows in fours
    (mm4), then a pair (mm2), then a single row (the GEMV)."""
    mm4, mm2 = _small_m()
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


def gemv_int8(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] bf16 @ int8 weight [N, K] with scale [N, 1] or [N, K/G] -> [M, N] bf16, via the Numba GEMV."""
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=torch.bfloat16)
    _gemv_bf16()(x2.contiguous().view(torch.int16).numpy().view(np.uint16), weight.numpy(),
                 scale.float().contiguous().numpy(), out.view(torch.int16).numpy().view(np.uint16))
    return out


def dequant_block_mm(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x2 @ (weight * scale)^T with the weight dequantized one row block at a time (no full-size copy)."""
    m, k = x2.shape
    n = weight.shape[0]
    groups = scale.shape[1]
    rows = max(16, _BLOCK_BYTES // (4 * k))
    xc = x2.to(_PREFILL_DTYPE)
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        q = weight[start:stop].to(_PREFILL_DTYPE)
        s = scale[start:stop].to(_PREFILL_DTYPE)
        if groups == 1:
            w = q * s
        else:
            w = (q.view(stop - start, groups, k // groups) * s.unsqueeze(-1)).view(stop - start, k)
        out[:, start:stop] = torch.mm(xc, w.t())
    return out


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) @ int8 weight [N, K] with scale [N, 1] or [N, K/G] (x's dtype) + bias."""
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if scale.shape[0] != n:  # one per-tensor scale [1, 1] (quantize(w, "tensor")): every kernel indexes it by row
        scale = scale.expand(n, scale.shape[1]).contiguous()
    if _use_gemv(x2, scale):
        y = gemv_int8(x2, weight, scale)
    elif _use_small_m(x2, scale):
        y = small_m_int8(x2, weight, scale)
    elif scale.shape[1] == 1 and x2.shape[0] <= DECODE_MAX_ROWS and k % INT8PACK_K_MULTIPLE == 0:
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), weight, scale.view(-1))
    else:
        y = dequant_block_mm(x2, weight, scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


def _int8_linear_fake(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_LIB = torch.library.Library("normswap", "FRAGMENT")  # the project's one op namespace; must outlive the op


def _register() -> None:
    if hasattr(torch.ops.normswap, "int8_linear"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("int8_linear", int8_linear, mutates_args=[], fake_impl=_int8_linear_fake,
                              target_lib=_LIB, dispatch_key="CPU")


_register()


def apply_int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.normswap.int8_linear(x, weight, scale, bias)
