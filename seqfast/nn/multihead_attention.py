"""``seqfast.nn.MultiheadAttention``: ``torch.nn.MultiheadAttention`` with its attention computed by seqfast.

The module subclasses torch's: constructor, parameters (``in_proj_weight`` or ``q/k/v_proj_weight``,
``in_proj_bias``, ``out_proj``, ``bias_k``, ``bias_v``), initialisation and ``state_dict`` are torch's own,
so weights move between the two classes with ``load_state_dict`` and a fresh module is drawn from the same
distribution (bit-identical under the same seed). Only ``forward`` differs: the attention output always comes
from :func:`seqfast.scaled_dot_product_attention`, never from torch's inference fast path: from seqfast's kernels,
except where that function hands a bfloat16 call to torch's AMX kernel (``seqfast/_amx.py``). (A module that
:func:`seqfast.patch` converted runs torch's ``forward`` while torch's flags allow only its math kernel:
``seqfast/_torch_math.py``.)
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from seqfast import _backend
from seqfast._torch_math import converted_from, torch_class_chosen
from seqfast.functional import _amx_bf16_attention, _dropout_seed, _seeded_attention
from seqfast.nn._scripting import NotScriptable
from seqfast.ops import attention as attention_ops
from seqfast.validation import ArgumentError

# A mask in seqfast's convention: None, bool (True = attend) or float (added to the scaled scores),
# broadcastable to (N, H, L, S).
Mask = torch.Tensor | None


def _attend_or_additive(mask: torch.Tensor, name: str) -> torch.Tensor:
    """torch MHA's masks (bool True = ignore, or float added) -> seqfast's (bool True = attend, or float)."""
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating tensor, got {mask.dtype}")
    return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """seqfast-convention mask -> float mask: 0 where attended, -inf where not (floats unchanged)."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _merge(attn_mask: Mask, key_padding_mask: Mask, dtype: torch.dtype) -> Mask:
    """Combine the two (already 4-D, seqfast-convention) masks as torch does: a key is hidden if either hides it.

    Two bool masks stay bool (AND of the attended sets); otherwise both become additive and are summed.
    """
    if attn_mask is None or key_padding_mask is None:
        return key_padding_mask if attn_mask is None else attn_mask
    if attn_mask.dtype == torch.bool and key_padding_mask.dtype == torch.bool:
        return attn_mask & key_padding_mask
    if attn_mask.dtype != key_padding_mask.dtype:
        # torch deprecates this mix but still accepts it.
        warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                      "both instead.", stacklevel=3)
    return _additive(attn_mask, dtype) + _additive(key_padding_mask, dtype)


