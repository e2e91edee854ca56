"""The CTC loss ops.

``seqfast::ctc_loss_forward(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity,
from_logits, keep_alpha=True, alpha_every=1) -> (neg_log_likelihood, log_alpha)``

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
- ``alpha_every = K > 1`` (CPU, float32 compute on the AVX2 / AVX-512 path only; the CUDA kernels, float64 and
  CPUs without AVX2 refuse it): ``log_alpha`` is instead the checkpoints, an int32 (N, ceil(T/K), 2, 2S+1)
  tensor: [n, c, 0, s] holds the float32 bits of the mantissa (``.view(torch.float32)``) and [n, c, 1, s] the
  exponent of alpha at frame cK, state s, in the recursion's extended-range form (ctc_loss_simd.h), exactly as
  the forward held it; zero mantissas past the last state, for frames at or past input_length, and below the
  first state that can still reach the end (2 target_length + 1 - 2 (input_length - cK)), which the forward
  leaves out, as it does for a loss without gradient (nothing there reaches the loss or the gradient). Backward
  recomputes each segment of K frames from its checkpoint (the same bits as the forward's rows) and takes the
  posteriors from the linear numbers: K ~ 8x less saved memory per K of 16, no log per state in the forward.
  The gradient differs from K = 1's by the posteriors' rounding only (a few float32 ulps of each posterior).

``seqfast::ctc_loss_backward(grad_nll, log_probs, targets, input_lengths, target_lengths,
neg_log_likelihood, log_alpha, blank, zero_infinity, from_logits, alpha_every=1) -> grad`` (alpha_every: the
forward's): (T, N, C) in
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

from seqfast import _backend, _extension, validation
from seqfast.ops import no_double_backward
from seqfast.ops._registry import define, register_autograd, register_kernels, vmap_fold, vmap_unfold
from seqfast.reference import ctc_loss as reference

FORWARD = define(
    "ctc_loss_forward",
    "(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, int blank, "
    "bool zero_infinity, bool from_logits, bool keep_alpha=True, int alpha_every=1) -> (Tensor, Tensor)",
)
BACKWARD = define(
    "ctc_loss_backward",
    "(Tensor grad_nll, Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, "
    "Tensor neg_log_likelihood, Tensor log_alpha, int blank, bool zero_infinity, bool from_logits, "
    "int alpha_every=1) -> Tensor",
)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def alpha_shape(T: int, N: int, S: int, dtype: torch.dtype, keep_alpha: bool, alpha_every: int
                ) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of the forward's second output (see the module docstring); refuses what no kernel does."""
    if alpha_every < 1:
        raise ValueError(f"seqfast::ctc_loss_forward: alpha_every must be >= 1, got {alpha_every}")
    if not keep_alpha:
        return (N, 0, 0), compute_dtype(dtype)
    if alpha_every == 1:
        return (N, T, 2 * S + 1), compute_dtype(dtype)
    if compute_dtype(dtype) != torch.float32:
        raise ValueError("seqfast::ctc_loss_forward: alpha_every > 1 needs float32 compute (float16 / bfloat16 / "
                         f"float32 log_probs), got {dtype}")
    return (N, -(-T // alpha_every), 2, 2 * S + 1), torch.int32


# Checkpoint spacing of the CPU float32 path: None chooses by size (choose_alpha_every); an int forces it (timing).
ALPHA_EVERY: int | None = None
# Bytes of one thread's segment scratch (its samples' K rows of alpha and emissions, 16 bytes a state) to aim at:
# well inside the 2 MiB L2 it shares with the log_probs rows and gradient rows streaming through. Below 8 frames
# the checkpoints themselves (8 bytes a state) cost more forward time and memory than the scratch's cache misses
# cost backward (benchmarks/NOTES.md, "CTC: checkpointed alpha").
SEGMENT_BYTES = 768 << 10
# On AVX-512, log_probs rows of at least this many bytes keep the full log_alpha table (choose_alpha_every).
TABLE_ROW_BYTES = 5120


def _constant_when_compiled(fn):
    """torch.compiler.assume_constant_result without its import of torch._dynamo (about 2 s, which ``import
    seqfast`` should not cost): torch's decorator only marks the function, and dynamo reads the mark when it traces
    a call. tests/test_dropin.py (test_constant_mark_is_torchs) checks that this mark is the one torch's decorator
    sets."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_when_compiled
def _cpu_isa() -> str:
    """The C++ kernels' ISA now. torch.compile takes the value at tracing as a constant of the graph, so that a
    compiled loss checkpoints as the eager one does (the same K, the same gradient bits); a cap set to "baseline"
    after compiling then meets the op's refusal of alpha_every > 1, which says why (torch._dynamo.reset() and
    compile again)."""
    from seqfast import _C

    return _C.cpu_isa()


@_constant_when_compiled
def _threads() -> int:
    """torch.get_num_threads(), likewise a constant of a compiled graph (it only sizes the checkpoint spacing)."""
    return torch.get_num_threads()


def choose_alpha_every(log_probs: torch.Tensor, targets: torch.Tensor, keep_alpha: bool) -> int:
    """The forward's alpha_every: 1 (the full log_alpha table) unless a gradient is to come on the CPU float32
    AVX2 / AVX-512 path and checkpoints pay: there, as far apart as lets a thread's segment scratch fit
    SEGMENT_BYTES, from 8 to 32 frames."""
    if not keep_alpha or log_probs.device.type != "cpu" or compute_dtype(log_probs.dtype) != torch.float32:
        return 1
    # Only the C++ kernels take checkpoints.
    if _backend.current() not in ("auto", "cpp") or not _extension.AVAILABLE:
        return 1
    isa = _cpu_isa()
    if isa == "baseline":
        return 1
    if ALPHA_EVERY is not None:
        return ALPHA_EVERY
    T, N, C = log_probs.shape
    S = targets.shape[1]
    # The recompute gathers a frame's emissions from its log_probs row K frames before the gradient pass streams
    # that row: the gathered cache lines (one per label at worst) are read twice, where the table costs a write and
    # a read of (2S+1) floats plus a log per state in the forward. On AVX-512, whose log is cheap, the table is kept
    # for long rows. Measured on two Xeons (NOTES, "CTC: the table or checkpoints, by row width"), forward+backward
    # with checkpoints against the table: rows of 2400 bytes 9-12 % faster, of 4000 bytes 1-7 % faster, of 6000
    # bytes and more 3-6 % slower, float32 and bfloat16 alike (the forward alone is 5-25 % faster with checkpoints
    # at every width). The choice looks at the row's width only, not at the target
    # length: S is the batch's longest target, and the table and the checkpoints round the posteriors differently,
    # so an S-dependent choice would give a sample other gradient bits in another batch (NOTES, "CTC: a sample's
    # gradient bits do not depend on its batch"). On AVX2 (Zen 3, NOTES, "Checkpoints for long rows with few labels
    # on AVX2") the same C = 5000 case ran its forward 13-17 % faster with checkpoints and its forward+backward
    # within the noise either way: the twice-read lines are a small part of the rows the gradient pass streams in
    # any case, so AVX2 always checkpoints.
    if isa != "avx2" and C * log_probs.element_size() >= TABLE_ROW_BYTES:
        return 1
    per_thread = -(-N // max(1, min(N, _threads())))
    row_bytes = 16 * (2 * S + 11) * per_thread
    return int(min(max(SEGMENT_BYTES // row_bytes, 8), 32))


@torch.library.register_fake("seqfast::ctc_loss_forward")
def _forward_fake(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity, from_logits,
                  keep_alpha=True, alpha_every=1):
    T, N, _ = log_probs.shape
    dtype = compute_dtype(log_probs.dtype)
    nll = log_probs.new_empty((N,), dtype=dtype)
    shape, alpha_dtype = alpha_shape(T, N, targets.shape[1], log_probs.dtype, keep_alpha, alpha_every)
    return nll, log_probs.new_empty(shape, dtype=alpha_dtype)


@torch.library.register_fake("seqfast::ctc_loss_backward")
def _backward_fake(grad_nll, log_probs, *rest):
    return torch.empty_like(log_probs, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    log_probs, targets, input_lengths, target_lengths, blank, zero_infinity, from_logits = inputs[:7]
    ctx.keep_alpha = inputs[7] if len(inputs) > 7 else True
    ctx.alpha_every = inputs[8] if len(inputs) > 8 else 1
    nll, log_alpha = output
    ctx.save_for_backward(log_probs, targets, input_lengths, target_lengths, nll, log_alpha)
    ctx.blank, ctx.zero_infinity, ctx.from_logits = blank, zero_infinity, from_logits
    ctx.backend = _backend.current()
    # log_alpha is never differentiated: without this autograd would hand backward a zero (N, T, 2S+1) tensor.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_nll, grad_log_alpha):
    log_probs, targets, input_lengths, target_lengths, nll, log_alpha = ctx.saved_tensors
    if grad_nll is None:  # only log_alpha was used: it carries no gradient
        return None, None, None, None, None, None, None, None, None
    if not ctx.keep_alpha:
        raise RuntimeError("seqfast::ctc_loss_forward ran with keep_alpha=False: its loss has no gradient")
    with no_double_backward.guard():
        grad = _backend.dispatch(
            ctx.backend, BACKWARD, grad_nll.contiguous(), log_probs, targets, input_lengths, target_lengths,
            nll, log_alpha, ctx.blank, ctx.zero_infinity, ctx.from_logits, ctx.alpha_every,
        )
    (grad,) = no_double_backward.mark("seqfast::ctc_loss_backward", (log_probs, grad_nll), grad)
    return grad, None, None, None, None, None, None, None, None


# torch.vmap: the vmapped dimension joins the batch (one call of the kernels; torch itself loops over the samples).
# The public function cannot read vmapped values, so the forward's rule checks them here, on the folded batch, as
# seqfast.validation checks an eager call's.


def _fold(x: torch.Tensor, bdim: int | None, size: int, dim: int) -> torch.Tensor:
    """vmap_fold into the batch dimension ``dim``, contiguous as the kernels read it."""
    return vmap_fold(x, bdim, size, dim).contiguous()


def _wrapped(*tensors: torch.Tensor) -> bool:
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


@torch.library.register_vmap("seqfast::ctc_loss_forward")
def _forward_vmap(info, in_dims, log_probs, targets, input_lengths, target_lengths, blank, zero_infinity,
                  from_logits, keep_alpha=True, alpha_every=1):
    B = info.batch_size
    lp = _fold(log_probs, in_dims[0], B, 1)
    tg, il, tl = (_fold(x, d, B, 0) for x, d in zip((targets, input_lengths, target_lengths), in_dims[1:4]))
    if torch.compiler.is_compiling():  # traced: device asserts, as a compiled call's checks
        validation.assert_ctc_values(tg, il, tl, lp.shape[0], lp.shape[2], blank, True)
    elif not _wrapped(tg, il, tl):  # the innermost of nested vmaps holds the values
        on_host = tg.device.type == "cpu" and il.device.type == "cpu" and tl.device.type == "cpu"
        validation.check_ctc_values(tg, il, tl, lp.shape[0], lp.shape[2], blank, True, on_host)
    nll, log_alpha = FORWARD(lp, tg, il, tl, blank, zero_infinity, from_logits, keep_alpha, alpha_every)
    return (vmap_unfold(nll, B, 0), vmap_unfold(log_alpha, B, 0)), (0, 0)


@torch.library.register_vmap("seqfast::ctc_loss_backward")
def _backward_vmap(info, in_dims, grad_nll, log_probs, targets, input_lengths, target_lengths, nll, log_alpha, blank,
                   zero_infinity, from_logits, alpha_every=1):
    B = info.batch_size
    g, tg, il, tl, n, la = (_fold(x, d, B, 0) for x, d in zip(
        (grad_nll, targets, input_lengths, target_lengths, nll, log_alpha), in_dims[:1] + in_dims[2:7]))
    grad = BACKWARD(g, _fold(log_probs, in_dims[1], B, 1), tg, il, tl, n, la, blank, zero_infinity, from_logits,
                    alpha_every)
    return vmap_unfold(grad, B, 1), 1


register_autograd("ctc_loss_forward", _backward, _setup_context)
register_kernels("ctc_loss_forward", "ctc_loss", reference.ctc_loss_forward)
register_kernels("ctc_loss_backward", "ctc_loss", reference.ctc_loss_backward)
