"""Second-order gradients through seqfast's ops: a clear error, as torch gives for its fused kernels.

The backward ops have no derivative of their own. Without care, a backward run with
``create_graph=True`` would hand out gradients that autograd treats as constants, so a second
differentiation would silently give zeros. Instead the gradients are attached to a node whose
backward raises, which is what torch does for ``_scaled_dot_product_flash_attention_for_cpu_backward``
and ``_ctc_loss_backward``: first-order results with ``create_graph=True`` still work, and only
differentiating them again fails.
"""

from __future__ import annotations

import contextlib

import torch


def guard() -> contextlib.AbstractContextManager:
    """Run a backward op with grad mode off (it has no autograd kernel; :func:`mark` supplies the node)."""
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


class _NoDerivative(torch.autograd.Function):
    # forward and setup_context apart: the form torch.func transforms accept (a gradient taken under
    # torch.func.grad comes here too, as its backward runs with create_graph).
    generate_vmap_rule = True

    @staticmethod
    def forward(op_name: str, n_grads: int, *tensors: torch.Tensor):
        return tuple(t.view_as(t) for t in tensors[:n_grads])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op_name = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"derivative for {ctx.op_name} is not implemented: seqfast's fused kernels give first-order gradients "
            "only (as torch's fused attention and ctc_loss kernels do). For second-order gradients, compute this "
            "part with plain torch ops, e.g. under seqfast.backend('reference') or with torch's math attention."
        )


def mark(op_name: str, inputs: tuple, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``grads`` unchanged, except under ``create_graph=True``: then tied to the differentiable ``inputs`` of
    the backward through a node that refuses to be differentiated."""
    if not torch.is_grad_enabled():
        return grads
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        return grads
    return _NoDerivative.apply(op_name, len(grads), *grads, *leaves)
