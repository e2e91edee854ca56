"""Property tests of every public function against torch (same run) and the float64 reference: random
shapes, dtypes, strides, masks, argument forms and special values (NaN, +-inf), 500 examples each.

The comparisons are torch's own results, NaN positions included. Attention is compared with torch's math
path, the one consistent about special values (its fused float32 CPU kernel drops a NaN from rows shorter
than one vector); the deliberate difference documented in the README (under a causal mask a NaN or inf value
in the query, key or value does not reach what the mask hides, where torch's 0 * NaN spreads it) is kept out
of the drawn cases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import seqfast

EXAMPLES = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TOL = {torch.float32: 2e-5, torch.float64: 1e-9}
SPECIALS = (None, float("nan"), float("inf"), float("-inf"))


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal shapes and dtypes, NaN where torch has NaN, infinities where torch has them, close elsewhere."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=TOL[dtype], atol=TOL[dtype], equal_nan=True)


def grad_of(out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def _poke(t: torch.Tensor, value: float | None, where: float) -> torch.Tensor:
    """``t`` with one element (at fraction ``where`` of its flat index range) set to ``value``."""
    t = t.clone()
    if value is not None and t.numel():
        index = torch.unravel_index(torch.tensor(min(int(where * t.numel()), t.numel() - 1)), t.shape)
        t[index] = value
    return t


# ---------------------------------------------------------------------------------------------------------------
# scaled_dot_product_attention


@st.composite
def sdpa_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    B, Hk = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Hq = Hk * draw(st.integers(1, 2))
    Lq, Lk, D, Dv = (draw(st.integers(1, 9)) for _ in range(4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))

    def tensor(*shape, transposed):
        if transposed:  # a (B, L, H, E) buffer seen as (B, H, L, E): non-contiguous, as after a projection
            return torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g, dtype=dtype).transpose(1, 2)
        return torch.randn(*shape, generator=g, dtype=dtype)

    transposed = draw(st.booleans())
    q, k, v = tensor(B, Hq, Lq, D, transposed=transposed), tensor(B, Hk, Lk, D, transposed=transposed), \
        tensor(B, Hk, Lk, Dv, transposed=transposed)
    causal = draw(st.booleans())
    mask_kind = draw(st.sampled_from(["none", "bool", "float"]))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(Lq, Lk, generator=g) > 0.4
        mask[:, 0] = True  # one visible key per row (causal rows all see key 0 too)
    elif mask_kind == "float":
        mask = torch.randn(B, 1, Lq, Lk, generator=g, dtype=dtype)
    target = draw(st.sampled_from(["q", "k", "v", "mask"] if mask_kind == "float" else ["q", "k", "v"]))
    special, where = draw(st.sampled_from(SPECIALS)), draw(st.floats(0, 1))
    if causal and mask is None and target != "mask":
        special = None
    if target == "mask":
        mask = _poke(mask, special, where)
    else:
        q, k, v = (_poke(t, special, where) if name == target else t for name, t in zip("qkv", (q, k, v)))
    scale = draw(st.sampled_from([None, 0.3]))
    return dtype, q, k, v, mask, causal and mask is None, scale, Hq != Hk


@EXAMPLES
@given(sdpa_case())
def test_sdpa_against_torch(case):
    dtype, q, k, v, mask, causal, scale, gqa = case
    leaves_t = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves_s = [t.clone().requires_grad_() for t in (q, k, v)]
    kwargs = dict(attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    with sdpa_kernel(SDPBackend.MATH):
        theirs = F.scaled_dot_product_attention(*leaves_t, **kwargs)
    ours = seqfast.scaled_dot_product_attention(*leaves_s, **kwargs)
    assert_same(ours, theirs, dtype)
    for a, b in zip(grad_of(ours, leaves_s), grad_of(theirs, leaves_t)):
        assert_same(a, b, dtype)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(sdpa_case())
def test_sdpa_reference_backend_agrees(case):
    """The float64 reference, forced, gives what the kernels give (a few examples: it is slow)."""
    dtype, q, k, v, mask, causal, scale, gqa = case
    kwargs = dict(attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    ours = seqfast.scaled_dot_product_attention(q, k, v, **kwargs)
    with seqfast.backend("reference"):
        ref = seqfast.scaled_dot_product_attention(q, k, v, **kwargs)
    assert_same(ours, ref, dtype)


# ---------------------------------------------------------------------------------------------------------------
# varlen_attention


@EXAMPLES
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 6)), min_size=1, max_size=4), st.integers(1, 2),
       st.integers(1, 2), st.integers(1, 8), st.booleans(), st.sampled_from([torch.float32, torch.float64]),
       st.integers(0, 2**31))
def test_varlen_against_torch_per_sequence(lengths, Hk, group, D, causal, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    Hq = Hk * group
    lq, lk = [a for a, _ in lengths], [b for _, b in lengths]
    q = torch.randn(sum(lq), Hq, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lk), Hk, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lk), Hk, D, generator=g, dtype=dtype, requires_grad=True)
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()])
    ours = seqfast.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal)
    parts = []
    for b in range(len(lengths)):
        qs, ks, vs = (t[c[b]:c[b + 1]].transpose(0, 1) for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        mask = None
        if causal:  # bottom-right: query i sees keys j <= i + Lk - Lq
            mask = torch.ones(lq[b], lk[b], dtype=torch.bool).tril(lk[b] - lq[b])
            mask[:, 0] |= ~mask.any(-1)  # rows that would see nothing: seqfast gives 0 there, checked below
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True).transpose(0, 1)
        if causal:
            out = out.masked_fill(~torch.ones(lq[b], lk[b], dtype=torch.bool).tril(lk[b] - lq[b]).any(-1)[:, None,
                                                                                                         None], 0.0)
        parts.append(out)
    theirs = torch.cat(parts) if parts else ours
    assert_same(ours, theirs, dtype)
    for a, b in zip(grad_of(ours, [q, k, v]), grad_of(theirs, [q, k, v])):
        assert_same(a, b, dtype)


# ---------------------------------------------------------------------------------------------------------------
# ctc_loss and ctc_loss_from_logits


@st.composite
def ctc_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    T, N, C = draw(st.integers(1, 12)), draw(st.integers(1, 4)), draw(st.integers(2, 7))
    blank = draw(st.integers(0, C - 1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    target_lengths = [draw(st.integers(0, 5)) for _ in range(N)]
    input_lengths = [draw(st.integers(0, T)) for _ in range(N)]
    labels = [x for x in range(C) if x != blank]
    targets = [[labels[int(i)] for i in torch.randint(len(labels), (n,), generator=g)] for n in target_lengths]
    form = draw(st.sampled_from(["padded", "concatenated"]))
    if form == "padded":
        S = max(target_lengths)
        tg = torch.tensor([t + [blank] * (S - len(t)) for t in targets], dtype=torch.int64).reshape(N, S)
    else:
        tg = torch.tensor([x for t in targets for x in t], dtype=torch.int64)
    as_tensor = draw(st.booleans())
    il, tl = (torch.tensor(input_lengths), torch.tensor(target_lengths)) if as_tensor else (input_lengths,
                                                                                             target_lengths)
    x = torch.randn(T, N, C, generator=g, dtype=dtype) * draw(st.sampled_from([1.0, 4.0]))
    special = draw(st.sampled_from(SPECIALS + (None, None)))
    where = draw(st.floats(0, 1))
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    zero_infinity = draw(st.booleans())
    return dtype, x, tg, il, tl, blank, reduction, zero_infinity, special, where


def _torch_ctc(x, from_logits, *args, **kwargs):
    return F.ctc_loss(x.log_softmax(-1) if from_logits else x, *args, **kwargs)


def _check_ctc(case, from_logits):
    """Logits take any special value; log-probs (<= 0 by definition) take NaN and -inf, set after log_softmax.
    Gradients are compared except where the README's documented difference lies: a -inf log-prob (and, from
    logits, a row holding -inf) gets a finite gradient in seqfast where torch's formula gives NaN."""
    dtype, x, tg, il, tl, blank, reduction, zero_infinity, special, where = case
    if not from_logits:
        x = x.log_softmax(-1)
        special = None if special == float("inf") else special
    x = _poke(x, special, where)
    xs, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    kwargs = dict(blank=blank, reduction=reduction, zero_infinity=zero_infinity)
    fn = seqfast.ctc_loss_from_logits if from_logits else seqfast.ctc_loss
    ours = fn(xs, tg, il, tl, **kwargs)
    theirs = _torch_ctc(xt, from_logits, tg, il, tl, **kwargs)
    assert_same(ours, theirs, dtype)
    (go,), (gt,) = grad_of(ours, [xs]), grad_of(theirs, [xt])
    neg_inf = x == float("-inf")
    hidden = neg_inf.any(-1, keepdim=True).expand_as(x) if from_logits else neg_inf
    # A NaN or +inf on a state that reaches no end leaves the sample's loss finite; torch's recursions still carry
    # it to other entries of that sample's gradient, seqfast shows it at its own entry (from logits: its row) only
    # (README; exact cases in tests/test_ctc_special_values.py). There seqfast's gradient must be finite, torch's
    # is not compared.
    per_sample = _torch_ctc(x, from_logits, tg, il, tl, blank=blank, reduction="none").reshape(-1)
    own = x.isfinite().all(-1, keepdim=True).expand_as(x) if from_logits else x.isfinite()  # a logit: its whole row
    spread = gt.isnan() & own & per_sample.isfinite().reshape(1, -1, 1).expand_as(x)
    assert go[spread].isfinite().all()
    hidden = hidden | spread
    assert_same(go.masked_fill(hidden, 0.0), gt.masked_fill(hidden, 0.0), dtype)


