// AVX-512 versions (16 lanes) of the hot float32 row kernels of ctc_loss_simd.h, same contracts.
//
// Each lane goes through exactly the operations of the AVX2 version (same polynomials, same order, same
// roundings), so results are bit-identical to the AVX2 path; the one cross-lane sum (the blank posterior) is
// accumulated in the AVX2 order too. Rows whose length is a multiple of 8 but not of 16 end with a masked
// half vector. Compiled for AVX-512 only (SEQFAST_TARGET_AVX512): call after has_avx512() said yes.
#pragma once

#include "ctc_loss_simd.h"

#if SEQFAST_X86
#include <immintrin.h>

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() (a self-initialised variable), which its
// -Wmaybe-uninitialized reports at every use: a known false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace seqfast::ctc_simd {

#define SEQFAST_AVX512_INLINE SEQFAST_TARGET_AVX512 static inline __attribute__((always_inline))

SEQFAST_AVX512_INLINE __m512 splat16(float v) { return _mm512_set1_ps(v); }

// Lanes [0, rem) of a 16-lane vector (rem <= 16).
SEQFAST_AVX512_INLINE __mmask16 lanes(int64_t rem) {
  return rem >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << rem) - 1u);
}

SEQFAST_AVX512_INLINE __m512 exp_reduced16(__m512 x, __m512* n_out) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, splat16(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, splat16(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, splat16(-2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(splat16(1.9875691500e-4f), r, splat16(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, splat16(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, splat16(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, splat16(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, splat16(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  *n_out = n;
  return _mm512_add_ps(p, splat16(1.0f));
}

// p 2^n by vscalefps, one instruction for exp_core's four (convert, bias, shift, multiply) and the same bits: the
// product is exact either way, its result being a normal float over exp_core's range (vscalefps is slow only
// when it makes subnormals).
SEQFAST_AVX512_INLINE __m512 exp_core16(__m512 x) {
  __m512 n;
  const __m512 p = exp_reduced16(x, &n);
  return _mm512_scalef_ps(p, n);
}

// exp_any of ctc_loss_simd.h: 0 below kExpLo (and for -inf), +inf above kExpHi, NaN for NaN.
SEQFAST_AVX512_INLINE __m512 exp_any16(__m512 x) {
  const __m512 xc = _mm512_min_ps(splat16(kExpHi), _mm512_max_ps(splat16(kExpLo), x));
  const __m512 e = exp_core16(xc);
  const __mmask16 below = _mm512_cmp_ps_mask(x, splat16(kExpLo), _CMP_LT_OQ);
  const __mmask16 above = _mm512_cmp_ps_mask(x, splat16(kExpHi), _CMP_GT_OQ);
  return _mm512_mask_blend_ps(above, _mm512_maskz_mov_ps(static_cast<__mmask16>(~below), e),
                              splat16(std::numeric_limits<float>::infinity()));
}

SEQFAST_AVX512_INLINE __m512 log_normal16(__m512 x) {
  const __m512i xi = _mm512_castps_si512(x);
  __m512 e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(xi, 23), _mm512_set1_epi32(126)));
  __m512 m = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(xi, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f000000)));
  const __mmask16 small = _mm512_cmp_ps_mask(m, splat16(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm512_mask_sub_ps(e, small, e, splat16(1.0f));
  const __m512 z = _mm512_mask_add_ps(_mm512_sub_ps(m, splat16(1.0f)), small, _mm512_sub_ps(m, splat16(1.0f)), m);
  const __m512 z2 = _mm512_mul_ps(z, z);
  __m512 p = _mm512_fmadd_ps(splat16(7.0376836292e-2f), z, splat16(-1.1514610310e-1f));
  p = _mm512_fmadd_ps(p, z, splat16(1.1676998740e-1f));
  p = _mm512_fmadd_ps(p, z, splat16(-1.2420140846e-1f));
  p = _mm512_fmadd_ps(p, z, splat16(1.4249322787e-1f));
  p = _mm512_fmadd_ps(p, z, splat16(-1.6668057665e-1f));
  p = _mm512_fmadd_ps(p, z, splat16(2.0000714765e-1f));
  p = _mm512_fmadd_ps(p, z, splat16(-2.4999993993e-1f));
  p = _mm512_fmadd_ps(p, z, splat16(3.3333331174e-1f));
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, z), z2);
  y = _mm512_fmadd_ps(e, splat16(-2.12194440e-4f), y);
  y = _mm512_fnmadd_ps(z2, splat16(0.5f), y);
  return _mm512_fmadd_ps(e, splat16(0.693359375f), _mm512_add_ps(z, y));
}

constexpr int64_t kExpRowAhead = 1024;  // floats: 4 KiB (measured best of 1, 2, 4, 8 KiB)

// Sixteen consecutive values from p as floats, exactly (Row: float, c10::Half or c10::BFloat16); the masked form
// reads lanes k only (the others are 0).
template <typename Row>
SEQFAST_AVX512_INLINE __m512 load16_row(const Row* p) {
  if constexpr (std::is_same_v<Row, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<Row, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {  // a bfloat16 is a float's top half
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
}
template <typename Row>
SEQFAST_AVX512_INLINE __m512 load16_row(const Row* p, __mmask16 k) {
  if constexpr (std::is_same_v<Row, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else if constexpr (std::is_same_v<Row, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
  }
}

// exp_rows_impl of ctc_loss_simd.h, 16 lanes: blocks of 32 entries within |x| <= -kExpLo take exp_core16 alone
// (exp_any16's bits there); Off / G: whether off / g are other than +0 / 1, identities skipped bit for bit.
// Row: float, or c10::Half / c10::BFloat16 widened on the fly (exactly, so the same bits as widening first).
template <bool Off, bool G, typename Row>
SEQFAST_TARGET_AVX512 static void exp_row_avx512_impl(float* out, const Row* in, float off, float g, int64_t n) {
  const __m512 voff = splat16(off), vg = splat16(g), lim = splat16(-kExpLo);
  constexpr int64_t kAhead = kExpRowAhead * sizeof(float) / sizeof(Row);  // 4 KiB of input
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    // Rows are long (C floats) and read once: ask for them well ahead, the stream prefetcher restarts at every
    // 4 KiB page. Past the row's end this reaches into the next one, which the callers read next. The output's
    // lines as far ahead, for writing: their reads for ownership overlap the work instead of holding up the
    // stores (NOTES, "Gradient rows: the output's lines prefetched for writing"). A 16-bit row's output is a
    // buffer in L1 (the caller narrows it into the gradient), which needs no such prefetch.
    _mm_prefetch(reinterpret_cast<const char*>(in + c + kAhead), _MM_HINT_T0);
    if constexpr (std::is_same_v<Row, float>) {
      _mm_prefetch(reinterpret_cast<const char*>(in + c + kAhead + 16), _MM_HINT_T0);
      prefetch_line_write(out + c + kExpRowAhead);
      prefetch_line_write(out + c + kExpRowAhead + 16);
    }
    __m512 x0 = load16_row(in + c), x1 = load16_row(in + c + 16);
    if constexpr (Off) {
      x0 = _mm512_sub_ps(x0, voff);
      x1 = _mm512_sub_ps(x1, voff);
    }
    // NaN fails the compare (ordered), so such blocks take exp_any16.
    const __mmask16 ok0 = _mm512_cmp_ps_mask(_mm512_abs_ps(x0), lim, _CMP_LE_OQ);
    const __mmask16 ok1 = _mm512_cmp_ps_mask(_mm512_abs_ps(x1), lim, _CMP_LE_OQ);
    __m512 e0, e1;
    if (__builtin_expect((ok0 & ok1) == 0xffff, 1)) {
      e0 = exp_core16(x0);
      e1 = exp_core16(x1);
    } else {
      e0 = exp_any16(x0);
      e1 = exp_any16(x1);
    }
    if constexpr (G) {
      e0 = _mm512_mul_ps(vg, e0);
      e1 = _mm512_mul_ps(vg, e1);
    }
    _mm512_storeu_ps(out + c, e0);
    _mm512_storeu_ps(out + c + 16, e1);
  }
  for (; c < n; c += 16) {
    const __mmask16 k = lanes(n - c);
    __m512 x = load16_row(in + c, k);
    if constexpr (Off) x = _mm512_sub_ps(x, voff);
    __m512 e = exp_any16(x);
    if constexpr (G) e = _mm512_mul_ps(vg, e);
    _mm512_mask_storeu_ps(out + c, k, e);
  }
}

// out[c] = g * exp(float(in[c]) - off) for any n; Row: float (out may alias in), or c10::Half / c10::BFloat16.
template <typename Row>
SEQFAST_TARGET_AVX512 static void exp_rows_avx512(float* out, const Row* in, float off, float g, int64_t n) {
  with_row_identities(off, g, [&](auto has_off, auto has_g) {
    exp_row_avx512_impl<decltype(has_off)::value, decltype(has_g)::value>(out, in, off, g, n);
  });
}

// The float32 row.
SEQFAST_TARGET_AVX512 static void exp_row_avx512(float* out, const float* in, float off, float g, int64_t n) {
  exp_rows_avx512(out, in, off, g, n);
}

// One block of 16 label groups (see label_corrections_avx512): lane j holds g times its group's posteriors summed in
// position order, rounded before any subtraction (the scalar loop's operations); idx moves past the block's rows.
// The posteriors are c[idx] (c: blank sum, then one per target position), or the same values read as post[idx]
// from the state posteriors (idx: LabelGroups::lane_state).
SEQFAST_AVX512_INLINE __m512 label_block_products16(const float* c, __m512 vg, __m512i count, __mmask16 live,
                                                    const int32_t*& idx, int32_t rows) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 sum = _mm512_mask_i32gather_ps(zero, live, _mm512_loadu_si512(idx), c, 4);
  idx += 16;
  for (int32_t m = 1; m < rows; ++m, idx += 16) {
    const __mmask16 more = _mm512_cmpgt_epi32_mask(count, _mm512_set1_epi32(m));
    sum = _mm512_mask_add_ps(sum, more, sum, _mm512_mask_i32gather_ps(zero, more, _mm512_loadu_si512(idx), c, 4));
  }
  __m512 p = _mm512_mul_ps(vg, sum);
  asm("" : "+v"(p));  // rounded before the subtraction, as the scalar loop: GCC would contract the two into an FMA
  return p;
}

// The label corrections of a gradient row, 16 labels at a time: for block b of label groups, lane j's group has
// count[j] target positions whose posterior indices (into c) are idx[m * 16 + j], m < count[j]; its sum goes in
// position order, and row[label[j]] -= g * sum (the scalar loop's operations, so the same bits). Lanes past the
// last group have count 0. idx holds rows[b] rows of 16 per block, rows[b] being the block's largest count; a
// group's labels are distinct, so the scatter has no collisions.
SEQFAST_TARGET_AVX512 static void label_corrections_avx512(float* row, const float* c, float g, const int32_t* label,
                                                           const int32_t* count, const int32_t* idx,
                                                           const int32_t* rows, int64_t blocks) {
  const __m512 vg = splat16(g), zero = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, label += 16, count += 16) {
    const __m512i n = _mm512_loadu_si512(count);
    const __mmask16 live = _mm512_cmpgt_epi32_mask(n, _mm512_setzero_si512());
    const __m512 p = label_block_products16(c, vg, n, live, idx, rows[b]);
    const __m512i at = _mm512_loadu_si512(label);
    const __m512 r = _mm512_mask_i32gather_ps(zero, live, at, row, 4);
    _mm512_mask_i32scatter_ps(row, live, at, _mm512_sub_ps(r, p), 4);
  }
}

// A whole gradient row of at most 32 classes in two registers: out[k] = g * exp(in[k] - off) (exp_rows_avx512's
// bits), minus g * c[0] at the blank, minus each label's block product (label_block_products16) at that label: the
// operations of exp_rows_avx512, the blank's correction and label_corrections_avx512, without the row's store,
// gather and scatter in between. The label posteriors are lab[idx] (c and LabelGroups::lane_idx, or the state
// posteriors and lane_state: the same values, which the frame's beta step wrote longer before). slot[k] (32
// entries): block * 16 + lane of class k's label group, or -1 (no label); at most two blocks (a row of 32 classes
// has at most 31 labels). Row: float or c10::Half / BFloat16.
template <bool Off, bool G, typename Row>
SEQFAST_TARGET_AVX512 static void gradient_row32_avx512_impl(float* out, const Row* in, float off, float g,
                                                             float c0, int64_t blank, const float* lab,
                                                             const int32_t* count, const int32_t* idx,
                                                             const int32_t* rows, int64_t blocks, const int32_t* slot,
                                                             int64_t n) {
  const __m512 vg = splat16(g), voff = splat16(off);
  __m512 p[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512i cnt = _mm512_loadu_si512(count + 16 * b);
    p[b] = label_block_products16(lab, vg, cnt, _mm512_cmpgt_epi32_mask(cnt, _mm512_setzero_si512()), idx, rows[b]);
  }
  __m512 pb = _mm512_mul_ps(vg, splat16(c0));
  asm("" : "+v"(pb));  // as the scalar `row[blank] -= g * c[0]`: no FMA
  for (int64_t h = 0; h < 2 && 16 * h < n; ++h) {
    const __mmask16 k = lanes(n - 16 * h);
    __m512 x = load16_row(in + 16 * h, k);
    if constexpr (Off) x = _mm512_sub_ps(x, voff);
    __m512 e = exp_any16(x);
    if constexpr (G) e = _mm512_mul_ps(vg, e);
    const __mmask16 at_blank = blank >= 16 * h && blank < 16 * h + 16 ? __mmask16(1u << (blank - 16 * h)) : 0;
    e = _mm512_mask_sub_ps(e, at_blank, e, pb);
    const __m512i s = _mm512_loadu_si512(slot + 16 * h);
    const __mmask16 labelled = _mm512_cmpge_epi32_mask(s, _mm512_setzero_si512());
    e = _mm512_mask_sub_ps(e, labelled, e, _mm512_permutex2var_ps(p[0], s, p[1]));
    _mm512_mask_storeu_ps(out + 16 * h, k, e);
  }
}

template <typename Row>
SEQFAST_TARGET_AVX512 static void gradient_row32_avx512(float* out, const Row* in, float off, float g, float c0,
                                                        int64_t blank, const float* lab, const int32_t* count,
                                                        const int32_t* idx, const int32_t* rows, int64_t blocks,
                                                        const int32_t* slot, int64_t n) {
  with_row_identities(off, g, [&](auto has_off, auto has_g) {
    gradient_row32_avx512_impl<decltype(has_off)::value, decltype(has_g)::value>(out, in, off, g, c0, blank, lab, count,
                                                                                 idx, rows, blocks, slot, n);
  });
}

// logsumexp_row_avx2, same bits: the max is exact in any order, and the sum of exps runs in the AVX2 order (an
// 8-lane accumulator taking 8-float chunks in turn) while the exps themselves are computed 16 at a time. The rows
// are read from memory once (the second pass finds them in L1/L2), prefetched ahead as in exp_row_avx512.
SEQFAST_TARGET_AVX512 static float logsumexp_row_avx512(const float* in, int64_t n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  __m512 vm = splat16(-kInf);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(in + c + kExpRowAhead), _MM_HINT_T0);
    vm = _mm512_max_ps(vm, _mm512_loadu_ps(in + c));
  }
  if (c < n) vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(splat16(-kInf), lanes(n - c), in + c));
  const float m = _mm512_reduce_max_ps(vm);
  if (!(m > -kInf && m < kInf)) return std::numeric_limits<float>::quiet_NaN();  // as logsumexp_row_avx2
  const __m512 vmax = splat16(m);
  __m256 acc = _mm256_setzero_ps();
  for (c = 0; c + 16 <= n; c += 16) {
    const __m512 e = exp_any16(_mm512_sub_ps(_mm512_loadu_ps(in + c), vmax));
    acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
    acc = _mm256_add_ps(acc, _mm512_extractf32x8_ps(e, 1));
  }
  for (; c < n; c += 8) {  // the AVX2 version's last full chunk of 8, then its masked tail (exp of 0 - m, zeroed)
    const __mmask16 k = lanes(std::min<int64_t>(n - c, 8));
    const __m512 e = _mm512_maskz_mov_ps(k, exp_any16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, in + c), vmax)));
    acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
  }
  return m + std::log(hsum(acc));
}

