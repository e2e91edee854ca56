"""CTC loss on CPU (the C++ kernels behind the default backend) against the float64 reference and torch.

Sizes are awkward on purpose (state counts that are not multiples of the 8-lane vectors, C not a
multiple of 8, lengths below T) and small, so that the file runs in well under a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import seqfast
from seqfast.ops import ctc_loss as ctc_ops

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------
# Helpers


def make_case(T, N, C, S, *, blank=0, dtype=torch.float64, short=False, empty=True, seed=0):
    """Random log_probs (T, N, C) from log_softmax, padded targets (N, S) avoiding blank, lengths."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, N, C, generator=g, dtype=torch.float64) * 2
    labels = [c for c in range(C) if c != blank]
    targets = torch.tensor(labels)[torch.randint(0, len(labels), (N, S), generator=g)]
    low = 0 if empty else min(1, S)
    target_lengths = torch.randint(low, S + 1, (N,), generator=g)
    input_lengths = torch.randint(max(T // 2, 1), T + 1, (N,), generator=g) if short else torch.full((N,), T)
    return logits.log_softmax(2).to(dtype), targets, input_lengths, target_lengths


def loss_and_grad(fn, log_probs, *args, reduction="none", **kwargs):
    x = log_probs.detach().clone().requires_grad_()
    loss = fn(x, *args, reduction=reduction, **kwargs)
    (loss * grad_weights(loss)).sum().backward()
    return loss.detach(), x.grad


def grad_weights(loss):
    """Distinct per-sample output gradients, exact in every float dtype (multiples of 1/4 up to 16.5)."""
    return (0.5 + 0.25 * (torch.arange(loss.numel()) % 65)).to(loss.dtype).reshape(loss.shape)


def reference(log_probs, targets, input_lengths, target_lengths, **kwargs):
    """The float64 reference; it needs one non-empty target (it fails on a zero-width target tensor), torch
    in float64 stands in when every target is empty."""
    if max(list(target_lengths)) == 0:
        return torch_ctc(log_probs.double(), targets, input_lengths, target_lengths, **kwargs)
    with seqfast.backend("reference"):
        return loss_and_grad(seqfast.ctc_loss, log_probs.double(), targets, input_lengths, target_lengths, **kwargs)


def torch_ctc(log_probs, *args, **kwargs):
    return loss_and_grad(F.ctc_loss, log_probs, *args, **kwargs)


def concatenated(targets, target_lengths):
    return torch.cat([targets[n, : int(target_lengths[n])] for n in range(targets.shape[0])])


def assert_close64(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# float64: every argument form against the reference (1e-9) and torch


@pytest.mark.parametrize("blank", [0, 6])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("form", ["padded", "concat", "int32", "tuple", "list"])
def test_argument_forms_float64(blank, reduction, form):
    T, N, C, S = 13, 4, 7, 5
    lp, tg, il, tl = make_case(T, N, C, S, blank=blank, short=True, seed=blank + 1)
    args = {
        "padded": (tg, il, tl),
        "concat": (concatenated(tg, tl), il, tl),
        "int32": (tg.int(), il.int(), tl.int()),
        "tuple": (tg, tuple(il.tolist()), tuple(tl.tolist())),
        "list": (concatenated(tg, tl), il.tolist(), tl.tolist()),
    }[form]
    ours = loss_and_grad(seqfast.ctc_loss, lp, *args, blank=blank, reduction=reduction)
    ref = reference(lp, tg, il, tl, blank=blank, reduction=reduction)
    theirs = torch_ctc(lp, *args, blank=blank, reduction=reduction)
    for a, r, t in zip(ours, ref, theirs):
        assert_close64(a, r)
        assert_close64(a, t)


def test_module_and_unbatched():
    lp, tg, il, tl = make_case(9, 1, 5, 4, seed=3)
    module = seqfast.nn.CTCLoss(blank=0, reduction="sum")
    assert "reduction='sum'" in repr(module)
    ours = loss_and_grad(lambda x, *a, reduction: module(x, *a), lp[:, 0], tg[0], int(il[0]), int(tl[0]))
    # torch wants unbatched targets cut to the target length; seqfast also takes them padded.
    theirs = torch_ctc(lp[:, 0], tg[0, : int(tl[0])], il[0], tl[0], reduction="sum")
    assert ours[0].shape == () and ours[1].shape == (9, 5)
    for a, t in zip(ours, theirs):
        assert_close64(a, t)
    unbatched = loss_and_grad(seqfast.ctc_loss, lp[:, 0], tg[0], int(il[0]), int(tl[0]))
    assert unbatched[0].shape == ()
    assert_close64(unbatched[0], ours[0])
    # torch also takes unbatched targets as a padded batch of one, (1, S) (it unsqueezes log_probs only).
    row = loss_and_grad(seqfast.ctc_loss, lp[:, 0], tg[:1], il[0], tl[0], reduction="sum")
    theirs = torch_ctc(lp[:, 0], tg[:1], il[0], tl[0], reduction="sum")
    assert row[0].shape == theirs[0].shape == ()
    for a, t in zip(row, theirs):
        assert_close64(a, t)
    with pytest.raises(seqfast.validation.ArgumentError, match="batch size 2"):
        seqfast.ctc_loss(lp[:, 0], tg.expand(2, -1), il[0], tl[0])


@pytest.mark.parametrize(
    "T,N,C,S",
    [(1, 3, 4, 1), (1, 2, 3, 0), (6, 3, 4, 0), (30, 3, 5, 12), (17, 5, 33, 9)],
    ids=["T1", "T1-S0", "S0", "tight", "C33"],
)
def test_edge_shapes_float64(T, N, C, S):
    lp, tg, il, tl = make_case(T, N, C, S, short=True, seed=T + S)
    for zero_infinity in (False, True):
        ours = loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl, zero_infinity=zero_infinity)
        theirs = torch_ctc(lp, tg, il, tl, zero_infinity=zero_infinity)
        ref = reference(lp, tg, il, tl, zero_infinity=zero_infinity)
        for a, r, t in zip(ours, ref, theirs):
            assert_close64(a, r)
            assert_close64(a, t)


def test_repeated_labels_and_zero_input_length():
    T, C = 8, 4
    lp = torch.randn(T, 5, C, dtype=torch.float64).log_softmax(2)
    tg = torch.tensor([[1, 1, 1], [2, 2, 3], [1, 2, 1], [3, 3, 0], [1, 0, 0]])
    il = torch.tensor([8, 5, 3, 0, 0])
    tl = torch.tensor([3, 3, 3, 2, 0])
    ours = loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl)
    ref = reference(lp, tg, il, tl)
    for a, r in zip(ours, ref):
        assert_close64(a, r)
    assert ours[0][3] == float("inf") and ours[0][4] == 0  # no frame: only the empty target fits
    assert torch.all(ours[1][:, 4] == 0)  # nothing to learn from an empty input
    assert torch.isnan(ours[1][:, 3]).sum() == 0  # input length 0: every row is past the input
    assert torch.all(ours[1][5:, 1] == 0)  # rows past the input length


def test_zero_infinity_impossible_samples():
    # Sample 0 needs 2 * 3 - 1 = 5 frames for "1 1 1" but has 4; sample 1 is feasible.
    lp = torch.randn(4, 2, 3, dtype=torch.float64).log_softmax(2)
    tg = torch.tensor([[1, 1, 1], [1, 2, 0]])
    il, tl = torch.tensor([4, 4]), torch.tensor([3, 2])
    loss, grad = loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl)
    t_loss, t_grad = torch_ctc(lp, tg, il, tl)
    assert loss[0] == float("inf") and torch.isfinite(loss[1])
    assert torch.isnan(grad[:, 0]).all() and torch.isfinite(grad[:, 1]).all()
    assert_close64(loss, t_loss)
    assert_close64(grad, t_grad)
    loss, grad = loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl, zero_infinity=True)
    t_loss, t_grad = torch_ctc(lp, tg, il, tl, zero_infinity=True)
    assert loss[0] == 0 and torch.all(grad[:, 0] == 0)
    assert_close64(loss, t_loss)
    assert_close64(grad, t_grad)
    for reduction in ("sum", "mean"):
        a = loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl, reduction=reduction, zero_infinity=True)
        t = torch_ctc(lp, tg, il, tl, reduction=reduction, zero_infinity=True)
        for x, y in zip(a, t):
            assert_close64(x, y)


