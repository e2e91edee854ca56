// Row kernels of the CTC loss, in float32 with AVX2 + FMA (8 lanes), plus the vector exp / log they need.
//
// Every function here is compiled for AVX2 (SEQFAST_TARGET_AVX2, or SEQFAST_TARGET_AVX2_F16C where it reads 16-bit
// rows) and must be called only after has_avx2() said yes, which includes F16C. Row lengths `n` are multiples of 8
// unless a function says otherwise: the callers pad their scratch rows, so that every state goes through the same
// arithmetic (no scalar tails whose rounding would differ from the vector body).
//
// exp and log are Cephes-style: range reduction to a small interval, then a short polynomial, with the
// power of two put back through the exponent bits. Both are within ~1-2 ulp of the true float32 result on
// the ranges they are used on, which is all the log-space recursion needs (its own rounding is larger).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu_features.h"
#include "half_rows.h"

#if SEQFAST_X86
#include <immintrin.h>

namespace seqfast::ctc_simd {

#define SEQFAST_AVX2_INLINE SEQFAST_TARGET_AVX2 static inline __attribute__((always_inline))

// exp's range: below kExpLo exp_any flushes to 0, above kExpHi it overflows. kExpLo keeps exp_core's
// result a normal float: a subnormal result (or operand) costs a slow microcode assist per lane.
constexpr float kExpLo = -87.0f;
// logaddexp3 adds exp(d) <= 1 to 1: below exp(-32) it is lost in rounding anyway, and clamping there keeps
// the many -inf states (not reachable yet) away from tiny results.
constexpr float kLaeLo = -32.0f;
constexpr float kExpHi = 88.3f;

SEQFAST_AVX2_INLINE __m256 splat(float v) { return _mm256_set1_ps(v); }

// exp(x) = p * 2^n with n = round(x / ln 2) and p in [0.7, 1.42]; accurate for |x| < 2^15 or so.
SEQFAST_AVX2_INLINE __m256 exp_reduced(__m256 x, __m256* n_out) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, splat(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln 2 split in two so that n * hi is exact: r = x - n ln2 to ~float precision.
  __m256 r = _mm256_fnmadd_ps(n, splat(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, splat(-2.12194440e-4f), r);
  __m256 p = _mm256_fmadd_ps(splat(1.9875691500e-4f), r, splat(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, splat(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, splat(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, splat(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, splat(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  *n_out = n;
  return _mm256_add_ps(p, splat(1.0f));
}

// exp(x) for x in [kExpLo, kExpHi] (NaN gives NaN). The clamped range keeps 2^n a normal float.
SEQFAST_AVX2_INLINE __m256 exp_core(__m256 x) {
  __m256 n;
  const __m256 p = exp_reduced(x, &n);
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
}

// exp(x) for any x: 0 below kExpLo (and for -inf), +inf above kExpHi, NaN for NaN.
SEQFAST_AVX2_INLINE __m256 exp_any(__m256 x) {
  // max/min return their second operand when either is NaN: x second keeps NaN flowing.
  const __m256 xc = _mm256_min_ps(splat(kExpHi), _mm256_max_ps(splat(kExpLo), x));
  __m256 e = exp_core(xc);
  e = _mm256_andnot_ps(_mm256_cmp_ps(x, splat(kExpLo), _CMP_LT_OQ), e);
  return _mm256_blendv_ps(e, splat(std::numeric_limits<float>::infinity()),
                          _mm256_cmp_ps(x, splat(kExpHi), _CMP_GT_OQ));
}

// log(x) for positive normal x (the callers only pass sums in [1, 3]); no zero / inf / NaN handling.
SEQFAST_AVX2_INLINE __m256 log_normal(__m256 x) {
  const __m256i xi = _mm256_castps_si256(x);
  // x = m * 2^e with m in [0.5, 1).
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  // Move m to [sqrt(1/2), sqrt(2)) so that the polynomial works on |z| < 0.42.
  const __m256 small = _mm256_cmp_ps(m, splat(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, splat(1.0f)));
  const __m256 z = _mm256_add_ps(_mm256_sub_ps(m, splat(1.0f)), _mm256_and_ps(small, m));
  const __m256 z2 = _mm256_mul_ps(z, z);
  __m256 p = _mm256_fmadd_ps(splat(7.0376836292e-2f), z, splat(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, z, splat(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, z, splat(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, z, splat(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, z, splat(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, z, splat(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, z, splat(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, z, splat(3.3333331174e-1f));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, z), z2);
  y = _mm256_fmadd_ps(e, splat(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z2, splat(0.5f), y);
  return _mm256_fmadd_ps(e, splat(0.693359375f), _mm256_add_ps(z, y));
}

// log(exp(a) + exp(b) + exp(c)), branch-free: -inf when all three are -inf, NaN when any is NaN.
// Sorting the three leaves two exps (the largest term is exp(0) = 1) and a log of a sum in [1, 3].
SEQFAST_AVX2_INLINE __m256 logaddexp3(__m256 a, __m256 b, __m256 c) {
  const __m256 neg_inf = splat(-std::numeric_limits<float>::infinity());
  const __m256 lo = _mm256_min_ps(b, a);   // NaN if a is
  const __m256 hi = _mm256_max_ps(a, b);   // NaN if b is
  __m256 m = _mm256_max_ps(hi, c);         // NaN if c is
  const __m256 mid = _mm256_min_ps(c, hi); // NaN if hi is
  // m = -inf (no path): subtract 0 instead, so that -inf - m stays -inf rather than NaN.
  const __m256 m_safe = _mm256_andnot_ps(_mm256_cmp_ps(m, neg_inf, _CMP_EQ_OQ), m);
  const __m256 d1 = _mm256_max_ps(splat(kLaeLo), _mm256_sub_ps(lo, m_safe));
  const __m256 d2 = _mm256_max_ps(splat(kLaeLo), _mm256_sub_ps(mid, m_safe));
  const __m256 s = _mm256_add_ps(_mm256_add_ps(exp_core(d1), exp_core(d2)), splat(1.0f));
  // s - s is 0, or NaN when a NaN came in: log_normal itself would turn NaN into a finite value.
  return _mm256_add_ps(_mm256_add_ps(m, log_normal(s)), _mm256_sub_ps(s, s));
}

SEQFAST_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

SEQFAST_AVX2_INLINE float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lanes [0, rem) set, for the masked tail of rows whose length is not a multiple of 8.
SEQFAST_AVX2_INLINE __m256i tail_mask(int64_t rem) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Forward step: out[s] = logaddexp(prev[s], prev[s-1], prev[s-2] + skip[s]) + lpe[s]; prev[-2], prev[-1] readable.
SEQFAST_AVX2_INLINE void alpha_vec(float* out, const float* prev, const float* skip, const float* lpe, int64_t s) {
  const __m256 c = _mm256_add_ps(_mm256_loadu_ps(prev + s - 2), _mm256_loadu_ps(skip + s));
  const __m256 r = logaddexp3(_mm256_loadu_ps(prev + s), _mm256_loadu_ps(prev + s - 1), c);
  _mm256_storeu_ps(out + s, _mm256_add_ps(r, _mm256_loadu_ps(lpe + s)));
}

// Two independent vectors per iteration: exp and log are long dependency chains, and the out-of-order
// window does not reach far enough into the next iteration to overlap them by itself.
SEQFAST_TARGET_AVX2 static void alpha_row_avx2(float* out, const float* prev, const float* skip, const float* lpe,
                                               int64_t n) {
  int64_t s = 0;
  for (; s + 16 <= n; s += 16) {
    alpha_vec(out, prev, skip, lpe, s);
    alpha_vec(out, prev, skip, lpe, s + 8);
  }
  if (s < n) alpha_vec(out, prev, skip, lpe, s);
}

// Backward step: bx[s] = logaddexp(next[s], next[s+1], next[s+2] + skip[s]) (beta without frame t's emission),
// b[s] = bx[s] + lpe[s]; next[n], next[n+1] readable.
SEQFAST_AVX2_INLINE void beta_vec(float* bx, float* b, const float* next, const float* skip, const float* lpe,
                                  int64_t s) {
  const __m256 c = _mm256_add_ps(_mm256_loadu_ps(next + s + 2), _mm256_loadu_ps(skip + s));
  const __m256 r = logaddexp3(_mm256_loadu_ps(next + s), _mm256_loadu_ps(next + s + 1), c);
  _mm256_storeu_ps(bx + s, r);
  _mm256_storeu_ps(b + s, _mm256_add_ps(r, _mm256_loadu_ps(lpe + s)));
}

SEQFAST_TARGET_AVX2 static void beta_row_avx2(float* bx, float* b, const float* next, const float* skip,
                                              const float* lpe, int64_t n) {
  int64_t s = 0;
  for (; s + 16 <= n; s += 16) {
    beta_vec(bx, b, next, skip, lpe, s);
    beta_vec(bx, b, next, skip, lpe, s + 8);
  }
  if (s < n) beta_vec(bx, b, next, skip, lpe, s);
}

// post[s] = exp(alpha[s] + bx[s] + nll), the state posteriors; returns their sum over the even (blank) states.
SEQFAST_TARGET_AVX2 static float posterior_row_avx2(float* post, const float* alpha, const float* bx, float nll,
                                                    int64_t n) {
  const __m256 even = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0));
  __m256 acc = _mm256_setzero_ps();
  const __m256 vnll = splat(nll);
  for (int64_t s = 0; s < n; s += 8) {
    const __m256 p = exp_any(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(alpha + s), _mm256_loadu_ps(bx + s)), vnll));
    _mm256_storeu_ps(post + s, p);
    acc = _mm256_add_ps(acc, _mm256_and_ps(p, even));
  }
  return hsum(acc);
}

// Eight gathered log-probs row[lab[0..7]] as floats, exactly (Row: float, c10::Half or c10::BFloat16). Scalar
// loads rather than vgatherdps, which some CPUs run in microcode.
template <typename Row>
SEQFAST_TARGET_AVX2_F16C static inline __attribute__((always_inline)) __m256 gather8(const Row* row,
                                                                                    const int32_t* lab) {
  if constexpr (std::is_same_v<Row, float>) {
    return _mm256_setr_ps(row[lab[0]], row[lab[1]], row[lab[2]], row[lab[3]], row[lab[4]], row[lab[5]], row[lab[6]],
                          row[lab[7]]);
  } else {
    const __m128i h = _mm_setr_epi16(
        static_cast<short>(row[lab[0]].x), static_cast<short>(row[lab[1]].x), static_cast<short>(row[lab[2]].x),
        static_cast<short>(row[lab[3]].x), static_cast<short>(row[lab[4]].x), static_cast<short>(row[lab[5]].x),
        static_cast<short>(row[lab[6]].x), static_cast<short>(row[lab[7]].x));
    return widen8_avx2(h, row);
  }
}

// One value as a float, exactly; float16 through F16C (c10's own conversion is done in software).
template <typename Row>
SEQFAST_TARGET_AVX2_F16C static inline float widen1(Row v) {
  if constexpr (std::is_same_v<Row, c10::Half>) {
    return _cvtsh_ss(v.x);
  } else {
    return static_cast<float>(v);
  }
}

// Eight consecutive values from p as floats, exactly.
template <typename Row>
SEQFAST_TARGET_AVX2_F16C static inline __attribute__((always_inline)) __m256 load8_row(const Row* p) {
  if constexpr (std::is_same_v<Row, float>) {
    return _mm256_loadu_ps(p);
  } else {
    return load8_avx2(p);
  }
}

// exp_rows_avx2's loop. Most entries of a gradient row lie where exp_any's range handling (clamp, flush, overflow:
// six operations of its ~22) changes nothing, |x| <= -kExpLo: there exp_core gives exp_any's bits, so a block of 16
// checks that first (four operations; NaN fails it). Off / G: whether `off` / `g` are other than 0 / 1 (x - 0 and
// 1 * y are x and y, bit for bit, NaNs and signed zeros included), so that the common log_probs / 'sum' rows skip
// the subtract / multiply. Measured: NOTES, "CTC gradient rows: the exp's fast path".
template <bool Off, bool G, typename Row>
SEQFAST_TARGET_AVX2_F16C static void exp_rows_impl(float* out, const Row* in, float off, float g, int64_t n) {
  const __m256 voff = splat(off), vg = splat(g);
  const __m256 sign = splat(-0.0f), lim = splat(-kExpLo);
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    // Long rows read once: prefetch 4 KiB ahead (the stream prefetcher restarts at every page); past the row's
    // end this reaches into the next row, which the callers read next. With float rows the output is the
    // gradient itself (16-bit rows go through a buffer in L1): its line as far ahead, for writing (its read
    // for ownership then overlaps the work).
    _mm_prefetch(reinterpret_cast<const char*>(in + c + 4096 / sizeof(Row)), _MM_HINT_T0);
    if constexpr (std::is_same_v<Row, float>) prefetch_line_write(out + c + 1024);
    __m256 x0 = load8_row(in + c), x1 = load8_row(in + c + 8);
    if constexpr (Off) {
      x0 = _mm256_sub_ps(x0, voff);
      x1 = _mm256_sub_ps(x1, voff);
    }
    const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, x0), lim, _CMP_LE_OQ),
                                    _mm256_cmp_ps(_mm256_andnot_ps(sign, x1), lim, _CMP_LE_OQ));
    __m256 e0, e1;
    if (__builtin_expect(_mm256_testc_ps(ok, all), 1)) {
      e0 = exp_core(x0);
      e1 = exp_core(x1);
    } else {
      e0 = exp_any(x0);
      e1 = exp_any(x1);
    }
    if constexpr (G) {
      e0 = _mm256_mul_ps(vg, e0);
      e1 = _mm256_mul_ps(vg, e1);
    }
    _mm256_storeu_ps(out + c, e0);
    _mm256_storeu_ps(out + c + 8, e1);
  }
  for (; c < n; c += 8) {
    const __m256i mask = tail_mask(n - c);
    __m256 x;
    if constexpr (std::is_same_v<Row, float>) {
      x = _mm256_maskload_ps(in + c, mask);
    } else {
      alignas(32) float tail[8] = {};
      for (int64_t i = 0; i < std::min<int64_t>(8, n - c); ++i) tail[i] = widen1(in[c + i]);
      x = _mm256_load_ps(tail);
    }
    _mm256_maskstore_ps(out + c, mask, _mm256_mul_ps(vg, exp_any(_mm256_sub_ps(x, voff))));
  }
}

// Calls body(std::bool_constant<Off>{}, std::bool_constant<G>{}) with Off / G saying whether the exp rows' `off` /
// `g` are other than +0 / 1: the template flags of exp_rows_impl and exp_row_avx512_impl, chosen once here.
template <typename Body>
inline void with_row_identities(float off, float g, const Body& body) {
  const bool has_off = !(off == 0.0f && !std::signbit(off));  // x - (-0) is +0 for x = -0
  if (has_off) {
    if (g == 1.0f) return body(std::true_type{}, std::false_type{});
    return body(std::true_type{}, std::true_type{});
  }
  if (g == 1.0f) return body(std::false_type{}, std::false_type{});
  body(std::false_type{}, std::true_type{});
}

// out[c] = g * exp(float(in[c]) - off) for any n (masked tail); Row: float (out may alias in), or c10::Half /
// c10::BFloat16 (widened on the fly, the same bits as widening first).
template <typename Row>
SEQFAST_TARGET_AVX2_F16C static void exp_rows_avx2(float* out, const Row* in, float off, float g, int64_t n) {
  with_row_identities(off, g, [&](auto has_off, auto has_g) {
    exp_rows_impl<decltype(has_off)::value, decltype(has_g)::value>(out, in, off, g, n);
  });
}

// The float32 row (no F16C instruction is used for it).
static void exp_row_avx2(float* out, const float* in, float off, float g, int64_t n) {
  exp_rows_avx2(out, in, off, g, n);
}

// log(sum(exp(in[c]))) for any n >= 1: the log-softmax normaliser of one row of logits.
SEQFAST_TARGET_AVX2 static float logsumexp_row_avx2(const float* in, int64_t n) {
  const __m256 neg_inf = splat(-std::numeric_limits<float>::infinity());
  __m256 vm = neg_inf;
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(in + c));
  if (c < n) {
    const __m256i mask = tail_mask(n - c);
    vm = _mm256_max_ps(vm, _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(in + c, mask), _mm256_castsi256_ps(mask)));
  }
  const float m = hmax(vm);
  // All -inf, or a +inf / NaN logit: log_softmax is NaN on the whole row (torch: -inf + inf, inf - inf), and so
  // is every emission taken from it with a NaN normaliser. A NaN the max missed makes the sum below NaN.
  if (!(m > -std::numeric_limits<float>::infinity() && m < std::numeric_limits<float>::infinity())) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  const __m256 vmax = splat(m);
  __m256 acc = _mm256_setzero_ps();
  for (c = 0; c + 8 <= n; c += 8) acc = _mm256_add_ps(acc, exp_any(_mm256_sub_ps(_mm256_loadu_ps(in + c), vmax)));
  if (c < n) {
    const __m256i mask = tail_mask(n - c);
    acc = _mm256_add_ps(acc, _mm256_and_ps(exp_any(_mm256_sub_ps(_mm256_maskload_ps(in + c, mask), vmax)),
                                           _mm256_castsi256_ps(mask)));
  }
  return m + std::log(hsum(acc));
}


// ---------------------------------------------------------------------------------------------------
// Extended-range linear arithmetic for the recursions. A probability is held as m * 2^e, m a float in
// [1, 2) (0 for probability 0) and e an int32: the log-space recursion's range without its transcendental
// functions. Adding three such numbers aligns them on the largest exponent (a multiply by an exact power
// of two, built from integer bits) and renormalises; multiplying by an emission adds exponents. A term
// more than 2^126 below the largest is dropped, as log-space float32 drops anything below 2^-24 of it.
// Exponents below kLiveE count as 0 (probabilities under 2^-536870912: no real alignment is that unlikely).

constexpr int32_t kZeroE = -(1 << 30);
constexpr int32_t kLiveE = -(1 << 29);
constexpr int32_t kNoSkipE = -(1 << 29);  // added to e[s-2] where the skip is not allowed (m is masked too)
constexpr float kEmitLo = -8.0e7f;  // emissions below e^kEmitLo count as 0 (keeps exponents in int32)

SEQFAST_AVX2_INLINE __m256i loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
SEQFAST_AVX2_INLINE void storei(int32_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

// An emission's log x (natural) -> m 2^e with m in [0.7, 1.42], or (0, 0) for probability 0. NaN counts as
// probability 0 here (renormalise would turn a NaN into a finite number), +inf as e^-kEmitLo; what either does to the
// loss is decided per sample afterwards (ctc_loss.cpp, poison_reaches_end), for which the forward sums the inputs
// into poison[0, 8) lane-wise: a NaN or +inf input leaves a NaN or +inf there (-inf plus +inf is NaN), -inf and
// finite inputs do not (barring a finite overflow, a harmless false alarm).
SEQFAST_AVX2_INLINE void emission_vec(__m256 x, __m256* m, __m256i* e) {
  const __m256 dead = _mm256_cmp_ps(x, splat(kEmitLo), _CMP_NGT_UQ);  // x <= kEmitLo, or NaN
  __m256 nf;
  const __m256 r = exp_reduced(_mm256_min_ps(splat(-kEmitLo), _mm256_max_ps(splat(kEmitLo), x)), &nf);
  *m = _mm256_andnot_ps(dead, r);
  *e = _mm256_andnot_si256(_mm256_castps_si256(dead), _mm256_cvtps_epi32(nf));
}

// States 2k .. 2k+15 (those below hi) from labels k .. k+7 (m, e: their emissions, 0 where dead) and the blank's
// (bm, be, kept where blank_live): [b, m0, b, m1 | b, m4, b, m5] and [b, m2, b, m3 | b, m6, b, m7] -> in order.
SEQFAST_AVX2_INLINE void store_label_states(float* em, int32_t* ee, int64_t k, int64_t hi, __m256 m, __m256 e,
                                            __m256 bm, __m256 be, __m256 blank_live) {
  const __m256 bmk = _mm256_and_ps(bm, blank_live), bek = _mm256_and_ps(be, blank_live);
  const __m256 mlo = _mm256_unpacklo_ps(bmk, m), mhi = _mm256_unpackhi_ps(bmk, m);
  const __m256 elo = _mm256_unpacklo_ps(bek, e), ehi = _mm256_unpackhi_ps(bek, e);
  _mm256_storeu_ps(em + 2 * k, _mm256_permute2f128_ps(mlo, mhi, 0x20));
  storei(ee + 2 * k, _mm256_castps_si256(_mm256_permute2f128_ps(elo, ehi, 0x20)));
  if (2 * k + 8 < hi) {
    _mm256_storeu_ps(em + 2 * k + 8, _mm256_permute2f128_ps(mlo, mhi, 0x31));
    storei(ee + 2 * k + 8, _mm256_castps_si256(_mm256_permute2f128_ps(elo, ehi, 0x31)));
  }
}

// Frame emissions straight from the log_probs row, for states [lo, hi) of the extended target (blank, l0, blank,
// l1, ..., blank): em[s] 2^ee[s] = emission_vec(lp[ext[s]] - lse), (0, 0) past state 2L. One exp per label plus one
// for the blank (not one per state), interleaved in registers, and no row of
// gathered log-probs in between. lab: the labels as int32, readable (any valid class) up to hi / 2 + 8; lo, hi
// multiples of 8. With Sum (forward), poison[0, 8) also accumulates the blank's and every label's log-prob (all
// L, whatever the range), for emission_vec's NaN / +inf check.
template <bool Sum, typename Row>
SEQFAST_TARGET_AVX2_F16C static void emission_gather_avx2(float* em, int32_t* ee, float* poison, const Row* row,
                                                          const int32_t* lab, int64_t L, float lse, int64_t blank,
                                                          int64_t lo, int64_t hi) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 vlse = splat(lse);
  const __m256 bx = _mm256_sub_ps(splat(widen1(row[blank])), vlse);
  __m256 bm;
  __m256i be;
  emission_vec(bx, &bm, &be);
  __m256 acc = _mm256_setzero_ps();
  if constexpr (Sum) acc = _mm256_add_ps(_mm256_loadu_ps(poison), bx);
  int64_t k = lo / 2;
  for (; 2 * k < hi; k += 8) {
    // Label lanes k + i < L are live; blank lanes (state 2 (k + i)) while k + i <= L.
    const __m256i left = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(L - k, 9)));
    const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(left, iota));
    const __m256i blank_live = _mm256_cmpgt_epi32(_mm256_add_epi32(left, _mm256_set1_epi32(1)), iota);
    const __m256 x = _mm256_blendv_ps(splat(-std::numeric_limits<float>::infinity()),
                                      _mm256_sub_ps(gather8(row, lab + k), vlse), live);
    if constexpr (Sum) acc = _mm256_add_ps(acc, _mm256_and_ps(x, live));
    __m256 m;
    __m256i e;
    emission_vec(x, &m, &e);
    store_label_states(em, ee, k, hi, m, _mm256_castsi256_ps(e), bm, _mm256_castsi256_ps(be),
                       _mm256_castsi256_ps(blank_live));
  }
  if constexpr (Sum) {
    for (; k < L; k += 8) {  // labels of states not reached yet: still checked
      const __m256i left = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(L - k, 8)));
      const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(left, iota));
      acc = _mm256_add_ps(acc, _mm256_and_ps(_mm256_sub_ps(gather8(row, lab + k), vlse), live));
    }
    _mm256_storeu_ps(poison, acc);
  }
}