@EXAMPLES
@given(ctc_case())
def test_ctc_loss_against_torch(case):
    _check_ctc(case, from_logits=False)


@EXAMPLES
@given(ctc_case())
def test_ctc_loss_from_logits_against_torch(case):
    _check_ctc(case, from_logits=True)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(ctc_case())
def test_ctc_reference_backend_agrees(case):
    dtype, x, tg, il, tl, blank, reduction, zero_infinity, special, where = case
    x = _poke(x.log_softmax(-1), None if special == float("inf") else special, where)
    kwargs = dict(blank=blank, reduction=reduction, zero_infinity=zero_infinity)
    ours = seqfast.ctc_loss(x, tg, il, tl, **kwargs)
    with seqfast.backend("reference"):
        ref = seqfast.ctc_loss(x, tg, il, tl, **kwargs)
    assert_same(ours, ref, dtype)


# ---------------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention


@st.composite
def mha_case(draw):
    """Module options, inputs and forward arguments; padding and attention masks may hide every key of a row."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    E, H = draw(st.sampled_from([(8, 1), (8, 2), (12, 4)]))
    self_attention = draw(st.booleans())
    kdim, vdim = None, None
    if not self_attention:
        kdim, vdim = draw(st.sampled_from([None, 6])), draw(st.sampled_from([None, 10]))
    options = dict(bias=draw(st.booleans()), add_bias_kv=draw(st.booleans()), add_zero_attn=draw(st.booleans()),
                   kdim=kdim, vdim=vdim, batch_first=draw(st.booleans()))
    N, L = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    S = L if self_attention else draw(st.integers(1, 6))
    batched = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))

    def tensor(length, dim):
        shape = ((N, length, dim) if options["batch_first"] else (length, N, dim)) if batched else (length, dim)
        return torch.randn(shape, generator=g, dtype=dtype)

    q = tensor(L, E)
    k, v = (q, q) if self_attention else (tensor(S, kdim or E), tensor(S, vdim or E))
    kwargs = dict(need_weights=draw(st.booleans()), average_attn_weights=draw(st.booleans()))
    hide = draw(st.floats(0.0, 0.9))  # high values leave rows with no key
    if draw(st.booleans()):
        pad = torch.rand((N, S) if batched else (S,), generator=g) < hide
        kwargs["key_padding_mask"] = pad if draw(st.booleans()) else \
            torch.zeros(pad.shape, dtype=dtype).masked_fill(pad, float("-inf"))
    if draw(st.booleans()):
        shape = (L, S) if draw(st.booleans()) else ((N * H if batched else H), L, S)
        hidden = torch.rand(shape, generator=g) < hide
        additive = torch.randn(shape, generator=g, dtype=dtype).masked_fill(hidden, float("-inf"))
        kwargs["attn_mask"] = additive if draw(st.booleans()) else hidden
    return dtype, E, H, options, draw(st.booleans()), (q, k, v), kwargs


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mha_case())
def test_multihead_attention_against_torch(case):
    """Outputs, weights and the gradients of inputs and parameters, NaN positions included (torch's NaN rows
    where a query sees no key and the weights are returned)."""
    dtype, E, H, options, training, (q, k, v), kwargs = case
    theirs = torch.nn.MultiheadAttention(E, H, dtype=dtype, **options)
    ours = seqfast.nn.MultiheadAttention(E, H, dtype=dtype, **options)
    with torch.no_grad():
        for p in theirs.parameters():  # torch's zero biases would hide bias bugs
            p.copy_(torch.randn(p.shape, dtype=dtype) * 0.5)
    ours.load_state_dict(theirs.state_dict())
    results = []
    for module in (ours, theirs):
        module.train(training)
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)] if q is not k else \
            [q.detach().clone().requires_grad_()] * 3
        out, weights = module(*inputs, **kwargs)
        params = [p for _, p in sorted(module.named_parameters())]
        leaves = list({id(t): t for t in inputs}.values()) + params
        results.append((out, weights, *grad_of(out, leaves)))
    for a, b in zip(*results):
        if b is None:
            assert a is None
        else:
            assert_same(a, b.detach(), dtype)