// The row loops below run their full vectors (Full) with plain loads and stores, four to an unrolled step, and
// only the tail through the lane mask k. A masked load takes a vector ALU µop besides the load on Intel cores, and
// unrolled, the loops feel it: 15 % off a 208-state alpha row in L1, against 3 % for the unroll alone (NOTES, "CTC
// rows: full vectors without masks"). Same operations per lane either way, so the same bits.
template <bool Full = false>
SEQFAST_AVX512_INLINE __m512i loadi16(__mmask16 k, const int32_t* p) {
  if constexpr (Full) return _mm512_loadu_si512(p);
  return _mm512_maskz_loadu_epi32(k, p);
}
template <bool Full = false>
SEQFAST_AVX512_INLINE __m512 loadf16(__mmask16 k, const float* p) {
  if constexpr (Full) return _mm512_loadu_ps(p);
  return _mm512_maskz_loadu_ps(k, p);
}
template <bool Full>
SEQFAST_AVX512_INLINE void storef16(float* p, __mmask16 k, __m512 v) {
  if constexpr (Full) return _mm512_storeu_ps(p, v);
  _mm512_mask_storeu_ps(p, k, v);
}
template <bool Full>
SEQFAST_AVX512_INLINE void storei16(int32_t* p, __mmask16 k, __m512i v) {
  if constexpr (Full) return _mm512_storeu_si512(p, v);
  _mm512_mask_storeu_epi32(p, k, v);
}

