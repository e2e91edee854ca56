"""FlashAttention-style Triton kernels for the ``seqfast::*attention*`` ops (``seqfast/ops/attention.py``).

Forward: one program per (query tile, query head, batch); the Q tile stays in registers while K/V
tiles stream past it, with an online softmax in base 2 (``scale * log2(e)`` folded into one
multiply) and fp32 accumulators. Only the row log-sum-exp (natural log) is saved.

Backward (FlashAttention-2 split, no atomics, hence bitwise deterministic):
``delta = rowsum(dO * O)``; a dK/dV kernel with one program per (key tile, key/value head, batch)
that walks the query tiles of every query head of its group; a dQ kernel with one program per
(query tile, query head, batch) that walks the key tiles. The float-mask gradient ``dS`` is written
by the dK/dV kernel, which visits every (query, key) pair exactly once.

Dropout draws a Philox number per (b, h, i, j) from the seed and the flat element index
``((b * H + h) * Lq + i) * Lk + j``: the backward regenerates the forward's mask, and
:func:`dropout_keep_mask` materialises it for tests.

Varlen (packed) sequences reuse the same kernels: the batch stride is 0 and each program reads its
sequence's row range from ``cu_seqlens``.

Decoding (at most 16 query rows, at least 1024 keys, no dropout, and batch x key/value heads too few to fill
the GPU) takes a split-KV forward instead, as FlashDecoding: the key range is split across programs, each
leaving fp32 partials (row max, row sum, unnormalised output), and a combine kernel merges them into the same
out and lse; the backward is the same. See ``_decode_launch``.

Grids are (tiles, heads, batch). CUDA caps grid y and z at 65535, so the launchers split a larger batch (or
sequence count) into launches over batch slices (``cu_seqlens`` slices when packed); ``drop_base`` carries
the slice's first dropout element index, so every slice draws the mask of the whole.

Launchers take the op schemas exactly (float16 / bfloat16 / float32; float64 is refused, the
reference and C++ backends serve it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# The op's output layout (seqfast/ops/attention.py), which the fake and the reference allocate with too; the kernels
# write its rows by strides.
from seqfast.reference.attention import fused_gradients, gradient_like, output_like

try:
    from . import autotune as _autotune
except ImportError:  # loaded as a lone file (benchmarks/kernel_report.py --module kernels/attention.py)
    _autotune = None

LOG2E = 1.4426950408889634
_NO_CAUSAL, _TOP_LEFT, _BOTTOM_RIGHT = 0, 1, 2
_MASK_NONE, _MASK_BOOL, _MASK_FLOAT = 0, 1, 2
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _dropout_keep(Seed, offsets, dropout_p):
    # One uniform per element from its global index: forward, backward and dropout_keep_mask agree. The seed
    # is read from device memory (a one-element int64 tensor): drawn on the GPU, it never visits the host,
    # and a CUDA graph replays with whatever the tensor holds.
    return tl.rand(tl.load(Seed), offsets) >= dropout_p


@triton.jit
def _sequence(Cu, b, L, VARLEN: tl.constexpr):
    """(first row as int64, length as int32) of sequence ``b``: from cu_seqlens, or (0, L) when dense."""
    if VARLEN:
        start = tl.load(Cu + b).to(tl.int64)
        length = (tl.load(Cu + b + 1).to(tl.int64) - start).to(tl.int32)
    else:
        start = tl.zeros([], dtype=tl.int64)
        length = L
    return start, length


@triton.jit
def _scores(prod, rows, cols, row_ok, col_ok, shift, qk_scale, mask_blk, mask_offs,
            CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Masked scores in log2 units, ``(prod * scale + mask) * log2(e)``, -inf where hidden; and the visibility.

    ``prod`` (rows, cols) fp32 is ``q k^T`` (queries x keys), or ``k q^T`` (keys x queries) when ``TRANSPOSED``.
    Query i sees key j iff ``j <= i + shift`` under a causal mode; ``mask_blk + mask_offs`` address a
    (queries, keys) tile. A bool mask is added as 0 / -inf, as torch does, so a NaN or +inf score behind a
    False still makes its row NaN; the visibility covers only the bounds and the causal mode.
    """
    s = prod * qk_scale
    visible = row_ok[:, None] & col_ok[None, :]
    if CAUSAL != 0:
        if TRANSPOSED:
            visible = visible & (rows[:, None] <= cols[None, :] + shift)
        else:
            visible = visible & (cols[None, :] <= rows[:, None] + shift)
    if MASK_KIND != 0:
        # The mask tile is always read (queries, keys), contiguous along keys, and transposed in registers:
        # a strided transposed read would cost one address per element.
        if TRANSPOSED:
            m = tl.trans(tl.load(mask_blk + mask_offs, mask=col_ok[:, None] & row_ok[None, :], other=0))
        else:
            m = tl.load(mask_blk + mask_offs, mask=visible, other=0)
        if MASK_KIND == 1:
            s += tl.where(m != 0, 0.0, float("-inf"))
        else:
            s += m.to(tl.float32) * 1.4426950408889634
    return tl.where(visible, s, float("-inf")), visible


