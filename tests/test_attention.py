"""The C++ (CPU) attention kernels against the float64 reference and against torch.

Public API (``seqfast.scaled_dot_product_attention`` / ``seqfast.varlen_attention``, auto backend:
the C++ kernels for CPU tensors) and the ops themselves where the API does not reach (bottom-right
causal, dropout with a known seed).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import seqfast
from seqfast import _cpu_dropout
from seqfast.reference import attention as ref

ops = torch.ops.seqfast


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - y| / max |y| in float64; the scale is floored at 1e-2 for tensors that are (nearly) all
    zero, such as dQ when every query sees a single key."""
    x, y = x.detach().double(), y.detach().double()
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-2)).item() if y.numel() else 0.0


def seed_tensor(seed: int) -> torch.Tensor:
    """The op's dropout seed argument: a one-element int64 CPU tensor."""
    return torch.tensor(seed, dtype=torch.int64)


def within_twice_torch_error(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor) -> tuple[bool, str]:
    """flash-attention's rule: seqfast's max error against the float64 reference (computed from the same
    low-precision inputs) is at most twice torch's. Where torch's error is exactly 0, a floor of one unit
    of the dtype's resolution at the tensor's magnitude, so that a bit-exact torch does not demand more."""
    err = (ours.double() - ref).abs().max().item()
    torch_err = (theirs.double() - ref).abs().max().item()
    bound = 2 * torch_err if torch_err > 0 else torch.finfo(ours.dtype).eps * ref.abs().max().item()
    return err <= bound, f"seqfast {err:.3g}, torch {torch_err:.3g}, bound {bound:.3g}"


def leaves(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in ts]


def ref_with_grads(q, k, v, grad_out, mask=None, causal=0, scale=None, dropout_p=0.0, keep=None):
    """float64 reference output and grads of (q, k, v[, mask])."""
    ins = leaves(*(t.double() for t in (q, k, v)))
    m = mask
    if mask is not None and mask.is_floating_point():
        m = mask.detach().double().requires_grad_()
        ins.append(m)
    out, lse = ref.attention(ins[0], ins[1], ins[2], m, causal, scale, dropout_p, keep)
    grads = torch.autograd.grad(out, ins, grad_out.double())
    return out, lse, grads


def seqfast_with_grads(q, k, v, grad_out, **kwargs):
    ins = leaves(q, k, v)
    mask = kwargs.pop("attn_mask", None)
    if mask is not None and mask.is_floating_point():
        mask = mask.detach().clone().requires_grad_()
        ins.append(mask)
    out = seqfast.scaled_dot_product_attention(ins[0], ins[1], ins[2], attn_mask=mask, **kwargs)
    grads = torch.autograd.grad(out, ins, grad_out)
    return out, grads


SHAPES = [  # B, Hq, Hk, Lq, Lk, D, Dv
    (1, 1, 1, 1, 1, 16, 16),
    (2, 3, 3, 17, 17, 59, 59),
    (1, 2, 2, 129, 129, 80, 80),
    (2, 2, 2, 17, 129, 32, 48),
    (1, 2, 2, 129, 17, 256, 256),
    (1, 1, 1, 1000, 1000, 64, 64),
    (1, 2, 2, 40, 33, 24, 7),
    (4, 4, 4, 70, 150, 32, 48),  # B * Hk >= 16 key splits: dQ accumulates in place (no slab)
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_fp32_against_reference_and_torch(shape, causal):
    B, Hq, Hk, Lq, Lk, D, Dv = shape
    q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hk, Lk, D), torch.randn(B, Hk, Lk, Dv)
    g = torch.randn(B, Hq, Lq, Dv)
    out, grads = seqfast_with_grads(q, k, v, g, is_causal=causal)
    rout, _, rgrads = ref_with_grads(q, k, v, g, causal=int(causal))
    assert out.dtype == torch.float32 and out.shape == (B, Hq, Lq, Dv)
    assert rel_err(out, rout) < 1e-4
    for a, b in zip(grads, rgrads):
        assert rel_err(a, b) < 1e-4
    tout = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert rel_err(out, tout) < 1e-4


