// Rows of float16 / bfloat16 to and from float32 (the compute type of every 16-bit CPU kernel), eight lanes at a
// time on AVX2 + F16C, with the rounding c10 uses (round to nearest even; a bfloat16 NaN becomes 0x7FC0); scalar
// tails, strided rows and other CPUs go through the c10 conversions themselves, so results do not depend on the path.
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

template <typename S>
SEQFAST_TARGET_AVX2_F16C inline void store_row_avx2(const float* src, float mul, int64_t n, S* dst) {
  const __m256 vm = _mm256_set1_ps(mul);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) store8_avx2(dst + c, _mm256_mul_ps(_mm256_loadu_ps(src + c), vm));
  for (; c < n; ++c) dst[c] = static_cast<S>(src[c] * mul);
}
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
  for (int64_t c = 0; c < n; ++c) dst[c] = cast_to<T>(src[c * stride]);
}

// dst[c * stride] = src[c] * mul for c < n, rounded to the storage dtype.
template <typename S, typename T>
inline void store_row(const T* src, T mul, int64_t n, S* dst, int64_t stride) {
#if SEQFAST_X86
  if constexpr (kIsHalfType<S> && std::is_same_v<T, float>) {
    if (stride == 1 && has_avx2()) return store_row_avx2(src, mul, n, dst);
  }
#endif
  for (int64_t c = 0; c < n; ++c) dst[c * stride] = cast_to<S>(src[c] * mul);
}

}  // namespace seqfast
