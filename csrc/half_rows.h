// Rows of float16 / bfloat16 to and from float32 (the compute type of every 16-bit CPU kernel), eight lanes at a
// time on AVX2 + F16C (stores sixteen on AVX-512), with the rounding c10 uses (round to nearest even; a bfloat16
// NaN becomes 0x7FC0); scalar tails, strided rows and other CPUs go through the c10 conversions themselves, so
// results do not depend on the path (tests/test_half_rows.py holds the ties to torch's on every ISA).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cpu_features.h"

#if SEQFAST_X86
#include <immintrin.h>
#endif

namespace seqfast {

template <typename To, typename From>
inline To cast_to(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else {
    return static_cast<To>(static_cast<float>(v));
  }
}

#if SEQFAST_X86
// Eight 16-bit values (their bits in h) as floats, exactly; the pointer only picks the type.
SEQFAST_TARGET_AVX2_F16C inline __m256 widen8_avx2(__m128i h, const c10::Half*) { return _mm256_cvtph_ps(h); }
SEQFAST_TARGET_AVX2_F16C inline __m256 widen8_avx2(__m128i h, const c10::BFloat16*) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // a bfloat16 is a float's top half
}
template <typename S>
SEQFAST_TARGET_AVX2_F16C inline __m256 load8_avx2(const S* p) {
  return widen8_avx2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), p);
}
SEQFAST_TARGET_AVX2_F16C inline void store8_avx2(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
SEQFAST_TARGET_AVX2_F16C inline void store8_avx2(c10::Half* p, __m256 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}
SEQFAST_TARGET_AVX2_F16C inline void store8_avx2(c10::BFloat16* p, __m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

template <typename S>
SEQFAST_TARGET_AVX2_F16C inline void load_row_avx2(const S* src, int64_t n, float* dst) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) _mm256_storeu_ps(dst + c, load8_avx2(src + c));
  for (; c < n; ++c) dst[c] = static_cast<float>(src[c]);
}

// load_row_avx2 over rows src + r * ss -> dst + r * ds, r < rows, in one target function (the per-row dispatch and
// call cost as much as a short row's conversion); asks for the row 4 ahead, as the callers' row loops do.
template <typename S>
SEQFAST_TARGET_AVX2_F16C inline void load_rows_avx2(const S* src, int64_t ss, int64_t rows, int64_t n, float* dst,
                                                    int64_t ds) {
  for (int64_t r = 0; r < rows; ++r) {
    if (r + 4 < rows) {
      for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(S)); off += 64) {
        prefetch_line(reinterpret_cast<const char*>(src + (r + 4) * ss) + off);
      }
    }
    load_row_avx2(src + r * ss, n, dst + r * ds);
  }
}

template <typename S>
SEQFAST_TARGET_AVX2_F16C inline void store_row_avx2(const float* src, float mul, int64_t n, S* dst) {
  const __m256 vm = _mm256_set1_ps(mul);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) store8_avx2(dst + c, _mm256_mul_ps(_mm256_loadu_ps(src + c), vm));
  for (; c < n; ++c) dst[c] = static_cast<S>(src[c] * mul);
}

// GCC 12 reports its own AVX-512 intrinsics' deliberately undefined vectors as maybe uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// store_row_avx2 sixteen lanes at a time, the same bits: F16C's conversion and AVX-512's are one instruction
// with one rounding, and the bfloat16 rounding is the same integer arithmetic.
SEQFAST_TARGET_AVX512 inline void store16_avx512(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
SEQFAST_TARGET_AVX512 inline void store16_avx512(c10::Half* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}
SEQFAST_TARGET_AVX512 inline void store16_avx512(c10::BFloat16* p, __m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));  // each lane fits 16 bits
}

template <typename S>
SEQFAST_TARGET_AVX512 inline void store_row_avx512(const float* src, float mul, int64_t n, S* dst) {
  const __m512 vm = _mm512_set1_ps(mul);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) store16_avx512(dst + c, _mm512_mul_ps(_mm512_loadu_ps(src + c), vm));
  if (c < n) store_row_avx2(src + c, mul, n - c, dst + c);
}
#pragma GCC diagnostic pop
#endif  // SEQFAST_X86

template <typename S>
constexpr bool kIsHalfType = std::is_same_v<S, c10::Half> || std::is_same_v<S, c10::BFloat16>;

// dst[c] = src[c * stride] for c < n, in the compute type.
template <typename S, typename T>
inline void load_row(const S* src, int64_t stride, int64_t n, T* dst) {
#if SEQFAST_X86
  if constexpr (kIsHalfType<S> && std::is_same_v<T, float>) {
    if (stride == 1 && has_avx2()) return load_row_avx2(src, n, dst);
  }
#endif
  // An expanded row (dO of `.sum()`): one value, filled at vector speed instead of read n times.
  if (stride == 0) return std::fill(dst, dst + n, cast_to<T>(src[0]));
  for (int64_t c = 0; c < n; ++c) dst[c] = cast_to<T>(src[c * stride]);
}

// load_row over `rows` rows, src's ss elements apart and dst's ds apart; false (nothing done) unless the rows are
// 16-bit with unit column stride and the CPU has AVX2, where the caller's own row loop is the path.
template <typename S, typename T>
inline bool load_rows(const S* src, int64_t stride, int64_t ss, int64_t rows, int64_t n, T* dst, int64_t ds) {
#if SEQFAST_X86
  if constexpr (kIsHalfType<S> && std::is_same_v<T, float>) {
    if (stride == 1 && has_avx2()) {
      load_rows_avx2(src, ss, rows, n, dst, ds);
      return true;
    }
  }
#endif
  (void)src, (void)stride, (void)ss, (void)rows, (void)n, (void)dst, (void)ds;
  return false;
}

// dst[c * stride] = src[c] * mul for c < n, rounded to the storage dtype.
template <typename S, typename T>
inline void store_row(const T* src, T mul, int64_t n, S* dst, int64_t stride) {
#if SEQFAST_X86
  if constexpr ((kIsHalfType<S> || std::is_same_v<S, float>) && std::is_same_v<T, float>) {
    if (stride == 1 && has_avx512()) return store_row_avx512(src, mul, n, dst);
    if (stride == 1 && has_avx2()) return store_row_avx2(src, mul, n, dst);
  }
#endif
  for (int64_t c = 0; c < n; ++c) dst[c * stride] = cast_to<S>(src[c] * mul);
}

}  // namespace seqfast
