"""bfloat16 attention on CPUs whose AMX tiles torch uses goes to torch's own kernel (seqfast/_amx.py).

The suite runs with the route off (conftest.py); here it is switched on, whatever the machine, and a spy on
torch's attention says which calls took it: bfloat16 calls that torch runs fused, with no gradient to come or
with one and enough work (functional.AMX_TRAINING_MIN_WORK), and no others.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import seqfast
import seqfast.functional as sf
from seqfast import _amx


@pytest.fixture
def route(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return torch._C._nn.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(sf, "_TORCH_AMX_BF16", True)
    monkeypatch.setattr(sf, "_TORCH_SDPA", spy)
    return calls


def _qkv(shape=(2, 3, 37, 16), dtype=torch.bfloat16, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_inference_is_torchs_call(route, causal):
    q, k, v = _qkv()
    mask = torch.randn(37, 37).bfloat16()
    for kwargs in ({"is_causal": causal}, {"attn_mask": mask}, {"is_causal": causal, "scale": 0.3}):
        out = seqfast.scaled_dot_product_attention(q, k, v, **kwargs)
        ref = F.scaled_dot_product_attention(q, k, v, **kwargs)
        assert torch.equal(out, ref) and out.stride() == ref.stride()
    with torch.no_grad():  # inputs that require grad, under no_grad: nothing to come either
        q2, k2, v2 = _qkv(requires_grad=True)
        assert torch.equal(seqfast.scaled_dot_product_attention(q2, k2, v2), F.scaled_dot_product_attention(q2, k2, v2))
    # Grouped heads and a (B, L, H, E) view, as torch runs them fused.
    qg = torch.randn(2, 4, 9, 8).bfloat16()
    kg, vg = torch.randn(2, 2, 9, 8).bfloat16(), torch.randn(2, 2, 9, 8).bfloat16()
    seqfast.scaled_dot_product_attention(qg, kg, vg, enable_gqa=True)
    qt = torch.randn(2, 9, 4, 8).bfloat16().transpose(1, 2)
    out = seqfast.scaled_dot_product_attention(qt, qt, qt)
    assert out.stride() == F.scaled_dot_product_attention(qt, qt, qt).stride()
    assert route == [torch.bfloat16] * 6


def test_autocast_bf16_inference_is_torchs_call(route):
    q, k, v = _qkv(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = seqfast.scaled_dot_product_attention(q, k, v)
        ref = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert route == [torch.float32]


# (Lq, Lk, E) at the training thresholds: 2^23 (full) and above 2^26 (causal), head dim at least 64.
@pytest.mark.parametrize("causal,lq,lk,e,routed", [
    (False, 362, 362, 64, False),   # 8386816 < 2^23
    (False, 256, 512, 64, True),    # 2^23
    (False, 1024, 256, 32, False),  # 2^23, but E < 64
    (True, 1024, 1024, 64, False),  # 2^26: not above it
    (True, 1024, 1025, 64, True),
    (True, 512, 1024, 128, False),
    (True, 1024, 520, 128, True),
])
def test_bf16_training_goes_to_torch_above_the_work_threshold(route, causal, lq, lk, e, routed):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, lq, e, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(1, 1, lk, e, generator=g).bfloat16().requires_grad_() for _ in range(2))
    go = torch.randn(1, 1, lq, e, generator=g).bfloat16()
    out = seqfast.scaled_dot_product_attention(q, k, v, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), go)
    assert route == ([torch.bfloat16] if routed else [])
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    if routed:  # torch's call: torch's bits, forward and gradients
        assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    else:  # seqfast's kernels: close to torch, not its bits
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_bf16_training_route_takes_masks_and_autocast(route):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 512, 64, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.randn(512, 512, generator=g).bfloat16()  # a mask is judged as full attention
    out = seqfast.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out, ref)
    out.float().sum().backward()
    qf = torch.randn(2, 2, 512, 64, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outf = seqfast.scaled_dot_product_attention(qf, qf, qf)
    assert outf.dtype == torch.bfloat16
    assert route == [torch.bfloat16, torch.float32]


def test_other_calls_stay_on_seqfast(route):
    q, k, v = _qkv(requires_grad=True)
    out = seqfast.scaled_dot_product_attention(q, k, v)  # a small gradient to come: seqfast's backward
    out.float().sum().backward()
    assert q.grad is not None
    big = [torch.randn(1, 1, 2048, 64).bfloat16().requires_grad_() for _ in range(3)]
    seqfast.scaled_dot_product_attention(*big, dropout_p=0.1)  # large, but dropout: torch runs it unfused
    seqfast.scaled_dot_product_attention(*(x.detach().squeeze(0).requires_grad_() for x in big))  # 3-D
    with torch.no_grad():
        for dtype in (torch.float32, torch.float16):
            seqfast.scaled_dot_product_attention(*_qkv(dtype=dtype))
        x = _qkv(shape=(3, 37, 16))  # 3-D: torch runs it unfused
        seqfast.scaled_dot_product_attention(*x)
        seqfast.scaled_dot_product_attention(*_qkv(), dropout_p=0.5)
        seqfast.scaled_dot_product_attention(*_qkv(), attn_mask=torch.ones(3, 37, 37, dtype=torch.bool))  # 3-D mask
        with torch.autocast("cpu", dtype=torch.float16):
            seqfast.scaled_dot_product_attention(*_qkv(dtype=torch.float32))
        with seqfast.backend("cpp"):
            seqfast.scaled_dot_product_attention(*_qkv())
    mask = torch.zeros(37, 37, dtype=torch.bfloat16, requires_grad=True)
    seqfast.scaled_dot_product_attention(*_qkv(), attn_mask=mask)  # the mask's gradient is to come
    assert route == []


def test_route_follows_torchs_amx_and_the_switch(monkeypatch):
    monkeypatch.delenv(_amx.ENV, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    if sys.platform == "linux":
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        assert _amx.torch_multiplies_bf16_on_amx() == ("amx_bf16" in flags)
    monkeypatch.setattr(torch._C._cpu, "_init_amx", lambda: True, raising=False)
    assert _amx.torch_multiplies_bf16_on_amx()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert not _amx.torch_multiplies_bf16_on_amx()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert _amx.torch_multiplies_bf16_on_amx()
    monkeypatch.setenv(_amx.ENV, "seqfast")
    assert not _amx.torch_multiplies_bf16_on_amx()
    monkeypatch.setenv(_amx.ENV, "torch please")
    with pytest.raises(ValueError, match="SEQFAST_BF16_ATTENTION"):
        _amx.torch_multiplies_bf16_on_amx()
    monkeypatch.setattr(torch._C._cpu, "_init_amx", lambda: False, raising=False)
    monkeypatch.delenv(_amx.ENV)
    assert not _amx.torch_multiplies_bf16_on_amx()


def test_compiled_and_torch_func_calls_keep_seqfasts_op(route, monkeypatch):
    # The route is an eager one (``_backend.is_plain_auto``): a compiled call or one under a torch.func transform
    # keeps seqfast's op, as every other call of those does (its fake, its layouts, its compiled caching).
    q, k, v = _qkv()
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: seqfast.scaled_dot_product_attention(q, k, v, is_causal=True), fullgraph=True)
    with torch.no_grad():
        out = fn(q, k, v)
        batched = torch.func.vmap(lambda q: seqfast.scaled_dot_product_attention(q, k[0], v[0]))(q)
    assert route == []
    monkeypatch.setattr(sf, "_TORCH_AMX_BF16", False)
    with torch.no_grad():
        assert torch.equal(out, seqfast.scaled_dot_product_attention(q, k, v, is_causal=True))
        assert torch.equal(batched[0], seqfast.scaled_dot_product_attention(q[0], k[0], v[0]))


def test_multihead_attention_takes_the_same_route(route):
    # seqfast.nn.MultiheadAttention computes its attention as seqfast.scaled_dot_product_attention does, the AMX
    # route included: with it, a large bfloat16 training call without weights is torch's module's own numbers.
    torch.manual_seed(0)
    E, H, L = 512, 8, 512  # head dim 64, L * L * 64 = 2^24
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.bfloat16)
    mha = seqfast.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.bfloat16)
    mha.load_state_dict(ref.state_dict())
    x = torch.randn(2, L, E).bfloat16()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out = mha(xs[0], xs[0], xs[0], need_weights=False)[0]
    expected = ref(xs[1], xs[1], xs[1], need_weights=False)[0]
    assert route == [torch.bfloat16]
    assert torch.equal(out, expected)
    go = torch.randn_like(out)
    out.backward(go)
    expected.backward(go)
    assert torch.equal(xs[0].grad, xs[1].grad)
    small = x[:, :16].clone().requires_grad_()
    mha(small, small, small, need_weights=False)  # a small call stays on seqfast's kernels
    mha.dropout = 0.1
    mha(xs[0], xs[0], xs[0], need_weights=False)  # dropout: torch would run it unfused
    assert route == [torch.bfloat16]


def test_decoding_calls_stay_with_seqfast(route):
    """At most AMX_DECODING_MAX_ROWS query rows: seqfast's row kernels, not torch's AMX kernel; one row more goes
    to torch."""
    for Lq, routed in ((1, False), (sf.AMX_DECODING_MAX_ROWS, False), (sf.AMX_DECODING_MAX_ROWS + 1, True)):
        q = torch.randn(2, 4, Lq, 64).bfloat16()
        k, v = torch.randn(2, 4, 300, 64).bfloat16(), torch.randn(2, 4, 300, 64).bfloat16()
        before = len(route)
        out = seqfast.scaled_dot_product_attention(q, k, v)
        assert (len(route) > before) == routed, Lq
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=2e-2, atol=2e-2)
    assert len(route) == 1
