// Which vector ISA the CTC CPU kernels use: the widest the CPU has, capped by SEQFAST_CTC_ISA (avx512 | avx2 |
// scalar, read once) or by ctc_set_isa(), so that one machine can run (and test) every path. AVX-512 and AVX2 give
// identical bits; scalar computes float32 in log space (as float64 always does).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "cpu_features.h"

namespace seqfast {

enum class CtcIsa : int { scalar = 0, avx2 = 1, avx512 = 2 };

inline int ctc_isa_level(const std::string& name) {
  if (name == "scalar") return 0;
  if (name == "avx2") return 1;
  if (name == "avx512") return 2;
  return -1;
}

inline std::atomic<int>& ctc_isa_cap() {
  static std::atomic<int> cap([] {
    const char* env = std::getenv("SEQFAST_CTC_ISA");
    const int level = env != nullptr ? ctc_isa_level(env) : -1;
    return level < 0 ? 2 : level;
  }());
  return cap;
}

inline CtcIsa ctc_isa() {
  const int hw = has_avx512() ? 2 : has_avx2() ? 1 : 0;
  return static_cast<CtcIsa>(std::min(hw, ctc_isa_cap().load(std::memory_order_relaxed)));
}

inline const char* ctc_isa_name(CtcIsa isa) {
  return isa == CtcIsa::avx512 ? "avx512" : isa == CtcIsa::avx2 ? "avx2" : "scalar";
}

// Caps the ISA (a name above; unknown names leave it unchanged and return ""); returns the previous cap's name.
inline std::string ctc_set_isa(const std::string& name) {
  const int level = ctc_isa_level(name);
  if (level < 0) return "";
  return ctc_isa_name(static_cast<CtcIsa>(ctc_isa_cap().exchange(level)));
}

}  // namespace seqfast