# ------------------------------------------------------------------------------------------------
# float32 and the reduced-precision dtypes


def test_float32_against_reference_and_torch():
    """Loss to 1e-5 relative; gradient no further from float64 than torch's own float32 gradient (x2)."""
    lp, tg, il, tl = make_case(70, 6, 11, 23, short=True, seed=7)
    ref_loss, ref_grad = reference(lp, tg, il, tl)
    loss, grad = loss_and_grad(seqfast.ctc_loss, lp.float(), tg, il, tl)
    t_loss, t_grad = torch_ctc(lp.float(), tg, il, tl)
    assert loss.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, t_loss, rtol=1e-5, atol=1e-5)
    ours_err = (grad.double() - ref_grad).abs().max().item()
    torch_err = (t_grad.double() - ref_grad).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-6, (ours_err, torch_err)


def test_gradient_through_log_softmax_matches_torch():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(25, 3, 9, generator=g)
    tg = torch.randint(1, 9, (3, 8), generator=g)
    il, tl = torch.tensor([25, 20, 17]), torch.tensor([8, 5, 0])
    grads = []
    for fn in (seqfast.ctc_loss, F.ctc_loss):
        x = logits.clone().requires_grad_()
        fn(x.log_softmax(2), tg, il, tl).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    """The kernels read half inputs as float32 and compute in float32, so against the float64 reference on
    the same (rounded) inputs the loss is float32-accurate; the gradient is float32-accurate and then
    rounded once to ``dtype``: one half-ulp of the output dtype, relative, on top of the float32 error."""
    lp, tg, il, tl = make_case(40, 4, 9, 12, short=True, seed=5)
    lp_half = lp.to(dtype)
    ref_loss, ref_grad = reference(lp_half.double(), tg, il, tl)
    for fn in (seqfast.ctc_loss, seqfast.ctc_loss_from_logits):
        loss, grad = loss_and_grad(fn, lp_half, tg, il, tl)
        assert loss.dtype == grad.dtype == dtype
        if fn is seqfast.ctc_loss_from_logits:  # log_softmax(log_probs) == log_probs up to rounding
            ref_loss2, ref_grad2 = reference(lp_half.double().log_softmax(2), tg, il, tl)
        else:
            ref_loss2, ref_grad2 = ref_loss, ref_grad
        eps = torch.finfo(dtype).eps
        # The loss is returned in dtype too: one rounding.
        torch.testing.assert_close(loss.double(), ref_loss2, rtol=eps, atol=1e-4)
        torch.testing.assert_close(grad.double(), ref_grad2, rtol=eps / 2, atol=1e-4)


