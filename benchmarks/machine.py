"""What the machine is, for every benchmark here: the CPU's kind and flags, the memory read bandwidth (the
batch-1 roofline), the CPUs of a thread binding."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# the package from this checkout where the interpreter lacks it (the llama.cpp peer's, llama_cpp_peer.py):
# appended, so an installed vllm_normswap comes first
CHECKOUT = str(Path(__file__).resolve().parent.parent)
if CHECKOUT not in sys.path:
    sys.path.append(CHECKOUT)
from vllm_normswap.cpuinfo import cpu_model_and_flags  # noqa: E402

KIND_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
EMULATED_AVX2 = os.environ.get("NORMSWAP_AS_AVX2") == "1"  # scripts/as_avx2.sh holds every kernel choice to AVX2


def cpu_info() -> dict:
    """The CPU model, core count and the flags that decide which kernels run (ours, vLLM's bf16 linear and
    llama.cpp's); every benchmark here records it."""
    model, flags = cpu_model_and_flags()
    kind = "AVX512-BF16" if "avx512_bf16" in flags else "AVX-512 without BF16" if "avx512f" in flags else "AVX2"
    seen = [f for f in KIND_FLAGS if f in flags]
    if EMULATED_AVX2:
        return {"model": model, "cores": os.cpu_count(), "flags": ["avx2"], "kind": f"AVX2 (emulated on {kind})",
                "emulated_on": seen}
    return {"model": model, "cores": os.cpu_count(), "flags": seen, "kind": kind}


def kind_slug(cpu: dict) -> str:
    """'avx512bf16', 'avx512' (AVX-512 without BF16) or 'avx2', from ``cpu_info()``: names result files and work
    folders."""
    return cpu["kind"].split(" ")[0].lower().replace("-", "")


def read_bw(threads: int = 1, mib: int = 512, reps: int = 3) -> float:
    """Bytes/s that ``threads`` cores read from memory, each from four streams at once (as the int8 GEMV reads),
    measured in this run: the batch-1 roofline. A fixed figure would not do: the CPU and a shared box's
    neighbours move it. (The int8 kernel reads from 8 streams per thread and can beat this probe.)"""
    import numba
    import numpy as np

    @numba.njit(fastmath=True)
    def read4(a):  # four streams a quarter of a apart (indexing from an offset defeats numba's vectorizer)
        q = a.size // 4
        s0 = s1 = s2 = s3 = 0
        for i in range(q):
            s0 += a[i]
            s1 += a[i + q]
            s2 += a[i + 2 * q]
            s3 += a[i + 3 * q]
        return s0 + s1 + s2 + s3

    @numba.njit(parallel=True)
    def read(a, t):
        n = a.size // t
        part = np.zeros(t, np.int64)
        for j in numba.prange(t):  # one contiguous share per thread
            part[j] = read4(a[j * n:(j + 1) * n])
        return part.sum()

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    a = np.ones(mib << 18, np.int32)
    assert read(a, threads) == (a.size // threads // 4) * 4 * threads  # every element read once
    best = min(seconds(lambda: read(a, threads)) for _ in range(reps))
    return a.nbytes / best


def gpu_read_bw(gib: int = 2, reps: int = 5) -> float:
    """Bytes/s the GPU reads from its memory (a sum over a buffer far larger than its L2 cache): the roofline of
    bandwidth-bound decode. Measured in this process after the engines are gone, so it has the GPU to itself."""
    import torch

    x = torch.ones(gib << 28, dtype=torch.float32, device="cuda")
    x.sum()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    nbytes = x.numel() * x.element_size()
    del x
    torch.cuda.empty_cache()
    return nbytes / best


def bind_cpus(bind: str) -> list[int]:
    """CPU ids of the first rank of a VLLM_CPU_OMP_THREADS_BIND value such as '0', '0-1' or '0,2-3|4-7'."""
    cpus = []
    for part in bind.split("|")[0].split(","):
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
