"""The Triton attention kernels (kernels/attention.py) through Triton's interpreter, against the float64 reference.

Shapes stay tiny (the interpreter is slow) but cover every path: lengths 1 / 17 / 70 / 129 around the
tile edges, head dims 16 / 64 / 80 / 128 with q/k and v widths differing, Lq != Lk, both causal
alignments, bool / float masks broadcast over batch and heads, fully masked rows, GQA / MQA,
dropout, varlen packing, non-contiguous inputs and bitwise-deterministic gradients.

The interpreter is switched on by tests/conftest.py on machines without a GPU (never forced where one is).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import seqfast
from seqfast import _backend, _triton
from seqfast.reference import attention as reference

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("on_kernel_device")]
OPS = torch.ops.seqfast


def op_forward(*args):
    """torch.ops.seqfast.attention_forward under the backend in force (the public functions do the same)."""
    return _backend.dispatch(None, OPS.attention_forward.default, *args)


@pytest.fixture
def kernels(on_kernel_device):
    return _triton.kernels("attention", torch.zeros(1, device=on_kernel_device))


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0 / 0 -> 0), computed in float64."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    return err / scale if scale > 0 else err


def sdpa_with_grads(backend: str, tensors: list[torch.Tensor], dtype: torch.dtype, grad_out=None, **kwargs):
    """Run the public sdpa under ``backend`` on copies of ``tensors`` cast to ``dtype``; (out, grads)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    mask = kwargs.pop("attn_mask", None)
    mask_leaf = None
    if mask is not None and mask.is_floating_point():
        mask_leaf = mask.detach().to(dtype).requires_grad_()
        mask = mask_leaf
    with seqfast.backend(backend):
        out = seqfast.scaled_dot_product_attention(*leaves, attn_mask=mask, **kwargs)
        go = torch.ones_like(out) if grad_out is None else grad_out.to(dtype)
        grads = torch.autograd.grad(out, leaves + ([mask_leaf] if mask_leaf is not None else []), go)
    return out.detach(), grads


