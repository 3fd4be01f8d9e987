// CPU int8 weight-only matmul: y[M, N] = x[M, K] @ (q[N, K] * scale)^T, with integer dot products.
//
// The int16 loop: the activations are quantized per (row, block of K) to int16 (symmetric, sx = max|x| / 32767, xq = round(x /
// sx)): the error per element is at most blockmax / 65534, below bf16's own rounding of x for typical rows. The
// int8 weight is widened to int16 in registers and multiplied pairwise into int32 lanes (AVX512-VNNI vpdpwssd,
// else vpmaddwd + vpaddd); integer sums are exact, so every ISA path with the same lane count gives bitwise the
// same result. At the end of each block the int32 lanes are converted to fp32 and accumulated lane by lane,
// times sx (and, per group, the group's weight scale); the lanes are reduced once per output at the end, times
// the row's weight scale. Blocks: the caller's length per channel (256 by default: at 128 the per-block
// conversion and scaling are a visible share of the work), the group size per group (a divisor of it when above
// 256). Overflow: a lane sums at most 256 / 16 products of at most 32767 * 127 (4.2e6); an int32 holds 512.
//
// Register tiles: MR activation rows x NR weight rows of accumulators, so each widened weight vector feeds MR
// rows and each activation vector NR weight rows. Up to STREAM_MAX_ROWS rows (decode batches) the tiles take
// weight rows an NR-th of the thread's range apart, so that the hardware prefetcher runs NR streams at once (one
// core reads more from several streams than from one). That gained at every M measured from 1 to 32, on the AVX2
// and the VNNI path alike; at M = 128, bound by compute, the layout made no difference (figures:
// benchmarks/README.md). Adjacent weight rows beyond that.
//
// Threads: the work is split over output rows (N) with at::parallel_for, so it runs on exactly the torch
// intra-op threads (torch.get_num_threads(), what vLLM gives the worker). N is cut into chunks of at most
// ceil(N / threads) rows (capped so that a chunk of weights stays in L2 while several activation tiles pass
// over it); at::parallel_for hands each thread one contiguous range of chunks. At 16 threads a [2048 x 2048]
// layer gives each thread 128 rows; at 64 threads 32 rows. Where N alone has fewer chunks than threads (a small
// N with many rows M), the rows M are split too. Which thread computes an output never changes its arithmetic,
// so the result is bitwise the same for any thread count.
//
// ISA: each path is compiled for its own target (GCC target pragmas) and picked at run time (best_isa(), or
// forced by the caller), so one .so runs on AVX2-only and AVX-512 CPUs, with or without VNNI; a plain C++ path
// covers the rest. No -march=native: the build machine need not be the one that runs it.
//
// Inner loops, by ISA path and rows M (per-channel or per-tensor scales; per-group scales always take the first):
//   int16 loop (above)             every path; on the VNNI path below U8_MIN_ROWS rows, or K not a multiple of 64
//   byte planes (AVX512-VNNI)      avx512vnni, from U8_MIN_ROWS to PANEL_MIN_ROWS - 1 rows
//   byte planes in 16-row panels   avx512vnni, from PANEL_MIN_ROWS rows
// Those row bounds are defaults, measured on one CPU: the caller passes its own (panel_rows, u8_rows), and the plan
// (quant/cpu_plan.py) times every loop that applies (loop_for) on the machine and forces the faster one per bucket.
// Decode (weights streamed once, the reads bound it), small batches (multiply-adds per byte start to count) and
// prefill (compute bound) want different loops; each section's header says why and what was measured.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

enum Isa : int { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512BW = 2, ISA_AVX512VNNI = 3 };
const char* const ISA_NAMES[] = {"scalar", "avx2", "avx512bw", "avx512vnni"};
constexpr int ISA_MAX = 3;

constexpr int64_t KB_MAX = 256;  // activation block length bound (int32 lanes; see the overflow note above)
constexpr int64_t XPAD = 32;     // each block of xq is zero-padded to a multiple of this (a full zmm of int16)
constexpr int64_t STREAM_MAX_ROWS = 32;  // rows up to which tiles read NR weight streams (see the header)

enum OutKind : int { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };

struct Problem {
  int64_t M, N, K;
  int64_t KB;    // activation block length (divides the weight group size when per group)
  int64_t nb;    // blocks per row: ceil(K / KB)
  int64_t KBP;   // stride of a block in xq: KB rounded up to XPAD
  int64_t xs;    // stride of a row in xq: nb * KBP
  int64_t G;     // scale columns: 1 = per channel (or per tensor)
  int64_t gs;    // group size K / G
  int64_t s_rs;  // scale row stride (0 for one [1, G] scale shared by every row)
  const int16_t* xq;   // [M][nb][KBP]
  const float* sx;     // [M][nb]
  const int8_t* w;     // [N][K]
  const float* sw;     // [N or 1][G]
  void* out;           // [M][N]
  int out_kind;
};

inline void store_val(void* out, int kind, int64_t i, float v) {
  switch (kind) {
    case OUT_BF16: static_cast<c10::BFloat16*>(out)[i] = c10::BFloat16(v); break;  // round to nearest even
    case OUT_F16: static_cast<c10::Half*>(out)[i] = c10::Half(v); break;
    default: static_cast<float*>(out)[i] = v;
  }
}

inline void store_out(const Problem& p, int64_t m, int64_t n, float v) { store_val(p.out, p.out_kind, m * p.N + n, v); }

// The combined scale of block b for (m, n): per channel only sx (the row scale comes at the end), per group
// sx * the group's weight scale.
inline float block_scale(const Problem& p, int64_t m, int64_t n, int64_t b) {
  const float s = p.sx[m * p.nb + b];
  if (p.G == 1) return s;
  return s * p.sw[n * p.s_rs + (b * p.KB) / p.gs];
}

inline float final_scale(const Problem& p, int64_t n) { return p.G == 1 ? p.sw[n * p.s_rs] : 1.0f; }

// ---- plain C++ -------------------------------------------------------------------------------------------------

void tile_scalar(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      float f = 0.0f;
      for (int64_t b = 0; b < p.nb; ++b) {
        const int64_t k0 = b * p.KB;
        const int64_t len = std::min(p.KB, p.K - k0);
        const int16_t* xb = p.xq + m * p.xs + b * p.KBP;
        const int8_t* wb = p.w + n * p.K + k0;
        int32_t acc = 0;
        for (int64_t k = 0; k < len; ++k) acc += int32_t(xb[k]) * int32_t(wb[k]);
        f += float(acc) * block_scale(p, m, n, b);
      }
      store_out(p, m, n, f * final_scale(p, n));
    }
  }
}

