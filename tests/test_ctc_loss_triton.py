"""The Triton CTC loss kernels (kernels/ctc_loss.py) through Triton's interpreter on CPU tensors.

Losses and gradients are compared with the float64 reference (seqfast/reference/ctc_loss.py) and
with torch.nn.functional.ctc_loss. Shapes stay tiny: the interpreter runs every program in numpy.

The interpreter is switched on by tests/conftest.py on machines without a GPU (never forced where one is).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import seqfast
from seqfast import _triton

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.usefixtures("on_kernel_device"),
    # log(0) = -inf is intended in the log-space recursion; numpy warns about it in the interpreter.
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-9, "atol": 1e-9}}


@pytest.fixture
def kernels(on_kernel_device):
    return _triton.kernels("ctc_loss", torch.empty(0, device=on_kernel_device))


def _loss_and_grad(backend, log_probs, targets, il, tl, weights=None, from_logits=False, **kw):
    """Loss (as returned) and d(sum(weights * loss))/d(log_probs) under a seqfast backend (None = torch)."""
    x = log_probs.detach().clone().requires_grad_()
    if backend is None:
        inp = x.log_softmax(-1) if from_logits else x
        loss = F.ctc_loss(inp, targets, il, tl, **kw)
    else:
        fn = seqfast.ctc_loss_from_logits if from_logits else seqfast.ctc_loss
        with seqfast.backend(backend):
            loss = fn(x, targets, il, tl, **kw)
    out = loss if weights is None else loss * weights
    (grad,) = torch.autograd.grad(out.sum(), x)
    return loss.detach(), grad


def _reference(log_probs, targets, il, tl, weights=None, from_logits=False, **kw):
    """The float64 reference on the (upcast) same input."""
    w = None if weights is None else weights.double()
    return _loss_and_grad("reference", log_probs.double(), targets, il, tl, w, from_logits, **kw)


def _problem(T, N, C, S, dtype, blank=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_probs = torch.randn(T, N, C, generator=g, dtype=torch.float64).mul(2).log_softmax(-1).to(dtype)
    labels = [c for c in range(C) if c != blank]
    targets = torch.tensor(labels)[torch.randint(0, len(labels), (N, S), generator=g)]
    return log_probs, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_and_torch(dtype):
    T, N, C, S = 7, 4, 5, 3
    log_probs, targets = _problem(T, N, C, S, dtype)
    targets[1] = torch.tensor([2, 2, 3])  # a repeated label: needs a blank between the two 2s
    il = torch.tensor([7, 6, 4, 7])  # lengths below T
    tl = torch.tensor([3, 3, 2, 0])  # an empty target
    w = torch.rand(N, dtype=dtype) + 0.5  # distinct grad_nll per sample
    loss, grad = _loss_and_grad("triton", log_probs, targets, il, tl, w, reduction="none")
    ref_loss, ref_grad = _reference(log_probs, targets, il, tl, w, reduction="none")
    t_loss, t_grad = _loss_and_grad(None, log_probs, targets, il, tl, w, reduction="none")
    assert loss.dtype == grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, **TOL[dtype])
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[dtype])
    torch.testing.assert_close(loss, t_loss, **TOL[dtype])
    torch.testing.assert_close(grad, t_grad, **TOL[dtype])
    assert (grad[4:, 2] == 0).all() and (grad[6:, 1] == 0).all()  # frames past input_lengths


def test_log_alpha_matches_reference(kernels):
    T, N, C, S = 5, 2, 4, 2
    log_probs, targets = _problem(T, N, C, S, torch.float64)
    il, tl = torch.tensor([5, 3]), torch.tensor([2, 1])
    nll, alpha = kernels.ctc_loss_forward(log_probs, targets, il, tl, 0, False, False)
    ref_nll, ref_alpha = seqfast.reference.ctc_loss.ctc_loss_forward(log_probs, targets, il, tl, 0, False, False)
    torch.testing.assert_close(nll, ref_nll, **TOL[torch.float64])
    for n in range(N):  # the kernel fills the frames and states the sample uses
        used = (slice(None, int(il[n])), slice(None, 2 * int(tl[n]) + 1))
        torch.testing.assert_close(alpha[n][used], ref_alpha[n][used], **TOL[torch.float64])


def test_forward_without_alpha_is_bit_identical(kernels):
    log_probs, targets = _problem(6, 3, 5, 2, torch.float32, seed=3)
    il, tl = torch.tensor([6, 4, 5]), torch.tensor([2, 1, 0])
    nll, alpha = kernels.ctc_loss_forward(log_probs, targets, il, tl, 0, False, False, True)
    nll_only, none = kernels.ctc_loss_forward(log_probs, targets, il, tl, 0, False, False, False)
    assert alpha.shape == (3, 6, 5) and none.shape == (3, 0, 0)
    assert torch.equal(nll, nll_only)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_computes_in_float32(dtype):
    T, N, C, S = 6, 3, 5, 2
    log_probs, targets = _problem(T, N, C, S, dtype)
    il, tl = torch.tensor([6, 5, 6]), torch.tensor([2, 1, 2])
    loss, grad = _loss_and_grad("triton", log_probs, targets, il, tl, reduction="sum")
    ref_loss, ref_grad = _reference(log_probs, targets, il, tl, reduction="sum")
    assert loss.dtype == grad.dtype == dtype
    # Computed in float32 from the exact half inputs: only the final rounding to half remains,
    # so the results sit within one ulp of the float64 reference rounded to the input dtype.
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(loss.double(), ref_loss, rtol=ulp, atol=0)
    torch.testing.assert_close(grad, ref_grad.to(dtype), rtol=ulp, atol=1e-6)
    # The float32 computation is far better than a half-precision one would be.
    torch.testing.assert_close(grad.double(), ref_grad, rtol=ulp, atol=1e-4)


@pytest.mark.parametrize("case", ["T1", "T1-empty", "S0", "blank-last", "zero-length-input"])
def test_edge_shapes(case):
    blank = 0
    if case == "T1":
        T, N, C, S, il, tl = 1, 2, 4, 1, [1, 1], [1, 1]
    elif case == "T1-empty":
        T, N, C, S, il, tl = 1, 2, 3, 1, [1, 1], [0, 1]
    elif case == "S0":
        T, N, C, S, il, tl = 4, 2, 3, 0, [4, 2], [0, 0]
    elif case == "blank-last":
        T, N, C, S, il, tl, blank = 6, 2, 4, 2, [6, 5], [2, 2], 3
    else:
        T, N, C, S, il, tl = 3, 2, 3, 1, [0, 3], [0, 1]
    log_probs, targets = _problem(T, N, C, S, torch.float64, blank=blank)
    il, tl = torch.tensor(il), torch.tensor(tl)
    kw = {"blank": blank, "reduction": "none"}
    loss, grad = _loss_and_grad("triton", log_probs, targets, il, tl, **kw)
    if case == "S0":
        # The reference's recursion does not handle a single state; the loss is the all-blank path.
        frames = torch.arange(T)[:, None] < il[None, :]
        torch.testing.assert_close(loss, -(log_probs[:, :, blank] * frames).sum(0), **TOL[torch.float64])
    else:
        ref_loss, ref_grad = _reference(log_probs, targets, il, tl, **kw)
        torch.testing.assert_close(loss, ref_loss, **TOL[torch.float64])
        torch.testing.assert_close(grad, ref_grad, **TOL[torch.float64])
    t_loss, t_grad = _loss_and_grad(None, log_probs, targets, il, tl, **kw)
    torch.testing.assert_close(loss, t_loss, **TOL[torch.float64])
    torch.testing.assert_close(grad, t_grad, **TOL[torch.float64])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(reduction):
    T, N, C, S = 6, 3, 4, 3
    log_probs, targets = _problem(T, N, C, S, torch.float32, seed=1)
    il, tl = torch.tensor([6, 6, 5]), torch.tensor([3, 1, 2])
    loss, grad = _loss_and_grad("triton", log_probs, targets, il, tl, reduction=reduction)
    t_loss, t_grad = _loss_and_grad(None, log_probs, targets, il, tl, reduction=reduction)
    assert loss.shape == ()
    torch.testing.assert_close(loss, t_loss, **TOL[torch.float32])
    torch.testing.assert_close(grad, t_grad, **TOL[torch.float32])


@pytest.mark.parametrize("zero_infinity", [True, False])
def test_impossible_sample(zero_infinity):
    T, N, C, S = 4, 2, 3, 3
    log_probs, targets = _problem(T, N, C, S, torch.float64, seed=2)
    targets[0] = torch.tensor([1, 1, 1])  # needs 5 frames, has 3
    il, tl = torch.tensor([3, 4]), torch.tensor([3, 2])
    kw = {"reduction": "none", "zero_infinity": zero_infinity}
    loss, grad = _loss_and_grad("triton", log_probs, targets, il, tl, **kw)
    t_loss, t_grad = _loss_and_grad(None, log_probs, targets, il, tl, **kw)
    if zero_infinity:
        assert loss[0] == 0 and (grad[:, 0] == 0).all()
    else:
        assert loss[0] == float("inf") and grad[:3, 0].isnan().all() and (grad[3:, 0] == 0).all()
    torch.testing.assert_close(loss, t_loss, **TOL[torch.float64])
    torch.testing.assert_close(grad, t_grad, equal_nan=True, **TOL[torch.float64])


@pytest.mark.parametrize("from_logits", [False, True])
def test_state_and_class_tiling(kernels, monkeypatch, from_logits):
    """2S+1 = 11 states in tiles of 4, per-label runs summed in tiles of 2 (sample 1's run of three 2s crosses a
    tile edge), classes in tiles of 4; the float64 backward
    capped at 128 registers (left to itself ptxas spilled these multi-tile sweeps under triton 3.6)."""
    monkeypatch.setattr(kernels, "MAX_STATE_BLOCK", 4)
    monkeypatch.setattr(kernels, "MAX_CLASS_BLOCK", 4)
    launches, launch = [], kernels._launch

    def spy(kernel, programs, args, **meta):
        launches.append((kernel.fn.__name__, meta))
        launch(kernel, programs, args, **meta)

    monkeypatch.setattr(kernels, "_launch", spy)
    blocks = kernels._blocks(11, torch.float64)
    assert blocks["BLOCK_S"] == 4 and blocks["BLOCK_L"] == 2
    assert kernels._row_blocks(6, "grad")["BLOCK_C"] == kernels._row_blocks(6, "lse")["BLOCK_C"] == 4
    T, N, C, S = 9, 2, 6, 5
    log_probs, targets = _problem(T, N, C, S, torch.float64, seed=3)
    if from_logits:
        log_probs = log_probs * 3.0 + 1.0  # unnormalised logits
    # Repeats adjacent (skip forbidden across a tile edge) and far apart (gathered across label tiles).
    targets[0] = torch.tensor([3, 1, 1, 4, 3])
    targets[1] = torch.tensor([2, 5, 2, 2, 5])
    il, tl = torch.tensor([9, 8]), torch.tensor([5, 5])
    w = torch.tensor([0.7, 1.3], dtype=torch.float64)
    kw = {"reduction": "none", "from_logits": from_logits}
    loss, grad = _loss_and_grad("triton", log_probs, targets, il, tl, w, **kw)
    ref_loss, ref_grad = _reference(log_probs, targets, il, tl, w, **kw)
    t_loss, t_grad = _loss_and_grad(None, log_probs, targets, il, tl, w, **kw)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float64])
    torch.testing.assert_close(grad, ref_grad, **TOL[torch.float64])
    torch.testing.assert_close(loss, t_loss, **TOL[torch.float64])
    torch.testing.assert_close(grad, t_grad, **TOL[torch.float64])
    assert [meta.get("maxnreg") for name, meta in launches if name == "_ctc_backward_kernel"] == [128]
    assert [(c["config"], c["options"]) for c in kernels.report_configs() if c["kernel"] == "ctc_backward"
            and c["config"].startswith(f"fp64-{'logits' if from_logits else 'logprobs'}-S128x")] == [
        (f"fp64-{'logits' if from_logits else 'logprobs'}-S128x-w4-r128", {"maxnreg": 128})]


def test_label_order_runs(kernels):
    """The backward's per-label layout: positions sorted by label (stable), padding past the target length last,
    run starts in bit 29 and run ends in bit 30."""
    targets = torch.tensor([[5, 2, 5, 5, 9, 2], [1, 1, 1, 7, 7, 7]])
    code = kernels._label_order(targets, torch.tensor([5, 3]))
    pos, starts, ends = code & 0x1FFFFFFF, (code >> 29) & 1, (code >> 30) & 1
    assert pos.tolist() == [[1, 0, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert starts[0, :5].tolist() == [1, 1, 0, 0, 1] and ends[0, :5].tolist() == [1, 0, 0, 1, 1]
    assert starts[1, :3].tolist() == [1, 0, 0] and ends[1, :3].tolist() == [0, 0, 1]
    assert kernels._label_order(targets[:, :0], torch.tensor([0, 0])).shape == (2, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_from_logits(dtype):
    T, N, C, S = 6, 3, 5, 2
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(T, N, C, generator=g) * 4 + 2).to(dtype)
    targets = torch.randint(1, C, (N, S), generator=g)
    targets[0] = torch.tensor([3, 3])
    il, tl = torch.tensor([6, 4, 5]), torch.tensor([2, 2, 1])
    loss, grad = _loss_and_grad("triton", logits, targets, il, tl, from_logits=True, reduction="sum")
    ref_loss, ref_grad = _reference(logits, targets, il, tl, from_logits=True, reduction="sum")
    assert loss.dtype == grad.dtype == dtype
    if dtype == torch.float32:
        t_loss, t_grad = _loss_and_grad(None, logits, targets, il, tl, from_logits=True, reduction="sum")
        torch.testing.assert_close(loss, t_loss, **TOL[dtype])
        torch.testing.assert_close(grad, t_grad, **TOL[dtype])
        torch.testing.assert_close(grad.double(), ref_grad, **TOL[dtype])
    else:
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-3, atol=0)
        torch.testing.assert_close(grad, ref_grad.half(), rtol=1e-3, atol=2**-14)
    # softmax - posterior sums to zero over the classes of every used frame.
    torch.testing.assert_close(grad.double().sum(-1), torch.zeros(T, N, dtype=torch.float64), rtol=0, atol=1e-3)


def test_deterministic(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "MAX_STATE_BLOCK", 4)
    T, N, C, S = 6, 2, 4, 4
    log_probs, targets = _problem(T, N, C, S, torch.float32, seed=5)
    targets[0] = torch.tensor([1, 2, 1, 2])
    il, tl = torch.tensor([6, 6]), torch.tensor([4, 3])
    first = _loss_and_grad("triton", log_probs, targets, il, tl, reduction="none")
    second = _loss_and_grad("triton", log_probs, targets, il, tl, reduction="none")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_report_configs_name_every_argument(kernels):
    configs = kernels.report_configs()
    assert {c["kernel"] for c in configs} == {"ctc_row_lse", "ctc_forward", "ctc_grad_fill", "ctc_backward"}
    for c in configs:
        assert list(c["signature"]) == c["fn"].arg_names, c["config"]
        assert {k for k, v in c["signature"].items() if v == "constexpr"} == set(c["constexprs"]), c["config"]
        assert c["num_warps"] in (1, 2, 4, 8, 16) and c["num_stages"] == 1
    labels = [(c["kernel"], c["config"]) for c in configs]
    assert len(labels) == len(set(labels))
    # Every launchable tile: the tiers the launcher picks for short, medium and long targets and rows.
    for kernel in ("forward", "backward"):
        for dtype, name in ((torch.float32, "fp32"), (torch.float64, "fp64")):
            launched = {kernels._blocks(2 * S + 1, dtype, kernel)["BLOCK_S"] for S in (0, 20, 60, 200, 1000, 2000)}
            listed = {c["constexprs"]["BLOCK_S"] for c in configs
                      if c["kernel"] == f"ctc_{kernel}" and c["config"].startswith(name)}
            assert launched == listed - {1024}, (kernel, dtype)
    for kernel in ("lse", "grad"):
        rows = {tuple(kernels._row_blocks(C, kernel).values()) for C in (64, 512, 1024, 5000)}
        assert rows == {(c["BLOCK_R"], c["BLOCK_C"], c["num_warps"]) for c in kernels.CONFIG_SPACE[kernel][:3]}


@pytest.mark.parametrize("seed", range(4))
def test_random_awkward_problems(kernels, monkeypatch, seed):
    """Random sizes, lengths, blank, tile caps and grad_nll against torch in float64."""
    g = torch.Generator().manual_seed(100 + seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    monkeypatch.setattr(kernels, "MAX_STATE_BLOCK", (2, 4, 8, 512)[seed])
    monkeypatch.setattr(kernels, "MAX_CLASS_BLOCK", (2, 4, 1024, 8)[seed])
    T, N, C, S = pick(1, 7), pick(1, 3), pick(2, 6), pick(0, 4)
    blank = pick(0, C - 1)
    log_probs = torch.randn(T, N, C, generator=g, dtype=torch.float64).mul(2).log_softmax(-1)
    labels = torch.tensor([c for c in range(C) if c != blank])
    targets = labels[torch.randint(0, len(labels), (N, S), generator=g)]
    il = torch.randint(0, T + 1, (N,), generator=g)
    tl = torch.minimum(torch.randint(0, S + 1, (N,), generator=g), il)
    w = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    kw = {"blank": blank, "reduction": "none", "zero_infinity": True}
    loss, grad = _loss_and_grad("triton", log_probs, targets, il, tl, w, **kw)
    t_loss, t_grad = _loss_and_grad(None, log_probs, targets, il, tl, w, **kw)
    torch.testing.assert_close(loss, t_loss, **TOL[torch.float64])
    torch.testing.assert_close(grad, t_grad, **TOL[torch.float64])


def _awkward_batch(T, N, C, S, dtype=torch.float64, seed=7):
    """log_probs and a batch with a repeat, an empty target, a short input and a target that cannot fit."""
    log_probs, targets = _problem(T, N, C, S, dtype, seed=seed)
    if S >= 3 and C >= 3:
        targets[0, :3] = torch.tensor([2, 2, 1])
    il = torch.tensor([T, T - 2, T, 1, T][:N])
    tl = torch.tensor([min(S, 3), 0, S, min(S, 1) + (S > 1), 1][:N])  # sample 3: 2 labels in 1 frame
    return log_probs, targets, il, tl


@pytest.mark.parametrize("from_logits", [False, True])
def test_grid_chunks_match_one_launch(kernels, monkeypatch, from_logits):
    """Launches split into chunks of 1 and 2 programs (the kernels offset their program ids) are bit-identical
    to single launches: every batch size works whatever the grid limit."""
    log_probs, targets, il, tl = _awkward_batch(6, 5, 4, 3)
    if from_logits:
        log_probs = log_probs * 2 + 1
    kw = {"reduction": "none", "from_logits": from_logits, "zero_infinity": True}
    w = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    whole = _loss_and_grad("triton", log_probs, targets, il, tl, w, **kw)
    for limit in (1, 2):
        monkeypatch.setattr(kernels, "MAX_GRID_PROGRAMS", limit)
        chunked = _loss_and_grad("triton", log_probs, targets, il, tl, w, **kw)
        assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
        # Row tiles that do not divide the T*N = 30 rows, in chunks too (other class tiles: other roundings).
        with kernels.forced_config("grad", {"BLOCK_R": 4, "BLOCK_C": 4, "num_warps": 4}), \
                kernels.forced_config("lse", {"BLOCK_R": 4, "BLOCK_C": 2, "num_warps": 4}):
            tiled = _loss_and_grad("triton", log_probs, targets, il, tl, w, **kw)
        torch.testing.assert_close(tiled[0], whole[0], **TOL[torch.float64])
        torch.testing.assert_close(tiled[1], whole[1], **TOL[torch.float64])


def test_forced_config_is_used_nested_and_checked(kernels):
    assert set(kernels.CONFIG_SPACE) == {"forward", "backward", "lse", "grad"}
    with pytest.raises(ValueError, match="unknown CTC kernel"):
        with kernels.forced_config("fwd", {"BLOCK_S": 32, "num_warps": 1}):
            pass
    default = kernels._blocks(11, torch.float32, "forward")
    with kernels.forced_config("forward", {"BLOCK_S": 2, "num_warps": 1}):
        assert kernels._blocks(11, torch.float32, "forward")["BLOCK_S"] == 2
        assert kernels._blocks(11, torch.float32, "backward") == kernels._blocks(11, torch.float32, "backward")
        with kernels.forced_config("forward", {"BLOCK_S": 8, "num_warps": 2}):
            assert kernels._blocks(11, torch.float32, "forward")["num_warps"] == 2
        assert kernels._blocks(11, torch.float32, "forward")["BLOCK_S"] == 2
    assert kernels._blocks(11, torch.float32, "forward") == default
    with kernels.forced_config("grad", {"BLOCK_R": 16, "BLOCK_C": 1024, "num_warps": 8}):
        assert kernels._row_blocks(37, "grad") == {"BLOCK_R": 16, "BLOCK_C": 64, "num_warps": 8}  # clipped to C


@pytest.mark.parametrize("from_logits", [False, True])
def test_every_config_of_the_space(kernels, from_logits):
    """Each candidate config of every launch (states in one or several tiles) gives the default's result."""
    log_probs, targets, il, tl = _awkward_batch(5, 4, 6, 4)
    kw = {"reduction": "none", "from_logits": from_logits, "zero_infinity": True}
    base = _loss_and_grad("triton", log_probs, targets, il, tl, **kw)
    for kernel, space in kernels.CONFIG_SPACE.items():
        for cfg in space[:2] + [{**space[0], "BLOCK_S": 2} if "BLOCK_S" in space[0] else space[-1]]:
            with kernels.forced_config(kernel, cfg):
                loss, grad = _loss_and_grad("triton", log_probs, targets, il, tl, **kw)
            torch.testing.assert_close(loss, base[0], **TOL[torch.float64], msg=f"{kernel} {cfg}")
            torch.testing.assert_close(grad, base[1], **TOL[torch.float64], msg=f"{kernel} {cfg}")


