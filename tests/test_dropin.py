"""Drop-in fidelity: what torch 2.13 accepts, refuses, casts and traces, seqfast does the same, compared in the
same test (input forms, error classes, autocast, double backward, torch.compile and torch.export, opcheck with
non-contiguous and broadcast inputs)."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import seqfast
from seqfast import ArgumentError

torch._dynamo.config.cache_size_limit = 256


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


def grads(fn, *inputs):
    """fn(*inputs) and the gradients of its weighted sum w.r.t. the inputs that require grad."""
    out = fn(*inputs)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad((out * weight).sum(), leaves)


def ctc_case(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    lp = torch.randn(9, 3, 6, generator=g, dtype=dtype).log_softmax(-1).requires_grad_()
    tg = torch.tensor([[1, 2, 2, 4], [3, 1, 0, 0], [5, 5, 1, 0]])
    return lp, tg, [9, 7, 8], [4, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# CTC input forms


@pytest.mark.parametrize("form", ["numpy-tuple", "0d-tensor-list", "mixed-list"])
def test_ctc_lengths_in_every_form_torch_accepts(form):
    lp, tg, il, tl = ctc_case()
    convert = {
        "numpy-tuple": lambda xs: tuple(np.array(xs)),
        "0d-tensor-list": lambda xs: [torch.tensor(x) for x in xs],
        "mixed-list": lambda xs: [xs[0], np.int32(xs[1]), torch.tensor(xs[2])],
    }[form]
    expected = grads(lambda x: F.ctc_loss(x, tg, convert(il), convert(tl)), lp)
    got = grads(lambda x: seqfast.ctc_loss(x, tg, convert(il), convert(tl)), lp)
    close(got[0], expected[0])
    close(got[1][0], expected[1][0])


@pytest.mark.parametrize("shape", ["(N, 1)", "(1, N)", "(N, 1) strided", "N=1 0-d", "N=1 (1, 1)", "unbatched (1, 1)"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_ctc_length_tensors_of_any_shape_with_n_entries_as_torch(shape, reduction):
    """torch reads a lengths tensor by its elements: (N, 1), (1, N), a 0-d tensor for one sample. The loss and
    gradient are torch's; a tensor with another number of entries is refused by both."""
    lp, tg, il, tl = ctc_case()
    il, tl = torch.tensor(il), torch.tensor(tl)
    form = {
        "(N, 1)": lambda x: x[:, None],
        "(1, N)": lambda x: x[None],
        "(N, 1) strided": lambda x: torch.stack([x, x], 1)[:, :1],
        "N=1 0-d": lambda x: x[0],
        "N=1 (1, 1)": lambda x: x[:1, None],
        "unbatched (1, 1)": lambda x: x[:1, None],
    }[shape]
    if shape.startswith("N=1"):
        lp, tg = lp[:, :1].detach().requires_grad_(), tg[:1]
    elif shape.startswith("unbatched"):
        lp, tg = lp[:, 0].detach().requires_grad_(), tg[0]
    expected = grads(lambda x: F.ctc_loss(x, tg, form(il), form(tl), reduction=reduction), lp)
    got = grads(lambda x: seqfast.ctc_loss(x, tg, form(il), form(tl), reduction=reduction), lp)
    assert got[0].shape == expected[0].shape
    close(got[0], expected[0])
    close(got[1][0], expected[1][0])
    if not shape.startswith(("N=1", "unbatched")):
        with pytest.raises(RuntimeError, match="input_lengths must be of size batch_size"):
            F.ctc_loss(lp, tg, il[:2, None], tl)
        with pytest.raises(ValueError, match="input_lengths must have 3 entries"):
            seqfast.ctc_loss(lp, tg, il[:2, None], tl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.bool])
@pytest.mark.parametrize("concatenated", [False, True])
def test_ctc_targets_of_other_dtypes_as_torch(dtype, concatenated):
    lp, tg, il, tl = ctc_case()
    if concatenated:
        tg = torch.cat([tg[i, :n] for i, n in enumerate(tl)])
    # Fractional float targets are truncated, as torch converts them.
    t = tg.to(dtype) + (0.7 if dtype.is_floating_point else 0)
    close(seqfast.ctc_loss(lp, t, il, tl), F.ctc_loss(lp, t, il, tl))


@pytest.mark.parametrize("blank", [np.int64(5), np.int32(5), torch.tensor(5), torch.tensor(5, dtype=torch.int32)])
def test_ctc_blank_as_any_integer_torch_takes(blank):
    """torch's int arguments take numpy integers and 0-d integer tensors; so does blank here, in the loss and in
    the decoders (a float blank is refused by both)."""
    lp, tg, il, tl = ctc_case()
    tg = tg % 5  # labels in [0, 5): class 5 is free for the blank
    lp = lp[..., :6].log_softmax(-1)
    close(seqfast.ctc_loss(lp, tg, il, tl, blank=blank), F.ctc_loss(lp, tg, il, tl, blank=blank))
    assert torch.equal(seqfast.ctc_greedy_decode(lp, il, blank=blank)[0], seqfast.ctc_greedy_decode(lp, il, blank=5)[0])
    for lib in (F.ctc_loss, seqfast.ctc_loss):
        with pytest.raises((TypeError, RuntimeError)):
            lib(lp, tg, il, tl, blank=5.0)


@pytest.mark.parametrize("shape", [(0, 3, 6), (9, 0, 6), (9, 3, 0), (0, 6)])
def test_ctc_empty_log_probs_refused_as_torch(shape):
    lp = torch.zeros(shape)
    n = shape[1] if len(shape) == 3 else None
    args = (torch.zeros((n or 1, 1), dtype=torch.long), [0] * (n or 1), [0] * (n or 1)) if n is not None else (
        torch.zeros(0, dtype=torch.long), torch.tensor(0), torch.tensor(0))
    with pytest.raises(RuntimeError):
        F.ctc_loss(lp, *args)
    with pytest.raises(RuntimeError, match="must not be empty"):
        seqfast.ctc_loss(lp, *args)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("form", ["padded", "concatenated", "unbatched"])
def test_ctc_on_meta_as_torch(form, reduction):
    """Meta log_probs (shape inference: model summaries, FLOP counters): torch's forward takes them with list
    lengths and gives meta results; seqfast gives the same shapes and dtypes, and a gradient too (torch's backward
    has no meta kernel)."""
    batched = form != "unbatched"
    lp = torch.randn((10, 2, 5) if batched else (10, 5), device="meta", requires_grad=True)
    il, tl = ([10, 7], [3, 2]) if batched else ([10], [3])
    tg = torch.ones(5 if form == "concatenated" else 3 if not batched else (2, 3), dtype=torch.long, device="meta")
    theirs = F.ctc_loss(lp, tg, il, tl, reduction=reduction)
    ours = seqfast.ctc_loss(lp, tg, il, tl, reduction=reduction)
    assert (ours.shape, ours.dtype, ours.device) == (theirs.shape, theirs.dtype, theirs.device)
    (grad,) = torch.autograd.grad(ours.sum(), lp)
    assert (grad.shape, grad.dtype, grad.device) == (lp.shape, lp.dtype, lp.device)
    with pytest.raises(ArgumentError, match="on the host"):
        seqfast.ctc_loss(torch.zeros(10, 2, 5, device="meta"), torch.ones(5, dtype=torch.long, device="meta"),
                         torch.tensor([10, 7], device="meta"), torch.tensor([3, 2], device="meta"))


@pytest.mark.parametrize("lengths", [([11, 7], [3, 2]), ([10, 7], [4, 2]), ([10, -1], [3, 2]), ([10, 7], [3, -2])])
def test_ctc_on_meta_checks_host_lengths_as_torch(lengths):
    lp, tg = torch.zeros(10, 2, 5, device="meta"), torch.ones(2, 3, dtype=torch.long, device="meta")
    with pytest.raises(RuntimeError):
        F.ctc_loss(lp, tg, *lengths)
    with pytest.raises(ArgumentError, match="_lengths must be"):
        seqfast.ctc_loss(lp, tg, *lengths)

def test_ctc_module_is_torchs_class():
    module = seqfast.nn.CTCLoss(blank=1, reduction="sum", zero_infinity=True)
    assert isinstance(module, torch.nn.CTCLoss)
    assert (module.blank, module.reduction, module.zero_infinity) == (1, "sum", True)
    theirs = torch.nn.CTCLoss(blank=1, reduction="sum", zero_infinity=True)
    lp, tg, il, tl = ctc_case()
    tg = tg + (tg == 1).long()  # blank is 1 here
    tg[tg >= 6] = 2
    close(module(lp, tg, il, tl), theirs(lp, tg, il, tl))