// v * 2^(Eb + 127) (v >= 0, finite) -> normalised (m, e); 0 and exponents below kLiveE become (0, kZeroE).
SEQFAST_AVX2_INLINE void renormalise(__m256 v, __m256i Eb, __m256* m_out, __m256i* e_out) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i e = _mm256_add_epi32(Eb, _mm256_srli_epi32(bits, 23));  // Eb: the exponent minus the float bias
  const __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
  const __m256i zero = _mm256_or_si256(_mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_EQ_OQ)),
                                       _mm256_cmpgt_epi32(_mm256_set1_epi32(kLiveE), e));
  *m_out = _mm256_andnot_ps(_mm256_castsi256_ps(zero), m);
  *e_out = _mm256_blendv_epi8(e, _mm256_set1_epi32(kZeroE), zero);
}

// 2^(e - E) for e <= E as a float, 0 when e - E < -126 (no subnormals); Eb = E - 127, the float bias taken off
// once for the three terms and the renormalisation after them.
SEQFAST_AVX2_INLINE __m256 pow2_diff(__m256i e, __m256i Eb) {
  const __m256i biased = _mm256_max_epi32(_mm256_sub_epi32(e, Eb), _mm256_setzero_si256());
  return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
}

// (ma 2^ea + mb 2^eb + mc 2^ec) = sum * 2^E, sum in [0, 6); *Eb = E - 127.
SEQFAST_AVX2_INLINE __m256 add3(__m256 ma, __m256i ea, __m256 mb, __m256i eb, __m256 mc, __m256i ec, __m256i* Eb) {
  *Eb = _mm256_sub_epi32(_mm256_max_epi32(_mm256_max_epi32(ea, eb), ec), _mm256_set1_epi32(127));
  __m256 sum = _mm256_mul_ps(ma, pow2_diff(ea, *Eb));
  sum = _mm256_fmadd_ps(mb, pow2_diff(eb, *Eb), sum);
  return _mm256_fmadd_ps(mc, pow2_diff(ec, *Eb), sum);
}


