"""The compute ceiling of this CPU for a bf16 or W8A16 matmul: multiply-adds per second that the cores' vector
units retire, per instruction such a matmul can be built on; prints one JSON object.

    python benchmarks/dot_peak.py [--threads 1,2] [--seconds 0.3]

Per instruction this CPU has (checked with __builtin_cpu_supports, so a flag the kernel hides is skipped):
- fma_fp32: vfmadd231ps on zmm (AVX-512) or ymm (AVX2): what oneDNN's bf16 matmul runs on a CPU without native
  bf16 (activations and weights widened to fp32);
- vpdpwssd: int16 pairs into int32 (AVX512-VNNI), the instruction of our int16 W8A16 loop;
- vpdpbusd: uint8 x int8 quads into int32 (AVX512-VNNI), 64 multiply-adds each, the instruction of our byte-plane
  loop, which needs two of them (high and low byte of the 16-bit activation) per 64 W8A16 multiply-adds: its
  W8A16 ceiling is half the figure;
- vdpbf16ps: bf16 pairs into fp32 (AVX512-BF16), what oneDNN's bf16 matmul runs on here.
Twelve independent accumulators per thread (more than latency x throughput on every core seen), one thread per
core, all threads at once, each pinned to its core; GFLOP/s counts a multiply-add as 2. The best of three
repetitions: the ceiling is what the unit can do, so a repetition slowed by a neighbour does not count.

Built with the system g++ into a temporary folder (no torch, a second to build); `bench_int8_kernels.py --save`
divides each matmul's GFLOP/s by the ceiling of the instruction its CPU's bf16 matmul runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import machine  # noqa: E402  (benchmarks/ is on sys.path when this file runs)

SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#define REP12(X) X(a0) X(a1) X(a2) X(a3) X(a4) X(a5) X(a6) X(a7) X(a8) X(a9) X(a10) X(a11)

// One function per instruction (OP_<name>): 12 independent accumulators, each takes the instruction n times;
// returns the multiply-adds done (MACS per instruction).
#define RUN(NAME, TARGET, ACC, ZERO, SRC, SET, MACS)                                              \
  __attribute__((target(TARGET))) long NAME(long n) {                                                        \
    ACC a0 = ZERO(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, \
        a11 = a0;                                                                                             \
    SRC x = SET(1), y = SET(2);                                                                               \
    for (long i = 0; i < n; ++i) { REP12(OP_##NAME) }                                                         \
    return n * 12 * MACS;                                                                                     \
  }
#define OP_run_bf16(a) asm volatile("vdpbf16ps %1, %2, %0" : "+v"(a) : "v"(x), "v"(y));
#define OP_run_vnni(a) asm volatile("vpdpwssd %1, %2, %0" : "+v"(a) : "v"(x), "v"(y));
#define OP_run_busd(a) asm volatile("vpdpbusd %1, %2, %0" : "+v"(a) : "v"(x), "v"(y));
#define OP_run_fma512(a) asm volatile("vfmadd231ps %1, %2, %0" : "+v"(a) : "v"(x), "v"(y));
#define OP_run_fma256(a) asm volatile("vfmadd231ps %1, %2, %0" : "+x"(a) : "x"(x), "x"(y));
RUN(run_bf16, "avx512f,avx512bf16", __m512, _mm512_setzero_ps, __m512i, _mm512_set1_epi16, 32)
RUN(run_vnni, "avx512f,avx512vnni", __m512i, _mm512_setzero_si512, __m512i, _mm512_set1_epi16, 32)
RUN(run_busd, "avx512f,avx512vnni", __m512i, _mm512_setzero_si512, __m512i, _mm512_set1_epi8, 64)
RUN(run_fma512, "avx512f", __m512, _mm512_setzero_ps, __m512, _mm512_set1_ps, 16)
RUN(run_fma256, "avx2,fma", __m256, _mm256_setzero_ps, __m256, _mm256_set1_ps, 8)

// argv: instruction, seconds, cpu ids...; prints GFLOP/s of all threads together
int main(int argc, char** argv) {
  __builtin_cpu_init();
  const char* op = argv[1];
  const double seconds = atof(argv[2]);
  long (*fn)(long) = nullptr;
  if (!strcmp(op, "vdpbf16ps") && __builtin_cpu_supports("avx512bf16")) fn = run_bf16;
  else if (!strcmp(op, "vpdpwssd") && __builtin_cpu_supports("avx512vnni")) fn = run_vnni;
  else if (!strcmp(op, "vpdpbusd") && __builtin_cpu_supports("avx512vnni")) fn = run_busd;
  else if (!strcmp(op, "fma_fp32") && __builtin_cpu_supports("avx512f")) fn = run_fma512;
  else if (!strcmp(op, "fma_fp32") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) fn = run_fma256;
  if (!fn) { printf("unsupported\n"); return 0; }
  // calibrate the iteration count on one thread, then run every thread at once
  long n = 1 << 16;
  for (;;) {
    auto t = std::chrono::steady_clock::now();
    fn(n);
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count() > 0.02) break;
    n *= 2;
  }
  auto t = std::chrono::steady_clock::now();
  fn(n);
  n = long(n * seconds / std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count()) + 1;
  std::vector<std::thread> threads;
  std::vector<double> flops(argc - 3);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 3; i < argc; ++i)
    threads.emplace_back([&, i] {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(atoi(argv[i]), &set);
      pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
      flops[i - 3] = 2.0 * fn(n);
    });
  for (auto& th : threads) th.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double total = 0;
  for (double f : flops) total += f;
  printf("%.3f\n", total / s / 1e9);
  return 0;
}
"""
INSTRUCTIONS = ("fma_fp32", "vpdpwssd", "vpdpbusd", "vdpbf16ps")


def build(folder: Path) -> Path:
    src, exe = folder / "dot_peak.cpp", folder / "dot_peak"
    src.write_text(SOURCE)
    subprocess.run(["g++", "-O2", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


def measure(threads: int, seconds: float = 0.3, exe: Path | None = None) -> dict:
    """{instruction: GFLOP/s of `threads` threads on cores 0..threads-1} for the instructions this CPU has."""
    if exe is None:
        with tempfile.TemporaryDirectory() as tmp:
            return measure(threads, seconds, build(Path(tmp)))
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    out = {}
    for op in INSTRUCTIONS:
        runs = [subprocess.run([str(exe), op, str(seconds), *map(str, cpus)], check=True, capture_output=True,
                               text=True).stdout.strip() for _ in range(3)]
        if "unsupported" not in runs:
            out[op] = round(max(map(float, runs)), 1)
    return out


def ceiling(peaks: dict) -> tuple[str, float]:
    """The instruction a bf16 matmul runs on this CPU (vdpbf16ps where it exists, else fp32 FMA) and its GFLOP/s."""
    op = "vdpbf16ps" if "vdpbf16ps" in peaks else "fma_fp32"
    return op, peaks[op]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--seconds", type=float, default=0.3, help="timed seconds per instruction and repetition")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        peaks = {t: measure(t, a.seconds, exe) for t in (int(v) for v in a.threads.split(","))}
    print(json.dumps({"cpu": machine.cpu_info(), "gflops": peaks}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
