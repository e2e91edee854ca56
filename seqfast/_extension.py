"""Loads the C++ extension ``seqfast._C`` once; its import registers the CPU kernels.

If it is missing or fails to load, ``import seqfast`` still works and every CPU
call of a seqfast op raises :class:`ExtensionNotBuiltError` naming the reason and
the build command (no silent fallback to slower code).
"""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (the extension links against libtorch: load it first)

BUILD_HINT = "build it with `make build` (or `pip install . --no-build-isolation`) from the seqfast checkout"


class ExtensionNotBuiltError(RuntimeError):
    pass


def _load() -> tuple[bool, str]:
    try:
        importlib.import_module("seqfast._C")
    except Exception as exc:  # any failure (missing file, ABI mismatch) leaves the package importable
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


AVAILABLE, LOAD_ERROR = _load()


def missing_kernel(op_name: str):
    """A CPU kernel that explains why the C++ kernel of ``op_name`` is unavailable."""

    def kernel(*args, **kwargs):
        raise ExtensionNotBuiltError(
            f"seqfast::{op_name} on CPU needs the C++ extension seqfast._C, which did not load "
            f"({LOAD_ERROR}); {BUILD_HINT}. To run the slow float64 reference instead, set "
            "SEQFAST_BACKEND=reference."
        )

    return kernel