// ln m for a normalised mantissa m in [1, 2), by table: the top 4 mantissa bits pick c, the middle of m's 1/16
// bucket, and ln m = ln c + ln(1 + r), r = (m - c) / c in [-1/33, 1/33] (m - c is exact), with a degree-4
// polynomial. Absolute error < 6e-8 (the table entries' own rounding, mostly): all a log_alpha entry needs, since
// backward uses it as exp(entry + ...), and fewer operations than log_normal (this log is taken once per state).
alignas(32) inline constexpr float kLogInvC[16] = {
    0x1.f07c2p-1f, 0x1.d41d42p-1f, 0x1.bacf92p-1f, 0x1.a41a42p-1f, 0x1.8f9c18p-1f, 0x1.7d05f4p-1f,
    0x1.6c16c2p-1f, 0x1.5c9882p-1f, 0x1.4e5e0ap-1f, 0x1.414142p-1f, 0x1.3521dp-1f,  0x1.29e412p-1f,
    0x1.1f7048p-1f, 0x1.15b1e6p-1f, 0x1.0c9714p-1f, 0x1.041042p-1f};  // 1 / c, c = 1 + (2j + 1) / 32
alignas(32) inline constexpr float kLogC[16] = {
    0x1.f829bp-6f,  0x1.6f0d28p-4f, 0x1.29553p-3f,  0x1.9525aap-3f, 0x1.fb9186p-3f, 0x1.2e8e2cp-2f,
    0x1.5d1bdcp-2f, 0x1.89a338p-2f, 0x1.b44f78p-2f, 0x1.dd46ap-2f,  0x1.02552ap-1f, 0x1.154c3ep-1f,
    0x1.2795e2p-1f, 0x1.393e0ep-1f, 0x1.4a4f86p-1f, 0x1.5ad404p-1f};  // ln c