// ---- AVX2 ------------------------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx2,fma")

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Weight rows n0, n0 + rs, ..., n0 + (NR - 1) rs (as tile_512). The body repeats tile_512's line for line on
// purpose: the two differ in every intrinsic's type and width (__m256i/_mm256_* vs __m512i/_mm512_*), and a
// shared template over a vector-traits class would hide the instruction each line compiles to, which is what a
// reader of a kernel checks first.
template <int MR, int NR, bool GROUPED>
void tile_avx2(const Problem& p, int64_t m0, int64_t n0, int64_t rs = 1) {
  const int64_t wstride = rs * p.K;
  __m256 facc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) facc[i][j] = _mm256_setzero_ps();
  const int8_t* wrow = p.w + n0 * p.K;
  const int16_t* xrow = p.xq + m0 * p.xs;
  const float* sxrow = p.sx + m0 * p.nb;
  for (int64_t b = 0; b < p.nb; ++b) {
    const int64_t k0 = b * p.KB;
    const int64_t len = std::min(p.KB, p.K - k0);
    const int16_t* xb = xrow + b * p.KBP;
    const int8_t* wb = wrow + k0;
    __m256i acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 16 <= len; k += 16) {
      __m256i wv[NR];
      for (int j = 0; j < NR; ++j)
        wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + j * wstride + k)));
      for (int i = 0; i < MR; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + i * p.xs + k));
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, wv[j]));
      }
    }
    if (k < len) {  // block tail: the weight bytes through a zeroed buffer; xq is zero-padded already
      __m256i wv[NR];
      for (int j = 0; j < NR; ++j) {
        alignas(16) int8_t buf[16] = {0};
        std::memcpy(buf, wb + j * wstride + k, size_t(len - k));
        wv[j] = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
      }
      for (int i = 0; i < MR; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + i * p.xs + k));
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, wv[j]));
      }
    }
    if constexpr (GROUPED) {
      const int64_t g = k0 / p.gs;
      for (int j = 0; j < NR; ++j) {
        const __m256 swj = _mm256_set1_ps(p.sw[(n0 + j * rs) * p.s_rs + g]);
        for (int i = 0; i < MR; ++i)
          facc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][j]),
                                       _mm256_mul_ps(_mm256_set1_ps(sxrow[i * p.nb + b]), swj), facc[i][j]);
      }
    } else {
      for (int i = 0; i < MR; ++i) {
        const __m256 s = _mm256_set1_ps(sxrow[i * p.nb + b]);
        for (int j = 0; j < NR; ++j) facc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][j]), s, facc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      store_out(p, m0 + i, n0 + j * rs, hsum256(facc[i][j]) * (GROUPED ? 1.0f : p.sw[(n0 + j * rs) * p.s_rs]));
}

template <int MR, bool GROUPED>
void rows_avx2(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NR = MR == 1 ? 4 : 2;
  int64_t n = n0;
  if (p.M <= STREAM_MAX_ROWS) {  // NR streams an NR-th of the range apart (prefetcher; see the header)
    const int64_t q = (n1 - n0) / NR;
    for (; n < n0 + q; ++n) tile_avx2<MR, NR, GROUPED>(p, m0, n, q);
    n = n0 + q * NR;
  }
  for (; n + NR <= n1; n += NR) tile_avx2<MR, NR, GROUPED>(p, m0, n);
  for (; n < n1; ++n) tile_avx2<MR, 1, GROUPED>(p, m0, n);
}

template <bool GROUPED>
void tile_range_avx2(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 3 <= m1; m += 3) rows_avx2<3, GROUPED>(p, m, n0, n1);
  if (m1 - m == 2) rows_avx2<2, GROUPED>(p, m, n0, n1);
  else if (m1 - m == 1) rows_avx2<1, GROUPED>(p, m, n0, n1);
}

#pragma GCC pop_options

// ---- AVX-512 (BW; VNNI when the template says so) --------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")

// vpdpwssd through asm: with the intrinsic GCC copies every accumulator of the tile each iteration (the
// instruction overwrites its first operand) and spills some; "+v" keeps each one in place in its register.
template <bool VNNI>
inline void dot16(__m512i& acc, __m512i x, __m512i w) {
  if constexpr (VNNI) asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  else acc = _mm512_add_epi32(acc, _mm512_madd_epi16(x, w));
}

// Weight rows n0, n0 + rs, ..., n0 + (NR - 1) rs.
template <int MR, int NR, bool VNNI, bool GROUPED>
void tile_512(const Problem& p, int64_t m0, int64_t n0, int64_t rs = 1) {
  const int64_t wstride = rs * p.K;
  __m512 facc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) facc[i][j] = _mm512_setzero_ps();
  const int8_t* wrow = p.w + n0 * p.K;
  const int16_t* xrow = p.xq + m0 * p.xs;
  const float* sxrow = p.sx + m0 * p.nb;
  for (int64_t b = 0; b < p.nb; ++b) {
    const int64_t k0 = b * p.KB;
    const int64_t len = std::min(p.KB, p.K - k0);
    const int16_t* xb = xrow + b * p.KBP;
    const int8_t* wb = wrow + k0;
    __m512i acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 32 <= len; k += 32) {
      __m512i wv[NR];
      for (int j = 0; j < NR; ++j)
        wv[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * wstride + k)));
      for (int i = 0; i < MR; ++i) {
        const __m512i xv = _mm512_loadu_si512(xb + i * p.xs + k);
        for (int j = 0; j < NR; ++j) dot16<VNNI>(acc[i][j], xv, wv[j]);
      }
    }
    if (k < len) {  // block tail: masked weight loads (masked-off bytes are not read); xq is zero-padded
      const __mmask32 mask = __mmask32((uint64_t(1) << (len - k)) - 1);
      __m512i wv[NR];
      for (int j = 0; j < NR; ++j)
        wv[j] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, wb + j * wstride + k));
      for (int i = 0; i < MR; ++i) {
        const __m512i xv = _mm512_loadu_si512(xb + i * p.xs + k);
        for (int j = 0; j < NR; ++j) dot16<VNNI>(acc[i][j], xv, wv[j]);
      }
    }
    if constexpr (GROUPED) {
      const int64_t g = k0 / p.gs;
      for (int j = 0; j < NR; ++j) {
        const __m512 swj = _mm512_set1_ps(p.sw[(n0 + j * rs) * p.s_rs + g]);
        for (int i = 0; i < MR; ++i)
          facc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]),
                                       _mm512_mul_ps(_mm512_set1_ps(sxrow[i * p.nb + b]), swj), facc[i][j]);
      }
    } else {
      for (int i = 0; i < MR; ++i) {
        const __m512 s = _mm512_set1_ps(sxrow[i * p.nb + b]);
        for (int j = 0; j < NR; ++j) facc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]), s, facc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      store_out(p, m0 + i, n0 + j * rs,
                _mm512_reduce_add_ps(facc[i][j]) * (GROUPED ? 1.0f : p.sw[(n0 + j * rs) * p.s_rs]));
}

template <int MR, bool VNNI, bool GROUPED>
void rows_512(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  // 4 x 4 tiles: 16 int32 accumulators stay in registers through the k loop (4 x 3 measured slower)
  constexpr int NR = MR == 1 ? 8 : (MR == 2 ? 6 : 4);
  int64_t n = n0;
  if (p.M <= STREAM_MAX_ROWS) {  // NR streams an NR-th of the range apart (prefetcher; see the header)
    const int64_t q = (n1 - n0) / NR;
    for (; n < n0 + q; ++n) tile_512<MR, NR, VNNI, GROUPED>(p, m0, n, q);
    n = n0 + q * NR;
  }
  for (; n + NR <= n1; n += NR) tile_512<MR, NR, VNNI, GROUPED>(p, m0, n);
  for (; n + 2 <= n1; n += 2) tile_512<MR, 2, VNNI, GROUPED>(p, m0, n);
  if (n < n1) tile_512<MR, 1, VNNI, GROUPED>(p, m0, n);
}