@pytest.mark.parametrize("Lq", [1, 2, 5, 6, 7])  # up to 6 rows a sequence: scores from K's rows in place; 7: tiles
@pytest.mark.parametrize("Lk, D", [(1, 16), (17, 59), (513, 64), (1100, 8), (40, 130)])
def test_decoding_rows_against_reference(Lq, Lk, D):
    """Calls with a few query rows a sequence (decoding with a cache of keys) take their scores as dot products
    with K's rows in place: awkward key counts (one, past a 16-key block, past a 512-key tile) and widths, grouped
    heads, both causal alignments, a float mask with its gradient, K strided and in bfloat16 (copied first)."""
    B, Hq, Hk = 3, 4, 2
    q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hk, Lk, D), torch.randn(B, Hk, Lk, D)
    g = torch.randn(B, Hq, Lq, D)
    kr, vr = (t.repeat_interleave(Hq // Hk, 1) for t in (k, v))
    for causal in (0, 1, 2):
        out, lse = ops.attention_forward(q, k, v, None, 0.0, causal, D ** -0.5, seed_tensor(0))
        rout, rlse = ref.attention(q.double(), kr.double(), vr.double(), None, causal, D ** -0.5, 0.0, None)
        assert rel_err(out, rout) < 1e-5, causal
        finite = torch.isfinite(rlse)
        assert torch.equal(torch.isfinite(lse), finite) and rel_err(lse[finite], rlse[finite]) < 1e-5
    mask = torch.randn(B, Hq, Lq, Lk)
    out, grads = seqfast_with_grads(q, k, v, g, attn_mask=mask, enable_gqa=True)
    rout, _, rgrads = ref_with_grads(q, kr, vr, g, mask=mask)
    assert rel_err(out, rout) < 1e-5
    rgrads = (rgrads[0], *(t.unflatten(1, (Hk, Hq // Hk)).sum(2) for t in rgrads[1:3]), rgrads[3])
    for a, b in zip(grads, rgrads):  # dQ is 0 with a single key: rounding against a scale of at least 1
        assert (a.double() - b).abs().max().item() <= 1e-4 * max(b.abs().max().item(), 1.0)
    k_strided = torch.randn(B, Lk, Hk, 2 * D)[..., ::2].transpose(1, 2).copy_(k)
    torch.testing.assert_close(seqfast.scaled_dot_product_attention(q, k_strided, v, enable_gqa=True),
                               seqfast.scaled_dot_product_attention(q, k, v, enable_gqa=True), rtol=0, atol=0)
    for dt in (torch.bfloat16, torch.float16):  # 16-bit K and V rows read where they lie, or converted per head
        qh, kh, vh = (t.to(dt) for t in (q, k, v))
        hout, _ = ops.attention_forward(qh, kh, vh, None, 0.0, 0, D ** -0.5, seed_tensor(0))
        fout, _ = ops.attention_forward(qh.float(), kh.float(), vh.float(), None, 0.0, 0, D ** -0.5, seed_tensor(0))
        torch.testing.assert_close(hout, fout.to(dt), rtol=0, atol=0)


def test_decoding_rows_spread_nan_and_inf_as_torch():
    """A NaN or inf in a key row reaches that row's score, hence every query of its head group, as in torch."""
    q, k, v = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 300, 64), torch.randn(2, 2, 300, 64)
    k[0, 1, 17, 5] = float("nan")
    k[1, 0, 299, 63] = float("inf")
    ours = seqfast.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.equal(ours.isnan(), theirs.isnan()) and ours.isnan().any()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_float64_matches_reference_closely():
    q, k, v = torch.randn(2, 2, 37, 40, dtype=torch.float64), torch.randn(2, 2, 50, 40, dtype=torch.float64), \
        torch.randn(2, 2, 50, 24, dtype=torch.float64)
    g = torch.randn(2, 2, 37, 24, dtype=torch.float64)
    for causal in (False, True):
        out, grads = seqfast_with_grads(q, k, v, g, is_causal=causal)
        rout, _, rgrads = ref_with_grads(q, k, v, g, causal=int(causal))
        assert out.dtype == torch.float64
        assert rel_err(out, rout) < 1e-9
        for a, b in zip(grads, rgrads):
            assert rel_err(a, b) < 1e-9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_twice_torch_error(dtype):
    B, H, Lq, Lk, D = 2, 2, 129, 100, 64
    q, k, v = (torch.randn(B, H, n, D).to(dtype) for n in (Lq, Lk, Lk))
    g = torch.randn(B, H, Lq, D).to(dtype)
    out, grads = seqfast_with_grads(q, k, v, g)
    assert out.dtype == dtype and all(x.dtype == dtype for x in grads)
    rout, _, rgrads = ref_with_grads(q, k, v, g)
    tq, tk, tv = leaves(q, k, v)
    tout = F.scaled_dot_product_attention(tq, tk, tv)
    tgrads = torch.autograd.grad(tout, (tq, tk, tv), g)
    for name, a, t, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (tout, *tgrads), (rout, *rgrads)):
        ok, figures = within_twice_torch_error(a, t, r)
        assert ok, (name, figures)


_UNFUSED_FORMS = {  # (query, key, value) shapes, causal, float mask needing a gradient: each unfused in torch
    "value-width": (((2, 2, 7, 8), (2, 2, 19, 8), (2, 2, 19, 5)), True, False),
    "3-d": (((4, 11, 8), (4, 19, 8), (4, 19, 8)), True, False),
    "mask-grad": (((2, 2, 11, 8), (2, 2, 19, 8), (2, 2, 19, 8)), False, True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", sorted(_UNFUSED_FORMS))
def test_half_gradients_as_precise_as_torch_math(dtype, form):
    """Where torch does not run fused, its math path computes 16-bit inputs in float32 and casts the result back,
    so its gradients carry no error from a 16-bit output; a FlashAttention-style backward takes rowsum(dO * O)
    from the 16-bit output. seqfast upcasts there too (functional._math_upcasts). With its 16-bit kernels these
    cases (scale 2.5) gave up to 3-4x torch's error against float64."""
    shapes, causal, mask_grad = _UNFUSED_FORMS[form]
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(s, generator=g).to(dtype) for s in shapes)
        grad_out = torch.randn(*shapes[0][:-1], shapes[2][-1], generator=g).to(dtype)
        mask = torch.randn(shapes[0][-2], shapes[1][-2], generator=g).to(dtype) if mask_grad else None
        results = []
        for fn, cast in ((seqfast.scaled_dot_product_attention, dtype), (F.scaled_dot_product_attention, dtype),
                         (F.scaled_dot_product_attention, torch.float64)):
            ins = leaves(*(t.to(cast) for t in (q, k, v)))
            m = None if mask is None else mask.to(cast).requires_grad_()
            out = fn(*ins, attn_mask=m, is_causal=causal, scale=2.5)
            grads = torch.autograd.grad(out, ins + ([m] if m is not None else []), grad_out.to(cast))
            results.append((out, *grads))
        for name, ours, theirs, exact in zip(("out", "dq", "dk", "dv", "dmask"), *results):
            assert ours.dtype == dtype and ours.shape == theirs.shape
            ok, figures = within_twice_torch_error(ours, theirs, exact)
            assert ok, (seed, name, figures)


def test_half_upcast_only_where_torch_runs_math(monkeypatch):
    """The upcast follows torch's choice: a call torch runs fused, one with no gradient to come, or one where
    torch is allowed 16-bit reductions in its math path keeps seqfast's 16-bit kernels."""
    from seqfast import _backend

    seen = []
    dispatch = _backend.dispatch

    def spy(*args, **kwargs):
        seen.append(args[2].dtype)
        return dispatch(*args, **kwargs)

    monkeypatch.setattr(_backend, "dispatch", spy)

    def query_dtype(shapes, grad=True):
        ins = [torch.randn(s).to(torch.bfloat16).requires_grad_(grad) for s in shapes]
        mask = torch.ones(shapes[0][-2], shapes[1][-2], dtype=torch.bool)  # past the maskless fast path
        seen.clear()
        seqfast.scaled_dot_product_attention(*ins, attn_mask=mask)
        return seen[-1]

    fused, unfused = _UNFUSED_FORMS["mask-grad"][0], _UNFUSED_FORMS["value-width"][0]
    assert query_dtype(fused) == torch.bfloat16
    assert query_dtype(unfused) == torch.float32
    assert query_dtype(unfused, grad=False) == torch.bfloat16
    with torch.no_grad():
        assert query_dtype(unfused) == torch.bfloat16
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        assert query_dtype(unfused) == torch.bfloat16
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)


def test_bottom_right_causal_through_the_op():
    for Lq, Lk in ((17, 40), (40, 17), (129, 129)):
        q, k, v = torch.randn(2, 2, Lq, 32), torch.randn(2, 1, Lk, 32), torch.randn(2, 1, Lk, 24)
        g = torch.randn(2, 2, Lq, 24)
        ins = leaves(q, k, v)
        out, lse = ops.attention_forward(*ins, None, 0.0, 2, 0.3, seed_tensor(0))
        grads = torch.autograd.grad(out, ins, g)
        rout, rlse, rgrads = ref_with_grads(q, k, v, g, causal=2, scale=0.3)
        assert rel_err(out, rout) < 1e-4
        assert torch.equal(torch.isinf(lse), torch.isinf(rlse))  # Lq > Lk: leading rows see no key
        assert rel_err(lse[torch.isfinite(lse)], rlse[torch.isfinite(rlse)]) < 1e-5
        for a, b in zip(grads, rgrads):
            assert torch.isfinite(a).all()
            assert rel_err(a, b) < 1e-4


def test_bool_mask_broadcast_and_fully_masked_rows():
    B, H, Lq, Lk, D = 2, 3, 33, 70, 40
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
    g = torch.randn(B, H, Lq, D)
    mask = torch.rand(B, 1, Lq, Lk) > 0.4  # broadcast over heads
    mask[:, :, 5] = False  # a row that sees nothing
    out, grads = seqfast_with_grads(q, k, v, g, attn_mask=mask)
    rout, _, rgrads = ref_with_grads(q, k, v, g, mask=mask)
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5]))
    assert rel_err(out, rout) < 1e-4
    for a, b in zip(grads, rgrads):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-4
    assert torch.equal(grads[0][:, :, 5], torch.zeros_like(grads[0][:, :, 5]))
    # Broadcast over batch and query rows: a key-padding mask (1, 1, 1, Lk).
    pad = (torch.arange(Lk) < 50)[None, None, None, :]
    out, _ = seqfast_with_grads(q, k, v, g, attn_mask=pad)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, attn_mask=pad)) < 1e-4


