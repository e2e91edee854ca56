// seqfast._C.build_info(): how this library was built, for bug reports and `python -m seqfast.info`.
// setup.py writes what only the build knows (the seqfast and torch versions, the flags, release or
// debug) into seqfast_build_info.h in the build directory; the compiler's own macros add the rest.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include "seqfast_build_info.h"

namespace seqfast {

// The same facts as one line of plain text in the library file, so that `python -m seqfast.info`
// can read them when the library does not load (built against another torch, for instance).
__attribute__((used)) static const char kBuildStamp[] = "seqfast-build-info: seqfast=" SEQFAST_BUILD_VERSION
                                                        " torch=" SEQFAST_BUILD_TORCH " type=" SEQFAST_BUILD_TYPE;

pybind11::dict build_info() {
  pybind11::dict info;
  info["seqfast_version"] = SEQFAST_BUILD_VERSION;
  info["build_type"] = SEQFAST_BUILD_TYPE;    // "release" (-g0, debug sections stripped) or "debug" (-g)
  info["torch_version"] = SEQFAST_BUILD_TORCH;  // torch.__version__ of the building torch, e.g. 2.13.0+cpu
  info["torch_headers"] = TORCH_VERSION;        // the libtorch headers compiled against
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cxx"] = SEQFAST_BUILD_CXX;
  info["cxxflags"] = SEQFAST_BUILD_CXXFLAGS;  // without the include directories
  info["ldflags"] = SEQFAST_BUILD_LDFLAGS;    // seqfast's own; torch adds its libraries
  info["cplusplus"] = static_cast<long>(__cplusplus);
#if defined(_GLIBCXX_USE_CXX11_ABI)
  info["glibcxx_cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#endif
#if defined(_OPENMP)
  info["openmp"] = static_cast<long>(_OPENMP);
#else
  info["openmp"] = pybind11::none();
#endif
#if defined(__OPTIMIZE__)
  info["optimized"] = true;
#else
  info["optimized"] = false;
#endif
#if defined(NDEBUG)
  info["ndebug"] = true;
#else
  info["ndebug"] = false;
#endif
  info["python"] = PY_VERSION;  // the Python headers compiled against
  return info;
}

}  // namespace seqfast
