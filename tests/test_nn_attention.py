"""seqfast.nn.MultiheadAttention and the Transformer layers against torch.nn with the same weights."""

from __future__ import annotations

import contextlib
import inspect
import warnings

import pytest
import torch

import seqfast
import seqfast.nn.multihead_attention as mha_module

E, H = 8, 2  # embed_dim, num_heads (head_dim 4)
N, L, S = 3, 5, 7  # batch, target length, source length (awkward on purpose)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=["auto", "reference"], autouse=True)
def seqfast_backend(request):
    """Every test runs with the dispatcher's CPU kernels ("auto") and with the float64 reference ops. A
    missing or broken C++ extension fails the "auto" runs: it is built by `make test`, never optional."""
    with seqfast.backend(request.param):
        yield request.param


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records the keyword arguments of every seqfast attention call made by seqfast.nn."""
    calls = []
    inner = mha_module._seeded_attention

    def spy(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed):
        calls.append(dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal))
        return inner(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed)

    monkeypatch.setattr(mha_module, "_seeded_attention", spy)
    return calls


def _randomise(module: torch.nn.Module) -> torch.nn.Module:
    # torch initialises the projection biases to 0, which would hide bias bugs.
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def _pair(dtype=torch.float64, **kwargs):
    ref = _randomise(torch.nn.MultiheadAttention(E, H, dtype=dtype, **kwargs))
    ours = seqfast.nn.MultiheadAttention(E, H, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(dtype, batch_first=True, kdim=E, vdim=E, batched=True, requires_grad=False):
    def make(length, dim):
        shape = ((N, length, dim) if batch_first else (length, N, dim)) if batched else (length, dim)
        return torch.randn(shape, dtype=dtype, requires_grad=requires_grad)

    return make(L, E), make(S, kdim), make(S, vdim)


def _masks(dtype, kind, attn_dim=2, batched=True):
    """(key_padding_mask, attn_mask) in torch's MHA convention; every query row keeps a visible key."""
    kpm_shape = (N, S) if batched else (S,)
    am_shape = (L, S) if attn_dim == 2 else ((N * H if batched else H), L, S)
    kpm = torch.rand(kpm_shape) < 0.4
    am = torch.rand(am_shape) < 0.4
    kpm[..., 0] = False
    am[..., 0] = False
    if kind == "float":
        kpm = torch.randn(kpm_shape, dtype=dtype).masked_fill(kpm, float("-inf"))
        am = torch.randn(am_shape, dtype=dtype).masked_fill(am, float("-inf"))
    return kpm, am


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **TOL[dtype])


# --------------------------------------------------------------------------------------------- module


@pytest.mark.parametrize("kwargs", [{}, dict(bias=False), dict(add_bias_kv=True), dict(kdim=5, vdim=3)])
def test_state_dict_and_init_match_torch(kwargs):
    torch.manual_seed(7)
    ref = torch.nn.MultiheadAttention(E, H, **kwargs)
    torch.manual_seed(7)
    ours = seqfast.nn.MultiheadAttention(E, H, **kwargs)
    assert isinstance(ours.out_proj, torch.nn.modules.linear.NonDynamicallyQuantizableLinear)
    assert ours._qkv_same_embed_dim == ref._qkv_same_embed_dim
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    for name in sd_ref:  # same initialisation, drawn from the RNG in the same order
        assert torch.equal(sd_ref[name], sd_ours[name]), name
    # Round trip both ways, strictly.
    _randomise(ours)
    ref.load_state_dict(ours.state_dict())
    back = seqfast.nn.MultiheadAttention(E, H, **kwargs)
    back.load_state_dict(ref.state_dict())
    for name, t in back.state_dict().items():
        assert torch.equal(t, sd_ours[name]), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("average", [True, False])
