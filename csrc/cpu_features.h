// Run-time CPU feature checks and per-function ISA targets.
//
// The extension is built for baseline x86-64. A hot function is written once per ISA with
// SEQFAST_TARGET_AVX2 / SEQFAST_TARGET_AVX512 (GCC compiles just that function for the ISA),
// and callers pick the version with has_avx2() / has_avx512(). No -march=native anywhere.
//
// A cap limits what is used, so that one machine can run, test and time the narrower paths: it
// starts from SEQFAST_CPU_ISA (avx512 | avx2 | baseline; seqfast/_extension.py rejects other values
// before this library loads) and set_isa_cap() changes it at run time.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define SEQFAST_X86 1
#define SEQFAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SEQFAST_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#define SEQFAST_TARGET_AVX2_F16C __attribute__((target("avx2,fma,f16c")))
#else
#define SEQFAST_X86 0
#define SEQFAST_TARGET_AVX2
#define SEQFAST_TARGET_AVX512
#define SEQFAST_TARGET_AVX2_F16C
#endif

namespace seqfast {

// ISA levels: 0 baseline, 1 AVX2 + FMA + F16C, 2 AVX-512 (F, DQ, BW, VL) as well. F16C (float16 <-> float32 in
// hardware) is a flag of its own, but every AVX2 CPU made has it; counting it in the level leaves the kernels no
// AVX2-without-F16C path, which no machine would run and no test could reach.
inline int isa_level(const std::string& name) {
  if (name == "baseline") return 0;
  if (name == "avx2") return 1;
  if (name == "avx512") return 2;
  return -1;
}

inline const char* isa_name(int level) { return level >= 2 ? "avx512" : level == 1 ? "avx2" : "baseline"; }

// The widest level this CPU has.
inline int cpu_isa_level() {
#if SEQFAST_X86
  static const int level = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) return 0;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
               ? 2
               : 1;
  }();
  return level;
#else
  return 0;
#endif
}

inline std::atomic<int>& isa_cap() {
  static std::atomic<int> cap([] {
    const char* env = std::getenv("SEQFAST_CPU_ISA");
    const int level = env != nullptr && *env != 0 ? isa_level(env) : -1;
    return level < 0 ? 2 : level;
  }());
  return cap;
}

// The level the kernels use now. Every dispatch asks (per row in the attention kernels: tens of thousands of times in
// a short call), so it is one load of a constant-initialised variable, -1 until first asked. Hidden: an exported
// inline symbol is reached through the PLT / GOT, and the two function-local statics behind it cost a call with two
// guard checks (1-1.5 % of a short attention forward+backward).
#define SEQFAST_HIDDEN __attribute__((visibility("hidden")))
SEQFAST_HIDDEN inline std::atomic<int> active_isa_level{-1};

SEQFAST_HIDDEN __attribute__((noinline, cold)) inline int refresh_active_isa() {
  const int level = std::min(cpu_isa_level(), isa_cap().load(std::memory_order_relaxed));
  active_isa_level.store(level, std::memory_order_relaxed);
  return level;
}

SEQFAST_HIDDEN inline int active_isa() {
  const int level = active_isa_level.load(std::memory_order_relaxed);
  return __builtin_expect(level >= 0, 1) ? level : refresh_active_isa();
}
SEQFAST_HIDDEN inline bool has_avx2() { return active_isa() >= 1; }
SEQFAST_HIDDEN inline bool has_avx512() { return active_isa() >= 2; }

// Caps the ISA by name; returns the previous cap's name, or "" (cap unchanged) for an unknown name.
inline std::string set_isa_cap(const std::string& name) {
  const int level = isa_level(name);
  if (level < 0) return "";
  const int previous = isa_cap().exchange(level);
  refresh_active_isa();
  return isa_name(previous);
}

// Prefetch the cache line holding p. GCC 12 deletes __builtin_prefetch / _mm_prefetch calls inside loops
// whose only effect is a prefetch (they count as side-effect free), so the instruction is spelled out.
inline void prefetch_line(const void* p) {
#if SEQFAST_X86
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p);
#endif
}

// The same into L2 only (prefetcht1): for lines wanted a few steps later, so that they do not displace L1's.
inline void prefetch_line_l2(const void* p) {
#if SEQFAST_X86
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// The same for a line about to be written (prefetchw): its read-for-ownership starts early, so the stores that
// follow do not wait for it. A NOP on x86 CPUs without the instruction.
inline void prefetch_line_write(const void* p) {
#if SEQFAST_X86
  asm volatile("prefetchw %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 1);
#endif
}

}  // namespace seqfast