// A row loop over states [0, n): STEP<true>(s, all lanes, ...) on each full vector, then STEP<false>(s, lanes(n -
// s), ...) on the tail. STEP is a function template of the target ISA (a lambda would not inherit the target).
#define SEQFAST_FOR_VECTORS16(n, STEP, ...)                                                                \
  do {                                                                                                     \
    int64_t s_ = 0;                                                                                        \
    _Pragma("GCC unroll 4") for (; s_ + 16 <= (n); s_ += 16) STEP<true>(s_, __mmask16(0xffff), __VA_ARGS__); \
    if (s_ < (n)) STEP<false>(s_, lanes((n) - s_), __VA_ARGS__);                                           \
  } while (0)

// v 2^(Eb + 127) as a normalised extended number (m in [1, 2), or 0 with kZeroE). Eb is the exponent minus the
// float bias, so that v's biased exponent bits add to it directly; (bits & mantissa) | 1.0 is one vpternlogd.
SEQFAST_AVX512_INLINE void renormalise16(__m512 v, __m512i Eb, __m512* m_out, __m512i* e_out) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i e = _mm512_add_epi32(Eb, _mm512_srli_epi32(bits, 23));
  const __m512 m = _mm512_castsi512_ps(
      _mm512_ternarylogic_epi32(bits, _mm512_set1_epi32(0x007fffff), _mm512_set1_epi32(0x3f800000), 0xEA));
  const __mmask16 zero = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_EQ_OQ) |
                         _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(kLiveE), e);
  *m_out = _mm512_mask_mov_ps(m, zero, _mm512_setzero_ps());
  *e_out = _mm512_mask_mov_epi32(e, zero, _mm512_set1_epi32(kZeroE));
}

