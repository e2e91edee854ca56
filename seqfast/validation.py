"""Argument checks and normalisation for every public function, shared by all backends.

Each ``*_arguments`` function raises ``ValueError`` naming the argument and the offending value,
and returns the canonical tensors the ops take. Checks that need values held on a CUDA device are
gathered into a single device-to-host copy per call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "mean", "sum")

IntLengths = torch.Tensor | Sequence[int] | int


class CTCArguments(NamedTuple):
    log_probs: torch.Tensor  # (T, N, C) contiguous
    targets: torch.Tensor  # (N, S) int64, padded, S = max target length
    input_lengths: torch.Tensor  # (N,) int64 on log_probs' device
    target_lengths: torch.Tensor  # (N,) int64 on log_probs' device
    batched: bool


def _lengths(name: str, value: IntLengths, batched: bool, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
        t = value.to(device=device, dtype=torch.int64)
    else:
        values = [value] if isinstance(value, int) else list(value)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{name} must hold integers, got {value!r}")
        t = torch.tensor(values, dtype=torch.int64, device=device)
    t = t.reshape(-1) if (not batched and t.dim() == 0) or t.dim() == 1 else t
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{name} must have {n} entr{'y' if n == 1 else 'ies'} (one per batch element), got shape "
                         f"{tuple(value.shape) if isinstance(value, torch.Tensor) else len(t)}")
    return t


def reduction_argument(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def ctc_arguments(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: IntLengths,
    target_lengths: IntLengths,
    blank: int,
    name: str = "log_probs",
) -> CTCArguments:
    """Validate torch's ``ctc_loss`` arguments, every form, and bring them to the op's canonical form.

    One host sync on CUDA: lengths and label checks travel in one small tensor.
    """
    if not isinstance(log_probs, torch.Tensor) or log_probs.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor of dtype {FLOAT_DTYPES}, got "
                         f"{getattr(log_probs, 'dtype', type(log_probs))}")
    if log_probs.dim() not in (2, 3):
        raise ValueError(f"{name} must be (T, N, C) or unbatched (T, C), got shape {tuple(log_probs.shape)}")
    batched = log_probs.dim() == 3
    lp = log_probs if batched else log_probs.unsqueeze(1)
    T, N, C = lp.shape
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if not isinstance(blank, int) or not 0 <= blank < C:
        raise ValueError(f"blank must be in [0, {C}) (C = number of classes), got {blank}")
    device = lp.device
    il = _lengths("input_lengths", input_lengths, batched, N, device)
    tl = _lengths("target_lengths", target_lengths, batched, N, device)
    tg = targets.to(device=device, dtype=torch.int64)
    padded = (tg.dim() == 2) if batched else False
    if batched and tg.dim() not in (1, 2):
        raise ValueError(f"targets must be (N, S) padded or 1-D concatenated, got shape {tuple(targets.shape)}")
    if not batched and tg.dim() != 1:
        raise ValueError(f"unbatched targets must be 1-D (S,), got shape {tuple(targets.shape)}")
    if padded and tg.shape[0] != N:
        raise ValueError(f"targets has batch size {tg.shape[0]} but log_probs has {N}")
    if not batched:
        tg, padded = tg.unsqueeze(0), True
    S = tg.shape[1] if padded else tg.shape[0]

    # Label validity where it counts (padding may hold anything), computed on the device.
    if padded:
        counted = torch.arange(S, device=device)[None, :] < tl[:, None]
    else:
        counted = torch.ones_like(tg, dtype=torch.bool)
    bad_label = ((tg < 0) | (tg >= C) | (tg == blank)) & counted
    stats = torch.stack([
        il.min() if N else il.new_zeros(()), il.max() if N else il.new_zeros(()),
        tl.min() if N else tl.new_zeros(()), tl.max() if N else tl.new_zeros(()),
        tl.sum(), bad_label.sum(),
    ]).tolist()  # the one host sync
    il_min, il_max, tl_min, tl_max, tl_sum, n_bad = stats
    if il_min < 0:
        raise ValueError(f"input_lengths must be >= 0, got {il.min().item()} at index {int(il.argmin())}")
    if il_max > T:
        raise ValueError(f"input_lengths must be <= T = {T}, got {il_max} at index {int(il.argmax())}")
    if tl_min < 0:
        raise ValueError(f"target_lengths must be >= 0, got {tl_min} at index {int(tl.argmin())}")
    if padded and tl_max > S:
        raise ValueError(f"target_lengths must be <= S = {S} (targets' padded width), got {tl_max} "
                         f"at index {int(tl.argmax())}")
    if not padded and tl_sum != S:
        raise ValueError(f"sum(target_lengths) = {tl_sum} must equal len(targets) = {S} for concatenated targets")
    if n_bad:
        where = bad_label.nonzero()[0].tolist()
        value = int(tg[tuple(where)])
        raise ValueError(f"targets must hold labels in [0, {C}) other than blank={blank}; got {value} at "
                         f"position {tuple(where) if padded else where[0]}")

    if padded:
        tg = tg[:, :tl_max]
    else:
        starts = torch.cumsum(tl, 0) - tl
        cols = torch.arange(tl_max, device=device)
        valid = cols[None, :] < tl[:, None]
        tg = torch.where(valid, tg[(starts[:, None] + cols[None, :]).clamp_max(max(S - 1, 0))] if S else
                         torch.zeros((N, tl_max), dtype=torch.int64, device=device), blank)
    return CTCArguments(lp.contiguous(), tg.contiguous(), il, tl, batched)


class SDPAArguments(NamedTuple):
    query: torch.Tensor  # (B, Hq, Lq, D), stride 1 on the last dim
    key: torch.Tensor  # (B, Hk, Lk, D)
    value: torch.Tensor  # (B, Hk, Lk, Dv)
    attn_mask: torch.Tensor | None  # (B, Hq, Lq, Lk) view, bool or query's dtype
    scale: float
    out_shape: tuple[int, ...]


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sdpa_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> SDPAArguments:
    """Validate ``scaled_dot_product_attention``'s arguments; fold batch dims into one."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor of dtype {FLOAT_DTYPES}, got "
                             f"{getattr(t, 'dtype', type(t))}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., L, E), got shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, "
                         f"{value.device}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"query, key and value must have the same number of dims, got {query.dim()}, "
                         f"{key.dim()}, {value.dim()}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must share the last dim (E), got {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must share the sequence length, got {key.shape[-2]} and {value.shape[-2]}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal=True cannot both be set (is_causal implies the mask)")
    q4, k4, v4 = (t.reshape(1, 1, *t.shape) if t.dim() == 2 else t for t in (query, key, value))
    batch, Hq, (Hk, Hv) = q4.shape[:-3], q4.shape[-3], (k4.shape[-3], v4.shape[-3])
    if k4.shape[:-3] != batch or v4.shape[:-3] != batch or Hk != Hv:
        raise ValueError(f"query, key and value batch dims must match, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if enable_gqa:
        if Hq % Hk:
            raise ValueError(f"enable_gqa needs query heads ({Hq}) to be a multiple of key/value heads ({Hk})")
    elif Hq != Hk:
        raise ValueError(f"query has {Hq} heads but key/value have {Hk}; pass enable_gqa=True for grouped heads")
    Lq, Lk, D = q4.shape[-2], k4.shape[-2], q4.shape[-1]
    B = math.prod(batch)
    mask = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise ValueError(f"attn_mask must be bool or of query's dtype {query.dtype}, got {attn_mask.dtype}")
        full = (*batch, Hq, Lq, Lk)
        try:
            mask = attn_mask.to(query.device).expand(full).reshape(B, Hq, Lq, Lk)
        except RuntimeError as exc:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {full}") from exc
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q4, k4, v4 = (_last_dim_contiguous(t.reshape(B, t.shape[-3], t.shape[-2], t.shape[-1])) for t in (q4, k4, v4))
    out_shape = (*query.shape[:-1], value.shape[-1])
    return SDPAArguments(q4, k4, v4, mask, scale, out_shape)


class VarlenArguments(NamedTuple):
    query: torch.Tensor  # (total_q, Hq, D)
    key: torch.Tensor  # (total_k, Hk, D)
    value: torch.Tensor  # (total_k, Hk, Dv)
    cu_seqlens_q: torch.Tensor  # (B+1,) int64
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float


def varlen_arguments(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> VarlenArguments:
    """Validate ``varlen_attention``'s arguments (one host sync on CUDA for the prefix sums)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D (total, heads, E) floating tensor, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("q, k and v must share dtype and device")
    if q.shape[2] != k.shape[2] or k.shape[:2] != v.shape[:2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    cus = []
    for name, cu, total, mx in (("cu_seqlens_q", cu_q, q.shape[0], max_q), ("cu_seqlens_k", cu_k, k.shape[0], max_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor")
        c = cu.to(device=q.device, dtype=torch.int64).contiguous()
        host = c.tolist()
        lengths = [b - a for a, b in zip(host, host[1:])]
        if not host or host[0] != 0 or host[-1] != total or min(lengths, default=0) < 0:
            raise ValueError(f"{name} must rise from 0 to {total} (rows of its tensor), got {host}")
        if max(lengths, default=0) > mx:
            raise ValueError(f"{name} has a sequence of {max(lengths)} > the max_seqlen given ({mx})")
        cus.append(c)
    if len(cus[0]) != len(cus[1]):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return VarlenArguments(q, k, v, cus[0], cus[1], int(max_q), int(max_k), scale)
