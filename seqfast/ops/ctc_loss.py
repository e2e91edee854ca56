"""The CTC loss ops.

``seqfast::ctc_loss_forward(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity,
from_logits, keep_alpha=True) -> (neg_log_likelihood, log_alpha)``

- ``log_probs``: (T, N, C) contiguous, float16 / bfloat16 / float32 / float64. With
  ``from_logits`` it holds unnormalised logits and the kernels apply log_softmax over C.
- ``targets``: (N, S) int64 contiguous, padded; ``input_lengths``, ``target_lengths``: (N,) int64.
  Inputs are validated before the op (``seqfast.validation``).
- ``neg_log_likelihood``: (N,) in the compute dtype (float64 for float64 input, else float32);
  +inf where no alignment fits, also with ``zero_infinity`` (the public function zeroes the
  loss; the flag is an op argument so that autograd hands it to backward). NaN, as torch's, where
  a NaN or +inf log-prob of the sample's blank or labels (frames t < input_length; frame 0: states
  0 and 1) sits on a state that can still reach the end of an alignment; from logits, a row with a
  NaN or +inf logit, or only -inf, is a NaN row (as log_softmax makes it).
- ``log_alpha``: (N, T, 2S+1) compute dtype, the forward variables kept for backward. With
  ``keep_alpha=False`` (a loss that needs no gradient) it is an empty (N, 0, 0) tensor: the kernels
  keep only two rows of the recursion, and backward refuses it. The loss is bit-identical either way.

``seqfast::ctc_loss_backward(grad_nll, log_probs, targets, input_lengths, target_lengths,
neg_log_likelihood, log_alpha, blank, zero_infinity, from_logits) -> grad``: (T, N, C) in
``log_probs``' dtype, ``grad_nll[n] * (exp(lp) - posterior)`` (torch's convention; with
``from_logits`` this is softmax - posterior, the true gradient w.r.t. the logits), zero for
``t >= input_lengths[n]`` and, with ``zero_infinity``, for samples whose loss is +inf. Rows
``t < input_lengths[n]`` of a sample whose loss is NaN or +inf are NaN (+inf: unless
``zero_infinity``); from logits, so is every row whose log_softmax is NaN. The posteriors count NaN
and +inf log-probs as probability 0 (with a finite loss none reaches an end), so such a value shows
at its own entry only, through exp(lp); -inf log-probs get 0 where torch's formula gives NaN.
"""

from __future__ import annotations

import torch

from seqfast import _backend
from seqfast.ops import no_double_backward
from seqfast.ops._registry import define, register_autograd, register_kernels
from seqfast.reference import ctc_loss as reference

FORWARD = define(
    "ctc_loss_forward",
    "(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, int blank, "
    "bool zero_infinity, bool from_logits, bool keep_alpha=True) -> (Tensor, Tensor)",
)
BACKWARD = define(
    "ctc_loss_backward",
    "(Tensor grad_nll, Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, "
    "Tensor neg_log_likelihood, Tensor log_alpha, int blank, bool zero_infinity, bool from_logits) -> Tensor",
)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("seqfast::ctc_loss_forward")
def _forward_fake(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity, from_logits,
                  keep_alpha=True):
    T, N, _ = log_probs.shape
    dtype = compute_dtype(log_probs.dtype)
    nll = log_probs.new_empty((N,), dtype=dtype)
    shape = (N, T, 2 * targets.shape[1] + 1) if keep_alpha else (N, 0, 0)
    return nll, log_probs.new_empty(shape, dtype=dtype)


@torch.library.register_fake("seqfast::ctc_loss_backward")
def _backward_fake(grad_nll, log_probs, *rest):
    return torch.empty_like(log_probs, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    log_probs, targets, input_lengths, target_lengths, blank, zero_infinity, from_logits = inputs[:7]
    ctx.keep_alpha = inputs[7] if len(inputs) > 7 else True
    nll, log_alpha = output
    ctx.save_for_backward(log_probs, targets, input_lengths, target_lengths, nll, log_alpha)
    ctx.blank, ctx.zero_infinity, ctx.from_logits = blank, zero_infinity, from_logits
    ctx.backend = _backend.current()
    # log_alpha is never differentiated: without this autograd would hand backward a zero (N, T, 2S+1) tensor.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_nll, grad_log_alpha):
    log_probs, targets, input_lengths, target_lengths, nll, log_alpha = ctx.saved_tensors
    if grad_nll is None:  # only log_alpha was used: it carries no gradient
        return None, None, None, None, None, None, None, None
    if not ctx.keep_alpha:
        raise RuntimeError("seqfast::ctc_loss_forward ran with keep_alpha=False: its loss has no gradient")
    with no_double_backward.guard():
        grad = _backend.dispatch(
            ctx.backend, BACKWARD, grad_nll.contiguous(), log_probs, targets, input_lengths, target_lengths,
            nll, log_alpha, ctx.blank, ctx.zero_infinity, ctx.from_logits,
        )
    (grad,) = no_double_backward.mark("seqfast::ctc_loss_backward", (log_probs, grad_nll), grad)
    return grad, None, None, None, None, None, None, None


register_autograd("ctc_loss_forward", _backward, _setup_context)
register_kernels("ctc_loss_forward", "ctc_loss", reference.ctc_loss_forward)
register_kernels("ctc_loss_backward", "ctc_loss", reference.ctc_loss_backward)
