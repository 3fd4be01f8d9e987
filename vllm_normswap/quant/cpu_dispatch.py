"""Which CPU int8 kernel runs a matmul: the plan measured on this machine (cpu_plan.py), one kernel per layer shape
and row-count bucket, looked up per call.

The three CPU paths:
- "cpp": the compiled kernel (cpp_kernel.py, csrc/int8_mm.cpp): 16-bit activations x int8 weights, parallel over
  the torch threads; any activation dtype and scale granularity. Three inner loops (integer dot products on int16,
  on byte planes, or on byte planes in 16-row panels); the plan names the one it measured fastest per bucket
  ("cpp:u8").
  Built on first use; unavailable without a C++ compiler.
- "dequant": int8 weight tiles widened in cache and fed to the dense GEMM (cpu_kernels.dequant_mm), for shapes
  where compute dominates and the CPU's GEMM (e.g. oneDNN with native bf16 dot products) outruns integer dot
  products. Pure torch; any scale granularity.
- "int8pack": torch's `_weight_int8pack_mm` (cpu_kernels.int8pack_mm), the pure-torch path that reads the int8
  weight directly, for decode where the compiled kernel did not build. Per-row scales, K a multiple of 32.

Which one wins depends on the CPU (its bf16 GEMM above all), the thread count and the shape, so nothing here
assumes a winner: the plan times the candidates against vLLM's own bf16 linear where the model loads, and caches
the choice. NORMSWAP_INT8_KERNEL=cpp|dequant|int8pack forces one path for experiments (auto, the default: the plan).
"""

from __future__ import annotations

import functools
import os

import torch

import vllm_normswap.quant.cpp_kernel as cpp_kernel
import vllm_normswap.quant.cpu_plan as cpu_plan
from vllm_normswap.quant.cpu_kernels import int8pack_applies

ENV = "NORMSWAP_INT8_KERNEL"
KERNEL_CHOICES = ("auto",) + cpu_plan.PATHS
# a plan's kernels ("cpp:<loop>", ...) and the paths NORMSWAP_INT8_KERNEL forces ("cpp": the extension's own bounds)
KERNELS = {name: cpu_plan.kernel(name) for name in cpu_plan.KERNELS + cpu_plan.PATHS}


@functools.lru_cache(maxsize=None)
def forced() -> str | None:
    """The path NORMSWAP_INT8_KERNEL forces, or None for the measured plan (read once; ``forced.cache_clear()``
    re-reads)."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in KERNEL_CHOICES:
        raise ValueError(f"{ENV}={value!r}; allowed values: {', '.join(KERNEL_CHOICES)}")
    if value == "cpp" and cpp_kernel.loaded() is None:
        raise ValueError(f"{ENV}=cpp, but the compiled kernel did not build (see the warning above); "
                         f"install a C++ compiler or use {ENV}=auto")
    return None if value == "auto" else value


def check_forced(n: int, k: int, groups: int) -> None:
    """At load: a forced path that cannot run this layer fails here, naming the layer shape and the fix."""
    path = forced()
    if path == "int8pack" and not int8pack_applies(k, groups):
        raise ValueError(f"{ENV}=int8pack cannot run a [{n} x {k}] layer with {groups} scale column(s): int8pack "
                         f"needs per-channel scales and an input size that is a multiple of 32; use {ENV}=auto")


def prepare(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    """Called when a layer's int8 weight is final (process_weights_after_loading): the plan for its shape, from
    the cache or measured now with the worker's thread count, so that no forward pass measures."""
    n, k = weight.shape
    check_forced(n, k, scale.shape[1])
    if forced() is None:
        cpu_plan.plan_for(n, k, scale.shape[1], dtype, torch.get_num_threads(), weight=weight, scale=scale)


def choose(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> str:
    """The kernel for x2 [M, K] @ weight [N, K] with scale [N, G]."""
    path = forced()
    if path is not None:
        return path
    plan = cpu_plan.plan_for(weight.shape[0], x2.shape[1], scale.shape[1], x2.dtype, torch.get_num_threads())
    return plan.kernels[cpu_plan.bucket(x2.shape[0])]


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) @ int8 weight [N, K] with scale [N, 1] or [N, K/G] (x's dtype) + bias."""
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if scale.shape[0] != n:  # one per-tensor scale [1, 1] (quantize(w, "tensor")): every kernel indexes it by row
        scale = scale.expand(n, scale.shape[1]).contiguous()
    y = KERNELS[choose(x2, weight, scale)](x2, weight, scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)