constexpr int32_t kLogBucketMask = static_cast<int32_t>(0xfff80000u);  // sign, exponent, top 4 mantissa bits
constexpr int32_t kLogBucketMid = 0x00040000;                         // + half a bucket

// One 8-entry half of a 16-entry table each, picked by bit 3 of j.
SEQFAST_AVX2_INLINE __m256 lookup16(const float* table, __m256i j) {
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_load_ps(table), j);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_load_ps(table + 8), j);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(j, _mm256_set1_epi32(7))));
}

SEQFAST_AVX2_INLINE __m256 log_mantissa(__m256 m) {
  const __m256i bits = _mm256_castps_si256(m);
  const __m256i j = _mm256_and_si256(_mm256_srli_epi32(bits, 19), _mm256_set1_epi32(15));
  const __m256 c = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(kLogBucketMask)), _mm256_set1_epi32(kLogBucketMid)));
  const __m256 r = _mm256_mul_ps(_mm256_sub_ps(m, c), lookup16(kLogInvC, j));
  __m256 p = _mm256_fmadd_ps(splat(-0.25f), r, splat(0x1.555556p-2f));
  p = _mm256_fmadd_ps(p, r, splat(-0.5f));
  p = _mm256_fmadd_ps(p, r, splat(1.0f));
  return _mm256_fmadd_ps(p, r, lookup16(kLogC, j));
}

