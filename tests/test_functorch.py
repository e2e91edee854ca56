"""seqfast's ops under torch.func transforms (grad, vjp, jacrev, vmap), against torch's own ops in the same run.

The eager calls' autograd is C++ (csrc/autograd.cpp), which functorch refuses; under a gradient transform the ops
take their Python formula instead (seqfast._backend), and vmap folds its dimension into the attention batch. What
torch refuses (a second derivative of the fused kernels, forward-mode AD) seqfast refuses too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import seqfast
from seqfast import _backend
from seqfast.validation import ArgumentError


def close64(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def attention_inputs(seed=0, B=3, H=2, Lq=5, Lk=7, D=4):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for L in (Lq, Lk, Lk))
    mask = torch.randn(B, 1, Lq, Lk, generator=g, dtype=torch.float64)
    return q, k, v, mask


def ctc_inputs(dtype=torch.float64, seed=0, T=12, N=3, C=6, S=4):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(T, N, C, generator=g, dtype=torch.float64).log_softmax(-1).to(dtype)
    tg = torch.randint(1, C, (N, S), generator=g)
    return lp, tg, torch.tensor([T, T - 2, T - 5]), torch.tensor([S, 2, 3])


SDPA = [F.scaled_dot_product_attention, seqfast.scaled_dot_product_attention]


@pytest.mark.parametrize("kind", ["plain", "causal", "float mask"])
def test_grad_and_jacrev_of_attention_match_torch(kind):
    q, k, v, mask = attention_inputs()
    kwargs = {"is_causal": True} if kind == "causal" else {"attn_mask": mask} if kind == "float mask" else {}

    def loss(f):
        return lambda q, k, v: (f(q, k, v, **kwargs) * torch.linspace(-1, 1, 4, dtype=q.dtype)).square().sum()

    theirs, ours = (torch.func.grad(loss(f), argnums=(0, 1, 2))(q, k, v) for f in SDPA)
    for a, b in zip(ours, theirs):
        close64(a, b)
    jac_kwargs = {} if kind == "float mask" else kwargs
    jac = [torch.func.jacrev(lambda q, f=f: f(q, k[:1], v[:1], **jac_kwargs).sum(-1))(q[:1]) for f in SDPA]
    close64(jac[1], jac[0])
    out, vjp_fn = torch.func.vjp(lambda q: seqfast.scaled_dot_product_attention(q, k, v, **kwargs), q)
    ref_out, ref_vjp = torch.func.vjp(lambda q: F.scaled_dot_product_attention(q, k, v, **kwargs), q)
    close64(out, ref_out)
    close64(vjp_fn(torch.ones_like(out))[0], ref_vjp(torch.ones_like(ref_out))[0])


def test_per_sample_gradients_of_attention_match_torch():
    """vmap(grad(...)): per-sample gradients, the vmapped dimension folded into the kernels' batch; key and value
    shared across the vmap (in_dims None) as well as per sample."""
    q, k, v, _ = attention_inputs(seed=1)

    def per_sample(f, in_dims):
        loss = torch.func.grad(lambda q1, k1, v1: f(q1, k1, v1).square().sum(), argnums=(0, 1, 2))
        return torch.vmap(loss, in_dims=in_dims)(q, k if in_dims[1] == 0 else k[0], v if in_dims[2] == 0 else v[0])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for in_dims in [(0, 0, 0), (0, None, None)]:
            theirs, ours = (per_sample(f, in_dims) for f in SDPA)
            for a, b in zip(ours, theirs):
                close64(a, b)
        # vmap of the forward alone, with a batched mask and the vmapped dimension not in front
        q, k, v, mask = attention_inputs(seed=2)
        args = (q.movedim(0, 2), k, v, mask.expand(3, 2, 5, 7))
        theirs, ours = (torch.vmap(f, in_dims=(2, 0, 0, 0))(*args) for f in SDPA)
        close64(ours, theirs)
    # torch's own ops take its per-sample fallback (and warn); seqfast's have batching rules.
    assert not [w for w in caught if "seqfast::" in str(w.message)]


def test_second_order_and_forward_mode_refused_as_torch():
    q, k, v, _ = attention_inputs()
    for f, match in [(F.scaled_dot_product_attention, "derivative for aten::"),
                     (seqfast.scaled_dot_product_attention, "derivative for seqfast::attention_backward")]:
        with pytest.raises(RuntimeError, match=match):
            torch.func.grad(lambda q, f=f: torch.func.grad(lambda q: f(q, k, v).square().sum())(q).sum())(q)
        with pytest.raises(NotImplementedError):
            torch.func.jvp(lambda q, f=f: f(q, k, v), (q,), (torch.ones_like(q),))
    lp, tg, il, tl = ctc_inputs()
    with pytest.raises(RuntimeError, match="derivative for seqfast::ctc_loss_backward"):
        torch.func.grad(lambda x: torch.func.grad(lambda x: seqfast.ctc_loss(x, tg, il, tl))(x).sum())(lp)


def _forward_ad_cases():
    import torch.autograd.forward_ad as fwAD

    q, k, v, mask = attention_inputs()
    lp, tg, il, tl = ctc_inputs()
    packed = q[0].transpose(0, 1).contiguous()  # (total 5, H, D): two sequences of 2 and 3
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)

    def dual(t):
        return fwAD.make_dual(t, torch.ones_like(t))

    cases = {}
    for name, f in zip(("torch", "seqfast"), SDPA):
        cases[f"sdpa dual query ({name})"] = lambda f=f: f(dual(q), k, v)
        cases[f"sdpa dual value, causal ({name})"] = lambda f=f: f(q, k, dual(v), is_causal=True)
        cases[f"sdpa dual mask ({name})"] = lambda f=f: f(q, k, v, attn_mask=dual(mask))
    for name, f in (("torch", F.ctc_loss), ("seqfast", seqfast.ctc_loss)):
        cases[f"ctc_loss dual log_probs ({name})"] = lambda f=f: f(dual(lp), tg, il, tl)
    cases["varlen_attn dual key (seqfast)"] = lambda: seqfast.varlen_attn(packed, dual(packed), packed, cu, cu, 3, 3)
    module = seqfast.nn.MultiheadAttention(4, 2, batch_first=True, dtype=torch.float64)
    cases["MultiheadAttention dual query (seqfast)"] = lambda: module(dual(q[0]), q[0], q[0])
    return cases


@pytest.mark.parametrize("case", list(_forward_ad_cases()))
def test_forward_ad_refused_as_torch(case):
    """torch.autograd.forward_ad: torch's fused kernels have no forward formula and refuse a dual input; seqfast's
    ops refuse it the same way (before, they returned an output without a tangent: a silently wrong JVP)."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward AD"):
        _forward_ad_cases()[case]()


