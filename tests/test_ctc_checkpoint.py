"""CTC loss on CPU with checkpointed alpha (``alpha_every = K > 1``) against the full log_alpha table (K = 1).

The forward keeps every K-th frame's alpha row in extended-range form and backward recomputes each segment from it:
the recomputed rows are the forward's own bits, so every K > 1 must give the same gradient bits, and the loss is
the same bits as with K = 1. The posteriors then come from the linear numbers instead of exp(log alpha + ...):
against K = 1 the gradient differs by their rounding only, and it is no further from the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

import seqfast
from seqfast import _C
from seqfast.ops import ctc_loss as ctc_ops

pytestmark = pytest.mark.skipif(_C.cpu_isa_supported() == "baseline", reason="checkpoints need AVX2")


def _case(T, N, C, S, seed, dtype=torch.float32):
    """log_probs with short inputs, an empty target, repeated labels, an infeasible sample (target too long)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, N, C, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(1, C, (N, S), generator=g)
    targets[0, 1::2] = targets[0, 0::2][: targets[0, 1::2].numel()]  # sample 0: repeated labels
    il = torch.randint(max(T // 2, 1), T + 1, (N,), generator=g)
    il[0] = T
    tl = torch.randint(0, S + 1, (N,), generator=g)
    tl[1] = 0
    if N > 2:
        il[2], tl[2] = 2, S  # infeasible when S > 1: +inf loss
    return logits, targets, il, tl, dtype


CASES = [(13, 3, 7, 9, 1), (37, 5, 11, 9, 2), (70, 6, 37, 23, 3), (9, 4, 1001, 4, 4)]


def _run(case, K, from_logits, zero_infinity, threads=1, isa="avx2"):
    logits, tg, il, tl, dtype = case
    x = logits if from_logits else logits.log_softmax(2)
    x = x.to(dtype)
    old_isa, old_threads = _C.set_cpu_isa(isa), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        nll, alpha = ctc_ops.FORWARD(x, tg, il, tl, 0, zero_infinity, from_logits, True, K)
        g = torch.linspace(0.5, 1.5, nll.numel())
        grad = ctc_ops.BACKWARD(g, x, tg, il, tl, nll, alpha, 0, zero_infinity, from_logits, K)
    finally:
        torch.set_num_threads(old_threads)
        _C.set_cpu_isa(old_isa)
    return nll, alpha, grad


def _reference_grad(case, from_logits, zero_infinity):
    logits, tg, il, tl, dtype = case
    x = (logits if from_logits else logits.log_softmax(2)).to(dtype).double()
    nll, alpha = seqfast.reference.ctc_loss.ctc_loss_forward(x, tg, il, tl, 0, zero_infinity, from_logits)
    g = torch.linspace(0.5, 1.5, nll.numel(), dtype=torch.float64)
    return seqfast.reference.ctc_loss.ctc_loss_backward(g, x, tg, il, tl, nll, alpha, 0, zero_infinity, from_logits)


def _same(a, b):
    return torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])))