# ---------------------------------------------------------------------------------------------------------------
# Attention input forms

def _qkv(qshape, kshape, vshape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in (qshape, kshape, vshape)]


@pytest.mark.parametrize("qshape,kshape,vshape,gqa", [
    ((3, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 4), False),  # key/value batch 1 broadcast over query's batch
    ((1, 2, 5, 8), (3, 2, 6, 8), (3, 2, 6, 8), False),  # query batch broadcast over key's
    ((3, 2, 5, 8), (3, 1, 6, 8), (3, 1, 6, 8), False),  # one key/value head broadcast without enable_gqa
    ((2, 5, 8), (3, 2, 6, 8), (3, 2, 6, 8), False),  # fewer query dims
    ((2, 3, 2, 5, 8), (3, 2, 6, 8), (1, 2, 6, 8), False),  # 5-D against 4-D
    ((5, 8), (6, 8), (6, 3), False),  # 2-D
    ((2, 4, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8), True),  # GQA with a broadcast batch
], ids=["kv-batch1", "q-batch1", "kv-head1", "q-3d", "5d-4d", "2d", "gqa-batch1"])
def test_sdpa_broadcast_shapes_as_torch(qshape, kshape, vshape, gqa):
    q, k, v = _qkv(qshape, kshape, vshape)
    expected = grads(lambda *a: F.scaled_dot_product_attention(*a, enable_gqa=gqa), q, k, v)
    got = grads(lambda *a: seqfast.scaled_dot_product_attention(*a, enable_gqa=gqa), q, k, v)
    assert got[0].shape == expected[0].shape
    close(got[0], expected[0])
    for a, b in zip(got[1], expected[1]):
        close(a, b)


def test_sdpa_causal_with_a_mask_combines_them_as_torch():
    """torch 2.13's fused CPU path applies both (its math path, taken when a gradient is needed, refuses the
    pair); seqfast applies both always: forward as torch's fused path, gradients as the explicit combination."""
    q, k, v = _qkv((2, 2, 6, 8), (2, 2, 6, 8), (2, 2, 6, 8))
    mask = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, 0] = True
    fmask = torch.randn(6, 6).requires_grad_()
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    for m, combined in ((mask, mask & causal), (fmask, fmask.masked_fill(~causal, float("-inf")))):
        plain = [t.detach() for t in (q, k, v, m)]
        close(seqfast.scaled_dot_product_attention(*plain[:3], attn_mask=plain[3], is_causal=True),
              F.scaled_dot_product_attention(*plain[:3], attn_mask=plain[3], is_causal=True))
        expected = grads(lambda *a: F.scaled_dot_product_attention(*a[:3], attn_mask=a[3]), q, k, v, combined)
        got = grads(lambda *a: seqfast.scaled_dot_product_attention(*a[:3], attn_mask=a[3], is_causal=True),
                    q, k, v, m)
        close(got[0], expected[0])
        for a, b in zip(got[1][:3], expected[1][:3]):
            close(a, b)


def test_sdpa_dropout_one_gives_zeros_as_torch():
    q, k, v = _qkv((2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8))
    expected = grads(lambda *a: F.scaled_dot_product_attention(*a, dropout_p=1.0), q, k, v)
    got = grads(lambda *a: seqfast.scaled_dot_product_attention(*a, dropout_p=1.0), q, k, v)
    close(got[0], expected[0])
    assert not got[0].any()
    for a, b in zip(got[1], expected[1]):
        close(a, b)


@pytest.mark.parametrize("scale", [None, 0.5])
def test_sdpa_head_dim_zero_as_torch(scale):
    q, k, v = _qkv((2, 2, 5, 0), (2, 2, 6, 0), (2, 2, 6, 3))
    expected = grads(lambda *a: F.scaled_dot_product_attention(*a, scale=scale), q, k, v)
    got = grads(lambda *a: seqfast.scaled_dot_product_attention(*a, scale=scale), q, k, v)
    close(got[0], expected[0])
    for a, b in zip(got[1], expected[1]):
        close(a, b)


EMPTY_SHAPES = {  # (qshape, kshape, vshape, enable_gqa): every dim of the call at 0 once
    "batch0": ((0, 2, 5, 8), (0, 2, 6, 8), (0, 2, 6, 8), False),
    "heads0": ((2, 0, 5, 8), (2, 0, 6, 8), (2, 0, 6, 8), False),
    "heads0-gqa": ((2, 0, 5, 8), (2, 0, 6, 8), (2, 0, 6, 8), True),
    "qheads0-gqa": ((2, 0, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), True),
    "qheads0-kvhead1": ((2, 0, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8), False),
    "lq0": ((2, 2, 0, 8), (2, 2, 6, 8), (2, 2, 6, 8), False),
    "lk0": ((2, 2, 5, 8), (2, 2, 0, 8), (2, 2, 0, 8), False),
    "dv0": ((2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 0), False),
}


@pytest.mark.parametrize("backend", ["auto", "cpp", "reference", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("case", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_empty_dims_as_torch(backend, case, causal):
    """A dim of size 0 anywhere (batch, heads, either sequence, Dv): torch's output and gradients (shapes, values:
    zeros where there is no key), on every backend; no heads at all used to be refused by the CPU kernels."""
    qshape, kshape, vshape, gqa = EMPTY_SHAPES[case]
    q, k, v = _qkv(qshape, kshape, vshape)
    expected = grads(lambda *a: F.scaled_dot_product_attention(*a, is_causal=causal, enable_gqa=gqa), q, k, v)
    with seqfast.backend(backend):
        got = grads(lambda *a: seqfast.scaled_dot_product_attention(*a, is_causal=causal, enable_gqa=gqa), q, k, v)
    for a, b in zip((got[0], *got[1]), (expected[0], *expected[1])):
        assert a.shape == b.shape
        close(a, b)


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("qheads", [1, 2])
def test_sdpa_headless_keys_refused(gqa, qheads):
    """Key/value with 0 heads against query heads: torch returns zeros of the query's shape (no grouping explains
    it); seqfast refuses with a clear error rather than guess."""
    q, k, v = _qkv((2, qheads, 5, 8), (2, 0, 6, 8), (2, 0, 6, 8))
    assert not F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa).any()
    with pytest.raises(ArgumentError, match="key and value have no heads"):
        seqfast.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)


def _jagged(lengths, H, E, dtype=torch.float64, seed=0):
    """A (B, H, j, E) jagged nested tensor (the ragged dim after the heads), as torch's attention takes them."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, H, E, generator=g, dtype=dtype) for n in lengths]
    return torch.nested.as_nested_tensor(parts, layout=torch.jagged).requires_grad_()


@pytest.mark.parametrize("lq, lk, Dv", [([5, 7], [6, 9], 8), ([1, 33, 4], [1, 33, 4], 8), ([3, 8], [5, 2], 4)])
def test_sdpa_jagged_nested_as_torch(lq, lk, Dv):
    """Jagged nested query, key and value: a nested output with the query's offsets (its ragged dim is the query's:
    ``out + query`` works), values and the nested inputs' gradients as torch's; seqfast runs its varlen kernels."""
    results = []
    for fn in (F.scaled_dot_product_attention, seqfast.scaled_dot_product_attention):
        leaves = [_jagged(lq, 2, 8, seed=1), _jagged(lk, 2, 8, seed=2), _jagged(lk, 2, Dv, seed=3)]
        out = fn(*(t.transpose(1, 2) for t in leaves), scale=0.3)
        weight = torch.linspace(-1, 1, out.values().numel(), dtype=out.dtype).view_as(out.values())
        (out.values() * weight).sum().backward()
        results.append((out, [t.grad for t in leaves], leaves[0]))
    (expected, expected_grads, _), (got, got_grads, query) = results
    assert got.is_nested and got.offsets() is query.offsets() and torch.equal(got.offsets(), expected.offsets())
    assert got.shape == query.transpose(1, 2).shape[:3] + (Dv,)  # the query's own ragged dim
    close(got.values(), expected.values(), 1e-10)
    for a, b in zip(got_grads, expected_grads):
        close(a.values(), b.values(), 1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_jagged_nested_half_as_precise_as_torch(dtype):
    """16-bit nested calls: the output within twice torch's own error against float64 on the same values."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 4, 64, generator=g).to(dtype) for n in (37, 120, 5, 300)]

    def nested(as_dtype):
        return torch.nested.as_nested_tensor([p.to(as_dtype) for p in parts], layout=torch.jagged).transpose(1, 2)

    q, q64 = nested(dtype), nested(torch.float64)
    ref = F.scaled_dot_product_attention(q64, q64, q64).values()
    theirs = (F.scaled_dot_product_attention(q, q, q).values().double() - ref).abs().max().item()
    ours = seqfast.scaled_dot_product_attention(q, q, q)
    assert ours.dtype == dtype
    assert (ours.values().double() - ref).abs().max().item() <= 2 * theirs