def check_against_reference(tensors, tol=1e-4, grad_out=None, **kwargs):
    ref_out, ref_grads = sdpa_with_grads("reference", tensors, torch.float64, grad_out, **dict(kwargs))
    out, grads = sdpa_with_grads("triton", tensors, torch.float32, grad_out, **dict(kwargs))
    assert out.dtype == torch.float32
    assert rel_err(out, ref_out) <= tol, rel_err(out, ref_out)
    for name, g, rg in zip(("query", "key", "value", "mask"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, rg) <= tol, (name, rel_err(g, rg))
    return out, grads


def qkv(B, Hq, Hk, Lq, Lk, D, Dv):
    return [torch.randn(B, Hq, Lq, D), torch.randn(B, Hk, Lk, D), torch.randn(B, Hk, Lk, Dv)]


@pytest.mark.parametrize(
    "B, H, Lq, Lk, D, Dv",
    [
        (1, 2, 1, 17, 16, 16),  # decoding: one query row
        (2, 1, 17, 17, 64, 64),
        (1, 2, 70, 129, 80, 80),  # D not a power of two, Lk past two key tiles
        (1, 1, 129, 70, 128, 64),  # q/k and v widths differ
        (1, 1, 20, 33, 224, 208),  # 256-wide bucket: backward contracts S and dP in 64-column chunks
        (1, 2, 19, 21, 48, 200),  # only dP chunked (q/k stay resident)
    ],
)
def test_matches_reference_float32(B, H, Lq, Lk, D, Dv):
    check_against_reference(qkv(B, H, H, Lq, Lk, D, Dv), grad_out=torch.randn(B, H, Lq, Dv))


def test_lse_and_output_layout(kernels):
    q, k, v = qkv(2, 2, 2, 17, 70, 16, 16)
    out, lse = kernels.attention_forward(q, k, v, None, 0.0, 0, 0.25, 0)
    ref_out, ref_lse = reference.attention(q, k, v, scale=0.25)
    assert out.shape == (2, 2, 17, 16) and out.is_contiguous() and out.dtype == torch.float32
    assert lse.shape == (2, 2, 17) and lse.dtype == torch.float32
    assert rel_err(lse, ref_lse) <= 1e-5 and rel_err(out, ref_out) <= 1e-4


@pytest.mark.parametrize("layout", ["blhd", "lbhd", "packed"])
@pytest.mark.parametrize("Lq", [17, 3])  # 3: the split-KV decode forward, forced below
def test_output_takes_the_query_layout(kernels, monkeypatch, layout, Lq):
    """The op's contract (seqfast/ops/attention.py): out in the query's layout (torch.empty_like(query)) when
    Dv == D, else contiguous, from the Triton forward, its split-KV decode forward and the reference alike, as the
    fake says; the kernels write the rows by strides, so the values are the reference's."""
    monkeypatch.setattr(kernels, "_DECODE_MIN_LK", 64)
    monkeypatch.setitem(kernels._FORCED, "decode", {"BLOCK_N": 16, "SPLITS": 2})
    def strides(t):  # strides of the dims that have them (a size-1 dim's stride addresses nothing)
        return tuple(st for st, n in zip(t.stride(), t.shape) if n > 1)

    launches = []
    decode = kernels._decode_forward
    monkeypatch.setattr(kernels, "_decode_forward", lambda *a: launches.append(1) or decode(*a))
    B, H, Lk, D = 2, 3, 70, 16
    q = {"blhd": torch.randn(B, Lq, H, D).transpose(1, 2), "lbhd": torch.randn(Lq, B, H, D).permute(1, 2, 0, 3),
         "packed": torch.randn(B, Lq, 3, H, D)[:, :, 0].transpose(1, 2)}[layout]
    k = torch.randn(B, H, Lk, D)
    for v in (torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, 8)):
        expected = strides(torch.empty_like(q) if v.shape[-1] == D else torch.empty(B, H, Lq, 8))
        ref_out, _ = reference.attention_forward(q.double(), k.double(), v.double(), None, 0.0, 0, 0.25, 0)
        launches.clear()
        out, _ = kernels.attention_forward(q, k, v, None, 0.0, 0, 0.25, 0)
        assert bool(launches) == (Lq <= kernels._DECODE_MAX_LQ)
        assert strides(out) == expected and rel_err(out, ref_out) <= 1e-4, (out.stride(), expected)
        assert strides(reference.attention_forward(q, k, v, None, 0.0, 0, 0.25, 0)[0]) == expected
        with torch._subclasses.FakeTensorMode() as mode:
            fake = OPS.attention_forward(*(mode.from_tensor(t) for t in (q, k, v)), None, 0.0, 0, 0.25, torch.tensor(0))
        assert strides(fake[0]) == expected


def test_non_contiguous_inputs():
    # (B, L, H, D) storage seen as (B, H, L, D): strides differ from the contiguous layout.
    q = torch.randn(1, 70, 2, 64).transpose(1, 2)
    k = torch.randn(1, 17, 2, 64).transpose(1, 2)
    v = torch.randn(1, 17, 2, 80).transpose(1, 2)
    assert not q.is_contiguous()
    check_against_reference([q, k, v])


def test_causal_top_left():
    check_against_reference(qkv(1, 2, 2, 70, 129, 64, 64), is_causal=True, grad_out=torch.randn(1, 2, 70, 64))


@pytest.mark.parametrize("Lq, Lk", [(17, 70), (70, 17)])
def test_causal_bottom_right_through_the_op(Lq, Lk):
    """causal=2: query i sees keys j <= i + Lk - Lq; with Lq > Lk the first rows see nothing."""
    q, k, v = qkv(1, 2, 2, Lq, Lk, 16, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with seqfast.backend("triton"):
        out, lse = op_forward(*leaves, None, 0.0, 2, 0.25, torch.tensor(0))
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.attention(*ref_leaves, causal=2, scale=0.25)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, torch.ones_like(ref_out))
    assert rel_err(out, ref_out) <= 1e-4
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert rel_err(lse[finite], ref_lse[finite]) <= 1e-5
    if Lq > Lk:
        assert torch.isinf(lse[..., : Lq - Lk]).all() and (out[..., : Lq - Lk, :] == 0).all()
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and rel_err(g, rg) <= 1e-4


def test_bool_mask_broadcast_over_batch_and_heads():
    q, k, v = qkv(2, 2, 2, 17, 70, 16, 16)
    mask = torch.rand(1, 1, 17, 70) > 0.4
    check_against_reference([q, k, v], attn_mask=mask)


