// The Python module seqfast._C. Importing it runs every TORCH_LIBRARY_IMPL(seqfast, CPU, m)
// block of csrc/*.cpp; the op schemas themselves are declared once, in seqfast/ops/.
#include <torch/extension.h>

#include "buffer_cache.h"
#include "cpu_features.h"
#include "half_rows.h"

namespace seqfast {
pybind11::dict build_info();                  // csrc/build_info.cpp
void bind_autograd(pybind11::module& m);  // csrc/autograd.cpp
pybind11::dict fma_peak(const std::string& isa, int64_t threads, int64_t steps, int64_t repeats);  // csrc/fma_peak.cpp
pybind11::tuple ctc_target_stats(const at::Tensor& targets, const at::Tensor& input_lengths,  // csrc/ctc_checks.cpp
                                 const at::Tensor& target_lengths, bool padded, int64_t C, int64_t blank);
}  // namespace seqfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  seqfast::bind_autograd(m);
  m.def("cpu_isa", [] { return std::string(seqfast::isa_name(seqfast::active_isa())); },
        "The vector ISA the CPU kernels use now: the CPU's widest, capped by SEQFAST_CPU_ISA / set_cpu_isa.");
  m.def("set_cpu_isa", [](const std::string& name) {
    const std::string old = seqfast::set_isa_cap(name);
    TORCH_CHECK(!old.empty(), "set_cpu_isa: expected avx512, avx2 or baseline, got ", name);
    return old;
  }, "Caps the vector ISA of the CPU kernels (avx512, avx2, baseline); returns the previous cap.");
  m.def("cpu_isa_supported", [] { return std::string(seqfast::isa_name(seqfast::cpu_isa_level())); },
        "The widest vector ISA this CPU has (avx512, avx2, baseline), whatever the cap.");
  m.def("fma_peak", &seqfast::fma_peak, pybind11::arg("isa") = "", pybind11::arg("threads") = 0,
        pybind11::arg("steps") = 20000000, pybind11::arg("repeats") = 5,
        "Measured fp32 FMA GFLOP/s of 12 independent chains per thread (isa: avx512, avx2, baseline; \"\" = active).");
  m.def("ctc_target_stats", &seqfast::ctc_target_stats,
        "CTC argument checks on CPU tensors: (min, max input length; min, max, sum target length; first bad label).");
  m.def("build_info", &seqfast::build_info, "How this library was built: versions, compiler, flags, release or debug.");
  m.def("buffer_cache_stats", [] {
    const seqfast::BufferCacheStats s = seqfast::BufferCache::get().stats();
    return pybind11::dict(pybind11::arg("hits") = s.hits, pybind11::arg("misses") = s.misses,
                          pybind11::arg("idle_bytes") = s.idle_bytes, pybind11::arg("limit_bytes") = s.limit_bytes);
  }, "Counters of the cache of large CPU output buffers (csrc/buffer_cache.h).");
  m.def("round_rows", [](const at::Tensor& x, const std::string& dtype) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.is_contiguous() && x.device().is_cpu(),
                "round_rows: expected a contiguous 1-D float32 CPU tensor");
    TORCH_CHECK(dtype == "bfloat16" || dtype == "float16", "round_rows: dtype must be bfloat16 or float16");
    at::Tensor out = at::empty({x.numel()}, x.options().dtype(dtype == "bfloat16" ? at::kBFloat16 : at::kHalf));
    if (dtype == "bfloat16") {
      seqfast::store_row(x.data_ptr<float>(), 1.0f, x.numel(), out.data_ptr<c10::BFloat16>(), 1);
    } else {
      seqfast::store_row(x.data_ptr<float>(), 1.0f, x.numel(), out.data_ptr<c10::Half>(), 1);
    }
    return out;
  }, "x rounded to bfloat16 / float16 by the kernels' own row narrowing on the active ISA (for tests).");
  m.def("buffer_cache_set_limit", [](int64_t bytes) { return seqfast::BufferCache::get().set_limit(bytes); },
        "Sets the idle-byte limit of the CPU output buffer cache (0: off, idle blocks are freed); returns the old "
        "one.");
}