def test_sdpa_jagged_nested_grouped_heads():
    """enable_gqa on nested tensors (torch 2.13's nested math path fails there: it broadcasts no batch of heads):
    each sequence as the dense call on that sequence alone."""
    lengths = [4, 9, 1]
    q, k, v = _jagged(lengths, 4, 8, seed=1), _jagged(lengths, 2, 8, seed=2), _jagged(lengths, 2, 8, seed=3)
    out = seqfast.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               enable_gqa=True)
    packed = out.transpose(1, 2).values()  # (total, Hq, Ev)
    for i in range(len(lengths)):
        dense = [t.values()[q.offsets()[i]:q.offsets()[i + 1]].transpose(0, 1) for t in (q, k, v)]
        close(packed[q.offsets()[i]:q.offsets()[i + 1]],
              F.scaled_dot_product_attention(*dense, enable_gqa=True).transpose(0, 1), 1e-10)


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(attn_mask="mask"), dict(dropout_p=0.2)], ids=str)
def test_sdpa_jagged_nested_refusals(kwargs):
    """Causal and masked nested calls are refused as torch refuses them (a RuntimeError / ValueError either way);
    dropout, which torch takes, is refused by name (torch's own function serves it; patched, it falls through)."""
    q = _jagged([5, 7], 2, 8).transpose(1, 2)
    kwargs = {**kwargs, "attn_mask": torch.ones(5, 5, dtype=torch.bool)} if "attn_mask" in kwargs else kwargs
    if "dropout_p" not in kwargs:
        with pytest.raises((RuntimeError, ValueError)):
            F.scaled_dot_product_attention(q, q, q, **kwargs)
    with pytest.raises(ArgumentError, match="nested"):
        seqfast.scaled_dot_product_attention(q, q, q, **kwargs)


def test_varlen_attn_signature_is_torchs():
    from torch.nn.attention.varlen import varlen_attn

    ours, theirs = inspect.signature(seqfast.varlen_attn), inspect.signature(varlen_attn)
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.parameters.values()]


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attn_per_sequence_as_torch(causal):
    """seqfast.varlen_attn (torch.nn.attention.varlen.varlen_attn's signature; torch's runs on CUDA's flash kernels
    only) against torch's dense attention on each sequence alone: output, lse and gradients, grouped heads, Ev != E,
    causal bottom-right aligned (torch's flash varlen alignment: ``causal_lower_right``)."""
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.attention.varlen import AuxRequest

    cq, ck = torch.tensor([0, 5, 6, 15]), torch.tensor([0, 7, 10, 19])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
               for shape in ((15, 4, 8), (19, 2, 8), (19, 2, 6)))
    out, lse = seqfast.varlen_attn(q, k, v, cq, ck, 9, 9, window_size=(-1, 0) if causal else (-1, -1),
                                   enable_gqa=True, return_aux=AuxRequest(lse=True), scale=0.4)
    assert lse.shape == (15, 4) and not lse.requires_grad
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    for i in range(3):
        rows, keys = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        qi, ki, vi = q[rows].transpose(0, 1), k[keys].transpose(0, 1), v[keys].transpose(0, 1)
        mask = causal_lower_right(qi.shape[1], ki.shape[1]) if causal else None
        ref = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=0.4, enable_gqa=True).transpose(0, 1)
        close(out[rows], ref, 1e-10)
        scores = qi @ ki.repeat_interleave(2, 0).transpose(-1, -2) * 0.4
        if causal:
            seen = torch.ones(qi.shape[1], ki.shape[1], dtype=torch.bool).tril(ki.shape[1] - qi.shape[1])
            scores = scores.masked_fill(~seen, float("-inf"))
        close(lse[rows], scores.logsumexp(-1).transpose(0, 1), 1e-10)
        ref_grads = torch.autograd.grad((ref * weight[rows]).sum(), (q, k, v))
        for a, b, part in zip(grads, ref_grads, (rows, keys, keys)):
            close(a[part], b[part], 1e-10)


@pytest.mark.parametrize("kwargs, error", [
    (dict(window_size=(4, 0)), "sliding window"),
    (dict(seqused_k=torch.tensor([5, 7])), "paged or partly used"),
    (dict(enable_gqa=False), "same number of heads"),
], ids=["window", "seqused_k", "heads"])
def test_varlen_attn_refusals(kwargs, error):
    q, kv, cu = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.tensor([0, 5, 12])
    with pytest.raises(ValueError, match=error):
        seqfast.varlen_attn(q, kv, kv, cu, cu, 7, 7, **kwargs)


@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float64])
def test_sdpa_float32_mask_with_other_query_dtypes_as_torch(qdtype):
    q, k, v = (t.detach().to(qdtype) for t in _qkv((2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8)))
    mask = torch.randn(5, 6)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = seqfast.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert got.dtype == expected.dtype == qdtype
    close(got.double(), expected.double(), 2e-2 if qdtype == torch.bfloat16 else 1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Errors: torch refuses, seqfast refuses, with a class code written for either catches


SDPA_REFUSED = [
    dict(dropout_p=1.5),
    dict(key=torch.randn(2, 2, 6, 8, dtype=torch.float64)),
    dict(attn_mask=torch.ones(5, 6, dtype=torch.int32)),
    dict(attn_mask=torch.ones(5, 6, dtype=torch.float64)),
    dict(key=torch.randn(2, 3, 6, 8), value=torch.randn(2, 3, 6, 8)),
    dict(key=torch.randn(2, 3, 6, 8), value=torch.randn(2, 3, 6, 8), enable_gqa=True),
    dict(query=torch.randn(8)),
]


@pytest.mark.parametrize("change", SDPA_REFUSED, ids=[str(sorted(c)) + str(i) for i, c in enumerate(SDPA_REFUSED)])
def test_sdpa_refuses_what_torch_refuses(change):
    args = dict(query=torch.randn(2, 2, 5, 8), key=torch.randn(2, 2, 6, 8), value=torch.randn(2, 2, 6, 8))
    args.update(change)
    with pytest.raises((RuntimeError, IndexError, ValueError)):
        F.scaled_dot_product_attention(**args)
    with pytest.raises(ArgumentError) as info:
        seqfast.scaled_dot_product_attention(**args)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)


def _layouts(B: int, H: int, L: int, D: int) -> dict[str, torch.Tensor]:
    """(B, H, L, D) tensors in the memory layouts models make: contiguous, (B, L, H, D) transposed (the projection's
    view), (L, B, H, D) (sequence-first), a slice of a packed (B, L, 3, H, D) projection, D-major, a sliced D."""
    return {
        "bhld": torch.randn(B, H, L, D),
        "blhd": torch.randn(B, L, H, D).transpose(1, 2),
        "lbhd": torch.randn(L, B, H, D).permute(1, 2, 0, 3),
        "packed": torch.randn(B, L, 3, H, D)[:, :, 1].transpose(1, 2),
        "d-major": torch.randn(B, H, D, L).transpose(-1, -2),
        "sliced-d": torch.randn(B, H, L, 2 * D)[..., :D],
    }


SDPA_LAYOUT_CALLS = {
    "plain": lambda q, k: ((q, k, k), {}),
    "causal": lambda q, k: ((q, k, k), {"is_causal": True}),
    "bool-mask": lambda q, k: ((q, k, k), {"attn_mask": torch.rand(1, 1, q.shape[2], k.shape[2]) > 0.2}),
    "float-mask": lambda q, k: ((q, k, k), {"attn_mask": torch.randn(q.shape[2], k.shape[2])}),
    "dropout": lambda q, k: ((q, k, k), {"dropout_p": 0.3}),
    "value-width": lambda q, k: ((q, k, torch.randn(*k.shape[:3], 4)), {}),
    "broadcast-batch": lambda q, k: ((q[:1], k, k), {}),
    "gqa": lambda q, k: ((torch.cat([q, q], 1), k, k), {"enable_gqa": True}),
    "one-kv-head": lambda q, k: ((q, k[:, :1], k[:, :1]), {}),
}


