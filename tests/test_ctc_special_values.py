"""NaN and +-inf in the CTC loss's inputs: every seqfast path against torch.nn.functional.ctc_loss.

torch's behaviour, which seqfast follows (C++ kernels on every ISA, Triton kernels through the interpreter, the
reference), for ``ctc_loss`` and for ``ctc_loss_from_logits`` against ``ctc_loss(logits.log_softmax(-1))``:

- A NaN or +inf log-prob on a sample's blank or labels, at a frame t < input_length, makes its loss NaN when the
  state it sits on can still reach the end of an alignment: torch's log-space recursion spreads NaN along every
  transition from there, whether or not an alignment from the start reaches that state (frame 0 starts states 0
  and 1 only). zero_infinity zeroes +inf losses only, never NaN ones.
- A NaN loss has NaN gradients on every frame t < input_length (0 after); a +inf one too, or 0 with zero_infinity.
- Anywhere else (another class, a frame past the input length, a state that reaches no end) the loss is untouched
  and the gradient shows the value at its own entry: exp(NaN) = NaN, exp(+inf) = +inf.
- -inf is probability 0: the loss becomes +inf only when no alignment survives.
- From logits: a NaN or +inf logit, or a row of -inf, makes log_softmax NaN over the row, which then acts as a NaN
  row of log-probs; its gradient row is NaN (log_softmax's backward), past the input length too.

Where torch's gradient is an artefact of how it evaluates exp(lp) - exp(log(alpha beta) + nll - lp), seqfast
gives what that formula means instead, and the tests check seqfast's value there:
- at a -inf log-prob torch computes exp(-inf + nll + inf) = NaN; seqfast gives 0 (softmax 0, posterior 0), and
  from logits the finite softmax - posterior where log_softmax's backward spreads torch's NaN over the row;
- at a +inf log-prob on one of the sample's own classes that reaches no end (the loss stays finite) torch gets
  inf - inf = NaN (but +inf at the last frame); seqfast gives +inf, as on any other class;
- a NaN on a state that reaches no end leaves the loss finite in both, but torch's beta recursion carries the NaN
  back over the states before it (NaN gradients at earlier frames); seqfast shows it at its own entry only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE

import seqfast

pytestmark = [
    # The interpreter runs the Triton kernels in numpy, which warns about the very values under test.
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

NAN, INF = float("nan"), float("inf")
HALF = (torch.float16, torch.bfloat16)
TOL = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-9},
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}
ISAS = ("avx512", "avx2", "baseline")
BACKENDS = [*ISAS, "reference", pytest.param("triton", marks=pytest.mark.interpreter)]
# The interpreter is slow: Triton runs one reduction per zero_infinity setting (reductions are common Python code).
SETTINGS = [(r, z) for r in ("none", "sum", "mean") for z in (False, True)]
TRITON_SETTINGS = [("none", False), ("mean", True)]


# ------------------------------------------------------------------------------------------------
# Helpers


def _loss_and_grad(fn, x, reduction):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    # Distinct positive per-sample output gradients, exact in every dtype.
    w = 0.5 + 0.25 * torch.arange(loss.numel()).reshape(loss.shape) if reduction == "none" else 1.0
    (loss * w).sum().backward()
    return loss.detach(), x.grad


def _ours(backend, x, tg, il, tl, from_logits, reduction, zero_infinity):
    from seqfast import _C

    fn = seqfast.ctc_loss_from_logits if from_logits else seqfast.ctc_loss

    # The Triton kernels on the GPU where there is one (interpreted on the CPU otherwise); results back on the CPU.
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    on = [t.to(device) if isinstance(t, torch.Tensor) else t for t in (tg, il, tl)]

    def run(v):
        with seqfast.backend("cpp" if backend in ISAS else backend):
            return fn(v.to(device), *on, reduction=reduction, zero_infinity=zero_infinity).cpu()

    if backend not in ISAS:
        return _loss_and_grad(run, x, reduction)
    if backend == "avx512" and _C.cpu_isa() != "avx512":
        pytest.skip("needs an AVX-512 CPU")
    old = _C.set_cpu_isa(backend)
    try:
        return _loss_and_grad(run, x, reduction)
    finally:
        _C.set_cpu_isa(old)


def _torch_fn(tg, il, tl, from_logits, **kw):
    return lambda v: F.ctc_loss(v.log_softmax(-1) if from_logits else v, tg, il, tl, **kw)


def _expected(x, tg, il, tl, from_logits, reduction, zero_infinity):
    """torch's loss and gradient (in float32 for half inputs), its artefacts replaced as the module docstring says."""
    x = x.float() if x.dtype in HALF else x
    loss, grad = _loss_and_grad(
        _torch_fn(tg, il, tl, from_logits, reduction=reduction, zero_infinity=zero_infinity), x, reduction
    )
    with torch.no_grad():
        finite = torch.isfinite(_torch_fn(tg, il, tl, from_logits, reduction="none")(x))  # (N,)
    # -inf: where the loss is finite, torch's gradient of the same input with -inf -> -1e4 (exp gives 0 there just
    # the same). Not for rows of -inf alone: from logits they are NaN rows, not probability 0.
    neg = (x == -INF) & ~(x == -INF).all(-1, keepdim=True)
    if neg.any():
        fn = _torch_fn(tg, il, tl, from_logits, reduction=reduction, zero_infinity=zero_infinity)
        _, clamped = _loss_and_grad(fn, x.masked_fill(neg, -1e4), reduction)
        grad = torch.where(finite[None, :, None], clamped, grad)
    if not from_logits:  # +inf on a sample's own class, finite loss: +inf
        T, N, C = x.shape
        own = torch.zeros(N, C, dtype=torch.bool)
        own[:, 0] = True
        for n in range(N):
            own[n, tg[n, : int(tl[n])]] = True
        frames = torch.arange(T)[:, None] < torch.as_tensor(il)[None, :]
        grad = grad.masked_fill((x == INF) & own & frames[..., None] & finite[None, :, None], INF)
    return loss, grad