@pytest.mark.parametrize("shape", [(41, 6, 37, 19), (80, 6, 13, 30), (110, 6, 40, 50), (23, 6, 75, 19)],
                         ids=["C37", "C13", "C40", "C75"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_half_inputs_are_the_float32_kernel_rounded_once(dtype, isa, shape):
    """16-bit log_probs are read exactly (the emissions gathered straight from the 16-bit rows, or from the row
    widened once where labels cover half the classes (on AVX2: C13, and C37 past its first frames), or looked up in
    the row's class emissions where labels outnumber classes (AVX-512: C13 four vectors of 8 classes, C40 eight), the
    gradient rows widened and narrowed eight at a time on AVX2, sixteen on AVX-512: C75 is two blocks of 32 and a
    masked tail there):
    loss and gradient are the float32 kernel's on the widened inputs, rounded once to dtype, bit for bit. Label
    counts below, at and past a vector of 8 (and 0), C not a multiple of 8, a NaN and a +inf log-prob, a -inf row."""
    from seqfast import _C

    order = ["baseline", "avx2", "avx512"]
    if order.index(_C.cpu_isa_supported()) < order.index(isa):
        pytest.skip(f"needs an {isa} CPU")
    g = torch.Generator().manual_seed(11)
    T, N, C, S = shape
    lp = torch.randn(T, N, C, generator=g).log_softmax(2)
    tg = torch.randint(1, C, (N, S), generator=g)
    il = torch.tensor([T, T - 1, T - 8, T, 20, T])
    tl = torch.tensor([S, 8, 7, 0, 9, S - 3])
    lp[6, 1, tg[1, 2]] = float("nan")
    lp[9, 2, 0] = float("inf")
    lp[12, 4] = float("-inf")
    lp_half = lp.to(dtype)
    previous = _C.set_cpu_isa(isa)
    try:
        half = loss_and_grad(seqfast.ctc_loss, lp_half, tg, il, tl, reduction="sum")
        wide = loss_and_grad(seqfast.ctc_loss, lp_half.float(), tg, il, tl, reduction="sum")
    finally:
        _C.set_cpu_isa(previous)
    assert half[1].dtype == dtype
    assert torch.equal(half[0].float().nan_to_num(1, 2, 3), wide[0].to(dtype).float().nan_to_num(1, 2, 3))
    assert torch.equal(half[1].float().nan_to_num(1, 2, 3), wide[1].to(dtype).float().nan_to_num(1, 2, 3))


# ------------------------------------------------------------------------------------------------
# from_logits


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_from_logits_equals_log_softmax_then_ctc(dtype, tol):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(31, 5, 13, generator=g, dtype=torch.float64) * 3).to(dtype)
    tg = torch.randint(1, 13, (5, 7), generator=g)
    il, tl = torch.tensor([31, 30, 12, 25, 1]), torch.tensor([7, 3, 5, 0, 1])
    for reduction in ("none", "mean"):
        fused = loss_and_grad(seqfast.ctc_loss_from_logits, logits, tg, il, tl, reduction=reduction,
                              zero_infinity=True)
        x = logits.double().clone().requires_grad_()
        two_step = F.ctc_loss(x.log_softmax(2), tg, il, tl, reduction=reduction, zero_infinity=True)
        (two_step * grad_weights(two_step)).sum().backward()
        torch.testing.assert_close(fused[0].double(), two_step.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(fused[1].double(), x.grad, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# Autograd, op registration, determinism


def test_gradcheck_float64():
    lp, tg, il, tl = make_case(6, 3, 4, 3, short=True, empty=False, seed=9)
    # The gradient w.r.t. log_probs follows torch's convention (it is the one w.r.t. the logits of a
    # preceding log_softmax), so the true Jacobian is checked through that log_softmax.
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: seqfast.ctc_loss(v.log_softmax(2), tg, il, tl, reduction="sum"), (x,))
    logits = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: seqfast.ctc_loss_from_logits(v, tg, il, tl, reduction="none"),
                                    (logits,))


def test_opcheck_both_ops():
    # Feasible samples only: an infinite loss has NaN gradients, which opcheck's comparisons reject.
    lp, tg, il, tl = make_case(7, 3, 5, 3, dtype=torch.float32, seed=4)
    for from_logits in (False, True):
        x = lp.clone().requires_grad_()
        torch.library.opcheck(ctc_ops.FORWARD, (x, tg, il, tl, 0, False, from_logits))
        nll, alpha = ctc_ops.FORWARD(lp, tg, il, tl, 0, False, from_logits)
        torch.library.opcheck(ctc_ops.BACKWARD, (torch.ones(3), lp, tg, il, tl, nll, alpha, 0, True, from_logits))


def test_op_outputs():
    lp, tg, il, tl = make_case(9, 3, 5, 4, short=True, seed=6)
    nll, alpha = ctc_ops.FORWARD(lp, tg, il, tl, 0, False, False)
    assert nll.shape == (3,) and alpha.shape == (3, 9, 9) and alpha.dtype == torch.float64
    with seqfast.backend("reference"):
        ref_nll, ref_alpha = ctc_ops.FORWARD(lp, tg, il, tl, 0, False, False)
    assert_close64(nll, ref_nll)
    # Where the alignment is defined (t < input length, s < 2 L + 1) log_alpha is the reference's.
    for n in range(3):
        rows, states = int(il[n]), 2 * int(tl[n]) + 1
        assert_close64(alpha[n, :rows, :states], ref_alpha[n, :rows, :states])
    assert ctc_ops.FORWARD(lp.half(), tg, il, tl, 0, False, False)[0].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("empty", [False, True])
@pytest.mark.parametrize("lengths", ["tensor", "list"])
def test_mean_reduction_is_the_per_sample_formula_bit_for_bit(dtype, empty, lengths):
    """'mean' divides by max(target_length, 1): the eager call skips the clamp when the checks saw no empty
    target. Loss and gradient equal (nll / clamp_min(tl, 1)).mean() on reduction='none' bit for bit, with and
    without an empty target (where dividing by 0 would give inf / NaN), eager and compiled."""
    lp, tg, il, tl = make_case(17, 6, 7, 5, dtype=dtype, short=True, empty=False, seed=23)
    if empty:
        tl = tl.clone()
        tl[2] = 0
    il_arg, tl_arg = (il.tolist(), tl.tolist()) if lengths == "list" else (il, tl)

    def per_sample(x):  # 16-bit: the float32 kernel on the widened input, the loss rounded once (as the op)
        nll = seqfast.ctc_loss(x.float(), tg, il_arg, tl_arg, reduction="none")
        return (nll / tl.clamp_min(1)).mean().to(x.dtype)

    expected = loss_and_grad(lambda x, *a, reduction: per_sample(x), lp)
    assert torch.isfinite(expected[0]).all()
    eager = loss_and_grad(seqfast.ctc_loss, lp, tg, il_arg, tl_arg, reduction="mean")
    compiled = loss_and_grad(torch.compile(seqfast.ctc_loss, backend="eager", fullgraph=False), lp, tg, il_arg,
                             tl_arg, reduction="mean")
    for got in (eager, compiled):
        assert got[0].dtype == dtype
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("from_logits", [False, True])
def test_forward_without_alpha_is_bit_identical(dtype, from_logits):
    lp, tg, il, tl = make_case(23, 5, 9, 6, short=True, dtype=dtype, seed=11)
    nll, alpha = ctc_ops.FORWARD(lp, tg, il, tl, 0, False, from_logits, True)
    nll_only, none = ctc_ops.FORWARD(lp, tg, il, tl, 0, False, from_logits, False)
    assert alpha.shape == (5, 23, 13) and none.shape == (5, 0, 0) and none.dtype == nll.dtype
    assert torch.equal(nll, nll_only)
    torch.library.opcheck(ctc_ops.FORWARD, (lp, tg, il, tl, 0, False, from_logits, False))
    x = lp.clone().requires_grad_()
    # The public function skips log_alpha exactly when no gradient can follow.
    fn = seqfast.ctc_loss_from_logits if from_logits else seqfast.ctc_loss
    with torch.no_grad():
        assert torch.equal(fn(x, tg, il, tl, reduction="none"), nll.to(dtype))
    assert torch.equal(fn(lp, tg, il, tl, reduction="none"), nll.to(dtype))
    with pytest.raises(RuntimeError, match="keep_alpha=False"):
        ctc_ops.FORWARD(x, tg, il, tl, 0, False, from_logits, False)[0].sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [seqfast.ctc_loss, seqfast.ctc_loss_from_logits])