@pytest.mark.parametrize("call", list(SDPA_LAYOUT_CALLS))
@pytest.mark.parametrize("q_layout", list(_layouts(2, 3, 5, 8)))
def test_sdpa_output_strides_as_torch(q_layout, call):
    """torch's fused attention returns its output in the query's layout (torch.empty_like(query)), its unfused path
    (dropout, a different value width, broadcast batch or heads, 3-D / 5-D inputs) a contiguous one. Code after it
    relies on that: out.transpose(1, 2).view(B, L, E) works on torch's output for (B, L, H, D)-view queries."""
    for k_layout in ("bhld", "blhd", "d-major"):
        q, k = _layouts(2, 3, 5, 8)[q_layout], _layouts(2, 3, 7, 8)[k_layout]
        args, kwargs = SDPA_LAYOUT_CALLS[call](q, k)
        want = F.scaled_dot_product_attention(*args, **kwargs)
        got = seqfast.scaled_dot_product_attention(*args, **kwargs)
        assert got.shape == want.shape and got.stride() == want.stride(), (k_layout, got.stride(), want.stride())
        if call != "dropout":
            close(got, want)
        if q_layout == "blhd" and call == "plain" and k_layout != "d-major":  # fused in torch: a view
            B, H, L, D = q.shape
            assert torch.equal(got.transpose(1, 2).view(B, L, H * D), got.transpose(1, 2).reshape(B, L, H * D))


def _sdpa_grad_strides(fn, q, k, v, kwargs) -> tuple:
    """The output's strides and the strides of the gradients that reach q, k, v (non-leaf: as they come)."""
    q, k, v = (t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in (q, k, v))
    seen = {}
    for name, t in (("q", q), ("k", k), ("v", v)):
        t.register_hook(lambda g, name=name: seen.__setitem__(name, g.stride()))
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("attn_mask"), torch.Tensor) and kwargs["attn_mask"].is_floating_point():
        kwargs["attn_mask"] = kwargs["attn_mask"].detach().requires_grad_(kwargs.pop("mask_grad", False))
    kwargs.pop("mask_grad", None)
    out = fn(q, k, v, **kwargs)
    out.backward(torch.randn_like(out))
    return out.stride(), seen


SDPA_GRAD_CALLS = {
    "plain": {},
    "causal": {"is_causal": True},
    "bool-mask": {"attn_mask": "bool4"},
    "float-mask": {"attn_mask": "float2"},
    "float-mask-grad": {"attn_mask": "float2", "mask_grad": True},
    "3-d-mask": {"attn_mask": "float3"},
    "dropout": {"dropout_p": 0.3},
    "value-width": {"value_width": 4},
    "gqa": {"gqa": True},
}
# Not compared: with no keys torch's gradients are broadcast zeros (all strides 0); seqfast's are real zeros.


@pytest.mark.parametrize("call", list(SDPA_GRAD_CALLS))
@pytest.mark.parametrize("layout", ["bhld", "blhd", "packed", "d-major"])
def test_sdpa_gradient_strides_as_torch(layout, call):
    """torch's fused CPU attention returns dQ, dK, dV (B, L, H, E)-ordered whatever the inputs' layout; its unfused
    path (dropout, Dv != D, a mask that needs a gradient, a 3-D mask, an empty sequence, D-major inputs) dQ and dV
    contiguous and dK as its matmul's transpose. A model's q.transpose(1, 2) / view backward is free on the former."""
    spec = SDPA_GRAD_CALLS[call]
    B, H, Lq, Lk, D = 2, 3, 5, spec.get("keys", 7), 8
    q = _layouts(B, 2 * H if spec.get("gqa") else H, Lq, D)[layout]
    k = _layouts(B, H, Lk, D)[layout]
    v = _layouts(B, H, Lk, spec.get("value_width", D))[layout]
    kwargs = {key: val for key, val in spec.items() if key not in ("gqa", "value_width")}
    if spec.get("gqa"):
        kwargs["enable_gqa"] = True
    mask = {"bool4": lambda: torch.rand(1, 1, Lq, Lk) > 0.2, "float2": lambda: torch.randn(Lq, Lk),
            "float3": lambda: torch.randn(1, Lq, Lk)}
    if "attn_mask" in kwargs:
        kwargs["attn_mask"] = mask[kwargs["attn_mask"]]()
    want = _sdpa_grad_strides(F.scaled_dot_product_attention, q, k, v, kwargs)
    got = _sdpa_grad_strides(seqfast.scaled_dot_product_attention, q, k, v, kwargs)
    assert got == want, (got, want)


@pytest.mark.parametrize("case", ["3-d", "5-d", "broadcast-batch", "3-d dropout", "3-d-mask dropout"])
def test_sdpa_gradient_strides_of_other_forms_as_torch(case):
    q = _layouts(2, 3, 5, 8)["blhd"]
    k = _layouts(2, 3, 7, 8)["blhd"]
    kwargs = {"dropout_p": 0.3} if "dropout" in case else {}
    if case.startswith("3-d-mask"):
        kwargs["attn_mask"] = torch.randn(1, 5, 7)
    elif case.startswith("3-d"):
        q, k = q[0], k[0]
    elif case == "5-d":
        q, k = q.unsqueeze(0).expand(2, -1, -1, -1, -1), k.unsqueeze(0).expand(2, -1, -1, -1, -1)
    else:
        q = q[:1]
    want = _sdpa_grad_strides(F.scaled_dot_product_attention, q, k, k.clone(), kwargs)
    got = _sdpa_grad_strides(seqfast.scaled_dot_product_attention, q, k, k.clone(), kwargs)
    assert got == want, (got, want)


def test_sdpa_gradient_strides_as_torch_with_flash_switched_off():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = _layouts(2, 3, 5, 8)["blhd"]
    for backends in ([SDPBackend.MATH], [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        with sdpa_kernel(backends):
            want = _sdpa_grad_strides(F.scaled_dot_product_attention, q, q, q, {})
            got = _sdpa_grad_strides(seqfast.scaled_dot_product_attention, q, q, q, {})
        assert got == want, (backends, got, want)


def test_fused_in_torch_is_torchs_own_choice():
    """seqfast.functional._fused_in_torch (which sets the output's and the gradients' layouts) against torch's
    backend choice for the same CPU call, over masks, dropout, widths, lengths, head counts and strides."""
    from seqfast.functional import _fused_in_torch

    cases = 0
    for layout, mask, dropout, dv, lk, hk, gqa in itertools.product(
            ["bhld", "blhd", "d-major"], [None, "bool2", "float4", "float3", "float2-grad", "float1x5"], [0.0, 0.2],
            [8, 4], [7, 0], [3, 1], [False, True]):
        q = _layouts(2, 3, 5, 8)[layout]
        k = _layouts(2, hk, max(lk, 1), 8)[layout][:, :, :lk]
        v = _layouts(2, hk, max(lk, 1), dv)[layout][:, :, :lk]
        m = {None: None, "bool2": torch.rand(5, lk) > 0.3, "float4": torch.randn(2, 1, 5, lk),
             "float3": torch.randn(1, 5, lk), "float2-grad": torch.randn(5, lk, requires_grad=True),
             "float1x5": torch.randn(1, lk)}[mask]
        try:
            choice = torch._fused_sdp_choice(q, k, v, m, dropout, False, enable_gqa=gqa)
        except RuntimeError:  # torch refuses the call (e.g. GQA heads without enable_gqa on the fused check)
            continue
        assert _fused_in_torch(q, k, v, m, dropout, gqa) == (choice != 0), (layout, mask, dropout, dv, lk, hk, gqa)
        cases += 1
    assert cases > 500, cases


@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8), (2, 2, 3, 5, 8)])
def test_sdpa_output_strides_of_other_ranks_as_torch(shape):
    x = torch.randn(*shape)
    for q in (x, x.transpose(0, -2)):
        want = F.scaled_dot_product_attention(q, q, q)
        assert seqfast.scaled_dot_product_attention(q, q, q).stride() == want.stride()