// 2^(e - Eb - 127) as a float, 0 below 2^-126 (Eb: the largest exponent minus 127).
SEQFAST_AVX512_INLINE __m512 pow2_diff16(__m512i e, __m512i Eb) {
  const __m512i biased = _mm512_max_epi32(_mm512_sub_epi32(e, Eb), _mm512_setzero_si512());
  return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
}

// a + b + c, the third only in the lanes `skip` (the s-2 -> s transition), as its exponent's largest and a mantissa
// sum; *Eb: that exponent minus 127. Where the skip is not allowed the third term is left out, which is what
// adding 0 2^kNoSkipE did (ctc_loss_simd.h's add3): the same bits, two vector operations fewer.
SEQFAST_AVX512_INLINE __m512 add3_16(__m512 ma, __m512i ea, __m512 mb, __m512i eb, __m512 mc, __m512i ec,
                                     __mmask16 skip, __m512i* Eb) {
  __m512i E = _mm512_max_epi32(ea, eb);
  E = _mm512_mask_max_epi32(E, skip, E, ec);
  *Eb = _mm512_sub_epi32(E, _mm512_set1_epi32(127));
  __m512 sum = _mm512_mul_ps(ma, pow2_diff16(ea, *Eb));
  sum = _mm512_fmadd_ps(mb, pow2_diff16(eb, *Eb), sum);
  return _mm512_mask3_fmadd_ps(mc, pow2_diff16(ec, *Eb), sum, skip);
}

// The lanes of states s.. where the skip s-2 -> s is allowed (ExtSkip::m: all-ones bits there, else 0).
template <bool Full>
SEQFAST_AVX512_INLINE __mmask16 skip_lanes16(__mmask16 k, const float* skip_m) {
  const __m512i bits = _mm512_castps_si512(loadf16<Full>(k, skip_m));
  return _mm512_test_epi32_mask(bits, bits);
}

// log_mantissa of ctc_loss_simd.h: the 16-entry tables fit one permute.
SEQFAST_AVX512_INLINE __m512 log_mantissa16(__m512 m) {
  const __m512i bits = _mm512_castps_si512(m);
  const __m512i j = _mm512_and_si512(_mm512_srli_epi32(bits, 19), _mm512_set1_epi32(15));
  const __m512 c = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(kLogBucketMask)), _mm512_set1_epi32(kLogBucketMid)));
  const __m512 r = _mm512_mul_ps(_mm512_sub_ps(m, c), _mm512_permutexvar_ps(j, _mm512_loadu_ps(kLogInvC)));
  __m512 p = _mm512_fmadd_ps(splat16(-0.25f), r, splat16(0x1.555556p-2f));
  p = _mm512_fmadd_ps(p, r, splat16(-0.5f));
  p = _mm512_fmadd_ps(p, r, splat16(1.0f));
  return _mm512_fmadd_ps(p, r, _mm512_permutexvar_ps(j, _mm512_loadu_ps(kLogC)));
}

SEQFAST_AVX512_INLINE __m512 ext_log16(__m512 m, __m512i e) {
  const __mmask16 is_zero = _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_EQ_OQ);
  const __m512 safe = _mm512_mask_mov_ps(m, is_zero, splat16(1.0f));
  const __m512 r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), splat16(0.693147180559945309f), log_mantissa16(safe));
  return _mm512_mask_mov_ps(r, is_zero, splat16(-std::numeric_limits<float>::infinity()));
}