def test_float_mask_values_and_gradient():
    B, H, Lq, Lk, D = 2, 2, 40, 65, 24
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
    g = torch.randn(B, H, Lq, D)
    mask = torch.randn(1, H, Lq, Lk)  # broadcast over batch: its gradient sums over it
    mask[0, 0, 3, ::2] = float("-inf")
    mask[0, 1, 7] = float("-inf")  # fully masked row
    out, grads = seqfast_with_grads(q, k, v, g, attn_mask=mask)
    rout, _, rgrads = ref_with_grads(q, k, v, g, mask=mask)
    assert rel_err(out, rout) < 1e-4
    assert len(grads) == 4 and grads[3].shape == mask.shape
    for a, b in zip(grads, rgrads):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-4


@pytest.mark.parametrize("Hk", [1, 2])
def test_grouped_query_heads(Hk):
    B, Hq, L, D = 2, 6, 45, 32
    q, k, v = torch.randn(B, Hq, L, D), torch.randn(B, Hk, L, D), torch.randn(B, Hk, L, D)
    g = torch.randn(B, Hq, L, D)
    out, grads = seqfast_with_grads(q, k, v, g, is_causal=True, enable_gqa=True)
    rout, _, rgrads = ref_with_grads(q, k, v, g, causal=1)
    assert rel_err(out, rout) < 1e-4
    assert grads[1].shape == k.shape and grads[2].shape == v.shape
    for a, b in zip(grads, rgrads):
        assert rel_err(a, b) < 1e-4
    tout = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(out, tout) < 1e-4