template <bool VNNI, bool GROUPED>
void tile_range_512(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) rows_512<4, VNNI, GROUPED>(p, m, n0, n1);
  if (m1 - m == 3) rows_512<3, VNNI, GROUPED>(p, m, n0, n1);
  else if (m1 - m == 2) rows_512<2, VNNI, GROUPED>(p, m, n0, n1);
  else if (m1 - m == 1) rows_512<1, VNNI, GROUPED>(p, m, n0, n1);
}

#pragma GCC pop_options

// ---- AVX512-VNNI: 16-bit activations as two uint8 planes, for small batches ------------------------------------
//
// vpdpbusd multiplies unsigned bytes by signed bytes, 64 pairs per instruction into int32 lanes. The int8 weight
// goes in as it is (no widening, which is what the int16 loop above spends most of its non-dot instructions on);
// the activations are quantized per row to 16 bits and split into two byte planes:
//   x_q = round(x * 32767 / max|x_row|)  in [-32767, 32767],   x_u = x_q + 32768 = 256 hi + lo   (hi, lo bytes)
//   sum_k x_q w = 256 H + L - 32768 S,   H = sum_k hi w,   L = sum_k lo w,   S = sum_k w
// H and L are exact int32 sums (|H| <= 255 * 128 * K < 2^31 for K <= U8_MAX_K), S is summed per call for the
// chunk's weight rows (one more vpdpbusd per 64 weights; precomputing it at load measured no faster), and the
// combination is exact in int64; y = dot * (max|x_row| / 32767) * scale[n] in double, rounded once to the output.
// Two vpdpbusd per 64 weights and row: the same multiply-add rate as vpdpwssd, with no widening and no per-block
// conversion. Precision: per row, each x is off by at most max|x_row| / 65534. Against the int8 weight's own
// rounding (up to max|w_row| / 254 per weight) that is small even for rows with outliers (docs/int8-kernels.md).
// Per-channel (or per-tensor) scales only, K a multiple of 64: the k loop has no tail, no mask and no branch (with
// any of them GCC stored all 24 accumulators every step, 3x slower). Other shapes take the int16 loop.
//
// Register tile: U8_MR activation rows x U8_NR weight rows x 2 planes = 24 accumulators + 4 weight vectors + 1
// activation vector (3 x 4 measured best; 2 x 4 close; 4 x 3, 4 x 4, 2 x 6 slower). A chunk of weight rows
// (U8_CHUNK_BYTES) stays in L2 while every row tile passes over it, and the tiles prefetch the next chunk (see
// Prefetch: +5-15% at 8-16 rows, where the first pass over a chunk otherwise waited for memory).
// Rows: from U8_MIN_ROWS up to the panel loop's start (panel_rows; below). Below 5 rows the weight reads bound the
// matmul and the int16 loop, with its wider tiles of one and two rows (more weight streams), read them faster.
// Both bounds are defaults at the plan's bucket edges (quant/cpu_plan.py: 1 | 2-4 | 5-16 | 17-64 | 65+): they pick
// each bucket's incumbent, and the plan replaces it where another loop, forced, measures clearly faster here.
// Measured on a 2-core Zen 4 EPYC (docs/int8-kernels.md): against the int16 loop level at 4-6 rows, ahead at 8 and
// 16 rows (by 1.02-1.36x).

constexpr int64_t U8_MIN_ROWS = 5;
constexpr int64_t U8_MAX_K = 65536;
constexpr int U8_MR = 3, U8_NR = 4;
constexpr int64_t U8_CHUNK_BYTES = 384 << 10;  // with the next chunk prefetched, both fit a 1 MiB L2
constexpr int64_t U8_ROW_PAD = 64;  // plane rows K + 64 apart: at K a multiple of 4096 the six plane streams of a
                                    // tile would otherwise share one L1 set (as BF_ROW_PAD below)

struct U8Problem {
  int64_t M, N, K;      // K % 64 == 0
  int64_t rs;           // row stride of the planes: K + U8_ROW_PAD
  const uint8_t* hi;    // [M][rs]
  const uint8_t* lo;    // [M][rs]
  const double* sx;     // [M]: max|x_row| / 32767 (NaN for a row with inf or NaN)
  const int8_t* w;      // [N][K]
  const float* sw;      // [N or 1][1]
  int64_t s_rs;         // scale row stride (0: one scale for every row)
  void* out;            // [M][N]
  int out_kind;
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")

// vpdpbusd through asm on float-typed registers: with __m512i accumulators (intrinsic or asm) GCC copied or spilled
// the tile's 24 accumulators every step; float-typed ones it keeps in place.
inline __m512 busd(__m512 acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

inline __m512i as_i(__m512 v) { return _mm512_castps_si512(v); }

// (sum of a, of b, of c, of d) in int32: pairwise sums of interleaved lanes, then of the four 128-bit lanes
inline __m128i sum4i(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// S = sum_k w[n, k] for the rows [n0, n1), as vpdpbusd(1, w)
void weight_sums_u8(const U8Problem& p, int64_t n0, int64_t n1, int32_t* S) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = p.w + n * p.K;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < p.K; k += 64) acc = busd(acc, ones, _mm512_loadu_si512(wr + k));
    S[n - n0] = _mm512_reduce_add_epi32(as_i(acc));
  }
}

// y[m, n] from H, L, S (see the section's header)
inline void finish_u8(const U8Problem& p, int64_t m, int64_t n, int32_t H, int32_t L, int32_t S) {
  const int64_t dot = 256 * int64_t(H) + int64_t(L) - 32768 * int64_t(S);
  store_val(p.out, p.out_kind, m * p.N + n, float(double(dot) * p.sx[m] * double(p.sw[n * p.s_rs])));
}

// 4 x fp32 -> 4 x bf16 bits in the low halves of the int32 lanes: round to nearest even (as c10::BFloat16), NaN
// to the quiet NaN
inline __m128i bf16_bits4(__m128 f) {
  const __m128i b = _mm_castps_si128(f);
  const __m128i r = _mm_srli_epi32(
      _mm_add_epi32(_mm_add_epi32(b, _mm_set1_epi32(0x7FFF)), _mm_and_si128(_mm_srli_epi32(b, 16), _mm_set1_epi32(1))), 16);
  return _mm_mask_mov_epi32(r, _mm_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm_set1_epi32(0x7FC0));
}