def test_float_mask_gradient_broadcast_over_batch():
    q, k, v = qkv(2, 2, 2, 70, 17, 16, 16)
    mask = torch.randn(1, 2, 70, 17)
    out, grads = check_against_reference([q, k, v], attn_mask=mask, grad_out=torch.randn(2, 2, 70, 16))
    assert grads[3].shape == mask.shape and grads[3].abs().max() > 0


def test_fully_masked_rows_give_zero_output_and_finite_grads():
    q, k, v = qkv(1, 2, 2, 17, 17, 16, 16)
    bool_mask = torch.rand(1, 2, 17, 17) > 0.5
    bool_mask[:, :, 3] = False  # rows that see nothing
    out, grads = check_against_reference([q, k, v], attn_mask=bool_mask)
    assert (out[:, :, 3] == 0).all() and (grads[0][:, :, 3] == 0).all()
    float_mask = torch.randn(1, 1, 17, 17)
    float_mask[..., 5, :] = float("-inf")
    out, grads = check_against_reference([q, k, v], attn_mask=float_mask)
    assert (out[:, :, 5] == 0).all() and (grads[3][..., 5, :] == 0).all()


@pytest.mark.parametrize("Hq, Hk", [(4, 2), (4, 1)])
def test_grouped_and_multi_query(Hq, Hk):
    check_against_reference(qkv(1, Hq, Hk, 17, 70, 64, 64), enable_gqa=True, is_causal=True)


def test_custom_scale():
    check_against_reference(qkv(1, 2, 2, 17, 17, 80, 80), scale=0.7)


def test_float64_refused_clearly():
    q, k, v = (t.double() for t in qkv(1, 1, 1, 4, 4, 16, 16))
    with pytest.raises(TypeError, match="float64"), seqfast.backend("triton"):
        seqfast.scaled_dot_product_attention(q, k, v)


# ------------------------------------------------------------------------------------------- float16


@pytest.mark.parametrize("mode", ["deterministic", "atomic"])
def test_float16_within_twice_torch_error(monkeypatch, mode):
    monkeypatch.setenv("SEQFAST_ATTENTION_BWD", mode)  # atomic: S and dP in 32-column chunks, dQ in fp32 atomics
    q, k, v = qkv(1, 2, 2, 70, 70, 64, 64)
    mask = torch.randn(1, 1, 70, 70)
    grad_out = torch.randn(1, 2, 70, 64)
    ref_out, ref_grads = sdpa_with_grads("reference", [q, k, v], torch.float64, grad_out, attn_mask=mask)
    out, grads = sdpa_with_grads("triton", [q, k, v], torch.float16, grad_out, attn_mask=mask)
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)

    leaves = [t.half().requires_grad_() for t in (q, k, v)]
    half_mask = mask.half().requires_grad_()
    torch_out = F.scaled_dot_product_attention(*leaves, attn_mask=half_mask)
    torch_grads = torch.autograd.grad(torch_out, leaves + [half_mask], grad_out.half())

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    assert err(out, ref_out) <= 2 * err(torch_out, ref_out), (err(out, ref_out), err(torch_out, ref_out))
    for name, g, tg, rg in zip(("query", "key", "value", "mask"), grads, torch_grads, ref_grads):
        assert err(g, rg) <= 2 * err(tg, rg), (name, err(g, rg), err(tg, rg))


# ------------------------------------------------------------------------------------------- dropout


def test_dropout_same_seed_same_result():
    tensors = qkv(1, 2, 2, 17, 70, 16, 16)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(sdpa_with_grads("triton", tensors, torch.float32, dropout_p=0.3))
    (out_a, grads_a), (out_b, grads_b) = runs
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    torch.manual_seed(124)
    out_c, _ = sdpa_with_grads("triton", tensors, torch.float32, dropout_p=0.3)
    assert not torch.equal(out_a, out_c)
    no_drop, _ = sdpa_with_grads("triton", tensors, torch.float32)
    assert not torch.equal(out_a, no_drop)


def test_dropout_keep_rate(kernels):
    p = 0.3
    keep = kernels.dropout_keep_mask(7, 2, 2, 64, 129, p, "cpu")
    assert keep.dtype == torch.bool and keep.shape == (2, 2, 64, 129)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), rate
    # Neighbouring elements and neighbouring seeds are not correlated in an obvious way.
    other = kernels.dropout_keep_mask(8, 2, 2, 64, 129, p, "cpu")
    assert 0.5 < (keep == other).float().mean().item() < 0.65  # ~ p^2 + (1-p)^2 = 0.58
    assert torch.equal(keep, kernels.dropout_keep_mask(7, 2, 2, 64, 129, p, "cpu"))