def test_custom_scale():
    q, k, v = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    g = torch.randn(1, 2, 30, 16)
    for scale in (0.05, 1.7, -0.4):
        out, grads = seqfast_with_grads(q, k, v, g, scale=scale)
        rout, _, rgrads = ref_with_grads(q, k, v, g, scale=scale)
        assert rel_err(out, rout) < 1e-4
        for a, b in zip(grads, rgrads):
            assert rel_err(a, b) < 1e-4


def test_dropout_matches_reference_given_the_kernel_mask():
    B, Hq, Hk, Lq, Lk, D, p, seed = 2, 4, 2, 77, 90, 40, 0.3, 2**61 + 12345
    q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hk, Lk, D), torch.randn(B, Hk, Lk, D)
    g = torch.randn(B, Hq, Lq, D)
    keep = _cpu_dropout.keep_mask(seed, (B, Hq, Lq, Lk), p)
    ins = leaves(q, k, v)
    out, _ = ops.attention_forward(*ins, None, p, 1, 0.2, seed_tensor(seed))
    grads = torch.autograd.grad(out, ins, g)
    rout, _, rgrads = ref_with_grads(q, k, v, g, causal=1, scale=0.2, dropout_p=p, keep=keep)
    assert rel_err(out, rout) < 1e-4
    for a, b in zip(grads, rgrads):
        assert rel_err(a, b) < 1e-4
    # Without the right mask the outputs differ: the check above has teeth.
    other = _cpu_dropout.keep_mask(seed + 1, (B, Hq, Lq, Lk), p)
    assert rel_err(out, ref.attention(q, k, v, None, 1, 0.2, p, other)[0]) > 1e-2


def test_dropout_keep_rate_statistics():
    for p in (0.1, 0.5, 0.9):
        keep = _cpu_dropout.keep_mask(7, (2, 3, 100, 200), p)
        n = keep.numel()
        rate = keep.double().mean().item()
        assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        # no visible structure: per-row and per-column rates stay close too
        assert keep.double().mean(-1).std().item() < 3 * math.sqrt(p * (1 - p) / 200)
    # The kernel drops what the mask says: with v = 1 every kept weight shows up in the output.
    q, k = torch.zeros(1, 1, 64, 8), torch.zeros(1, 1, 256, 8)
    v = torch.ones(1, 1, 256, 1)
    out, _ = ops.attention_forward(q, k, v, None, 0.25, 0, 1.0, seed_tensor(99))
    expect = _cpu_dropout.keep_mask(99, (1, 1, 64, 256), 0.25).double().mean(-1, keepdim=True) / 0.75
    assert rel_err(out[0, 0], expect[0, 0]) < 1e-5


def test_dropout_reproducible_from_torch_seed():
    q, k, v = torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    g = torch.randn(2, 2, 50, 16)
    torch.manual_seed(123)
    a, ga = seqfast_with_grads(q, k, v, g, dropout_p=0.4)
    torch.manual_seed(123)
    b, gb = seqfast_with_grads(q, k, v, g, dropout_p=0.4)
    c, _ = seqfast_with_grads(q, k, v, g, dropout_p=0.4)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert not torch.equal(a, c)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_ends", [[5, 5, 135, 136], [1, 1, 4, 5]], ids=["tiles", "decoding"])
def test_varlen_against_reference(causal, q_ends):
    cu_q = torch.tensor([0] + q_ends, dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 20, 150, 151], dtype=torch.int64)
    q, k, v = torch.randn(q_ends[-1], 4, 24), torch.randn(151, 2, 24), torch.randn(151, 2, 33)
    g = torch.randn(q_ends[-1], 4, 33)
    ins = leaves(q, k, v)
    out = seqfast.varlen_attention(*ins, cu_q, cu_k, 130, 130, causal=causal)
    grads = torch.autograd.grad(out, ins, g)
    rins = leaves(q.double(), k.double(), v.double())
    rout, _ = ref.varlen_attention(*rins, cu_q, cu_k, 2 if causal else 0, 1 / math.sqrt(24))
    rgrads = torch.autograd.grad(rout, rins, g.double())
    assert rel_err(out, rout) < 1e-4
    for a, b in zip(grads, rgrads):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("shape", [(30, 16), (3, 30, 16), (2, 3, 2, 30, 16)], ids=["2d", "3d", "5d"])
def test_input_ranks_through_the_public_api(shape):
    q, k, v = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    g = torch.randn(shape)
    out, grads = seqfast_with_grads(q, k, v, g, is_causal=True)
    tq, tk, tv = leaves(q, k, v)
    tout = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    tgrads = torch.autograd.grad(tout, (tq, tk, tv), g)
    assert out.shape == tout.shape
    assert rel_err(out, tout) < 1e-4
    for a, b in zip(grads, tgrads):
        assert a.shape == b.shape and rel_err(a, b) < 1e-4


def test_strided_inputs():
    base = torch.randn(2, 40, 3, 3 * 32)  # (B, L, H, 3*E) projections, as a model produces them
    q, k, v = (base[..., i * 32:(i + 1) * 32].transpose(1, 2) for i in range(3))
    assert q.stride(-1) == 1 and not q.is_contiguous()
    # Head dim 32 and fp32: the kernels read these rows in place (no packed copy), forward and backward.
    g = torch.randn(2, 40, 3, 32).transpose(1, 2)  # a strided grad_out too
    results = []
    for attend in (seqfast.scaled_dot_product_attention, F.scaled_dot_product_attention):
        leaf = base.clone().requires_grad_()
        views = [leaf[..., i * 32:(i + 1) * 32].transpose(1, 2) for i in range(3)]
        out = attend(*views)
        results.append((out, *torch.autograd.grad(out, leaf, g)))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("dtype, D", [(torch.float32, 64), (torch.float32, 40), (torch.bfloat16, 64),
                                      (torch.float64, 64)])