def _append_key(mask: Mask) -> Mask:
    """Extend a mask by one visible key column (for ``bias_k`` or ``add_zero_attn``)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.cat([mask, mask.new_ones((*mask.shape[:-1], 1))], dim=-1)
    return F.pad(mask, (0, 1))


def _hidden_rows(mask: torch.Tensor) -> torch.Tensor:
    """(..., L, 1) bool: the query rows ``mask`` (seqfast's convention) leaves no key (all False, or all -inf)."""
    if mask.dtype == torch.bool:
        return ~mask.any(dim=-1, keepdim=True)
    return (mask == float("-inf")).all(dim=-1, keepdim=True)


def _hides_a_row(mask: Mask) -> bool:
    return mask is not None and bool(_hidden_rows(mask).any())


def _transposed_alike(query, key, value):
    """(N, T, E) -> (T, N, E) views, keeping which of the three are the same tensor (the in-projection's choice)."""
    q = query.transpose(0, 1)
    k = q if key is query else key.transpose(0, 1)
    v = k if value is key else (q if value is query else value.transpose(0, 1))
    return q, k, v


def _any_nested_input(*tensors) -> bool:
    """Whether any input is a nested tensor, of either layout: torch's own forward decides what becomes of those."""
    return any(isinstance(t, torch.Tensor) and t.is_nested for t in tensors)


def _check_inputs(query, key, value, key_padding_mask, attn_mask) -> bool:
    """torch's shape rules for MHA inputs; returns whether the input is batched."""
    if query.dim() not in (2, 3):
        raise ArgumentError(f"query must be 2-D (L, E) unbatched or 3-D batched, got shape {tuple(query.shape)}")
    batched = query.dim() == 3
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ArgumentError(f"query, key and value must all be {query.dim()}-D, got {query.dim()}-D, {key.dim()}-D "
                         f"and {value.dim()}-D")
    if key.shape[:-1] != value.shape[:-1]:
        raise ArgumentError(f"key and value must agree on source length and batch, got shapes {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    want = 2 if batched else 1
    if key_padding_mask is not None and key_padding_mask.dim() != want:
        raise ArgumentError(f"key_padding_mask must be {want}-D for {query.dim()}-D query, got shape "
                         f"{tuple(key_padding_mask.shape)}")
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise ArgumentError(f"attn_mask must be 2-D (L, S) or 3-D (N * num_heads, L, S), got shape "
                         f"{tuple(attn_mask.shape)}")
    return batched


def _torch_takes_fast_path(mha: torch.nn.MultiheadAttention, query, key, value, attn_mask, key_padding_mask) -> bool:
    """Whether torch's module would answer this batched ``batch_first`` call from its fused inference path, as its
    ``forward`` decides. Only the output's layout follows from it: torch's fused path returns (N, L, E) contiguous,
    its other path the transpose of an (L, N, E) result, strides (E, N E, 1); seqfast gives the same."""
    float_mask = any(m is not None and torch.is_floating_point(m) for m in (attn_mask, key_padding_mask))
    if (float_mask or not torch.backends.mha.get_fastpath_enabled() or query is not key or key is not value
            or _dtype_mismatch(mha, query) or mha.training or mha.num_heads % 2
            or mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn
            or not mha._qkv_same_embed_dim or mha.in_proj_bias is None or torch.is_autocast_enabled()):
        return False
    args = (query, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
    if torch.overrides.has_torch_function(args) or torch.compiler.is_exporting():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args))


def _dtype_mismatch(mha: torch.nn.MultiheadAttention, query: torch.Tensor) -> bool:
    return query.dtype != mha.in_proj_weight.dtype or (mha.in_proj_bias is not None
                                                       and query.dtype != mha.in_proj_bias.dtype)


class MultiheadAttention(NotScriptable, torch.nn.MultiheadAttention):
    r"""Multi-head attention, a drop-in for :class:`torch.nn.MultiheadAttention` on seqfast's fused kernels.

    Same constructor as torch: ``MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True,
    add_bias_kv=False, add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None)``,
    same parameters and initialisation (it is a subclass), so
    ``seqfast_mha.load_state_dict(torch_mha.state_dict())`` and the reverse work.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights)``. With N batch, L target
    length, S source length, E = ``embed_dim``, H = ``num_heads``:

    - ``query`` (L, N, E), or (N, L, E) when ``batch_first``, or unbatched (L, E); ``key`` (S, N, kdim) /
      (N, S, kdim) / (S, kdim); ``value`` likewise with ``vdim``.
    - ``key_padding_mask`` (N, S) or (S,) unbatched: bool (True = ignore that key) or float (added).
    - ``attn_mask`` (L, S) or (N * H, L, S) ((H, L, S) unbatched): bool (True = NOT allowed to attend:
      torch's MHA convention, the opposite of ``scaled_dot_product_attention``'s) or float (added).
      When both masks are given they are merged as torch does (bool AND of the visible keys, or a sum once
      either is float; mixing bool and float is accepted with torch's deprecation warning).
    - ``is_causal``: a hint that ``attn_mask`` is the causal mask; as in torch, ``attn_mask`` must still be
      given, and the hint replaces it by the fused causal kernel only when there is no ``key_padding_mask``
      and ``need_weights`` is False.
    - ``attn_output`` (L, N, E) / (N, L, E) / (L, E), from :func:`seqfast.scaled_dot_product_attention`
      with dropout ``self.dropout`` in training mode and none in eval mode (with ``need_weights`` and a query
      row that sees no key, from the weights instead, as torch: see below). Its strides are torch's: batch-first
      output is the transpose of an (L, N, E) result, strides (E, N E, 1), except where torch's module takes its
      fused inference path (self-attention in eval mode with no gradient, ...), which returns it contiguous.
    - ``attn_weights`` only when ``need_weights``: (N, L, S') averaged over heads, or (N, H, L, S') when
      ``average_attn_weights`` is False (no N for unbatched input); S' = S plus one per ``add_bias_kv`` /
      ``add_zero_attn`` column. Computed by a separate plain softmax of the masked scores; in training mode
      with dropout they carry the same keep-mask as the fused output (as torch returns its dropped-out
      weights), so ``attn_output`` is exactly these weights applied to the values. Pass ``need_weights=False``
      to skip the (N, H, L, S') materialisation entirely.

    A query that sees no key (every key masked) gets torch's output: 0 without the weights (its
    scaled_dot_product_attention path), NaN with them (its weights @ v, the weights NaN there), and the
    gradients that follow from each. Nested inputs run torch's own ``forward`` on this module's parameters: torch
    takes them on its fused inference path (eval mode, no gradient, self-attention, ...) and refuses them
    elsewhere, and so does this module.
    """

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        torch_class = torch_class_chosen(self, query)
        if torch_class is None and _any_nested_input(query, key, value):
            # torch's module takes nested inputs on its fused inference path only (eval, no gradient, ...) and
            # refuses them elsewhere: its own forward decides, with its kernels.
            torch_class = converted_from(self) or torch.nn.MultiheadAttention
        if torch_class is not None:  # converted by seqfast.patch, under torch's math-only flags; or nested input
            return torch_class.forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)
        batched = _check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention); "
                               "torch.nn.Transformer.generate_square_subsequent_mask builds it")
        batch_first = self.batch_first if batched else True
        # torch's unfused path works on (L, N, E) views of batch-first inputs and returns the transpose of an
        # (L, N, E) result: the same here, so the output's strides are torch's (its fused path's are the plain ones).
        # Decided on the masks as given, as torch decides.
        transposed = batched and batch_first and not _torch_takes_fast_path(self, query, key, value, attn_mask,
                                                                               key_padding_mask)
        # The hint can stand in for the mask only where torch lets it: no padding mask to merge, no weights.
        use_causal = is_causal and key_padding_mask is None and not need_weights
        if use_causal:
            attn_mask = None
        if transposed:
            query, key, value = _transposed_alike(query, key, value)
            batch_first = False
        q, k, v = self._in_projection(query, key, value)
        if not batched:  # (L, E) -> (1, L, E)
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        q, k, v = (self._split_heads(t, batch_first) for t in (q, k, v))  # (N, H, L|S, hd)
        N, H, L, hd = q.shape
        S = k.shape[2]
        mask = self._masks(attn_mask, key_padding_mask, N, L, S, batched, q.dtype)

        if self.bias_k is not None or self.bias_v is not None:
            if self.bias_k is None or self.bias_v is None:
                raise ArgumentError("bias_k and bias_v must be both set or both None")
            k = torch.cat([k, self.bias_k.reshape(1, H, 1, hd).expand(N, H, 1, hd)], dim=2)
            v = torch.cat([v, self.bias_v.reshape(1, H, 1, hd).expand(N, H, 1, hd)], dim=2)
            mask = _append_key(mask)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros((N, H, 1, hd))], dim=2)
            v = torch.cat([v, v.new_zeros((N, H, 1, hd))], dim=2)
            mask = _append_key(mask)

        dropout_p = self.dropout if self.training else 0.0
        seed = _dropout_seed(dropout_p, q.device)
        backend = _backend.current()  # the weights' dropout must be the keep-mask this backend draws
        weights = self._weights(q, k, mask, dropout_p, seed, backend) if need_weights else None
        # Returning the weights, torch computes its output as weights @ v: a query row that sees no key is NaN
        # there (softmax of -inf alone), and so are the gradients through it, where the fused kernels give 0 (as
        # torch's own SDPA does without weights). Such rows take torch's formula: in eager calls the whole call,
        # when the mask hides a row; in compiled ones (no data-dependent branch) row by row.
        if weights is not None and mask is not None and torch.compiler.is_compiling():
            out = torch.where(_hidden_rows(mask), torch.matmul(weights, v),
                              _seeded_attention(q, k, v, mask, dropout_p, use_causal, None, False, seed))
        elif weights is not None and _hides_a_row(mask):
            out = torch.matmul(weights, v)
        else:
            # Where seqfast.scaled_dot_product_attention hands a bfloat16 call to torch's AMX kernel, so does the
            # module (never with dropout: torch runs that unfused).
            out = _amx_bf16_attention(q, k, v, mask, dropout_p, use_causal, None, False)
            if out is None:
                out = _seeded_attention(q, k, v, mask, dropout_p, use_causal, None, False, seed)
        out = self._merge_heads(out, batch_first)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        if transposed:
            out = out.transpose(0, 1)
        if weights is None:
            return out, None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, (weights if batched else weights.squeeze(0))

    def _in_projection(self, query, key, value):
        """Project in the input's own layout: (..., E_in) -> (..., E); one GEMM for self-attention."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if query is key and key is value:
            return F.linear(query, w, b).chunk(3, dim=-1)
        if key is value:
            kv = F.linear(key, w[E:], None if b is None else b[E:]).chunk(2, dim=-1)
            return (F.linear(query, w[:E], bq), *kv)
        wq, wk, wv = w.chunk(3)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _split_heads(self, x: torch.Tensor, batch_first: bool) -> torch.Tensor:
        """(N, T, E) or (T, N, E) -> (N, H, T, head_dim), a view (last dim stays contiguous)."""
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        return x.transpose(1, 2) if batch_first else x.permute(1, 2, 0, 3)

    def _merge_heads(self, x: torch.Tensor, batch_first: bool) -> torch.Tensor:
        """(N, H, L, head_dim) -> (N, L, E) or (L, N, E)."""
        N, H, L, hd = x.shape
        x = x.transpose(1, 2) if batch_first else x.permute(2, 0, 1, 3)
        return x.reshape(*x.shape[:2], H * hd)

    def _masks(self, attn_mask, key_padding_mask, N, L, S, batched, dtype) -> Mask:
        """torch MHA masks -> one seqfast mask broadcastable to (N, H, L, S), or None."""
        H = self.num_heads
        am = kpm = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise ArgumentError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                     f"{(L, S)}.")
                am = attn_mask.reshape(1, 1, L, S)
            else:
                want = (N * H, L, S) if batched else (H, L, S)
                if tuple(attn_mask.shape) != want:
                    raise ArgumentError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                     f"{want}.")
                am = attn_mask.reshape(N, H, L, S)
            am = _attend_or_additive(am, "attn_mask")
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (N, S):
                raise ArgumentError(f"key_padding_mask must have shape {(N, S) if batched else (S,)}, got "
                                 f"{tuple(key_padding_mask.shape if batched else key_padding_mask.shape[1:])}")
            kpm = _attend_or_additive(key_padding_mask.reshape(N, 1, 1, S), "key_padding_mask")
        return _merge(am, kpm, dtype)

    @staticmethod
    def _weights(q: torch.Tensor, k: torch.Tensor, mask: Mask, dropout_p: float, seed: torch.Tensor,
                 backend: str) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim) + mask), dropped out with the very keep-mask the fused kernel uses
        for the output (as torch returns its dropped-out weights): (N, H, L, S)."""
        scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2))
        if mask is not None:
            # Added, as torch adds its masks: a row that sees no key then passes its NaN gradient on to q and k
            # as torch's does (masked_fill would stop it).
            scores = scores + _additive(mask, scores.dtype)
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            keep = attention_ops.dropout_keep_mask(seed, tuple(weights.shape), dropout_p, weights.device, backend)
            weights = weights * keep / (1.0 - dropout_p)
        return weights
