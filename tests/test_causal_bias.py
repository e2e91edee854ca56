"""torch's ``CausalBias`` masks (``causal_upper_left`` / ``causal_lower_right``) through seqfast's SDPA, and the
KV cache built on the lower-right alignment: the same outputs and gradients as torch, the same refusals."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import seqfast
from seqfast.nn import KVCache

LENGTHS = [(1, 1), (1, 37), (3, 10), (10, 10), (17, 70), (12, 5)]


def _inputs(Lq, Lk, dtype=torch.float32, B=2, H=3, D=16, Hk=None):
    g = torch.Generator().manual_seed(Lq * 100 + Lk)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hk or H, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hk or H, Lk, D + 3, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _bias(variant, Lq, Lk):
    with warnings.catch_warnings():  # torch warns that lower-right with Lq > Lk leaves rows with no key
        warnings.simplefilter("ignore", UserWarning)
        return variant(Lq, Lk)


def _run(fn, tensors, **kw):
    out = fn(*tensors, **kw)
    grads = torch.autograd.grad(out, tensors, torch.ones_like(out))
    return out, grads


@pytest.mark.parametrize("variant", [causal_lower_right, causal_upper_left])
@pytest.mark.parametrize("Lq,Lk", LENGTHS)
@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_matches_torch(variant, Lq, Lk, backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    tensors = _inputs(Lq, Lk, dtype)
    bias = _bias(variant, Lq, Lk)
    with seqfast.backend(backend):
        out, grads = _run(seqfast.scaled_dot_product_attention, tensors, attn_mask=bias)
    want, want_grads = _run(F.scaled_dot_product_attention, tensors, attn_mask=bias)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("variant", [causal_lower_right, causal_upper_left])
def test_compiled_matches_torch(variant):
    """A CausalBias is recognised inside a compiled graph too (seqfast finds its class through sys.modules)."""
    tensors = _inputs(3, 10)
    bias = _bias(variant, 3, 10)

    def fn(q, k, v):
        return seqfast.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    torch._dynamo.reset()
    out, grads = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), tensors)
    want, want_grads = _run(F.scaled_dot_product_attention, tensors, attn_mask=bias)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)

def test_lower_right_is_the_bottom_right_mask():
    """The kernels' mode equals the materialised mask (query i sees keys j <= i + Lk - Lq)."""
    q, k, v = _inputs(5, 9)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=9 - 5)
    got = seqfast.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 9))
    torch.testing.assert_close(got, seqfast.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_grouped_query_heads():
    q, k, v = _inputs(4, 11, H=6, Hk=2)
    bias = causal_lower_right(4, 11)
    got = seqfast.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    torch.testing.assert_close(got, want)


def test_refused_with_is_causal_as_torch():
    q, k, v = _inputs(3, 6)
    bias = causal_lower_right(3, 6)
    with pytest.raises(ValueError, match="causal=True"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
    with pytest.raises(ValueError, match="causal=True"):
        seqfast.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)


def test_lower_right_lengths_must_match_the_inputs():
    q, k, v = _inputs(3, 6)
    bias = causal_lower_right(2, 6)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with pytest.raises(seqfast.ArgumentError, match=r"causal_lower_right\(2, 6\)"):
        seqfast.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@pytest.mark.parametrize("step", [1, 3, 8])
def test_kv_cache_steps_equal_the_full_causal_pass(step):
    """Decoding chunk by chunk with cached keys and values gives the rows of the full causal pass."""
    B, H, L, D = 2, 4, 23, 16
    g = torch.Generator().manual_seed(step)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    cache = KVCache(B, H, capacity=L, head_dim=D)
    outs = [cache.attend(q[:, :, i:i + step], k[:, :, i:i + step], v[:, :, i:i + step]) for i in range(0, L, step)]
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-5, atol=1e-6)
    assert cache.length == L


def test_kv_cache_refuses_overflow_and_wrong_shapes():
    cache = KVCache(1, 2, capacity=4, head_dim=8)
    cache.append(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="full"):
        cache.append(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    with pytest.raises(ValueError, match="do not fit"):
        cache.append(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
    cache.reset()
    keys, _ = cache.append(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    assert keys.shape == (1, 2, 4, 8)