def test_dropout_matches_reference_given_keep_mask(kernels):
    B, H, Lq, Lk, D, p, seed, scale = 1, 2, 17, 70, 16, 0.25, 99, 0.3
    q, k, v = qkv(B, H, H, Lq, Lk, D, D)
    mask = torch.randn(1, 1, Lq, Lk)
    grad_out = torch.randn(B, H, Lq, D)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mask_leaf = mask.clone().requires_grad_()
    with seqfast.backend("triton"):
        out, _ = op_forward(*leaves, mask_leaf.expand(B, H, Lq, Lk), p, 0, scale, torch.tensor(seed))
        grads = torch.autograd.grad(out, leaves + [mask_leaf], grad_out)
    keep = kernels.dropout_keep_mask(seed, B, H, Lq, Lk, p, "cpu")
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, mask)]
    ref_out, _ = reference.attention(*ref_leaves[:3], ref_leaves[3], scale=scale, dropout_p=p, dropout_keep_mask=keep)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out.double())
    assert rel_err(out, ref_out) <= 1e-4
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= 1e-4


# ------------------------------------------------------------------------------------------- varlen


def varlen_with_grads(backend, tensors, dtype, cu_q, cu_k, causal, grad_out):
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    max_q = int((cu_q[1:] - cu_q[:-1]).max())
    max_k = int((cu_k[1:] - cu_k[:-1]).max())
    with seqfast.backend(backend):
        out = seqfast.varlen_attention(*leaves, cu_q, cu_k, max_q, max_k, causal=causal)
        grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    return out.detach(), grads


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_reference(causal):
    cu_q = torch.tensor([0, 1, 18, 18, 88], dtype=torch.int32)  # lengths 1, 17, 0, 70
    cu_k = torch.tensor([0, 17, 34, 36, 165], dtype=torch.int32)  # lengths 17, 17, 2, 129
    Hq, Hk, D = 2, 1, 64
    tensors = [torch.randn(88, Hq, D), torch.randn(165, Hk, D), torch.randn(165, Hk, D)]
    grad_out = torch.randn(88, Hq, D)
    ref_out, ref_grads = varlen_with_grads("reference", tensors, torch.float64, cu_q, cu_k, causal, grad_out)
    out, grads = varlen_with_grads("triton", tensors, torch.float32, cu_q, cu_k, causal, grad_out)
    assert rel_err(out, ref_out) <= 1e-4
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= 1e-4


# ------------------------------------------------------------------------------------------- determinism