def _check(backend, make, dtype, from_logits):
    """Every reduction / zero_infinity setting of one case: seqfast's loss and gradient against torch's."""
    settings = TRITON_SETTINGS if backend == "triton" else SETTINGS
    x, tg, il, tl = make(from_logits)
    x = x.to(dtype)
    for reduction, zero_infinity in settings:
        loss, grad = _ours(backend, x, tg, il, tl, from_logits, reduction, zero_infinity)
        t_loss, t_grad = _expected(x, tg, il, tl, from_logits, reduction, zero_infinity)
        assert loss.dtype == grad.dtype == dtype
        msg = f"{backend} {reduction} zero_infinity={zero_infinity}"
        # Same NaN and inf positions (assert_close compares infinities exactly), values close elsewhere.
        torch.testing.assert_close(loss, t_loss.to(dtype), equal_nan=True, msg=msg, **TOL[dtype])
        torch.testing.assert_close(grad, t_grad.to(dtype), equal_nan=True, msg=msg, **TOL[dtype])


def _base(T, N, C, from_logits, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, N, C, generator=g, dtype=torch.float64)
    return logits if from_logits else logits.log_softmax(-1)


# ------------------------------------------------------------------------------------------------
# Cases: (from_logits) -> (input, targets, input_lengths, target_lengths), blank 0