def test_fused_backward_matches_two_pass(dtype, fn):
    # With a sample per thread the CPU backward fuses its passes; fewer samples than threads take the two-pass
    # route. Both must give the same bits (zero_infinity off: an infeasible sample's rows are NaN on both).
    lp, tg, il, tl = make_case(13, 3, 7, 9, short=True, dtype=dtype, seed=16)  # sample 2 is infeasible
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, 4):
            torch.set_num_threads(n_threads)
            results.append(loss_and_grad(fn, lp, tg, il, tl))
    finally:
        torch.set_num_threads(threads)
    (loss1, grad1), (loss4, grad4) = results
    assert torch.equal(loss1, loss4)
    assert torch.equal(grad1.nan_to_num(7.0), grad4.nan_to_num(7.0))
    assert grad1.isnan().equal(grad4.isnan()) and grad1[: il[2], 2].isnan().all() and loss1[2].isinf()


@pytest.mark.parametrize("T,N,C,S,dtype,isa", [
    (60, 11, 13, 9, torch.float32, None),
    (200, 9, 4700, 12, torch.float32, None),  # log_probs past 32 MiB: one run per thread
    (60, 11, 13, 9, torch.float64, None),  # the scalar kernels
    (60, 11, 13, 9, torch.float32, "baseline"),
])
def test_threads_share_samples_by_cost_same_bits(T, N, C, S, dtype, isa):
    # The CPU kernels hand threads runs of samples of about equal cost, more runs than threads where log_probs is
    # small (ctc_loss.cpp, for_sample_runs): a batch sorted by length, one with a long sample last and a batch of
    # one must give the 1-thread bits at any thread count. Between runs the same shape with other values goes
    # through, so that a sample no run covered would hold those (reused output buffers), not the right bits.
    from seqfast import _C

    lp, tg, _, tl = make_case(T, N, C, S, dtype=dtype, seed=41)
    other = lp.flip(2).contiguous()
    lengths = {
        "sorted": torch.linspace(T, T // 4, N).long(),
        "long_last": torch.cat([torch.full((N - 1,), T // 3), torch.tensor([T])]),
    }
    threads, old_isa = torch.get_num_threads(), _C.set_cpu_isa(isa or _C.cpu_isa())
    try:
        for name, il in lengths.items():
            batch = None
            for fn in (seqfast.ctc_loss, seqfast.ctc_loss_from_logits):
                runs = {}
                for n_threads in (1, 2, 3, 5):
                    torch.set_num_threads(n_threads)
                    loss_and_grad(fn, other, tg, il, tl)
                    runs[n_threads] = loss_and_grad(fn, lp, tg, il, tl)
                for n_threads, (loss, grad) in runs.items():
                    assert torch.equal(loss, runs[1][0]), (name, n_threads)
                    assert torch.equal(grad, runs[1][1]), (name, n_threads)
                if fn is seqfast.ctc_loss:
                    batch = runs[1]
                    # Against float64: no further off than torch's own float32 kernel, twice over.
                    exact, theirs = torch_ctc(lp.double(), tg, il, tl), torch_ctc(lp, tg, il, tl)
                    for ours, t, ref in zip(runs[2], theirs, exact):
                        err, t_err = ((x.double() - ref).abs().max().item() for x in (ours, t))
                        assert err <= 2 * t_err + 1e-6, (name, err, t_err)
            for n_threads in (1, 2):  # a batch of one: the batch's first sample, bit for bit
                torch.set_num_threads(n_threads)
                loss, grad = loss_and_grad(seqfast.ctc_loss, lp[:, :1].contiguous(), tg[:1], il[:1], tl[:1])
                assert torch.equal(loss, batch[0][:1]) and torch.equal(grad, batch[1][:, :1]), (name, n_threads)
    finally:
        torch.set_num_threads(threads)
        _C.set_cpu_isa(old_isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [seqfast.ctc_loss, seqfast.ctc_loss_from_logits])
def test_gradient_exp_fast_path_same_bits(dtype, fn):
    # The CPU gradient rows take exp on blocks of 16 entries, skipping exp's range handling where every entry of a
    # block is in range (ctc_loss_simd.h, exp_rows_impl). The same values in a block with one entry out of range
    # (-100) or NaN must give the same bits. Weights 0.5 / 0.75 / 1.0 and log_probs / logits cover g != 1, g == 1,
    # off == 0 and off != 0.
    T, N, C = 6, 3, 64
    v = torch.linspace(-20.0, -0.5, 16).to(dtype).double()  # exact in bfloat16 too
    rows = torch.full((T, N, C), -3.0, dtype=torch.float64)
    rows[..., 16:32] = v
    rows[..., 32:48] = v
    rows[..., 48:64] = v
    rows[..., 47] = -100.0
    if fn is seqfast.ctc_loss:
        rows[..., 63] = float("nan")  # a class off every path: the loss stays finite, its gradient is NaN
    rows += 0.01 * torch.arange(T * N, dtype=torch.float64).reshape(T, N, 1)  # rows differ (one bf16 ulp or more)
    lp = rows.to(dtype)
    tg = torch.tensor([[1, 2], [2, 2], [1, 1]])
    il, tl = torch.full((N,), T), torch.tensor([2, 2, 1])
    loss, grad = loss_and_grad(fn, lp, tg, il, tl)
    assert torch.isfinite(loss).all()
    assert torch.equal(grad[..., 16:31], grad[..., 32:47])
    if fn is seqfast.ctc_loss:
        assert torch.equal(grad[..., 16:31], grad[..., 48:63]) and grad[..., 63].isnan().all()
        # And against torch in the same run: no further from float64 than torch's float32 kernel (its gradient
        # rounded to the output dtype: torch's CPU kernel takes no bfloat16), twice over.
        exact = torch_ctc(lp.double(), tg, il, tl)[1]
        theirs = torch_ctc(lp.float(), tg, il, tl)[1].to(dtype)
        err = (grad.double() - exact).nan_to_num().abs().max().item()
        t_err = (theirs.double() - exact).nan_to_num().abs().max().item()
        assert err <= 2 * t_err + 1e-6, (err, t_err)


def test_deterministic():
    lp, tg, il, tl = make_case(120, 8, 37, 30, short=True, dtype=torch.float32, seed=8)
    runs = [loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl) for _ in range(2)]
    runs += [loss_and_grad(seqfast.ctc_loss_from_logits, lp, tg, il, tl) for _ in range(2)]
    for a, b in (runs[:2], runs[2:]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 12), N=st.integers(1, 3), C=st.integers(2, 6), S=st.integers(0, 6),
    blank_last=st.booleans(), short=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_against_reference(T, N, C, S, blank_last, short, seed):
    blank = C - 1 if blank_last else 0
    lp, tg, il, tl = make_case(T, N, C, S, blank=blank, short=short, seed=seed)
    ours = loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl, blank=blank, zero_infinity=True)
    ref = reference(lp, tg, il, tl, blank=blank, zero_infinity=True)
    for a, r in zip(ours, ref):
        assert_close64(a, r)


# ------------------------------------------------------------------------------------------------
# Validation: every check of seqfast.validation.ctc_arguments names its argument


def _valid():
    lp = torch.randn(6, 2, 4).log_softmax(2)
    return lp, torch.tensor([[1, 2], [3, 1]]), torch.tensor([6, 5]), torch.tensor([2, 1])


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: {**a, "log_probs": a["log_probs"][0, 0]}, "log_probs"),
        (lambda a: {**a, "log_probs": a["log_probs"].long()}, "log_probs"),
        (lambda a: {**a, "targets": a["targets"][None]}, "targets"),
        (lambda a: {**a, "targets": torch.tensor([[1, 2]])}, "batch size"),
        (lambda a: {**a, "input_lengths": torch.tensor([6])}, "input_lengths"),
        (lambda a: {**a, "target_lengths": [2, 1, 1]}, "target_lengths"),
        (lambda a: {**a, "input_lengths": torch.tensor([6, -1])}, "input_lengths"),
        (lambda a: {**a, "input_lengths": torch.tensor([7, 5])}, "input_lengths"),
        (lambda a: {**a, "target_lengths": torch.tensor([-1, 1])}, "target_lengths"),
        (lambda a: {**a, "target_lengths": torch.tensor([3, 1])}, "target_lengths"),
        (lambda a: {**a, "targets": torch.tensor([1, 2, 3, 1]), "target_lengths": [2, 1]}, "sum"),
        (lambda a: {**a, "blank": 4}, "blank"),
        (lambda a: {**a, "blank": -1}, "blank"),
        (lambda a: {**a, "targets": torch.tensor([[1, 4], [3, 1]])}, "targets"),
        (lambda a: {**a, "targets": torch.tensor([[1, -2], [3, 1]])}, "targets"),
        (lambda a: {**a, "targets": torch.tensor([[1, 0], [3, 1]])}, "targets"),
        (lambda a: {**a, "input_lengths": torch.tensor([6.0, 5.0])}, "input_lengths"),
        (lambda a: {**a, "target_lengths": [2.0, 1]}, "target_lengths"),
        (lambda a: {**a, "input_lengths": torch.tensor([True, True])}, "input_lengths"),
    ],
    ids=[
        "rank-1d", "int-log_probs", "targets-3d", "batch-mismatch", "input_lengths-count",
        "target_lengths-count", "negative-input_length", "input_length>T", "negative-target_length",
        "target_length>S", "concat-sum", "blank>=C", "blank<0", "label>=C", "label<0", "label==blank",
        "float-input_lengths", "float-target_lengths", "bool-input_lengths",
    ],
)
def test_validation_errors(change, match):
    lp, tg, il, tl = _valid()
    args = change({"log_probs": lp, "targets": tg, "input_lengths": il, "target_lengths": tl, "blank": 0})
    with pytest.raises(ValueError, match=match):
        seqfast.ctc_loss(**args)