def test_backward_reads_grad_out_in_any_layout(dtype, D):
    """The CPU backward takes dO as autograd hands it (csrc/autograd.cpp grad_or_zeros): rows H * D apart (a model's
    (B, L, H, D) gradient viewed), an expanded scalar (``.sum()``'s: stride 0 everywhere), every other element, a
    transposed one. Each gives the bits of the same values contiguous, for the batched and the packed (varlen) op,
    in place (float or double, width a multiple of 16) or packed (D 40, bfloat16)."""
    B, H, L = 2, 3, 37
    q, k, v = (torch.randn(B, H, L, D).to(dtype) for _ in range(3))
    out, lse = ops.attention_forward(q, k, v, None, 0.0, 1, D ** -0.5, seed_tensor(0))
    layouts = {
        "rows apart": torch.randn(B, L, H, D).to(dtype).transpose(1, 2),
        "expanded": torch.full((), 0.75, dtype=dtype).expand(B, H, L, D),
        "every other": torch.randn(B, H, L, 2 * D).to(dtype)[..., ::2],
        "transposed": torch.randn(B, H, D, L).to(dtype).transpose(-1, -2),
    }
    cu = torch.tensor([0, 15, L])
    vq, vk, vv = (t[0].transpose(0, 1) for t in (q, k, v))  # (L, H, D) views of batch 0
    vout, vlse = ops.varlen_attention_forward(vq, vk, vv, cu, cu, 22, 22, 1, D ** -0.5)
    for name, g in layouts.items():
        assert not g.is_contiguous(), name
        got = ops.attention_backward(g, q, k, v, None, out, lse, 0.0, 1, D ** -0.5, seed_tensor(0), False)[:3]
        want = ops.attention_backward(g.contiguous(), q, k, v, None, out, lse, 0.0, 1, D ** -0.5, seed_tensor(0),
                                      False)[:3]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        gv = g[0].transpose(0, 1)
        got = ops.varlen_attention_backward(gv, vq, vk, vv, cu, cu, 22, 22, vout, vlse, 1, D ** -0.5)
        want = ops.varlen_attention_backward(gv.contiguous(), vq, vk, vv, cu, cu, 22, 22, vout, vlse, 1, D ** -0.5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"varlen {name}")


def test_backward_does_not_copy_grad_out():
    """Through autograd, ``.sum()``'s expanded dO and a model's strided one reach the CPU kernel uncopied (a
    contiguous copy was a full pass over dO into fresh pages), with the gradients of a contiguous dO."""
    q, k, v = (torch.randn(2, 3, 33, 64, requires_grad=True) for _ in range(3))
    grads = {}
    for name, make in (("sum", lambda o: o.sum()), ("rows apart", lambda o: (o * torch.ones(2, 33, 3, 64)
                                                                             .transpose(1, 2)).sum())):
        out = seqfast.scaled_dot_product_attention(q, k, v)
        loss = make(out)
        with torch.profiler.profile() as prof:
            grads[name] = torch.autograd.grad(loss, (q, k, v))
        names = [e.name for e in prof.events()]
        assert "seqfast::attention_backward" in names
        assert not {"aten::contiguous", "aten::clone", "aten::copy_"} & set(names), (name, sorted(set(names)))
    want = torch.autograd.grad(seqfast.scaled_dot_product_attention(q, k, v), (q, k, v), torch.ones(2, 3, 33, 64))
    for name, got in grads.items():
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("Lq", [3, 16, 200])
@pytest.mark.parametrize("D", [64, 40])
def test_forward_layouts_give_the_same_bits(Lq, D):
    """K and V as (B, L, H, D) views (rows H * D apart) against the same values contiguous: the forward packs K's
    panels a key block at a time, copies far-apart V rows into its scratch where several tasks read a head (Lq
    200: three query blocks; GQA), reads them in place where one task does, and prefetches the next block's rows
    (and the next task's first) of contiguous heads; 16-bit V and V of padded width (D 40) are converted the same
    way. None of that may change a bit. Keys over two forward key blocks (512), causal with both alignments."""
    B, Hq, Hk, Lk = 2, 4, 2, 1100
    q = torch.randn(B, Hq, Lq, D)
    k, v = torch.randn(B, Hk, Lk, D), torch.randn(B, Hk, Lk, D)
    k_far, v_far = (torch.randn(B, Lk, Hk, D).transpose(1, 2).copy_(t) for t in (k, v))
    assert k_far.stride(2) == Hk * D and not v_far.is_contiguous()
    outs = []
    for causal in (0, 1, 2):
        a = ops.attention_forward(q, k, v, None, 0.0, causal, D ** -0.5, seed_tensor(0))
        b = ops.attention_forward(q, k_far, v_far, None, 0.0, causal, D ** -0.5, seed_tensor(0))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (Lq, D, causal)
        outs.append(a[0])
        # 16-bit K and V (converted a key block at a time) give the float kernel's bits on the widened values.
        qh, kh, vh = (t.to(torch.bfloat16) for t in (q, k_far, v_far))
        h = ops.attention_forward(qh, kh, vh, None, 0.0, causal, D ** -0.5, seed_tensor(0))
        f = ops.attention_forward(qh.float(), kh.float(), vh.float(), None, 0.0, causal, D ** -0.5, seed_tensor(0))
        assert torch.equal(h[0], f[0].to(torch.bfloat16)) and torch.equal(h[1], f[1]), (Lq, D, causal)
    ref_out, _ = ref.attention(q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1),
                               None, 0, D ** -0.5, 0.0, None)
    assert rel_err(outs[0], ref_out) < 1e-5


