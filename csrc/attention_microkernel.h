// Register-blocked matrix-multiply tiles and softmax row operations for the CPU attention kernels.
//
// Every product of the attention forward and backward is one shape:
//     C[M x N] (+)= A[M x K] * B[K x N]
// with A read through two strides (so P and P^T are the same buffer) and B made of NR-wide
// column blocks whose rows are contiguous (a K^T panel, or a row-major V / dO / Q / K tile).
// N is always a multiple of NR: the packed operands are zero-padded to it. The one exception is the
// forward of a call with a few query rows a sequence (decoding): row_scores and row_pv take one query
// row at a time against K's and V's rows in place.
//
// fp32 has an AVX2+FMA version (6 x 16 accumulators in 12 ymm registers, one broadcast and two
// loads per 12 FMAs) and an AVX-512 one (12 x 32 in 24 zmm), chosen at run time; the portable version
// serves float64 and CPUs without AVX2.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu_features.h"
#include "half_rows.h"

#if SEQFAST_X86
#include <immintrin.h>
#endif

namespace seqfast::attn {

constexpr int64_t kNR = 16;  // columns per register tile; packed widths are multiples of it
constexpr int64_t kMR = 6;   // rows per register tile

// Memory to bring into L2 while products run (the next key block's rows, which would otherwise arrive on
// demand, one line fill buffer per line): each register tile takes the next slice of up to `rate` lines per step
// of its k loop and requests one or two of them a step, spread through its FMAs. A burst of requests would stall
// on the fill buffers instead. Up to kRanges runs of contiguous memory, taken in order.
struct Prefetch {
  static constexpr int kRanges = 2;
  const char* next[kRanges] = {};  // the run's first line not yet handed out
  const char* end[kRanges] = {};
  int used = 0;
  int64_t rate = 1;  // lines per k step: 1 or 2

  // Adds the lines holding [first, first + bytes) as the next run (at most kRanges).
  void add(const void* first, int64_t bytes) {
    if (used == kRanges || bytes <= 0) return;
    const auto a = reinterpret_cast<uintptr_t>(first);
    next[used] = reinterpret_cast<const char*>(a & ~uintptr_t{63});
    end[used++] = reinterpret_cast<const char*>((a + static_cast<uintptr_t>(bytes) + 63) & ~uintptr_t{63});
  }
  int64_t lines() const {
    int64_t n = 0;
    for (int r = 0; r < used; ++r) n += (end[r] - next[r]) / 64;
    return n;
  }
  // The next slice of at most n lines, within one run: its first line, and its length in *len (0: none left).
  const char* take(int64_t n, int64_t* len) {
    for (int r = 0; r < used; ++r) {
      if (next[r] < end[r]) {
        const char* s = next[r];
        *len = std::min<int64_t>(n, (end[r] - s) / 64);
        next[r] = s + *len * 64;
        return s;
      }
    }
    *len = 0;
    return nullptr;
  }
};

template <typename T>
struct Gemm {
  int64_t M, N, K;
  const T* A;
  int64_t a_rs, a_ks;  // A(i, k) = A[i * a_rs + k * a_ks]
  const T* B;
  int64_t ldb, b_bs;  // B(k, j) = B[(j / kNR) * b_bs + k * ldb + j % kNR]
  T* C;
  int64_t ldc;
  bool accumulate;
  Prefetch* prefetch = nullptr;  // lines to request while the tiles run (x86 fp32 tiles), or none
};

// ---------------------------------------------------------------------------------------------
// Portable tiles (float64 everywhere; fp32 without AVX2).

template <typename T, int R>
inline void tile_portable(const Gemm<T>& g, int64_t i0, int64_t j0) {
  T acc[R][kNR] = {};
  const T* a = g.A + i0 * g.a_rs;
  const T* b = g.B + (j0 / kNR) * g.b_bs;
  for (int64_t k = 0; k < g.K; ++k) {
    const T* bk = b + k * g.ldb;
    for (int r = 0; r < R; ++r) {
      const T ar = a[r * g.a_rs + k * g.a_ks];
      for (int64_t j = 0; j < kNR; ++j) acc[r][j] += ar * bk[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    T* c = g.C + (i0 + r) * g.ldc + j0;
    for (int64_t j = 0; j < kNR; ++j) c[j] = g.accumulate ? c[j] + acc[r][j] : acc[r][j];
  }
}

template <typename T>
inline void gemm_portable(const Gemm<T>& g) {
  for (int64_t j0 = 0; j0 < g.N; j0 += kNR) {
    int64_t i0 = 0;
    for (; i0 + kMR <= g.M; i0 += kMR) tile_portable<T, kMR>(g, i0, j0);
    switch (g.M - i0) {
      case 5: tile_portable<T, 5>(g, i0, j0); break;
      case 4: tile_portable<T, 4>(g, i0, j0); break;
      case 3: tile_portable<T, 3>(g, i0, j0); break;
      case 2: tile_portable<T, 2>(g, i0, j0); break;
      case 1: tile_portable<T, 1>(g, i0, j0); break;
      default: break;
    }
  }
}

// The online softmax's row max m skips NaN scores (x86 max returns its second operand when either is
// NaN, std::max its first), which is harmless: exp2 of a NaN score stays NaN, so the row's sum and
// output turn NaN as torch's do. When no visible score is above -inf (all masked, or masked and NaN)
// the scores are exponentiated against 0 instead of m = -inf: exact zeros for the masked ones (not
// the NaN of -inf - (-inf)), NaN kept for the NaN ones. One compare per row and key tile.
template <typename T>
inline T exp2_offset(T m) {
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA fp32 tiles.

#if SEQFAST_X86
// kRowMajorA: a_ks == 1 (A rows contiguous, e.g. Q or P); else A is read down columns (P^T, dS^T).
// The accumulators are named variables, not an array: GCC keeps an array of __m256 in memory and
// stores it every iteration.
// kRS > 0: A's row stride is that constant (kRowMajorA only; see gemm_avx512).
template <int R, bool kRowMajorA, int kRS = 0>
SEQFAST_TARGET_AVX2 inline void tile_avx2(const Gemm<float>& g, int64_t i0, int64_t j0) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float* a = g.A + i0 * g.a_rs;
  const float* b = g.B + (j0 / kNR) * g.b_bs;
  const int64_t K = g.K, ldb = g.ldb, a_rs = g.a_rs, a_ks = g.a_ks;
  // Row r of A at step k.
  const int64_t rs = kRowMajorA ? (kRS > 0 ? kRS : a_rs) : 1;
  const float* a0 = a;
  const float* a1 = a + rs;
  const float* a2 = a + 2 * rs;
  const float* a3 = a + 3 * rs;
  const float* a4 = a + 4 * rs;
  const float* a5 = a + 5 * rs;
  const int64_t ks = kRowMajorA ? 1 : a_ks;
  int64_t npf = 0;
  const char* pf = g.prefetch ? g.prefetch->take(g.prefetch->rate * K, &npf) : nullptr;
#define SEQFAST_FMA_ROW(r)                               \
  if constexpr (R > r) {                                 \
    const __m256 ar = _mm256_broadcast_ss(a##r + k * ks); \
    c##r##0 = _mm256_fmadd_ps(ar, b0, c##r##0);          \
    c##r##1 = _mm256_fmadd_ps(ar, b1, c##r##1);          \
  }
  for (int64_t k = 0; k < K; ++k) {
    if (k < npf) prefetch_line_l2(pf + k * 64);
    if (k + K < npf) prefetch_line_l2(pf + (k + K) * 64);
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = _mm256_loadu_ps(b + 8);
    b += ldb;
    SEQFAST_FMA_ROW(0)
    SEQFAST_FMA_ROW(1)
    SEQFAST_FMA_ROW(2)
    SEQFAST_FMA_ROW(3)
    SEQFAST_FMA_ROW(4)
    SEQFAST_FMA_ROW(5)
  }
#undef SEQFAST_FMA_ROW
  const bool acc = g.accumulate;
  float* c = g.C + i0 * g.ldc + j0;
  const int64_t ldc = g.ldc;
#define SEQFAST_STORE_ROW(r)                                                          \
  if constexpr (R > r) {                                                              \
    float* cr = c + r * ldc;                                                          \
    if (acc) {                                                                        \
      c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(cr));                          \
      c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(cr + 8));                      \
    }                                                                                 \
    _mm256_storeu_ps(cr, c##r##0);                                                    \
    _mm256_storeu_ps(cr + 8, c##r##1);                                                \
  }
  SEQFAST_STORE_ROW(0)
  SEQFAST_STORE_ROW(1)
  SEQFAST_STORE_ROW(2)
  SEQFAST_STORE_ROW(3)
  SEQFAST_STORE_ROW(4)
  SEQFAST_STORE_ROW(5)
#undef SEQFAST_STORE_ROW
}

template <bool kRowMajorA, int kRS = 0>
SEQFAST_TARGET_AVX2 inline void gemm_avx2_impl(const Gemm<float>& g) {
  for (int64_t j0 = 0; j0 < g.N; j0 += kNR) {
    int64_t i0 = 0;
    for (; i0 + kMR <= g.M; i0 += kMR) tile_avx2<kMR, kRowMajorA, kRS>(g, i0, j0);
    switch (g.M - i0) {
      case 5: tile_avx2<5, kRowMajorA, kRS>(g, i0, j0); break;
      case 4: tile_avx2<4, kRowMajorA, kRS>(g, i0, j0); break;
      case 3: tile_avx2<3, kRowMajorA, kRS>(g, i0, j0); break;
      case 2: tile_avx2<2, kRowMajorA, kRS>(g, i0, j0); break;
      case 1: tile_avx2<1, kRowMajorA, kRS>(g, i0, j0); break;
      default: break;
    }
  }
}

// The row strides gemm_avx512 takes as constants (why: there). Six row pointers fit here, but each step then
// spends two LEAs and three pointer adds beside its 12 FMAs (2-7 % of the forward on an Intel core).
SEQFAST_TARGET_AVX2 inline void gemm_avx2(const Gemm<float>& g) {
  if (g.a_ks != 1) return gemm_avx2_impl<false>(g);
  switch (g.a_rs) {
    case 64: return gemm_avx2_impl<true, 64>(g);
    case 128: return gemm_avx2_impl<true, 128>(g);
    case 256: return gemm_avx2_impl<true, 256>(g);
    case 512: return gemm_avx2_impl<true, 512>(g);
    case 1024: return gemm_avx2_impl<true, 1024>(g);
    default: return gemm_avx2_impl<true>(g);
  }
}

// 2^x for x <= 128, 0 for x <= -127 (including -inf), NaN for NaN. Rounding by the 1.5 * 2^23 trick:
// t = x + (1.5 * 2^23 + 127) holds round(x) + 127 in its low mantissa bits, which shifted left by
// 23 are the exponent field of 2^round(x); then a degree-5 minimax polynomial of 2^f on
// [-1/2, 1/2] (relative error 2.4e-7 evaluated in fp32).
SEQFAST_TARGET_AVX2 inline __m256 exp2_avx2(__m256 x) {
  const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f);
  x = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);  // vmaxps returns its second operand when either is NaN
  const __m256 t = _mm256_add_ps(x, magic);
  const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(t, magic));
  __m256 p = _mm256_set1_ps(1.327641773968935e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.675540961325169e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550713464617729e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022120237350464e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931469440460205e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0000001192092896f));
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

SEQFAST_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Lanes c + 0..7 that are < nv keep x, the others become -inf.
SEQFAST_TARGET_AVX2 inline __m256 visible_avx2(__m256 x, int64_t c, int64_t nv) {
  if (c + 8 <= nv) return x;
  const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                       _mm256_set1_epi32(static_cast<int>(c)));
  const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nv)), idx));
  return _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()), x, keep);
}