def test_compile_caches_keyed_by_the_ops_contract():
    """torch.compile's on-disk caches know custom ops by name: seqfast puts its ops' contract version in their key,
    so a graph compiled against another contract (other fake strides) is not reused."""
    from seqfast.ops import CONTRACT

    assert CONTRACT in torch.compiler.config.cache_key_tag.split("+")


def test_sdpa_refuses_key_value_length_mismatch_that_torch_lets_through():
    # torch 2.13's fused CPU path returns a result for 6 keys and 7 values; seqfast says which is wrong.
    with pytest.raises(ArgumentError, match="share the sequence length"):
        seqfast.scaled_dot_product_attention(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 7, 8))


def test_ctc_errors_are_runtime_errors_as_torchs():
    lp, tg, il, tl = ctc_case()
    for bad in (dict(blank=6), dict(input_lengths=[10, 7, 8]), dict(targets=tg[:2])):
        args = dict(log_probs=lp, targets=tg, input_lengths=il, target_lengths=tl) | bad
        with pytest.raises(RuntimeError):
            F.ctc_loss(**args)
        with pytest.raises(RuntimeError):
            seqfast.ctc_loss(**args)
    with pytest.raises(RuntimeError):
        seqfast.nn.CTCLoss(reduction="avg")


# The scalar arguments' types, as torch's C++ signatures parse them: a bool is True or False only; a float is a
# Python or numpy number or a 0-d tensor that needs no gradient. Anything else is a TypeError in torch, where
# Python's truth value or float() would otherwise give it a meaning silently.
SCALAR_VALUES = [1, 0, 1.0, None, "no", np.bool_(True), np.int64(1), np.float32(0.5), 0.5j, torch.tensor(True),
                 torch.tensor(0.5), torch.tensor([0.5]), torch.tensor(0.5, requires_grad=True), torch.tensor(1)]
SDPA_SCALARS = ["is_causal", "enable_gqa", "dropout_p", "scale"]


def _outcome(fn):
    """(exception class family, result): 'type' for a TypeError, 'error' for another exception, else 'ok'."""
    try:
        out = fn()
    except TypeError:
        return "type", None
    except (RuntimeError, ValueError):
        return "error", None
    return "ok", out


@pytest.mark.parametrize("name", SDPA_SCALARS)
@pytest.mark.parametrize("value", SCALAR_VALUES, ids=[repr(v) for v in SCALAR_VALUES])
def test_sdpa_scalar_argument_types_as_torch(name, value):
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    want, expected = _outcome(lambda: F.scaled_dot_product_attention(q, k, v, **{name: value}))
    got, out = _outcome(lambda: seqfast.scaled_dot_product_attention(q, k, v, **{name: value}))
    assert got == want, (name, value)
    if want == "ok":
        if name == "dropout_p" and float(value) not in (0.0, 1.0):  # each library draws from its own stream
            assert out.shape == expected.shape and not torch.allclose(out, F.scaled_dot_product_attention(q, k, v))
        else:
            close(out, expected)
    elif want == "type":
        with pytest.raises(ArgumentError, match=f"argument '{name}' must be"):
            seqfast.scaled_dot_product_attention(q, k, v, **{name: value})


@pytest.mark.parametrize("value", SCALAR_VALUES, ids=[repr(v) for v in SCALAR_VALUES])
def test_ctc_zero_infinity_type_as_torch(value):
    lp, tg, il, tl = ctc_case()
    want, _ = _outcome(lambda: F.ctc_loss(lp, tg, il, tl, zero_infinity=value))
    assert want == "type"  # torch takes True and False only
    for fn in (seqfast.ctc_loss, seqfast.ctc_loss_from_logits):
        with pytest.raises(TypeError, match="argument 'zero_infinity' must be bool"):
            fn(lp, tg, il, tl, zero_infinity=value)
    with pytest.raises(TypeError):
        seqfast.nn.CTCLoss(zero_infinity=value)(lp, tg, il, tl)


@pytest.mark.parametrize("blank", [1.0, True, None, torch.tensor([0]), "0"])
def test_ctc_blank_of_another_type_is_a_type_error_as_torch(blank):
    lp, tg, il, tl = ctc_case()
    with pytest.raises(TypeError):
        F.ctc_loss(lp, tg, il, tl, blank=blank)
    with pytest.raises(TypeError, match="blank must be in"):
        seqfast.ctc_loss(lp, tg, il, tl, blank=blank)


def test_sdpa_scale_and_enable_gqa_are_keyword_only_as_torch():
    q = torch.randn(1, 2, 4, 8)
    positional = (q, q, q, None, 0.0, False, 0.5)
    with pytest.raises(TypeError):
        F.scaled_dot_product_attention(*positional)
    with pytest.raises(TypeError):
        seqfast.scaled_dot_product_attention(*positional)
    close(seqfast.scaled_dot_product_attention(*positional[:6], scale=0.5),
          F.scaled_dot_product_attention(*positional[:6], scale=0.5))


# ---------------------------------------------------------------------------------------------------------------
# Autocast