def test_gradcheck_float64():
    q, k, v = (torch.randn(1, 2, n, 5, dtype=torch.float64, requires_grad=True) for n in (4, 6, 6))
    mask = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c, m: seqfast.scaled_dot_product_attention(a, b, c, attn_mask=m),
                                    (q, k, v, mask))
    assert torch.autograd.gradcheck(lambda a, b, c: seqfast.scaled_dot_product_attention(a, b, c, is_causal=True),
                                    (q, k, v))


def test_bitwise_deterministic_across_runs_and_threads():
    q, k, v = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    g = torch.randn(1, 4, 300, 32)

    def run():
        return seqfast_with_grads(q, k, v, g, is_causal=True, enable_gqa=True)

    a, ga = run()
    b, gb = run()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c, gc = run()
    finally:
        torch.set_num_threads(threads)
    for x, y, z in zip((a, *ga), (b, *gb), (c, *gc)):
        assert torch.equal(x, y) and torch.equal(x, z)


@pytest.mark.parametrize("B, Hq, Hk, Lq, Lk, causal, extra", [
    (4, 4, 4, 70, 150, 2, None),      # B * Hk = 16: one key split, dQ summed in place
    (1, 4, 2, 97, 300, 2, None),      # 3 key splits, the last one to finish sums the dQ slabs
    (2, 2, 1, 300, 97, 1, "mask"),    # causal with Lq > Lk, a float mask and its gradient
    (1, 2, 2, 200, 129, 0, "dropout"),
    (1, 2, 1, 150, 150, 1, "bf16"),   # slabs also with one split: the 16-bit outputs are converted
])
def test_backward_identical_at_one_and_two_threads(B, Hq, Hk, Lq, Lk, causal, extra):
    """Every task of the backward owns its key tiles and its dQ rows or slab rows and the slabs are summed in
    split order, so thread count and timing cannot change a bit of any gradient."""
    dtype = torch.bfloat16 if extra == "bf16" else torch.float32
    q, k, v = (torch.randn(B, h, n, 40).to(dtype) for h, n in ((Hq, Lq), (Hk, Lk), (Hk, Lk)))
    g = torch.randn(B, Hq, Lq, 40).to(dtype)
    mask = torch.randn(B, Hq, Lq, Lk) if extra == "mask" else None
    p = 0.3 if extra == "dropout" else 0.0
    out, lse = ops.attention_forward(q, k, v, mask, p, causal, 0.3, seed_tensor(5))

    def grads():
        return ops.attention_backward(g, q, k, v, mask, out, lse, p, causal, 0.3, seed_tensor(5), mask is not None)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads()
        torch.set_num_threads(2)
        two = grads()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D, strided", [(64, False), (59, False), (64, True)])
def test_half_precision_is_the_float_kernel_rounded(dtype, D, strided):
    """16-bit inputs are widened to float, computed as float32 inputs are, and rounded once (to nearest even,
    as tensor.to does) on the way out; the vector conversions (8 lanes, then a scalar tail for D=59, scalar for
    strided rows) must give exactly those bits, NaN and inf included."""
    B, H, Lq, Lk = 2, 2, 37, 50
    q, k, v = (torch.randn(B, H, n, D).mul(3).to(dtype) for n in (Lq, Lk, Lk))
    g = torch.randn(B, H, Lq, D).to(dtype)
    v[0, 0, 3, 5] = float("inf")
    g[1, 1, 2, 7] = float("nan")
    if strided:
        q, k, v, g = (torch.randn(t.shape[:-1] + (2 * D,)).to(dtype)[..., ::2].copy_(t) for t in (q, k, v, g))
    for causal in (0, 1):
        out, lse = ops.attention_forward(q, k, v, None, 0.0, causal, D ** -0.5, seed_tensor(0))
        fout, flse = ops.attention_forward(q.float(), k.float(), v.float(), None, 0.0, causal, D ** -0.5,
                                           seed_tensor(0))
        torch.testing.assert_close(out, fout.to(dtype), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(lse, flse, rtol=0, atol=0, equal_nan=True)
        grads = ops.attention_backward(g, q, k, v, None, out, lse, 0.0, causal, D ** -0.5, seed_tensor(0), False)
        fgrads = ops.attention_backward(g.float(), q.float(), k.float(), v.float(), None, out.float(), lse, 0.0,
                                        causal, D ** -0.5, seed_tensor(0), False)
        for a, b in zip(grads[:3], fgrads[:3]):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0, equal_nan=True)


def test_opcheck():
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 1, 11, 8), torch.randn(1, 1, 11, 8)
    mask = torch.randn(1, 2, 9, 11)
    out, lse = ops.attention_forward(q, k, v, mask, 0.0, 0, 0.5, seed_tensor(0))
    g = torch.randn_like(out)
    torch.library.opcheck(ops.attention_forward, (q, k, v, mask, 0.0, 1, 0.5, seed_tensor(0)))
    torch.library.opcheck(ops.attention_forward, (q, k, v, None, 0.2, 0, 0.5, seed_tensor(3)))
    torch.library.opcheck(ops.attention_backward, (g, q, k, v, mask, out, lse, 0.0, 0, 0.5, seed_tensor(0), True))
    cu_q, cu_k = torch.tensor([0, 4, 9]), torch.tensor([0, 6, 11])
    vq, vk, vv = torch.randn(9, 2, 8), torch.randn(11, 1, 8), torch.randn(11, 1, 8)
    vout, vlse = ops.varlen_attention_forward(vq, vk, vv, cu_q, cu_k, 5, 6, 2, 0.5)
    torch.library.opcheck(ops.varlen_attention_forward, (vq, vk, vv, cu_q, cu_k, 5, 6, 2, 0.5))
    torch.library.opcheck(ops.varlen_attention_backward,
                          (torch.randn_like(vout), vq, vk, vv, cu_q, cu_k, 5, 6, vout, vlse, 2, 0.5))