// Lane-wise max of the first nv entries of s ^ sign (sign: -0.0f to negate), -inf in lanes that saw none.
SEQFAST_TARGET_AVX2 inline __m256 lane_max_avx2(const float* s, int64_t nv, __m256 sign) {
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + 8 <= nv; c += 8) vmax = _mm256_max_ps(vmax, _mm256_xor_ps(_mm256_loadu_ps(s + c), sign));
  if (c < nv) vmax = _mm256_max_ps(vmax, visible_avx2(_mm256_xor_ps(_mm256_loadu_ps(s + c), sign), c, nv));
  return vmax;
}

// exp2_avx2 on N vectors at once, each step applied to all of them: the polynomial is a ~40-cycle
// dependency chain, and interleaving independent chains in the instruction stream lets them overlap
// even when the out-of-order window of the floating-point scheduler is small.
template <int N>
SEQFAST_TARGET_AVX2 inline void exp2_many_avx2(__m256* x) {
  const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f), lo = _mm256_set1_ps(-127.0f);
  __m256 t[N], f[N], p[N];
  for (int i = 0; i < N; ++i) x[i] = _mm256_max_ps(lo, x[i]);  // x NaN -> NaN (see exp2_avx2)
  for (int i = 0; i < N; ++i) t[i] = _mm256_add_ps(x[i], magic);
  for (int i = 0; i < N; ++i) f[i] = _mm256_sub_ps(x[i], _mm256_sub_ps(t[i], magic));
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(_mm256_set1_ps(1.327641773968935e-3f), f[i],
                                                     _mm256_set1_ps(9.675540961325169e-3f));
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], f[i], _mm256_set1_ps(5.550713464617729e-2f));
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], f[i], _mm256_set1_ps(2.4022120237350464e-1f));
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], f[i], _mm256_set1_ps(6.931469440460205e-1f));
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], f[i], _mm256_set1_ps(1.0000001192092896f));
  for (int i = 0; i < N; ++i) {
    x[i] = _mm256_mul_ps(p[i], _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t[i]), 23)));
  }
}

// a * b rounded to float. The empty asm hides the product from the compiler, which would otherwise contract it
// with a following subtraction into one FMA (GCC's default -ffp-contract=fast applies to intrinsics too).
SEQFAST_TARGET_AVX2 inline __m256 mul_rounded_avx2(__m256 a, __m256 b) {
  __m256 p = _mm256_mul_ps(a, b);
  asm("" : "+x"(p));
  return p;
}

// x * f - m, with x * f rounded first when kRounded.
template <bool kRounded>
SEQFAST_TARGET_AVX2 inline __m256 exponent_avx2(const float* p, __m256 vf, __m256 vm) {
  const __m256 x = _mm256_loadu_ps(p);
  return kRounded ? _mm256_sub_ps(mul_rounded_avx2(x, vf), vm) : _mm256_fmsub_ps(x, vf, vm);
}

// Offsets m up to this size take exp2(s * f - m) as one FMA: the row max m = max(s) * f was rounded, so the
// max's own exponent is the product's rounding error, below 1/4 here. Beyond it that error grows with |m|
// and passes exp2's range near |m| = 2^32 (scale ~1e10): such rows round s * f first, as the max was, as torch
// rounds its scaled scores. One compare per row and key tile.
constexpr float kFusedOffsetLimit = 4194304.0f;  // 2^22

// p = exp2(s * f - m) for the first nv entries, 0 up to ncols; returns the sum of p lane-wise (hsum_avx2 adds it up).
template <bool kRounded>
SEQFAST_TARGET_AVX2 inline __m256 exp2_row_lanes_avx2(float* s, int64_t nv, int64_t ncols, float f, float m) {
  const __m256 vf = _mm256_set1_ps(f), vm = _mm256_set1_ps(m);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= nv; c += 32) {
    __m256 x[4];
    for (int i = 0; i < 4; ++i) x[i] = exponent_avx2<kRounded>(s + c + 8 * i, vf, vm);
    exp2_many_avx2<4>(x);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(s + c + 8 * i, x[i]);
    sum0 = _mm256_add_ps(sum0, _mm256_add_ps(x[0], x[1]));
    sum1 = _mm256_add_ps(sum1, _mm256_add_ps(x[2], x[3]));
  }
  for (; c < nv; c += 8) {
    __m256 x = visible_avx2(exponent_avx2<kRounded>(s + c, vf, vm), c, nv);
    exp2_many_avx2<1>(&x);
    _mm256_storeu_ps(s + c, x);
    sum0 = _mm256_add_ps(sum0, x);
  }
  for (; c < ncols; c += 8) _mm256_storeu_ps(s + c, _mm256_setzero_ps());
  return _mm256_add_ps(sum0, sum1);
}