def test_forward_ad_refused_without_the_extension_too():
    """Without the extension (CUDA with another torch than the build's) the ops' autograd is torch.library's, which
    gives a dual input that needs no gradient an output without a tangent (checked here on a toy op); seqfast's
    dispatch refuses such a dual itself there (gpu_validate checks it on the device)."""
    import torch.autograd.forward_ad as fwAD

    lib = torch.library.Library("seqfast_fwad_probe", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CPU")
    torch.library.register_autograd("seqfast_fwad_probe::twice", lambda ctx, g: g * 2,
                                    setup_context=lambda ctx, inputs, output: None, lib=lib)
    op, x = torch.ops.seqfast_fwad_probe.twice, torch.randn(3)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones(3))
        assert fwAD.unpack_dual(op(dual)).tangent is None  # what torch.library's autograd does
        with pytest.raises(NotImplementedError, match="forward AD"):
            _backend.refuse_forward_ad(op, (dual,))
        _backend.refuse_forward_ad(op, (x, 1.0, None))  # no dual: nothing refused
    _backend.refuse_forward_ad(op, (x,))

def test_forward_ad_level_without_duals_changes_nothing():
    import torch.autograd.forward_ad as fwAD

    q, k, v, mask = attention_inputs()
    lp, tg, il, tl = ctc_inputs()
    outside = seqfast.scaled_dot_product_attention(q, k, v, attn_mask=mask), seqfast.ctc_loss(lp, tg, il, tl)
    with fwAD.dual_level():
        inside = seqfast.scaled_dot_product_attention(q, k, v, attn_mask=mask), seqfast.ctc_loss(lp, tg, il, tl)
    for a, b in zip(inside, outside):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_of_ctc_matches_torch_and_eager(dtype, reduction):
    lp, tg, il, tl = ctc_inputs(dtype)
    theirs, ours = (torch.func.grad(lambda x, f=f: f(x, tg, il, tl, reduction=reduction))(lp)
                    for f in (F.ctc_loss, seqfast.ctc_loss))
    x = lp.clone().requires_grad_()
    seqfast.ctc_loss(x, tg, il, tl, reduction=reduction).backward()
    if dtype == torch.float64:
        close64(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # The same kernels and formula as the eager call: the same bits.
    assert torch.equal(ours, x.grad)
    logits = lp.double() * 1.5
    fused = torch.func.grad(lambda z: seqfast.ctc_loss_from_logits(z, tg, il, tl, reduction=reduction))(logits)
    two_step = torch.func.grad(lambda z: F.ctc_loss(z.log_softmax(-1), tg, il, tl, reduction=reduction))(logits)
    close64(fused, two_step)


CTC_FNS = [F.ctc_loss, seqfast.ctc_loss]


def _quiet(fn):
    """fn() with torch's "no batching rule, falling back to a loop" warning, which its ctc_loss gives, silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ctc_under_vmap_matches_torch(dtype, reduction):
    """vmap over ctc_loss, every way the batch can come in, and with gradients (per-sample through vmap(grad),
    grad(vmap), torch.autograd outside vmap), against torch's per-sample fallback: the vmapped dimension is folded
    into the kernels' batch (seqfast/ops/ctc_loss.py) and the values checked there."""
    g = torch.Generator().manual_seed(5)
    B, T, N, C, S = 3, 12, 2, 6, 4
    lp = torch.randn(B, T, N, C, generator=g, dtype=torch.float64).log_softmax(-1).to(dtype)
    tg = torch.randint(1, C, (B, N, S), generator=g)
    il, tl = torch.tensor([12, 9]), torch.tensor([4, 3])
    il_b = torch.tensor([[12, 7], [10, 12], [8, 8]])
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)

    def both(make):
        theirs, ours = (_quiet(lambda f=f: make(f)) for f in CTC_FNS)
        torch.testing.assert_close(ours, theirs, **tol)

    both(lambda f: torch.vmap(lambda x, y: f(x, y, il, tl, reduction=reduction))(lp, tg))
    both(lambda f: torch.vmap(lambda y, z: f(lp[0], y, z, tl, reduction=reduction))(tg, il_b))  # shared log_probs
    both(lambda f: torch.vmap(lambda x: f(x, tg[0], il, tl, reduction=reduction))(lp))  # shared targets
    # The unbatched form per sample: (T, C) log-probs, (S,) targets (torch: of the target's length), 0-d lengths.
    flat = lp[0].transpose(0, 1)  # (N, T, C)
    both(lambda f: torch.vmap(lambda x, y, a, b: f(x, y, a, b, reduction=reduction))(flat, tg[0], il,
                                                                                     torch.tensor([S, S])))
    # Nested: two vmapped dimensions, the outer over log_probs only.
    both(lambda f: torch.vmap(torch.vmap(lambda x, y: f(x, y, il, tl, reduction=reduction)), in_dims=(0, None))(
        torch.stack([lp, lp.flip(0)]), tg))
    # Gradients.
    both(lambda f: torch.vmap(torch.func.grad(lambda x, y: f(x, y, il, tl, reduction=reduction).sum()))(lp, tg))
    both(lambda f: torch.func.grad(lambda x: torch.vmap(lambda u, y: f(u, y, il, tl, reduction=reduction))(
        x, tg).sum())(lp))

    def through_vmap(f):
        x = lp.clone().requires_grad_()
        loss = torch.vmap(lambda u, y: f(u, y, il, tl, reduction=reduction))(x, tg)
        return torch.autograd.grad((loss * torch.arange(1.0, loss.numel() + 1).reshape(loss.shape)).sum(), x)[0]

    both(through_vmap)