// ln(m 2^e) in float32; -inf for m = 0.
SEQFAST_AVX2_INLINE __m256 ext_log(__m256 m, __m256i e) {
  const __m256 is_zero = _mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_EQ_OQ);
  const __m256 safe = _mm256_blendv_ps(m, splat(1.0f), is_zero);
  const __m256 r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(e), splat(0.693147180559945309f), log_mantissa(safe));
  return _mm256_blendv_ps(r, splat(-std::numeric_limits<float>::infinity()), is_zero);
}

// Forward step in extended form: alpha_t[s] = (a[s] + a[s-1] + skip[s] a[s-2]) * emission[s]; with Log also
// writes ln alpha_t (the log_alpha row). m_prev / e_prev readable at [-2, -1] (zeros).
template <bool Log>
SEQFAST_AVX2_INLINE void alpha_ext_steps(float* m_out, int32_t* e_out, float* log_out, const float* m_prev,
                                         const int32_t* e_prev, const float* skip_m, const int32_t* skip_e,
                                         const float* em, const int32_t* ee, int64_t n) {
  for (int64_t s = 0; s < n; s += 8) {
    __m256i Eb;
    const __m256 skipped = _mm256_and_ps(_mm256_loadu_ps(m_prev + s - 2), _mm256_loadu_ps(skip_m + s));
    const __m256 sum = add3(_mm256_loadu_ps(m_prev + s), loadi(e_prev + s), _mm256_loadu_ps(m_prev + s - 1),
                            loadi(e_prev + s - 1), skipped, _mm256_add_epi32(loadi(e_prev + s - 2), loadi(skip_e + s)),
                            &Eb);
    __m256 m;
    __m256i e;
    renormalise(_mm256_mul_ps(sum, _mm256_loadu_ps(em + s)), _mm256_add_epi32(Eb, loadi(ee + s)), &m, &e);
    _mm256_storeu_ps(m_out + s, m);
    storei(e_out + s, e);
    if constexpr (Log) _mm256_storeu_ps(log_out + s, ext_log(m, e));
  }
}

