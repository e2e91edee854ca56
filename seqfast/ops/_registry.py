"""The registration steps every seqfast op shares: schema, CPU fallback, CUDA/Triton and reference kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from seqfast import _backend, _extension, _triton


def define(name: str, schema: str) -> torch._ops.OpOverload:
    """Declare ``seqfast::name`` once; if the C++ extension did not load, its CPU kernel explains why."""
    torch.library.define(f"seqfast::{name}", schema)
    if not _extension.AVAILABLE:
        torch.library.impl(f"seqfast::{name}", "CPU")(_extension.missing_kernel(name))
    return getattr(torch.ops.seqfast, name).default


def register_kernels(name: str, kernel_module: str, reference: Callable[..., Any]) -> None:
    """Triton kernels for CUDA (and for the forced ``triton`` backend) and the forced ``reference`` backend.

    ``kernels/<kernel_module>.py`` must define a function called ``name`` with the op's schema.
    """

    def triton_kernel(*args: Any) -> Any:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        return getattr(_triton.kernels(kernel_module, *tensors), name)(*args)

    torch.library.register_kernel(f"seqfast::{name}", "cuda", triton_kernel)
    _backend.register(name, "triton")(triton_kernel)
    _backend.register(name, "reference")(reference)