def test_gradients_bitwise_deterministic():
    tensors = qkv(1, 4, 2, 70, 17, 16, 16)
    mask = torch.randn(1, 4, 70, 17)
    grad_out = torch.randn(1, 4, 70, 16)
    _, first = sdpa_with_grads("triton", tensors, torch.float32, grad_out, attn_mask=mask, enable_gqa=True)
    _, second = sdpa_with_grads("triton", tensors, torch.float32, grad_out, attn_mask=mask, enable_gqa=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------------- atomic backward


@pytest.fixture
def atomic_bwd(monkeypatch):
    monkeypatch.setenv("SEQFAST_ATTENTION_BWD", "atomic")


@pytest.mark.usefixtures("atomic_bwd")
@pytest.mark.parametrize(
    "B, Hq, Hk, Lq, Lk, D, Dv, kwargs",
    [
        (1, 2, 2, 70, 129, 80, 80, {}),  # several query and key tiles, D not a power of two
        (1, 4, 2, 129, 70, 128, 64, {"is_causal": True, "enable_gqa": True}),  # GQA heads add into one dQ tile
    ],
)
def test_atomic_backward_matches_reference(B, Hq, Hk, Lq, Lk, D, Dv, kwargs):
    check_against_reference(qkv(B, Hq, Hk, Lq, Lk, D, Dv), grad_out=torch.randn(B, Hq, Lq, Dv), **kwargs)


def test_atomic_backward_falls_back_past_head_dim_128(monkeypatch):
    """The 256-wide bucket runs the deterministic backward under SEQFAST_ATTENTION_BWD=atomic: same bits."""
    tensors, grad_out = qkv(1, 1, 1, 20, 33, 224, 208), torch.randn(1, 1, 20, 208)
    monkeypatch.setenv("SEQFAST_ATTENTION_BWD", "atomic")
    _, atomic = sdpa_with_grads("triton", tensors, torch.float32, grad_out)
    monkeypatch.setenv("SEQFAST_ATTENTION_BWD", "deterministic")
    _, deterministic = sdpa_with_grads("triton", tensors, torch.float32, grad_out)
    assert all(torch.equal(a, d) for a, d in zip(atomic, deterministic))


@pytest.mark.usefixtures("atomic_bwd")
def test_atomic_backward_float_mask_gradient_and_empty_rows():
    q, k, v = qkv(2, 2, 2, 70, 17, 16, 16)
    mask = torch.randn(1, 2, 70, 17)
    mask[..., 5, :] = float("-inf")
    out, grads = check_against_reference([q, k, v], attn_mask=mask, grad_out=torch.randn(2, 2, 70, 16))
    assert (grads[0][:, :, 5] == 0).all() and grads[3].abs().max() > 0


@pytest.mark.usefixtures("atomic_bwd")
@pytest.mark.parametrize("Lq, Lk", [(17, 70), (70, 17)])
def test_atomic_backward_causal_bottom_right(Lq, Lk):
    q, k, v = qkv(1, 2, 2, Lq, Lk, 16, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with seqfast.backend("triton"):
        out, _ = op_forward(*leaves, None, 0.0, 2, 0.25, torch.tensor(0))
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference.attention(*ref_leaves, causal=2, scale=0.25)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, torch.ones_like(ref_out))
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and rel_err(g, rg) <= 1e-4


@pytest.mark.usefixtures("atomic_bwd")
def test_atomic_backward_dropout_matches_the_deterministic_one(monkeypatch):
    tensors = qkv(1, 2, 2, 17, 70, 16, 16)
    torch.manual_seed(5)
    _, atomic = sdpa_with_grads("triton", tensors, torch.float32, dropout_p=0.3)
    monkeypatch.setenv("SEQFAST_ATTENTION_BWD", "deterministic")
    torch.manual_seed(5)
    _, deterministic = sdpa_with_grads("triton", tensors, torch.float32, dropout_p=0.3)
    for a, d in zip(atomic, deterministic):
        assert rel_err(a, d) <= 1e-5


@pytest.mark.usefixtures("atomic_bwd")
@pytest.mark.parametrize("causal", [False, True])
def test_atomic_backward_varlen(causal):
    cu_q = torch.tensor([0, 1, 18, 18, 88], dtype=torch.int32)
    cu_k = torch.tensor([0, 17, 34, 36, 165], dtype=torch.int32)
    tensors = [torch.randn(88, 2, 64), torch.randn(165, 1, 64), torch.randn(165, 1, 64)]
    grad_out = torch.randn(88, 2, 64)
    _, ref_grads = varlen_with_grads("reference", tensors, torch.float64, cu_q, cu_k, causal, grad_out)
    _, grads = varlen_with_grads("triton", tensors, torch.float32, cu_q, cu_k, causal, grad_out)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= 1e-4


def test_atomic_backward_refused_under_deterministic_algorithms(atomic_bwd):
    tensors = qkv(1, 2, 2, 17, 17, 16, 16)
    old, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="SEQFAST_ATTENTION_BWD=atomic.*not deterministic"):
            sdpa_with_grads("triton", tensors, torch.float32)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="running the deterministic backward"):
            _, first = sdpa_with_grads("triton", tensors, torch.float32)
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)
    _, second = sdpa_with_grads("triton", tensors, torch.float32, **{})
    for a, b in zip(first, second):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("value", ["Atomic ", "deterministic", ""])
def test_backward_mode_env_accepts(kernels, monkeypatch, value):
    monkeypatch.setenv("SEQFAST_ATTENTION_BWD", value)
    assert kernels._backward_mode() == (value.strip().lower() or "deterministic")


def test_backward_mode_env_rejects_unknown(monkeypatch):
    monkeypatch.setenv("SEQFAST_ATTENTION_BWD", "fast")
    with pytest.raises(ValueError, match="SEQFAST_ATTENTION_BWD must be one of deterministic, atomic, got 'fast'"):
        sdpa_with_grads("triton", qkv(1, 1, 1, 4, 4, 16, 16), torch.float32)