// alpha_ext_steps; log_out == nullptr: the row's logs are not wanted (a forward without gradient, or with
// checkpoints), and no log is taken. Two loops rather than a test per vector: the test's loop kept too few
// registers for its constants, which it then rebuilt on every vector.
SEQFAST_TARGET_AVX2 static void alpha_ext_row_avx2(float* m_out, int32_t* e_out, float* log_out, const float* m_prev,
                                                   const int32_t* e_prev, const float* skip_m, const int32_t* skip_e,
                                                   const float* em, const int32_t* ee, int64_t n) {
  if (log_out != nullptr) {
    alpha_ext_steps<true>(m_out, e_out, log_out, m_prev, e_prev, skip_m, skip_e, em, ee, n);
  } else {
    alpha_ext_steps<false>(m_out, e_out, log_out, m_prev, e_prev, skip_m, skip_e, em, ee, n);
  }
}

// bx at states s..s+7: next[s] + next[s+1] + skip[s] next[s+2], renormalised.
SEQFAST_AVX2_INLINE void beta_bx(const float* nm, const int32_t* ne, const float* skip_m, const int32_t* skip_e,
                                 int64_t s, __m256* m, __m256i* e) {
  __m256i Eb;
  const __m256 sum = add3(_mm256_loadu_ps(nm + s), loadi(ne + s), _mm256_loadu_ps(nm + s + 1), loadi(ne + s + 1),
                          _mm256_and_ps(_mm256_loadu_ps(nm + s + 2), _mm256_loadu_ps(skip_m + s)),
                          _mm256_add_epi32(loadi(ne + s + 2), loadi(skip_e + s)), &Eb);
  renormalise(sum, Eb, m, e);
}