// The masked loads below read zeros in the lanes past n: those lanes' results are never stored.
template <bool Full, bool Log>
SEQFAST_AVX512_INLINE void alpha_ext_vec16(int64_t s, __mmask16 k, float* m_out, int32_t* e_out, float* log_out,
                                           const float* m_prev, const int32_t* e_prev, const float* skip_m,
                                           const float* em, const int32_t* ee) {
  __m512i Eb;
  const __m512 sum = add3_16(loadf16<Full>(k, m_prev + s), loadi16<Full>(k, e_prev + s),
                             loadf16<Full>(k, m_prev + s - 1), loadi16<Full>(k, e_prev + s - 1),
                             loadf16<Full>(k, m_prev + s - 2), loadi16<Full>(k, e_prev + s - 2),
                             skip_lanes16<Full>(k, skip_m + s), &Eb);
  __m512 m;
  __m512i e;
  renormalise16(_mm512_mul_ps(sum, loadf16<Full>(k, em + s)), _mm512_add_epi32(Eb, loadi16<Full>(k, ee + s)), &m,
                &e);
  storef16<Full>(m_out + s, k, m);
  storei16<Full>(e_out + s, k, e);
  if constexpr (Log) storef16<Full>(log_out + s, k, ext_log16(m, e));
}

// The two kinds of row as steps of their own, as in alpha_ext_row_avx2 (a test per vector costs registers).
template <bool Full>
SEQFAST_AVX512_INLINE void alpha_vec16(int64_t s, __mmask16 k, float* m_out, int32_t* e_out, const float* m_prev,
                                       const int32_t* e_prev, const float* skip_m, const float* em, const int32_t* ee) {
  alpha_ext_vec16<Full, false>(s, k, m_out, e_out, nullptr, m_prev, e_prev, skip_m, em, ee);
}
template <bool Full>
SEQFAST_AVX512_INLINE void alpha_log_vec16(int64_t s, __mmask16 k, float* m_out, int32_t* e_out, float* log_out,
                                           const float* m_prev, const int32_t* e_prev, const float* skip_m,
                                           const float* em, const int32_t* ee) {
  alpha_ext_vec16<Full, true>(s, k, m_out, e_out, log_out, m_prev, e_prev, skip_m, em, ee);
}

// The AVX2 rows' signature (ExtOps): skip_e, the skip's exponent offsets, is not read here (add3_16 takes the skip
// as a lane mask of skip_m).
SEQFAST_TARGET_AVX512 static void alpha_ext_row_avx512(float* m_out, int32_t* e_out, float* log_out,
                                                       const float* m_prev, const int32_t* e_prev, const float* skip_m,
                                                       const int32_t* /*skip_e*/, const float* em, const int32_t* ee,
                                                       int64_t n) {
  if (log_out != nullptr) {
    SEQFAST_FOR_VECTORS16(n, alpha_log_vec16, m_out, e_out, log_out, m_prev, e_prev, skip_m, em, ee);
  } else {
    SEQFAST_FOR_VECTORS16(n, alpha_vec16, m_out, e_out, m_prev, e_prev, skip_m, em, ee);
  }
}

// beta_bx / store_b (ctc_loss_simd.h) on the lanes k of states s..s+15.
template <bool Full>
SEQFAST_AVX512_INLINE void beta_bx16(const float* nm, const int32_t* ne, const float* skip_m, int64_t s, __mmask16 k,
                                     __m512* m, __m512i* e) {
  __m512i Eb;
  const __m512 sum = add3_16(loadf16<Full>(k, nm + s), loadi16<Full>(k, ne + s), loadf16<Full>(k, nm + s + 1),
                             loadi16<Full>(k, ne + s + 1), loadf16<Full>(k, nm + s + 2), loadi16<Full>(k, ne + s + 2),
                             skip_lanes16<Full>(k, skip_m + s), &Eb);
  renormalise16(sum, Eb, m, e);
}

template <bool Full>
SEQFAST_AVX512_INLINE void store_b16(float* bm, int32_t* be, const float* em, const int32_t* ee, int64_t s,
                                     __mmask16 k, __m512 m, __m512i e) {
  m = _mm512_mul_ps(m, loadf16<Full>(k, em + s));
  e = _mm512_mask_mov_epi32(_mm512_add_epi32(e, loadi16<Full>(k, ee + s)),
                            _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_EQ_OQ), _mm512_set1_epi32(kZeroE));
  storef16<Full>(bm + s, k, m);
  storei16<Full>(be + s, k, e);
}

template <bool Full>
SEQFAST_AVX512_INLINE void beta_ext_vec16(int64_t s, __mmask16 k, float* bxm, int32_t* bxe, float* bm, int32_t* be,
                                          const float* nm, const int32_t* ne, const float* skip_m, const float* em,
                                          const int32_t* ee) {
  __m512 m;
  __m512i e;
  beta_bx16<Full>(nm, ne, skip_m, s, k, &m, &e);
  storef16<Full>(bxm + s, k, m);
  storei16<Full>(bxe + s, k, e);
  store_b16<Full>(bm, be, em, ee, s, k, m, e);  // beta_ext_row_avx2: b unnormalised, zeros at kZeroE
}

SEQFAST_TARGET_AVX512 static void beta_ext_row_avx512(float* bxm, int32_t* bxe, float* bm, int32_t* be,
                                                      const float* nm, const int32_t* ne, const float* skip_m,
                                                      const int32_t* /*skip_e*/, const float* em, const int32_t* ee,
                                                      int64_t n) {
  SEQFAST_FOR_VECTORS16(n, beta_ext_vec16, bxm, bxe, bm, be, nm, ne, skip_m, em, ee);
}

// The posterior rows' blank sum in the AVX2 order: the even lanes of p added to one 8-lane accumulator, low half
// first (rem: the lanes left in the row, a multiple of 8), then summed as hsum does.
SEQFAST_AVX512_INLINE __m256 add_even_avx2_order(__m256 acc, __m512 p, int64_t rem) {
  const __m256 even = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0));
  acc = _mm256_add_ps(acc, _mm256_and_ps(_mm512_castps512_ps256(p), even));
  if (rem > 8) acc = _mm256_add_ps(acc, _mm256_and_ps(_mm512_extractf32x8_ps(p, 1), even));
  return acc;
}