@triton.jit
def _dot_nt_chunked(A, a_offs, a_ok, B, b_offs, b_ok, E: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                    BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """``A[rows, :E] @ B[cols, :E]^T`` as fp32 (ROWS, COLS), contracting CHUNK columns at a time.

    Row r of A starts at ``A + a_offs[r]`` (contiguous along E), likewise B. Both operands are (re)read
    from memory chunk by chunk: a full-precision fp32 dot runs on FMA units, where each thread holds its
    rows and columns over the whole contraction, so a 256-wide one alone fills the register file.
    """
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    arange_e = tl.arange(0, CHUNK)
    for e0 in range(0, BLOCK_E, CHUNK):
        offs_e = e0 + arange_e
        e_ok = offs_e < E
        a = tl.load(A + (a_offs[:, None] + offs_e[None, :]), mask=a_ok[:, None] & e_ok[None, :], other=0.0)
        b = tl.load(B + (b_offs[:, None] + offs_e[None, :]), mask=b_ok[:, None] & e_ok[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return acc


# Loops carry scalar block pointers only; the (tile) offsets are loop-invariant int32, so no tensor of
# 64-bit pointers lives across iterations (that alone made the dK/dV kernel spill).


@triton.jit
def _attn_fwd(
    Q, K, V, Mask, Out, Lse, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh, stride_lm,
    H, GROUP, Lq, Lk,
    qk_scale, dropout_p, inv_keep, Seed, drop_base,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    if CAUSAL != 0:
        # Causal tiles near the bottom carry the most keys: launch them first.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q = _sequence(CuQ, b, Lq, VARLEN)
    k_start, seqlen_k = _sequence(CuK, b, Lk, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64)

    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q = tl.load(Q + (b64 * stride_qb + h64 * stride_qh + (q_start + m0) * stride_qm)
                + (rows[:, None] * stride_qm + offs_d[None, :]), mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_blk = K + (b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn)
    v_blk = V + (b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn)
    k_offs = arange_n[:, None] * stride_kn + offs_d[None, :]
    v_offs = arange_n[:, None] * stride_vn + offs_dv[None, :]
    mask_blk = Mask + (b64 * stride_mb + h64 * stride_mh + m0.to(tl.int64) * stride_mm)
    mask_offs = rows[:, None] * stride_mm + arange_n[None, :] * stride_mn
    drop_blk = ((b64 * H + h64) * Lq + m0) * Lk + drop_base
    drop_offs = rows[:, None] * Lk + arange_n[None, :]

    shift = 0
    hi = seqlen_k
    if CAUSAL != 0:
        if CAUSAL == 2:
            shift = seqlen_k - seqlen_q
        # Key tiles wholly right of the diagonal are never loaded.
        hi = tl.minimum(seqlen_k, m0 + BLOCK_M + shift)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + arange_n
        col_ok = offs_n < seqlen_k
        k = tl.load(k_blk + k_offs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s, visible = _scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), offs_m, offs_n, row_ok, col_ok,
                             shift, qk_scale, mask_blk, mask_offs, CAUSAL, MASK_KIND, False)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps max -inf: subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(Seed, drop_blk + drop_offs, dropout_p)
            p = tl.where(keep, p * inv_keep, 0.0)
        v = tl.load(v_blk + v_offs, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        k_blk += BLOCK_N * stride_kn
        v_blk += BLOCK_N * stride_vn
        mask_blk += BLOCK_N * stride_mn
        drop_blk += BLOCK_N

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_blk = Out + (b64 * stride_ob + h64 * stride_oh + (q_start + m0) * stride_om)
    tl.store(o_blk + (rows[:, None] * stride_om + offs_dv[None, :]), out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])
    l_blk = Lse + (b64 * stride_lb + h64 * stride_lh + (q_start + m0) * stride_lm)
    tl.store(l_blk + rows * stride_lm, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess(
    Out, DO, Delta, CuQ,
    stride_ob, stride_oh, stride_om,
    stride_gb, stride_gh, stride_gm,
    stride_lb, stride_lh, stride_lm,
    Lq,
    DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, VARLEN: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, laid out like lse."""
    pid_m = tl.program_id(0)
    h64 = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    q_start, seqlen_q = _sequence(CuQ, b, Lq, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = (m0 + rows) < seqlen_q
    ok = row_ok[:, None] & (offs_dv < DV)[None, :]
    o = tl.load(Out + (b64 * stride_ob + h64 * stride_oh + (q_start + m0) * stride_om)
                + (rows[:, None] * stride_om + offs_dv[None, :]), mask=ok, other=0.0)
    do = tl.load(DO + (b64 * stride_gb + h64 * stride_gh + (q_start + m0) * stride_gm)
                 + (rows[:, None] * stride_gm + offs_dv[None, :]), mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + (b64 * stride_lb + h64 * stride_lh + (q_start + m0) * stride_lm) + rows * stride_lm,
             delta, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Mask, DO, Lse, Delta, DK, DV_, DMask, DQ, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dmb, stride_dmh, stride_dmm,
    stride_dqb, stride_dqh, stride_dqm,
    H, GROUP, Lq, Lk,
    sm_scale, qk_scale, dropout_p, inv_keep, Seed, drop_base,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_GRAD: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr, D_CHUNK: tl.constexpr, DV_CHUNK: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    """dK, dV for one key tile of one key/value head; loops over the group's query heads and query tiles.

    ``ATOMIC_DQ``: also adds this key tile's share of dQ, ``scale * ds k``, to the zeroed fp32 (like Q) buffer
    ``DQ`` with atomics (the order of the additions varies from run to run, so dQ's rounding does too).

    ``D_CHUNK < BLOCK_D`` (``DV_CHUNK < BLOCK_DV``): K k q^T (V v dO^T) is contracted chunk by chunk from
    memory instead of from a resident K (V) tile (see ``_dot_nt_chunked``).
    """
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q = _sequence(CuQ, b, Lq, VARLEN)
    k_start, seqlen_k = _sequence(CuK, b, Lk, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    offs_n = n0 + cols
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_m = tl.arange(0, BLOCK_M)
    col_ok = offs_n < seqlen_k
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    k_tile = K + (b64 * stride_kb + hk64 * stride_kh + (k_start + n0) * stride_kn)
    v_tile = V + (b64 * stride_vb + hk64 * stride_vh + (k_start + n0) * stride_vn)
    if D_CHUNK == BLOCK_D:
        k = tl.load(k_tile + (cols[:, None] * stride_kn + offs_d[None, :]), mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
    if DV_CHUNK == BLOCK_DV:
        v = tl.load(v_tile + (cols[:, None] * stride_vn + offs_dv[None, :]), mask=col_ok[:, None] & dv_ok[None, :],
                    other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    shift = 0
    lo = 0
    if CAUSAL != 0:
        if CAUSAL == 2:
            shift = seqlen_k - seqlen_q
        # Query i sees key j iff j <= i + shift: rows above n0 - shift see none of this tile.
        lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
    lo64 = q_start * 0 + lo

    q_offs = arange_m[:, None] * stride_qm + offs_d[None, :]
    do_offs = arange_m[:, None] * stride_gm + offs_dv[None, :]
    # Score tiles are (keys, queries), so dK / dV accumulate without transposes; mask tiles stay (queries, keys).
    mask_offs = arange_m[:, None] * stride_mm + cols[None, :] * stride_mn
    dmask_offs = arange_m[:, None] * stride_dmm + cols[None, :]
    drop_offs = arange_m[None, :] * Lk + cols[:, None]
    # dQ^T = K^T dS^T: the head dim is the product's M (wgmma needs M in 64-row slabs; the query tile is small).
    dq_offs = offs_d[:, None] + arange_m[None, :] * stride_dqm
    for g in range(0, GROUP):
        h64 = hk64 * GROUP + g
        q_blk = Q + (b64 * stride_qb + h64 * stride_qh + (q_start + lo64) * stride_qm)
        do_blk = DO + (b64 * stride_gb + h64 * stride_gh + (q_start + lo64) * stride_gm)
        l_off = b64 * stride_lb + h64 * stride_lh + (q_start + lo64) * stride_lm
        mask_blk = Mask + (b64 * stride_mb + h64 * stride_mh + lo64 * stride_mm + n0 * stride_mn)
        dmask_blk = DMask + (b64 * stride_dmb + h64 * stride_dmh + lo64 * stride_dmm + n0)
        drop_blk = ((b64 * H + h64) * Lq + lo64) * Lk + n0 + drop_base
        dq_blk = DQ + (b64 * stride_dqb + h64 * stride_dqh + (q_start + lo64) * stride_dqm)
        for m0 in range(lo, seqlen_q, BLOCK_M):
            offs_m = m0 + arange_m
            row_ok = offs_m < seqlen_q
            q = tl.load(q_blk + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            # lse = +inf for rows that see nothing (and padding rows): their probabilities are 0.
            lse2 = tl.load(Lse + l_off + arange_m * stride_lm, mask=row_ok, other=float("inf")) * 1.4426950408889634
            if D_CHUNK == BLOCK_D:
                kqT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
            else:
                kqT = _dot_nt_chunked(k_tile, cols * stride_kn, col_ok, q_blk, arange_m * stride_qm, row_ok,
                                      D, BLOCK_N, BLOCK_M, BLOCK_D, D_CHUNK, PRECISION)
            sT, visible = _scores(kqT, offs_n, offs_m, col_ok, row_ok, shift, qk_scale, mask_blk, mask_offs,
                                  CAUSAL, MASK_KIND, True)
            pT = tl.where(visible, tl.math.exp2(sT - lse2[None, :]), 0.0)
            do = tl.load(do_blk + do_offs, mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
            if DV_CHUNK == BLOCK_DV:
                dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            else:
                dpT = _dot_nt_chunked(v_tile, cols * stride_vn, col_ok, do_blk, arange_m * stride_gm, row_ok,
                                      DV, BLOCK_N, BLOCK_M, BLOCK_DV, DV_CHUNK, PRECISION)
            if DROPOUT:
                keep = _dropout_keep(Seed, drop_blk + drop_offs, dropout_p)
                dv += tl.dot(tl.where(keep, pT * inv_keep, 0.0).to(do.dtype), do, input_precision=PRECISION)
                dpT = tl.where(keep, dpT * inv_keep, 0.0)
            else:
                dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            delta = tl.load(Delta + l_off + arange_m * stride_lm, mask=row_ok, other=0.0)
            dsT = pT * (dpT - delta[None, :])
            if MASK_GRAD:
                tl.store(dmask_blk + dmask_offs, tl.trans(dsT).to(DMask.dtype.element_ty),
                         mask=row_ok[:, None] & col_ok[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
            if ATOMIC_DQ:
                ds = dsT.to(q.dtype)
                if D_CHUNK == BLOCK_D:
                    dqT = tl.dot(tl.trans(k), ds, input_precision=PRECISION) * sm_scale
                    tl.atomic_add(dq_blk + dq_offs, dqT, mask=d_ok[:, None] & row_ok[None, :], sem="relaxed")
                else:
                    # K is not resident: its columns are re-read chunk by chunk, like the chunked dots'. (64-column
                    # chunks would make this product wgmma-sized on sm_90, but spill 4-12 B at width 128.)
                    for e0 in range(0, BLOCK_D, D_CHUNK):
                        offs_e = e0 + tl.arange(0, D_CHUNK)
                        e_ok = offs_e < D
                        k_e = tl.load(k_tile + (cols[:, None] * stride_kn + offs_e[None, :]),
                                      mask=col_ok[:, None] & e_ok[None, :], other=0.0)
                        dqT = tl.dot(tl.trans(k_e), ds, input_precision=PRECISION) * sm_scale
                        tl.atomic_add(dq_blk + (offs_e[:, None] + arange_m[None, :] * stride_dqm), dqT,
                                      mask=e_ok[:, None] & row_ok[None, :], sem="relaxed")
                dq_blk += BLOCK_M * stride_dqm
            q_blk += BLOCK_M * stride_qm
            do_blk += BLOCK_M * stride_gm
            l_off += BLOCK_M * stride_lm
            mask_blk += BLOCK_M * stride_mm
            dmask_blk += BLOCK_M * stride_dmm
            drop_blk += BLOCK_M * Lk

    dk *= sm_scale
    tl.store(DK + (b64 * stride_dkb + hk64 * stride_dkh + (k_start + n0) * stride_dkn)
             + (cols[:, None] * stride_dkn + offs_d[None, :]), dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV_ + (b64 * stride_dvb + hk64 * stride_dvh + (k_start + n0) * stride_dvn)
             + (cols[:, None] * stride_dvn + offs_dv[None, :]), dv.to(DV_.dtype.element_ty),
             mask=col_ok[:, None] & dv_ok[None, :])


@triton.jit
def _attn_bwd_dq(
    Q, K, V, Mask, DO, Lse, Delta, DQ, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm,
    H, GROUP, Lq, Lk,
    sm_scale, qk_scale, dropout_p, inv_keep, Seed, drop_base,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, D_CHUNK: tl.constexpr, DV_CHUNK: tl.constexpr,
):
    """dQ for one query tile of one query head; loops over the visible key tiles.

    ``D_CHUNK < BLOCK_D`` (``DV_CHUNK < BLOCK_DV``): q k^T (dO v^T) is contracted chunk by chunk from
    memory instead of from a resident Q (dO) tile (see ``_dot_nt_chunked``).
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q = _sequence(CuQ, b, Lq, VARLEN)
    k_start, seqlen_k = _sequence(CuK, b, Lk, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q_tile = Q + (b64 * stride_qb + h64 * stride_qh + (q_start + m0) * stride_qm)
    do_tile = DO + (b64 * stride_gb + h64 * stride_gh + (q_start + m0) * stride_gm)
    if D_CHUNK == BLOCK_D:
        q = tl.load(q_tile + (rows[:, None] * stride_qm + offs_d[None, :]), mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)
    if DV_CHUNK == BLOCK_DV:
        do = tl.load(do_tile + (rows[:, None] * stride_gm + offs_dv[None, :]),
                     mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    l_off = b64 * stride_lb + h64 * stride_lh + (q_start + m0) * stride_lm
    lse2 = tl.load(Lse + l_off + rows * stride_lm, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + l_off + rows * stride_lm, mask=row_ok, other=0.0)

    k_blk = K + (b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn)
    v_blk = V + (b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn)
    k_offs = arange_n[:, None] * stride_kn + offs_d[None, :]
    v_offs = arange_n[:, None] * stride_vn + offs_dv[None, :]
    mask_blk = Mask + (b64 * stride_mb + h64 * stride_mh + m0.to(tl.int64) * stride_mm)
    mask_offs = rows[:, None] * stride_mm + arange_n[None, :] * stride_mn
    drop_blk = ((b64 * H + h64) * Lq + m0) * Lk + drop_base
    drop_offs = rows[:, None] * Lk + arange_n[None, :]

    shift = 0
    hi = seqlen_k
    if CAUSAL != 0:
        if CAUSAL == 2:
            shift = seqlen_k - seqlen_q
        hi = tl.minimum(seqlen_k, m0 + BLOCK_M + shift)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + arange_n
        col_ok = offs_n < seqlen_k
        k = tl.load(k_blk + k_offs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if D_CHUNK == BLOCK_D:
            qkT = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            qkT = _dot_nt_chunked(q_tile, rows * stride_qm, row_ok, k_blk, arange_n * stride_kn, col_ok,
                                  D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNK, PRECISION)
        s, visible = _scores(qkT, offs_m, offs_n, row_ok, col_ok, shift, qk_scale, mask_blk, mask_offs,
                             CAUSAL, MASK_KIND, False)
        p = tl.where(visible, tl.math.exp2(s - lse2[:, None]), 0.0)
        if DV_CHUNK == BLOCK_DV:
            v = tl.load(v_blk + v_offs, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        else:
            dp = _dot_nt_chunked(do_tile, rows * stride_gm, row_ok, v_blk, arange_n * stride_vn, col_ok,
                                 DV, BLOCK_M, BLOCK_N, BLOCK_DV, DV_CHUNK, PRECISION)
        if DROPOUT:
            keep = _dropout_keep(Seed, drop_blk + drop_offs, dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        k_blk += BLOCK_N * stride_kn
        v_blk += BLOCK_N * stride_vn
        mask_blk += BLOCK_N * stride_mn
        drop_blk += BLOCK_N

    dq *= sm_scale
    tl.store(DQ + (b64 * stride_dqb + h64 * stride_dqh + (q_start + m0) * stride_dqm)
             + (rows[:, None] * stride_dqm + offs_d[None, :]), dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _dropout_mask_kernel(Keep, Seed, dropout_p, total, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = _dropout_keep(Seed, offs, dropout_p)
    tl.store(Keep + offs, keep.to(tl.int8), mask=offs < total)


# Split-KV decode forward (few query rows, many keys). One program per (key range, key/value head, batch):
# the rows of its tile are (query head of the group, query row) pairs, so K and V stream through once per
# key/value head however many query heads share them. Each program leaves its range's row max, row sum and
# unnormalised output (fp32); _attn_fwd_combine rescales them to the common max and normalises.


@triton.jit
def _attn_fwd_split(
    Q, K, V, Mask, PartO, PartML,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, GROUP, Lq, Lk, n_rows, blocks_per_split, qk_scale,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partials of key range ``split`` for every (query head of the group, query row): PartO (rows, S, DV),
    PartML (2, rows, S) = (max, sum) in log2 units, rows numbered ``(b * H + h) * Lq + i`` over the launch."""
    split = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    S = tl.num_programs(0)
    b64 = b.to(tl.int64)
    slot = tl.arange(0, BLOCK_M)
    row_ok = slot < GROUP * Lq
    g = slot // Lq
    i = slot % Lq  # query row of each tile row
    h64 = hk.to(tl.int64) * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    arange_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q = tl.load(Q + b64 * stride_qb + (h64 * stride_qh + i * stride_qm)[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    shift = 0
    hi = Lk
    if CAUSAL != 0:
        if CAUSAL == 2:
            shift = Lk - Lq
        hi = tl.minimum(Lk, Lq + shift)  # the last row's last visible key, plus one
    n_lo = split * blocks_per_split * BLOCK_N
    n_hi = tl.minimum(hi, n_lo + blocks_per_split * BLOCK_N)
    k_blk = K + (b64 * stride_kb + hk.to(tl.int64) * stride_kh + n_lo.to(tl.int64) * stride_kn)
    v_blk = V + (b64 * stride_vb + hk.to(tl.int64) * stride_vh + n_lo.to(tl.int64) * stride_vn)
    k_offs = arange_n[:, None] * stride_kn + offs_d[None, :]
    v_offs = arange_n[:, None] * stride_vn + offs_dv[None, :]
    # Mask rows differ in head and row: a column of row pointers, each tile adds the key offsets.
    mask_blk = (Mask + b64 * stride_mb + (h64 * stride_mh + i * stride_mm + n_lo.to(tl.int64) * stride_mn))[:, None]
    mask_offs = arange_n[None, :] * stride_mn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + arange_n
        col_ok = offs_n < Lk
        k = tl.load(k_blk + k_offs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s, _ = _scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), i, offs_n, row_ok, col_ok, shift,
                       qk_scale, mask_blk, mask_offs, CAUSAL, MASK_KIND, False)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: exp2 gives 0, not NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_blk + v_offs, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        k_blk += BLOCK_N * stride_kn
        v_blk += BLOCK_N * stride_vn
        mask_blk += BLOCK_N * stride_mn

    row64 = (b64 * H + h64) * Lq + i
    tl.store(PartO + (row64 * S + split)[:, None] * DV + offs_dv[None, :], acc,
             mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(PartML + row64 * S + split, m_i, mask=row_ok)
    tl.store(PartML + (n_rows + row64) * S + split, l_i, mask=row_ok)


@triton.jit
def _attn_fwd_combine(
    PartO, PartML, Out, Lse,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh, stride_lm,
    H, Lq, S, n_rows,
    DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One output row from its S partials: out = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), lse in
    natural log (+inf, output 0, where no key is visible)."""
    r = tl.program_id(0).to(tl.int64)
    i = r % Lq
    h = (r // Lq) % H
    b = r // (Lq * H)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < S
    dv_ok = offs_dv < DV
    m = tl.load(PartML + r * S + offs_s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(PartML + (n_rows + r) * S + offs_s, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    l_sum = tl.sum(l_s * w, 0)
    o = tl.load(PartO + (r * S + offs_s)[:, None] * DV + offs_dv[None, :], mask=s_ok[:, None] & dv_ok[None, :],
                other=0.0)
    acc = tl.sum(o * w[:, None], 0)
    empty = l_sum == 0.0
    l_safe = tl.where(empty, 1.0, l_sum)
    tl.store(Out + b * stride_ob + h * stride_oh + i * stride_om + offs_dv, (acc / l_safe).to(Out.dtype.element_ty),
             mask=dv_ok)
    tl.store(Lse + b * stride_lb + h * stride_lh + i * stride_lm,
             tl.where(empty, float("inf"), (m_max + tl.math.log2(l_safe)) * 0.6931471805599453))


# --------------------------------------------------------------------------------------------- configs

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, head-dim tile width (power of two >= 16,
# the larger of q/k's and v's) and element size. Sized for sm_80's 164 KB of shared memory (sm_90
# has more) and for zero register spills, checked by compiling every entry (benchmarks/NOTES.md).
_CONFIGS: dict[str, dict[tuple[int, int], tuple[int, int, int, int]]] = {
    "fwd": {
        (64, 2): (128, 64, 8, 3), (128, 2): (64, 64, 8, 3), (256, 2): (64, 16, 8, 2),
        (64, 4): (64, 32, 8, 3), (128, 4): (32, 32, 8, 2), (256, 4): (32, 16, 8, 2),
    },
    "dkdv": {
        (64, 2): (32, 32, 4, 2), (128, 2): (16, 32, 8, 2), (256, 2): (16, 32, 8, 1),
        (64, 4): (16, 32, 8, 2), (128, 4): (16, 32, 8, 1), (256, 4): (16, 32, 8, 1),
    },
    "dq": {
        (64, 2): (128, 32, 8, 2), (128, 2): (64, 16, 8, 2), (256, 2): (32, 32, 8, 1),
        (64, 4): (32, 32, 4, 2), (128, 4): (32, 32, 8, 1), (256, 4): (16, 32, 8, 1),
    },
}


def _preprocess_block_m(block_dv: int) -> int:
    # O and dO tiles of BLOCK_M x BLOCK_DV each, fp32 after the cast: 8K elements over 8 warps at most.
    return min(64, 8192 // block_dv)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# sm_90 (Hopper), fp16 / bf16 at head dims <= 128: (BLOCK_M, BLOCK_N, num_warps, num_stages, chunk) per kernel,
# head-dim tile width and variant (see _variant; "dense" serves every variant without an entry of its own).
# wgmma (HGMMA) takes 64-row slabs per warpgroup of 4 warps: the M of every product must be a multiple of 64
# -- the query tile in fwd / dQ, the key tile in dK/dV (k q^T, p^T dO, ds^T q), and the head dim for the
# atomic dQ term (k^T ds^T). A smaller M compiles to sm_80's HMMA. Each entry compiles with 0 spills (the
# kernel report checks them); chunk < width contracts S^T and dP^T from memory chunk by chunk (the masked
# dK/dV with a mask gradient at width 128 spills 16-24 B with resident K and V tiles). The tile that stays put
# (queries in fwd / dQ, keys in dK/dV) sets how often the streamed ones are re-read from L2: 128 rows wherever
# that compiles without spills. fp32 and the 256-wide bucket use the sm_80 table.
_CONFIGS_SM90: dict[str, dict[tuple[int, str], tuple[int, int, int, int, int]]] = {
    "fwd": {
        (64, "dense"): (128, 64, 8, 3, 64), (64, "mask"): (64, 32, 4, 3, 64), (64, "dropout"): (64, 32, 4, 3, 64),
        (128, "dense"): (128, 64, 8, 3, 128), (128, "mask"): (64, 32, 8, 3, 128),
        (128, "dropout"): (64, 32, 8, 3, 128),
        # Packed sequences (varlen, with or without causal): m128n64 spilled 112 B under triton 3.6 (0 under 3.9);
        # 32-key steps keep the 128-row query tile (K / V re-read as often as dense), 254 registers, 0 spill.
        (128, "varlen"): (128, 32, 8, 3, 128),
    },
    "dkdv": {
        # Dense tiles that also compile without spills under triton 3.6 (the GPU machine's): 3.9 took m64n128 at
        # D=64 and whole-width contractions at D=128, which 3.6 spills (772 B and 24 B; benchmarks/NOTES.md).
        # Masks and dropout at D=64 take 16-row query steps: m32n64 spilled 8-668 B there under 3.6.
        (64, "dense"): (32, 64, 8, 2, 64), (64, "mask"): (16, 64, 8, 2, 64), (64, "mask_grad"): (16, 64, 8, 2, 64),
        (64, "dropout"): (16, 64, 8, 2, 64),
        (128, "dense"): (16, 64, 8, 2, 32), (128, "mask"): (16, 64, 8, 2, 32), (128, "mask_grad"): (16, 64, 8, 2, 32),
        (128, "dropout"): (16, 64, 8, 2, 32),  # 64-column chunks spilled 12 B once the seed became a pointer
    },
    "dq": {  # sm_80's tiles, without halving the query tile for masks: 113-205 registers in every variant
        (64, "dense"): (128, 32, 8, 2, 64), (128, "dense"): (64, 16, 8, 2, 128),
    },
    # D=64: m32n64 spilled 8-756 B under triton 3.6; 16-row steps with 32-column chunks do not (a float mask's
    # gradient needs 16-column chunks: 4 B spilled under 3.9 at 32).
    "dkdv_atomic": {
        (64, "dense"): (16, 64, 8, 2, 32), (64, "mask_grad"): (16, 64, 8, 2, 16), (128, "dense"): (16, 64, 8, 2, 32),
    },
}

# Launch names forced_config and CONFIG_SPACE know; "dkdv_atomic" is _attn_bwd_dkdv with ATOMIC_DQ (one backward
# kernel adding dQ with atomics, SEQFAST_ATTENTION_BWD=atomic).
_KERNELS = ("fwd", "dkdv", "dq", "dkdv_atomic", "decode")

# Candidates for tuning sweeps on hardware (forced_config): each compiles with 0 spills and to wgmma on sm_90 for
# fp16 at head dims 64 and 128 in the dense variant (bf16 gave the same registers wherever both were compiled);
# masked / dropout variants can need the smaller ones. "chunk": see _Launch.
CONFIG_SPACE: dict[str, list[dict]] = {
    "fwd": [
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
    ],
    "dkdv": [
        {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "chunk": 64},
        {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "chunk": 32},
    ],
    "dq": [
        {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    ],
    "dkdv_atomic": [
        {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "chunk": 32},
    ],
}

_FORCED: dict[str, dict] = {}


@contextlib.contextmanager
def forced_config(kernel: str, config: dict) -> Iterator[None]:
    """Every launch of ``kernel`` ("fwd", "dkdv", "dq", "dkdv_atomic", "decode") inside the block uses ``config``.

    ``config`` holds BLOCK_M, BLOCK_N, num_warps, num_stages, and optionally maxnreg and chunk (head-dim
    columns per step of the chunked S / dP contraction; default: the whole head dim, or the launcher's choice
    where it needs chunks); for "decode", BLOCK_N, SPLITS (0: from the SM count), num_warps, num_stages. Tiles
    are still clipped to short sequences. Nesting restores the outer choice.
    """
    if kernel not in _KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {', '.join(_KERNELS)}")
    needed = ("BLOCK_N", "SPLITS") if kernel == "decode" else ("BLOCK_M", "BLOCK_N")
    missing = [k for k in (*needed, "num_warps", "num_stages") if k not in config]
    if missing:
        raise ValueError(f"config for {kernel!r} lacks {missing}: {config!r}")
    had, previous = kernel in _FORCED, _FORCED.get(kernel)
    _FORCED[kernel] = dict(config)
    try:
        yield
    finally:
        if had:
            _FORCED[kernel] = previous
        else:
            del _FORCED[kernel]


@functools.cache
def _cuda_arch(index: int) -> int:
    major, _ = torch.cuda.get_device_capability(index)
    return 90 if major == 9 else 80


def _arch(device: torch.device) -> int:
    """Which config table a launch on ``device`` takes: 90 on Hopper, 80 elsewhere (interpreter included)."""
    if device.type != "cuda":
        return 80
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def _variant(causal: bool, masked: bool, mask_grad: bool, dropout: bool) -> str:
    """The config key of a launch's constexpr variant, the costliest first (dropout runs Philox per element)."""
    if dropout:
        return "dropout"
    if mask_grad:
        return "mask_grad"
    if masked:
        return "mask"
    return "causal" if causal else "dense"


class _Launch(NamedTuple):
    block_m: int
    block_n: int
    warps: int
    stages: int
    maxnreg: int | None  # the PTX .maxnreg cap passed to ptxas (None: its default)
    chunk: int  # head-dim columns contracted per step in the backward's chunked dots (see _dot_nt_chunked)


def _config(
    kernel: str, block_d: int, dtype: torch.dtype, max_lq: int, max_lk: int, masked: bool = False,
    dropout: bool = False, causal: bool = False, mask_grad: bool = False, arch: int = 80, varlen: bool = False,
) -> _Launch:
    """Tile sizes, warps, stages, register cap and head-dim chunk of a launch on ``arch`` (80 or 90); ``varlen``:
    packed sequences (only the sm_90 table has entries of their own: "varlen", for launches without a mask or
    dropout)."""
    width = max(64, block_d)
    variant = _variant(causal, masked, mask_grad and masked, dropout)
    sm90 = _CONFIGS_SM90[kernel] if arch == 90 and dtype != torch.float32 and width <= 128 else None
    if kernel in _FORCED:
        return _launch_of_config(_FORCED[kernel], width, dtype, max_lq, max_lk)
    if sm90 is not None:
        fallback = "mask" if variant == "mask_grad" and (width, "mask") in sm90 else "dense"
        if varlen and variant in ("dense", "causal") and (width, "varlen") in sm90:
            variant = "varlen"
        block_m, block_n, warps, stages, chunk = sm90.get((width, variant), sm90.get((width, fallback)))
        return _Launch(min(block_m, _pow2(max_lq)), min(block_n, _pow2(max_lk)), warps, stages, None, chunk)
    block_m, block_n, warps, stages = _CONFIGS["dkdv" if kernel == "dkdv_atomic" else kernel][
        (width, 4 if dtype == torch.float32 else 2)]
    # A mask tile is a gather (any strides, zero included): one address per element; dropout runs Philox
    # per element. Both need registers beside the score tile, so those launches take smaller tiles.
    if kernel == "fwd" and (masked or dropout):
        block_m, block_n = max(16, block_m // 2), max(16, block_n // 2)
    elif kernel == "fwd" and width == 256 and dtype != torch.float32 and arch == 80:
        # 16-bit at width 256 on sm_80: 64-row query tiles spilled 20-64 B under triton 3.6 (255 registers; 0 under
        # 3.9, and sm_90's wgmma layout fits in 254), 32-row ones take 194 registers, 0 spill.
        block_m = max(16, block_m // 2)
    elif kernel == "dq" and masked:
        block_m = max(16, block_m // 2)
    elif kernel in ("dkdv", "dkdv_atomic") and masked and width == 256:
        block_n = max(16, block_n // 2)
    elif kernel == "dkdv" and width == 256 and dtype != torch.float32 and (dropout and arch == 80 or varlen):
        # 16-bit at width 256: 32-row key tiles spilled 56 B with dropout on sm_80 and 64 B for packed sequences on
        # sm_90 under triton 3.6; 16 rows take 170-191 registers, 0 spill (dropout on sm_90 keeps 32 rows: 16
        # rows there stop at 128 registers and spill 8 B).
        block_n = max(16, block_n // 2)
    elif kernel == "dkdv" and width == 256 and dtype == torch.float32 and arch == 80 and _precision(dtype) == "tf32":
        # tf32 at width 256 on sm_80: 32-row key tiles spilled 48-56 B under triton 3.6 (255 registers); 16 rows
        # take 160-166 registers (159-249 under 3.9), 0 spill. (On sm_90 16 rows stop at 128 registers and spill:
        # see the chunk below.)
        block_n = max(16, block_n // 2)
    if kernel == "fwd" and width == 256 and dtype == torch.float32 and varlen and arch == 80:
        # tf32 packed sequences at width 256 on sm_80: 2 stages spilled 20 B under triton 3.6 (255 registers); one
        # stage keeps the 32-row query tile (216 registers, 0 spill) where 16 rows would re-read K / V twice.
        stages = 1
    chunk = width
    if kernel == "dkdv_atomic":
        # The atomic dQ product needs registers beside dK/dV's: with sm_80's dK/dV tiles it spilled 8-48 B (16-bit
        # types) and 40-160 B (tf32 at width 128 on sm_80; on sm_90 resident tiles fit and chunks spill). 8 warps
        # and S, dP contracted 32 columns at a time fit (tf32: with 16-row key tiles; 32 rows still spilled 28 B
        # for varlen). (The 256-wide bucket still spilled 48-800 B: the launcher runs the deterministic backward
        # there.)
        warps = max(warps, 8)
        if dtype != torch.float32:
            chunk = 32
        elif width == 128 and _precision(dtype) == "tf32" and arch == 80:
            chunk, block_n = 32, 16
        elif width == 64 and _precision(dtype) == "tf32" and arch == 80:
            # tf32 at width 64 on sm_80: resident K / V spilled 8-116 B under triton 3.6 with causal, packed,
            # float-mask and dropout launches (255 registers); 32-column chunks take 221-255, 0 spill.
            chunk = 32
    elif kernel == "dkdv" and dropout and width == 128 and dtype != torch.float32:
        # 16-bit dropout at width 128 (sm_80's table): with resident K / V tiles triton 3.6 spilled 8 B (255
        # registers); S^T and dP^T contracted 64 columns at a time: 236 registers, 0 spill.
        chunk = 64
    elif kernel == "dkdv" and dropout and width == 256 and dtype == torch.float32 and arch == 90 \
            and _precision(dtype) == "tf32":
        # tf32 dropout at width 256 on sm_90: resident K / V spilled 52 B under triton 3.6 (255 registers), and
        # 16-row key tiles stop at 128 registers and spill 12 B; 128-column chunks: 241 registers, 0 spill.
        chunk = 128
    if dtype == torch.float32 and _precision(dtype) == "ieee":
        # Full-precision fp32 dots run on FMA units with operands in registers: quarter the tile.
        block_m, block_n = max(16, block_m // 2), max(16, block_n // 2)
        if kernel != "fwd" and width == 256:
            # Even 16x16 tiles spill 250-500 B with two 256-wide FMA contractions (S and dP) per step.
            chunk = 64
    # ptxas, left to itself, stops at 128 registers for the plain (no mask, no dropout) fp32 dK/dV kernel
    # at head dims <= 128 and spills 8-56 B although 255 are allowed at 8 warps; an explicit cap lets it
    # allocate what it needs (138-240, no spills). The masked / dropout variants already go past 128 on
    # their own, and with the cap ptxas takes all 255 and spills 8-24 B: they, and the 256-wide
    # bucket, keep the default.
    plain = not (masked or dropout)
    maxnreg = 255 if kernel in ("dkdv", "dkdv_atomic") and dtype == torch.float32 and plain and width <= 128 else None
    if kernel == "fwd" and dtype == torch.float32 and dropout and width == 64 and _precision(dtype) == "tf32":
        # Loading the dropout seed through a pointer tipped this launch over ptxas's default (4 B spilled on
        # sm_80); with the cap it takes 177 registers and spills nothing.
        maxnreg = 255
    if dtype == torch.float32 and _precision(dtype) == "tf32" and (
            kernel == "dkdv" and masked and mask_grad and width == 64
            or kernel == "fwd" and masked and width == 128
            or kernel == "dq" and causal and plain and width == 128):
        # More tf32 launches where ptxas stopped at 128 registers under triton 3.6 and spilled 8-52 B (dK/dV with a
        # float mask's gradient at width 64, the masked forward at 128 on sm_90, the causal dQ at 128 on sm_90);
        # with the cap: 150-252 registers, 0 spill, on both architectures and tritons.
        maxnreg = 255
    # Short sequences (decoding, tests) get tiles no taller than needed.
    return _Launch(min(block_m, _pow2(max_lq)), min(block_n, _pow2(max_lk)), warps, stages, maxnreg, chunk)


def _launch_of_config(config: dict, width: int, dtype: torch.dtype, max_lq: int, max_lk: int,
                      maxnreg: int | None = None) -> _Launch:
    """The launch a ``forced_config`` / ``CONFIG_SPACE`` dict gives (tiles clipped to the sequences; ``maxnreg``:
    the cap when the dict names none)."""
    block_m, block_n, warps, stages = (config[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    default_chunk = width if dtype != torch.float32 or _precision(dtype) != "ieee" or width < 256 else 64
    chunk = config.get("chunk", default_chunk)
    return _Launch(min(block_m, _pow2(max_lq)), min(block_n, _pow2(max_lk)), warps, stages,
                   config.get("maxnreg", maxnreg), min(chunk, width))


# report_configs pins the precision it compiles for here instead of touching torch's global flags.
_PRECISION_OVERRIDE: str | None = None


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for ``dtype``: fp32 dots follow torch's cuBLAS TF32 setting (fp16 / bf16
    ignore it). torch >= 2.9 has ``matmul.fp32_precision`` ("ieee", "tf32", or "none": inherit the global
    ``torch.backends.fp32_precision``, whose "none" is torch's default, IEEE); once that API has been used,
    reading the legacy ``allow_tf32`` raises, so the new one is read wherever it exists."""
    if dtype != torch.float32:
        return "tf32"
    if _PRECISION_OVERRIDE is not None:
        return _PRECISION_OVERRIDE
    matmul = torch.backends.cuda.matmul
    try:
        setting = matmul.fp32_precision
    except AttributeError:  # torch < 2.9
        return "tf32" if matmul.allow_tf32 else "ieee"
    if setting == "none":  # torch 2.13 resolves the parent itself; older releases may return "none"
        setting = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if setting == "tf32" else "ieee"


# --------------------------------------------------------------------------------------------- autotuning

# SEQFAST_ATTENTION_AUTOTUNE=1 (CUDA only): the first launch of each key (see autotune_key) times the pruned
# CONFIG_SPACE candidates against the table's config and keeps the fastest one whose outputs match the table
# config's (kernels/autotune.py); SEQFAST_ATTENTION_AUTOTUNE_CACHE names a JSON-lines file the winners are read
# from and appended to. Off under torch.use_deterministic_algorithms(True): the table's configs, always.
# forced_config wins over both.
_AUTOTUNE_ENV = "SEQFAST_ATTENTION_AUTOTUNE"
AUTOTUNE_CACHE_ENV = "SEQFAST_ATTENTION_AUTOTUNE_CACHE"
_TUNER = _autotune.Tuner("seqfast attention", AUTOTUNE_CACHE_ENV) if _autotune is not None else None
# Devices whose launches may be tuned: timing needs CUDA events (the tests add "cpu" with a timer of their own).
_AUTOTUNE_DEVICES = ("cuda",)
# A candidate's outputs may differ from the table config's by this much (relative to the largest magnitude):
# summation order and, for 16-bit types, the rounding of P before P.V change with the tiles.
_AUTOTUNE_TOL = {"fp16": 1e-2, "bf16": 5e-2, "fp32-tf32": 2e-3, "fp32-ieee": 1e-4}


def _autotune_enabled(device: torch.device) -> bool:
    flag = os.environ.get(_AUTOTUNE_ENV, "").strip().lower()
    if flag in ("", "0", "false", "no", "off"):
        return False
    if flag not in ("1", "true", "yes", "on"):
        raise ValueError(f"{_AUTOTUNE_ENV} must be 1 or 0, got {os.environ[_AUTOTUNE_ENV]!r}")
    return (_TUNER is not None and device.type in _AUTOTUNE_DEVICES
            and not torch.are_deterministic_algorithms_enabled())


def _dtype_label(dtype: torch.dtype) -> str:
    return f"fp32-{_precision(dtype)}" if dtype == torch.float32 else _TRITON_DTYPE[dtype]


def _length_bucket(n: int) -> int:
    return min(_pow2(n), 1 << 16)


def autotune_key(kernel: str, arch: str, dtype: torch.dtype, head_dim: int, max_lq: int, max_lk: int,
                 causal: bool = False, masked: bool = False, mask_grad: bool = False, dropout: bool = False,
                 varlen: bool = False) -> str:
    """The autotuning key of a launch: ``kernel`` ("fwd", "dkdv", "dq", "dkdv_atomic"), ``arch`` (e.g. "sm90",
    the device's compute capability), dtype (fp32 with its dot precision), head-dim tile width (64 / 128 / 256;
    ``head_dim`` = max(D, Dv)), mode (causal or full, mask, mask gradient, dropout, varlen) and the power-of-two
    buckets of the longest query and key sequences. E.g. ``sm90/fwd/bf16/d128/causal/q4096k4096``."""
    if kernel not in _KERNELS or kernel == "decode":
        raise ValueError(f"no autotuning for attention kernel {kernel!r}")
    mode = "causal" if causal else "full"
    if masked:
        mode += "+mask_grad" if mask_grad else "+mask"
    if dropout:
        mode += "+dropout"
    if varlen:
        mode += "+varlen"
    width = max(64, _pow2(head_dim))
    return (f"{arch}/{kernel}/{_dtype_label(dtype)}/d{width}/{mode}/"
            f"q{_length_bucket(max_lq)}k{_length_bucket(max_lk)}")


def _arch_label(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def autotune_candidates(kernel: str, default: _Launch, width: int, dtype: torch.dtype, max_lq: int, max_lk: int,
                        arch: int, plain: bool) -> list[_Launch]:
    """The pruned candidate launches of ``kernel``: ``CONFIG_SPACE`` clipped to the sequences, without
    duplicates or the default. The space was compiled without spills for sm_90 fp16 / bf16 at head dims <= 128
    without masks or dropout (``plain``); elsewhere only candidates whose score tile is no larger than the
    default's are kept (larger ones spilled in the compile sweeps)."""
    validated = arch == 90 and dtype != torch.float32 and width <= 128 and plain
    chosen: list[_Launch] = []
    for config in CONFIG_SPACE[kernel]:
        launch = _launch_of_config(config, width, dtype, max_lq, max_lk, default.maxnreg)
        if not validated and launch.block_m * launch.block_n > default.block_m * default.block_n:
            continue
        if launch != default and launch not in chosen:
            chosen.append(launch)
    return chosen


def autotune_entry(kernel: str, config: dict | None, device: torch.device | str, dtype: torch.dtype, head_dim: int,
                   max_lq: int, max_lk: int, causal: bool = False, masked: bool = False, mask_grad: bool = False,
                   dropout: bool = False, varlen: bool = False) -> dict:
    """The autotuning cache entry (``{"key": .., "config": ..}``, kernels/autotune.py) under which tuned
    launches of this key on ``device`` use ``config`` (a ``CONFIG_SPACE`` dict; None: the table's launch). A
    sweep on hardware (benchmarks/gpu_validate.py) writes these, so its output can be shipped as a cache."""
    device = torch.device(device)
    width = max(64, _pow2(head_dim))
    launch = _config(kernel, width, dtype, max_lq, max_lk, masked, dropout, causal, mask_grad and masked,
                     arch=_arch(device), varlen=varlen)
    if config is not None:
        launch = _launch_of_config(config, width, dtype, max_lq, max_lk, launch.maxnreg)
    key = autotune_key(kernel, _arch_label(device), dtype, head_dim, max_lq, max_lk, causal, masked, mask_grad,
                       dropout, varlen)
    return {"key": key, "config": launch._asdict()}


def _launch_of_entry(config: dict) -> _Launch:
    launch = _Launch(**config)
    sizes = (launch.block_m, launch.block_n, launch.warps, launch.stages, launch.chunk)
    if not all(isinstance(v, int) and v > 0 for v in sizes) or not isinstance(launch.maxnreg, (int, type(None))):
        raise ValueError(f"not a launch config: {config!r}")
    return launch


def _tuned(kernel: str, launch: _Launch, device: torch.device, width: int, dtype: torch.dtype, max_lq: int,
           max_lk: int, run: Callable[[_Launch], tuple], causal: bool = False, masked: bool = False,
           mask_grad: bool = False, dropout: bool = False, varlen: bool = False) -> _Launch:
    """``launch``, or with autotuning on, the tuned launch of this key (tuned now if it is new: ``run(launch)``
    launches one config into fresh outputs and returns them)."""
    if kernel in _FORCED or not _autotune_enabled(device):
        return launch
    width = max(64, width)  # the head-dim bucket, as _config takes it
    key = autotune_key(kernel, _arch_label(device), dtype, width, max_lq, max_lk, causal, masked, mask_grad,
                       dropout, varlen)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Timing and comparing would synchronise inside a CUDA-graph capture: only what is cached already.
        cached = _TUNER.lookup(key)
        return launch if cached is None else _launch_of_entry(cached)
    candidates = autotune_candidates(kernel, launch, width, dtype, max_lq, max_lk, _arch(device),
                                     not (masked or dropout))
    chosen = _TUNER.choose(key, launch._asdict(), [c._asdict() for c in candidates],
                           lambda config: run(_launch_of_entry(config)), _AUTOTUNE_TOL[_dtype_label(dtype)])
    try:
        return _launch_of_entry(chosen)
    except (TypeError, ValueError) as exc:
        warnings.warn(f"seqfast attention autotuning: the cached config of {key} is unusable ({exc}); using the "
                      "default", RuntimeWarning, stacklevel=3)
        return launch


# --------------------------------------------------------------------------------------------- launchers


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while launching: Triton launches on the current device and its current stream,
    so a kernel on cuda:1 tensors launched while cuda:0 is current would read foreign pointers. Nothing on
    CPU (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _seed_arg(seed: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    """The dropout seed as the one-element int64 tensor on ``device`` the kernels load it from.

    The public functions draw it on the query's device already. A CPU seed given for CUDA tensors (a direct op
    call) is copied with ``non_blocking`` (torch adds no stream synchronisation); an int becomes a new tensor.
    Its value is never read on the host: that would wait for the GPU and break CUDA-graph capture.
    """
    if not isinstance(seed, torch.Tensor):
        return torch.tensor([seed], dtype=torch.int64, device=device)
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"the dropout seed must be a one-element int64 tensor, got {seed.dtype} {tuple(seed.shape)}")
    return seed.to(device, non_blocking=True) if seed.device != device else seed


def _check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if query.dtype not in _SUPPORTED:
        raise TypeError(f"seqfast's Triton attention kernels run float16, bfloat16 and float32, got {query.dtype}; "
                        "float64 is served by the 'cpp' and 'reference' backends")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have stride 1 on its last dim, got strides {t.stride()}")
    if query.shape[-1] > 256 or value.shape[-1] > 256:
        raise ValueError(f"head dims up to 256 are supported, got {query.shape[-1]} and {value.shape[-1]}")


def _mask_args(attn_mask: torch.Tensor | None, query: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """(pointer tensor, its 4 strides, MASK_KIND)."""
    if attn_mask is None:
        return query, (0, 0, 0, 0), _MASK_NONE
    kind = _MASK_BOOL if attn_mask.dtype == torch.bool else _MASK_FLOAT
    return attn_mask, tuple(attn_mask.stride()), kind


class _Common:
    """Launch arguments the dense and varlen paths share, in the kernels' order."""

    def __init__(self, query, key, value, scale, varlen):
        self.dtype = query.dtype
        self.D, self.DV = query.shape[-1], value.shape[-1]
        self.block_d, self.block_dv = _pow2(self.D), _pow2(self.DV)
        self.width = max(self.block_d, self.block_dv)
        self.precision = _precision(query.dtype)
        self.scale = float(scale)
        self.qk_scale = float(scale) * LOG2E
        if varlen:  # (total, H, D): no batch stride, rows are dim 0
            self.Hq, self.Hk = query.shape[1], key.shape[1]
            self.q_strides = (0, query.stride(1), query.stride(0))
            self.k_strides = (0, key.stride(1), key.stride(0))
            self.v_strides = (0, value.stride(1), value.stride(0))
        else:
            self.Hq, self.Hk = query.shape[1], key.shape[1]
            self.q_strides = tuple(query.stride()[:3])
            self.k_strides = tuple(key.stride()[:3])
            self.v_strides = tuple(value.stride()[:3])
        if (self.Hk == 0 and self.Hq != 0) or (self.Hk and self.Hq % self.Hk):
            raise ValueError(f"query heads ({self.Hq}) must be a multiple of key/value heads ({self.Hk})")
        if self.Hq > 65535:  # grid y: the launchers split the batch, not the heads
            raise ValueError(f"the Triton attention kernels take at most 65535 heads, got {self.Hq}")
        self.group = self.Hq // self.Hk if self.Hk else 1  # no heads at all: an empty call


def _row_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, L, E) tensor, or of a packed (total, H, E) one."""
    return (0, t.stride(1), t.stride(0)) if varlen else tuple(t.stride()[:3])


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """lse / delta are (B, H, L), or (H, total) when packed."""
    return (0, lse.stride(0), lse.stride(1)) if varlen else tuple(lse.stride())


# CUDA's limit on gridDim.y and gridDim.z (x goes to 2**31 - 1); a module constant so tests can lower it.
_MAX_GRID_YZ = 65535


def _batch_parts(B: int) -> list[tuple[int, int]]:
    """[b0, b1) batch (or packed sequence) ranges of at most ``_MAX_GRID_YZ``, one launch each."""
    return [(b0, min(B, b0 + _MAX_GRID_YZ)) for b0 in range(0, B, _MAX_GRID_YZ)]


class _Part:
    """One launch's slice of the batch: dense tensors are sliced along dim 0 (views: the strides stay, so do the
    kernels); packed ones stay whole and their ``cu_seqlens`` are sliced instead (they hold absolute rows)."""

    def __init__(self, b0: int, b1: int, B: int, varlen: bool):
        self.b0, self.b1, self.varlen = b0, b1, varlen
        self.whole = b0 == 0 and b1 == B  # the common case: no views made

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.whole or self.varlen else t[self.b0:self.b1]

    def cu(self, cu: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
        if cu is None:
            return placeholder
        return cu if self.whole else cu[self.b0:self.b1 + 1]

    def drop_base(self, H: int, Lq: int, Lk: int) -> int:
        """The flat dropout index of the slice's first element (dense layout, as the kernels number them)."""
        return self.b0 * H * Lq * Lk


def _forward(query, key, value, attn_mask, dropout_p, causal, scale, seed, cu_q, cu_k, B, Lq, Lk, max_q, max_k):
    varlen = cu_q is not None
    c = _Common(query, key, value, scale, varlen)

    def outputs():
        if varlen:
            return (torch.empty((query.shape[0], c.Hq, c.DV), dtype=query.dtype, device=query.device),
                    torch.empty((c.Hq, query.shape[0]), dtype=torch.float32, device=query.device))
        return (output_like(query, c.DV), torch.empty((B, c.Hq, Lq), dtype=torch.float32, device=query.device))

    out, lse = outputs()
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if max_q == 0 or B == 0:
        return out, lse
    mask, m_strides, mask_kind = _mask_args(attn_mask, query)
    dropout = dropout_p > 0.0
    modes = dict(causal=bool(causal), masked=mask_kind != _MASK_NONE, dropout=dropout)
    launch = _config("fwd", c.width, c.dtype, max_q, max_k, arch=_arch(query.device), varlen=varlen, **modes)
    seed_arg = _seed_arg(seed, query.device) if dropout else query

    def run(launch: _Launch, out=None, lse=None) -> tuple[torch.Tensor, torch.Tensor]:
        if out is None:
            out, lse = outputs()
        block_m, block_n, warps, stages, maxnreg, _ = launch
        for b0, b1 in _batch_parts(B):
            p = _Part(b0, b1, B, varlen)
            _attn_fwd[(triton.cdiv(max_q, block_m), c.Hq, b1 - b0)](
                p(query), p(key), p(value), p(mask), p(out), p(lse), p.cu(cu_q, query), p.cu(cu_k, query),
                *c.q_strides, *c.k_strides, *c.v_strides, *m_strides,
                *_row_strides(out, varlen), *_lse_strides(lse, varlen),
                c.Hq, c.group, Lq, Lk,
                c.qk_scale, float(dropout_p), 1.0 / (1.0 - dropout_p) if dropout else 1.0,
                seed_arg, p.drop_base(c.Hq, Lq, Lk),
                D=c.D, DV=c.DV, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=c.block_d, BLOCK_DV=c.block_dv,
                CAUSAL=int(causal), MASK_KIND=mask_kind, DROPOUT=dropout, VARLEN=varlen, PRECISION=c.precision,
                num_warps=warps, num_stages=stages, maxnreg=maxnreg,
            )
        return out, lse

    launch = _tuned("fwd", launch, query.device, c.width, c.dtype, max_q, max_k, run, varlen=varlen, **modes)
    return run(launch, out, lse)


_BACKWARD_MODES = ("deterministic", "atomic")


def _backward_mode() -> str:
    """``SEQFAST_ATTENTION_BWD``, read on every backward: "deterministic" (default; FA2 split, no atomics) or
    "atomic" (one kernel adds dQ with fp32 atomics: faster, not bitwise reproducible; head dims <= 128, larger
    ones run the deterministic backward). Under
    ``torch.use_deterministic_algorithms(True)`` "atomic" raises, or with ``warn_only=True`` warns and runs the
    deterministic backward."""
    mode = os.environ.get("SEQFAST_ATTENTION_BWD", "deterministic").strip().lower() or "deterministic"
    if mode not in _BACKWARD_MODES:
        raise ValueError(f"SEQFAST_ATTENTION_BWD must be one of {', '.join(_BACKWARD_MODES)}, got "
                         f"{os.environ['SEQFAST_ATTENTION_BWD']!r}")
    if mode == "atomic" and torch.are_deterministic_algorithms_enabled():
        message = ("seqfast's attention backward with SEQFAST_ATTENTION_BWD=atomic adds dQ with atomics and is not "
                   "deterministic, but torch.use_deterministic_algorithms(True) is set; unset "
                   "SEQFAST_ATTENTION_BWD (or set it to 'deterministic') to use the deterministic backward")
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message + "; running the deterministic backward", UserWarning, stacklevel=2)
            return "deterministic"
        raise RuntimeError(message)
    return mode


def _backward(grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale, seed, mask_grad,
              cu_q, cu_k, B, Lq, Lk, max_q, max_k):
    varlen = cu_q is not None
    c = _Common(query, key, value, scale, varlen)

    def new_dmask():
        if mask_grad:
            # Zeros: causal skipping leaves pairs no kernel visits, and their gradient is 0.
            return torch.zeros((B, c.Hq, Lq, Lk), dtype=attn_mask.dtype, device=query.device)
        return query.new_empty((0,))

    # The op's gradient layout (contiguous on CUDA; in the interpreter, on CPU tensors, torch's CPU layout; the
    # kernels write unit-stride rows, so the unfused dK is copied into its transposed layout at the end).
    fused = not varlen and fused_gradients(query, key, value, dropout_p, bool(mask_grad))

    def new_grad(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t, memory_format=torch.contiguous_format) if varlen else gradient_like(t, fused)

    def key_layout(dk: torch.Tensor) -> torch.Tensor:
        if varlen or fused or c.Hq != c.Hk or query.device.type != "cpu":
            return dk
        return gradient_like(dk, False, True).copy_(dk)

    if B == 0 or c.Hq == 0 or max_q == 0 or max_k == 0:
        return new_grad(query).zero_(), key_layout(new_grad(key).zero_()), new_grad(value).zero_(), new_dmask()
    lse = lse.float() if lse.dtype != torch.float32 else lse
    delta = torch.empty_like(lse)
    pre_m = _preprocess_block_m(c.block_dv)
    mask, m_strides, mask_kind = _mask_args(attn_mask, query)
    dropout = dropout_p > 0.0
    seed_arg = _seed_arg(seed, query.device) if dropout else query
    flags = dict(D=c.D, DV=c.DV, BLOCK_D=c.block_d, BLOCK_DV=c.block_dv, CAUSAL=int(causal), MASK_KIND=mask_kind,
                 DROPOUT=dropout, VARLEN=varlen, PRECISION=c.precision)
    # Head dims > 128 keep the deterministic backward: the atomic kernel spills there (benchmarks/NOTES.md).
    atomic = _backward_mode() == "atomic" and c.width <= 128
    modes = dict(masked=mask_kind != _MASK_NONE, dropout=dropout, causal=bool(causal), mask_grad=bool(mask_grad))
    arch = _arch(query.device)
    dkdv_name = "dkdv_atomic" if atomic else "dkdv"
    parts = [_Part(b0, b1, B, varlen) for b0, b1 in _batch_parts(B)]
    for p in parts:
        _attn_bwd_preprocess[(triton.cdiv(max_q, pre_m), c.Hq, p.b1 - p.b0)](
            p(out), p(grad_out), p(delta), p.cu(cu_q, query),
            *_row_strides(out, varlen), *_row_strides(grad_out, varlen), *_lse_strides(delta, varlen),
            Lq, DV=c.DV, BLOCK_M=pre_m, BLOCK_DV=c.block_dv, VARLEN=varlen, num_warps=8, num_stages=1,
        )

    def common_tail(p: _Part) -> tuple:
        return (c.Hq, c.group, Lq, Lk, c.scale, c.qk_scale, float(dropout_p),
                1.0 / (1.0 - dropout_p) if dropout else 1.0, seed_arg, p.drop_base(c.Hq, Lq, Lk))

    def run_dkdv(launch: _Launch) -> tuple[torch.Tensor, ...]:
        """dK, dV, dmask (and with atomics the fp32 dQ sum) of one launch into fresh outputs."""
        dk, dv = new_grad(key), new_grad(value)
        dmask = new_dmask()
        dm_strides = tuple(dmask.stride()[:3]) if mask_grad else (0, 0, 0)
        # The atomic path sums dQ in fp32 (zeros: rows no key tile reaches keep a zero gradient).
        dq_acc = torch.zeros(query.shape, dtype=torch.float32, device=query.device) if atomic else None
        dq_acc_strides = _row_strides(dq_acc, varlen) if atomic else (0, 0, 0)
        block_m, block_n, warps, stages, maxnreg, chunk = launch
        for p in parts:
            _attn_bwd_dkdv[(triton.cdiv(max_k, block_n), c.Hk, p.b1 - p.b0)](
                p(query), p(key), p(value), p(mask), p(grad_out), p(lse), p(delta), p(dk), p(dv),
                p(dmask) if mask_grad else query, p(dq_acc) if atomic else query, p.cu(cu_q, query),
                p.cu(cu_k, query),
                *c.q_strides, *c.k_strides, *c.v_strides, *m_strides, *_row_strides(grad_out, varlen),
                *_lse_strides(delta, varlen), *_row_strides(dk, varlen), *_row_strides(dv, varlen), *dm_strides,
                *dq_acc_strides,
                *common_tail(p), BLOCK_M=block_m, BLOCK_N=block_n, MASK_GRAD=bool(mask_grad), **flags,
                D_CHUNK=min(chunk, c.block_d), DV_CHUNK=min(chunk, c.block_dv), ATOMIC_DQ=atomic,
                num_warps=warps, num_stages=stages, maxnreg=maxnreg,
            )
        return (dk, dv, dmask, dq_acc) if atomic else (dk, dv, dmask)

    def run_dq(launch: _Launch) -> tuple[torch.Tensor]:
        dq = new_grad(query)
        block_m, block_n, warps, stages, maxnreg, chunk = launch
        for p in parts:
            _attn_bwd_dq[(triton.cdiv(max_q, block_m), c.Hq, p.b1 - p.b0)](
                p(query), p(key), p(value), p(mask), p(grad_out), p(lse), p(delta), p(dq), p.cu(cu_q, query),
                p.cu(cu_k, query),
                *c.q_strides, *c.k_strides, *c.v_strides, *m_strides, *_row_strides(grad_out, varlen),
                *_lse_strides(delta, varlen), *_row_strides(dq, varlen),
                *common_tail(p), BLOCK_M=block_m, BLOCK_N=block_n, **flags,
                D_CHUNK=min(chunk, c.block_d), DV_CHUNK=min(chunk, c.block_dv),
                num_warps=warps, num_stages=stages, maxnreg=maxnreg,
            )
        return (dq,)

    def tuned(name: str, run: Callable[[_Launch], tuple]) -> _Launch:
        launch = _config(name, c.width, c.dtype, max_q, max_k, arch=arch, varlen=varlen, **modes)
        return _tuned(name, launch, query.device, c.width, c.dtype, max_q, max_k, run, varlen=varlen,
                      **dict(modes, mask_grad=bool(mask_grad) and modes["masked"]))

    dk, dv, dmask, *acc = run_dkdv(tuned(dkdv_name, run_dkdv))
    if atomic:
        dq = new_grad(query)
        dq.copy_(acc[0])
    else:
        (dq,) = run_dq(tuned("dq", run_dq))
    return dq, key_layout(dk), dv, dmask


# --------------------------------------------------------------------------------------------- split-KV decode

# The forward splits the key range across programs when the query is this short and the keys this long (and
# the batch x key/value heads alone would leave SMs idle); module constants so tests can lower them.
_DECODE_MAX_LQ = 16
_DECODE_MIN_LK = 1024
_DECODE_MAX_ROWS = 32  # query heads per key/value head x query rows held in one tile (16 or 32 rows)
_DECODE_MAX_SPLITS = 64
# Candidate launches of the "decode" kernel for tuning: key tile, key ranges (0: from the SM count and the
# work), warps, stages. Not measured on a GPU yet; each compiles without spills on sm_90 for fp16 / bf16 at
# 16 and 32 tile rows and head dims up to 128 (BLOCK_N 32 up to 256).
DECODE_CONFIG_SPACE: list[dict] = [
    {"BLOCK_N": 64, "SPLITS": 0, "num_warps": 8, "num_stages": 2},
    {"BLOCK_N": 32, "SPLITS": 0, "num_warps": 8, "num_stages": 2},
    {"BLOCK_N": 64, "SPLITS": 0, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 32, "SPLITS": 0, "num_warps": 4, "num_stages": 2},
]
CONFIG_SPACE["decode"] = DECODE_CONFIG_SPACE
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached); 4 on CPU, so the interpreter splits small problems."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _decode_block_n(width: int, dtype: torch.dtype, rows: int, masked: bool) -> int | None:
    """The split kernel's key tile at 8 warps and _decode_stages: the largest that compiles without spills on sm_80 and
    sm_90 under triton 3.6 and 3.9 (kernel_report) for this head-dim width, dtype, tile rows and mask; None where
    none does (the normal forward serves)."""
    if dtype != torch.float32:
        if width <= 64 or (width == 128 and not (masked and rows > 16)):
            return 64
        if width == 256 and masked:
            # A mask at width 256 spilled 56-72 B on sm_90 under triton 3.6 with 32-key tiles (255 registers); 16
            # keys fit 16 rows (192 registers) but still spilled 40 B at 32 rows (4 or 16 warps, 1-3 stages too).
            return 16 if rows <= 16 else None
        return 32
    if _precision(dtype) == "ieee":
        return 16 if width >= 128 and (rows > 16 or width == 256 and masked) else 32
    if width == 256 and rows > 16:
        return None
    return 32 if width == 128 or (width <= 64 and rows > 16) else 16


def _decode_stages(width: int, dtype: torch.dtype, masked: bool) -> int:
    """The split kernel's pipeline stages: 2, or 1 for a mask at width 256 with IEEE fp32 dots, where 2 stages spilled
    on sm_90 with 32 keys (60 B under triton 3.6) and with 16 (12 B, 128 registers, under 3.9; with a 255 cap 3.6
    spilled 20 B); 16 keys in one stage take 80-210 registers (16 or 32 rows), 0 spill."""
    ieee = dtype == torch.float32 and _precision(dtype) == "ieee"
    return 1 if ieee and width == 256 and masked else 2


def _decode_maxnreg(width: int, dtype: torch.dtype, rows: int, masked: bool) -> int | None:
    """The split kernel's register cap: unmasked tf32 launches stopped at 128 registers and spilled 4-20 B under
    triton 3.6 (width 64 at 32 rows on sm_90, width 256 on sm_80); capped at 255 they take 128-177, 0 spill. The
    others keep ptxas's default (with the cap a bool mask at width 256 took 255 and spilled 8 B on sm_90)."""
    tf32 = dtype == torch.float32 and _precision(dtype) == "tf32"
    return 255 if tf32 and not masked and (width == 256 or width <= 64 and rows > 16) else None


def _decode_launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                   dropout_p: float, causal: int):
    """(BLOCK_N, splits, warps, stages) of the split-KV forward, or None where the normal forward serves."""
    B, Hq, Lq, _ = query.shape
    Hk, Lk = key.shape[1], key.shape[2]
    group = Hq // max(1, Hk)
    width = max(_pow2(query.shape[-1]), _pow2(value.shape[-1]))
    # Keys any row sees: top-left causal rows see only the first Lq (the normal forward skips the rest).
    seen = min(Lk, Lq) if causal == _TOP_LEFT else Lk
    if dropout_p > 0.0 or B == 0 or Lq == 0 or Lq > _DECODE_MAX_LQ or seen < _DECODE_MIN_LK:
        return None
    if group * Lq > _DECODE_MAX_ROWS or Hk > 65535:
        return None
    forced = _FORCED.get("decode")
    if forced is not None:
        block_n, splits = forced["BLOCK_N"], forced.get("SPLITS", 0)
        warps, stages = forced.get("num_warps", 8), forced.get("num_stages", 2)
    else:
        block_n = _decode_block_n(width, query.dtype, _pow2(group * Lq), attn_mask is not None)
        if block_n is None:
            return None
        splits, warps, stages = 0, 8, _decode_stages(width, query.dtype, attn_mask is not None)
    n_blocks = triton.cdiv(seen, block_n)
    if splits <= 0:
        # About two programs per SM over the batch and key/value heads, and at least two key tiles per range.
        splits = min(triton.cdiv(2 * _sm_count(query.device), B * Hk), n_blocks // 2)
    splits = min(splits, n_blocks, _DECODE_MAX_SPLITS)
    if splits <= 1:
        return None
    return block_n, splits, warps, stages


def _decode_forward(query, key, value, attn_mask, causal, scale, launch):
    """The split-KV forward of :func:`attention_forward` (no dropout): same out and lse."""
    block_n, splits, warps, stages = launch
    B, Hq, Lq, _ = query.shape
    Lk = key.shape[2]
    c = _Common(query, key, value, scale, False)
    out = output_like(query, c.DV)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=query.device)
    mask, m_strides, mask_kind = _mask_args(attn_mask, query)
    n_blocks = triton.cdiv(min(Lk, Lq) if causal == _TOP_LEFT else Lk, block_n)
    per_split = triton.cdiv(n_blocks, splits)
    splits = triton.cdiv(n_blocks, per_split)  # no range left empty by the rounding
    block_m = _pow2(c.group * Lq)
    for b0, b1 in _batch_parts(B):
        p = _Part(b0, b1, B, False)
        n_rows = (b1 - b0) * Hq * Lq
        part_o = torch.empty((n_rows, splits, c.DV), dtype=torch.float32, device=query.device)
        part_ml = torch.empty((2, n_rows, splits), dtype=torch.float32, device=query.device)
        _attn_fwd_split[(splits, c.Hk, b1 - b0)](
            p(query), p(key), p(value), p(mask), part_o, part_ml,
            *c.q_strides, *c.k_strides, *c.v_strides, *m_strides,
            Hq, c.group, Lq, Lk, n_rows, per_split, c.qk_scale,
            D=c.D, DV=c.DV, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=c.block_d, BLOCK_DV=c.block_dv,
            CAUSAL=int(causal), MASK_KIND=mask_kind, PRECISION=c.precision, num_warps=warps, num_stages=stages,
            maxnreg=_decode_maxnreg(c.width, query.dtype, block_m, attn_mask is not None),
        )
        _attn_fwd_combine[(n_rows,)](
            part_o, part_ml, p(out), p(lse), *_row_strides(out, False), *_lse_strides(lse, False),
            Hq, Lq, splits, n_rows, DV=c.DV, BLOCK_S=_pow2(splits), BLOCK_DV=c.block_dv, num_warps=4, num_stages=1,
        )
    return out, lse


def attention_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
    dropout_p: float, causal: int, scale: float, seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``seqfast::attention_forward``: q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv) ->
    (out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32, +inf on rows that see no key)."""
    _check(query, key, value)
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    decode = _decode_launch(query, key, value, attn_mask, dropout_p, causal)
    with _on_device(query.device):
        if decode is not None:
            return _decode_forward(query, key, value, attn_mask, causal, scale, decode)
        return _forward(query, key, value, attn_mask, dropout_p, causal, scale, seed, None, None, B, Lq, Lk, Lq, Lk)


def attention_backward(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attn_mask: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, dropout_p: float, causal: int,
    scale: float, seed: torch.Tensor, mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``seqfast::attention_backward``: (dq, dk, dv) like the inputs, dmask (B, Hq, Lq, Lk) or empty."""
    _check(query, key, value)
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    with _on_device(query.device):
        return _backward(grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale, seed, mask_grad,
                         None, None, B, Lq, Lk, Lq, Lk)


def varlen_attention_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``seqfast::varlen_attention_forward``: packed q (total_q, Hq, D) -> (out (total_q, Hq, Dv),
    lse (Hq, total_q))."""
    _check(query, key, value)
    B = cu_seqlens_q.numel() - 1
    with _on_device(query.device):
        return _forward(query, key, value, None, 0.0, causal, scale, 0, cu_seqlens_q, cu_seqlens_k,
                        B, query.shape[0], key.shape[0], max_seqlen_q, max_seqlen_k)


def varlen_attention_backward(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    out: torch.Tensor, lse: torch.Tensor, causal: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``seqfast::varlen_attention_backward``: (dq, dk, dv) with the packed inputs' shapes."""
    _check(query, key, value)
    B = cu_seqlens_q.numel() - 1
    with _on_device(query.device):
        dq, dk, dv, _ = _backward(grad_out, query, key, value, None, out, lse, 0.0, causal, scale, 0, False,
                                  cu_seqlens_q, cu_seqlens_k, B, query.shape[0], key.shape[0], max_seqlen_q,
                                  max_seqlen_k)
    return dq, dk, dv


def dropout_keep_mask(
    seed: torch.Tensor | int, B: int, H: int, Lq: int, Lk: int, p: float, device: torch.device | str
) -> torch.Tensor:
    """The bool (B, H, Lq, Lk) keep-mask the kernels draw for ``seed`` (the op's one-element int64 tensor, on
    any device, or an int) and dropout probability ``p``."""
    total = B * H * Lq * Lk
    keep = torch.empty((B, H, Lq, Lk), dtype=torch.int8, device=device)
    if total:
        block = 1024
        with _on_device(keep.device):
            _dropout_mask_kernel[(triton.cdiv(total, block),)](keep, _seed_arg(seed, keep.device), float(p), total,
                                                                BLOCK=block)
    return keep.bool()


# --------------------------------------------------------------------------------------------- kernel report

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_FLOAT_ARGS = {"qk_scale", "sm_scale", "dropout_p", "inv_keep"}
# Per kernel: variant label -> (CAUSAL, MASK_KIND, MASK_GRAD, DROPOUT, VARLEN).
_VARIANTS = {
    "dense": (0, _MASK_NONE, False, False, False),
    "causal": (1, _MASK_NONE, False, False, False),
    "mask_bool": (0, _MASK_BOOL, False, False, False),
    "mask_float": (0, _MASK_FLOAT, True, False, False),
    "mask_float_nograd": (0, _MASK_FLOAT, False, False, False),  # differs from mask_float in dK/dV only
    "dropout": (0, _MASK_NONE, False, True, False),
    "varlen_causal": (2, _MASK_NONE, False, False, True),
}
_REPORT_KERNELS = (("fwd", "_attn_fwd"), ("dkdv", "_attn_bwd_dkdv"), ("dq", "_attn_bwd_dq"),
                   ("dkdv_atomic", "_attn_bwd_dkdv"))
_ARCHS = {80: "sm_80", 90: "sm_90"}


def _signature(fn, dtype: torch.dtype, constexprs: dict, mask_kind: int, varlen: bool) -> dict[str, str]:
    dt = _TRITON_DTYPE[dtype]
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("Lse", "Delta", "PartO", "PartML"):
            sig[name] = "*fp32"
        elif name == "Mask":
            sig[name] = "*i1" if mask_kind == _MASK_BOOL else f"*{dt}"
        elif name in ("CuQ", "CuK"):
            sig[name] = "*i64" if varlen else f"*{dt}"
        elif name == "Keep":
            sig[name] = "*i8"
        elif name == "Seed":
            sig[name] = "*i64"
        elif name == "DQ" and constexprs.get("ATOMIC_DQ"):
            sig[name] = "*fp32"
        elif name[0].isupper() and name not in ("H", "GROUP", "Lq", "Lk", "S"):
            sig[name] = f"*{dt}"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in ("total", "drop_base"):
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def report_configs() -> list[dict]:
    """Every (kernel, config) the launchers can launch at full tile size, for compiling ahead of time.

    One entry per launch ("fwd", "dkdv", "dq", "dkdv_atomic") x head-dim bucket (64, 128, 256) x dtype (fp16,
    bf16, fp32) x variant (the causal / mask / dropout / varlen constexprs) x config table: where the sm_90
    table picks another launch than the sm_80 one, each gets its own entry with ``archs`` naming the one
    architecture it runs on and the label prefixed ``sm80:`` / ``sm90:``; otherwise one entry serves both.
    Short-sequence launches use smaller tiles. Keys: kernel, fn, signature, constexprs, num_warps, num_stages,
    config; options ({"maxnreg": ..}) where the launcher caps registers (the label then ends in ``r<cap>``); archs
    where the entry is arch-specific.
    """
    entries = []
    for dtype, dt in _TRITON_DTYPE.items():
        for width in (64, 128, 256):
            entries.append(_entry("_attn_bwd_preprocess", _attn_bwd_preprocess, dtype, {
                "DV": width, "BLOCK_M": _preprocess_block_m(width), "BLOCK_DV": width, "VARLEN": False,
            }, 8, 1, f"d{width}-{dt}", _MASK_NONE, False))
            for kernel, fn_name in _REPORT_KERNELS:
                fn = globals()[fn_name]
                variants = list(_VARIANTS.items())
                if dtype == torch.float32:  # allow_tf32 off (torch's default): full-precision fp32 dots
                    variants.append(("dense_ieee", _VARIANTS["dense"]))
                for label, (causal, mask_kind, mask_grad, dropout, varlen) in variants:
                    if label == "mask_float_nograd" and not kernel.startswith("dkdv"):
                        continue
                    if kernel == "dkdv_atomic" and width > 128:  # the launcher never runs it there
                        continue
                    precision = "ieee" if label.endswith("ieee") else "tf32"
                    flags = dict(masked=mask_kind != _MASK_NONE, dropout=dropout, causal=bool(causal),
                                 mask_grad=mask_grad, varlen=varlen)
                    with _pinned_precision(precision):
                        launches = {arch: _config(kernel, width, dtype, 1 << 20, 1 << 20, arch=arch, **flags)
                                    for arch in _ARCHS}
                    shared = launches[80] == launches[90]
                    for arch, launch in launches.items():
                        if shared and arch != 80:
                            continue
                        block_m, block_n, warps, stages = launch[:4]
                        constexprs = {
                            "D": width, "DV": width, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": width,
                            "BLOCK_DV": width, "CAUSAL": causal, "MASK_KIND": mask_kind, "DROPOUT": dropout,
                            "VARLEN": varlen, "PRECISION": precision,
                        }
                        if kernel.startswith("dkdv"):
                            constexprs["MASK_GRAD"] = mask_grad
                            constexprs["ATOMIC_DQ"] = kernel == "dkdv_atomic"
                        chunked = ""
                        if kernel != "fwd":
                            constexprs["D_CHUNK"] = constexprs["DV_CHUNK"] = launch.chunk
                            chunked = f"c{launch.chunk}" if launch.chunk < width else ""
                        prefix = "" if shared else f"sm{arch}:"
                        tag = "atomic-" if kernel == "dkdv_atomic" else ""
                        capped = f"r{launch.maxnreg}" if launch.maxnreg is not None else ""
                        entry = _entry(fn.__name__, fn, dtype, constexprs, warps, stages,
                                       f"{prefix}d{width}-{dt}-{tag}{label}-m{block_m}n{block_n}w{warps}s{stages}"
                                       f"{chunked}{capped}", mask_kind, varlen)
                        if launch.maxnreg is not None:
                            entry["options"] = {"maxnreg": launch.maxnreg}
                        if not shared:
                            entry["archs"] = [_ARCHS[arch]]
                        entries.append(entry)
        entries += _decode_report_configs(dtype, dt)
    return entries


def _decode_report_configs(dtype: torch.dtype, dt: str) -> list[dict]:
    """The split-KV decode kernels at their default launches: 16 and 32 tile rows (query heads of a group x
    query rows), no mask / bool mask / causal, fp32 at both dot precisions; the combine at 64 key ranges."""
    entries = []
    for width in (64, 128, 256):
        for precision in ("tf32", "ieee") if dtype == torch.float32 else ("tf32",):
            for rows in (16, 32):
                for label, (causal, mask_kind) in (("dense", (0, _MASK_NONE)), ("mask_bool", (0, _MASK_BOOL)),
                                                   ("causal", (2, _MASK_NONE))):
                    with _pinned_precision(precision):
                        block_n = _decode_block_n(width, dtype, rows, mask_kind != _MASK_NONE)
                        maxnreg = _decode_maxnreg(width, dtype, rows, mask_kind != _MASK_NONE)
                        stages = _decode_stages(width, dtype, mask_kind != _MASK_NONE)
                    if block_n is None:
                        continue
                    constexprs = {"D": width, "DV": width, "BLOCK_M": rows, "BLOCK_N": block_n, "BLOCK_D": width,
                                  "BLOCK_DV": width, "CAUSAL": causal, "MASK_KIND": mask_kind, "PRECISION": precision}
                    capped = f"r{maxnreg}" if maxnreg is not None else ""
                    entries.append(_entry("_attn_fwd_split", _attn_fwd_split, dtype, constexprs, 8, stages,
                                          f"d{width}-{dt}-{label}-{precision}-m{rows}n{block_n}w8s{stages}{capped}",
                                          mask_kind, False))
                    if maxnreg is not None:
                        entries[-1]["options"] = {"maxnreg": maxnreg}
        entries.append(_entry("_attn_fwd_combine", _attn_fwd_combine, dtype,
                              {"DV": width, "BLOCK_S": _DECODE_MAX_SPLITS, "BLOCK_DV": width}, 4, 1,
                              f"d{width}-{dt}-s{_DECODE_MAX_SPLITS}", _MASK_NONE, False))
    return entries


@contextlib.contextmanager
def _pinned_precision(precision: str):
    global _PRECISION_OVERRIDE
    outer, _PRECISION_OVERRIDE = _PRECISION_OVERRIDE, precision
    try:
        yield
    finally:
        _PRECISION_OVERRIDE = outer


def _entry(name, fn, dtype, constexprs, warps, stages, label, mask_kind, varlen):
    return {
        "kernel": name, "fn": fn, "signature": _signature(fn, dtype, constexprs, mask_kind, varlen),
        "constexprs": constexprs, "num_warps": warps, "num_stages": stages, "config": label,
    }