// b = bx * emission at states s..s+7, stored unnormalised (m in [0.7, 2.84)): add3 takes that as well, and the sum
// it feeds is renormalised. Only a zero needs its exponent at kZeroE, so that it cannot set the next alignment.
SEQFAST_AVX2_INLINE void store_b(float* bm, int32_t* be, const float* em, const int32_t* ee, int64_t s, __m256 m,
                                 __m256i e) {
  m = _mm256_mul_ps(m, _mm256_loadu_ps(em + s));
  e = _mm256_blendv_epi8(_mm256_add_epi32(e, loadi(ee + s)), _mm256_set1_epi32(kZeroE),
                         _mm256_castps_si256(_mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_EQ_OQ)));
  _mm256_storeu_ps(bm + s, m);
  storei(be + s, e);
}

// Backward step: bx[s] = b[s] + b[s+1] + skip[s] b[s+2] (beta without frame t's emission), then
// b_t[s] = bx[s] * emission[s] (mantissa not normalised). next arrays readable at [n, n+1] (zeros).
SEQFAST_TARGET_AVX2 static void beta_ext_row_avx2(float* bxm, int32_t* bxe, float* bm, int32_t* be, const float* nm,
                                                  const int32_t* ne, const float* skip_m, const int32_t* skip_e,
                                                  const float* em, const int32_t* ee, int64_t n) {
  for (int64_t s = 0; s < n; s += 8) {
    __m256 m;
    __m256i e;
    beta_bx(nm, ne, skip_m, skip_e, s, &m, &e);
    _mm256_storeu_ps(bxm + s, m);
    storei(bxe + s, e);
    store_b(bm, be, em, ee, s, m, e);
  }
}

// post[s] = exp(log_alpha[s] + nll) * bx[s], the state posteriors; returns their sum over the even states.
SEQFAST_TARGET_AVX2 static float posterior_ext_row_avx2(float* post, const float* alpha, const float* bxm,
                                                        const int32_t* bxe, float nll, int64_t n) {
  const __m256 even = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0));
  __m256 acc = _mm256_setzero_ps();
  const __m256 vnll = splat(nll);
  for (int64_t s = 0; s < n; s += 8) {
    const __m256 x = _mm256_fmadd_ps(_mm256_cvtepi32_ps(loadi(bxe + s)), splat(0.693147180559945309f),
                                     _mm256_add_ps(_mm256_loadu_ps(alpha + s), vnll));
    const __m256 p = _mm256_mul_ps(exp_any(x), _mm256_loadu_ps(bxm + s));
    _mm256_storeu_ps(post + s, p);
    acc = _mm256_add_ps(acc, _mm256_and_ps(p, even));
  }
  return hsum(acc);
}

// post[s] = am[s] bxm[s] 2^(ae[s] + bxe[s]) * nm 2^ne, the state posteriors alpha * beta / P(target) straight from
// extended numbers (exp(nll) = nm 2^ne, nm in [1, 2]): no exp per state. Posteriors below 2^-126 become 0 (as
// exp_any flushes below e^-87); a zero alpha or beta has m = 0, so its (clamped) exponent does not matter.
// Returns the sum over the even (blank) states.
SEQFAST_AVX2_INLINE __m256 posterior_lin_vec(__m256 am, __m256i ae, __m256 bm, __m256i be, __m256 vnm, __m256i vne) {
  // ae + be >= 2 kZeroE = INT32_MIN; clamping to kZeroE before adding ne keeps the sum from wrapping.
  const __m256i E = _mm256_add_epi32(_mm256_max_epi32(_mm256_add_epi32(ae, be), _mm256_set1_epi32(kZeroE)), vne);
  const __m256i biased = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(E, _mm256_set1_epi32(127)),
                                                           _mm256_setzero_si256()), _mm256_set1_epi32(254));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(am, bm), vnm), _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
}