SEQFAST_AVX512_INLINE float hsum8(__m256 acc) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

template <bool Full>
SEQFAST_AVX512_INLINE void posterior_ext_vec16(int64_t s, __mmask16 k, int64_t n, __m256* acc, float* post,
                                               const float* alpha, const float* bxm, const int32_t* bxe, __m512 vnll) {
  const __m512 x = _mm512_fmadd_ps(_mm512_cvtepi32_ps(loadi16<Full>(k, bxe + s)), splat16(0.693147180559945309f),
                                   _mm512_add_ps(loadf16<Full>(k, alpha + s), vnll));
  const __m512 p = _mm512_mul_ps(exp_any16(x), loadf16<Full>(k, bxm + s));
  storef16<Full>(post + s, k, p);
  *acc = add_even_avx2_order(*acc, p, n - s);
}

SEQFAST_TARGET_AVX512 static float posterior_ext_row_avx512(float* post, const float* alpha, const float* bxm,
                                                            const int32_t* bxe, float nll, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  const __m512 vnll = splat16(nll);
  SEQFAST_FOR_VECTORS16(n, posterior_ext_vec16, n, &acc, post, alpha, bxm, bxe, vnll);
  return hsum8(acc);
}

// posterior_lin_vec (ctc_loss_simd.h), 16 lanes.
SEQFAST_AVX512_INLINE __m512 posterior_lin_vec16(__m512 am, __m512i ae, __m512 bm, __m512i be, __m512 vnm,
                                                 __m512i vne) {
  const __m512i E = _mm512_add_epi32(_mm512_max_epi32(_mm512_add_epi32(ae, be), _mm512_set1_epi32(kZeroE)), vne);
  const __m512i biased = _mm512_min_epi32(
      _mm512_max_epi32(_mm512_add_epi32(E, _mm512_set1_epi32(127)), _mm512_setzero_si512()), _mm512_set1_epi32(254));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(am, bm), vnm), _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23)));
}

template <bool Full>
SEQFAST_AVX512_INLINE void posterior_lin_step16(int64_t s, __mmask16 k, int64_t n, __m256* acc, float* post,
                                                const float* am, const int32_t* ae, const float* bxm,
                                                const int32_t* bxe, __m512 vnm, __m512i vne) {
  const __m512 p = posterior_lin_vec16(loadf16<Full>(k, am + s), loadi16<Full>(k, ae + s), loadf16<Full>(k, bxm + s),
                                       loadi16<Full>(k, bxe + s), vnm, vne);
  storef16<Full>(post + s, k, p);
  *acc = add_even_avx2_order(*acc, p, n - s);
}

// posterior_lin_row_avx2, same bits per lane and the AVX2 order for the blank sum.
SEQFAST_TARGET_AVX512 static float posterior_lin_row_avx512(float* post, const float* am, const int32_t* ae,
                                                            const float* bxm, const int32_t* bxe, float nm, int32_t ne,
                                                            int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  const __m512 vnm = splat16(nm);
  const __m512i vne = _mm512_set1_epi32(ne);
  SEQFAST_FOR_VECTORS16(n, posterior_lin_step16, n, &acc, post, am, ae, bxm, bxe, vnm, vne);
  return hsum8(acc);
}

// beta_post_row_avx2, 16 lanes (the same bits: the even sum in the AVX2 order).
template <bool Full>
SEQFAST_AVX512_INLINE void beta_post_vec16(int64_t s, __mmask16 k, int64_t n, __m256* acc, float* bm, int32_t* be,
                                           float* post, const float* nm, const int32_t* ne, const float* skip_m,
                                           const float* em, const int32_t* ee, const float* am, const int32_t* ae,
                                           __m512 vnm, __m512i vne) {
  __m512 m;
  __m512i e;
  beta_bx16<Full>(nm, ne, skip_m, s, k, &m, &e);
  const __m512 p = posterior_lin_vec16(loadf16<Full>(k, am + s), loadi16<Full>(k, ae + s), m, e, vnm, vne);
  storef16<Full>(post + s, k, p);
  *acc = add_even_avx2_order(*acc, p, n - s);
  store_b16<Full>(bm, be, em, ee, s, k, m, e);
}

SEQFAST_TARGET_AVX512 static float beta_post_row_avx512(float* bm, int32_t* be, float* post, const float* nm,
                                                        const int32_t* ne, const float* skip_m,
                                                        const int32_t* /*skip_e*/, const float* em, const int32_t* ee,
                                                        const float* am, const int32_t* ae, float exp_nll_m,
                                                        int32_t exp_nll_e, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  const __m512 vnm = splat16(exp_nll_m);
  const __m512i vne = _mm512_set1_epi32(exp_nll_e);
  SEQFAST_FOR_VECTORS16(n, beta_post_vec16, n, &acc, bm, be, post, nm, ne, skip_m, em, ee, am, ae, vnm, vne);
  return hsum8(acc);
}

// States 2k .. 2k+31 (those below hi) from labels k .. k+15 (m, e: their emissions, 0 where dead) and the blank's
// (bm, be, kept in the lanes of blank_live): store_label_states of ctc_loss_simd.h in 16 lanes. State 2 (k + i) is
// the blank, 2 (k + i) + 1 label k + i: lanes [b0, m0, b1, m1, ...] from (blank, labels), two permutes each.
SEQFAST_AVX512_INLINE void store_label_states16(float* em, int32_t* ee, int64_t k, int64_t hi, __m512 m, __m512i e,
                                                __m512 bm, __m512i be, __mmask16 blank_live) {
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  const __m512 bmk = _mm512_maskz_mov_ps(blank_live, bm);
  const __m512i bek = _mm512_maskz_mov_epi32(blank_live, be);
  const __mmask16 out0 = lanes(hi - 2 * k), out1 = lanes(std::max<int64_t>(0, hi - 2 * k - 16));
  _mm512_mask_storeu_ps(em + 2 * k, out0, _mm512_permutex2var_ps(bmk, first, m));
  _mm512_mask_storeu_epi32(ee + 2 * k, out0, _mm512_permutex2var_epi32(bek, first, e));
  _mm512_mask_storeu_ps(em + 2 * k + 16, out1, _mm512_permutex2var_ps(bmk, second, m));
  _mm512_mask_storeu_epi32(ee + 2 * k + 16, out1, _mm512_permutex2var_epi32(bek, second, e));
}

