// Run-time CPU feature checks and per-function ISA targets.
//
// The extension is built for baseline x86-64. A hot function is written once per ISA with
// SEQFAST_TARGET_AVX2 / SEQFAST_TARGET_AVX512 (GCC compiles just that function for the ISA),
// and callers pick the version with has_avx2() / has_avx512(). No -march=native anywhere.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define SEQFAST_X86 1
#define SEQFAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SEQFAST_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#else
#define SEQFAST_X86 0
#define SEQFAST_TARGET_AVX2
#define SEQFAST_TARGET_AVX512
#endif

namespace seqfast {

inline bool has_avx2() {
#if SEQFAST_X86
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

inline bool has_avx512() {
#if SEQFAST_X86
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

}  // namespace seqfast
