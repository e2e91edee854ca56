"""Loads the C++ extension ``seqfast._C`` once; its import registers the CPU kernels.

If it is missing or fails to load, ``import seqfast`` still works and every CPU
call of a seqfast op raises :class:`ExtensionNotBuiltError` naming the reason and
the build command (no silent fallback to slower code).
"""

from __future__ import annotations

import importlib
import os

import torch  # noqa: F401  (the extension links against libtorch: load it first)

BUILD_HINT = "build it with `make build` (or `pip install . --no-build-isolation`) from the seqfast checkout"


class ExtensionNotBuiltError(RuntimeError):
    pass


CPU_ISAS = ("avx512", "avx2", "baseline")


def _check_isa_cap() -> None:
    """SEQFAST_CPU_ISA caps the vector ISA of the CPU kernels (the C++ side reads it once); an unknown
    value is an error rather than a silent default."""
    isa = os.environ.get("SEQFAST_CPU_ISA", "")
    if isa and isa not in CPU_ISAS:
        raise ValueError(f"SEQFAST_CPU_ISA must be one of {', '.join(CPU_ISAS)} (or unset), got {isa!r}")


def _load() -> tuple[bool, str]:
    try:
        importlib.import_module("seqfast._C")
    except Exception as exc:  # any failure (missing file, ABI mismatch) leaves the package importable
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


_check_isa_cap()
AVAILABLE, LOAD_ERROR = _load()


def module():
    """The loaded extension module ``seqfast._C`` (only when :data:`AVAILABLE`)."""
    return importlib.import_module("seqfast._C")


def missing_kernel(op_name: str):
    """A CPU kernel that explains why the C++ kernel of ``op_name`` is unavailable."""

    def kernel(*args, **kwargs):
        raise ExtensionNotBuiltError(
            f"seqfast::{op_name} on CPU needs the C++ extension seqfast._C, which did not load "
            f"({LOAD_ERROR}); {BUILD_HINT}. To run the slow float64 reference instead, set "
            "SEQFAST_BACKEND=reference."
        )

    return kernel