// The labels' emissions from class_emissions_avx512's tables of 64 classes (C <= 64) for states
// [lo, hi): emission_gather_avx2's bits, 16 labels a step, with two vpermt2ps and a blend for the labels'
// mantissas and as many for their exponents (no exp, no scalar load), two more each to interleave them with the
// blank's. On AVX2, vpermps and blends cost about what they save (measured: NOTES, "CTC: a small alphabet's
// emissions"). lab readable up to hi / 2 + 16.
SEQFAST_TARGET_AVX512 static void emission_lookup_avx512(float* em, int32_t* ee, const float* tm, const int32_t* te,
                                                         int64_t blank, const int32_t* lab, int64_t L, int64_t lo,
                                                         int64_t hi) {
  const __m512 bm = splat16(tm[blank]);
  const __m512i be = _mm512_set1_epi32(te[blank]);
  for (int64_t k = lo / 2; 2 * k < hi; k += 16) {
    const __mmask16 live = lanes(std::max<int64_t>(0, L - k));
    const __mmask16 blank_live = lanes(std::max<int64_t>(0, L + 1 - k));
    const __m512i idx = _mm512_loadu_si512(lab + k);
    __m512 m = _mm512_permutex2var_ps(_mm512_loadu_ps(tm), idx, _mm512_loadu_ps(tm + 16));
    __m512i e = _mm512_permutex2var_epi32(_mm512_loadu_si512(te), idx, _mm512_loadu_si512(te + 16));
    // Classes 32 .. 63: bit 5 of the index.
    const __mmask16 upper = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    m = _mm512_mask_blend_ps(upper, m, _mm512_permutex2var_ps(_mm512_loadu_ps(tm + 32), idx, _mm512_loadu_ps(tm + 48)));
    e = _mm512_mask_blend_epi32(upper, e, _mm512_permutex2var_epi32(_mm512_loadu_si512(te + 32), idx,
                                                                    _mm512_loadu_si512(te + 48)));
    m = _mm512_maskz_mov_ps(live, m);
    e = _mm512_maskz_mov_epi32(live, e);
    store_label_states16(em, ee, k, hi, m, e, bm, be, blank_live);
  }
}

// emission_vec of ctc_loss_simd.h in 16 lanes: the same operations, so the same bits.
SEQFAST_AVX512_INLINE void emission_vec16(__m512 x, __m512* m, __m512i* e) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, splat16(kEmitLo), _CMP_GT_OQ);  // not (x <= kEmitLo, or NaN)
  __m512 nf;
  const __m512 r = exp_reduced16(_mm512_min_ps(splat16(-kEmitLo), _mm512_max_ps(splat16(kEmitLo), x)), &nf);
  *m = _mm512_maskz_mov_ps(live, r);
  *e = _mm512_maskz_mov_epi32(live, _mm512_cvtps_epi32(nf));
}

// A small alphabet's emissions, for frames with more labels than the row has classes: tm[c] 2^te[c] for every
// class c < 8 Q of the row (classes from C on: zeros, never looked up), as emission_vec gives them from
// row[c] - lse: one exp per class, after which the labels' emissions are looked up (emission_lookup_avx512) in the
// bits emission_gather_avx2 would give. 16 classes a vector. With Sum, poison[0, 8) sums every class of the row
// rather than the blank and the labels, each 16-class vector added to the 8-lane accumulator half by half (the
// AVX2 gather's order): a NaN or +inf anywhere in the row is noted, which at worst sends a sample to the exact check
// (poison_reaches_end) for nothing. Row: float, c10::Half or c10::BFloat16 (widened exactly).
template <bool Sum, int Q, typename Row>
SEQFAST_TARGET_AVX512 static void class_emissions_avx512(float* tm, int32_t* te, float* poison, const Row* row,
                                                         int64_t C, float lse) {
  static_assert(Q == 4 || Q == 8);
  const __m512 vlse = splat16(lse);
  __m256 acc = Sum ? _mm256_loadu_ps(poison) : _mm256_setzero_ps();
  for (int q = 0; q < Q / 2; ++q) {
    const __mmask16 real = lanes(std::max<int64_t>(0, C - 16 * q));
    const __m512 x = _mm512_sub_ps(load16_row(row + 16 * q, real), vlse);
    if constexpr (Sum) {
      const __m512 xr = _mm512_maskz_mov_ps(real, x);
      acc = _mm256_add_ps(acc, _mm512_castps512_ps256(xr));
      acc = _mm256_add_ps(acc, _mm512_extractf32x8_ps(xr, 1));
    }
    __m512 m;
    __m512i e;
    emission_vec16(x, &m, &e);
    _mm512_storeu_ps(tm + 16 * q, m);
    _mm512_storeu_si512(te + 16 * q, e);
  }
  if constexpr (Sum) _mm256_storeu_ps(poison, acc);
}