@pytest.mark.parametrize("case", ["fused", "fused-gqa", "dropout", "dropout-gqa", "value-width"])
def test_backward_gradient_layouts_as_the_fake_says(case):
    """Each branch of the backward's gradient layout rule (csrc/attention.cpp fused_gradients, and the fake's
    seqfast.reference.attention.gradients_like): the C++ kernel's strides are the fake's, opcheck agrees, and they
    are torch's CPU layouts: (B, L, H, E)-ordered fused; dQ, dV contiguous and dK transposed (ungrouped) unfused."""
    from seqfast.reference.attention import gradients_like

    hk = 1 if "gqa" in case else 2
    dropout = 0.2 if case.startswith("dropout") else 0.0
    dv = 4 if case == "value-width" else 8
    q, k, v = torch.randn(2, 2, 9, 8).transpose(1, 2).contiguous().transpose(1, 2), torch.randn(2, hk, 11, 8), \
        torch.randn(2, hk, 11, dv)
    out, lse = ops.attention_forward(q, k, v, None, dropout, 0, 0.5, seed_tensor(3))
    args = (torch.randn_like(out), q, k, v, None, out, lse, dropout, 0, 0.5, seed_tensor(3), False)
    grads = ops.attention_backward(*args)[:3]
    want = gradients_like(q, k, v, dropout, False)
    assert [g.stride() for g in grads] == [w.stride() for w in want]
    fused = case.startswith("fused")
    assert grads[0].is_contiguous() != fused and (hk == 1 or grads[2].is_contiguous() != fused)  # H=1: both
    assert grads[1].transpose(-1, -2).is_contiguous() == (case == "dropout" or case == "value-width")
    torch.library.opcheck(ops.attention_backward, args)


def _args(**over):
    a = dict(query=torch.randn(2, 4, 5, 8), key=torch.randn(2, 4, 6, 8), value=torch.randn(2, 4, 6, 3))
    a.update(over)
    return a