// The outputs of one activation row m and four weight rows n0 + j rs (j < 4) from the tile's accumulators: the
// arithmetic of finish_u8, four outputs at a time in double (exact until the scaling). H and L are reduced apart:
// their lanes could be combined exactly (|256 h + l| <= 65535 * 128 * K / 16 fits int32 up to K = 4096), but not the
// 16 lanes' sum. The scalar version (finish_u8 four times) cost ~10% of the time at K = 2048 (docs/int8-kernels.md).
// The accumulators come by value and the caller's loop is unrolled: with arrays GCC stored all 24 to the stack.
__attribute__((always_inline)) inline void finish4_u8(const U8Problem& p, int64_t m, int64_t n0, int64_t rs,
                                                      __m512 h0, __m512 h1, __m512 h2, __m512 h3, __m512 l0, __m512 l1,
                                                      __m512 l2, __m512 l3, __m256d S32768, __m256d sw) {
  const __m128i H = sum4i(as_i(h0), as_i(h1), as_i(h2), as_i(h3));
  const __m128i L = sum4i(as_i(l0), as_i(l1), as_i(l2), as_i(l3));
  const __m256d hl = _mm256_fmadd_pd(_mm256_cvtepi32_pd(H), _mm256_set1_pd(256.0), _mm256_cvtepi32_pd(L));
  const __m256d y = _mm256_mul_pd(_mm256_mul_pd(_mm256_sub_pd(hl, S32768), _mm256_set1_pd(p.sx[m])), sw);
  const __m128 f = _mm256_cvtpd_ps(y);
  const int64_t o = m * p.N + n0;
  if (p.out_kind == OUT_BF16) {
    const __m128i r = bf16_bits4(f);
    uint16_t* out = static_cast<uint16_t*>(p.out) + o;
    if (rs == 1) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi32(r, r));
    } else {
      out[0] = uint16_t(_mm_extract_epi32(r, 0));
      out[rs] = uint16_t(_mm_extract_epi32(r, 1));
      out[2 * rs] = uint16_t(_mm_extract_epi32(r, 2));
      out[3 * rs] = uint16_t(_mm_extract_epi32(r, 3));
    }
  } else if (p.out_kind == OUT_F32 && rs == 1) {
    _mm_storeu_ps(static_cast<float*>(p.out) + o, f);
  } else {
    alignas(16) float v[4];
    _mm_store_ps(v, f);
    for (int j = 0; j < 4; ++j) store_val(p.out, p.out_kind, o + j * rs, v[j]);
  }
}

// The next chunk's weights, fetched into L2 while this chunk computes: 2 K bytes by each tile (two lines per k step),
// so that from two row tiles on (5 rows) the whole next chunk is in L2 when its first row tile starts. Without it
// that first pass waits for memory at the speed of decode.
struct Prefetch {
  const int8_t* next = nullptr;  // the next chunk's first weight row
  int64_t bytes = 0, done = 0;
};

// Activation rows m0.. (MR), weight rows n0, n0 + rs, ..., n0 + (NR - 1) rs; S: the sums, S[0] that of row n0.
template <int MR, int NR>
void tile_u8(const U8Problem& p, int64_t m0, int64_t n0, int64_t rs, const int32_t* S, Prefetch& pre) {
  __m512 h[MR][NR], l[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) h[i][j] = l[i][j] = _mm512_setzero_ps();
  const int64_t wstride = rs * p.K;
  const int8_t* wr = p.w + n0 * p.K;
  const uint8_t* hr = p.hi + m0 * p.rs;
  const uint8_t* lr = p.lo + m0 * p.rs;
  // nothing left to fetch: the tile's own rows again (in cache; and a prefetch never faults)
  const char* pf = reinterpret_cast<const char*>(pre.done < pre.bytes ? pre.next + pre.done : wr);
  pre.done += 2 * p.K;
  for (int64_t k = 0; k < p.K; k += 64) {
    _mm_prefetch(pf + 2 * k, _MM_HINT_T1);
    _mm_prefetch(pf + 2 * k + 64, _MM_HINT_T1);
    __m512i wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(wr + j * wstride + k);
    for (int i = 0; i < MR; ++i) {
      const __m512i xh = _mm512_loadu_si512(hr + i * p.rs + k);
      for (int j = 0; j < NR; ++j) h[i][j] = busd(h[i][j], xh, wv[j]);
      const __m512i xl = _mm512_loadu_si512(lr + i * p.rs + k);
      for (int j = 0; j < NR; ++j) l[i][j] = busd(l[i][j], xl, wv[j]);
    }
  }
  if constexpr (NR == 4) {
    const __m256d S32768 = _mm256_mul_pd(_mm256_set1_pd(32768.0),
                                         _mm256_cvtepi32_pd(_mm_set_epi32(S[3 * rs], S[2 * rs], S[rs], S[0])));
    const __m256d sw = p.s_rs ? _mm256_set_pd(p.sw[n0 + 3 * rs], p.sw[n0 + 2 * rs], p.sw[n0 + rs], p.sw[n0])
                              : _mm256_set1_pd(p.sw[0]);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
      finish4_u8(p, m0 + i, n0, rs, h[i][0], h[i][1], h[i][2], h[i][3], l[i][0], l[i][1], l[i][2], l[i][3], S32768, sw);
  } else {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        finish_u8(p, m0 + i, n0 + j * rs, _mm512_reduce_add_epi32(as_i(h[i][j])),
                  _mm512_reduce_add_epi32(as_i(l[i][j])), S[j * rs]);
  }
}

template <int MR>
void rows_u8(const U8Problem& p, int64_t m0, int64_t n0, int64_t n1, const int32_t* S, Prefetch& pre) {
  int64_t n = n0;
  if (p.M <= STREAM_MAX_ROWS) {  // NR streams an NR-th of the range apart (prefetcher; as the int16 loop)
    const int64_t q = (n1 - n0) / U8_NR;
    for (; n < n0 + q; ++n) tile_u8<MR, U8_NR>(p, m0, n, q, S + (n - n0), pre);
    n = n0 + q * U8_NR;
  }
  for (; n + U8_NR <= n1; n += U8_NR) tile_u8<MR, U8_NR>(p, m0, n, 1, S + (n - n0), pre);
  switch (n1 - n) {
    case 3: tile_u8<MR, 3>(p, m0, n, 1, S + (n - n0), pre); break;
    case 2: tile_u8<MR, 2>(p, m0, n, 1, S + (n - n0), pre); break;
    case 1: tile_u8<MR, 1>(p, m0, n, 1, S + (n - n0), pre); break;
    default: break;
  }
}

// Rows [m0, m1) x output rows [n0, n1): the weight sums of the chunk, then every row tile over it.
// Rows [m0, m1) x output rows [n0, n1), the chunk's weight sums S given: every row tile over it.
void tiles_u8(const U8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const int32_t* S, Prefetch pre) {
  int64_t m = m0;
  for (; m + U8_MR <= m1; m += U8_MR) rows_u8<U8_MR>(p, m, n0, n1, S, pre);
  if (m1 - m == 2) rows_u8<2>(p, m, n0, n1, S, pre);
  else if (m1 - m == 1) rows_u8<1>(p, m, n0, n1, S, pre);
}

void chunk_u8(const U8Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* S, Prefetch pre) {
  weight_sums_u8(p, n0, n1, S);
  tiles_u8(p, m0, m1, n0, n1, S, pre);
}

// 16 activations as fp32 (bf16 bits widened, or fp32 as they are)
inline __m512 load16_u8(const void* x, bool bf16, int64_t i) {
  if (bf16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i))),
        16));
  return _mm512_loadu_ps(static_cast<const float*>(x) + i);
}