SEQFAST_TARGET_AVX2 inline __m256 exp2_row_lanes_avx2(float* s, int64_t nv, int64_t ncols, float f, float m) {
  return std::fabs(m) < kFusedOffsetLimit ? exp2_row_lanes_avx2<false>(s, nv, ncols, f, m)
                                          : exp2_row_lanes_avx2<true>(s, nv, ncols, f, m);
}

template <bool kMax>
SEQFAST_TARGET_AVX2 inline __m256 fold_op_avx2(__m256 a, __m256 b) {
  return kMax ? _mm256_max_ps(a, b) : _mm256_add_ps(a, b);
}

// Lane r of the result is v[r] reduced over its 8 lanes (max or sum), pairing the lanes as hsum_avx2 does, the
// lower lane the first operand (max returns its second operand on a NaN or a tie): i and i + 4, then i and i + 2,
// then 0 and 1. The same bits as 8 separate reductions of that shape, in 14 operations instead of 8 dependent
// chains.
template <bool kMax>
SEQFAST_TARGET_AVX2 inline __m256 fold8_avx2(const __m256* v) {
  const auto op = fold_op_avx2<kMax>;
  __m256 w[4], x[2];
  for (int k = 0; k < 4; ++k) {  // 128-bit block 0 of w[k]: row 2k's 4 partial lanes, block 1: row 2k + 1's
    const __m256 a = v[2 * k], b = v[2 * k + 1];
    w[k] = op(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  for (int j = 0; j < 2; ++j) {  // block k of x[j]: rows 4j + k and 4j + 2 + k, two partial lanes each
    const __m256 c = w[2 * j], d = w[2 * j + 1];
    x[j] = op(_mm256_shuffle_ps(c, d, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // Lane 4k + t: row 2t + k; put row r in lane r.
  const __m256 z = op(_mm256_shuffle_ps(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm256_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm256_permutevar8x32_ps(z, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// online_softmax_rows_avx512 on AVX2, 8 rows at a time.
SEQFAST_TARGET_AVX2 inline void online_softmax_rows_avx2(float* s, int64_t ld, int64_t n, const int64_t* nv,
                                                         int64_t ncols, float f, float* m, float* l, float* alpha) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const __m256 ninf = _mm256_set1_ps(-kInf);
  const bool neg = f < 0.0f;
  for (int64_t r0 = 0; r0 < n; r0 += 8) {
    const int64_t k = std::min<int64_t>(8, n - r0);
    alignas(32) float mo[8], lo[8], off[8], al[8];
    for (int64_t r = 0; r < 8; ++r) {
      mo[r] = r < k ? m[r0 + r] : -kInf;
      lo[r] = r < k ? l[r0 + r] : 0.0f;
    }
    __m256 v[8];
    for (int64_t r = 0; r < 8; ++r) {
      const int64_t row = r0 + r;
      v[r] = r < k && nv[row] > 0 ? lane_max_avx2(s + row * ld, nv[row], _mm256_set1_ps(neg ? -0.0f : 0.0f)) : ninf;
    }
    const __m256 mx = fold8_avx2<true>(v);
    // The max of s * f is mx * |f| (for f < 0, mx is the max of -s); -inf stays -inf (not NaN for f = 0).
    const __m256 scaled = _mm256_blendv_ps(_mm256_mul_ps(mx, _mm256_set1_ps(neg ? -f : f)), ninf,
                                           _mm256_cmp_ps(mx, ninf, _CMP_EQ_OQ));
    const __m256 m_old = _mm256_load_ps(mo);
    const __m256 m_new = _mm256_max_ps(scaled, m_old);  // std::max(m_old, scaled): m_old on a tie or a NaN
    const __m256 a = _mm256_blendv_ps(exp2_avx2(_mm256_sub_ps(m_old, m_new)), _mm256_set1_ps(1.0f),
                                      _mm256_cmp_ps(m_old, m_new, _CMP_EQ_OQ));
    _mm256_store_ps(off, _mm256_blendv_ps(m_new, _mm256_setzero_ps(), _mm256_cmp_ps(m_new, ninf, _CMP_EQ_OQ)));
    for (int64_t r = 0; r < 8; ++r) {
      const int64_t row = r0 + r;
      v[r] = r < k ? exp2_row_lanes_avx2(s + row * ld, nv[row], ncols, f, off[r]) : _mm256_setzero_ps();
    }
    const __m256 sum = fold8_avx2<false>(v);
    _mm256_store_ps(lo, _mm256_fmadd_ps(_mm256_load_ps(lo), a, sum));
    _mm256_store_ps(mo, m_new);
    _mm256_store_ps(al, a);
    for (int64_t r = 0; r < k; ++r) {
      m[r0 + r] = mo[r];
      l[r0 + r] = lo[r];
      alpha[r0 + r] = al[r];
    }
  }
}

// As probs_row_avx512 (the sum is not wanted; vzeroupper leaves the SSE caller clean).
SEQFAST_TARGET_AVX2 inline void probs_row_avx2(float* s, int64_t nv, int64_t ncols, float f, float lse2) {
  exp2_row_lanes_avx2(s, nv, ncols, f, lse2);
  _mm256_zeroupper();
}

SEQFAST_TARGET_AVX2 inline void dscores_row_avx2(const float* p, float* dp, const float* z, int64_t ncols,
                                                 float delta) {
  const __m256 vd = _mm256_set1_ps(delta);
  for (int64_t c = 0; c < ncols; c += 8) {
    __m256 d = _mm256_loadu_ps(dp + c);
    d = z ? _mm256_fmsub_ps(d, _mm256_loadu_ps(z + c), vd) : _mm256_sub_ps(d, vd);
    _mm256_storeu_ps(dp + c, _mm256_mul_ps(_mm256_loadu_ps(p + c), d));
  }
}

// dot_row_avx512 in 8 lanes, the tail row by row (the same sum to rounding, not the same bits).
SEQFAST_TARGET_AVX2 inline float dot_row_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c + 8), _mm256_loadu_ps(b + c + 8), s1);
  }
  for (; c + 8 <= n; c += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), s0);
  float tail = 0.0f;
  for (; c < n; ++c) tail = std::fma(a[c], b[c], tail);
  return hsum_avx2(_mm256_add_ps(s0, s1)) + tail;
}

SEQFAST_TARGET_AVX2 inline void scale_row_avx2(float* o, int64_t n, float alpha) {
  const __m256 va = _mm256_set1_ps(alpha);
  for (int64_t c = 0; c < n; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), va));
}

// Lane j of the result is the sum of the 8 lanes of a[j].
SEQFAST_TARGET_AVX2 inline __m256 sum_lanes8_avx2(const __m256* a) {
  __m256 t[4], u[2];
  for (int p = 0; p < 4; ++p) {
    t[p] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * p], a[2 * p + 1]), _mm256_unpackhi_ps(a[2 * p], a[2 * p + 1]));
  }
  for (int p = 0; p < 2; ++p) {
    const __m256d x = _mm256_castps_pd(t[2 * p]), y = _mm256_castps_pd(t[2 * p + 1]);
    u[p] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}

// As row_scores_avx512 (zeros up to the next multiple of 16 too), 8 keys a block.
SEQFAST_TARGET_AVX2 inline void row_scores_avx2(const float* q, const float* K, int64_t ks, int64_t n, int64_t Dp,
                                                float* s) {
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t nb = std::min<int64_t>(8, n - j0);
    __m256 acc[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m256 a = _mm256_setzero_ps();
      if (j < nb) {
        const float* kr = K + (j0 + j) * ks;
        for (int64_t d = 0; d < Dp; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(kr + d), _mm256_loadu_ps(q + d), a);
      }
      acc[j] = a;
    }
    _mm256_storeu_ps(s + j0, sum_lanes8_avx2(acc));
  }
  if (n % 16 > 0 && n % 16 <= 8) _mm256_storeu_ps(s + n / 16 * 16 + 8, _mm256_setzero_ps());  // up to 16 | n
}

