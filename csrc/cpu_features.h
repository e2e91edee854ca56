// Run-time CPU feature checks and per-function ISA targets.
//
// The extension is built for baseline x86-64. A hot function is written once per ISA with
// SEQFAST_TARGET_AVX2 / SEQFAST_TARGET_AVX512 (GCC compiles just that function for the ISA),
// and callers pick the version with has_avx2() / has_avx512(). No -march=native anywhere.
//
// SEQFAST_CPU_ISA=avx2 or =baseline (read once, at the first check) caps what is used, so the
// narrower paths can be tested and timed on a machine that has more.
#pragma once

#include <cstdlib>
#include <cstring>

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

// 0: baseline, 1: AVX2, 2: AVX-512 (the most the environment allows).
inline int isa_cap() {
  static const int cap = [] {
    const char* v = std::getenv("SEQFAST_CPU_ISA");
    if (v == nullptr || *v == 0) return 2;
    if (std::strcmp(v, "baseline") == 0) return 0;
    if (std::strcmp(v, "avx2") == 0) return 1;
    return 2;
  }();
  return cap;
}

inline bool has_avx2() {
#if SEQFAST_X86
  static const bool yes = isa_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

inline bool has_avx512() {
#if SEQFAST_X86
  static const bool yes = isa_cap() >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

}  // namespace seqfast
