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


def register_eager(name: str) -> None:
    """Eager calls of ``seqfast::name`` through the extension's direct entry ``_C.autograd_<name>``."""
    if _extension.AVAILABLE:
        from seqfast import _C

        _backend.register_eager(getattr(torch.ops.seqfast, name).default, getattr(_C, f"autograd_{name}"))


def register_autograd(name: str, backward: Callable[..., Any], setup_context: Callable[..., Any]) -> None:
    """The op's autograd formula, in Python. The dispatcher's autograd kernel is the C++ one
    (``csrc/autograd.cpp``, same formula) when the extension loaded, else this one (CUDA without the
    extension); forced backends always use this one (``seqfast._backend``)."""
    _backend.register_autograd(name, setup_context, backward)
    if not _extension.AVAILABLE:
        torch.library.register_autograd(f"seqfast::{name}", backward, setup_context=setup_context)
    register_eager(name)


# torch.vmap batching rules fold the vmapped dimension into an op's batch dimension: one call of the kernels instead
# of torch's per-sample fallback loop.


def vmap_fold(x: torch.Tensor, bdim: int | None, size: int, dim: int = 0) -> torch.Tensor:
    """``x`` with its vmapped dimension ``bdim`` (None: not vmapped, expanded to ``size``) merged into its dimension
    ``dim``, vmapped index major: (..., size * n, ...). A view where the strides allow, else a copy."""
    x = x.unsqueeze(dim).expand(*x.shape[:dim], size, *x.shape[dim:]) if bdim is None else x.movedim(bdim, dim)
    return x.reshape(*x.shape[:dim], x.shape[dim] * x.shape[dim + 1], *x.shape[dim + 2:])


def vmap_unfold(x: torch.Tensor, size: int, dim: int = 0) -> torch.Tensor:
    """:func:`vmap_fold`'s inverse on an output: (..., size * n, ...) -> (..., size, n, ...)."""
    return x.reshape(*x.shape[:dim], size, x.shape[dim] // size, *x.shape[dim + 1:])