// As row_pv_chunk_avx512, 8 columns a register.
template <int NV>
SEQFAST_TARGET_AVX2 inline void row_pv_chunk_avx2(const float* p, int64_t n, const float* V, int64_t vs, float* o) {
  __m256 acc[NV];
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; ++k, V += vs) {
    const __m256 pk = _mm256_set1_ps(p[k]);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) acc[i] = _mm256_fmadd_ps(pk, _mm256_loadu_ps(V + 8 * i), acc[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(o + 8 * i, _mm256_add_ps(acc[i], _mm256_loadu_ps(o + 8 * i)));
}

// As row_pv_avx512, in chunks of 64 columns (Dvp a multiple of 16).
SEQFAST_TARGET_AVX2 inline void row_pv_avx2(const float* p, int64_t n, const float* V, int64_t vs, int64_t Dvp,
                                            float* o) {
  int64_t c = 0;
  for (; c + 64 <= Dvp; c += 64) row_pv_chunk_avx2<8>(p, n, V + c, vs, o + c);
  switch ((Dvp - c) / 16) {
    case 3: return row_pv_chunk_avx2<6>(p, n, V + c, vs, o + c);
    case 2: return row_pv_chunk_avx2<4>(p, n, V + c, vs, o + c);
    case 1: return row_pv_chunk_avx2<2>(p, n, V + c, vs, o + c);
    default: return;
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 fp32 tiles: kMR512 rows x 32 columns (two zmm per row, 24 accumulators of the 32 zmm
// registers), or x 16 for an odd last column block. The 32 columns are two adjacent kNR-wide
// column blocks of B, so the packing is the same as for AVX2.

constexpr int64_t kMR512 = 12;  // rows per AVX-512 register tile

// GCC 12 warns about the deliberately undefined vectors inside its own AVX-512 intrinsics
// (_mm512_undefined_*) once they are inlined into target("avx512f") functions.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// W zmm columns (1 or 2); R <= kMR512 rows. kRS > 0: A's row stride is that constant (kRowMajorA only).
template <int R, int W, bool kRowMajorA, int kRS = 0>
SEQFAST_TARGET_AVX512 inline void tile_avx512(const Gemm<float>& g, int64_t i0, int64_t j0) {
  static_assert(R >= 1 && R <= kMR512 && (W == 1 || W == 2));
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  __m512 c60 = c00, c61 = c00, c70 = c00, c71 = c00, c80 = c00, c81 = c00;
  __m512 c90 = c00, c91 = c00, cA0 = c00, cA1 = c00, cB0 = c00, cB1 = c00;
  const float* a = g.A + i0 * g.a_rs;
  const float* b0p = g.B + (j0 / kNR) * g.b_bs;
  const float* b1p = b0p + g.b_bs;
  const int64_t K = g.K, ldb = g.ldb;
  const int64_t rs = kRowMajorA ? (kRS > 0 ? kRS : g.a_rs) : 1;
  const int64_t ks = kRowMajorA ? 1 : g.a_ks;
  int64_t npf = 0;
  const char* pf = g.prefetch ? g.prefetch->take(g.prefetch->rate * K, &npf) : nullptr;
#define SEQFAST_FMA512_ROW(r, idx)                                          \
  if constexpr (R > idx) {                                                  \
    const __m512 ar = _mm512_set1_ps(a[idx * rs + k * ks]);                \
    c##r##0 = _mm512_fmadd_ps(ar, b0, c##r##0);                             \
    if constexpr (W == 2) c##r##1 = _mm512_fmadd_ps(ar, b1, c##r##1);       \
  }
  for (int64_t k = 0; k < K; ++k) {
    if (k < npf) prefetch_line_l2(pf + k * 64);
    if (k + K < npf) prefetch_line_l2(pf + (k + K) * 64);
    const __m512 b0 = _mm512_loadu_ps(b0p + k * ldb);
    const __m512 b1 = W == 2 ? _mm512_loadu_ps(b1p + k * ldb) : b0;
    SEQFAST_FMA512_ROW(0, 0)
    SEQFAST_FMA512_ROW(1, 1)
    SEQFAST_FMA512_ROW(2, 2)
    SEQFAST_FMA512_ROW(3, 3)
    SEQFAST_FMA512_ROW(4, 4)
    SEQFAST_FMA512_ROW(5, 5)
    SEQFAST_FMA512_ROW(6, 6)
    SEQFAST_FMA512_ROW(7, 7)
    SEQFAST_FMA512_ROW(8, 8)
    SEQFAST_FMA512_ROW(9, 9)
    SEQFAST_FMA512_ROW(A, 10)
    SEQFAST_FMA512_ROW(B, 11)
  }
#undef SEQFAST_FMA512_ROW
  const bool acc = g.accumulate;
  float* c = g.C + i0 * g.ldc + j0;
  const int64_t ldc = g.ldc;
#define SEQFAST_STORE512_ROW(r, idx)                                                 \
  if constexpr (R > idx) {                                                           \
    float* cr = c + idx * ldc;                                                       \
    if (acc) c##r##0 = _mm512_add_ps(c##r##0, _mm512_loadu_ps(cr));                  \
    _mm512_storeu_ps(cr, c##r##0);                                                   \
    if constexpr (W == 2) {                                                          \
      if (acc) c##r##1 = _mm512_add_ps(c##r##1, _mm512_loadu_ps(cr + 16));           \
      _mm512_storeu_ps(cr + 16, c##r##1);                                            \
    }                                                                                \
  }
  SEQFAST_STORE512_ROW(0, 0)
  SEQFAST_STORE512_ROW(1, 1)
  SEQFAST_STORE512_ROW(2, 2)
  SEQFAST_STORE512_ROW(3, 3)
  SEQFAST_STORE512_ROW(4, 4)
  SEQFAST_STORE512_ROW(5, 5)
  SEQFAST_STORE512_ROW(6, 6)
  SEQFAST_STORE512_ROW(7, 7)
  SEQFAST_STORE512_ROW(8, 8)
  SEQFAST_STORE512_ROW(9, 9)
  SEQFAST_STORE512_ROW(A, 10)
  SEQFAST_STORE512_ROW(B, 11)
#undef SEQFAST_STORE512_ROW
}

template <int W, bool kRowMajorA, int kRS>
SEQFAST_TARGET_AVX512 inline void column_block_avx512(const Gemm<float>& g, int64_t j0) {
  int64_t i0 = 0;
  for (; i0 + kMR512 <= g.M; i0 += kMR512) tile_avx512<kMR512, W, kRowMajorA, kRS>(g, i0, j0);
  switch (g.M - i0) {
    case 11: tile_avx512<11, W, kRowMajorA, kRS>(g, i0, j0); break;
    case 10: tile_avx512<10, W, kRowMajorA, kRS>(g, i0, j0); break;
    case 9: tile_avx512<9, W, kRowMajorA, kRS>(g, i0, j0); break;
    case 8: tile_avx512<8, W, kRowMajorA, kRS>(g, i0, j0); break;
    case 7: tile_avx512<7, W, kRowMajorA, kRS>(g, i0, j0); break;
    case 6: tile_avx512<6, W, kRowMajorA, kRS>(g, i0, j0); break;
    case 5: tile_avx512<5, W, kRowMajorA, kRS>(g, i0, j0); break;
    case 4: tile_avx512<4, W, kRowMajorA, kRS>(g, i0, j0); break;
    case 3: tile_avx512<3, W, kRowMajorA, kRS>(g, i0, j0); break;
    case 2: tile_avx512<2, W, kRowMajorA, kRS>(g, i0, j0); break;
    case 1: tile_avx512<1, W, kRowMajorA, kRS>(g, i0, j0); break;
    default: break;
  }
}

template <bool kRowMajorA, int kRS = 0>
SEQFAST_TARGET_AVX512 inline void gemm_avx512_impl(const Gemm<float>& g) {
  int64_t j0 = 0;
  for (; j0 + 2 * kNR <= g.N; j0 += 2 * kNR) column_block_avx512<2, kRowMajorA, kRS>(g, j0);
  if (j0 < g.N) column_block_avx512<1, kRowMajorA, kRS>(g, j0);
}

// Row-major A at one of these strides (Q, K, V, dO rows of a contiguous (B, H, L, D) tensor with D 64-256, or of
// a (B, L, H, D) one with H * D 512 or 1024; the score tiles, 512 and 128 wide) takes a tile with the stride as a
// constant: the 12 broadcasts then address A as one pointer plus displacements. With a run-time stride GCC keeps
// 12 row pointers, which do not fit in the registers left beside the accumulators, and reloads some from the stack
// every step (benchmarks/NOTES.md: 2-4 % of the forward, the same bits).
SEQFAST_TARGET_AVX512 inline void gemm_avx512(const Gemm<float>& g) {
  if (g.a_ks != 1) return gemm_avx512_impl<false>(g);
  switch (g.a_rs) {
    case 64: return gemm_avx512_impl<true, 64>(g);
    case 128: return gemm_avx512_impl<true, 128>(g);
    case 256: return gemm_avx512_impl<true, 256>(g);
    case 512: return gemm_avx512_impl<true, 512>(g);
    case 1024: return gemm_avx512_impl<true, 1024>(g);
    default: return gemm_avx512_impl<true>(g);
  }
}

// Same contract and polynomial as exp2_avx2, 16 lanes.
template <int N>
SEQFAST_TARGET_AVX512 inline void exp2_many_avx512(__m512* x) {
  const __m512 magic = _mm512_set1_ps(12582912.0f + 127.0f), lo = _mm512_set1_ps(-127.0f);
  __m512 t[N], f[N], p[N];
  for (int i = 0; i < N; ++i) x[i] = _mm512_max_ps(lo, x[i]);  // x NaN -> NaN (see exp2_avx2)
  for (int i = 0; i < N; ++i) t[i] = _mm512_add_ps(x[i], magic);
  for (int i = 0; i < N; ++i) f[i] = _mm512_sub_ps(x[i], _mm512_sub_ps(t[i], magic));
  for (int i = 0; i < N; ++i) p[i] = _mm512_fmadd_ps(_mm512_set1_ps(1.327641773968935e-3f), f[i],
                                                     _mm512_set1_ps(9.675540961325169e-3f));
  for (int i = 0; i < N; ++i) p[i] = _mm512_fmadd_ps(p[i], f[i], _mm512_set1_ps(5.550713464617729e-2f));
  for (int i = 0; i < N; ++i) p[i] = _mm512_fmadd_ps(p[i], f[i], _mm512_set1_ps(2.4022120237350464e-1f));
  for (int i = 0; i < N; ++i) p[i] = _mm512_fmadd_ps(p[i], f[i], _mm512_set1_ps(6.931469440460205e-1f));
  for (int i = 0; i < N; ++i) p[i] = _mm512_fmadd_ps(p[i], f[i], _mm512_set1_ps(1.0000001192092896f));
  for (int i = 0; i < N; ++i) {
    x[i] = _mm512_mul_ps(p[i], _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t[i]), 23)));
  }
}

// Lanes c + 0..15 that are < nv.
SEQFAST_TARGET_AVX512 inline __mmask16 visible_mask512(int64_t c, int64_t nv) {
  const int64_t n = nv - c;
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max<int64_t>(n, 0)) - 1u);
}

// Lane-wise max of the first nv entries of s ^ sign (sign: -0.0f to negate), -inf in lanes that saw none.
SEQFAST_TARGET_AVX512 inline __m512 lane_max_avx512(const float* s, int64_t nv, __m512 sign) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = ninf, m1 = ninf;
  int64_t c = 0;
  for (; c + 32 <= nv; c += 32) {
    m0 = _mm512_max_ps(m0, _mm512_xor_ps(_mm512_loadu_ps(s + c), sign));
    m1 = _mm512_max_ps(m1, _mm512_xor_ps(_mm512_loadu_ps(s + c + 16), sign));
  }
  for (; c < nv; c += 16) {
    const __m512 x = _mm512_mask_mov_ps(ninf, visible_mask512(c, nv), _mm512_xor_ps(_mm512_loadu_ps(s + c), sign));
    m0 = _mm512_max_ps(m0, x);
  }
  return _mm512_max_ps(m0, m1);
}