def test_compiled_vmap_over_ctc_matches_torch():
    """torch.compile of a vmap over ctc_loss: the batching rule is traced, with the compiled call's device asserts
    on the folded batch (dynamo sees a batched tensor, not the interpreter stack)."""
    g = torch.Generator().manual_seed(7)
    lp = torch.randn(3, 12, 2, 6, generator=g).log_softmax(-1)
    tg = torch.randint(1, 6, (3, 2, 4), generator=g)
    il, tl = torch.tensor([12, 9]), torch.tensor([4, 3])
    torch._dynamo.reset()
    ours = torch.compile(lambda x, y: torch.vmap(lambda u, v: seqfast.ctc_loss(u, v, il, tl, reduction="none"))(
        x, y))(lp, tg)
    theirs = _quiet(lambda: torch.vmap(lambda u, v: F.ctc_loss(u, v, il, tl, reduction="none"))(lp, tg))
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)


def test_ctc_under_vmap_refuses_what_it_cannot_read():
    g = torch.Generator().manual_seed(6)
    lp = torch.randn(3, 12, 2, 6, generator=g).log_softmax(-1)
    tg = torch.randint(1, 6, (3, 2, 4), generator=g)
    il, tl = torch.tensor([12, 9]), torch.tensor([4, 3])
    bad = tg.clone()
    bad[1, 0, 2] = 0  # the blank, in sample 1's first row
    with pytest.raises(ArgumentError, match="targets must hold labels"):
        torch.vmap(lambda x, y: seqfast.ctc_loss(x, y, il, tl))(lp, bad)
    with pytest.raises(ArgumentError, match="input_lengths must be <= T"):
        torch.vmap(lambda x, a: seqfast.ctc_loss(x, tg[0], a, tl))(lp, torch.tensor([[12, 9], [13, 9], [1, 1]]))
    with pytest.raises(ArgumentError, match="padded"):
        torch.vmap(lambda x, y: seqfast.ctc_loss(x, y, il, tl))(lp, tg[:, :, :4].reshape(3, 8)[:, :7])
    with pytest.raises(ArgumentError, match="ctc_forced_align does not run under torch.vmap"):
        torch.vmap(lambda x, y: seqfast.ctc_forced_align(x, y, il, tl)[0])(lp, tg)


