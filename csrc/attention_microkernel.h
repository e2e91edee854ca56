// Register-blocked matrix-multiply tiles and softmax row operations for the CPU attention kernels.
//
// Every product of the attention forward and backward is one shape:
//     C[M x N] (+)= A[M x K] * B[K x N]
// with A read through two strides (so P and P^T are the same buffer) and B made of NR-wide
// column blocks whose rows are contiguous (a K^T panel, or a row-major V / dO / Q / K tile).
// N is always a multiple of NR: the packed operands are zero-padded to it.
//
// fp32 has an AVX2+FMA version (6 x 16 accumulators in 12 ymm registers, one broadcast and two
// loads per 12 FMAs) chosen at run time; the portable version serves float64 and CPUs without AVX2.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_features.h"

#if SEQFAST_X86
#include <immintrin.h>
#endif

namespace seqfast::attn {

constexpr int64_t kNR = 16;  // columns per register tile; packed widths are multiples of it
constexpr int64_t kMR = 6;   // rows per register tile

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

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA fp32 tiles.

#if SEQFAST_X86
// kRowMajorA: a_ks == 1 (A rows contiguous, e.g. Q or P); else A is read down columns (P^T, dS^T).
template <int R, bool kRowMajorA>
SEQFAST_TARGET_AVX2 inline void tile_avx2(const Gemm<float>& g, int64_t i0, int64_t j0) {
  __m256 c0[R], c1[R];
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  const float* a = g.A + i0 * g.a_rs;
  const float* b = g.B + (j0 / kNR) * g.b_bs;
  const int64_t K = g.K, ldb = g.ldb, a_rs = g.a_rs, a_ks = g.a_ks;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = _mm256_loadu_ps(b + 8);
    b += ldb;
    for (int r = 0; r < R; ++r) {
      const __m256 ar = _mm256_broadcast_ss(kRowMajorA ? a + r * a_rs + k : a + r);
      c0[r] = _mm256_fmadd_ps(ar, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(ar, b1, c1[r]);
    }
    if (!kRowMajorA) a += a_ks;
  }
  for (int r = 0; r < R; ++r) {
    float* c = g.C + (i0 + r) * g.ldc + j0;
    if (g.accumulate) {
      c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(c));
      c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(c + 8));
    }
    _mm256_storeu_ps(c, c0[r]);
    _mm256_storeu_ps(c + 8, c1[r]);
  }
}

template <bool kRowMajorA>
SEQFAST_TARGET_AVX2 inline void gemm_avx2_impl(const Gemm<float>& g) {
  for (int64_t j0 = 0; j0 < g.N; j0 += kNR) {
    int64_t i0 = 0;
    for (; i0 + kMR <= g.M; i0 += kMR) tile_avx2<kMR, kRowMajorA>(g, i0, j0);
    switch (g.M - i0) {
      case 5: tile_avx2<5, kRowMajorA>(g, i0, j0); break;
      case 4: tile_avx2<4, kRowMajorA>(g, i0, j0); break;
      case 3: tile_avx2<3, kRowMajorA>(g, i0, j0); break;
      case 2: tile_avx2<2, kRowMajorA>(g, i0, j0); break;
      case 1: tile_avx2<1, kRowMajorA>(g, i0, j0); break;
      default: break;
    }
  }
}

SEQFAST_TARGET_AVX2 inline void gemm_avx2(const Gemm<float>& g) {
  if (g.a_ks == 1) {
    gemm_avx2_impl<true>(g);
  } else {
    gemm_avx2_impl<false>(g);
  }
}

// 2^x for x <= 128; 0 for x < -126 (including -inf and NaN). Round-to-nearest range reduction,
// then the degree-6 Taylor polynomial of 2^f on [-1/2, 1/2] (relative error ~1.2e-7).
SEQFAST_TARGET_AVX2 inline __m256 exp2_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-126.0f);
  const __m256 valid = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(127.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), valid);
}

