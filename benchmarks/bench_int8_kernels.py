"""CPU int8 matmul kernels standalone on a 1.0B Llama's linear shapes; prints one JSON object.

    python benchmarks/bench_int8_kernels.py [--ms 1,2,4,8,16,32,512] [--threads 1,2] [--shapes qkv,o,gate_up,down]
                                            [--seconds 0.15] [--loops] [--save results/cpu_kernels_KIND.json]

For each weight shape, row count M and torch thread count: the median ms of
- cpp: the compiled kernel (quant/csrc/int8_mm.cpp, the ISA path it runs here);
- dequant: int8 tiles widened in cache into the dense GEMM (quant/cpu_kernels.py), the compute-bound path;
- int8pack (with --int8pack): torch's _weight_int8pack_mm, the decode path without a compiler;
- bf16: vLLM's own CPU bf16 linear (dispatch_cpu_unquantized_gemm, as vLLM's UnquantizedLinearMethod sets it up
  and as benchmarks/bench_int8.py times it);
with --loops, cpp again with each of its inner loops forced at every row count (loop_int16, loop_u8, loop_panel:
those this CPU runs), the measurement behind the default row bounds in csrc/int8_mm.cpp;
and the ratios PATH/cpp (above 1: cpp is faster); the plan a server would use is `normswap int8-plan`. Every call
cycles through copies of the weight that together fill twice the largest CPU cache, as the plan's timings do
(vllm_normswap.cpuinfo.cycle_bytes; in the engine each layer's weight comes from memory); warm-up calls are not timed. Shapes: hidden 2048, ffn 5632, full multi-head attention (bench_int8.py's default model).

Each figure also as GFLOP/s and as a share of the CPU's dot-product ceiling (dot_peak.py, measured after the
matmuls): where vLLM's bf16 linear runs near that ceiling, int8 weights cannot make a matmul faster, only smaller.
--save writes that table as a result file (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import vllm_normswap.cpuinfo as cpuinfo

import bench_int8  # noqa: E402  (benchmarks/ is on sys.path when this file runs)
import dot_peak  # noqa: E402
import machine  # noqa: E402

SHAPES = {"qkv": (3 * 2048, 2048), "o": (2048, 2048), "gate_up": (2 * 5632, 2048), "down": (2048, 5632)}


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
    ap.add_argument("--loops", action="store_true", help="also time cpp with each of its inner loops forced")
    ap.add_argument("--no-peaks", action="store_true", help=argparse.SUPPRESS)  # a child of several --threads
    ap.add_argument("--save", help="also write the GFLOP/s table against the CPU's dot-product ceiling "
                                   "(dot_peak.py) as a result file for benchmarks/README.md")
    a = ap.parse_args()

    from vllm_normswap.quant import cpp_kernel

    if cpp_kernel.loaded() is None:
        raise SystemExit("the compiled kernel did not build: see the warning above")
    isa = cpp_kernel.default_isa()
    counts = [int(t) for t in a.threads.split(",")]
    if len(counts) == 1:
        rows = timed_rows(a, counts[0], isa)
    else:
        # one fresh process per thread count: vLLM's bf16 linear keeps the thread count its oneDNN primitives were
        # made with (quant/cpu_plan.py), so in one process the second count would time the first one's speed
        rows = []
        for threads in counts:
            argv = [v for i, v in enumerate(sys.argv[1:], 1) if not v.startswith(("--threads", "--save"))
                    and sys.argv[i - 1] not in ("--threads", "--save")]
            done = subprocess.run([sys.executable, __file__, *argv, "--threads", str(threads), "--no-peaks"],
                                  check=True, capture_output=True, text=True)
            rows += json.loads(done.stdout)["rows"]
    # after the matmuls, so that they ran on a cool core; the ceiling of every thread count timed
    peaks = {} if a.no_peaks else {t: dot_peak.measure(t) for t in sorted({r["threads"] for r in rows})}
    for row in rows if peaks else []:
        row["gflop"] = 2 * row["m"] * row["n"] * row["k"] / 1e9
        op, peak = dot_peak.ceiling(peaks[row["threads"]])
        for path in ("cpp", "bf16"):
            if f"{path}_ms" in row:
                row[f"{path}_gflops"] = row["gflop"] / row[f"{path}_ms"] * 1e3
                row[f"{path}_of_ceiling"] = row[f"{path}_gflops"] / peak
    result = {"cpu": machine.cpu_info(), "torch": torch.__version__, "isa": cpp_kernel.ISAS[isa],
              "granularity": a.granularity, "peaks_gflops": peaks, "rows": rows}
    print(json.dumps(result, indent=1))
    if a.save:
        Path(a.save).write_text(json.dumps(ceiling_table(result, " ".join(sys.argv[1:])), indent=1) + "\n")
    return 0


def timed_rows(a, threads: int, isa: int) -> list[dict]:
    """Every shape and row count at ``threads`` torch threads, set before any of vLLM's bf16 linears exists."""
    from vllm_normswap.quant import cpp_kernel
    from vllm_normswap.quant.cpu_kernels import dequant_mm, int8pack_mm
    from vllm_normswap.quant.primitives import quantize

    torch.set_num_threads(threads)
    others = {"dequant": dequant_mm} if a.dequant else {}
    if a.int8pack and a.granularity == "channel":
        others["int8pack"] = int8pack_mm
    rows = []
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        copies = max(2, -(-cpuinfo.cycle_bytes() // (n * k)))
        weights = [quantize(torch.randn(n, k).to(torch.bfloat16) * 0.02, a.granularity, 128)
                   for _ in range(copies)]
        bf16 = [bench_int8.vllm_bf16_linear(n, k)
                for _ in range(max(2, -(-cpuinfo.cycle_bytes() // (2 * n * k))))] if a.bf16 else []
        for m in (int(v) for v in a.ms.split(",")):
            x = torch.randn(m, k).to(torch.bfloat16)
            row = {"shape": name, "n": n, "k": k, "m": m, "threads": threads}
            row["cpp_ms"] = median_ms([lambda q=q, s=s: cpp_kernel.int8_mm(x, q, s, isa) for q, s in weights],
                                      a.seconds)
            # each inner loop this CPU runs for the shape, forced (cpp_kernel.loops: what the plan times)
            for loop in cpp_kernel.loops(k, weights[0][1].shape[1], isa) if a.loops else ():
                row[f"loop_{loop}_ms"] = median_ms(
                    [lambda q=q, s=s, f=cpp_kernel.loop_mm(loop): f(x, q, s, isa) for q, s in weights], a.seconds)
            for path, fn in others.items():
                row[f"{path}_ms"] = median_ms([lambda q=q, s=s, fn=fn: fn(x, q, s) for q, s in weights], a.seconds)
                row[f"{path}_over_cpp"] = row[f"{path}_ms"] / row["cpp_ms"]
            if a.bf16:
                row["bf16_ms"] = median_ms([lambda f=f: f(x) for f in bf16], a.seconds)
                row["bf16_over_cpp"] = row["bf16_ms"] / row["cpp_ms"]
            rows.append(row)
        del weights, bf16
    return rows


def ceiling_table(result: dict, args: str) -> dict:
    """The result file: per shape, M and thread count the GFLOP/s of vLLM's bf16 linear and of the cpp path, each
    as a share of the dot-product ceiling its CPU's bf16 matmul runs on (dot_peak.py)."""
    cpu = result["cpu"]
    op = dot_peak.ceiling(next(iter(result["peaks_gflops"].values())))[0]
    rows = [[f"{r['shape']} [{r['n']} x {r['k']}]", r["m"], r["threads"],
             f"{r['bf16_gflops']:.0f} ({r['bf16_of_ceiling']:.0%})", f"{r['cpp_gflops']:.0f} ({r['cpp_of_ceiling']:.0%})",
             f"{r['bf16_ms'] / r['cpp_ms']:.2f}x"] for r in result["rows"]]
    peaks = "; ".join(f"{t} thread(s): " + ", ".join(f"{k} {v:.0f}" for k, v in p.items())
                      for t, p in result["peaks_gflops"].items())
    return {
        "title": f"int8 (cpp path) and vLLM's bf16 linear against the CPU's dot-product ceiling, {cpu['kind']}",
        "benchmark": f"benchmarks/bench_int8_kernels.py {args}".strip(),
        "machine": f"{cpu['cores']}-core {cpu['model']}, torch {result['torch']}, bf16 activations, "
                   f"{result['granularity']} scales, int8 ISA path {result['isa']}",
        "cpu_flags": " ".join(cpu["flags"]),
        "date": time.strftime("%Y-%m-%d"),
        "notes": (f"GFLOP/s (2 per multiply-add) and, in brackets, the share of the ceiling: the {op} peak of "
                  f"dot_peak.py (GFLOP/s, all threads at once: {peaks}). Where vLLM's bf16 matmul is near "
                  f"100%, no W8A16 kernel can be much faster: its dot products cannot be fewer or faster than "
                  f"bf16's, and widening int8 weights costs instructions on top. Weights cycled through twice "
                  f"the largest CPU cache ({cpuinfo.cycle_bytes() >> 20} MiB in all); median of calls after "
                  f"warm-up."),
        "columns": ["weight", "M", "threads", "vLLM bf16 GFLOP/s (of ceiling)", "int8 GFLOP/s (of ceiling)",
                    "int8 / bf16 (speed)"],
        "rows": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