// The planes and row scales of rows [m0, m1) (see the header); a row with inf or NaN gets sx = NaN, so that its
// outputs are NaN (as a float matmul would make them), not garbage.
void split_rows_u8(const U8Problem& p, const void* x, bool bf16, uint8_t* hi, uint8_t* lo, double* sx, int64_t m0,
                   int64_t m1) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t m = m0; m < m1; ++m) {
    __m512 amax = zero, poison = zero;  // poison: NaN where any x is inf or NaN (max skips NaN)
    for (int64_t k = 0; k < p.K; k += 16) {
      const __m512 v = load16_u8(x, bf16, m * p.K + k);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
      poison = _mm512_add_ps(poison, _mm512_mul_ps(v, zero));
    }
    const float a = _mm512_reduce_max_ps(amax);
    if (_mm512_reduce_add_ps(poison) != 0.0f || !std::isfinite(a)) {
      sx[m] = std::numeric_limits<double>::quiet_NaN();
      std::memset(hi + m * p.rs, 0, size_t(p.K));
      std::memset(lo + m * p.rs, 0, size_t(p.K));
      continue;
    }
    sx[m] = double(a) / 32767.0;
    const __m512 inv = _mm512_set1_ps(a > 0.0f ? 32767.0f / a : 0.0f);
    const __m512i lim = _mm512_set1_epi32(32767), off = _mm512_set1_epi32(32768);
    for (int64_t k = 0; k < p.K; k += 16) {
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16_u8(x, bf16, m * p.K + k), inv));  // round half to even
      q = _mm512_add_epi32(_mm512_max_epi32(_mm512_min_epi32(q, lim), _mm512_set1_epi32(-32767)), off);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + m * p.rs + k), _mm512_cvtepi32_epi8(q));  // low bytes
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + m * p.rs + k), _mm512_cvtepi32_epi8(_mm512_srli_epi32(q, 8)));
    }
  }
}

// ---- byte planes in 16-row panels: the compute-bound row counts ------------------------------------------------
//
// The same arithmetic as the loop above (planes, H, L, S, exact in double), with the operands the other way round:
// a vector holds one byte-plane quad of 16 activation rows (the planes packed once per call: 16 x 16 transposes),
// and the weight quad of one output column is broadcast to all 16 lanes straight from the int8 row (vpdpbusd's
// broadcast operand). So the accumulators are whole outputs: no lane sums, and no widening or packing of the
// weight at all, which is what caps a bf16 dot-product loop: int8 -> bf16 costs 5 instructions per 32 weights,
// once per call (docs/int8-kernels.md, "How far the bf16 loop can go"). vpdpbusd retires 64 byte products, two per
// 16-bit activation: the multiply-add rate of vdpbf16ps, the instruction of oneDNN's bf16 matmul on AVX512-BF16.
// Register tile: 16 rows x PANEL_NR weight rows x 2 planes = 16 accumulators; each step loads the two plane
// vectors and broadcasts PANEL_NR weight quads. The tile's outputs are transposed once at the end (rows come out
// as lanes). A chunk of weight rows stays in L2 while the panels pass over it, and its tiles prefetch the next
// chunk (+4-7% at 32-64 rows, where a chunk's first pass otherwise waits for memory).
// Rows: from PANEL_MIN_ROWS. Only whole panels: the rows past the last one (M % 16) take the loop above, which
// gives the same bits (a panel of 1-15 rows would compute its empty lanes: at 17 rows, 2 panels for 17 rows made
// the 17-64 bucket 0.86-0.92x of vLLM's bf16 where it is 1.02-1.20x at 32 and 64 rows).
// Measured on a 2-core Zen 4 EPYC with AVX512-BF16 (docs/int8-kernels.md), int8 / vLLM's bf16 linear on the four
// 1.0B Llama shapes, 1 thread, each loop forced (bench_int8_kernels.py --loops): 1.02-1.21x at 16 rows, 1.04-1.06x
// at 32, 0.99-1.06x at 64, 0.97-0.98x at 256, against 0.92-1.15x, 0.99-1.04x, 0.95-1.04x, 0.91-0.95x for the loop
// above; the bf16 dot-product loop it replaced had 0.82-1.07x, 0.87-1.01x, 0.92-0.99x, 0.94-0.97x (a side-by-side
// timing of the same day).

constexpr int64_t PANEL_MIN_ROWS = 17;
constexpr int PANEL_NR = 8;

// out[j] lane i = in[i] lane j (16 x 16 dwords): pairs within 128-bit lanes, then quads, then the 4 x 4 lane blocks
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m512i q[16];
  for (int g = 0; g < 4; ++g) {
    q[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    q[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    q[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    q[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(q[c], q[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(q[c], q[4 + c], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(q[8 + c], q[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(q[8 + c], q[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// plane rows 16P..16P+15 -> dst[k quad][row] (16 dwords per quad)
void pack_plane_panel(const U8Problem& p, const uint8_t* plane, int64_t P, uint32_t* dst) {
  for (int64_t k = 0; k < p.K; k += 64) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(plane + (P * 16 + i) * p.rs + k);  // whole panels only
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (k / 4 + j) * 16, r[j]);
  }
}

// 4 weights as one int32 in every lane (GCC makes it one broadcast load)
inline __m512i quad(const int8_t* a) {
  int32_t v;
  std::memcpy(&v, a, 4);
  return _mm512_set1_epi32(v);
}

// Panel P (16 activation rows) x the PANEL_NR weight rows at w (K apart; the first `cols` of them are real, the
// rest zero rows of a tail copy), outputs at column n0; S: their sums. pf: lines of the next chunk to prefetch,
// one every pf_every k steps.
void tile_panel(const U8Problem& p, const uint32_t* hp, const uint32_t* lp, int64_t P, const int8_t* w, int64_t n0,
                int64_t cols, const int32_t* S, const char* pf, int64_t pf_every) {
  const int64_t KQ = p.K / 4;
  const uint32_t* hr = hp + P * KQ * 16;
  const uint32_t* lr = lp + P * KQ * 16;
  // named, not arrays: with arrays GCC keeps accumulators on the stack (as in tile_u8)
  __m512 h0 = _mm512_setzero_ps(), h1 = h0, h2 = h0, h3 = h0, h4 = h0, h5 = h0, h6 = h0, h7 = h0;
  __m512 l0 = h0, l1 = h0, l2 = h0, l3 = h0, l4 = h0, l5 = h0, l6 = h0, l7 = h0;
  const int8_t* b0 = w;
  const int8_t* b4 = w + 4 * p.K;
  const int64_t k1 = p.K, k2 = 2 * p.K, k3 = 3 * p.K;
  for (int64_t kq = 0, due = 0; kq < KQ; ++kq, b0 += 4, b4 += 4) {
    if (--due <= 0) {  // a countdown, not kq % pf_every: a division every step
      _mm_prefetch(pf, _MM_HINT_T1);
      pf += 64;
      due = pf_every;
    }
    const __m512i xh = _mm512_loadu_si512(hr + kq * 16), xl = _mm512_loadu_si512(lr + kq * 16);
    const __m512i w0 = quad(b0), w1 = quad(b0 + k1), w2 = quad(b0 + k2), w3 = quad(b0 + k3);
    const __m512i w4 = quad(b4), w5 = quad(b4 + k1), w6 = quad(b4 + k2), w7 = quad(b4 + k3);
    h0 = busd(h0, xh, w0); l0 = busd(l0, xl, w0);
    h1 = busd(h1, xh, w1); l1 = busd(l1, xl, w1);
    h2 = busd(h2, xh, w2); l2 = busd(l2, xl, w2);
    h3 = busd(h3, xh, w3); l3 = busd(l3, xl, w3);
    h4 = busd(h4, xh, w4); l4 = busd(l4, xl, w4);
    h5 = busd(h5, xh, w5); l5 = busd(l5, xl, w5);
    h6 = busd(h6, xh, w6); l6 = busd(l6, xl, w6);
    h7 = busd(h7, xh, w7); l7 = busd(l7, xl, w7);
  }
  // finish_u8's arithmetic, 16 rows at a time: 256 H + L - 32768 S exact in double, times the row's and the
  // column's scale, rounded once
  const __m512 hs[PANEL_NR] = {h0, h1, h2, h3, h4, h5, h6, h7}, ls[PANEL_NR] = {l0, l1, l2, l3, l4, l5, l6, l7};
  const __m512d sx0 = _mm512_loadu_pd(p.sx + P * 16), sx1 = _mm512_loadu_pd(p.sx + P * 16 + 8);  // a whole panel
  __m512i r[16];
  for (int j = 0; j < 16; ++j) r[j] = _mm512_setzero_si512();
  for (int j = 0; j < cols; ++j) {
    const __m512i H = as_i(hs[j]), L = as_i(ls[j]);
    const __m512d off = _mm512_set1_pd(32768.0 * double(S[j]));
    const __m512d sw = _mm512_set1_pd(double(p.sw[(n0 + j) * p.s_rs]));
    const __m512d d0 = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(H)), _mm512_set1_pd(256.0),
                                       _mm512_cvtepi32_pd(_mm512_castsi512_si256(L)));
    const __m512d d1 = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(H, 1)), _mm512_set1_pd(256.0),
                                       _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(L, 1)));
    const __m256 f0 = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(_mm512_sub_pd(d0, off), sx0), sw));
    const __m256 f1 = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(_mm512_sub_pd(d1, off), sx1), sw));
    r[j] = _mm512_castps_si512(_mm512_insertf32x8(_mm512_castps256_ps512(f0), f1, 1));
  }
  transpose16(r);  // r[i] lane j: the output of row 16 P + i, column n0 + j
  const __mmask16 cm = __mmask16((1u << cols) - 1);
  const int64_t rows = std::min<int64_t>(16, p.M - P * 16);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t o = (P * 16 + i) * p.N + n0;
    const __m512 f = _mm512_castsi512_ps(r[i]);
    if (p.out_kind == OUT_BF16) {  // round to nearest even, NaN to the quiet NaN (as bf16_bits4)
      const __m512i b = r[i];
      __m512i v = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)),
                                                     _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))),
                                    16);
      v = _mm512_mask_mov_epi32(v, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.out) + o, cm, _mm512_cvtepi32_epi16(v));
    } else if (p.out_kind == OUT_F32) {
      _mm512_mask_storeu_ps(static_cast<float*>(p.out) + o, cm, f);
    } else {
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.out) + o, cm, _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
    }
  }
}