@pytest.mark.parametrize("from_logits", [False, True])
def test_checkpoints_give_the_full_tables_loss_and_one_gradient_for_every_spacing(case, from_logits):
    case = _case(*case)
    zero_infinity = from_logits  # both settings over the parametrisation
    nll1, alpha1, grad1 = _run(case, 1, from_logits, zero_infinity)
    ref = _reference_grad(case, from_logits, zero_infinity)
    T = case[0].shape[0]
    grads = {}
    for K in (2, 3, 5, 16, T + 4):  # T not a multiple of K, K > T
        for threads in (1, 2):  # the fused backward (a sample per thread) and the two-pass one
            for isa in ("avx2", "avx512") if _C.cpu_isa_supported() == "avx512" else ("avx2",):
                nll, alpha, grad = _run(case, K, from_logits, zero_infinity, threads, isa)
                assert alpha.shape == (case[0].shape[1], -(-T // K), 2, 2 * case[1].shape[1] + 1)
                assert _same(nll, nll1)
                grads[K, threads, isa] = grad
    first = next(iter(grads.values()))
    assert all(_same(g, first) for g in grads.values())  # recomputation reproduces the forward's rows exactly
    assert _same(first.isnan(), grad1.isnan()) and torch.equal(first == 0, grad1 == 0)
    # K = 1 takes exp(log alpha + log beta + nll) of float32 logs: each rounded to an ulp of its size (up to about
    # the loss), which is a relative error of the posterior; the linear posteriors round to a few ulps of 1 (all
    # posteriors are <= 1). So the two differ by at most ~2 ulp(|nll|) per posterior (gradient weights <= 1.5),
    # and the checkpointed one is no further from float64.
    ok = ~grad1.isnan()
    nll_max = nll1[nll1.isfinite()].abs().max().item()
    torch.testing.assert_close(first[ok], grad1[ok], rtol=0, atol=1.5 * (2e-6 + 2 * 2**-24 * nll_max))
    err_k = (first[ok].double() - ref[ok]).abs().max().item()
    err_1 = (grad1[ok].double() - ref[ok]).abs().max().item()
    assert err_k <= err_1 + 1e-7, (err_k, err_1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_checkpoints_with_half_inputs(dtype):
    case = _case(37, 5, 11, 9, 5, dtype)
    nll1, _, grad1 = _run(case, 1, False, True)
    nll4, _, grad4 = _run(case, 4, False, True, threads=2)
    nll7, _, grad7 = _run(case, 7, False, True)
    assert _same(nll4, nll1) and _same(nll7, nll1) and _same(grad4, grad7) and grad4.dtype == dtype
    torch.testing.assert_close(grad4.float(), grad1.float(), rtol=0, atol=1e-2)  # one half-precision rounding


def test_checkpoint_layout_is_the_documented_one():
    # [n, c, 0, s] the mantissa's float32 bits, [n, c, 1, s] the exponent of alpha at frame cK; zero past the
    # last state, for frames at or past input_length, and below the first state that can still reach the end
    # (2 target_length + 1 - 2 (input_length - cK)): the forward leaves those states out.
    logits, tg, il, tl, _ = _case(30, 4, 9, 6, 6)
    lp = logits.log_softmax(2).float()
    K = 4
    _, ck = ctc_ops.FORWARD(lp, tg, il, tl, 0, False, False, True, K)
    ref = seqfast.reference.ctc_loss.log_alpha(lp.double(), tg, 0)  # (N, T, 2S+1)
    assert ck.dtype == torch.int32
    m, e = ck[:, :, 0].view(torch.float32), ck[:, :, 1]
    log_ck = torch.where(m > 0, m.double().log() + e.double() * torch.log(torch.tensor(2.0, dtype=torch.float64)),
                         torch.tensor(float("-inf"), dtype=torch.float64))
    lived_out = 0
    for n in range(4):
        for c in range(ck.shape[1]):
            t, states = c * K, 2 * int(tl[n]) + 1
            if t >= int(il[n]):
                assert (m[n, c] == 0).all()
                continue
            live = max(0, states - 2 * (int(il[n]) - t))
            torch.testing.assert_close(log_ck[n, c, live:states], ref[n, t, live:states], rtol=1e-5, atol=1e-5)
            assert (m[n, c, states:] == 0).all() and (m[n, c, :live] == 0).all()
            assert (e[n, c, :live] == -(1 << 30)).all()  # kZeroE, the zeros' exponent
            lived_out += live > 0
    assert lived_out > 0  # the case has checkpoints with states left out


def test_opcheck_with_checkpoints():
    logits, tg, il, tl, _ = _case(11, 3, 5, 3, 7)
    lp = logits.log_softmax(2).float()
    il[2], tl[2] = 11, 2  # feasible samples only: opcheck's comparisons reject NaN gradients
    for from_logits in (False, True):
        x = (logits.float() if from_logits else lp).clone().requires_grad_()
        torch.library.opcheck(ctc_ops.FORWARD, (x, tg, il, tl, 0, False, from_logits, True, 4))
        nll, ck = ctc_ops.FORWARD(x.detach(), tg, il, tl, 0, False, from_logits, True, 4)
        torch.library.opcheck(ctc_ops.BACKWARD,
                              (torch.ones(3), x.detach(), tg, il, tl, nll, ck, 0, True, from_logits, 4))


def test_refusals():
    logits, tg, il, tl, _ = _case(8, 3, 5, 3, 8)
    lp = logits.log_softmax(2)
    with pytest.raises(RuntimeError, match="alpha_every must be >= 1"):
        ctc_ops.FORWARD(lp.float(), tg, il, tl, 0, False, False, True, 0)
    with pytest.raises(RuntimeError, match="float32 compute"):
        ctc_ops.FORWARD(lp, tg, il, tl, 0, False, False, True, 2)  # float64
    nll, ck = ctc_ops.FORWARD(lp.float(), tg, il, tl, 0, False, False, True, 2)
    with pytest.raises(RuntimeError, match="checkpoints"):
        ctc_ops.BACKWARD(torch.ones(3), lp.float(), tg, il, tl, nll, ck, 0, False, False, 3)  # not the forward's K
    old = _C.set_cpu_isa("baseline")
    try:
        with pytest.raises(RuntimeError, match="AVX2"):
            ctc_ops.FORWARD(lp.float(), tg, il, tl, 0, False, False, True, 2)
        with pytest.raises(RuntimeError, match="AVX2"):
            ctc_ops.BACKWARD(torch.ones(3), lp.float(), tg, il, tl, nll, ck, 0, False, False, 2)
    finally:
        _C.set_cpu_isa(old)


def test_checkpoint_choice_does_not_depend_on_the_batch(monkeypatch):
    # The table (K = 1) and the checkpoints round the posteriors differently, so the choice must not follow what the
    # batch changes: its longest target (the padded width S after trimming) or its size. A sample of a length-sorted
    # batch (target lengths 9 down to 3) and the same sample alone must get the same gradient bits on either ISA's
    # rule (the rule is patched, the kernels are this machine's: an S-dependent rule fails this on any machine).
    def width_one(C, S, N=3, dtype=torch.float32):
        return ctc_ops.choose_alpha_every(torch.zeros(20, N, C, dtype=dtype), torch.ones(N, S, dtype=torch.long), True)

    for isa in ("avx2", "avx512"):
        monkeypatch.setattr(ctc_ops, "_cpu_isa", lambda isa=isa: isa)
        for C in (5, 13, 64, 1000, 5000):
            for dtype in (torch.float32, torch.bfloat16):
                assert len({width_one(C, S, N, dtype) == 1 for S in (1, 3, 9, 200) for N in (1, 11)}) == 1, (isa, C)
        lp = torch.randn(60, 11, 13, generator=torch.Generator().manual_seed(5)).log_softmax(2)
        tg = torch.randint(1, 13, (11, 9), generator=torch.Generator().manual_seed(6))
        il, tl = torch.linspace(60, 15, 11).long(), torch.linspace(3, 9, 11).long()
        results = []
        for rows in (slice(None), slice(0, 1)):
            x = lp[:, rows].contiguous().requires_grad_()
            loss = seqfast.ctc_loss(x, tg[rows], il[rows], tl[rows], reduction="sum")
            loss.backward()
            results.append(x.grad[:, :1])
        assert torch.equal(*results), isa


def test_avx512_keeps_the_table_from_rows_of_5_kib(monkeypatch):
    # Rows of 4000 bytes ran forward+backward faster with checkpoints, rows of 6000 bytes with the table, on two Xeons
    # (NOTES, "CTC: the table or checkpoints, by row width"). The rule is patched to AVX-512's, so this holds on any
    # machine; AVX2 checkpoints at every width.
    tg = torch.ones(3, 20, dtype=torch.long)
    for isa in ("avx512", "avx2"):
        monkeypatch.setattr(ctc_ops, "_cpu_isa", lambda isa=isa: isa)
        cases = ((1000, torch.float32, False), (1279, torch.float32, False), (1280, torch.float32, True),
                 (2000, torch.bfloat16, False), (2560, torch.float16, True), (5000, torch.float32, True))
        for C, dtype, table in cases:
            rows = torch.zeros(50, 3, C, dtype=dtype)
            assert (ctc_ops.choose_alpha_every(rows, tg, True) == 1) == (table and isa == "avx512"), (isa, C, dtype)


def test_public_function_chooses_checkpoints_on_the_cpu_float32_path_only():
    logits, tg, il, tl, _ = _case(50, 3, 5, 6, 9)
    lp32 = logits.log_softmax(2).float().requires_grad_()
    assert ctc_ops.choose_alpha_every(lp32, tg, True) > 1
    assert ctc_ops.choose_alpha_every(lp32, tg, False) == 1  # no gradient to come: nothing is kept
    assert ctc_ops.choose_alpha_every(lp32.double(), tg, True) == 1
    # Long rows, few labels: on AVX-512 the recompute would re-read more log_probs lines than the table costs; on
    # AVX2 the table's log costs more than that.
    long_rows = torch.zeros(50, 3, 5000)
    for isa, table in (("avx2", False), ("avx512", True)):
        if _C.cpu_isa_supported() == "avx2" and isa == "avx512":
            continue
        old = _C.set_cpu_isa(isa)
        try:
            assert (ctc_ops.choose_alpha_every(long_rows, tg, True) == 1) == table
        finally:
            _C.set_cpu_isa(old)
    with seqfast.backend("reference"):
        assert ctc_ops.choose_alpha_every(lp32, tg, True) == 1
    old = _C.set_cpu_isa("baseline")
    try:
        assert ctc_ops.choose_alpha_every(lp32, tg, True) == 1
        loss = seqfast.ctc_loss(lp32, tg, il, tl)  # the scalar path keeps the full table
        loss.backward()
    finally:
        _C.set_cpu_isa(old)
    base_grad, lp32.grad = lp32.grad, None
    seqfast.ctc_loss(lp32, tg, il, tl).backward()
    torch.testing.assert_close(lp32.grad, base_grad, rtol=0, atol=1e-5, equal_nan=True)
    # What the forward saves for backward: the checkpoints instead of the (N, T, 2S+1) table.
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        seqfast.ctc_loss(lp32, tg, il, tl)
    K = ctc_ops.choose_alpha_every(lp32, tg, True)
    (ck,) = [t for t in saved if t.dtype == torch.int32]
    assert ck.shape == (3, -(-50 // K), 2, 13)
    assert not any(t.shape == (3, 50, 13) for t in saved)
