"""Naive attention in float64 with the full (Lq, Lk) score matrix materialised.

:func:`attention` is the direct formula; the ``*_forward`` / ``*_backward`` functions implement
the seqfast attention ops (``seqfast/ops/attention.py``) on top of it, the backward by autograd.
"""

from __future__ import annotations

import math

import torch

NO_CAUSAL, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2


def causal_mask(Lq: int, Lk: int, causal: int, device=None) -> torch.Tensor | None:
    """Bool (Lq, Lk), True = attend; None when ``causal`` is 0."""
    if causal == NO_CAUSAL:
        return None
    shift = 0 if causal == CAUSAL_TOP_LEFT else Lk - Lq
    i = torch.arange(Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    return j <= i + shift


def dropout_keep(seed: int, shape: tuple[int, ...], p: float, device=None) -> torch.Tensor:
    """The reference backend's dropout keep-mask (bool), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) >= p).to(device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: int = NO_CAUSAL,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_keep_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v in float64; returns (out, lse).

    q (..., Hq, Lq, D), k (..., Hk, Lk, D), v (..., Hk, Lk, Dv) with Hq a multiple of Hk (GQA);
    attn_mask broadcastable to (..., Hq, Lq, Lk), bool (True = attend) or float (added).
    Rows that see no key (every score -inf) give output 0 and lse +inf. NaN and inf propagate as in
    torch's CPU kernels: a bool mask is added as 0 / -inf (a NaN score behind a False stays NaN),
    causal hides keys whatever their scores, a row with a NaN score (or +inf, through inf - inf) is
    NaN. ``dropout_keep_mask`` (bool, broadcastable to the scores) drops weights after the softmax,
    survivors scaled by 1 / (1 - dropout_p).
    """
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[-3] // k.shape[-3] if k.shape[-3] else 1  # no heads at all: an empty call
    k = k.repeat_interleave(group, dim=-3)
    v = v.repeat_interleave(group, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s + torch.zeros_like(attn_mask, dtype=s.dtype).masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.double()
    cm = causal_mask(q.shape[-2], k.shape[-2], causal, q.device)
    if cm is not None:
        s = s.masked_fill(~cm, float("-inf"))
    # softmax written out (torch.logsumexp gives +inf, not NaN, for a row holding +inf). The max is a
    # constant shift (detached); amax keeps NaN. A row that sees no key has max -inf: shift by 0 and
    # divide by 1 there, so its weights are 0 (torch's _safe_softmax) and its gradient keeps the
    # softmax form p * (g - sum(p * g)).
    # (amax refuses an empty dim: no keys at all is a row that sees none)
    m = s.detach().amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_full((*s.shape[:-1], 1), float("-inf"))
    m = m.masked_fill(m == float("-inf"), 0.0)
    e = torch.exp(s - m)
    z = e.sum(dim=-1, keepdim=True)
    z = z + (z == 0).to(z.dtype)
    p = e / z
    if cm is not None:
        p = p.masked_fill(~cm, 0.0)  # a NaN row would otherwise give NaN weights to hidden keys
    empty = (s == float("-inf")).all(dim=-1)
    lse = (m + z.log()).squeeze(-1).masked_fill(empty, float("inf"))
    if dropout_keep_mask is not None:
        p = p * dropout_keep_mask / (1.0 - dropout_p)
    return p @ v, lse


def _keep_mask(dropout_p, seed, q, k):
    if dropout_p <= 0.0:
        return None
    return dropout_keep(int(seed), (*q.shape[:-1], k.shape[-2]), dropout_p, q.device)


def output_like(query: torch.Tensor, dv: int) -> torch.Tensor:
    """An empty (B, Hq, Lq, Dv) output as ``seqfast::attention_forward`` returns it: in ``query``'s layout when
    Dv == D (``torch.empty_like``: dense, dims in the query's stride order), as torch's fused attention gives it,
    else contiguous."""
    if dv == query.shape[-1]:
        return torch.empty_like(query)
    return query.new_empty((*query.shape[:-1], dv))


def fused_gradients(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float,
                    mask_grad: bool) -> bool:
    """Whether ``seqfast::attention_backward`` gives its gradients as torch's fused CPU attention does (CPU
    tensors, no dropout, Dv == D, no mask gradient, no empty sequence), else as its unfused path does (see
    ``gradient_like``). CUDA gradients stay contiguous. The C++ kernels' ``fused_gradients`` is the same rule."""
    return (query.device.type == "cpu" and dropout_p == 0 and not mask_grad and value.shape[-1] == query.shape[-1]
            and query.shape[2] > 0 and key.shape[2] > 0)


def gradient_like(t: torch.Tensor, fused: bool, unfused_key: bool = False) -> torch.Tensor:
    """An empty (B, H, L, E) gradient for ``t`` in torch's CPU layouts: (B, L, H, E)-ordered where ``fused``;
    otherwise contiguous, but for ``unfused_key`` (dK of ungrouped heads on the CPU) the transpose of a contiguous
    (B, H, E, L), as torch's math path gives dK."""
    B, H, L, E = t.shape
    if fused:
        return t.new_empty((B, L, H, E)).transpose(1, 2)
    if unfused_key and t.device.type == "cpu":
        return t.new_empty((B, H, E, L)).transpose(2, 3)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def gradients_like(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float,
                   mask_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty dQ, dK, dV as ``seqfast::attention_backward`` returns them."""
    fused = fused_gradients(query, key, value, dropout_p, mask_grad)
    return (gradient_like(query, fused), gradient_like(key, fused, key.shape[1] == query.shape[1]),
            gradient_like(value, fused))


def attention_forward(query, key, value, attn_mask, dropout_p, causal, scale, seed):
    keep = _keep_mask(dropout_p, seed, query, key)
    out, lse = attention(query, key, value, attn_mask, causal, scale, dropout_p, keep)
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return output_like(query, value.shape[-1]).copy_(out), lse.to(lse_dtype)


def attention_backward(grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale, seed, mask_grad):
    with torch.enable_grad():
        leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
        mask = attn_mask
        if mask_grad:
            mask = attn_mask.detach().double().requires_grad_()
            leaves.append(mask)
        o, _ = attention(*leaves[:3], mask, causal, scale, dropout_p, _keep_mask(dropout_p, seed, query, key))
        grads = torch.autograd.grad(o, leaves, grad_out.double(), allow_unused=True)
    # In the layout every backend returns them (the op's fake says so).
    dq, dk, dv = (e.copy_(g) for e, g in zip(gradients_like(query, key, value, dropout_p, mask_grad), grads[:3]))
    dmask = grads[3].to(attn_mask.dtype) if mask_grad else query.new_empty((0,))
    return dq, dk, dv, dmask


def _sequences(cu_q, cu_k):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(cq) - 1)]


def varlen_attention(query, key, value, cu_q, cu_k, causal, scale):
    """Packed sequences one at a time: (total_q, Hq, D) in, (out (total_q, Hq, Dv), lse (Hq, total_q)) out."""
    outs, lses = [], []
    for sq, sk in _sequences(cu_q, cu_k):
        o, lse = attention(query[sq].transpose(0, 1), key[sk].transpose(0, 1), value[sk].transpose(0, 1),
                           causal=causal, scale=scale)
        outs.append(o.transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def varlen_attention_forward(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale):
    out, lse = varlen_attention(query, key, value, cu_q, cu_k, causal, scale)
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return out.to(query.dtype), lse.to(lse_dtype)


def varlen_attention_backward(grad_out, query, key, value, cu_q, cu_k, max_q, max_k, out, lse, causal, scale):
    with torch.enable_grad():
        leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
        o, _ = varlen_attention(*leaves, cu_q, cu_k, causal, scale)
        grads = torch.autograd.grad(o, leaves, grad_out.double(), allow_unused=True)
    return tuple(
        (g if g is not None else torch.zeros_like(t, dtype=torch.float64)).to(t.dtype).contiguous()
        for g, t in zip(grads, (query, key, value))
    )