# ------------------------------------------------------------------------------------------- configs


def test_forced_config_is_used_and_restored(kernels):
    base = kernels._config("dq", 64, torch.float16, 4096, 4096, arch=90)
    cfg = {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
    with kernels.forced_config("dq", cfg):
        assert kernels._config("dq", 64, torch.float16, 4096, 4096, arch=90)[:4] == (64, 16, 4, 2)
        with kernels.forced_config("dq", dict(cfg, BLOCK_M=128)):
            assert kernels._config("dq", 64, torch.float16, 4096, 4096)[:4] == (128, 16, 4, 2)
            assert kernels._config("dq", 64, torch.float16, 20, 4096)[0] == 32  # still clipped to the sequence
        assert kernels._config("dq", 64, torch.float16, 4096, 4096)[:4] == (64, 16, 4, 2)
        # The forced tiles run and give the same gradients (interpreter: any tile size is exact enough).
        check_against_reference(qkv(1, 1, 1, 70, 40, 64, 64))
    assert kernels._config("dq", 64, torch.float16, 4096, 4096, arch=90) == base
    with pytest.raises(ValueError, match="unknown attention kernel 'bwd'"), kernels.forced_config("bwd", cfg):
        pass


def test_config_space_names_every_launch(kernels):
    assert set(kernels.CONFIG_SPACE) == {"fwd", "dkdv", "dq", "dkdv_atomic", "decode"}
    for name, configs in kernels.CONFIG_SPACE.items():
        assert 0 < len(configs) <= 8
        for cfg in configs:
            if name == "decode":  # the split-KV launcher reads its forced config itself
                with kernels.forced_config(name, cfg):
                    assert kernels._FORCED["decode"] == cfg
                assert "decode" not in kernels._FORCED
                continue
            with kernels.forced_config(name, cfg):
                launch = kernels._config(name, 128, torch.bfloat16, 1 << 20, 1 << 20, arch=90)
            assert (launch.block_m, launch.block_n, launch.warps, launch.stages) == (
                cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 128])
def test_sm90_backward_tiles_are_wgmma_sized(kernels, dtype, width):
    """Every Hopper fp16 / bf16 launch at head dims <= 128: the M of each tensor-core product in 64-row slabs
    per warpgroup (key tile for dK/dV, query tile for fwd / dQ), whole warpgroups; the sm_80 table unchanged."""
    for causal, masked, mask_grad, dropout in [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 1, 1, 0),
                                               (0, 0, 0, 1)]:
        flags = dict(masked=bool(masked), dropout=bool(dropout), causal=bool(causal), mask_grad=bool(mask_grad))
        for kernel in ("fwd", "dkdv", "dq", "dkdv_atomic"):
            for varlen in (False, True):
                launch = kernels._config(kernel, width, dtype, 1 << 20, 1 << 20, arch=90, varlen=varlen, **flags)
                rows = launch.block_n if kernel.startswith("dkdv") else launch.block_m
                assert launch.warps % 4 == 0 and rows % 64 == 0 and rows // 64 <= launch.warps // 4, \
                    (kernel, flags, varlen)
        assert kernels._config("dkdv", width, dtype, 1 << 20, 1 << 20, arch=80, **flags)[:4] == \
            kernels._config("dkdv", width, dtype, 1 << 20, 1 << 20, **flags)[:4]