def _one_value_per_sample(value):
    def make(from_logits):
        T, N, C = 6, 8, 6
        x = _base(T, N, C, from_logits)
        tg = torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2], [2, 3], [4, 5], [1, 2], [1, 1]])
        il = torch.tensor([6, 5, 4, 6, 6, 6, 6, 3])
        tl = torch.tensor([2, 2, 2, 2, 2, 2, 2, 2])
        x[1, 0, 1] = value  # on a label every alignment can use
        x[4, 1, 0] = value  # the blank at the last frame: the final state
        x[5, 2, 1] = value  # past the input length: ignored by the loss
        x[2, 3, 5] = value  # a class no alignment of sample 3 uses
        x[0, 4, 3] = value  # frame 0, second label: frame 0 starts states 0 and 1 only
        # sample 5: untouched; samples 6 and 7: -inf, probability 0, with the value elsewhere in the batch
        x[3, 6, 2] = -INF  # one label of one frame: other alignments survive
        x[:, 7, 1] = -INF  # the only label of the target in every frame: no alignment (+inf loss)
        return x, tg, il, tl

    return make


def _all_nan(from_logits):
    x = torch.full((6, 3, 5), NAN, dtype=torch.float64)
    return x, torch.tensor([[1, 2], [3, 3], [2, 4]]), torch.tensor([6, 4, 5]), torch.tensor([2, 2, 1])


def _whole_rows(from_logits):
    """Rows of -inf and NaN: -inf rows kill every alignment of log-probs (+inf) but are NaN rows from logits."""
    x = _base(6, 4, 5, from_logits, seed=1)
    x[2, 0] = -INF  # inside the input
    x[5, 1] = -INF  # past the input length
    x[3, 2] = NAN
    return x, torch.tensor([[1, 2], [3, 4], [2, 2], [4, 1]]), torch.tensor([6, 4, 6, 5]), torch.tensor([2, 2, 2, 1])


def _reach(from_logits):
    """Long targets, so that the states in play spread over several 8- and 16-lane vectors."""
    T, N, C = 24, 4, 12
    x = _base(T, N, C, from_logits, seed=2)
    tg = torch.arange(1, 11).repeat(N, 1)
    il = torch.tensor([24, 24, 8, 8])  # samples 2 and 3 cannot fit their 10 labels (+inf loss)
    tl = torch.full((N,), 10)
    x[1, 0, 10] = NAN  # last label at frame 1: no alignment from the start is there yet, but it reaches the end
    x[23, 1, 1] = NAN  # first label at the last frame: reaches no end (logits: the row's blank does)
    x[7, 2, 0] = NAN  # last frame's blank in an infeasible sample: reaches the end all the same (NaN, not +inf)
    x[0, 3, 5] = NAN  # frame 0, fifth label: not started (logits: the row's blank and first label reach no end)
    return x, tg, il, tl


def _small_alphabet(C):
    """More labels than classes (C <= 64): on AVX-512 a frame's emissions come from one exp per class of the row, so
    a value on a class outside a sample's target is seen there too, and must still leave that sample's loss alone."""

    def make(from_logits):
        L = max(20, C + 4)  # the lookup needs at least max(16, C) labels in a frame's range
        T, N = 2 * L + 10, 4
        x = _base(T, N, C, from_logits, seed=4)
        k = torch.arange(L)
        tg = torch.stack([k % (C - 1) + 1, k % 2 + 1, k % 3 + 1, k % (C - 2) + 1])
        il = torch.full((N,), T)
        tl = torch.full((N,), L)
        x[9, 0, 2] = NAN  # a label of sample 0 that alignments use: NaN loss
        x[3, 1, C - 1] = NAN  # a class outside sample 1's target (labels 1, 2): loss untouched
        x[30, 2, C - 2] = INF  # a class outside sample 2's target (labels 1, 2, 3)
        x[12, 3, 1] = -INF  # one label of one frame: other alignments survive
        return x, tg, il, tl

    return make


# ------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("from_logits", [False, True], ids=["log_probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "posinf"])
def test_one_value_per_sample(value, backend, dtype, from_logits):
    _check(backend, _one_value_per_sample(value), dtype, from_logits)


