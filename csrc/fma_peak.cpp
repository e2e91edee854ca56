// seqfast._C.fma_peak(): the machine's fp32 FMA throughput, measured, so that every CPU figure can be
// read against the limit of the ISA it used.
//
// Each intra-op thread runs 12 independent FMA chains (enough to cover 4-cycle latency on two pipes,
// and on the 512-bit path of one or two pipes) for a fixed number of steps; the rate is all threads'
// flops over the wall time of the slowest; per core, each thread's flops over its own CPU time (what a
// core gives while it runs this thread, whatever else shares the machine). 2 flops per lane per FMA.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <time.h>  // clock_gettime(CLOCK_THREAD_CPUTIME_ID)

#include "cpu_features.h"

#if SEQFAST_X86
#include <immintrin.h>
#endif

namespace seqfast {
namespace {

constexpr int kChains = 12;  // independent chains per thread (SEQFAST_FMA_CHAINS)

// The chains' sum, so the compiler cannot drop them; x * a + b with a just below 1 stays finite. The
// chains are 12 named variables (GCC keeps an array of vectors in memory and reloads it every step), and
// an empty asm per step stops the compiler from folding steps together.
#define SEQFAST_FMA_CHAINS(V, FMA, ADD, SET1, CAST, C)                                                      \
  V x0 = SET1(1.0f), x1 = SET1(1.01f), x2 = SET1(1.02f), x3 = SET1(1.03f), x4 = SET1(1.04f);             \
  V x5 = SET1(1.05f), x6 = SET1(1.06f), x7 = SET1(1.07f), x8 = SET1(1.08f), x9 = SET1(1.09f);            \
  V x10 = SET1(1.1f), x11 = SET1(1.11f);                                                                 \
  const V a = SET1(0.999999f), b = SET1(1e-7f);                                                          \
  for (int64_t s = 0; s < steps; ++s) {                                                                  \
    x0 = FMA(x0, a, b); x1 = FMA(x1, a, b); x2 = FMA(x2, a, b); x3 = FMA(x3, a, b);                      \
    x4 = FMA(x4, a, b); x5 = FMA(x5, a, b); x6 = FMA(x6, a, b); x7 = FMA(x7, a, b);                      \
    x8 = FMA(x8, a, b); x9 = FMA(x9, a, b); x10 = FMA(x10, a, b); x11 = FMA(x11, a, b);                  \
    __asm__ volatile("" : "+" C(x0), "+" C(x1), "+" C(x2), "+" C(x3), "+" C(x4), "+" C(x5));             \
    __asm__ volatile("" : "+" C(x6), "+" C(x7), "+" C(x8), "+" C(x9), "+" C(x10), "+" C(x11));           \
  }                                                                                                      \
  return CAST(ADD(ADD(ADD(ADD(x0, x1), ADD(x2, x3)), ADD(ADD(x4, x5), ADD(x6, x7))),                     \
                  ADD(ADD(x8, x9), ADD(x10, x11))));

#if SEQFAST_X86
SEQFAST_TARGET_AVX2 float fma_loop_avx2(int64_t steps) {
  SEQFAST_FMA_CHAINS(__m256, _mm256_fmadd_ps, _mm256_add_ps, _mm256_set1_ps, _mm256_cvtss_f32, "x")
}

SEQFAST_TARGET_AVX512 float fma_loop_avx512(int64_t steps) {
  SEQFAST_FMA_CHAINS(__m512, _mm512_fmadd_ps, _mm512_add_ps, _mm512_set1_ps, _mm512_cvtss_f32, "v")
}
#endif

// Baseline x86-64 has no FMA instruction: a multiply and an add, still 2 flops.
inline float mul_add_f(float x, float a, float b) { return x * a + b; }
inline float add_f(float x, float y) { return x + y; }
inline float set1_f(float x) { return x; }
inline float cast_f(float x) { return x; }

float fma_loop_scalar(int64_t steps) {
  SEQFAST_FMA_CHAINS(float, mul_add_f, add_f, set1_f, cast_f, "x")
}
#undef SEQFAST_FMA_CHAINS

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

}  // namespace

// GFLOP/s of `threads` threads (0: all intra-op threads) each running `steps` steps of 12 FMA chains
// of the given ISA ("avx512": zmm, "avx2": ymm, "baseline": scalar; "" = the active one), median of
// `repeats` timings. Returns {"isa", "threads", "lanes", "gflops" (wall clock, all threads),
// "gflops_per_core" (per thread on its own CPU time: steady on a shared machine)}.
pybind11::dict fma_peak(const std::string& isa_arg, int64_t threads, int64_t steps, int64_t repeats) {
  const int level = isa_arg.empty() ? active_isa() : std::min(isa_level(isa_arg), cpu_isa_level());
  TORCH_CHECK(level >= 0, "fma_peak: expected avx512, avx2, baseline or \"\", got ", isa_arg);
  const int lanes = level >= 2 ? 16 : level == 1 ? 8 : 1;
  const int64_t n = threads > 0 ? threads : at::get_num_threads();
  auto run_one = [&] {
#if SEQFAST_X86
    if (level >= 2) return fma_loop_avx512(steps);
    if (level == 1) return fma_loop_avx2(steps);
#endif
    return fma_loop_scalar(steps);
  };
  const double flops = 2.0 * lanes * kChains * static_cast<double>(steps);  // per thread
  std::vector<double> rates, core_rates;
  std::atomic<float> sink{0};
  for (int64_t r = 0; r < std::max<int64_t>(repeats, 1); ++r) {
    std::vector<double> cpu_s(n, 0.0);
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const double c0 = thread_cpu_seconds();
        sink.store(sink.load() + run_one());
        cpu_s[i] = thread_cpu_seconds() - c0;
      }
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    rates.push_back(flops * static_cast<double>(n) / s / 1e9);
    for (double c : cpu_s) core_rates.push_back(flops / c / 1e9);
  }
  auto median = [](std::vector<double>& v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  pybind11::dict out;
  out["isa"] = isa_name(level);
  out["threads"] = n;
  out["lanes"] = lanes;
  out["gflops"] = median(rates);                // all threads, wall clock: what this run could get
  out["gflops_per_core"] = median(core_rates);  // one thread on its own CPU time: the core's rate
  return out;
}

}  // namespace seqfast