def test_outputs_and_weights_match_torch(dtype, batch_first, average, sdpa_calls):
    ref, ours = _pair(dtype, batch_first=batch_first)
    q, k, v = _inputs(dtype, batch_first)
    out, w = ours(q, k, v, average_attn_weights=average)
    ref_out, ref_w = ref(q, k, v, average_attn_weights=average)
    _close(out, ref_out, dtype)
    _close(w, ref_w, dtype)
    assert w.shape == ((N, L, S) if average else (N, H, L, S))
    out2, w2 = ours(q, k, v, need_weights=False)
    assert w2 is None
    _close(out2, ref_out, dtype)
    assert len(sdpa_calls) == 2  # the output always comes from seqfast's attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize(("use", "attn_dim"), [("kpm", 2), ("attn", 2), ("attn", 3), ("both", 2), ("both", 3)])
def test_masks_match_torch(dtype, kind, use, attn_dim):
    ref, ours = _pair(dtype, batch_first=True)
    q, k, v = _inputs(dtype)
    kpm, am = _masks(dtype, kind, attn_dim)
    kw = dict(key_padding_mask=kpm if use != "attn" else None, attn_mask=am if use != "kpm" else None)
    for need_weights in (True, False):
        out, w = ours(q, k, v, need_weights=need_weights, average_attn_weights=False, **kw)
        ref_out, ref_w = ref(q, k, v, need_weights=need_weights, average_attn_weights=False, **kw)
        _close(out, ref_out, dtype)
        if need_weights:
            _close(w, ref_w, dtype)