@pytest.mark.parametrize("from_logits", [False, True], ids=["log_probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_nan(backend, dtype, from_logits):
    _check(backend, _all_nan, dtype, from_logits)


@pytest.mark.parametrize("from_logits", [False, True], ids=["log_probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_rows(backend, dtype, from_logits):
    _check(backend, _whole_rows, dtype, from_logits)


@pytest.mark.parametrize("from_logits", [False, True], ids=["log_probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_reaching_the_end_or_not(backend, dtype, from_logits):
    _check(backend, _reach, dtype, from_logits)


@pytest.mark.parametrize("C", [6, 32, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_small_alphabet_long_targets(backend, dtype, C):
    _check(backend, _small_alphabet(C), dtype, False)


@pytest.mark.parametrize("from_logits", [False, True], ids=["log_probs", "logits"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend", ["avx2", "reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_half_inputs(backend, dtype, from_logits):
    # Computed in float32 (torch refuses half log-probs on CPU: it runs on the float32 upcast here).
    _check(backend, _one_value_per_sample(NAN), dtype, from_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "posinf"])
def test_value_on_a_state_that_reaches_no_end(value, backend, dtype):
    # The third deviation of the module docstring: the loss is torch's (finite), the gradient is torch's for the
    # same input with the value replaced by -inf (probability 0), except at the value's own entry.
    x = _base(6, 2, 5, False, seed=3)
    tg, il, tl = torch.tensor([[1, 2, 3], [2, 3, 4]]), torch.tensor([6, 6]), torch.tensor([3, 3])
    x[4, 0, 1] = value  # state 1 at frame 4 of 6: two frames cannot take it to state 5 or 6
    x = x.to(dtype)
    settings = TRITON_SETTINGS if backend == "triton" else SETTINGS
    for reduction, zero_infinity in settings:
        loss, grad = _ours(backend, x, tg, il, tl, False, reduction, zero_infinity)
        fn = _torch_fn(tg, il, tl, False, reduction=reduction, zero_infinity=zero_infinity)
        t_loss, t_grad = _loss_and_grad(fn, x, reduction)
        clean = x.clone()
        clean[4, 0, 1] = -1e4
        _, c_grad = _loss_and_grad(fn, clean, reduction)
        assert t_grad.isnan().sum() > 1  # torch: NaN at earlier frames too
        torch.testing.assert_close(loss, t_loss, **TOL[dtype])
        assert grad[4, 0, 1].isnan() if value != INF else grad[4, 0, 1] == INF
        grad[4, 0, 1] = c_grad[4, 0, 1]
        torch.testing.assert_close(grad, c_grad, **TOL[dtype])


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_past_the_float32_extended_range_stay_finite(backend, zero_infinity):
    """The AVX2 / AVX-512 float32 recursions count an emission below e^-8e7 as 0 and a loss past ~3.7e8 as +inf;
    a sample whose alignments all pass such log-probs (a diverged model's) has torch's finite loss all the same,
    recomputed in log space, so zero_infinity does not zero it. A sample too short for its labels stays +inf."""
    g = torch.Generator().manual_seed(7)
    T, C = 12, 5
    lp = torch.randn(T, 4, C, generator=g).log_softmax(-1)
    lp[:, 0, 2] = -1e8  # sample 0's label 2: one emission of e^-1e8 on every alignment
    lp[:, 1, :] -= 1e7  # sample 1: every emission below e^-1e7, the loss near 1.2e8
    lp[:, 2, 1] = -3e8  # sample 2: past the exponent range too
    tg = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 3, 1], [1, 1, 1]])
    il, tl = torch.tensor([T, T, T, 4]), torch.tensor([3, 3, 3, 3])  # sample 3 needs 5 frames
    want = F.ctc_loss(lp, tg, il, tl, reduction="none", zero_infinity=zero_infinity)
    assert torch.isfinite(want[:3]).all() and want[:3].min() > 8e7
    loss, _ = _ours(backend, lp, tg, il, tl, False, "none", zero_infinity)
    torch.testing.assert_close(loss[:3], want[:3], rtol=1e-6, atol=0)
    assert loss[3] == want[3]  # +inf, or 0 with zero_infinity