def test_validation_ignores_padding_and_accepts_valid_forms():
    lp, tg, il, tl = _valid()
    tg_padded = tg.clone()
    tg_padded[1, 1] = 99  # past target_lengths[1] = 1: padding may hold anything
    a = seqfast.ctc_loss(lp, tg_padded, il, tl)
    b = seqfast.ctc_loss(lp, tg, il, tl)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="reduction"):
        seqfast.ctc_loss(lp, tg, il, tl, reduction="avg")


# ------------------------------------------------------------------------------------------------
# The cache of large output buffers (csrc/buffer_cache.h): log_alpha and the gradient come from it


def _big_case():
    # log_alpha (4, 300, 201) float32 is ~0.9 MiB: below the cache's 1 MiB floor; the gradient (300, 4, 400) is
    # ~1.8 MiB: above it.
    return make_case(300, 4, 400, 100, dtype=torch.float32, seed=21)


def test_buffer_cache_reuses_and_gives_same_bits():
    from seqfast import _C

    lp, tg, il, tl = _big_case()
    old = _C.buffer_cache_set_limit(0)  # off: plain allocations, idle blocks freed
    try:
        assert _C.buffer_cache_stats()["idle_bytes"] == 0
        plain = loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl)
        _C.buffer_cache_set_limit(64 << 20)
        runs = []
        for _ in range(3):
            before = _C.buffer_cache_stats()
            loss, grad = loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl)
            after = _C.buffer_cache_stats()
            runs.append((loss, grad.clone(), after["hits"] - before["hits"], after["misses"] - before["misses"]))
            del grad
        # First run: the gradient buffer is new; afterwards the freed one comes back.
        assert [r[2:] for r in runs] == [(0, 1), (1, 0), (1, 0)]
        for loss, grad, *_ in runs:
            assert torch.equal(loss, plain[0]) and torch.equal(grad, plain[1])
        stats = _C.buffer_cache_stats()
        assert 0 < stats["idle_bytes"] <= stats["limit_bytes"] == 64 << 20
        # A cached tensor is ordinary storage: resizable, freed from any thread.
        x = lp.detach().clone().requires_grad_()
        seqfast.ctc_loss(x, tg, il, tl).backward()
        x.grad.resize_(2 * x.grad.numel())
        x.grad.fill_(1.0)
    finally:
        _C.buffer_cache_set_limit(old)


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (Linux /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


_THP = os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _THP, reason="transparent huge pages are Linux's")
@pytest.mark.parametrize("switch", ["1", None])
def test_buffer_cache_large_blocks_ask_for_huge_pages_when_switched_on(switch):
    """With SEQFAST_CPU_HUGE_PAGES=1 (read when the cache is made, so in a fresh process), cached blocks of 2 MiB
    and more start on a 2 MiB boundary and are marked MADV_HUGEPAGE ("hg" in smaps); by default they are not."""
    code = (
        "import torch, seqfast, test_ctc_loss as t\n"
        "lp, tg, il, tl = t.make_case(300, 4, 500, 100, dtype=torch.float32, seed=22)  # gradient 2.3 MiB\n"
        "_, g = t.loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl)\n"
        "print(g.data_ptr() % (2 << 20) == 0, 'hg' in t._vm_flags(g.data_ptr()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "SEQFAST_CPU_HUGE_PAGES")}
    if switch is not None:
        env["SEQFAST_CPU_HUGE_PAGES"] = switch
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    aligned, flagged = out.stdout.strip().splitlines()[-1].split()
    if switch == "1":
        assert (aligned, flagged) == ("True", "True")
    else:
        assert flagged == "False"


def test_buffer_cache_blocks_are_seen_by_the_memory_profiler():
    """Cached outputs are reported to torch's profiler like the default allocator's (the benchmarks' peak-memory
    column and users' profiles rely on it), also when the block comes back from the cache."""
    from torch.profiler import ProfilerActivity, profile

    from seqfast import _C

    lp, tg, il, tl = _big_case()
    old = _C.buffer_cache_set_limit(64 << 20)
    try:
        loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl)  # the gradient's block is now idle in the cache
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _, grad = loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl)
            nbytes = grad.numel() * grad.element_size()
            del grad
        sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        block = -(-nbytes // 65536) * 65536  # the cache rounds sizes up to 64 KiB: no other allocation has this size
        assert nbytes != block and block in sizes and -block in sizes, (nbytes, sizes)
    finally:
        _C.buffer_cache_set_limit(old)


def test_buffer_cache_bounded_and_thread_safe():
    import threading

    from seqfast import _C

    lp, tg, il, tl = _big_case()
    expected = loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl)[1]
    old = _C.buffer_cache_set_limit(3 << 20)  # room for one gradient buffer, not two
    errors = []

    def work():
        try:
            for _ in range(5):
                grad = loss_and_grad(seqfast.ctc_loss, lp, tg, il, tl)[1]
                assert torch.equal(grad, expected)
                assert _C.buffer_cache_stats()["idle_bytes"] <= 3 << 20
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert 0 < _C.buffer_cache_stats()["idle_bytes"] <= 3 << 20
    finally:
        _C.buffer_cache_set_limit(old)