def test_configs_that_spilled_under_triton_36(kernels):
    """Launches that the kernel report found spilling under triton 3.6 (the GPU machine's) take their own
    entries: the packed forward at width 128 on sm_90 (m128n64: 112 B), sm_80's 16-bit dropout dK/dV at width
    128 (resident K / V: 8 B), sm_80's 16-bit forward at width 256 (64-row query tiles: 20-64 B) and the 16-bit
    dK/dV at width 256 with dropout (sm_80) or packed sequences."""
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            varlen = kernels._config("fwd", 128, dtype, 1 << 20, 1 << 20, causal=causal, arch=90, varlen=True)
            assert varlen[:4] == (128, 32, 8, 3)
            assert kernels._config("fwd", 128, dtype, 1 << 20, 1 << 20, causal=causal, arch=90)[:4] == (128, 64, 8, 3)
        assert kernels._config("dkdv", 128, dtype, 1 << 20, 1 << 20, dropout=True, arch=80).chunk == 64
        assert kernels._config("dkdv", 128, dtype, 1 << 20, 1 << 20, arch=80).chunk == 128
        for arch, rows in ((80, 32), (90, 64)):
            assert kernels._config("fwd", 256, dtype, 1 << 20, 1 << 20, causal=True, arch=arch)[:2] == (rows, 16)
            # 16-bit dK/dV at width 256: 16-row key tiles with dropout (32 spilled 56 B on sm_80) or packed
            # sequences (64 B on sm_90), 32 otherwise.
            for flags, keys in ((dict(dropout=True), 16 if arch == 80 else 32), (dict(varlen=True, causal=True), 16),
                                ({}, 32)):
                assert kernels._config("dkdv", 256, dtype, 1 << 20, 1 << 20, arch=arch, **flags).block_n == keys


def test_fp32_configs_that_spilled_under_triton_36(kernels):
    """tf32 launches the kernel report found spilling under triton 3.6 (8-116 B) take their own configs: a
    255-register cap where ptxas stopped at 128 (dK/dV with a float mask's gradient at width 64, the masked forward
    and the causal dQ at 128), 32-column chunks in sm_80's atomic dK/dV at 64, one stage for sm_80's packed forward
    at 256, 16-row key tiles in sm_80's dK/dV at 256 and 128-column chunks for sm_90's dropout dK/dV there;
    IEEE fp32 keeps its quartered tiles."""
    def cfg(kernel, width, arch, **flags):
        return kernels._config(kernel, width, torch.float32, 1 << 20, 1 << 20, arch=arch, **flags)

    with kernels._pinned_precision("tf32"):
        for arch in (80, 90):
            assert cfg("dkdv", 64, arch, masked=True, mask_grad=True).maxnreg == 255
            assert cfg("dkdv", 64, arch, masked=True).maxnreg is None  # no gradient: below 128 on its own
            assert cfg("fwd", 128, arch, masked=True).maxnreg == 255
            assert cfg("dq", 128, arch, causal=True, varlen=True).maxnreg == 255
            assert cfg("dq", 128, arch, causal=True, masked=True).maxnreg is None
        assert cfg("dkdv_atomic", 64, 80, causal=True).chunk == 32 and cfg("dkdv_atomic", 64, 90).chunk == 64
        assert cfg("fwd", 256, 80, causal=True, varlen=True).stages == 1
        assert cfg("fwd", 256, 80, causal=True).stages == cfg("fwd", 256, 90, causal=True, varlen=True).stages == 2
        for flags in ({}, dict(causal=True), dict(dropout=True), dict(causal=True, varlen=True)):
            assert cfg("dkdv", 256, 80, **flags)[:2] == (16, 16) and cfg("dkdv", 256, 90, **flags)[:2] == (16, 32)
        assert cfg("dkdv", 256, 90, dropout=True).chunk == 128 and cfg("dkdv", 256, 90).chunk == 256
    with kernels._pinned_precision("ieee"):
        assert cfg("dkdv", 256, 80).chunk == cfg("dkdv", 256, 90, dropout=True).chunk == 64
        assert cfg("fwd", 128, 80, masked=True).maxnreg is None


@pytest.fixture
def tf32_launches(kernels, monkeypatch):
    """fp32 dots at TF32 (the interpreter computes them in full fp32) and the (kernel, launch) pairs chosen."""
    monkeypatch.setattr(kernels, "_PRECISION_OVERRIDE", "tf32")
    chosen, config = [], kernels._config

    def spy(kernel, *args, **kwargs):
        chosen.append((kernel, config(kernel, *args, **kwargs)))
        return chosen[-1][1]

    monkeypatch.setattr(kernels, "_config", spy)
    return chosen


def _tf32_float_mask_width_64(kernels, monkeypatch):
    mask = torch.randn(1, 2, 40, 70)
    check_against_reference(qkv(1, 2, 2, 40, 70, 64, 64), attn_mask=mask, grad_out=torch.randn(1, 2, 40, 64))
    return [("dkdv", dict(block_m=16, block_n=32, maxnreg=255))]


