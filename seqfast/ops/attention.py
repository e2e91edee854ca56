"""The attention ops (FlashAttention-style: no Lq x Lk buffer is kept, only the row log-sum-exp).

``seqfast::attention_forward(query, key, value, attn_mask, dropout_p, causal, scale, seed) -> (out, lse)``

- ``query`` (B, Hq, Lq, D), ``key`` (B, Hk, Lk, D), ``value`` (B, Hk, Lk, Dv): float16 / bfloat16 /
  float32 / float64, one dtype, stride 1 on the last dim, any other strides. ``Hq % Hk == 0``:
  query head h reads key/value head ``h // (Hq // Hk)`` (GQA / MQA without repeating K/V).
- ``attn_mask``: None or (B, Hq, Lq, Lk), possibly an expanded view with zero strides; bool
  (True = attend) or float in ``query``'s dtype (added to the scaled scores).
- ``causal``: 0 none; 1 top-left (torch's ``is_causal``: query i sees keys j <= i); 2
  bottom-right (query i sees keys j <= i + Lk - Lq, for KV-cache decoding).
- ``scale``: multiplies q.k; ``dropout_p`` in [0, 1) with a counter-based RNG keyed by ``seed``, a
  one-element int64 tensor (a tensor so that ``torch.compile`` draws it inside the graph; the
  backward regenerates the same mask, none is stored): on the CPU for CPU tensors (the C++ kernels read
  it), on the query's device for CUDA tensors (the Triton kernels load it there: no host sync, and CUDA
  graphs capture it; a CPU seed is copied over). The keep-mask helpers and the reference take either.
- ``out`` (B, Hq, Lq, Dv) in ``query``'s dtype, and in its layout when Dv == D (``torch.empty_like(query)``,
  as torch's fused kernels give it), else contiguous; ``lse`` (B, Hq, Lq) float32 (float64 for
  float64 input): log-sum-exp of the masked scaled scores per row, ``+inf`` for rows with no
  visible key, whose output is 0 (NaN where such a row meets a NaN or inf value) and whose gradients are 0.

``seqfast::attention_backward(grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal,
scale, seed, mask_grad) -> (grad_query, grad_key, grad_value, grad_mask)``: grads with the shapes
and dtypes of the inputs (contiguous); ``grad_mask`` is (B, Hq, Lq, Lk) when ``mask_grad`` (float
mask requiring grad), else an empty tensor. No float atomics: bitwise deterministic.

``seqfast::varlen_attention_forward(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
max_seqlen_k, causal, scale) -> (out, lse)``: packed sequences, ``query`` (total_q, Hq, D),
``key`` (total_k, Hk, D), ``value`` (total_k, Hk, Dv), ``cu_seqlens_*`` (B+1,) int32/int64 prefix
sums; sequence b is rows ``cu[b]:cu[b+1]``. ``out`` (total_q, Hq, Dv), ``lse`` (Hq, total_q).
``causal`` as above, per sequence. ``seqfast::varlen_attention_backward(grad_out, query, key,
value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse, causal, scale) ->
(grad_query, grad_key, grad_value)``.
"""

from __future__ import annotations

import torch

from seqfast import _backend, _cpu_dropout, _triton
from seqfast.ops import no_double_backward
from seqfast.ops._registry import define, register_autograd, register_kernels, vmap_fold, vmap_unfold
from seqfast.reference import attention as reference

NO_CAUSAL, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2

FORWARD = define(
    "attention_forward",
    "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, int causal, float scale, "
    "Tensor seed) -> (Tensor, Tensor)",
)
BACKWARD = define(
    "attention_backward",
    "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor out, Tensor lse, "
    "float dropout_p, int causal, float scale, Tensor seed, bool mask_grad) -> (Tensor, Tensor, Tensor, Tensor)",
)
VARLEN_FORWARD = define(
    "varlen_attention_forward",
    "(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
    "int max_seqlen_k, int causal, float scale) -> (Tensor, Tensor)",
)
VARLEN_BACKWARD = define(
    "varlen_attention_backward",
    "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "int max_seqlen_q, int max_seqlen_k, Tensor out, Tensor lse, int causal, float scale) "
    "-> (Tensor, Tensor, Tensor)",
)


def dropout_keep_mask(seed: torch.Tensor | int, shape: tuple[int, int, int, int], p: float,
                      device: torch.device | str, backend: str) -> torch.Tensor:
    """Bool (B, Hq, Lq, Lk) keep-mask that ``backend``'s ``attention_forward`` draws for ``seed`` and
    ``dropout_p = p`` on ``device`` (``auto``: the backend the dispatcher picks for that device)."""
    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpp"
    if backend == "cpp":
        return _cpu_dropout.keep_mask(seed, shape, p)
    if backend == "triton":
        return _triton.kernels("attention", torch.empty(0, device=device)).dropout_keep_mask(seed, *shape, p, device)
    return reference.dropout_keep(int(seed), shape, p, device)  # the reference seeds a host generator: one read


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("seqfast::attention_forward")
def _forward_fake(query, key, value, attn_mask, dropout_p, causal, scale, seed):
    B, H, Lq, _ = query.shape
    return reference.output_like(query, value.shape[-1]), query.new_empty((B, H, Lq), dtype=lse_dtype(query.dtype))