def test_buffer_cache_env_opt_out():
    import subprocess
    import sys

    code = (
        "import torch, seqfast; from seqfast import _C\n"
        "lp = torch.randn(300, 4, 400).log_softmax(2).requires_grad_()\n"
        "for _ in range(2):\n"
        "    seqfast.ctc_loss(lp, torch.randint(1, 400, (4, 100)), [300] * 4, [100] * 4).backward(); lp.grad = None\n"
        "s = _C.buffer_cache_stats(); print(s['limit_bytes'], s['idle_bytes'], s['hits'])\n"
    )
    env = {**__import__("os").environ, "SEQFAST_CPU_BUFFER_CACHE_MB": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "0", "0"]
    env["SEQFAST_CPU_BUFFER_CACHE_MB"] = "16"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    limit, idle, hits = map(int, out.split())
    assert limit == 16 << 20 and 0 < idle <= limit and hits >= 1


# ------------------------------------------------------------------------------------------------
# Every ISA path on one machine (seqfast._C.set_cpu_isa caps it, as SEQFAST_CPU_ISA does)


def _with_isa(isa, fn, *args):
    from seqfast import _C

    old = _C.set_cpu_isa(isa)
    try:
        return fn(*args)
    finally:
        _C.set_cpu_isa(old)


def _isa_cases():
    # State counts on both sides of 8- and 16-lane multiples, C not a multiple of 16, short inputs, an infeasible
    # sample (sample 2 of the last case), both input kinds and a frame-major block of more than one sample; then
    # small alphabets with more labels than classes (AVX-512 looks their emissions up in the row's class table).
    cases = [(37, 5, 11, 9, 30), (70, 6, 37, 23, 31), (40, 9, 1001, 15, 32), (13, 3, 7, 9, 16)]
    cases += [(90, 4, 6, 40, 33), (110, 3, 32, 50, 34), (150, 3, 45, 70, 35)]
    for T, N, C, S, seed in cases:
        yield make_case(T, N, C, S, short=True, dtype=torch.float32, seed=seed)
    # AVX-512 applies a row's label corrections 16 labels at a time: more than 16 distinct labels, one of them
    # at 20 positions beside labels at one or two, so that the lanes of a block run out at different counts.
    log_probs, _, input_lengths, _ = make_case(120, 2, 50, 44, dtype=torch.float32, seed=37)
    repeated = [1 if k % 2 == 0 and k < 40 else 2 + k for k in range(44)]
    targets = torch.tensor([repeated, [2 + (k % 24) for k in range(44)]])
    yield log_probs, targets, input_lengths, torch.tensor([44, 40])