#pragma GCC pop_options

// ---- activations -----------------------------------------------------------------------------------------------

inline float load_x(const void* x, int kind, int64_t i) {
  if (kind == OUT_BF16) {
    uint32_t bits = uint32_t(static_cast<const uint16_t*>(x)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  return static_cast<const float*>(x)[i];
}

// xq[m][b][:] = round(x[m, block b] / sx[m, b]), zero-padded to KBP; a non-finite block gets sx = NaN, so that
// its outputs are NaN (as a float matmul would make them), not garbage.
void quantize_rows(const Problem& p, const void* x, int x_kind, int16_t* xq, float* sx, int64_t m0, int64_t m1) {
  std::vector<float> buf(size_t(p.KB));
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < p.nb; ++b) {
      const int64_t k0 = b * p.KB;
      const int64_t len = std::min(p.KB, p.K - k0);
      float amax = 0.0f, poison = 0.0f;  // poison: NaN where any x is inf or NaN (max() skips NaN)
      for (int64_t k = 0; k < len; ++k) {
        buf[k] = load_x(x, x_kind, m * p.K + k0 + k);
        amax = std::max(amax, std::fabs(buf[k]));
        poison += buf[k] * 0.0f;
      }
      int16_t* q = xq + m * p.xs + b * p.KBP;
      if (poison != 0.0f || !std::isfinite(amax)) {
        std::fill(q, q + p.KBP, int16_t(0));
        sx[m * p.nb + b] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
      for (int64_t k = 0; k < len; ++k) {
        const int v = _mm_cvtss_si32(_mm_set_ss(buf[k] * inv));  // round half to even
        q[k] = int16_t(std::min(32767, std::max(-32767, v)));
      }
      std::fill(q + len, q + p.KBP, int16_t(0));
      sx[m * p.nb + b] = amax / 32767.0f;
    }
  }
}

// ---- dispatch --------------------------------------------------------------------------------------------------

int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    return __builtin_cpu_supports("avx512vnni") ? ISA_AVX512VNNI : ISA_AVX512BW;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
  return ISA_SCALAR;
}

void run_range(const Problem& p, int isa, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (isa) {
    case ISA_AVX512VNNI:
      if (p.G == 1) tile_range_512<true, false>(p, m0, m1, n0, n1);
      else tile_range_512<true, true>(p, m0, m1, n0, n1);
      break;
    case ISA_AVX512BW:
      if (p.G == 1) tile_range_512<false, false>(p, m0, m1, n0, n1);
      else tile_range_512<false, true>(p, m0, m1, n0, n1);
      break;
    case ISA_AVX2:
      if (p.G == 1) tile_range_avx2<false>(p, m0, m1, n0, n1);
      else tile_range_avx2<true>(p, m0, m1, n0, n1);
      break;
    default: tile_scalar(p, m0, m1, n0, n1);
  }
}

// The activation block: per group, the group size or (above KB_MAX) its largest divisor up to KB_MAX, so that
// no block straddles two groups; per channel, `block` (a tail block covers the rest of K).
int64_t block_len(int64_t K, int64_t G, int64_t block) {
  if (G == 1) return std::max<int64_t>(1, std::min(block, K));
  const int64_t gs = K / G;
  for (int64_t d = std::min(gs, std::min(block, KB_MAX)); d >= 1; --d)
    if (gs % d == 0) return d;
  return 1;
}

// How the int16 and byte-plane loops split a call over the torch threads: work items of nc output rows (weight
// rows) by mc activation rows, item i = (i / m_chunks, i % m_chunks). A chunk is a share of N per thread, at most
// chunk_bytes of int8 weights (L2-resident while the row tiles of M pass over it), a multiple of the tile width nr;
// with one row tile (M <= mr) nothing is reused and a chunk is a plain share per thread, unless the loop reads each
// chunk twice anyway (reread: the byte planes sum the chunk's weight rows first, and that pass should leave the
// chunk in L2 for the tiles; at 16 rows a whole share per thread read the weights twice from memory, 0.83-0.95x of
// vLLM's bf16 against 1.07-1.34x with L2-sized chunks). Where N alone gives fewer
// chunks than threads, the rows M are split as well, in multiples of the row tile mr. Tiny problems run on the
// calling thread (grain = items): a parallel region costs microseconds.
struct Split {
  int64_t nc, mc, m_chunks, items, grain;
};

Split split_work(int64_t M, int64_t N, int64_t K, int64_t chunk_bytes, int64_t mr, int64_t nr, bool reread) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  Split sp{};
  // each thread's share of N in equal chunks of at most the cap: with chunks of the cap itself, N = 2048 at 192
  // rows a chunk made 11 chunks, 6 on one thread and 5 on the other
  const int64_t share = (N + threads - 1) / threads;
  const int64_t cap = M > mr || reread ? std::max(nr, chunk_bytes / K) : share;
  const int64_t pieces = (share + cap - 1) / cap;
  sp.nc = (share + pieces - 1) / pieces;
  sp.nc = std::max(nr, (sp.nc + nr - 1) / nr * nr);
  const int64_t n_chunks = (N + sp.nc - 1) / sp.nc;
  sp.m_chunks = 1;
  if (n_chunks < threads && M > mr) sp.m_chunks = std::min((threads + n_chunks - 1) / n_chunks, (M + mr - 1) / mr);
  sp.mc = ((M + sp.m_chunks - 1) / sp.m_chunks + mr - 1) / mr * mr;
  sp.m_chunks = (M + sp.mc - 1) / sp.mc;
  sp.items = n_chunks * sp.m_chunks;
  sp.grain = M * N * K < (int64_t(1) << 18) ? sp.items : 1;
  return sp;
}

