"""The pure-torch CPU int8 matmuls that the plan (cpu_plan.py) measures beside the compiled kernel
(cpp_kernel.py). Each takes x2 [M, K] and an int8 weight [N, K] with its scale [N, 1] or [N, K/G] and returns
[M, N] in x2's dtype; none of them reads the environment or decides when it applies.

- dequant_mm: the compute-bound path. The int8 weight is widened one tile of rows at a time into a buffer that
  stays in cache, and the tile goes through the dense GEMM (torch.mm: oneDNN where the CPU has native bf16 dot
  products, MKL/OpenBLAS sgemm otherwise). Weights stay int8 in memory (W8A16); the tile costs one int8 read
  and one 16/32-bit write per weight, which a GEMM over many rows amortises.
- int8pack_mm: torch's `aten._weight_int8pack_mm`, which reads the int8 weight directly: the memory-bound
  (decode) path where the compiled kernel did not build. Per-row scales, K a multiple of INT8PACK_K_MULTIPLE.
"""

from __future__ import annotations

import functools

import torch

# torch's int8pack CPU kernel reads past the end of the row when K is not a multiple of its block: on an AVX-512
# CPU (torch 2.13) K = 8, 40, 100, 136, 520 gave garbage or a segfault, multiples of 16 were exact.
INT8PACK_K_MULTIPLE = 32
# Widened tile: ~1 MiB, so that it stays in L2 (or at worst L3) while the GEMM streams the activations over it;
# at least 64 rows, so the Python loop stays short (a few dozen tiles for a 1B model's largest layer).
TILE_BYTES = 1 << 20
TILE_MIN_ROWS = 64


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """The CPU has native bf16 dot products (AVX512-BF16 / AMX), which torch's bf16 GEMM (oneDNN) uses."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compute_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The GEMM's dtype: bf16 for bf16 activations where the CPU has native bf16 dot products (oneDNN, as vLLM's
    bf16 linear), else fp32: without them torch's bf16 GEMM converts element by element and is several times
    slower than sgemm (benchmarks/README.md, "without AVX512-BF16")."""
    return torch.bfloat16 if x_dtype == torch.bfloat16 and native_bf16() else torch.float32


def int8pack_applies(k: int, groups: int) -> bool:
    return groups == 1 and k % INT8PACK_K_MULTIPLE == 0


def int8pack_mm(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch's int8 weight-only kernel; per-row scales only, K a multiple of INT8PACK_K_MULTIPLE."""
    return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), weight, scale.view(-1).to(x2.dtype))


def dequant_mm(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x2 @ (weight * scale)^T, the weight widened one cache-sized tile of rows at a time.

    Per channel the scale is applied to the output columns (y[:, n] = scale[n] * (x2 @ q[n])): int8 values are
    exact in bf16, so the tile is a plain cast and the weight is never rounded. Per group the scale must sit
    inside the sum over K, so the tile is q * scale, in one fused pass."""
    m, k = x2.shape
    n = weight.shape[0]
    groups = scale.shape[1]
    dtype = compute_dtype(x2.dtype)
    xc = x2.to(dtype).contiguous()
    rows = min(n, max(TILE_MIN_ROWS, TILE_BYTES // (k * torch.finfo(dtype).bits // 8)))
    tile = torch.empty((rows, k), dtype=dtype)
    out = torch.empty((m, n), dtype=dtype)
    s = scale.to(dtype)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        t = tile[:stop - start]
        if groups == 1:
            t.copy_(weight[start:stop])
        else:
            torch.mul(weight[start:stop].view(stop - start, groups, k // groups),
                      s[start:stop].unsqueeze(-1), out=t.view(stop - start, groups, k // groups))
        out[:, start:stop] = torch.mm(xc, t.t())
    if groups == 1:
        out.mul_(s.view(1, n) if s.shape[0] == n else s.view(1, 1))
    return out.to(x2.dtype)