SEQFAST_TARGET_AVX2 static float posterior_lin_row_avx2(float* post, const float* am, const int32_t* ae,
                                                        const float* bxm, const int32_t* bxe, float nm, int32_t ne,
                                                        int64_t n) {
  const __m256 even = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0));
  __m256 acc = _mm256_setzero_ps();
  const __m256 vnm = splat(nm);
  const __m256i vne = _mm256_set1_epi32(ne);
  for (int64_t s = 0; s < n; s += 8) {
    const __m256 p = posterior_lin_vec(_mm256_loadu_ps(am + s), loadi(ae + s), _mm256_loadu_ps(bxm + s),
                                       loadi(bxe + s), vnm, vne);
    _mm256_storeu_ps(post + s, p);
    acc = _mm256_add_ps(acc, _mm256_and_ps(p, even));
  }
  return hsum(acc);
}

// beta_ext_row_avx2 and posterior_lin_row_avx2 in one pass (checkpoints): bx stays in registers, where the two
// passes store it and read it back. post[s] = alpha[s] bx[s] / P(target) from (am, ae) and exp(nll) = nm 2^ne;
// b as beta_ext_row_avx2 writes it; returns the posteriors' sum over the even states. The same bits as the two.
SEQFAST_TARGET_AVX2 static float beta_post_row_avx2(float* bm, int32_t* be, float* post, const float* nm,
                                                    const int32_t* ne, const float* skip_m, const int32_t* skip_e,
                                                    const float* em, const int32_t* ee, const float* am,
                                                    const int32_t* ae, float exp_nll_m, int32_t exp_nll_e, int64_t n) {
  const __m256 even = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0));
  const __m256 vnm = splat(exp_nll_m);
  const __m256i vne = _mm256_set1_epi32(exp_nll_e);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t s = 0; s < n; s += 8) {
    __m256 m;
    __m256i e;
    beta_bx(nm, ne, skip_m, skip_e, s, &m, &e);
    const __m256 p = posterior_lin_vec(_mm256_loadu_ps(am + s), loadi(ae + s), m, e, vnm, vne);
    _mm256_storeu_ps(post + s, p);
    acc = _mm256_add_ps(acc, _mm256_and_ps(p, even));
    store_b(bm, be, em, ee, s, m, e);
  }
  return hsum(acc);
}

// label_corrections_avx512 (ctc_loss_simd512.h) in 8 lanes, for the same LabelGroups blocks of 16 taken as two
// halves: lane j's group sums its posteriors c[idx[m * 16 + j]], m < count[j], in position order, and
// row[label[j]] -= g * sum. AVX2 gathers but cannot scatter: the products go to the row by scalar stores. The
// scalar loop's operations per group, so the same bits.
SEQFAST_TARGET_AVX2 static void label_corrections_avx2(float* row, const float* c, float g, const int32_t* label,
                                                       const int32_t* count, const int32_t* idx, const int32_t* rows,
                                                       int64_t blocks) {
  const __m256 vg = splat(g), zero = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, label += 16, count += 16) {
    for (int h = 0; h < 16; h += 8) {
      const __m256i n = loadi(count + h);
      const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, _mm256_setzero_si256()));
      if (_mm256_testz_ps(live, live)) break;  // the groups fill the lanes in order: none further in this block
      __m256 sum = _mm256_mask_i32gather_ps(zero, c, loadi(idx + h), live, 4);
      for (int32_t m = 1; m < rows[b]; ++m) {
        const __m256 more = _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, _mm256_set1_epi32(m)));
        if (_mm256_testz_ps(more, more)) break;
        const __m256 next = _mm256_mask_i32gather_ps(zero, c, loadi(idx + 16 * m + h), more, 4);
        sum = _mm256_blendv_ps(sum, _mm256_add_ps(sum, next), more);
      }
      __m256 p = _mm256_mul_ps(vg, sum);
      asm("" : "+x"(p));  // rounded before the subtraction, as the scalar loop
      alignas(32) float prod[8];
      _mm256_store_ps(prod, p);
      for (int j = 0; j < 8 && count[h + j] > 0; ++j) row[label[h + j]] -= prod[j];
    }
    idx += 16 * static_cast<int64_t>(rows[b]);
  }
}

// out[k] = post[2k + 1] for k < L, eight a step (odd_entries_avx512 in 8 lanes). post readable up to 2L.
SEQFAST_TARGET_AVX2 static void odd_entries_avx2(float* out, const float* post, int64_t L) {
  int64_t k = 0;
  for (; k + 8 <= L; k += 8) {
    // [a1 a3 b1 b3 | a5 a7 b5 b7], then its 64-bit pairs in the order 0 2 1 3.
    const __m256 odd = _mm256_shuffle_ps(_mm256_loadu_ps(post + 2 * k), _mm256_loadu_ps(post + 2 * k + 8),
                                         _MM_SHUFFLE(3, 1, 3, 1));
    _mm256_storeu_ps(out + k, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(odd), _MM_SHUFFLE(3, 1, 2, 0))));
  }
  for (; k < L; ++k) out[k] = post[2 * k + 1];
}

#undef SEQFAST_AVX2_INLINE

}  // namespace seqfast::ctc_simd

#endif  // SEQFAST_X86