SEQFAST_TARGET_AVX2 inline float hmax_avx2(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
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

SEQFAST_TARGET_AVX2 inline float online_softmax_row_avx2(float* s, int64_t nv, int64_t ncols, float f, float& m,
                                                         float& l) {
  const __m256 vf = _mm256_set1_ps(f);
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < ncols; c += 8) {
    const __m256 x = visible_avx2(_mm256_mul_ps(_mm256_loadu_ps(s + c), vf), c, nv);
    _mm256_storeu_ps(s + c, x);
    vmax = _mm256_max_ps(vmax, x);
  }
  const float m_new = std::max(m, hmax_avx2(vmax));
  if (m_new == -std::numeric_limits<float>::infinity()) {
    for (int64_t c = 0; c < ncols; c += 8) _mm256_storeu_ps(s + c, _mm256_setzero_ps());
    return 1.0f;
  }
  const float alpha = m == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp2(m - m_new);
  const __m256 vm = _mm256_set1_ps(m_new);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t c = 0; c < ncols; c += 8) {
    const __m256 p = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + c), vm));
    _mm256_storeu_ps(s + c, p);
    vsum = _mm256_add_ps(vsum, p);
  }
  l = l * alpha + hsum_avx2(vsum);
  m = m_new;
  return alpha;
}

SEQFAST_TARGET_AVX2 inline void probs_row_avx2(float* s, int64_t nv, int64_t ncols, float f, float lse2) {
  const __m256 vf = _mm256_set1_ps(f), vl = _mm256_set1_ps(lse2);
  for (int64_t c = 0; c < ncols; c += 8) {
    const __m256 x = visible_avx2(_mm256_fmsub_ps(_mm256_loadu_ps(s + c), vf, vl), c, nv);
    _mm256_storeu_ps(s + c, exp2_avx2(x));
  }
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

SEQFAST_TARGET_AVX2 inline void scale_row_avx2(float* o, int64_t n, float alpha) {
  const __m256 va = _mm256_set1_ps(alpha);
  for (int64_t c = 0; c < n; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), va));
}
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
  if (m_new == kNegInf) {
    for (int64_t c = 0; c < ncols; ++c) s[c] = T(0);
    return T(1);
  }
  const T alpha = m == kNegInf ? T(0) : std::exp2(m - m_new);
  T sum = 0;
  for (int64_t c = 0; c < nv; ++c) {
    s[c] = std::exp2(s[c] - m_new);
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
// Dispatch: AVX2 for fp32 when the CPU has it.

inline void gemm(const Gemm<double>& g) { gemm_portable(g); }
inline void gemm(const Gemm<float>& g) {
#if SEQFAST_X86
  if (has_avx2()) return gemm_avx2(g);
#endif
  gemm_portable(g);
}

inline double online_softmax_row(double* s, int64_t nv, int64_t ncols, double f, double& m, double& l) {
  return online_softmax_row_portable(s, nv, ncols, f, m, l);
}
inline float online_softmax_row(float* s, int64_t nv, int64_t ncols, float f, float& m, float& l) {
#if SEQFAST_X86
  if (has_avx2()) return online_softmax_row_avx2(s, nv, ncols, f, m, l);
#endif
  return online_softmax_row_portable(s, nv, ncols, f, m, l);
}

inline void probs_row(double* s, int64_t nv, int64_t ncols, double f, double lse2) {
  probs_row_portable(s, nv, ncols, f, lse2);
}
inline void probs_row(float* s, int64_t nv, int64_t ncols, float f, float lse2) {
#if SEQFAST_X86
  if (has_avx2()) return probs_row_avx2(s, nv, ncols, f, lse2);
#endif
  probs_row_portable(s, nv, ncols, f, lse2);
}

inline void dscores_row(const double* p, double* dp, const double* z, int64_t ncols, double delta) {
  dscores_row_portable(p, dp, z, ncols, delta);
}
inline void dscores_row(const float* p, float* dp, const float* z, int64_t ncols, float delta) {
#if SEQFAST_X86
  if (has_avx2()) return dscores_row_avx2(p, dp, z, ncols, delta);
#endif
  dscores_row_portable(p, dp, z, ncols, delta);
}

inline void scale_row(double* o, int64_t n, double alpha) {
  for (int64_t c = 0; c < n; ++c) o[c] *= alpha;
}
inline void scale_row(float* o, int64_t n, float alpha) {
#if SEQFAST_X86
  if (has_avx2()) return scale_row_avx2(o, n, alpha);
#endif
  for (int64_t c = 0; c < n; ++c) o[c] *= alpha;
}

}  // namespace seqfast::attn
