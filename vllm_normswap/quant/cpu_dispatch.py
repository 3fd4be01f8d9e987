"""Which CPU int8 kernel (cpu_kernels.py) runs a matmul, by row count M, activation dtype, scale granularity and
torch thread count. Thresholds come from measurements on [11264 x 2048] (benchmarks/README.md); the environment
can override them for experiments (``knobs()``, read once, on the first matmul).

In the order ``choose`` tries them:
- "cpp": the compiled kernel (cpp_kernel.py; int16 activations x int8 weights in integer dot products, parallel
  over the torch threads), wherever it built, up to ``cpp_max_rows`` rows, any activation dtype and scale
  granularity. It beats both vLLM's bf16 linear and every kernel below in that range; the ones below remain for
  where it is unavailable (no compiler) or switched off (NORMSWAP_INT8_KERNEL=numba).
- "gemv": M = 1, bf16, any scale granularity, at most ``gemv_max_threads`` torch threads. One thread streaming
  the int8 rows is memory-bound and beats int8pack even on two threads; with more threads int8pack's parallel
  loop should win.
- "small_m": M = 2..``small_m_max_rows``, bf16, per-row scales, one torch thread. These kernels are
  compute-bound (fp32 FMAs), so with two threads int8pack's parallel loop wins.
- "int8pack": per-row scales, M <= ``decode_max_rows``, K a multiple of INT8PACK_K_MULTIPLE: reads the int8 weight
  directly; without native bf16 dot products it beats bf16 F.linear at every decode batch size.
- "dequant_block": everything else (prefill; per-group scales beyond M = 1).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

import vllm_normswap.quant.cpp_kernel as cpp_kernel
from vllm_normswap.quant.cpu_kernels import (compiled_gemv, compiled_small_m, dequant_block_mm, gemv_int8,
                                             int8pack_mm, native_bf16, small_m_int8)

# torch's int8pack CPU kernel reads past the end of the row when K is not a multiple of its block: on an AVX-512
# CPU (torch 2.13) K = 8, 40, 100, 136, 520 gave garbage or a segfault, multiples of 16 were exact. Other K take
# the block-dequantize path, which is right for any shape.
INT8PACK_K_MULTIPLE = 32
CPP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CPP_MAX_ROWS = 1 << 62
GEMV_CHOICES = ("auto", "numba", "int8pack")
KERNEL_CHOICES = ("auto", "cpp", "numba")


@dataclasses.dataclass(frozen=True)
class Knobs:
    # Rows up to which int8pack beats the block GEMM: 16 where the block GEMM runs in bf16 (native bf16 dot
    # products), 64 where it runs in fp32. NORMSWAP_INT8_DECODE_MAX_ROWS
    decode_max_rows: int
    # auto: the Numba kernels where they win; numba: the GEMV at M = 1 whatever the thread count; int8pack: no
    # Numba kernels. NORMSWAP_INT8_GEMV
    gemv: str = "auto"
    # thread counts up to which the one-thread GEMV beats int8pack's parallel loop. NORMSWAP_INT8_GEMV_MAX_THREADS
    gemv_max_threads: int = 2
    # 2..small_m_max_rows rows take the Numba mm4/mm2 kernels (one torch thread only). NORMSWAP_INT8_SMALL_M_MAX_ROWS
    small_m_max_rows: int = 8
    # auto: the compiled kernel where it built, up to cpp_max_rows rows; cpp: at any row count; numba: never (the
    # kernels below only). NORMSWAP_INT8_KERNEL
    kernel: str = "auto"
    # Rows up to which "auto" takes the compiled kernel (default: any; it beats the block GEMM at prefill too). A
    # CPU where oneDNN/MKL wins large prefills can hand them to the block GEMM. NORMSWAP_INT8_CPP_MAX_ROWS
    cpp_max_rows: int = CPP_MAX_ROWS


@functools.lru_cache(maxsize=None)
def knobs() -> Knobs:
    """The dispatch thresholds, from the environment where set (read once; ``knobs.cache_clear()`` re-reads)."""
    env = os.environ
    gemv = env.get("NORMSWAP_INT8_GEMV", "auto")
    if gemv not in GEMV_CHOICES:
        raise ValueError(f"NORMSWAP_INT8_GEMV={gemv!r}; allowed values: {', '.join(GEMV_CHOICES)}")
    kernel = env.get("NORMSWAP_INT8_KERNEL", "auto")
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"NORMSWAP_INT8_KERNEL={kernel!r}; allowed values: {', '.join(KERNEL_CHOICES)}")
    return Knobs(decode_max_rows=int(env.get("NORMSWAP_INT8_DECODE_MAX_ROWS",
                                             "16" if native_bf16() else "64")),
                 gemv=gemv,
                 gemv_max_threads=int(env.get("NORMSWAP_INT8_GEMV_MAX_THREADS", "2")),
                 small_m_max_rows=int(env.get("NORMSWAP_INT8_SMALL_M_MAX_ROWS", "8")),
                 kernel=kernel,
                 cpp_max_rows=int(env.get("NORMSWAP_INT8_CPP_MAX_ROWS", str(CPP_MAX_ROWS))))


def use_cpp(x2: torch.Tensor, k: Knobs) -> bool:
    if k.kernel == "numba" or (k.kernel == "auto" and x2.shape[0] > k.cpp_max_rows):
        return False
    return x2.dtype in CPP_DTYPES and cpp_kernel.loaded() is not None


def use_gemv(x2: torch.Tensor, scale: torch.Tensor, k: Knobs) -> bool:
    if k.gemv == "int8pack" or x2.shape[0] != 1 or x2.dtype != torch.bfloat16:
        return False
    return (k.gemv == "numba" or torch.get_num_threads() <= k.gemv_max_threads) \
        and compiled_gemv() is not None


def use_small_m(x2: torch.Tensor, scale: torch.Tensor, k: Knobs) -> bool:
    if k.gemv == "int8pack" or not 2 <= x2.shape[0] <= k.small_m_max_rows or x2.dtype != torch.bfloat16 \
            or scale.shape[1] != 1:
        return False
    return torch.get_num_threads() == 1 and compiled_small_m() is not None


def choose(x2: torch.Tensor, scale: torch.Tensor, k: Knobs | None = None) -> str:
    """The kernel for x2 [M, K] and scale [N, 1] or [N, K/G]: "cpp", "gemv", "small_m", "int8pack" or
    "dequant_block"."""
    k = k or knobs()
    if use_cpp(x2, k):
        return "cpp"
    if use_gemv(x2, scale, k):
        return "gemv"
    if use_small_m(x2, scale, k):
        return "small_m"
    if scale.shape[1] == 1 and x2.shape[0] <= k.decode_max_rows and x2.shape[1] % INT8PACK_K_MULTIPLE == 0:
        return "int8pack"
    return "dequant_block"


KERNELS = {"cpp": cpp_kernel.int8_mm, "gemv": gemv_int8, "small_m": small_m_int8, "int8pack": int8pack_mm,
           "dequant_block": dequant_block_mm}


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) @ int8 weight [N, K] with scale [N, 1] or [N, K/G] (x's dtype) + bias."""
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if scale.shape[0] != n:  # one per-tensor scale [1, 1] (quantize(w, "tensor")): every kernel indexes it by row
        scale = scale.expand(n, scale.shape[1]).contiguous()
    y = KERNELS[choose(x2, scale)](x2, weight, scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)
