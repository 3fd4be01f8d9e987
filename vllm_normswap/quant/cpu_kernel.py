"""CPU int8 weight-only matmul, registered as one opaque custom op (`torch.ops.vllm.normswap_int8_linear`).

Why a custom op: the right kernel depends on the number of rows M (decode vs prefill); inside an op that
branch is plain Python, invisible to torch.compile (no shape guards, no recompiles).

Kernel choice (measured on a 2-core AMD EPYC with AVX-512 but no AVX512-BF16, torch 2.13, bf16 activations; on
such a CPU vLLM's own bf16 linear cannot build its oneDNN matmul and falls back to torch F.linear):
- M <= DECODE_MAX_ROWS, per-row scales: `aten._weight_int8pack_mm` reads the int8 weight directly (half the
  bytes of bf16); 1.4-3x faster than bf16 F.linear at M = 1..64 (e.g. [11264 x 2048]: 3.1 vs 4.3 ms at M=1,
  9 vs 25 ms at M=8).
- M = 1, bf16, at most GEMV_MAX_THREADS torch threads (one is vLLM's default on a small box: its CPU worker keeps
  a core for the scheduler): a Numba GEMV (`_gemv_bf16`) that widens x once and streams the int8 rows, four
  of them at a time; on one thread it reads ~25 GB/s, about what one core can pull from memory ([11264 x 2048]:
  0.83-0.93 ms vs int8pack 2.4 ms, and vs 1.3 ms for int8pack on two threads). With more threads int8pack's
  parallel loop should win (not measured: this box has 2 cores). NORMSWAP_INT8_GEMV=int8pack turns it off.
- otherwise (prefill, or per-group scales): dequantize the weight in row blocks that stay cache-resident and
  run a dense GEMM per block. The block GEMM runs in bf16 where the CPU has native bf16 dot products
  (AVX512-BF16/AMX, where vLLM's bf16 oneDNN path is fast, so we must be too; not measured here), else in fp32
  (MKL sgemm): at M=512 on [11264 x 2048] 216 ms vs 1206 ms for bf16 F.linear and 450 ms for int8pack.

On a CPU with AVX512-BF16 (2-core AMD EPYC, one thread, [11264 x 2048], weights cycled through more than L3)
vLLM's bf16 linear is oneDNN with prepacked weights and native bf16 dot products, and the picture changes:
  M=1: Numba GEMV 0.83-0.93 ms, int8pack 2.52, vLLM bf16 2.99   M=8: int8pack 6.7, block dequant 11.4, bf16 3.06
  M=64: block dequant 24.0, int8pack 53, bf16 14.6          M=512: block dequant 122, bf16 107
Only batch-1 decode wins there. Beyond it int8 needs a kernel that widens int8 to bf16 in registers and feeds
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


def _gemv_bf16_py(xbits, w, scale, out):
    """out[m, n] = bf16(scale[n] * sum_k x[m, k] * w[n, k]); xbits/out: bf16 bit patterns (uint16), w int8,
    scale float32. fp32 accumulation; the result is rounded to nearest even, as torch rounds to bf16.

    One core reads a single sequential stream at ~17 GB/s but four at ~25 (the hardware prefetcher tracks each
    stream; more misses are in flight). So the rows are dealt in four quarters, n, n+Q, n+2Q, n+3Q, each with its own
    accumulator in one k loop: [11264 x 2048] 1.1-1.8 ms -> 0.83 ms, [2048 x 5632] 1.1 -> 0.61 ms (one thread,
    AVX-512 EPYC), bitwise the same results as one row at a time (each row's reduction order is unchanged)."""
    m_rows, k_dim = xbits.shape
    n_dim = w.shape[0]
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
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for k in range(k_dim):
                xk = xf[k]
                a0 += xk * np.float32(w[n, k])
                a1 += xk * np.float32(w[n + q, k])
                a2 += xk * np.float32(w[n + 2 * q, k])
                a3 += xk * np.float32(w[n + 3 * q, k])
            yb[0] = a0 * scale[n]
            yb[1] = a1 * scale[n + q]
            yb[2] = a2 * scale[n + 2 * q]
            yb[3] = a3 * scale[n + 3 * q]
            for i in range(4):
                b = ybits[i]
                out[m, n + i * q] = np.uint16((b + rnd + ((b >> sh) & one)) >> sh)
        for n in range(4 * q, n_dim):  # the n_dim % 4 rows left over
            acc = np.float32(0.0)
            for k in range(k_dim):
                acc += xf[k] * np.float32(w[n, k])
            yb[0] = acc * scale[n]
            b = ybits[0]
            out[m, n] = np.uint16((b + rnd + ((b >> sh) & one)) >> sh)


@functools.lru_cache(maxsize=None)
def _gemv_bf16():
    """The compiled GEMV, or None without Numba. Imported on first use, not with the plugin (see
    observe/host_kernel.py: vLLM's start-up kernel scan trips over llvmlite)."""
    try:
        import numba
    except ImportError:
        return None
    fastmath = {"reassoc", "nsz", "contract", "arcp"}  # lets LLVM vectorise the dot products
    try:
        return numba.njit(cache=True, nogil=True, fastmath=fastmath)(_gemv_bf16_py)
    except RuntimeError:  # no writable cache location
        return numba.njit(nogil=True, fastmath=fastmath)(_gemv_bf16_py)


def _use_gemv(x2: torch.Tensor, scale: torch.Tensor) -> bool:
    if GEMV == "int8pack" or x2.shape[0] != 1 or x2.dtype != torch.bfloat16 or scale.shape[1] != 1:
        return False
    return (GEMV == "numba" or torch.get_num_threads() <= GEMV_MAX_THREADS) and _gemv_bf16() is not None


def gemv_int8(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] bf16 @ int8 weight [N, K] with per-row scale [N, 1] -> [M, N] bf16, via the Numba GEMV."""
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=torch.bfloat16)
    _gemv_bf16()(x2.contiguous().view(torch.int16).numpy().view(np.uint16), weight.numpy(),
                 scale.view(-1).float().numpy(), out.view(torch.int16).numpy().view(np.uint16))
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
    if _use_gemv(x2, scale):
        y = gemv_int8(x2, weight, scale)
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


def _register() -> None:
    if hasattr(torch.ops.vllm, "normswap_int8_linear"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("normswap_int8_linear", int8_linear, mutates_args=[],
                              fake_impl=_int8_linear_fake, dispatch_key="CPU")


_register()


def apply_int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.vllm.normswap_int8_linear(x, weight, scale, bias)