@pytest.mark.parametrize("case, match", [
    (dict(query=torch.ones(2, 4, 5, 8, dtype=torch.int64)), "query must be a floating tensor"),
    (dict(key=[1.0]), "key must be a floating tensor"),
    (dict(value=torch.randn(3)), "value must have at least 2 dims"),
    (dict(key=torch.randn(2, 4, 6, 8, dtype=torch.float64)), "share a dtype"),
    (dict(key=torch.randn(2, 4, 6, 8, device="meta")), "one device"),
    (dict(key=torch.randn(2, 4, 6, 9)), "share the last dim"),
    (dict(value=torch.randn(2, 4, 7, 3)), "share the sequence length"),
    (dict(dropout_p=1.5), "dropout_p must be in"),
    (dict(dropout_p=-0.1), "dropout_p must be in"),
    (dict(key=torch.randn(3, 4, 6, 8), value=torch.randn(3, 4, 6, 3)), "must broadcast"),
    (dict(value=torch.randn(2, 2, 6, 3)), "must broadcast"),
    (dict(key=torch.randn(2, 3, 6, 8), value=torch.randn(2, 3, 6, 3), enable_gqa=True), "multiple of key/value"),
    (dict(key=torch.randn(2, 2, 6, 8), value=torch.randn(2, 2, 6, 3)), "pass enable_gqa=True"),
    (dict(attn_mask=torch.ones(5, 6, dtype=torch.int32)), "attn_mask must be bool, float32 or of query's dtype"),
    (dict(attn_mask=torch.ones(5, 7, dtype=torch.bool)), "does not broadcast"),
])
def test_validation_errors(case, match):
    kwargs = _args(**case)
    with pytest.raises(ValueError, match=match):
        seqfast.scaled_dot_product_attention(**kwargs)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_narrower_cpu_paths_against_reference(isa):
    """The AVX2 and portable fp32 kernels, forced with SEQFAST_CPU_ISA in a fresh process (the ISA is
    chosen once per process), against the float64 reference: odd sizes, causal, a bool mask, GQA, and more
    keys than one forward key tile (512), so the online softmax rescales across tiles on each path; and the
    forward's bits with K and V rows far apart against the same values contiguous."""
    code = textwrap.dedent("""
        import sys, torch, seqfast
        from seqfast import _C
        from seqfast.reference import attention as ref
        torch.manual_seed(0)
        print(_C.cpu_isa())
        worst = 0.0
        for B, Hq, Hk, Lq, Lk, D, Dv, causal, masked in [(2, 3, 3, 17, 17, 59, 59, True, False),
                                                         (1, 2, 1, 129, 97, 80, 48, False, True),
                                                         (1, 2, 2, 200, 200, 64, 64, True, False),
                                                         (1, 1, 1, 40, 700, 32, 32, False, False),
                                                         (2, 4, 2, 1, 700, 64, 64, False, True),
                                                         (1, 2, 2, 3, 37, 59, 59, True, False),
                                                         (1, 1, 1, 600, 600, 16, 16, True, False)]:
            q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hk, Lk, D), torch.randn(B, Hk, Lk, Dv)
            mask = torch.rand(Lq, Lk) > 0.3 if masked else None
            ins = [t.clone().requires_grad_() for t in (q, k, v)]
            out = seqfast.scaled_dot_product_attention(*ins, attn_mask=mask, is_causal=causal, enable_gqa=True)
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, ins, g)
            rins = [t.double().requires_grad_() for t in (q, k, v)]
            rk, rv = (t.repeat_interleave(Hq // Hk, 1) for t in rins[1:])
            rmask = None if mask is None else mask.expand(B, Hq, Lq, Lk)
            rout, _ = ref.attention(rins[0], rk, rv, rmask, int(causal), None, 0.0, None)
            rgrads = torch.autograd.grad(rout, rins, g.double())
            for a, b in zip((out, *grads), (rout, *rgrads)):
                worst = max(worst, ((a.double() - b).abs().max() / b.abs().max()).item())
        for dt, D in ((torch.bfloat16, 64), (torch.float16, 59)):  # decoding rows from 16-bit K and V
            qh, kh, vh = (torch.randn(2, 4, n, D).to(dt) for n in (3, 300, 300))
            fwd = lambda *t: torch.ops.seqfast.attention_forward(*t, None, 0.0, 0, 0.125, torch.tensor(0))[0]
            assert torch.equal(fwd(qh, kh, vh), fwd(qh.float(), kh.float(), vh.float()).to(dt)), (dt, D)
        kf, vf = (torch.randn(2, 1100, 2, 64).transpose(1, 2) for _ in range(2))  # rows far apart: V copied
        for n in (16, 200):
            qf = torch.randn(2, 4, n, 64)
            assert torch.equal(fwd(qf, kf, vf), fwd(qf, kf.contiguous(), vf.contiguous())), n
        print(worst)
    """)
    env = dict(os.environ, SEQFAST_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    used, worst = res.stdout.split()
    assert used in ((isa, "baseline") if isa == "avx2" else ("baseline",))  # a cap, never more than the CPU has
    assert float(worst) < 1e-4, worst


@pytest.mark.parametrize("isa", [None, "avx2", "baseline"])
def test_query_rows_keep_their_bits_wherever_they_sit(isa):
    """A query row's output and lse are the same bits whatever rows share its score block. The forward reduces the
    max and the sum of 16 rows at once on AVX-512 (8 on AVX2; one by one on the portable path): a fold that handed a
    row another's sum, or let a NaN or fully masked row reach its neighbours, fails here. Rows permuted (with the
    mask's rows), non-causal, keys over two forward key blocks so the online rescale runs; each ISA in a fresh
    process (None: the machine's own)."""
    code = textwrap.dedent("""
        import torch
        from seqfast import _C
        g = torch.Generator().manual_seed(3)
        B, H, Lq, Lk, D = 1, 2, 45, 600, 64
        q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Lq, Lk, Lk))
        q[0, 0, 3, 5] = float("nan")  # a NaN row
        q[0, 1, 7] *= 1e3  # scores far above the others'
        mask = torch.randn(B, H, Lq, Lk, generator=g)
        mask[0, :, 10] = float("-inf")  # a row that sees no key
        mask[0, :, 20, 100:] = float("-inf")
        perm = torch.randperm(Lq, generator=g)
        fwd = lambda q, m: torch.ops.seqfast.attention_forward(q, k, v, m, 0.0, 0, -0.3, torch.tensor(0))
        out, lse = fwd(q, mask)
        pout, plse = fwd(q[:, :, perm].contiguous(), mask[:, :, perm].contiguous())
        bits = lambda t: t.contiguous().view(torch.int32)
        assert torch.equal(bits(pout), bits(out[:, :, perm])) and torch.equal(bits(plse), bits(lse[:, :, perm]))
        assert out[0, 0, 3].isnan().all() and not out[0, 0, 4].isnan().any() and lse[0, 0, 10].isinf()
        print(_C.cpu_isa())
    """)
    env = dict(os.environ)
    env.pop("SEQFAST_CPU_ISA", None)
    if isa:
        env["SEQFAST_CPU_ISA"] = isa
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert isa is None or res.stdout.split()[-1] in (isa, "baseline")


def test_unknown_cpu_isa_is_an_error():
    env = dict(os.environ, SEQFAST_CPU_ISA="sse9")
    res = subprocess.run([sys.executable, "-c", "import seqfast"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode != 0 and "SEQFAST_CPU_ISA" in res.stderr


def test_peak_memory_grows_linearly():
    """Forward + backward at two lengths in fresh processes: extra peak RSS must scale like L, not L^2."""
    code = textwrap.dedent("""
        import resource, sys, torch, seqfast
        torch.set_num_threads(1)
        L = int(sys.argv[1])
        q, k, v = (torch.randn(1, 1, L, 16, requires_grad=True) for _ in range(3))
        small = [t.detach()[..., :64, :].clone().requires_grad_() for t in (q, k, v)]
        seqfast.scaled_dot_product_attention(*small).sum().backward()  # warm up allocator and kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seqfast.scaled_dot_product_attention(q, k, v).sum().backward()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    growth = {}
    for L in (2048, 8192):
        res = subprocess.run([sys.executable, "-c", code, str(L)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        growth[L] = int(res.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB
    # One (L, L) fp32 score matrix at L = 8192 would be 256 MiB; the inputs, outputs and packed
    # copies are a few MiB.
    assert growth[8192] < 32 * 2**20, growth
    assert growth[8192] < 16 * max(growth[2048], 2**20), growth