def test_mixed_mask_types_warn_and_match_torch():
    ref, ours = _pair(torch.float64)
    q, k, v = _inputs(torch.float64, batch_first=False)
    kpm, _ = _masks(torch.float64, "bool")
    _, am = _masks(torch.float64, "float")
    with pytest.warns(UserWarning, match="mismatched"):
        out, w = ours(q, k, v, key_padding_mask=kpm, attn_mask=am)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_out, ref_w = ref(q, k, v, key_padding_mask=kpm, attn_mask=am)
    _close(out, ref_out, torch.float64)
    _close(w, ref_w, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kwargs", [dict(kdim=5, vdim=3), dict(add_bias_kv=True), dict(add_zero_attn=True),
               dict(add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=6), dict(bias=False)]
)
@pytest.mark.parametrize("batch_first", [False, True])
def test_options_match_torch(dtype, kwargs, batch_first):
    ref, ours = _pair(dtype, batch_first=batch_first, **kwargs)
    q, k, v = _inputs(dtype, batch_first, kdim=kwargs.get("kdim", E), vdim=kwargs.get("vdim", E))
    kpm, am = _masks(dtype, "bool", attn_dim=3)
    for masks in ({}, dict(key_padding_mask=kpm, attn_mask=am)):
        out, w = ours(q, k, v, **masks)
        ref_out, ref_w = ref(q, k, v, **masks)
        _close(out, ref_out, dtype)
        _close(w, ref_w, dtype)
        out, _ = ours(q, k, v, need_weights=False, **masks)
        _close(out, ref_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_self_and_cross_attention_projections(dtype):
    # query is key is value (packed projection) and key is value (split projection) paths.
    for batch_first in (False, True):
        ref, ours = _pair(dtype, batch_first=batch_first)
        x, mem, _ = _inputs(dtype, batch_first)
        y = torch.randn_like(x)
        for args in ((x, x, x), (x, mem, mem), (x, x, y), (x, y, x), (y, x, x)):
            _close(ours(*args)[0], ref(*args)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("attn_dim", [2, 3])
def test_unbatched_matches_torch(dtype, attn_dim):
    for batch_first in (False, True):  # ignored for unbatched input
        ref, ours = _pair(dtype, batch_first=batch_first, add_zero_attn=True)
        q, k, v = _inputs(dtype, batched=False)
        kpm, am = _masks(dtype, "float", attn_dim, batched=False)
        for average in (True, False):
            out, w = ours(q, k, v, key_padding_mask=kpm, attn_mask=am, average_attn_weights=average)
            ref_out, ref_w = ref(q, k, v, key_padding_mask=kpm, attn_mask=am, average_attn_weights=average)
            assert out.shape == (L, E)
            _close(out, ref_out, dtype)
            _close(w, ref_w, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_is_causal_hint(dtype, sdpa_calls):
    ref, ours = _pair(dtype, batch_first=True)
    x, _, _ = _inputs(dtype)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)
    with pytest.raises(RuntimeError, match="attn_mask"):
        ours(x, x, x, is_causal=True, need_weights=False)
    # Without weights or padding mask the hint replaces the mask by the fused causal kernel.
    out, _ = ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    assert sdpa_calls[-1]["is_causal"] is True and sdpa_calls[-1]["attn_mask"] is None
    _close(out, ref(x, x, x, attn_mask=causal, need_weights=False)[0], dtype)
    # With weights or a padding mask, torch uses the mask itself; so do we.
    kpm = torch.zeros(N, L, dtype=dtype)
    kpm[0, 3:] = float("-inf")
    for kw in (dict(need_weights=True), dict(need_weights=False, key_padding_mask=kpm)):
        out, w = ours(x, x, x, attn_mask=causal, is_causal=True, **kw)
        assert sdpa_calls[-1]["is_causal"] is False
        ref_out, ref_w = ref(x, x, x, attn_mask=causal, is_causal=True, **kw)
        _close(out, ref_out, dtype)
        if w is not None:
            _close(w, ref_w, dtype)
    # A wrong hint is trusted exactly where torch trusts it.
    wrong = torch.zeros(L, L, dtype=dtype)
    with torch.no_grad():
        out, _ = ours(x, x, x, attn_mask=wrong, is_causal=True, need_weights=False)
        ref_out, _ = ref(x, x, x, attn_mask=wrong, is_causal=True, need_weights=False)
    _close(out, ref_out, dtype)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask_kind", ["attn_mask", "key_padding_mask"])
def test_fully_masked_row(need_weights, mask_kind):
    """A query row that sees no key: returning the weights, torch computes weights @ v and that row is NaN (softmax
    of -inf alone), gradients included; without them its SDPA gives 0. seqfast gives the same in both."""
    ref, ours = _pair(torch.float64, batch_first=True)
    q, k, v = _inputs(torch.float64, requires_grad=True)
    if mask_kind == "attn_mask":
        mask = torch.zeros(L, S, dtype=torch.bool)
        mask[1] = True  # query 1 may attend nothing
    else:
        mask = torch.zeros(N, S, dtype=torch.bool)
        mask[1] = True  # sample 1 has no key
    results = []
    for module in (ours, ref):
        out, w = module(q, k, v, **{mask_kind: mask}, need_weights=need_weights)
        params = [p for _, p in sorted(module.named_parameters())]
        results.append((out, w, *torch.autograd.grad(out.sum(), [q, k, v, *params])))
    assert results[1][0].isnan().any() == need_weights  # the case is the one meant
    for a, b in zip(*results):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, equal_nan=True, **TOL[torch.float64])


@contextlib.contextmanager
def _fastpath(enabled: bool):
    """torch's switch for the fused inference paths of its attention modules, restored after."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


LAYOUT_CASES = {  # torch takes its fused inference path only in the first; each other case leaves it for one reason
    "fast": {},
    "train": dict(train=True),
    "grad": dict(grad=True),
    "cross": dict(inputs="cross"),
    "key-is-value": dict(inputs="kv"),
    "odd-heads": dict(heads=1),
    "bias-kv": dict(add_bias_kv=True),
    "zero-attn": dict(add_zero_attn=True),
    "kdim": dict(kdim=5, vdim=E),
    "no-bias": dict(bias=False),
    "float-mask": dict(mask="float"),
    "bool-mask": dict(mask="bool"),
    "fastpath-off": dict(fastpath=False),
    "seq-first": dict(batch_first=False),
    "causal-hint": dict(causal=True),  # a float causal mask with the hint: torch's float-mask rule decides
}


@pytest.mark.parametrize("case", LAYOUT_CASES)
@pytest.mark.parametrize("need_weights", [True, False])
def test_output_layout_as_torch(case, need_weights):
    """torch's module answers a batch-first call from its fused inference path ((N, L, E) contiguous) or from its
    other path (the transpose of an (L, N, E) result): the output's strides, and its values, are torch's in both."""
    opts = dict(LAYOUT_CASES[case])
    train, grad, inputs = opts.pop("train", False), opts.pop("grad", False), opts.pop("inputs", "self")
    heads, mask, fastpath = opts.pop("heads", H), opts.pop("mask", None), opts.pop("fastpath", True)
    causal = opts.pop("causal", False)
    opts.setdefault("batch_first", True)
    ref = _randomise(torch.nn.MultiheadAttention(E, heads, **opts))
    ours = seqfast.nn.MultiheadAttention(E, heads, **opts)
    ours.load_state_dict(ref.state_dict())
    q, k, v = _inputs(torch.float32, batch_first=opts["batch_first"], kdim=opts.get("kdim", E), requires_grad=grad)
    k = {"self": q, "kv": k, "cross": k}[inputs] if "kdim" not in opts else k
    v = {"self": q, "kv": k, "cross": v}[inputs] if "kdim" not in opts else v
    kpm = None
    if mask is not None:
        kpm = torch.zeros(N, S if inputs != "self" else L, dtype=torch.bool)
        kpm[:, -1] = True
        kpm = kpm if mask == "bool" else torch.zeros(kpm.shape).masked_fill(kpm, float("-inf"))
    results = []
    with _fastpath(fastpath):
        for module in (ref, ours):
            module.train(train)
            with torch.set_grad_enabled(grad):
                hint = dict(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(L), is_causal=True)
                results.append(module(q, k, v, key_padding_mask=kpm, need_weights=need_weights,
                                      **(hint if causal else {}))[0])
    expected, got = results
    assert got.stride() == expected.stride(), f"{case}: torch {expected.stride()}, seqfast {got.stride()}"
    if not train:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_weights", [True, False])
def test_gradients_match_torch(dtype, need_weights):
    ref, ours = _pair(dtype, batch_first=False, add_bias_kv=True)
    q, k, v = _inputs(dtype, batch_first=False, requires_grad=True)
    kpm, am = _masks(dtype, "float", attn_dim=2)
    am.requires_grad_(True)
    results = []
    for module in (ours, ref):
        out, w = module(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum()
        if need_weights:
            loss = loss + (w * w).sum()
        params = [p for _, p in sorted(module.named_parameters())]
        results.append(torch.autograd.grad(loss, [q, k, v, am, *params]))
    for g_ours, g_ref in zip(*results):
        _close(g_ours, g_ref, dtype)


def test_dropout_train_vs_eval():
    ref, ours = _pair(torch.float64, dropout=0.5, batch_first=True)
    q, k, v = _inputs(torch.float64)
    ours.eval()
    ref.eval()
    _close(ours(q, k, v)[0], ref(q, k, v)[0], torch.float64)  # eval: no dropout at all
    ours.train()
    torch.manual_seed(3)
    a, _ = ours(q, k, v, need_weights=False)
    torch.manual_seed(3)
    b, _ = ours(q, k, v, need_weights=False)
    assert torch.equal(a, b)  # reproducible under torch.manual_seed
    c, _ = ours(q, k, v, need_weights=False)
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all() and torch.isfinite(c).all()
    # Dropout on the weights is unbiased: the mean over many draws is the eval output.
    copies = 2000
    qs, ks, vs = (t[:1].expand(copies, -1, -1) for t in (q, k, v))
    out, w = ours(qs, ks, vs)
    mean, se = out.mean(0), out.std(0) / copies**0.5
    expected = ours.eval()(q[:1], k[:1], v[:1], need_weights=False)[0][0]
    assert (out.std(0) > 1e-3).all()  # dropout really perturbs the output
    assert ((mean - expected).abs() < 5 * se + 1e-12).all()
    # The weights carry the output's own keep-mask, as torch's do: an entry of the head average is 0 when
    # both heads dropped it (p^2 = 0.25), and the average over draws is the clean weight.
    clean = ref.eval()(q[:1], k[:1], v[:1])[1][0]
    assert ((w == 0).double().mean() - 0.25).abs() < 0.05
    assert torch.allclose(w.mean(0), clean, atol=0.05)


@pytest.mark.parametrize("batch_first", [False, True])
def test_dropped_weights_reproduce_the_output(batch_first):
    """In training mode, attn_output = out_proj(weights @ V): the weights hold the kernel's very dropout."""
    _, ours = _pair(torch.float64, dropout=0.4, batch_first=batch_first)
    q, k, v = _inputs(torch.float64, batch_first)
    ours.train()
    out, w = ours(q, k, v, average_attn_weights=False)
    assert (w == 0).any() and not torch.allclose(w.sum(-1), torch.ones_like(w[..., 0]))  # really dropped out
    vin = v if batch_first else v.transpose(0, 1)
    wv = ours.in_proj_weight[2 * E:]
    bv = ours.in_proj_bias[2 * E:]
    vh = torch.nn.functional.linear(vin, wv, bv).unflatten(-1, (H, E // H)).transpose(1, 2)  # (N, H, S, hd)
    heads = (w @ vh).transpose(1, 2).flatten(2)  # (N, L, E)
    expected = ours.out_proj(heads)
    _close(out if batch_first else out.transpose(0, 1), expected, torch.float64)


# ---------------------------------------------------------------------------------------- transformer


def _layer_pair(cls_ref, cls_ours, **kwargs):
    torch.manual_seed(11)
    ref = cls_ref(E, H, dim_feedforward=12, dtype=torch.float64, **kwargs)
    torch.manual_seed(11)
    ours = cls_ours(E, H, dim_feedforward=12, dtype=torch.float64, **kwargs)
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name  # same initialisation
    _randomise(ref)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch(batch_first, norm_first, sdpa_calls):
    ref, ours = _layer_pair(torch.nn.TransformerEncoderLayer, seqfast.nn.TransformerEncoderLayer,
                            dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    assert type(ours.self_attn) is seqfast.nn.MultiheadAttention
    x, _, _ = _inputs(torch.float64, batch_first)
    kpm, am = _masks(torch.float64, "bool")
    kpm, am = kpm[:, :L], am[:, :L]  # self-attention: S = L
    _close(ours(x, src_mask=am, src_key_padding_mask=kpm), ref(x, src_mask=am, src_key_padding_mask=kpm),
           torch.float64)
    # eval + no_grad is where torch's layer would take its fused native path: it must not bypass seqfast.
    ref.eval()
    ours.eval()
    calls = len(sdpa_calls)
    with torch.no_grad():
        _close(ours(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm), torch.float64)
    assert len(sdpa_calls) == calls + 1
    if not batch_first:  # unbatched (S, E) input
        _close(ours(x[:, 0], src_mask=am), ref(x[:, 0], src_mask=am), torch.float64)


AUTOCAST_LAYER_CASES = {  # torch's layer is fused (its output in the autocast dtype) only in the first two
    "eval-bf16": {}, "eval-fp16": dict(dtype=torch.float16), "train": dict(train=True), "grad": dict(grad=True),
    "seq-first": dict(batch_first=False), "odd-heads": dict(nhead=1), "gelu-fn": dict(activation=torch.tanh),
    "hook": dict(hook=True), "float64": dict(x_dtype=torch.float64), "unbatched": dict(unbatched=True),
    "fastpath-off": dict(fastpath=False),
}


@pytest.mark.parametrize("case", AUTOCAST_LAYER_CASES)
def test_encoder_layer_dtype_under_cpu_autocast_as_torch(case):
    """Under CPU autocast torch's encoder layer in eval mode takes its fused op (its autocast check is CUDA's) and
    returns the autocast dtype; its plain path ends in a float32 LayerNorm. seqfast's layer always runs the plain
    path on its own attention, and returns torch's dtype in both."""
    opts = dict(AUTOCAST_LAYER_CASES[case])
    dtype, train, grad = opts.pop("dtype", torch.bfloat16), opts.pop("train", False), opts.pop("grad", False)
    hook, x_dtype, fastpath = opts.pop("hook", False), opts.pop("x_dtype", torch.float32), opts.pop("fastpath", True)
    unbatched = opts.pop("unbatched", False)
    opts = dict(nhead=H, batch_first=True, dropout=0.0) | opts
    ref = _randomise(torch.nn.TransformerEncoderLayer(E, dim_feedforward=16, dtype=x_dtype, **opts))
    ours = seqfast.nn.TransformerEncoderLayer(E, dim_feedforward=16, dtype=x_dtype, **opts)
    ours.load_state_dict(ref.state_dict())
    x, _, _ = _inputs(x_dtype, opts["batch_first"], batched=not unbatched, requires_grad=grad)
    outs = []
    with _fastpath(fastpath):
        for layer in (ref, ours):
            layer.train(train)
            if hook:
                layer.register_forward_hook(lambda *args: None)
            with torch.autocast("cpu", dtype=dtype), torch.set_grad_enabled(grad):
                outs.append(layer(x))
    expected, got = outs
    assert got.dtype == expected.dtype, f"{case}: torch {expected.dtype}, seqfast {got.dtype}"
    torch.testing.assert_close(got.float(), expected.float(), atol=0.1, rtol=0.1)


@pytest.mark.parametrize("name", ["TransformerEncoderLayer", "TransformerDecoderLayer", "MultiheadAttention"])
def test_constructor_signatures_match_torch(name):
    def params(cls):
        return [(p.name, p.default, p.kind) for p in inspect.signature(cls.__init__).parameters.values()]

    assert params(getattr(seqfast.nn, name)) == params(getattr(torch.nn, name))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_stack_eval_with_padding(batch_first, norm_first, sdpa_calls):
    # torch.nn.TransformerEncoder turns padded eval batches into nested tensors (batch_first, post-norm).
    ref_layer, layer = _layer_pair(torch.nn.TransformerEncoderLayer, seqfast.nn.TransformerEncoderLayer,
                                   batch_first=batch_first, norm_first=norm_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor warnings about norm_first / batch_first
        ref = torch.nn.TransformerEncoder(ref_layer, 2).eval()
        ours = torch.nn.TransformerEncoder(layer, 2).eval()
    ours.load_state_dict(ref.state_dict())
    x, _, _ = _inputs(torch.float64, batch_first)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, 3:] = True
    kpm[2, 4:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's nested-tensor prototype warning
        _close(ours(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm), torch.float64)
        _close(ours(x, mask=causal), ref(x, mask=causal), torch.float64)
    assert len(sdpa_calls) == 4
    assert sdpa_calls[-1]["is_causal"] is True  # the encoder detects the causal mask; seqfast gets the hint


def test_encoder_of_seqfast_layers_trains():
    model = torch.nn.TransformerEncoder(seqfast.nn.TransformerEncoderLayer(E, H, 16, dropout=0.1), 2,
                                        enable_nested_tensor=False)
    x = torch.randn(L, N, E)
    model(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_matches_torch(batch_first, norm_first, sdpa_calls):
    ref_layer, layer = _layer_pair(torch.nn.TransformerDecoderLayer, seqfast.nn.TransformerDecoderLayer,
                                   dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    assert type(layer.multihead_attn) is seqfast.nn.MultiheadAttention
    ref = torch.nn.TransformerDecoder(ref_layer, 2)
    ours = torch.nn.TransformerDecoder(layer, 2)
    ours.load_state_dict(ref.state_dict())
    tgt, memory, _ = _inputs(torch.float64, batch_first)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    mem_kpm, _ = _masks(torch.float64, "bool")
    kw = dict(tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=mem_kpm)
    _close(ours(tgt, memory, **kw), ref(tgt, memory, **kw), torch.float64)
    assert len(sdpa_calls) == 4


# ------------------------------------------------------------------------------------ replace/restore


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = torch.nn.Transformer(E, H, 1, 1, 12, dropout=0.0, batch_first=True, dtype=torch.float64)
        self.pool = torch.nn.MultiheadAttention(E, H, dtype=torch.float64)

    def forward(self, src, tgt):
        y = self.transformer(src, tgt)
        return self.pool(y.transpose(0, 1), y.transpose(0, 1), y.transpose(0, 1))[0]


def test_replace_and_restore_attention(sdpa_calls):
    model = _randomise(_Model()).eval()
    src, tgt = torch.randn(N, S, E, dtype=torch.float64), torch.randn(N, L, E, dtype=torch.float64)
    with torch.no_grad():
        expected = model(src, tgt)
    params = {name: p for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    assert seqfast.nn.replace_attention(model) is model
    mhas = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(mhas) == 4 and all(type(m) is seqfast.nn.MultiheadAttention for m in mhas)
    assert type(model.transformer.encoder.layers[0]) is seqfast.nn.TransformerEncoderLayer
    assert all(p is params[name] for name, p in model.named_parameters())  # same tensors, in place
    with torch.no_grad():
        _close(model(src, tgt), expected, torch.float64)
    assert len(sdpa_calls) == 4

    assert seqfast.nn.restore_attention(model) is model
    assert all(type(m) is torch.nn.MultiheadAttention for m in mhas)
    assert type(model.transformer.encoder.layers[0]) is torch.nn.TransformerEncoderLayer
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        _close(model(src, tgt), expected, torch.float64)
    assert len(sdpa_calls) == 4  # torch again


def test_replace_leaves_subclasses_alone():
    class Custom(torch.nn.MultiheadAttention):
        pass

    model = torch.nn.Sequential(Custom(E, H))
    seqfast.nn.replace_attention(model)
    assert type(model[0]) is Custom


# ------------------------------------------------------------------------------------------- errors


def test_errors():
    _, ours = _pair(torch.float64)
    q, k, v = _inputs(torch.float64, batch_first=False)
    with pytest.raises(ValueError, match="2D attn_mask"):
        ours(q, k, v, attn_mask=torch.zeros(L, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="3D attn_mask"):
        ours(q, k, v, attn_mask=torch.zeros(H, L, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(q, k, v, key_padding_mask=torch.zeros(N, L, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or floating"):
        ours(q, k, v, key_padding_mask=torch.zeros(N, S, dtype=torch.int64))
    with pytest.raises(ValueError, match="all be 3-D"):
        ours(q, k[0], v)
    with pytest.raises(ValueError, match="source length"):
        ours(q, k, v[1:])


@pytest.mark.parametrize("how", ["seqfast class", "patched"])
def test_multihead_attention_takes_nested_input_as_torch(how):
    """torch's MultiheadAttention takes (strided) nested inputs on its fused inference path and refuses them
    elsewhere; seqfast's module, built as its class or converted by seqfast.patch, runs torch's forward for them:
    the same bits where torch serves them, torch's own error where it does not."""
    torch.manual_seed(0)
    x = torch.nested.nested_tensor([torch.randn(5, 16), torch.randn(7, 16)])
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    if how == "patched":
        ours = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
        ours.load_state_dict(ref.state_dict())
        seqfast.patch(ours)
    else:
        ours = seqfast.nn.MultiheadAttention(16, 4, batch_first=True).eval()
        ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, seqfast.nn.MultiheadAttention)
    with torch.no_grad():
        expected, got = ref(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0]
    assert got.is_nested and torch.equal(got.to_padded_tensor(0.0), expected.to_padded_tensor(0.0))
    for module in (ref, ours):  # with a gradient to come: off torch's fast path, which alone takes nested input
        with pytest.raises(AssertionError, match="NestedTensor outside of its fast path"):
            module(x, x, x, need_weights=False)