def test_sdpa_follows_cpu_autocast_as_torch():
    q, k, v = (t.detach() for t in _qkv((2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8)))
    mask = torch.randn(5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for args in ((q, k, v), (q.bfloat16(), k, v)):  # mixed bf16 / fp32 inputs are cast too
            expected = F.scaled_dot_product_attention(*args, attn_mask=mask)
            got = seqfast.scaled_dot_product_attention(*args, attn_mask=mask)
            assert got.dtype == expected.dtype == torch.bfloat16
            close(got.float(), expected.float(), 3e-2)
        # float64 is left alone by autocast, in both.
        d = [t.double() for t in (q, k, v)]
        assert seqfast.scaled_dot_product_attention(*d).dtype == F.scaled_dot_product_attention(*d).dtype


def test_sdpa_backward_under_autocast():
    q, k, v = _qkv((2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = grads(F.scaled_dot_product_attention, q, k, v)
        got = grads(seqfast.scaled_dot_product_attention, q, k, v)
    for a, b in zip(got[1], expected[1]):
        assert a.dtype == b.dtype == torch.float32
        close(a, b, 5e-2)


_INFERENCE_FIRST = """
import torch
with torch.inference_mode():  # seqfast imported and first called under inference_mode
    import seqfast
    x = torch.randn(2, 3, 5, 4)
    seqfast.scaled_dot_product_attention(x, x, x)
    seqfast.scaled_dot_product_attention(x, x, x, attn_mask=torch.zeros(5, 5))
    lp = torch.randn(6, 2, 4).log_softmax(-1)
    seqfast.ctc_loss(lp, torch.tensor([[1, 2], [3, 1]]), [6, 5], [2, 1])
for mask in (None, torch.zeros(5, 5)):
    q = torch.randn(2, 3, 5, 4, requires_grad=True)
    seqfast.scaled_dot_product_attention(q, q, q, attn_mask=mask).sum().backward()
    assert q.grad is not None
lp = lp.clone().requires_grad_()
seqfast.ctc_loss(lp, torch.tensor([[1, 2], [3, 1]]), [6, 5], [2, 1]).backward()
print("trained", lp.grad.shape)
"""


def test_training_after_a_first_call_under_inference_mode():
    """torch.inference_mode() makes inference tensors, which autograd cannot save: state that seqfast creates once
    (the no-dropout seed, in C++ and in Python) must not be one, or the first call (or import) under
    inference_mode would break every later training call. A fresh process, since that state lives once per
    process."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _INFERENCE_FIRST], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained torch.Size([6, 2, 4])" in done.stdout


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"attn_mask": "float"}, {"enable_gqa": True}])
def test_sdpa_on_meta_tensors_as_torch(kwargs):
    """The meta device (shape inference, models built under torch.device("meta")): the output's shape, dtype
    and device as torch's."""
    q = torch.empty(2, 4, 5, 8, device="meta")
    kv = torch.empty(2, 2 if kwargs.get("enable_gqa") else 4, 6, 8, device="meta")
    if kwargs.get("attn_mask") == "float":
        kwargs = {"attn_mask": torch.empty(5, 6, device="meta")}
    theirs = F.scaled_dot_product_attention(q, kv, kv, **kwargs)
    ours = seqfast.scaled_dot_product_attention(q, kv, kv, **kwargs)
    assert (ours.shape, ours.dtype, ours.device) == (theirs.shape, theirs.dtype, theirs.device)


@pytest.mark.parametrize("name, args", [("MultiheadAttention", (16, 4)), ("TransformerEncoderLayer", (16, 4, 32)),
                                         ("TransformerDecoderLayer", (16, 4, 32)), ("CTCLoss", ())])
def test_torchscript_refused_with_a_message(name, args):
    """torch.jit.script compiles torch's modules; seqfast's refuse it with a message that names the way out
    (torch.compile / torch.export, or torch's class with the same state_dict), inside a torch container too,
    instead of a TorchScript compiler error about their argument checks."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(getattr(torch.nn, name)(*args))
        ours = getattr(seqfast.nn, name)(*args)
        for module in (ours, torch.nn.Sequential(ours)):
            with pytest.raises(RuntimeError, match=f"seqfast.nn.{name} cannot be compiled by torch.jit.script.*"
                                                   "torch.compile"):
                torch.jit.script(module)
    state = getattr(seqfast.nn, name)(*args).state_dict()
    getattr(torch.nn, name)(*args).load_state_dict(state)  # the way out the message names


def test_mha_under_autocast_matches_torchs_dtypes():
    torch_mha = torch.nn.MultiheadAttention(16, 2)
    ours = seqfast.nn.MultiheadAttention(16, 2)
    ours.load_state_dict(torch_mha.state_dict())
    x = torch.randn(5, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (o1, w1), (o2, w2) = torch_mha(x, x, x), ours(x, x, x)
    assert (o1.dtype, w1.dtype) == (o2.dtype, w2.dtype)
    close(o2.float(), o1.float(), 5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ctc_stays_float32_under_autocast_as_torch(dtype):
    lp, tg, il, tl = ctc_case()
    x = lp.detach().to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if dtype != torch.float16:  # torch's CPU ctc_loss has no float16 kernel even under autocast
            expected = F.ctc_loss(x, tg, il, tl)
            assert expected.dtype == torch.float32
        got = seqfast.ctc_loss(x, tg, il, tl)
    assert got.dtype == torch.float32
    close(got, F.ctc_loss(x.float(), tg, il, tl))


# ---------------------------------------------------------------------------------------------------------------
# Double backward: a clear error, as torch's fused kernels; first-order results with create_graph unchanged


def _second_order(fn, x):
    out = fn(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return g, lambda: torch.autograd.grad(g.pow(2).sum(), x)


@pytest.mark.parametrize("case", ["sdpa", "sdpa-mask", "ctc", "ctc-logits", "varlen"])
def test_double_backward_is_a_clear_error_as_torch(case):
    q, k, v = _qkv((2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8))
    lp, tg, il, tl = ctc_case()
    fmask = torch.randn(5, 6)
    cu_q, cu_k = torch.tensor([0, 2, 5]), torch.tensor([0, 3, 6])
    vk, vv = torch.randn(6, 1, 8), torch.randn(6, 1, 8)
    fns = {
        "sdpa": (lambda m: lambda x: m(x, k, v), F.scaled_dot_product_attention, seqfast.scaled_dot_product_attention,
                 q),
        "sdpa-mask": (lambda m: lambda x: m(q, k, v, attn_mask=x), F.scaled_dot_product_attention,
                      seqfast.scaled_dot_product_attention, fmask.requires_grad_()),
        "ctc": (lambda m: lambda x: m(x, tg, il, tl), F.ctc_loss, seqfast.ctc_loss, lp),
        "ctc-logits": (lambda m: lambda x: m(x, tg, il, tl), lambda x, *a: F.ctc_loss(x.log_softmax(-1), *a),
                       seqfast.ctc_loss_from_logits, lp),
        "varlen": (lambda m: lambda x: m(x, vk, vv, cu_q, cu_k, 3, 3), None, seqfast.varlen_attention,
                   torch.randn(5, 2, 8).requires_grad_()),
    }
    wrap, theirs, ours, x = fns[case]
    # torch's own double backward fails in its fused kernels; with a mask that needs a gradient it takes its
    # differentiable math path instead, where seqfast still refuses clearly.
    if theirs is not None and case != "sdpa-mask":
        g_t, again_t = _second_order(wrap(theirs), x)
        with pytest.raises(RuntimeError, match="derivative for"):
            again_t()
    g_o, again_o = _second_order(wrap(ours), x)
    with pytest.raises(RuntimeError, match="derivative for seqfast::"):
        again_o()
    # The first-order gradient taken with create_graph=True is the ordinary one.
    (plain,) = torch.autograd.grad(wrap(ours)(x).sum(), x)
    assert torch.equal(g_o.detach(), plain)
    if theirs is not None and case != "sdpa-mask":
        close(g_o, g_t, 1e-4)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_double_backward_on_forced_backends_is_a_clear_error(backend):
    q, k, v = _qkv((1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8), dtype=torch.float64)
    lp, tg, il, tl = ctc_case(torch.float64)
    with seqfast.backend(backend):
        for fn, x in ((lambda x: seqfast.scaled_dot_product_attention(x, k, v), q),
                      (lambda x: seqfast.ctc_loss(x, tg, il, tl), lp)):
            g, again = _second_order(fn, x)
            with pytest.raises(RuntimeError, match="derivative for seqfast::"):
                again()


# ---------------------------------------------------------------------------------------------------------------
# torch.compile and torch.export


def graph_breaks(fn, *args) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count



def test_constant_mark_is_torchs():
    """seqfast marks its ISA and thread-count lookups as constants of a compiled graph without importing
    torch._dynamo: the mark must be the one torch's own decorator sets (dynamo then takes the value at tracing)."""
    from seqfast.ops import ctc_loss as ctc_ops

    def theirs():
        return 1

    def ours():
        return 1

    torch.compiler.assume_constant_result(theirs)
    ctc_ops._constant_when_compiled(ours)
    assert vars(ours) == vars(theirs) and vars(ours)

    def fn(x):
        return x + len(ctc_ops._cpu_isa()) + ctc_ops._threads()

    assert graph_breaks(fn, torch.ones(2)) == 0
    x = torch.ones(2)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(x), fn(x), rtol=0, atol=0)


def _sdpa_cases():
    g = torch.Generator().manual_seed(3)
    B, H, L, S, D = 2, 4, 6, 7, 8
    bhld = torch.randn(B, L, H, D, generator=g).transpose(1, 2)  # a (B, L, H, D) -> (B, H, L, D) view
    kv = torch.randn(B, S, 2, D, generator=g).transpose(1, 2)
    return {
        "plain": (dict(), torch.randn(B, H, L, D, generator=g), torch.randn(B, H, S, D), torch.randn(B, H, S, D)),
        "transposed-views": (dict(is_causal=True), bhld, torch.randn(B, L, H, D).transpose(1, 2),
                             torch.randn(B, L, H, D).transpose(1, 2)),
        "bool-mask": (dict(attn_mask=torch.rand(L, S, generator=g) > 0.3), bhld, *(torch.randn(B, H, S, D),) * 2),
        "float-mask": (dict(attn_mask=torch.randn(B, 1, L, S, generator=g)), bhld, *(torch.randn(B, H, S, D),) * 2),
        "gqa": (dict(enable_gqa=True, is_causal=True), bhld, kv, kv.clone()),
    }


@pytest.mark.parametrize("case", list(_sdpa_cases()))
def test_compiled_sdpa_fullgraph_equals_eager(case):
    kwargs, *tensors = _sdpa_cases()[case]
    inputs = [t.clone().requires_grad_() for t in tensors]

    def fn(q, k, v):
        return seqfast.scaled_dot_product_attention(q, k, v, **kwargs)

    assert graph_breaks(fn, *inputs) == 0
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    expected = grads(fn, *inputs)
    got = grads(compiled, *inputs)
    close(got[0], expected[0])
    for a, b in zip(got[1], expected[1]):
        close(a, b)


def test_compiled_sdpa_with_dropout_traces_and_trains():
    q, k, v = _qkv((2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8))

    def fn(q, k, v):
        return seqfast.scaled_dot_product_attention(q, k, v, dropout_p=0.3)

    assert graph_breaks(fn, q, k, v) == 0
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    # Dropout really happens: some outputs differ from the no-dropout attention.
    assert not torch.allclose(out, seqfast.scaled_dot_product_attention(q, k, v))


def test_inductor_training_of_transposed_views():
    """The reported crash: inductor compiled SDPA on (B, L, H, D).transpose(1, 2) views, and the backward op's
    fake gave the inputs' strides while the kernels return contiguous gradients."""
    kwargs, *tensors = _sdpa_cases()["transposed-views"]
    inputs = [t.clone().requires_grad_() for t in tensors]

    def fn(q, k, v):
        return seqfast.scaled_dot_product_attention(q, k, v, **kwargs)

    got = grads(torch.compile(fn, fullgraph=True), *inputs)
    expected = grads(fn, *inputs)
    for a, b in zip(got[1], expected[1]):
        close(a, b)


def _layers():
    torch.manual_seed(0)
    return {
        "mha": (seqfast.nn.MultiheadAttention(16, 2, dropout=0.0), lambda m, x: m(x, x, x)[0]),
        "mha-weights-batch-first": (seqfast.nn.MultiheadAttention(16, 2, batch_first=True),
                                    lambda m, x: sum(o.sum() for o in m(x, x, x, average_attn_weights=False))),
        "encoder": (seqfast.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), lambda m, x: m(x, is_causal=False)),
        "decoder": (seqfast.nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0),
                    lambda m, x: m(x, x.flip(0), tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(5),
                                   tgt_is_causal=True)),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_compiled_layers_fullgraph_train_as_eager(name):
    module, call = _layers()[name]
    x = torch.randn(5, 3, 16, requires_grad=True)
    assert graph_breaks(lambda x: call(module, x), x) == 0
    compiled = torch.compile(lambda x: call(module, x), fullgraph=True, backend="aot_eager")
    expected = grads(lambda x: call(module, x), x)
    got = grads(compiled, x)
    close(got[0], expected[0])
    close(got[1][0], expected[1][0])


def test_mha_weights_with_a_hidden_row_compile_as_eager():
    """A sample whose keys are all padded, the weights returned: torch's NaN output and gradients (weights @ v
    there), compiled without graph breaks (no data-dependent branch) as in eager."""
    torch.manual_seed(0)
    module = seqfast.nn.MultiheadAttention(16, 2, dropout=0.0)
    x = torch.randn(5, 3, 16, requires_grad=True)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1] = True

    def call(x):
        out, w = module(x, x, x, key_padding_mask=pad)
        return out.sum() + w.nan_to_num().sum()

    assert graph_breaks(call, x) == 0
    expected = grads(call, x)
    got = grads(torch.compile(call, fullgraph=True, backend="aot_eager"), x)
    assert expected[0].isnan()
    for a, b in zip((got[0], *got[1]), (expected[0], *expected[1])):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_mha_with_dropout_and_weights_compiles_without_breaks():
    module = seqfast.nn.MultiheadAttention(16, 2, dropout=0.2).train()
    x = torch.randn(5, 3, 16, requires_grad=True)
    assert graph_breaks(lambda x: module(x, x, x), x) == 0