def test_attention_gradient_through_vmap_reaches_the_inputs():
    """torch.autograd outside a vmap over attention: the gradient reaches the inputs (the eager C++ route would
    have run the batching rule below its autograd node, and the output had no grad_fn)."""
    q, k, v, _ = attention_inputs()
    grads = []
    for f in SDPA:
        x = q.clone().requires_grad_()
        out = torch.vmap(lambda a, f=f: f(a, k[0] * 2, v[0], is_causal=True))(x)
        assert out.grad_fn is not None
        grads.append(torch.autograd.grad((out * out).sum(), x)[0])
    close64(grads[1], grads[0])


def test_eager_route_outside_transforms_only():
    """Outside torch.func the eager calls keep their direct C++ route; inside a transform they leave it."""
    seen = {}

    def probe(x):
        seen["plain"] = _backend.is_plain_auto()
        seen["transforms"] = _backend.functorch_transforms()
        return x.sum()

    assert _backend.is_plain_auto() and _backend.functorch_transforms() == (False, False)
    torch.func.grad(probe)(torch.ones(2))
    assert seen == {"plain": False, "transforms": (True, False)}
    torch.vmap(probe)(torch.ones(2, 2))
    assert seen == {"plain": False, "transforms": (False, True)}


def test_forced_backends_under_grad():
    """seqfast.backend("cpp") keeps its kernels under torch.func.grad (the Python formula, C++ kernels); the
    forced reference and triton backends, which run inside a dispatch mode functorch cannot nest, are refused
    with a message (the default backend reaches the Triton kernels of CUDA tensors through the dispatcher)."""
    q, k, v, _ = attention_inputs(seed=3)
    expected = torch.func.grad(lambda q: F.scaled_dot_product_attention(q, k, v).square().sum())(q)
    with seqfast.backend("cpp"):
        got = torch.func.grad(lambda q: seqfast.scaled_dot_product_attention(q, k, v).square().sum())(q)
    close64(got, expected)
    lp, tg, il, tl = ctc_inputs()
    with seqfast.backend("cpp"):
        got = torch.func.grad(lambda x: seqfast.ctc_loss(x, tg, il, tl))(lp)
    close64(got, torch.func.grad(lambda x: F.ctc_loss(x, tg, il, tl))(lp))
    for name in ("reference", "triton"):
        with seqfast.backend(name), pytest.raises(RuntimeError, match=f"{name}.*torch.func"):
            torch.func.grad(lambda q: seqfast.scaled_dot_product_attention(q, k, v).sum())(q)