SEQFAST_TARGET_AVX512 inline __m512 mul_rounded_avx512(__m512 a, __m512 b) {  // as mul_rounded_avx2
  __m512 p = _mm512_mul_ps(a, b);
  asm("" : "+v"(p));
  return p;
}

template <bool kRounded>
SEQFAST_TARGET_AVX512 inline __m512 exponent_avx512(const float* p, __m512 vf, __m512 vm) {  // as exponent_avx2
  const __m512 x = _mm512_loadu_ps(p);
  return kRounded ? _mm512_sub_ps(mul_rounded_avx512(x, vf), vm) : _mm512_fmsub_ps(x, vf, vm);
}

// As exp2_row_lanes_avx2, 16 lanes (its lanes still to add, as _mm512_reduce_add_ps does).
template <bool kRounded>
SEQFAST_TARGET_AVX512 inline __m512 exp2_row_lanes_avx512(float* s, int64_t nv, int64_t ncols, float f, float m) {
  const __m512 vf = _mm512_set1_ps(f), vm = _mm512_set1_ps(m);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 64 <= nv; c += 64) {
    __m512 x[4];
    for (int i = 0; i < 4; ++i) x[i] = exponent_avx512<kRounded>(s + c + 16 * i, vf, vm);
    exp2_many_avx512<4>(x);
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(s + c + 16 * i, x[i]);
    sum0 = _mm512_add_ps(sum0, _mm512_add_ps(x[0], x[1]));
    sum1 = _mm512_add_ps(sum1, _mm512_add_ps(x[2], x[3]));
  }
  for (; c < nv; c += 16) {
    __m512 x = _mm512_mask_mov_ps(ninf, visible_mask512(c, nv), exponent_avx512<kRounded>(s + c, vf, vm));
    exp2_many_avx512<1>(&x);
    _mm512_storeu_ps(s + c, x);
    sum0 = _mm512_add_ps(sum0, x);
  }
  for (; c < ncols; c += 16) _mm512_storeu_ps(s + c, _mm512_setzero_ps());
  return _mm512_add_ps(sum0, sum1);
}

SEQFAST_TARGET_AVX512 inline __m512 exp2_row_lanes_avx512(float* s, int64_t nv, int64_t ncols, float f, float m) {
  return std::fabs(m) < kFusedOffsetLimit ? exp2_row_lanes_avx512<false>(s, nv, ncols, f, m)
                                          : exp2_row_lanes_avx512<true>(s, nv, ncols, f, m);
}

// The backward's P = exp2(s * f - lse2) in place (probs_row). Not a float function whose sum the caller drops:
// GCC then turned the call into a jump to exp2_row_lanes_avx512, whose __m512 result came back in zmm0 with the
// upper halves dirty, and on Intel cores every SSE instruction of the (non-AVX) backward loop after it paid for
// that state: the 128-key row took ~150 ns instead of ~30, a quarter of an L1024 backward (benchmarks/NOTES.md;
// AMD cores have no such penalty). The explicit vzeroupper after the call leaves the caller clean whatever GCC
// does with the call.
SEQFAST_TARGET_AVX512 inline void probs_row_avx512(float* s, int64_t nv, int64_t ncols, float f, float lse2) {
  exp2_row_lanes_avx512(s, nv, ncols, f, lse2);
  _mm256_zeroupper();
}

template <bool kMax>
SEQFAST_TARGET_AVX512 inline __m512 fold_op_avx512(__m512 a, __m512 b) {
  return kMax ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b);
}

