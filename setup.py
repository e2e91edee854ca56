"""Builds seqfast and its C++ extension ``seqfast._C`` (every ``csrc/*.cpp``).

The extension is compiled for baseline x86-64; hot loops carry their own AVX2 / AVX-512 code
paths chosen at run time (``csrc/cpu_features.h``), so one build runs on any x86-64 CPU.
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent
sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))

setup(
    packages=["seqfast", "seqfast.ops", "seqfast.reference", "seqfast.nn", "seqfast.kernels"],
    package_dir={"seqfast": "seqfast", "seqfast.kernels": "kernels"},
    ext_modules=[
        CppExtension(
            "seqfast._C",
            sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args=["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
