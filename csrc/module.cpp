// The Python module seqfast._C. Importing it runs every TORCH_LIBRARY_IMPL(seqfast, CPU, m)
// block of csrc/*.cpp; the op schemas themselves are declared once, in seqfast/ops/.
#include <torch/extension.h>

#include "cpu_features.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", [] { return seqfast::has_avx512() ? "avx512" : seqfast::has_avx2() ? "avx2" : "baseline"; },
        "The widest vector ISA the CPU kernels use on this machine.");
}