@pytest.mark.parametrize("C", [1, 2, 3, 37, 1000])
@pytest.mark.parametrize("from_logits", [False, True])
def test_awkward_class_counts(C, from_logits):
    """Row normalisers and gradient rows over C = 1 (blank only), 2, 3, 37 (a partial class tile) and 1000."""
    T, N = 4, 3
    S = 0 if C == 1 else 2
    g = torch.Generator().manual_seed(C)
    x = torch.randn(T, N, C, generator=g, dtype=torch.float64) * 3
    log_probs = x if from_logits else x.log_softmax(-1)
    targets = torch.randint(1, max(C, 2), (N, S), generator=g)
    il, tl = torch.tensor([4, 3, 2]), torch.tensor([S, min(S, 1), S])
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    kw = {"reduction": "none", "from_logits": from_logits, "zero_infinity": True}
    loss, grad = _loss_and_grad("triton", log_probs, targets, il, tl, w, **kw)
    t_loss, t_grad = _loss_and_grad(None, log_probs, targets, il, tl, w, **kw)
    torch.testing.assert_close(loss, t_loss, **TOL[torch.float64])
    torch.testing.assert_close(grad, t_grad, **TOL[torch.float64])


def test_cuda_launches_under_the_tensors_device(kernels):
    """Triton launches on torch's current device: the launchers enter the tensors' device, and nothing on CPU."""
    guard = kernels._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # built, not entered: no CUDA needed
    assert not isinstance(kernels._device_guard(torch.device("cpu")), torch.cuda.device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA stream synchronisations (GPU machines)")
@pytest.mark.parametrize("form", ["list", "cpu-tensor", "cuda-tensor", "all-on-host"])
@pytest.mark.parametrize("from_logits", [False, True])
def test_host_syncs_per_call_on_cuda(form, from_logits):
    """Loss and gradient make at most one host synchronisation (the length and label checks' one read), none
    when lengths and targets are given on the host; torch's sync debug mode warns at each one."""
    log_probs, targets = _problem(50, 4, 7, 5, torch.float32)
    lengths = ([50, 40, 30, 50], [5, 4, 0, 3])
    if form == "list":
        il, tl = lengths
    else:
        il, tl = (torch.tensor(v, device="cpu" if form != "cuda-tensor" else "cuda") for v in lengths)
    targets = targets.cpu() if form == "all-on-host" else targets.cuda()
    fn = seqfast.ctc_loss_from_logits if from_logits else seqfast.ctc_loss
    x = log_probs.cuda().requires_grad_()

    def call():
        fn(x, targets, il, tl).backward()

    call()  # compiles the kernels; the count starts warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= (0 if form == "all-on-host" else 1), syncs