// y = x @ (w * scale)^T through the byte planes (the VNNI path; per-channel or per-tensor scale, K % 64 == 0).
at::Tensor u8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int out_kind) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = at::empty({M, N}, x.options());
  const bool bf16 = x.scalar_type() == at::kBFloat16;  // bf16 and fp32 are read as they are; fp16 through fp32
  at::Tensor xc = bf16 ? x.contiguous() : x.to(at::kFloat).contiguous();
  at::Tensor wc = w.contiguous();
  at::Tensor sc = scale.to(at::kFloat).contiguous();
  U8Problem p{};
  p.M = M; p.N = N; p.K = K; p.rs = K + U8_ROW_PAD;
  auto planes = at::empty({2, M, p.rs}, at::TensorOptions().dtype(at::kByte));
  auto sxt = at::empty({M}, at::TensorOptions().dtype(at::kDouble));
  uint8_t* hi = planes.data_ptr<uint8_t>();
  uint8_t* lo = hi + M * p.rs;
  double* sx = sxt.data_ptr<double>();
  p.hi = hi; p.lo = lo; p.sx = sx;
  p.w = static_cast<const int8_t*>(wc.data_ptr());
  p.sw = static_cast<const float*>(sc.data_ptr());
  p.s_rs = scale.size(0) == 1 ? 0 : 1;
  p.out = out.data_ptr();
  p.out_kind = out_kind;
  const void* xp = xc.data_ptr();
  pybind11::gil_scoped_release no_gil;
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K),
                   [&](int64_t m0, int64_t m1) { split_rows_u8(p, xp, bf16, hi, lo, sx, m0, m1); });
  const Split sp = split_work(M, N, K, U8_CHUNK_BYTES, U8_MR, U8_NR, true);
  const int64_t nc = sp.nc, mc = sp.mc, m_chunks = sp.m_chunks;
  at::parallel_for(0, sp.items, sp.grain, [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> S(static_cast<size_t>(nc));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t ni = i / m_chunks, mi = i % m_chunks;
      Prefetch pre;  // the weights of this thread's next item, where they differ from this one's
      if (i + 1 < i1 && (i + 1) / m_chunks != ni) {
        const int64_t nn = (i + 1) / m_chunks;
        pre.next = p.w + nn * nc * K;
        pre.bytes = (std::min(N, (nn + 1) * nc) - nn * nc) * K;
      }
      chunk_u8(p, mi * mc, std::min(M, (mi + 1) * mc), ni * nc, std::min(N, (ni + 1) * nc), S.data(), pre);
    }
  });
  return out;
}

// y = x @ (w * scale)^T through the byte planes in 16-row panels (the VNNI path; per-channel or per-tensor scale,
// K % 64 == 0).
at::Tensor panel_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int out_kind) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = at::empty({M, N}, x.options());
  const bool bf16 = x.scalar_type() == at::kBFloat16;  // bf16 and fp32 are read as they are; fp16 through fp32
  at::Tensor xc = bf16 ? x.contiguous() : x.to(at::kFloat).contiguous();
  at::Tensor wc = w.contiguous();
  at::Tensor sc = scale.to(at::kFloat).contiguous();
  U8Problem p{};
  p.M = M; p.N = N; p.K = K; p.rs = K + U8_ROW_PAD;
  const int64_t panels = M / 16, KQ = K / 4;  // whole panels; the rows past them take the row tiles
  auto planes = at::empty({2, M, p.rs}, at::TensorOptions().dtype(at::kByte));
  auto sxt = at::empty({M}, at::TensorOptions().dtype(at::kDouble));
  auto packed = at::empty({2, panels * KQ * 16}, at::TensorOptions().dtype(at::kInt));
  uint8_t* hi = planes.data_ptr<uint8_t>();
  uint8_t* lo = hi + M * p.rs;
  double* sx = sxt.data_ptr<double>();
  uint32_t* hp = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  uint32_t* lp = hp + panels * KQ * 16;
  p.hi = hi; p.lo = lo; p.sx = sx;
  p.w = static_cast<const int8_t*>(wc.data_ptr());
  p.sw = static_cast<const float*>(sc.data_ptr());
  p.s_rs = scale.size(0) == 1 ? 0 : 1;
  p.out = out.data_ptr();
  p.out_kind = out_kind;
  const void* xp = xc.data_ptr();
  pybind11::gil_scoped_release no_gil;
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K),
                   [&](int64_t m0, int64_t m1) { split_rows_u8(p, xp, bf16, hi, lo, sx, m0, m1); });
  at::parallel_for(0, panels, 1, [&](int64_t a, int64_t b) {
    for (int64_t P = a; P < b; ++P) {
      pack_plane_panel(p, hi, P, hp + P * KQ * 16);
      pack_plane_panel(p, lo, P, lp + P * KQ * 16);
    }
  });
  const Split sp = split_work(M, N, K, U8_CHUNK_BYTES, 16, PANEL_NR, true);
  at::parallel_for(0, sp.items, sp.grain, [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> S(static_cast<size_t>(sp.nc));
    std::vector<int8_t> tail;  // the last weight rows when N is not a multiple of PANEL_NR, zero-padded
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t ni = i / sp.m_chunks, mi = i % sp.m_chunks;
      const int64_t n0 = ni * sp.nc, n1 = std::min(N, n0 + sp.nc);
      const int64_t m0 = mi * sp.mc, m1 = std::min(M, m0 + sp.mc);
      const int64_t P0 = m0 / 16, P1 = std::min(panels, m1 / 16);  // mc is a multiple of 16
      weight_sums_u8(p, n0, n1, S.data());
      // the next item's weights into L2, spread over this item's tiles (its own where there is none)
      const int64_t nn = i + 1 < i1 ? (i + 1) / sp.m_chunks : ni;
      const char* next = reinterpret_cast<const char*>(p.w + nn * sp.nc * K);
      const int64_t lines = (std::min(N, (nn + 1) * sp.nc) - nn * sp.nc) * K / 64;
      const int64_t tiles = std::max<int64_t>(1, (P1 - P0) * ((n1 - n0 + PANEL_NR - 1) / PANEL_NR));
      const int64_t per_tile = std::max<int64_t>(1, (lines + tiles - 1) / tiles);
      const int64_t every = std::max<int64_t>(1, KQ / per_tile);
      int64_t t = 0;
      for (int64_t n = n0; n < n1; n += PANEL_NR) {
        const int64_t cols = std::min<int64_t>(PANEL_NR, n1 - n);
        const int8_t* wr = p.w + n * K;
        if (cols < PANEL_NR) {
          tail.assign(size_t(PANEL_NR * K), 0);
          std::memcpy(tail.data(), wr, size_t(cols * K));
          wr = tail.data();
        }
        for (int64_t P = P0; P < P1; ++P, ++t)
          tile_panel(p, hp, lp, P, wr, n, cols, S.data() + (n - n0), next + std::min(t * per_tile, lines - 1) * 64,
                     every);
      }
      if (m1 > P1 * 16) tiles_u8(p, P1 * 16, m1, n0, n1, S.data(), Prefetch{});  // P1 >= P0: m0 % 16 == 0
    }
  });
  return out;
}