// Lane r of the result is v[r] reduced over its 16 lanes (max or sum), pairing the lanes as GCC's
// _mm512_reduce_max_ps / _mm512_reduce_add_ps do and with their operand order (max returns its second operand on a
// NaN or a tie, so the order is part of the result): lanes i and i + 8 (upper half first), then i and i + 4 (upper
// first), then i and i + 2 (lower first), then 0 and 1 (lower first). The same bits as 16 separate reductions, in
// 30 operations instead of 16 dependent chains.
template <bool kMax>
SEQFAST_TARGET_AVX512 inline __m512 fold16_avx512(const __m512* v) {
  const auto op = fold_op_avx512<kMax>;
  __m512 w[8], x[4], y[2];
  for (int k = 0; k < 8; ++k) {  // rows 2k, 2k+1: [a.lo8 + a.hi8 | b.lo8 + b.hi8]
    const __m512 a = v[2 * k], b = v[2 * k + 1];
    w[k] = op(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)), _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)));
  }
  for (int j = 0; j < 4; ++j) {  // 128-bit block k of x[j]: row 4j + k, its 4 partial lanes
    const __m512 c = w[2 * j], d = w[2 * j + 1];
    x[j] = op(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 1, 3, 1)), _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(2, 0, 2, 0)));
  }
  for (int j = 0; j < 2; ++j) {  // block k of y[j]: rows 8j + k and 8j + 4 + k, two partial lanes each
    const __m512 e = x[2 * j], g = x[2 * j + 1];
    y[j] = op(_mm512_shuffle_ps(e, g, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(e, g, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // Lane 4k + t: row 4t + k; put row r in lane r.
  const __m512 z = op(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), z);
}

// One online-softmax step (online_softmax_row_portable) for rows [0, n) of a score block (n <= 16; row r at
// s + r * ld, nv[r] visible keys, its m[r], l[r]; alpha[r] gets its factor): each row's max and sum stay lane-wise
// until one fold reduces 16 rows at once, and m, alpha and l are updated 16 rows a vector. Reduced one row at a
// time, a row of a few hundred keys spent about as long waiting on its two reductions as on its exps. alpha is
// exactly 1 while a row's max holds (no rescaling then), 0 from m = -inf; l takes one FMA, pinned, so that its
// rounding (the output's last bit) does not depend on what the compiler contracts.
SEQFAST_TARGET_AVX512 inline void online_softmax_rows_avx512(float* s, int64_t ld, int64_t n, const int64_t* nv,
                                                             int64_t ncols, float f, float* m, float* l,
                                                             float* alpha) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const __m512 ninf = _mm512_set1_ps(-kInf);
  const bool neg = f < 0.0f;
  const __mmask16 rows = static_cast<__mmask16>((1u << n) - 1u);
  __m512 v[16];
  for (int64_t r = 0; r < 16; ++r) {
    v[r] = r < n && nv[r] > 0 ? lane_max_avx512(s + r * ld, nv[r], _mm512_set1_ps(neg ? -0.0f : 0.0f)) : ninf;
  }
  const __m512 mx = fold16_avx512<true>(v);
  // The max of s * f is mx * |f| (for f < 0, mx is the max of -s); -inf stays -inf (not NaN for f = 0).
  const __m512 scaled = _mm512_mask_mul_ps(ninf, _mm512_cmp_ps_mask(mx, ninf, _CMP_NEQ_UQ), mx,
                                           _mm512_set1_ps(neg ? -f : f));
  const __m512 m_old = _mm512_mask_loadu_ps(ninf, rows, m);
  const __m512 m_new = _mm512_max_ps(scaled, m_old);  // std::max(m_old, scaled): m_old on a tie or a NaN
  __m512 d = _mm512_sub_ps(m_old, m_new);
  exp2_many_avx512<1>(&d);
  const __m512 a = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_old, m_new, _CMP_NEQ_UQ), _mm512_set1_ps(1.0f), d);
  alignas(64) float off[16];
  _mm512_store_ps(off, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_new, ninf, _CMP_EQ_OQ), m_new, _mm512_setzero_ps()));
  for (int64_t r = 0; r < 16; ++r) {
    v[r] = r < n ? exp2_row_lanes_avx512(s + r * ld, nv[r], ncols, f, off[r]) : _mm512_setzero_ps();
  }
  const __m512 sum = fold16_avx512<false>(v);
  _mm512_mask_storeu_ps(l, rows, _mm512_fmadd_ps(_mm512_mask_loadu_ps(_mm512_setzero_ps(), rows, l), a, sum));
  _mm512_mask_storeu_ps(m, rows, m_new);
  _mm512_mask_storeu_ps(alpha, rows, a);
}

SEQFAST_TARGET_AVX512 inline void dscores_row_avx512(const float* p, float* dp, const float* z, int64_t ncols,
                                                     float delta) {
  const __m512 vd = _mm512_set1_ps(delta);
  for (int64_t c = 0; c < ncols; c += 16) {
    __m512 d = _mm512_loadu_ps(dp + c);
    d = z ? _mm512_fmsub_ps(d, _mm512_loadu_ps(z + c), vd) : _mm512_sub_ps(d, vd);
    _mm512_storeu_ps(dp + c, _mm512_mul_ps(_mm512_loadu_ps(p + c), d));
  }
}

// sum_c a[c] * b[c], c < n: 16 lanes of FMA chains (two accumulators), added up by _mm512_reduce_add_ps.
SEQFAST_TARGET_AVX512 inline float dot_row_avx512(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 16), _mm512_loadu_ps(b + c + 16), s1);
  }
  for (; c < n; c += 16) {
    const __mmask16 k = visible_mask512(c, n);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + c), _mm512_maskz_loadu_ps(k, b + c), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

SEQFAST_TARGET_AVX512 inline void scale_row_avx512(float* o, int64_t n, float alpha) {
  const __m512 va = _mm512_set1_ps(alpha);
  for (int64_t c = 0; c < n; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(o + c), va));
}

// Lane j of the result is the sum of the 16 lanes of a[j]: pairs of vectors are folded into one by adding their
// interleaved halves, four times (lanes, 64-bit pairs, then 128-bit blocks twice).
SEQFAST_TARGET_AVX512 inline __m512 sum_lanes16_avx512(const __m512* a) {
  __m512 t[8], u[4], w[2];
  for (int p = 0; p < 8; ++p) {
    t[p] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]), _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]));
  }
  for (int p = 0; p < 4; ++p) {
    const __m512d x = _mm512_castps_pd(t[2 * p]), y = _mm512_castps_pd(t[2 * p + 1]);
    u[p] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int p = 0; p < 2; ++p) {
    w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * p], u[2 * p + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * p], u[2 * p + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

// Sixteen values of a key or value row as floats, exactly: decoding reads 16-bit K and V rows where they lie.
SEQFAST_TARGET_AVX512 inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }
SEQFAST_TARGET_AVX512 inline __m512 load16f(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
SEQFAST_TARGET_AVX512 inline __m512 load16f(const c10::BFloat16* p) {  // a bfloat16 is a float's top half
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// Scores of one query row against n key rows read in place, for a call with a query row or a few a sequence
// (decoding), where packing K^T panels for the register tiles costs more than the products they feed:
// s[j] = q . K[j] for j < n, K's rows ks floats apart and Dp floats wide (a multiple of 16, zero-padded as q is);
// s is written up to the next multiple of 16, with zeros past n. Each key sums its own 16 lanes (one FMA chain a
// lane over d), then 16 keys' sums are folded into one vector: a fixed order, so the same bits every call.
template <typename S>
SEQFAST_TARGET_AVX512 inline void row_scores_avx512(const float* q, const S* K, int64_t ks, int64_t n, int64_t Dp,
                                                    float* s) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nb = std::min<int64_t>(16, n - j0);
    __m512 acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      __m512 a = _mm512_setzero_ps();
      if (j < nb) {
        const S* kr = K + (j0 + j) * ks;
        for (int64_t d = 0; d < Dp; d += 16) a = _mm512_fmadd_ps(load16f(kr + d), _mm512_loadu_ps(q + d), a);
      }
      acc[j] = a;
    }
    _mm512_storeu_ps(s + j0, sum_lanes16_avx512(acc));
  }
}

// o[c] += sum_k p[k] V[k][c] for one output row, V's rows vs floats apart, for the 16 NV columns o and V point at:
// each a chain of FMAs over k from zero, then added to o, as the register tiles do (the same bits), but one pass
// over V's rows instead of one per 32 columns.
template <int NV, typename S>
SEQFAST_TARGET_AVX512 inline void row_pv_chunk_avx512(const float* p, int64_t n, const S* V, int64_t vs, float* o) {
  __m512 acc[NV];
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; ++k, V += vs) {
    const __m512 pk = _mm512_set1_ps(p[k]);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) acc[i] = _mm512_fmadd_ps(pk, load16f(V + 16 * i), acc[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) _mm512_storeu_ps(o + 16 * i, _mm512_add_ps(acc[i], _mm512_loadu_ps(o + 16 * i)));
}