@torch.library.register_fake("seqfast::attention_backward")
def _backward_fake(grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale, seed, mask_grad):
    grad_mask = (
        query.new_empty((*query.shape[:3], key.shape[2]), dtype=attn_mask.dtype)
        if mask_grad
        else query.new_empty((0,))
    )
    # torch's CPU gradient layouts whatever the inputs' strides (reference.gradients_like says which).
    return (*reference.gradients_like(query, key, value, dropout_p, mask_grad), grad_mask)


@torch.library.register_fake("seqfast::varlen_attention_forward")
def _varlen_forward_fake(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale):
    out = query.new_empty((*query.shape[:2], value.shape[-1]))
    return out, query.new_empty((query.shape[1], query.shape[0]), dtype=lse_dtype(query.dtype))


@torch.library.register_fake("seqfast::varlen_attention_backward")
def _varlen_backward_fake(grad_out, query, key, value, *rest):
    return _contiguous_like(query), _contiguous_like(key), _contiguous_like(value)


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, causal, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, attn_mask, out, lse, seed)
    ctx.dropout_p, ctx.causal, ctx.scale = dropout_p, causal, scale
    ctx.mask_grad = attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad
    ctx.backend = _backend.current()


def _kernel_grad(grad_out: torch.Tensor) -> torch.Tensor:
    """dO as the backward kernels take it: CPU ones read any strides (csrc/autograd.cpp says why it matters),
    the Triton ones want it contiguous."""
    return grad_out if grad_out.device.type == "cpu" else grad_out.contiguous()


def _backward(ctx, grad_out, grad_lse):
    query, key, value, attn_mask, out, lse, seed = ctx.saved_tensors
    with no_double_backward.guard():
        dq, dk, dv, dmask = _backend.dispatch(
            ctx.backend, BACKWARD, _kernel_grad(grad_out), query, key, value, attn_mask, out, lse,
            ctx.dropout_p, ctx.causal, ctx.scale, seed, ctx.mask_grad,
        )
    grads = no_double_backward.mark("seqfast::attention_backward", (query, key, value, attn_mask, grad_out),
                                    dq, dk, dv, dmask)
    dq, dk, dv, dmask = grads
    return dq, dk, dv, (dmask if ctx.mask_grad else None), None, None, None, None


def _varlen_setup_context(ctx, inputs, output):
    query, key, value, cu_q, cu_k, max_q, max_k, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, cu_q, cu_k, out, lse)
    ctx.max_q, ctx.max_k, ctx.causal, ctx.scale = max_q, max_k, causal, scale
    ctx.backend = _backend.current()


def _varlen_backward(ctx, grad_out, grad_lse):
    query, key, value, cu_q, cu_k, out, lse = ctx.saved_tensors
    with no_double_backward.guard():
        dq, dk, dv = _backend.dispatch(
            ctx.backend, VARLEN_BACKWARD, _kernel_grad(grad_out), query, key, value, cu_q, cu_k,
            ctx.max_q, ctx.max_k, out, lse, ctx.causal, ctx.scale,
        )
    dq, dk, dv = no_double_backward.mark("seqfast::varlen_attention_backward", (query, key, value, grad_out),
                                         dq, dk, dv)
    return dq, dk, dv, None, None, None, None, None, None


register_autograd("attention_forward", _backward, _setup_context)
register_autograd("varlen_attention_forward", _varlen_backward, _varlen_setup_context)
register_kernels("attention_forward", "attention", reference.attention_forward)
register_kernels("attention_backward", "attention", reference.attention_backward)
register_kernels("varlen_attention_forward", "attention", reference.varlen_attention_forward)
register_kernels("varlen_attention_backward", "attention", reference.varlen_attention_backward)


# torch.vmap: the vmapped dimension joins the batch dimension (one call of the kernels, instead of torch's per-sample
# fallback loop and its warning). Unbatched arguments are expanded to the vmap size first.


def _fold(x: torch.Tensor | None, bdim: int | None, size: int) -> torch.Tensor | None:
    """(size, B, ...) -> (size * B, ...) with stride 1 on the last dim, as the kernels read it."""
    if x is None:
        return None
    x = vmap_fold(x, bdim, size)
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


@torch.library.register_vmap("seqfast::attention_forward")
def _forward_vmap(info, in_dims, query, key, value, attn_mask, dropout_p, causal, scale, seed):
    if in_dims[7] is not None:
        raise RuntimeError("seqfast::attention_forward under torch.vmap: the dropout seed must not be batched")
    q, k, v, m = (_fold(x, d, info.batch_size) for x, d in zip((query, key, value, attn_mask), in_dims))
    out, lse = FORWARD(q, k, v, m, dropout_p, causal, scale, seed)
    return (vmap_unfold(out, info.batch_size), vmap_unfold(lse, info.batch_size)), (0, 0)


@torch.library.register_vmap("seqfast::attention_backward")
def _backward_vmap(info, in_dims, grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale, seed,
                   mask_grad):
    if in_dims[10] is not None:
        raise RuntimeError("seqfast::attention_backward under torch.vmap: the dropout seed must not be batched")
    tensors = (grad_out, query, key, value, attn_mask, out, lse)
    g, q, k, v, m, o, lse_ = (_fold(x, d, info.batch_size) for x, d in zip(tensors, in_dims[:7]))
    dq, dk, dv, dmask = BACKWARD(g, q, k, v, m, o, lse_, dropout_p, causal, scale, seed, mask_grad)
    B = info.batch_size
    dmask, mask_dim = (vmap_unfold(dmask, B), 0) if mask_grad else (dmask, None)
    return (vmap_unfold(dq, B), vmap_unfold(dk, B), vmap_unfold(dv, B), dmask), (0, 0, 0, mask_dim)