enum Loop : int { LOOP_INT16 = 0, LOOP_U8 = 1, LOOP_PANEL = 2 };
const char* const LOOP_NAMES[] = {"int16", "u8", "panel"};

// The inner loop a call of M rows runs: the byte planes in panels from panel_rows rows, else the byte planes from
// u8_rows rows, each only where it applies; else the int16 loop (every shape, every path). The one place that says
// which.
int pick_loop(int64_t isa, int64_t M, int64_t K, int64_t G, int64_t panel_rows, int64_t u8_rows) {
  const bool planes = isa == ISA_AVX512VNNI && G == 1 && K >= 64 && K % 64 == 0 && K <= U8_MAX_K;
  if (planes && M >= std::max<int64_t>(1, panel_rows)) return LOOP_PANEL;
  if (planes && M >= std::max<int64_t>(1, u8_rows)) return LOOP_U8;
  return LOOP_INT16;
}

int out_kind_of(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return OUT_BF16;
  if (dtype == at::kHalf) return OUT_F16;
  TORCH_CHECK(dtype == at::kFloat, "int8_mm: activations must be bf16, fp16 or fp32, got ", dtype);
  return OUT_F32;
}

// pick_loop for Python: the plan asks which loops a shape can run (each forced in turn), and which one the
// default bounds pick, without running anything. Every loop takes every activation dtype.
std::string loop_for(int64_t isa, int64_t M, int64_t K, int64_t G, int64_t panel_rows, int64_t u8_rows) {
  TORCH_CHECK(isa >= 0 && isa <= ISA_MAX, "loop_for: isa 0..", ISA_MAX);
  return LOOP_NAMES[pick_loop(isa, M, K, G, panel_rows, u8_rows)];
}

at::Tensor int8_mm(at::Tensor x, at::Tensor w, at::Tensor scale, int64_t isa, int64_t block, int64_t panel_rows,
                   int64_t u8_rows) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && scale.dim() == 2, "int8_mm: x [M, K], w [N, K], scale [N, G]");
  TORCH_CHECK(w.scalar_type() == at::kChar, "int8_mm: the weight must be int8");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(), "int8_mm: CPU tensors");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "int8_mm: x has ", K, " columns, the weight ", w.size(1));
  const int64_t G = scale.size(1);
  TORCH_CHECK((scale.size(0) == N || scale.size(0) == 1) && G >= 1 && K % G == 0,
              "int8_mm: scale shape [", scale.size(0), ", ", G, "] does not fit the weight [", N, ", ", K, "]");
  TORCH_CHECK(block >= 1 && block <= KB_MAX, "int8_mm: block must be in 1..", KB_MAX);
  if (isa < 0) isa = best_isa();
  TORCH_CHECK(isa <= best_isa(), "int8_mm: ISA path ", ISA_NAMES[std::min<int64_t>(isa, ISA_MAX)],
              " is not supported by this CPU (best: ", ISA_NAMES[best_isa()], ")");

  const auto out_dtype = x.scalar_type();
  const int out_kind = out_kind_of(out_dtype);
  const int loop = pick_loop(isa, M, K, G, panel_rows, u8_rows);
  if (loop == LOOP_PANEL && N > 0) return panel_mm(x, w, scale, out_kind);
  if (loop == LOOP_U8 && N > 0) return u8_mm(x, w, scale, out_kind);
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;

  // bf16 and fp32 are read as they are; fp16 through fp32
  at::Tensor xc = out_dtype == at::kBFloat16 ? x.contiguous() : x.to(at::kFloat).contiguous();
  const int x_kind = out_dtype == at::kBFloat16 ? OUT_BF16 : OUT_F32;
  at::Tensor wc = w.contiguous();
  at::Tensor sc = scale.to(at::kFloat).contiguous();

  Problem p{};
  p.M = M; p.N = N; p.K = K; p.G = G; p.gs = K / G;
  p.KB = block_len(K, G, block);
  p.nb = (K + p.KB - 1) / p.KB;
  p.KBP = (p.KB + XPAD - 1) / XPAD * XPAD;
  p.xs = p.nb * p.KBP;
  p.s_rs = scale.size(0) == 1 ? 0 : G;
  auto xq = at::empty({M, p.xs}, at::TensorOptions().dtype(at::kShort));
  auto sx = at::empty({M, p.nb}, at::TensorOptions().dtype(at::kFloat));
  p.xq = static_cast<const int16_t*>(xq.data_ptr());
  p.sx = static_cast<const float*>(sx.data_ptr());
  p.w = static_cast<const int8_t*>(wc.data_ptr());
  p.sw = static_cast<const float*>(sc.data_ptr());
  p.out = out.data_ptr();
  p.out_kind = out_kind;

  const void* xp = xc.data_ptr();
  {
    pybind11::gil_scoped_release no_gil;
    const int64_t q_grain = std::max<int64_t>(1, 16384 / K);
    at::parallel_for(0, M, q_grain, [&](int64_t m0, int64_t m1) {
      quantize_rows(p, xp, x_kind, const_cast<int16_t*>(p.xq), const_cast<float*>(p.sx), m0, m1);
    });

    // ~256 KiB of weights per chunk, register tiles of up to 4 rows x 8 weight rows
    const Split sp = split_work(M, N, K, 256 << 10, 4, 8, false);
    at::parallel_for(0, sp.items, sp.grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t ni = i / sp.m_chunks, mi = i % sp.m_chunks;
        run_range(p, int(isa), mi * sp.mc, std::min(M, (mi + 1) * sp.mc), ni * sp.nc, std::min(N, (ni + 1) * sp.nc));
      }
    });
  }
  return out;
}

std::string isa_name(int64_t isa) {
  TORCH_CHECK(isa >= 0 && isa <= ISA_MAX, "isa_name: 0..", ISA_MAX);
  return ISA_NAMES[isa];
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "normswap CPU int8 weight-only matmul (16-bit activations x int8 weights)";
  m.def("int8_mm", &int8_mm, "y[M, N] = x[M, K] @ (w[N, K] * scale)^T; isa -1 = best this CPU supports",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("scale"), pybind11::arg("isa") = -1,
        pybind11::arg("block") = 256, pybind11::arg("panel_rows") = PANEL_MIN_ROWS,
        pybind11::arg("u8_rows") = U8_MIN_ROWS);
  m.def("loop_for", &loop_for, "the inner loop int8_mm runs for M rows of K inputs with G scale columns",
        pybind11::arg("isa"), pybind11::arg("m"), pybind11::arg("k"), pybind11::arg("groups"),
        pybind11::arg("panel_rows") = PANEL_MIN_ROWS, pybind11::arg("u8_rows") = U8_MIN_ROWS);
  m.def("best_isa", &best_isa, "the best ISA path this CPU runs: 0 scalar, 1 avx2, 2 avx512bw, 3 avx512vnni");
  m.def("isa_name", &isa_name);
  m.attr("PANEL_MIN_ROWS") = PANEL_MIN_ROWS;
  m.attr("U8_MIN_ROWS") = U8_MIN_ROWS;
}