@pytest.mark.parametrize("alpha_every", [1, 8], ids=["table", "checkpoints"])
def test_cpu_isa_paths_avx512_equals_avx2_bitwise(alpha_every, monkeypatch):
    """Both ISAs' kernels give the same bits, with the full log_alpha table and with checkpoints. The spacing is
    pinned: left to choose_alpha_every, the two ISAs may choose differently for the same shape (long rows with
    few labels keep the table on AVX-512 only), and the table and checkpoints differ in the gradient's last bits."""
    from seqfast import _C
    from seqfast.ops import ctc_loss as ctc_ops

    if _C.cpu_isa() != "avx512":
        pytest.skip("needs an AVX-512 CPU")
    monkeypatch.setattr(ctc_ops, "ALPHA_EVERY", alpha_every)
    for case in _isa_cases():
        for fn in (seqfast.ctc_loss, seqfast.ctc_loss_from_logits):
            for threads in (1, 2):
                prev = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    runs = {isa: _with_isa(isa, loss_and_grad, fn, *case) for isa in ("avx512", "avx2")}
                    assert _with_isa("avx512", _C.cpu_isa) == "avx512" and _with_isa("avx2", _C.cpu_isa) == "avx2"
                finally:
                    torch.set_num_threads(prev)
                (l5, g5), (l2, g2) = runs["avx512"], runs["avx2"]
                assert torch.equal(l5, l2)
                assert torch.equal(g5.nan_to_num(7.0), g2.nan_to_num(7.0)) and g5.isnan().equal(g2.isnan())