// row_scores_avx512 for two query rows at once, sharing each load of K: 8 keys a block, the two rows' 8 sums folded
// into one vector by the same lane tree (it treats every key alike), so the bits are row_scores_avx512's.
template <typename S>
SEQFAST_TARGET_AVX512 inline void row_scores2_avx512(const float* q0, const float* q1, const S* K, int64_t ks,
                                                     int64_t n, int64_t Dp, float* s0, float* s1) {
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t nb = std::min<int64_t>(8, n - j0);
    __m512 acc[16];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m512 a = _mm512_setzero_ps(), b = a;
      if (j < nb) {
        const S* kr = K + (j0 + j) * ks;
        for (int64_t d = 0; d < Dp; d += 16) {
          const __m512 kv = load16f(kr + d);
          a = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q0 + d), a);
          b = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q1 + d), b);
        }
      }
      acc[j] = a;
      acc[8 + j] = b;
    }
    const __m512 v = sum_lanes16_avx512(acc);
    _mm256_storeu_ps(s0 + j0, _mm512_castps512_ps256(v));
    _mm256_storeu_ps(s1 + j0, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
  if (n % 16 > 0 && n % 16 <= 8) {  // up to 16 | n, as row_scores_avx512
    _mm256_storeu_ps(s0 + n / 16 * 16 + 8, _mm256_setzero_ps());
    _mm256_storeu_ps(s1 + n / 16 * 16 + 8, _mm256_setzero_ps());
  }
}

// row_pv_chunk_avx512 for two rows at once, sharing each load of V (the same bits).
template <int NV, typename S>
SEQFAST_TARGET_AVX512 inline void row_pv2_chunk_avx512(const float* p0, const float* p1, int64_t n, const S* V,
                                                       int64_t vs, float* o0, float* o1) {
  __m512 a0[NV], a1[NV];
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; ++k, V += vs) {
    const __m512 pk0 = _mm512_set1_ps(p0[k]), pk1 = _mm512_set1_ps(p1[k]);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) {
      const __m512 vv = load16f(V + 16 * i);
      a0[i] = _mm512_fmadd_ps(pk0, vv, a0[i]);
      a1[i] = _mm512_fmadd_ps(pk1, vv, a1[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) {
    _mm512_storeu_ps(o0 + 16 * i, _mm512_add_ps(a0[i], _mm512_loadu_ps(o0 + 16 * i)));
    _mm512_storeu_ps(o1 + 16 * i, _mm512_add_ps(a1[i], _mm512_loadu_ps(o1 + 16 * i)));
  }
}

// Two rows' P V in chunks of 128 columns.
template <typename S>
SEQFAST_TARGET_AVX512 inline void row_pv2_avx512(const float* p0, const float* p1, int64_t n, const S* V,
                                                 int64_t vs, int64_t Dvp, float* o0, float* o1) {
  int64_t c = 0;
  for (; c + 128 <= Dvp; c += 128) row_pv2_chunk_avx512<8, S>(p0, p1, n, V + c, vs, o0 + c, o1 + c);
  switch ((Dvp - c) / 16) {
    case 7: return row_pv2_chunk_avx512<7, S>(p0, p1, n, V + c, vs, o0 + c, o1 + c);
    case 6: return row_pv2_chunk_avx512<6, S>(p0, p1, n, V + c, vs, o0 + c, o1 + c);
    case 5: return row_pv2_chunk_avx512<5, S>(p0, p1, n, V + c, vs, o0 + c, o1 + c);
    case 4: return row_pv2_chunk_avx512<4, S>(p0, p1, n, V + c, vs, o0 + c, o1 + c);
    case 3: return row_pv2_chunk_avx512<3, S>(p0, p1, n, V + c, vs, o0 + c, o1 + c);
    case 2: return row_pv2_chunk_avx512<2, S>(p0, p1, n, V + c, vs, o0 + c, o1 + c);
    case 1: return row_pv2_chunk_avx512<1, S>(p0, p1, n, V + c, vs, o0 + c, o1 + c);
    default: return;
  }
}

// One query row's P V (decoding; Dvp a multiple of 16), in chunks of 128 columns.
template <typename S>
SEQFAST_TARGET_AVX512 inline void row_pv_avx512(const float* p, int64_t n, const S* V, int64_t vs, int64_t Dvp,
                                                float* o) {
  int64_t c = 0;
  for (; c + 128 <= Dvp; c += 128) row_pv_chunk_avx512<8, S>(p, n, V + c, vs, o + c);
  switch ((Dvp - c) / 16) {
    case 7: return row_pv_chunk_avx512<7, S>(p, n, V + c, vs, o + c);
    case 6: return row_pv_chunk_avx512<6, S>(p, n, V + c, vs, o + c);
    case 5: return row_pv_chunk_avx512<5, S>(p, n, V + c, vs, o + c);
    case 4: return row_pv_chunk_avx512<4, S>(p, n, V + c, vs, o + c);
    case 3: return row_pv_chunk_avx512<3, S>(p, n, V + c, vs, o + c);
    case 2: return row_pv_chunk_avx512<2, S>(p, n, V + c, vs, o + c);
    case 1: return row_pv_chunk_avx512<1, S>(p, n, V + c, vs, o + c);
    default: return;
  }
}
#pragma GCC diagnostic pop
#endif  // SEQFAST_X86

// ---------------------------------------------------------------------------------------------
// Portable row operations. ncols (a multiple of kNR) columns are written; only the first nv are
// visible, the others get probability 0.

// One online-softmax step on a row of base-2 scores s * f: updates the running max m and sum l,
// overwrites s with exp2(s * f - m) and returns the factor the previous output row must take.
template <typename T>
inline T online_softmax_row_portable(T* s, int64_t nv, int64_t ncols, T f, T& m, T& l) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T mx = kNegInf;
  for (int64_t c = 0; c < nv; ++c) {
    s[c] *= f;
    mx = std::max(mx, s[c]);
  }
  const T m_new = std::max(m, mx);
  const T alpha = m == kNegInf ? T(0) : std::exp2(m - m_new);
  const T off = exp2_offset(m_new);
  T sum = 0;
  for (int64_t c = 0; c < nv; ++c) {
    s[c] = std::exp2(s[c] - off);
    sum += s[c];
  }
  for (int64_t c = nv; c < ncols; ++c) s[c] = T(0);
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

template <typename T>
inline void probs_row_portable(T* s, int64_t nv, int64_t ncols, T f, T lse2) {
  for (int64_t c = 0; c < nv; ++c) s[c] = std::exp2(s[c] * f - lse2);
  for (int64_t c = nv; c < ncols; ++c) s[c] = T(0);
}

template <typename T>
inline void dscores_row_portable(const T* p, T* dp, const T* z, int64_t ncols, T delta) {
  for (int64_t c = 0; c < ncols; ++c) dp[c] = p[c] * ((z ? dp[c] * z[c] : dp[c]) - delta);
}

// ---------------------------------------------------------------------------------------------
// Rows between the storage dtype S and the compute type T (float for the 16-bit types).
//
// c10::Half and c10::BFloat16 convert one element at a time, fp16 in software on this baseline x86-64
// build; with AVX2 (and F16C, which every AVX2 CPU has) 8 at a time: F16C for fp16, a 16-bit shift for
// bf16 (both exact), and back with round-to-nearest-even as c10 does (bf16 NaN -> 0x7FC0, as c10).

// Element conversion between storage and compute types; half types go through float.
// ---------------------------------------------------------------------------------------------
// Panel packing: kNR rows into the column-major panel the tiles read as B.

#if SEQFAST_X86
// dst[e * kNR + c] = src[c * ld + e] for the kNR rows c and the columns e < width8 (a multiple of 8), in
// 8 x 8 register transposes. The scalar scatter this replaces stored one float per cache line.
SEQFAST_TARGET_AVX2 inline void pack_panel_avx2(const float* src, int64_t ld, int64_t width8, float* dst) {
  static_assert(kNR == 16, "two 8-row halves per panel");
  for (int64_t e0 = 0; e0 < width8; e0 += 8) {
    for (int64_t half = 0; half < 2; ++half) {
      const float* s = src + half * 8 * ld + e0;
      const __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ld);
      const __m256 r2 = _mm256_loadu_ps(s + 2 * ld), r3 = _mm256_loadu_ps(s + 3 * ld);
      const __m256 r4 = _mm256_loadu_ps(s + 4 * ld), r5 = _mm256_loadu_ps(s + 5 * ld);
      const __m256 r6 = _mm256_loadu_ps(s + 6 * ld), r7 = _mm256_loadu_ps(s + 7 * ld);
      // Pairs of rows interleaved, then quads, then the two 128-bit halves swapped into place.
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
      const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
      const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
      const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
      float* d = dst + e0 * kNR + half * 8;
      _mm256_storeu_ps(d + 0 * kNR, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + 1 * kNR, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * kNR, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * kNR, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * kNR, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * kNR, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * kNR, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * kNR, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
}
#endif

// dst[e * kNR + c] = src[c * ld + e] for the kNR rows c and the columns e < width.
template <typename T>
inline void pack_full_panel(const T* src, int64_t ld, int64_t width, T* dst) {
  int64_t done = 0;
#if SEQFAST_X86
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx2()) {
      done = width / 8 * 8;
      pack_panel_avx2(src, ld, done, dst);
    }
  }
#endif
  for (int64_t c = 0; c < kNR; ++c) {
    for (int64_t e = done; e < width; ++e) dst[e * kNR + c] = src[c * ld + e];
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch: AVX-512, else AVX2, for fp32 when the CPU has it.

inline void gemm(const Gemm<double>& g) { gemm_portable(g); }
inline void gemm(const Gemm<float>& g) {
#if SEQFAST_X86
  if (has_avx512()) return gemm_avx512(g);
  if (has_avx2()) return gemm_avx2(g);
#endif
  gemm_portable(g);
}

// row_scores, row_pv: the AVX-512 or AVX2 kernels; the callers keep the register tiles where neither is there.
inline bool row_scores_available() {
#if SEQFAST_X86
  return has_avx512() || has_avx2();
#else
  return false;
#endif
}
// K and V rows of another dtype than float (S: 16-bit) are read where they lie on AVX-512 only (row_reads_rows_of);
// elsewhere the caller converts them into float rows first.
template <typename S>
inline bool row_reads_rows_of() {
#if SEQFAST_X86
  if constexpr (!std::is_same_v<S, float>) return has_avx512();
#endif
  return std::is_same_v<S, float>;
}
template <typename S>
inline void row_scores(const float* q, const S* K, int64_t ks, int64_t n, int64_t Dp, float* s) {
#if SEQFAST_X86
  if (has_avx512()) return row_scores_avx512(q, K, ks, n, Dp, s);
  if constexpr (std::is_same_v<S, float>) {
    if (has_avx2()) return row_scores_avx2(q, K, ks, n, Dp, s);
  }
#endif
  (void)q, (void)K, (void)ks, (void)n, (void)Dp, (void)s;
}
// Two query rows at once where AVX-512 shares the loads of K and V between them; elsewhere one row after the other.
// The same bits either way.
template <typename S>
inline void row_scores2(const float* q0, const float* q1, const S* K, int64_t ks, int64_t n, int64_t Dp, float* s0,
                        float* s1) {
#if SEQFAST_X86
  if (has_avx512()) return row_scores2_avx512(q0, q1, K, ks, n, Dp, s0, s1);
#endif
  row_scores(q0, K, ks, n, Dp, s0);
  row_scores(q1, K, ks, n, Dp, s1);
}
template <typename S>
inline void row_pv(const float* p, int64_t n, const S* V, int64_t vs, int64_t Dvp, float* o) {
#if SEQFAST_X86
  if (has_avx512()) return row_pv_avx512(p, n, V, vs, Dvp, o);
  if constexpr (std::is_same_v<S, float>) {
    if (has_avx2()) return row_pv_avx2(p, n, V, vs, Dvp, o);
  }
#endif
  (void)p, (void)n, (void)V, (void)vs, (void)Dvp, (void)o;
}
template <typename S>
inline void row_pv2(const float* p0, const float* p1, int64_t n, const S* V, int64_t vs, int64_t Dvp, float* o0,
                    float* o1) {
#if SEQFAST_X86
  if (has_avx512()) return row_pv2_avx512(p0, p1, n, V, vs, Dvp, o0, o1);
#endif
  row_pv(p0, n, V, vs, Dvp, o0);
  row_pv(p1, n, V, vs, Dvp, o1);
}

// Rows of the register tile gemm() uses for T: the row (and key) block of the causal diagonal paths, so
// that their products run on full tiles.
template <typename T>
inline int64_t tile_rows() {
#if SEQFAST_X86
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) return kMR512;
  }
#endif
  return kMR;
}

// Steps of the tiles' k loops in gemm(M x N x K) for T: what a Prefetch is spread over.
template <typename T>
inline int64_t tile_steps(int64_t M, int64_t N, int64_t K) {
  int64_t cols = kNR;
#if SEQFAST_X86
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) cols = 2 * kNR;
  }