def test_encoder_layer_trains_under_inductor():
    torch.manual_seed(0)
    layer = seqfast.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    expected = grads(layer, x)
    got = grads(torch.compile(layer, fullgraph=True), x)
    close(got[0], expected[0])
    close(got[1][0], expected[1][0])


def test_export_strict():
    layer = seqfast.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(3, 5, 16)
    program = torch.export.export(layer, (x,), strict=True)
    assert any("seqfast.attention_forward" in str(n.target) for n in program.graph.nodes)
    close(program.module()(x), layer(x))


def test_compiled_ctc_with_tensor_lengths_fullgraph():
    lp, tg, il, tl = ctc_case()
    il, tl = torch.tensor(il), torch.tensor(tl)

    def fn(x):
        return seqfast.ctc_loss(x, tg, il, tl) + seqfast.ctc_loss_from_logits(x, tg, il, tl, reduction="sum")

    assert graph_breaks(fn, lp) == 0
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    expected = grads(fn, lp)
    got = grads(compiled, lp)
    close(got[0], expected[0])
    close(got[1][0], expected[1][0])
    # The checks still run inside the graph, on the device.
    bad_labels = torch.compile(lambda x: seqfast.ctc_loss(x, torch.full_like(tg, 9), il, tl), fullgraph=True,
                               backend="aot_eager")
    with pytest.raises(RuntimeError, match="labels"):
        bad_labels(lp)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_compiled_ctc_checkpoints_as_eager_bit_for_bit(isa, monkeypatch):
    """torch.compile takes the ISA and the thread count that choose the CPU float32 checkpoint spacing as constants
    of the graph: the compiled loss checkpoints as the eager one does, so loss and gradient are the same bits. (With
    the full log_alpha table instead, the gradient's last bits differ: checked below, so the comparison can fail.)"""
    from seqfast import _C
    from seqfast.ops import ctc_loss as ctc_ops

    order = ["baseline", "avx2", "avx512"]
    if order.index(_C.cpu_isa_supported()) < order.index(isa):
        pytest.skip(f"needs an {isa} CPU")
    g = torch.Generator().manual_seed(6)
    T, N, C, S = 120, 4, 20, 30
    lp = torch.randn(T, N, C, generator=g).log_softmax(-1).requires_grad_()
    tg = torch.randint(1, C, (N, S), generator=g)
    il, tl = torch.full((N,), T), torch.tensor([30, 29, 12, 0])

    def fn(x):
        return seqfast.ctc_loss(x, tg, il, tl, reduction="none")

    previous = _C.set_cpu_isa(isa)
    try:
        assert ctc_ops.choose_alpha_every(lp, tg, True) > 1
        torch._dynamo.reset()  # the ISA is traced as a constant: a graph from another test's cap must not be reused
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got, want = grads(compiled, lp), grads(fn, lp)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1][0], want[1][0])
        # A cap set after compiling is not seen by the graph: the op refuses its checkpoints, and says why.
        _C.set_cpu_isa("baseline")
        with pytest.raises(RuntimeError, match=r"traced under.*torch\._dynamo\.reset"):
            compiled(lp)
        _C.set_cpu_isa(isa)
        monkeypatch.setattr(ctc_ops, "ALPHA_EVERY", 1)
        table = grads(fn, lp)
        assert torch.equal(table[0], want[0]) and not torch.equal(table[1][0], want[1][0])
    finally:
        _C.set_cpu_isa(previous)
        torch._dynamo.reset()


def test_forced_backend_inside_compile_runs_that_backend():
    q, k, v = (t.detach().double() for t in _qkv((1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8)))
    calls = []
    from seqfast import _backend

    original = _backend._IMPLS[("attention_forward", "reference")]

    def spy(*args):
        calls.append(1)
        return original(*args)

    _backend._IMPLS[("attention_forward", "reference")] = spy
    try:
        with seqfast.backend("reference"):
            out = torch.compile(seqfast.scaled_dot_product_attention, backend="aot_eager")(q, k, v)
    finally:
        _backend._IMPLS[("attention_forward", "reference")] = original
    assert calls
    close(out, F.scaled_dot_product_attention(q, k, v), 1e-10)


_TRACE_SCRIPT = """
import warnings
import torch, torch.nn.functional as F, seqfast
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
torch.manual_seed(0)
mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
ours = seqfast.nn.MultiheadAttention(16, 4, batch_first=True).eval()
ours.load_state_dict(mha.state_dict())
calls = {  # name: (torch's callable, seqfast's, trace inputs, other shapes)
    "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
             lambda q, k, v: seqfast.scaled_dot_product_attention(q, k, v, is_causal=True),
             (torch.randn(2, 3, 5, 8),) * 3, (torch.randn(1, 3, 9, 8),) * 3),
    "sdpa-mask": (lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m),
                  lambda q, m: seqfast.scaled_dot_product_attention(q, q, q, attn_mask=m),
                  (torch.randn(2, 3, 5, 8), torch.randn(5, 5)), (torch.randn(2, 3, 7, 8), torch.randn(7, 7))),
    "mha": (mha, ours, (torch.randn(2, 5, 16),) * 3, (torch.randn(3, 7, 16),) * 3),
    "ctc": (F.ctc_loss, seqfast.ctc_loss,
            (torch.randn(12, 3, 6).log_softmax(-1), torch.randint(1, 6, (3, 4)), torch.full((3,), 12),
             torch.full((3,), 4)),
            (torch.randn(15, 2, 6).log_softmax(-1), torch.randint(1, 6, (2, 5)), torch.full((2,), 15),
             torch.full((2,), 5))),
}
for name, (theirs, mine, args, other) in calls.items():
    expected = theirs(*other)
    traced = torch.jit.trace(mine, args)  # check_trace: a second trace must give the same graph
    got = traced(*other)
    got, expected = (t[0] if isinstance(t, tuple) else t for t in (got, expected))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    print(name, "ok")
"""