def _tf32_width_128(kernels, monkeypatch):
    check_against_reference(qkv(1, 1, 1, 70, 40, 128, 128), attn_mask=torch.rand(1, 1, 70, 40) > 0.3)
    check_against_reference(qkv(1, 1, 1, 70, 40, 128, 128), is_causal=True)
    return [("fwd", dict(block_m=16, block_n=16, maxnreg=255)), ("dq", dict(block_m=32, block_n=32, maxnreg=255))]


def _tf32_atomic_width_64(kernels, monkeypatch):
    monkeypatch.setenv("SEQFAST_ATTENTION_BWD", "atomic")
    check_against_reference(qkv(1, 2, 2, 40, 70, 64, 64), is_causal=True, grad_out=torch.randn(1, 2, 40, 64))
    check_against_reference(qkv(1, 2, 2, 40, 70, 64, 64), attn_mask=torch.randn(1, 1, 40, 70))
    return [("dkdv_atomic", dict(block_m=16, block_n=32, chunk=32))]


def _tf32_width_256(kernels, monkeypatch):
    cu = torch.tensor([0, 40, 45, 90], dtype=torch.int32)
    tensors = [torch.randn(90, 1, 256) for _ in range(3)]
    grad_out = torch.randn(90, 1, 256)
    ref_out, ref_grads = varlen_with_grads("reference", tensors, torch.float64, cu, cu, True, grad_out)
    out, grads = varlen_with_grads("triton", tensors, torch.float32, cu, cu, True, grad_out)
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        assert rel_err(got, want) <= 1e-4
    return [("fwd", dict(block_m=32, block_n=16, stages=1)), ("dkdv", dict(block_m=16, block_n=16))]


def _tf32_dropout_width_256_sm90(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "_arch", lambda device: 90)
    B, H, Lq, Lk, p, seed, scale = 1, 1, 33, 40, 0.25, 5, 0.1
    q, k, v = qkv(B, H, H, Lq, Lk, 256, 256)
    grad_out = torch.randn(B, H, Lq, 256)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with seqfast.backend("triton"):
        out, _ = op_forward(*leaves, None, p, 0, scale, torch.tensor(seed))
        grads = torch.autograd.grad(out, leaves, grad_out)
    keep = kernels.dropout_keep_mask(seed, B, H, Lq, Lk, p, q.device)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference.attention(*ref_leaves, scale=scale, dropout_p=p, dropout_keep_mask=keep)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out.double())
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        assert rel_err(got, want) <= 1e-4
    return [("dkdv", dict(block_m=16, block_n=32, chunk=128))]


@pytest.mark.parametrize("case", [_tf32_float_mask_width_64, _tf32_width_128, _tf32_atomic_width_64, _tf32_width_256,
                                  _tf32_dropout_width_256_sm90], ids=lambda f: f.__name__.strip("_"))
def test_fp32_configs_that_spilled_under_triton_36_run(kernels, tf32_launches, monkeypatch, case):
    """Each launch of test_fp32_configs_that_spilled_under_triton_36 runs at its full tile against the float64
    reference (sequences longer than the tiles; sm_90's entry with the arch forced)."""
    expected = case(kernels, monkeypatch)
    for kernel, fields in expected:
        ran = [launch for name, launch in tf32_launches if name == kernel]
        assert any(all(getattr(launch, f) == v for f, v in fields.items()) for launch in ran), (kernel, ran)


def test_mha_dropped_weights_match_the_triton_output():
    """seqfast.nn.MultiheadAttention on the Triton backend: its need_weights path draws the Triton kernel's
    dropout keep-mask, so out_proj(weights @ V) reproduces the fused output."""
    E, H, N, L, S = 8, 2, 2, 5, 7
    mha = seqfast.nn.MultiheadAttention(E, H, dropout=0.4, batch_first=True).train()
    q, k, v = torch.randn(N, L, E), torch.randn(N, S, E), torch.randn(N, S, E)
    with seqfast.backend("triton"):
        out, w = mha(q, k, v, average_attn_weights=False)
    assert (w == 0).any() and not torch.allclose(w.sum(-1), torch.ones_like(w[..., 0]))
    vh = F.linear(v, mha.in_proj_weight[2 * E:], mha.in_proj_bias[2 * E:]).unflatten(-1, (H, E // H)).transpose(1, 2)
    expected = mha.out_proj((w @ vh).transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