// emission_gather_avx2 for float32 rows, 16 labels a step: the same em / ee (emission_vec16 of the same floats,
// interleaved with the blank's by two permutes each) and, with Sum, the same poison sums (8 labels at a time, in
// the AVX2 loop's order). lab readable (any valid class) up to hi / 2 + 16.
template <bool Sum>
SEQFAST_TARGET_AVX512 static void emission_gather_avx512(float* em, int32_t* ee, float* poison, const float* row,
                                                         const int32_t* lab, int64_t L, float lse, int64_t blank,
                                                         int64_t lo, int64_t hi) {
  const __m512 vlse = splat16(lse);
  const __m512 bx = _mm512_sub_ps(splat16(row[blank]), vlse);
  __m512 bm;
  __m512i be;
  emission_vec16(bx, &bm, &be);
  __m256 acc = _mm256_setzero_ps();
  if constexpr (Sum) acc = _mm256_add_ps(_mm256_loadu_ps(poison), _mm512_castps512_ps256(bx));
  const __m512 minus_inf = splat16(-std::numeric_limits<float>::infinity());
  int64_t k = lo / 2;
  for (; 2 * k < hi; k += 16) {
    const __mmask16 live = lanes(std::max<int64_t>(0, L - k));
    const __mmask16 blank_live = lanes(std::max<int64_t>(0, L + 1 - k));
    const int32_t* l = lab + k;  // scalar loads, as gather8's
    const __m512 g = _mm512_setr_ps(row[l[0]], row[l[1]], row[l[2]], row[l[3]], row[l[4]], row[l[5]], row[l[6]],
                                    row[l[7]], row[l[8]], row[l[9]], row[l[10]], row[l[11]], row[l[12]], row[l[13]],
                                    row[l[14]], row[l[15]]);
    const __m512 x = _mm512_mask_blend_ps(live, minus_inf, _mm512_sub_ps(g, vlse));
    if constexpr (Sum) {
      const __m512 xl = _mm512_maskz_mov_ps(live, x);
      acc = _mm256_add_ps(acc, _mm512_castps512_ps256(xl));
      if (2 * (k + 8) < hi) acc = _mm256_add_ps(acc, _mm512_extractf32x8_ps(xl, 1));
    }
    __m512 m;
    __m512i e;
    emission_vec16(x, &m, &e);
    store_label_states16(em, ee, k, hi, m, e, bm, be, blank_live);
  }
  if constexpr (Sum) {
    if (k - 8 >= lo / 2 && 2 * (k - 8) >= hi) k -= 8;  // the AVX2 loop stopped at the last step's second half
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; k < L; k += 8) {  // labels of states not reached yet: still checked
      const __m256i left = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(L - k, 8)));
      const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(left, iota));
      const int32_t* l = lab + k;
      const __m256 g = _mm256_setr_ps(row[l[0]], row[l[1]], row[l[2]], row[l[3]], row[l[4]], row[l[5]], row[l[6]],
                                      row[l[7]]);
      acc = _mm256_add_ps(acc, _mm256_and_ps(_mm256_sub_ps(g, _mm512_castps512_ps256(vlse)), live));
    }
    _mm256_storeu_ps(poison, acc);
  }
}

// emission_lookup_avx512 for up to 32 classes, state by state: cls holds each label state's class (odd s) and
// anything in [0, 32) at the blank states (even s), readable up to hi + 15; states from `states` on get (0, 0). One
// index vector per 16 states, two permutes and plain stores instead of interleaving the labels with the blank:
// -2-4 % of a (500,16,32,100) forward. With 64 classes (two tables, a blend) the interleaving version is faster
// (NOTES, "A small alphabet's emissions, 16 classes a vector").
SEQFAST_TARGET_AVX512 static void emission_lookup_states_avx512(float* em, int32_t* ee, const float* tm,
                                                                const int32_t* te, int64_t blank, const int32_t* cls,
                                                                int64_t states, int64_t lo, int64_t hi) {
  const __m512i vblank = _mm512_set1_epi32(static_cast<int32_t>(blank));
  const __m512 m0 = _mm512_loadu_ps(tm), m1 = _mm512_loadu_ps(tm + 16);
  const __m512i e0 = _mm512_loadu_si512(te), e1 = _mm512_loadu_si512(te + 16);
  for (int64_t s = lo; s < hi; s += 16) {
    const __m512i idx = _mm512_mask_blend_epi32(0x5555, _mm512_loadu_si512(cls + s), vblank);
    __m512 m = _mm512_permutex2var_ps(m0, idx, m1);
    __m512i e = _mm512_permutex2var_epi32(e0, idx, e1);
    if (s + 16 > states) {
      const __mmask16 live = lanes(std::max<int64_t>(0, states - s));
      m = _mm512_maskz_mov_ps(live, m);
      e = _mm512_maskz_mov_epi32(live, e);
    }
    if (s + 16 <= hi) {
      _mm512_storeu_ps(em + s, m);
      _mm512_storeu_si512(ee + s, e);
    } else {
      _mm512_mask_storeu_ps(em + s, lanes(hi - s), m);
      _mm512_mask_storeu_epi32(ee + s, lanes(hi - s), e);
    }
  }
}

// out[k] = post[2k + 1] for k < L (the label states' posteriors, one per target position): one permute per 16
// labels where the compiler's loop shuffles four at a time. post readable up to 2L.
SEQFAST_TARGET_AVX512 static void odd_entries_avx512(float* out, const float* post, int64_t L) {
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  int64_t k = 0;
  for (; k + 16 <= L; k += 16) {
    _mm512_storeu_ps(out + k,
                     _mm512_permutex2var_ps(_mm512_loadu_ps(post + 2 * k), odd, _mm512_loadu_ps(post + 2 * k + 16)));
  }
  if (k < L) {
    const int64_t n = 2 * (L - k);  // entries [2k, 2L) hold the rest
    const __m512 lo = _mm512_maskz_loadu_ps(lanes(n), post + 2 * k);
    const __m512 hi = _mm512_maskz_loadu_ps(lanes(std::max<int64_t>(0, n - 16)), post + 2 * k + 16);
    _mm512_mask_storeu_ps(out + k, lanes(L - k), _mm512_permutex2var_ps(lo, odd, hi));
  }
}

#undef SEQFAST_FOR_VECTORS16
#undef SEQFAST_AVX512_INLINE

}  // namespace seqfast::ctc_simd

#pragma GCC diagnostic pop

#endif  // SEQFAST_X86