@pytest.mark.parametrize("C,blank", [(32, 0), (32, 20), (32, 31), (17, 16), (5, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_small_alphabet_gradient_rows_avx512_equal_avx2_bitwise(C, blank, dtype):
    """Alphabets of up to 32 classes take AVX-512's whole-row gradient (exp, the blank's and the labels'
    corrections in two registers): the same bits as AVX2's row, with the blank in either half of the row, labels
    repeated up to 12 times beside labels met once, and more than 16 distinct labels (two blocks of lanes)."""
    from seqfast import _C

    if _C.cpu_isa() != "avx512":
        pytest.skip("needs an AVX-512 CPU")
    log_probs, targets, input_lengths, _ = make_case(120, 3, C, 40, blank=blank, dtype=dtype, seed=C + blank)
    labels = [c for c in range(C) if c != blank]
    targets[0, :24] = labels[len(labels) // 2]
    targets[0, 24:] = torch.tensor(labels)[torch.arange(16) % len(labels)]
    target_lengths = torch.tensor([40, 40, 23])
    runs = {isa: _with_isa(isa, lambda: loss_and_grad(seqfast.ctc_loss, log_probs, targets, input_lengths,
                                                      target_lengths, blank=blank)) for isa in ("avx512", "avx2")}
    (l5, g5), (l2, g2) = runs["avx512"], runs["avx2"]
    assert torch.isfinite(l5).all() and g5.abs().sum() > 0
    assert torch.equal(l5, l2)
    assert torch.equal(g5, g2)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_cpu_isa_paths_against_reference(isa):
    from seqfast import _C

    for lp, tg, il, tl in list(_isa_cases())[:3]:
        ours = _with_isa(isa, loss_and_grad, seqfast.ctc_loss, lp, tg, il, tl)
        t_loss, t_grad = torch_ctc(lp, tg, il, tl)
        ref_loss, ref_grad = reference(lp.double(), tg, il, tl)
        torch.testing.assert_close(ours[0].double(), ref_loss, rtol=1e-5, atol=1e-5)
        ours_err = (ours[1].double() - ref_grad).abs().max().item()
        torch_err = (t_grad.double() - ref_grad).abs().max().item()
        assert ours_err <= 2 * torch_err + 1e-6, (isa, ours_err, torch_err)
    with pytest.raises(RuntimeError, match="set_cpu_isa"):
        _C.set_cpu_isa("sse9")


# Device reads of the argument checks, on the meta device: any read of a meta tensor's values raises, so a call
# that succeeds there read nothing from the device.


@pytest.mark.parametrize("form", ["list", "cpu-tensor"])
@pytest.mark.parametrize("concatenated", [False, True])
def test_ctc_checks_of_host_values_read_nothing_from_the_device(form, concatenated):
    from seqfast import validation

    lp = torch.empty(6, 2, 5, device="meta")
    il, tl = [6, 4], [3, 2]
    if form == "cpu-tensor":
        il, tl = torch.tensor(il, dtype=torch.int32), torch.tensor(tl)
    targets = torch.tensor([1, 2, 3, 4, 1]) if concatenated else torch.tensor([[1, 2, 3], [4, 1, 0]])
    args = validation.ctc_arguments(lp, targets, il, tl, 0)
    assert {t.device.type for t in (args.targets, args.input_lengths, args.target_lengths)} == {"meta"}
    assert args.targets.shape == (2, 3) and args.input_lengths.dtype == torch.int64
    with pytest.raises(validation.ArgumentError, match="input_lengths must be <= T"):
        validation.ctc_arguments(lp, targets, [7, 4], tl, 0)  # still checked, on the host


def test_ctc_host_checks_agree_with_the_python_and_device_ones():
    """The CPU tensors' checks run in C++ (_C.ctc_target_stats, one pass); they give what the Python host and device
    statistics give: length extremes, the target-length sum, and the first bad label where labels count (padding
    past a target's length holds anything; a length past S counts the whole row)."""
    from seqfast import _C, validation

    g = torch.Generator().manual_seed(5)
    for trial in range(60):
        N, S, C, blank = 1 + trial % 5, trial % 7, 3 + trial % 9, trial % 3
        padded = trial % 2 == 0
        tl = torch.randint(0, S + 2 if padded else 4, (N,), generator=g)
        il = torch.randint(0, 9, (N,), generator=g)
        tg = torch.randint(-1, C + 1, (N, S) if padded else (int(tl.sum()),), generator=g)
        if trial % 3 == 0:  # mostly valid labels, one bad one placed somewhere
            tg = torch.where((tg < 0) | (tg >= C) | (tg == blank), (blank + 1) % C, tg)
            if tg.numel():
                tg.view(-1)[int(torch.randint(0, tg.numel(), (1,), generator=g))] = blank
        ours = _C.ctc_target_stats(tg, il, tl, padded, C, blank)
        host = validation._ctc_stats_on_host(tg, il, tl, padded, C, blank)
        dev = validation._ctc_stats_on_device(tg, il, tl, padded, C, blank)
        dev = (*dev[:5], dev[5]() if callable(dev[5]) else dev[5])
        assert tuple(ours) == tuple(host) == dev, (trial, ours, host, dev)


def test_ctc_checks_of_device_values_read_once(monkeypatch):
    """Lengths and targets held on the device: one read, the statistics' (counted here; any other raises)."""
    from seqfast import validation

    reads = []

    def one_read(tg, il, tl, padded, C, blank):
        reads.append(tg.device.type)
        return 6, 6, 2, 3, 5, None  # the statistics of the values below

    monkeypatch.setattr(validation, "_ctc_stats_on_device", one_read)
    monkeypatch.setattr(validation, "_SHAPE_ONLY_DEVICES", ())  # meta stands in for a device with data here
    lp = torch.empty(6, 2, 5, device="meta")
    targets = torch.empty(2, 3, dtype=torch.int64, device="meta")
    il = torch.empty(2, dtype=torch.int64, device="meta")
    for tl in ([3, 2], torch.tensor([3, 2]), torch.empty(2, dtype=torch.int64, device="meta")):
        reads.clear()
        args = validation.ctc_arguments(lp, targets, il, tl, 0)
        assert reads == ["meta"] and args.target_lengths.device.type == "meta"
