"""Transformer layers whose attention runs on seqfast, and helpers to convert existing torch models.

:class:`TransformerEncoderLayer` and :class:`TransformerDecoderLayer` subclass torch's layers: same
constructor, submodules, initialisation and ``state_dict``; their ``self_attn`` / ``multihead_attn`` are
:class:`seqfast.nn.MultiheadAttention`. They plug into ``torch.nn.TransformerEncoder`` /
``torch.nn.TransformerDecoder`` / ``torch.nn.Transformer(custom_encoder=...)`` unchanged.

torch has two inference shortcuts that would bypass seqfast, both disabled here:

- ``torch.nn.TransformerEncoderLayer.forward`` calls the fused ``torch._transformer_encoder_layer_fwd``
  (attention, feed-forward and norms in one native op) when it is in eval mode without autograd, batch_first,
  etc. :class:`TransformerEncoderLayer` overrides ``forward`` with the layer's plain path only. Where torch
  would call the fused op under CPU autocast (its autocast check is CUDA's), that op returns the autocast dtype
  and the plain path float32: the seqfast layer casts its result to torch's dtype there.
- ``torch.nn.TransformerEncoder`` (eval, batch_first, with ``src_key_padding_mask``) packs the batch into a
  nested tensor, drops the padding mask and expects the layers to take nested input. The seqfast layer
  accepts that input: it pads it back, runs with the equivalent padding mask and re-packs the result,
  so the encoder returns what torch's path returns (zeros at padded positions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from seqfast._torch_math import torch_class_chosen
from seqfast.nn._scripting import NotScriptable
from seqfast.nn.multihead_attention import MultiheadAttention
from seqfast.validation import ArgumentError

Activation = str | Callable[[torch.Tensor], torch.Tensor]


def _plain_encoder_layer(layer: torch.nn.TransformerEncoderLayer, x, src_mask, src_key_padding_mask, is_causal):
    # torch's layer computation without its fused fast path (Fig. 1 of Xiong et al. 2020 for norm_first).
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return layer.norm2(x + layer._ff_block(x))


def _fused_layer_dtype(layer: torch.nn.TransformerEncoderLayer, src: torch.Tensor) -> torch.dtype | None:
    """The dtype of torch's fused encoder layer (``torch._transformer_encoder_layer_fwd``) where torch's ``forward``
    would call it and it differs from the plain path's, else None. That is under CPU autocast only: torch checks
    ``torch.is_autocast_enabled()``, which is CUDA's, so a CPU autocast call in eval mode takes the fused op, and it
    returns a float32 ``src`` in the autocast dtype where the plain path ends in a float32 LayerNorm."""
    if (src.device.type != "cpu" or src.dtype != torch.float32 or not torch.is_autocast_enabled("cpu")
            or src.dim() != 3 or layer.training or not torch.backends.mha.get_fastpath_enabled()):
        return None
    attn = layer.self_attn
    if (not attn.batch_first or attn.in_proj_bias is None or not attn._qkv_same_embed_dim
            or not layer.activation_relu_or_gelu or layer.norm1.eps != layer.norm2.eps or attn.num_heads % 2
            or torch.is_autocast_enabled()
            or any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules())):
        return None
    args = (src, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
            layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias, layer.linear1.weight,
            layer.linear1.bias, layer.linear2.weight, layer.linear2.bias)
    if torch.overrides.has_torch_function(args) or (torch.is_grad_enabled() and any(t.requires_grad for t in args)):
        return None
    return torch.get_autocast_dtype("cpu")


class TransformerEncoderLayer(NotScriptable, torch.nn.TransformerEncoderLayer):
    r"""A drop-in for :class:`torch.nn.TransformerEncoderLayer` whose ``self_attn`` is seqfast's.

    Constructor: ``(d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=F.relu,
    layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device=None, dtype=None)``;
    parameters and their initialisation are torch's (same values under the same seed).

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)``: ``src`` (S, N, E),
    (N, S, E) when ``batch_first``, or (S, E) unbatched; ``src_mask`` (S, S) or (N * nhead, S, S);
    ``src_key_padding_mask`` (N, S); masks follow torch's MHA convention (bool True = masked out, or float
    added). Returns ``src``'s shape. A nested ``src`` (as ``torch.nn.TransformerEncoder`` builds in eval
    mode with a padding mask) gives a nested result.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        # Re-class torch's freshly built module rather than build another: the random initialisation then
        # consumes the RNG exactly as torch's layer does.
        _swap(self.self_attn, torch.nn.MultiheadAttention, MultiheadAttention)

    def forward(  # type: ignore[override]
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        torch_class = torch_class_chosen(self, src)
        if torch_class is not None:  # converted by seqfast.patch, under torch's math-only flags
            return torch_class.forward(self, src, src_mask, src_key_padding_mask, is_causal)
        if not src.is_nested:
            out = _plain_encoder_layer(self, src, src_mask, src_key_padding_mask, is_causal)
            fused_dtype = _fused_layer_dtype(self, src)
            return out if fused_dtype is None else out.to(fused_dtype)
        if src_mask is not None or src_key_padding_mask is not None:
            raise ArgumentError("a nested src carries its own padding: src_mask and src_key_padding_mask must be None")
        if not self.self_attn.batch_first:
            raise ArgumentError("nested src needs batch_first=True (each component is one sequence (S_i, E))")
        parts = src.unbind()
        lengths = torch.tensor([p.shape[0] for p in parts], device=src.device)
        padded = torch.nested.to_padded_tensor(src, 0.0)  # (N, max S_i, E)
        padding = torch.arange(padded.shape[1], device=src.device)[None, :] >= lengths[:, None]
        out = _plain_encoder_layer(self, padded, None, padding, False)
        return torch.nested.as_nested_tensor([out[i, : p.shape[0]] for i, p in enumerate(parts)])


class TransformerDecoderLayer(NotScriptable, torch.nn.TransformerDecoderLayer):
    r"""A drop-in for :class:`torch.nn.TransformerDecoderLayer` whose ``self_attn`` and ``multihead_attn``
    are seqfast's.

    Constructor: ``(d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=F.relu,
    layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device=None, dtype=None)``;
    parameters and initialisation are torch's. ``forward(tgt, memory, tgt_mask=None, memory_mask=None,
    tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False)``
    is torch's (which has no fused fast path): ``tgt`` (T, N, E) / (N, T, E), ``memory`` (S, N, E) /
    (N, S, E); returns ``tgt``'s shape.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        _swap(self.self_attn, torch.nn.MultiheadAttention, MultiheadAttention)
        _swap(self.multihead_attn, torch.nn.MultiheadAttention, MultiheadAttention)


def _swap(module: torch.nn.Module, old: type, new: type) -> bool:
    """Change ``module``'s class from exactly ``old`` to ``new`` (same state layout); True when it did."""
    if type(module) is not old:
        return False
    module.__class__ = new
    return True


# torch class -> seqfast class. Only the exact torch classes are converted: a user subclass may override
# forward, and re-classing it would silently drop that override.
_TO_SEQFAST: dict[type, type] = {
    torch.nn.MultiheadAttention: MultiheadAttention,
    torch.nn.TransformerEncoderLayer: TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer: TransformerDecoderLayer,
}
_TO_TORCH: dict[type, type] = {new: old for old, new in _TO_SEQFAST.items()}


def replace_attention(module: torch.nn.Module) -> torch.nn.Module:
    """Run every ``torch.nn.MultiheadAttention`` of ``module`` (itself included) on seqfast, in place.

    Each submodule of exactly type ``torch.nn.MultiheadAttention`` becomes a
    :class:`seqfast.nn.MultiheadAttention`, and each ``torch.nn.TransformerEncoderLayer`` /
    ``TransformerDecoderLayer`` the seqfast layer (so that torch's fused encoder fast path cannot bypass the
    attention). The conversion changes the modules' class only: parameters, buffers, hooks and their tensor
    identities are untouched (an optimizer built before keeps working), as is ``state_dict``. Subclasses of
    torch's classes are left alone (their own ``forward`` might differ).

    >>> model = seqfast.nn.replace_attention(model)      # returns the same object
    >>> model = seqfast.nn.restore_attention(model)      # back to torch's classes

    Returns ``module``.
    """
    for m in module.modules():
        new = _TO_SEQFAST.get(type(m))
        if new is not None:
            m.__class__ = new
    return module


def restore_attention(module: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`replace_attention` in place: every seqfast ``MultiheadAttention`` / ``TransformerEncoderLayer``
    / ``TransformerDecoderLayer`` in ``module`` (including ones built directly) becomes torch's class again,
    with the same parameters. Returns ``module``.
    """
    for m in module.modules():
        old = _TO_TORCH.get(type(m))
        if old is not None:
            m.__class__ = old
    return module