def test_jit_trace_as_torch():
    """torch.jit.trace (which torch.onnx's legacy exporter also uses) traces seqfast's calls as torch's: the trace's
    own check (a second trace, the same graph) passes, and the trace runs other shapes as eager torch does. In a
    fresh process: the first attention call of a process once made the no-dropout seed, which a trace recorded as
    an op and its check then found a constant."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["sdpa", "ok", "sdpa-mask", "ok", "mha", "ok", "ctc", "ok"]


# ---------------------------------------------------------------------------------------------------------------
# opcheck with non-contiguous and broadcast inputs


def test_opcheck_attention_with_strided_and_broadcast_inputs():
    g = torch.Generator().manual_seed(4)
    B, H, L, S, D = 2, 2, 5, 6, 8
    q = torch.randn(B, L, H, D, generator=g).transpose(1, 2).requires_grad_()  # non-contiguous
    k = torch.randn(1, H, S, D, generator=g).expand(B, H, S, D).requires_grad_()  # stride-0 batch
    v = torch.randn(B, S, H, 2 * D, generator=g)[..., ::2].transpose(1, 2).contiguous().requires_grad_()
    mask = torch.randn(L, S, generator=g).expand(B, H, L, S)
    seed = torch.tensor(7)
    ops = torch.ops.seqfast
    for args in ((q, k, v, mask, 0.0, 1, 0.3, seed), (q, k, v, None, 0.25, 0, 0.3, seed)):
        torch.library.opcheck(ops.attention_forward, args)
    out, lse = ops.attention_forward(q, k, v, mask, 0.0, 0, 0.3, seed)
    grad_out = torch.randn(B, L, H, D, generator=g).transpose(1, 2)
    plain = [t.detach() for t in (q, k, v, mask, out, lse)]  # the backward ops are not differentiable
    torch.library.opcheck(ops.attention_backward, (grad_out.contiguous(), *plain[:4], *plain[4:], 0.0, 0, 0.3, seed,
                                                    True))
    vq = torch.randn(H, 5, D, generator=g).transpose(0, 1).requires_grad_()
    vk = torch.randn(6, 1, D, generator=g).expand(6, H, D).requires_grad_()
    cu_q, cu_k = torch.tensor([0, 2, 5]), torch.tensor([0, 4, 6])
    torch.library.opcheck(ops.varlen_attention_forward, (vq, vk, vk, cu_q, cu_k, 3, 4, 2, 0.5))
    vout, vlse = ops.varlen_attention_forward(vq, vk, vk, cu_q, cu_k, 3, 4, 2, 0.5)
    vq, vk, vout, vlse = (t.detach() for t in (vq, vk, vout, vlse))
    torch.library.opcheck(ops.varlen_attention_backward,
                          (torch.randn_like(vout), vq, vk, vk, cu_q, cu_k, 3, 4, vout, vlse, 2, 0.5))


def test_opcheck_ctc_with_broadcast_lengths():
    lp, tg, il, tl = ctc_case(torch.float64)
    il = torch.tensor(9).expand(3)  # stride-0 lengths
    tl = torch.tensor(tl)
    ops = torch.ops.seqfast
    for from_logits in (False, True):
        args = (lp, tg, il, tl, 0, False, from_logits, True)
        torch.library.opcheck(ops.ctc_loss_forward, args)
        nll, alpha = ops.ctc_loss_forward(*args)
        torch.library.opcheck(ops.ctc_loss_backward,
                              (torch.ones(1, dtype=torch.float64).expand(3), lp.detach(), tg, il, tl, nll.detach(),
                               alpha, 0, False, from_logits))


# ---------------------------------------------------------------------------------------------------------------
# The extension's one-call route for the common eager attention call accepts only what the checks accept


def _route_cases():
    g = torch.Generator().manual_seed(9)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype)

    base = (r(2, 3, 5, 8), r(2, 3, 6, 8), r(2, 3, 6, 4))
    yield "plain", base
    yield "float64", tuple(t.double() for t in base)
    yield "bfloat16", tuple(t.bfloat16() for t in base)
    yield "mixed-dtype", (base[0], base[1].double(), base[2])
    yield "int", tuple(t.long() for t in base)
    yield "3-d", tuple(t[0] for t in base)
    yield "kv-batch-1", (base[0], base[1][:1], base[2][:1])
    yield "kv-heads-1", (base[0], base[1][:, :1], base[2][:, :1])
    yield "e-mismatch", (base[0], r(2, 3, 6, 7), base[2])
    yield "len-mismatch", (base[0], base[1], r(2, 3, 7, 4))
    yield "head-dim-0", (r(2, 3, 5, 0), r(2, 3, 6, 0), base[2])
    yield "strided-last", (r(2, 3, 5, 16)[..., ::2], base[1], base[2])
    yield "transposed", (r(2, 5, 3, 8).transpose(1, 2), r(2, 6, 3, 8).transpose(1, 2), r(2, 6, 3, 4).transpose(1, 2))
    yield "meta-key", (base[0], base[1].to("meta"), base[2])
    yield "list", ([1.0], base[1], base[2])


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", [n for n, _ in _route_cases()])
def test_common_attention_route_accepts_only_what_the_checks_accept(name, causal, autocast):
    from seqfast import functional

    q, k, v = dict(_route_cases())[name]
    route = functional._COMMON_ATTENTION
    assert route is not None  # the extension is built by `make test`
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        try:
            out = route(q, k, v, causal, None)
        except TypeError:  # arguments pybind cannot convert: the public function falls back to the checks
            out = None
        try:
            expected = functional._seeded_attention(q, k, v, None, 0.0, causal, None, False, functional._NO_SEED)
        except (ArgumentError, RuntimeError):
            expected = None
    if out is None:
        return  # the full path decides
    assert expected is not None, "the route took a call the checks refuse"
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_sdpa_strided_nested_refused_by_name():
    """Nested tensors of the strided layout (torch.nested.nested_tensor's default) may be ragged in any dim, which
    seqfast's varlen kernels do not take: refused by name (it used to fail inside with "dimension 2 is irregular"),
    so that a patched call falls through to torch's own function, which serves it."""
    q = torch.nested.nested_tensor([torch.randn(2, 5, 8), torch.randn(2, 9, 8)])
    expected = F.scaled_dot_product_attention(q, q, q)
    with pytest.raises(ArgumentError, match="jagged nested tensors .* not the strided layout"):
        seqfast.scaled_dot_product_attention(q, q, q)
    with seqfast.patch_functional() as report:
        out = F.scaled_dot_product_attention(q, q, q)
    assert torch.equal(out.to_padded_tensor(0.0), expected.to_padded_tensor(0.0))
    assert report.fell_through and not report.served


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_recomputes_the_same_dropout(reentrant):
    """torch.utils.checkpoint reruns the forward in backward with torch's RNG state restored: the dropout drawn
    there must be the first forward's, or the gradients are silently those of another mask. seqfast draws its
    dropout seed from torch's generator, so a checkpointed call gives the plain call's output and gradients, bit
    for bit, as torch's own function does (checked on both)."""
    from torch.utils.checkpoint import checkpoint

    def run(fn, checkpointed):
        g = torch.Generator().manual_seed(0)
        leaves = [torch.randn(2, 3, n, 16, generator=g, requires_grad=True) for n in (17, 19, 19)]
        torch.manual_seed(123)

        def block(q, k, v):
            return fn(q, k, v, dropout_p=0.3).sin()

        out = checkpoint(block, *leaves, use_reentrant=reentrant) if checkpointed else block(*leaves)
        out.sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    for fn in (F.scaled_dot_product_attention, seqfast.scaled_dot_product_attention):
        plain, checkpointed = run(fn, False), run(fn, True)
        assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed)), fn

    module = seqfast.nn.MultiheadAttention(16, 4, dropout=0.2, batch_first=True)
    results = []
    for checkpointed in (False, True):
        x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(5)

        def attend(t):
            return module(t, t, t, need_weights=False)[0]

        out = checkpoint(attend, x, use_reentrant=reentrant) if checkpointed else attend(x)
        out.sum().backward()  # (the reentrant checkpoint takes no torch.autograd.grad)
        results.append((out.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