#endif
  return (M + tile_rows<T>() - 1) / tile_rows<T>() * ((N + cols - 1) / cols) * K;
}

// online_softmax_row_portable for rows [0, n) of a score block, n <= kSoftmaxRows: row r at s + r * ld with nv[r]
// visible keys, its running m[r] and l[r]; alpha[r] gets the factor its output row must take.
constexpr int64_t kSoftmaxRows = 16;
template <typename T>
inline void online_softmax_rows(T* s, int64_t ld, int64_t n, const int64_t* nv, int64_t ncols, T f, T* m, T* l,
                                T* alpha) {
#if SEQFAST_X86
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) return online_softmax_rows_avx512(s, ld, n, nv, ncols, f, m, l, alpha);
    if (has_avx2()) return online_softmax_rows_avx2(s, ld, n, nv, ncols, f, m, l, alpha);
  }
#endif
  for (int64_t r = 0; r < n; ++r) alpha[r] = online_softmax_row_portable(s + r * ld, nv[r], ncols, f, m[r], l[r]);
}

inline void probs_row(double* s, int64_t nv, int64_t ncols, double f, double lse2) {
  probs_row_portable(s, nv, ncols, f, lse2);
}
inline void probs_row(float* s, int64_t nv, int64_t ncols, float f, float lse2) {
#if SEQFAST_X86
  if (has_avx512()) return probs_row_avx512(s, nv, ncols, f, lse2);
  if (has_avx2()) return probs_row_avx2(s, nv, ncols, f, lse2);
#endif
  probs_row_portable(s, nv, ncols, f, lse2);
}

inline void dscores_row(const double* p, double* dp, const double* z, int64_t ncols, double delta) {
  dscores_row_portable(p, dp, z, ncols, delta);
}
inline void dscores_row(const float* p, float* dp, const float* z, int64_t ncols, float delta) {
#if SEQFAST_X86
  if (has_avx512()) return dscores_row_avx512(p, dp, z, ncols, delta);
  if (has_avx2()) return dscores_row_avx2(p, dp, z, ncols, delta);
#endif
  dscores_row_portable(p, dp, z, ncols, delta);
}

// sum_c a[c] * b[c], c < n (the backward's delta = rowsum(dO * O)): vector FMA chains for float where the CPU has
// them, else one running sum.
template <typename T>
inline T dot_row(const T* a, const T* b, int64_t n) {
#if SEQFAST_X86
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) return dot_row_avx512(a, b, n);
    if (has_avx2()) return dot_row_avx2(a, b, n);
  }
#endif
  T acc = 0;
  for (int64_t c = 0; c < n; ++c) acc += a[c] * b[c];
  return acc;
}

inline void scale_row(double* o, int64_t n, double alpha) {
  for (int64_t c = 0; c < n; ++c) o[c] *= alpha;
}
inline void scale_row(float* o, int64_t n, float alpha) {
#if SEQFAST_X86
  if (has_avx512()) return scale_row_avx512(o, n, alpha);
  if (has_avx2()) return scale_row_avx2(o, n, alpha);
#endif
  for (int64_t c = 0; c < n; ++c) o[c] *= alpha;
}

}  // namespace seqfast::attn
