"""CPU int8 matmul kernels standalone on a 1.0B Llama's linear shapes; prints one JSON object.

    python benchmarks/bench_int8_kernels.py [--ms 1,2,4,8,16,32,512] [--threads 1,2] [--shapes qkv,o,gate_up,down]
                                            [--seconds 0.15]

For each weight shape, row count M and torch thread count: the median ms of
- cpp: the compiled kernel (quant/csrc/int8_mm.cpp, the ISA path it runs here);
- dequant: int8 tiles widened in cache into the dense GEMM (quant/cpu_kernels.py), the compute-bound path;
- int8pack (with --int8pack): torch's _weight_int8pack_mm, the decode path without a compiler;
- bf16: vLLM's own CPU bf16 linear (dispatch_cpu_unquantized_gemm, as vLLM's UnquantizedLinearMethod sets it up
  and as benchmarks/bench_int8.py times it);
and the ratios PATH/cpp (above 1: cpp is faster); the plan a server would use is `normswap int8-plan`. Every call
cycles through copies of the weight that together exceed the L3 cache (as in the engine, where each layer's
weight comes from memory); warm-up calls are not timed. Shapes: hidden 2048, ffn 5632, full multi-head attention (bench_int8.py's default model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import bench_int8  # noqa: E402  (benchmarks/ is on sys.path when this file runs)
import machine  # noqa: E402

SHAPES = {"qkv": (3 * 2048, 2048), "o": (2048, 2048), "gate_up": (2 * 5632, 2048), "down": (2048, 5632)}
CYCLE_BYTES = 128 << 20  # weights cycled per kernel: well above the L3 of the CPUs we run on (<= ~100 MiB)


def median_ms(fns: list, seconds: float) -> float:
    """Median over repeats of one call (cycling through fns); warm-up first, repeat count from its time (calls
    long enough to be compute-bound, > 20 ms, warm up on one weight copy only)."""
    fns[0]()
    t = time.perf_counter()
    fns[0]()
    one = time.perf_counter() - t
    if one < 0.02:
        for fn in fns[1:]:
            fn()
    reps = max(3, min(60, int(seconds / max(one, 1e-6))))
    times = []
    for i in range(reps):
        fn = fns[i % len(fns)]
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,2,4,8,16,32,512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--granularity", default="channel", choices=("channel", "group"))
    ap.add_argument("--seconds", type=float, default=0.15, help="timed seconds per figure (at least 3 calls)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false")
    ap.add_argument("--no-dequant", dest="dequant", action="store_false")
    ap.add_argument("--int8pack", action="store_true", help="also time torch's int8pack (per-channel only)")
    a = ap.parse_args()

    from vllm_normswap.quant import cpp_kernel
    from vllm_normswap.quant.cpu_kernels import dequant_mm, int8pack_mm
    from vllm_normswap.quant.primitives import quantize

    if cpp_kernel.loaded() is None:
        raise SystemExit("the compiled kernel did not build: see the warning above")
    isa = cpp_kernel.default_isa()
    others = {"dequant": dequant_mm} if a.dequant else {}
    if a.int8pack and a.granularity == "channel":
        others["int8pack"] = int8pack_mm
    rows = []
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        copies = max(2, -(-CYCLE_BYTES // (n * k)))
        weights = [quantize(torch.randn(n, k).to(torch.bfloat16) * 0.02, a.granularity, 128)
                   for _ in range(copies)]
        bf16 = [bench_int8.vllm_bf16_linear(n, k)
                for _ in range(max(2, -(-CYCLE_BYTES // (2 * n * k))))] if a.bf16 else []
        for threads in (int(t) for t in a.threads.split(",")):
            torch.set_num_threads(threads)
            for m in (int(v) for v in a.ms.split(",")):
                x = torch.randn(m, k).to(torch.bfloat16)
                row = {"shape": name, "n": n, "k": k, "m": m, "threads": threads}
                row["cpp_ms"] = median_ms([lambda q=q, s=s: cpp_kernel.int8_mm(x, q, s, isa) for q, s in weights],
                                          a.seconds)
                for path, fn in others.items():
                    row[f"{path}_ms"] = median_ms([lambda q=q, s=s, fn=fn: fn(x, q, s) for q, s in weights],
                                                  a.seconds)
                    row[f"{path}_over_cpp"] = row[f"{path}_ms"] / row["cpp_ms"]
                if a.bf16:
                    row["bf16_ms"] = median_ms([lambda f=f: f(x) for f in bf16], a.seconds)
                    row["bf16_over_cpp"] = row["bf16_ms"] / row["cpp_ms"]
                rows.append(row)
        del weights, bf16
    print(json.dumps({"cpu": machine.cpu_info(), "torch": torch.__version__, "isa": cpp_kernel.ISAS[isa],
                      "granularity": a.granularity, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
