"""Triton kernels of the CTC loss ops (``seqfast/ops/ctc_loss.py`` has the schemas and semantics).

Shapes (see the op docstring): ``log_probs`` (T, N, C), ``targets`` (N, S) int64, lengths (N,) int64,
``log_alpha`` (N, T, W) with W = 2S+1 extended-target states, ``grad`` (T, N, C).

Four launches; only the two recursions are serial in time, and they touch O(S) entries per step:

- ``lse`` (from logits only): the log_softmax normaliser of every (t, n) row, fully parallel over the
  T*N rows, NaN where log_softmax makes the row NaN (a NaN or +inf logit, or only -inf). The recursions
  read ``logit - lse`` instead of reducing over C at every step.
- ``forward``: one program per sample runs the alpha recursion over its frames t < input_length.
- ``grad``: every entry of ``grad``, fully parallel over rows and classes: ``grad_nll * exp(lp)`` on the
  frames of a finite loss, 0 past the input, NaN (or 0) for infinite losses. From logits it computes
  the row normalisers itself and stores them for the sweep.
- ``backward``: one program per sample runs the beta recursion and rewrites the blank and label
  entries of its rows (``grad_nll * (exp(lp) - posterior)``); it runs after ``grad`` on the stream.

Inside a recursion program, the states of a time step are processed in tiles of ``BLOCK_S`` (one tile
when 2S+1 fits: up to 4096 states forward, 2048 backward); the s-1 / s-2 (forward) and s+1 / s+2 (backward)
neighbours of a state may sit in another thread or tile, so every step reads the previous step's row
back from global memory (``log_alpha`` forward, a two-row beta scratch backward). One program owns
every state of its sample, so a CTA barrier between time steps is the only synchronisation needed,
and there is no cap on S. Samples never share a program: long targets get wide tiles and more warps
(``_TIERS``), short ones a single warp (``benchmarks/NOTES.md``, "CTC on GPU", explains the choice).

The gradient of a class is gathered without atomics: blank is the sum over even states; a label's
posterior is summed over all its occurrences in the target by a segmented scan over the positions
sorted by label (sorted once per call by torch on the device), and the last position of each run
writes it: O(S log S) per frame where a pairwise search over repeats was O(S^2) (the first H200 run
timed that search at 140 us a frame for S=1200). Summation orders are fixed, so results are
bitwise reproducible.

Memory besides the outputs: the (T, N) row normalisers from logits, beta (N, 2, W) and two (N, S)
rows (posteriors, the sorted label order). ``log_alpha`` holds -inf outside the frames
t < input_length and states s <= 2 * target_length.

Launches: every grid is one-dimensional (axis 0 allows 2**31 - 1 programs, so no batch size reaches a
grid limit; larger launches would run in chunks of ``MAX_GRID_PROGRAMS``), and CUDA launches run under
the tensors' device, whatever the current device is.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
import triton
import triton.language as tl

# Largest state tile; targets with 2S+1 above it are processed in several tiles per time step.
# Tests lower it to exercise the tiling on small shapes.
MAX_STATE_BLOCK = 4096
# Largest class tile of the loops over C (row normalisers, gradient rows); lowered by tests likewise.
MAX_CLASS_BLOCK = 1024
# Most programs of one launch (grid axis 0 allows 2**31 - 1); more run as several launches. Tests lower it.
MAX_GRID_PROGRAMS = 2**31 - 1

# (state tile, warps) of the recursions: the launchers pick the first tier whose tile holds all 2S+1 states.
# The backward sweep holds more per state: its widest spill-free tile is 2048 states (kernel_report.py), and
# ptxas spills float64's 512-state tile at 8 warps (80 registers) but not at 16.
# float64 holds twice the registers per state: its widest spill-free tile is 2048 states, forward too.
_FLOAT64_STATE_BLOCK = 2048
_TIERS = {
    "forward": ((32, 1), (128, 4), (512, 8), (2048, 16), (4096, 16)),
    "backward": ((32, 1), (128, 4), (512, 16), (2048, 16)),
}
# (largest C, rows per program, class tile, warps) of the row-parallel launches, first match wins.
# Tiles of 1024 entries at most, 8 per thread (float64 from logits holds 5 live values per entry: spill-free).
_ROW_TIERS = ((64, 8, 64, 4), (512, 2, 512, 4), (None, 1, 1024, 8))

# The tunable launches and their candidate configs (``forced_config`` replaces the built-in choice).
# "forward" / "backward": BLOCK_S (state tile) and num_warps; "lse" / "grad": BLOCK_R (rows per program),
# BLOCK_C (class tile) and num_warps. All compile without spills on sm_80 and sm_90 (kernel_report.py).
CONFIG_SPACE: dict[str, list[dict[str, int]]] = {
    "forward": [{"BLOCK_S": b, "num_warps": w} for b, w in _TIERS["forward"]] + [{"BLOCK_S": 1024, "num_warps": 8}],
    # No 1024-state candidate backward: ptxas spills float64's at 8 and at 16 warps.
    "backward": [{"BLOCK_S": b, "num_warps": w} for b, w in _TIERS["backward"]],
    "lse": [{"BLOCK_R": r, "BLOCK_C": c, "num_warps": w} for _, r, c, w in _ROW_TIERS]
    + [{"BLOCK_R": 4, "BLOCK_C": 256, "num_warps": 4}],
    "grad": [{"BLOCK_R": r, "BLOCK_C": c, "num_warps": w} for _, r, c, w in _ROW_TIERS]
    + [{"BLOCK_R": 4, "BLOCK_C": 256, "num_warps": 4}],
}
_FORCED: dict[str, dict[str, int]] = {}


@contextlib.contextmanager
def forced_config(kernel: str, config: dict[str, int]) -> Iterator[None]:
    """Launch ``kernel`` (a key of ``CONFIG_SPACE``) with ``config`` inside the block; tiles are still
    clipped to the problem (BLOCK_C to C's power of two, every tile to the MAX_* caps)."""
    if kernel not in CONFIG_SPACE:
        raise ValueError(f"unknown CTC kernel {kernel!r}; expected one of {sorted(CONFIG_SPACE)}")
    outer = _FORCED.get(kernel)
    _FORCED[kernel] = dict(config)
    try:
        yield
    finally:
        if outer is None:
            _FORCED.pop(kernel, None)
        else:
            _FORCED[kernel] = outer


@triton.jit
def _logaddexp3(a, b, c):
    """log(exp(a) + exp(b) + exp(c)), -inf (not NaN) when all three are -inf."""
    m = tl.maximum(tl.maximum(a, b), c)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return tl.log(tl.exp(a - m_ref) + tl.exp(b - m_ref) + tl.exp(c - m_ref)) + m_ref


@triton.jit
def _rows_logsumexp(x_ptr, rows, R, C, cdt: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_R,) logsumexp of rows ``rows`` (int64) of the (R, C) logits at x_ptr, in cdt, one read pass;
    NaN where log_softmax is NaN on the row (a NaN or +inf logit, or only -inf)."""
    offs = tl.arange(0, BLOCK_C)
    row_ok = rows < R
    m = tl.full([BLOCK_R, BLOCK_C], float("-inf"), cdt)
    s = tl.zeros([BLOCK_R, BLOCK_C], cdt)
    bad = tl.zeros([BLOCK_R, BLOCK_C], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs
        ok = row_ok[:, None] & (c < C)[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + c[None, :], mask=ok, other=float("-inf")).to(cdt)
        bad = tl.maximum(bad, (~(x < float("inf"))).to(tl.int32))
        m_new = tl.maximum(m, x)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.exp(x - m_ref)
        m = m_new
    row_max = tl.max(m, 1)
    ref = tl.where(row_max == float("-inf"), 0.0, row_max)
    lse = tl.log(tl.sum(s * tl.exp(m - ref[:, None]), 1)) + ref
    nan_row = (tl.max(bad, 1) > 0) | (row_max == float("-inf"))
    return tl.where(nan_row, float("nan"), lse)


@triton.jit
def _ctc_row_lse_kernel(x_ptr, lse_ptr, R, C, pid_base, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """lse[r] for the R = T*N rows of (T, N, C) logits (see ``_rows_logsumexp``), in lse's dtype."""
    rows = tl.cast(tl.program_id(0) + pid_base, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    lse = _rows_logsumexp(x_ptr, rows, R, C, lse_ptr.dtype.element_ty, BLOCK_R, BLOCK_C)
    tl.store(lse_ptr + rows, lse, mask=rows < R)


@triton.jit
def _forward_labels(tgt_row, s, n_states, blank):
    """Per state s: whether it is used (s < 2L+1), its class, and whether it may skip from s-2."""
    active = s < n_states
    odd = (s % 2) == 1
    lab = tl.load(tgt_row + (s - 1) // 2, mask=active & odd, other=0).to(tl.int32)
    lab = tl.where(odd, lab, blank)
    lab2 = tl.load(tgt_row + (s - 3) // 2, mask=active & odd & (s >= 3), other=0).to(tl.int32)
    return active, lab, odd & (s >= 3) & (lab != lab2)


@triton.jit
def _emissions(lp_ptr, lse_ptr, t, n64, N, C, lab, mask, row_ok, cdt: tl.constexpr, FROM_LOGITS: tl.constexpr):
    """log-probs of classes lab at frame t of sample n (-inf where not mask; row_ok: frame t exists), in cdt."""
    row = tl.cast(t, tl.int64) * N + n64
    lp = tl.load(lp_ptr + row * C + lab, mask=mask, other=float("-inf")).to(cdt)
    if FROM_LOGITS:
        lp = lp - tl.load(lse_ptr + row, mask=row_ok, other=0.0).to(cdt)
    return lp


@triton.jit
def _alpha_states(prev, s, active, skip, lp, t, cdt: tl.constexpr):
    """alpha of frame t at states s from the previous frame's row at prev and the emissions lp."""
    first = t == 0
    # Frame 0 starts states 0 and 1 only: the others stay -inf, even for a NaN log-prob (as torch).
    lp = tl.where(first & (s >= 2), float("-inf"), lp)
    # t = 0 reads a virtual row that is 0 at state 0 only: alpha[0] = lp at states 0 and 1.
    a0 = tl.load(prev + s, mask=active & (t > 0), other=float("-inf")).to(cdt)
    a0 = tl.where(first & (s == 0), 0.0, a0)
    a1 = tl.load(prev + s - 1, mask=active & (s >= 1) & (t > 0), other=float("-inf")).to(cdt)
    a1 = tl.where(first & (s == 1), 0.0, a1)
    a2 = tl.load(prev + s - 2, mask=active & skip & (t > 0), other=float("-inf")).to(cdt)
    return _logaddexp3(a0, a1, a2) + lp


@triton.jit
def _ctc_forward_kernel(
    lp_ptr, lse_ptr, tgt_ptr, il_ptr, tl_ptr, nll_ptr, la_ptr,
    N, T, C, S, blank, pid_base,
    FROM_LOGITS: tl.constexpr, BLOCK_S: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """Program n: alpha rows t < input_length[n] over states s <= 2L (log_alpha arrives filled with -inf).

    lse_ptr: (T, N) row normalisers (from logits; unused otherwise). ONE_TILE: 2S+1 <= BLOCK_S.
    """
    n = tl.program_id(0) + pid_base
    n64 = tl.cast(n, tl.int64)
    cdt: tl.constexpr = la_ptr.dtype.element_ty
    Tn = tl.load(il_ptr + n).to(tl.int32)
    L = tl.load(tl_ptr + n).to(tl.int32)
    W = 2 * S + 1
    n_states = 2 * L + 1
    tgt_row = tgt_ptr + n64 * S
    la_n = la_ptr + n64 * T * W
    offs = tl.arange(0, BLOCK_S)
    if ONE_TILE:
        # The labels stay in registers, and frame t+1's log-probs are gathered while frame t is computed:
        # the gather's memory latency overlaps the recursion's instead of adding to it.
        active, lab, skip = _forward_labels(tgt_row, offs, n_states, blank)
        # Per-lane flags: the interpreter mishandles a scalar bool combined with a vector one.
        lanes = offs * 0
        lp_next = _emissions(lp_ptr, lse_ptr, 0, n64, N, C, lab, active & (lanes < Tn), Tn > 0, cdt, FROM_LOGITS)
        for t in range(0, Tn):
            lp = lp_next
            more = t + 1 < Tn
            lp_next = _emissions(lp_ptr, lse_ptr, t + 1, n64, N, C, lab, active & (lanes + t + 1 < Tn), more, cdt,
                                 FROM_LOGITS)
            cur = la_n + tl.cast(t, tl.int64) * W
            tl.store(cur + offs, _alpha_states(cur - W, offs, active, skip, lp, t, cdt), mask=active)
            # The next step reads states written by other threads of this program.
            tl.debug_barrier()
    else:
        for t in range(0, Tn):
            cur = la_n + tl.cast(t, tl.int64) * W
            for s0 in range(0, n_states, BLOCK_S):
                s = s0 + offs
                active, lab, skip = _forward_labels(tgt_row, s, n_states, blank)
                lp = _emissions(lp_ptr, lse_ptr, t, n64, N, C, lab, active, t < Tn, cdt, FROM_LOGITS)
                tl.store(cur + s, _alpha_states(cur - W, s, active, skip, lp, t, cdt), mask=active)
            tl.debug_barrier()
    last = la_n + tl.cast(tl.maximum(Tn, 1) - 1, tl.int64) * W
    a_end = tl.load(last + 2 * L, mask=Tn > 0, other=float("-inf")).to(cdt)
    a_lab = tl.load(last + 2 * L - 1, mask=(Tn > 0) & (L > 0), other=float("-inf")).to(cdt)
    nll = -_logaddexp3(a_end, a_lab, tl.full([], float("-inf"), cdt))
    # No frame at all: the empty target has probability 1, any other 0.
    nll = tl.where(Tn > 0, nll, tl.where(L == 0, 0.0, float("inf")))
    tl.store(nll_ptr + n, nll)


@triton.jit
def _ctc_grad_fill_kernel(
    grad_ptr, gn_ptr, lp_ptr, lse_ptr, il_ptr, nll_ptr,
    R, N, C, zero_infinity, pid_base,
    FROM_LOGITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Every entry of grad (T, N, C), rows r = t*N + n in tiles of BLOCK_R rows.

    Frames t < input_length[n] of a finite loss: grad_nll[n] * exp(lp - lse) (the backward sweep then
    rewrites the blank and label entries). Frames past the input: 0. Frames t < input_length of a NaN
    or +inf loss: NaN, or 0 for +inf with zero_infinity (as torch). From logits the row normalisers are
    computed here and stored to lse_ptr (T, N) for the sweep; a row log_softmax makes NaN is NaN
    everywhere, past the input too (log_softmax's backward).
    """
    cdt: tl.constexpr = nll_ptr.dtype.element_ty
    gdt: tl.constexpr = grad_ptr.dtype.element_ty
    rows = tl.cast(tl.program_id(0) + pid_base, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    n = rows % N
    t = rows // N
    Tn = tl.load(il_ptr + n, mask=row_ok, other=0)
    gn = tl.load(gn_ptr + n, mask=row_ok, other=0.0).to(cdt)
    nll = tl.load(nll_ptr + n, mask=row_ok, other=0.0).to(cdt)
    if FROM_LOGITS:
        lse = _rows_logsumexp(lp_ptr, rows, R, C, cdt, BLOCK_R, BLOCK_C)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
    else:
        lse = tl.zeros([BLOCK_R], cdt)
    live = t < Tn
    use_exp = live & (tl.abs(nll) < float("inf"))
    bad = tl.where((nll == float("inf")) & (zero_infinity != 0), 0.0, float("nan"))
    value = tl.where(live, bad, 0.0).to(cdt)
    if FROM_LOGITS:
        value = tl.where(lse != lse, float("nan"), value)
    offs = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs
        ok = row_ok[:, None] & (c < C)[None, :]
        at = rows[:, None] * C + c[None, :]
        x = tl.load(lp_ptr + at, mask=ok & use_exp[:, None], other=float("-inf")).to(cdt)
        g = tl.where(use_exp[:, None], gn[:, None] * tl.exp(x - lse[:, None]), value[:, None])
        tl.store(grad_ptr + at, g.to(gdt), mask=ok)


@triton.jit
def _backward_labels(tgt_row, s, n_states, blank):
    """Per state s: whether it is used, whether it is a label state, its class, and whether s+2 may skip to it."""
    active = s < n_states
    odd = (s % 2) == 1
    lab = tl.load(tgt_row + (s - 1) // 2, mask=active & odd, other=0).to(tl.int32)
    lab = tl.where(odd, lab, blank)
    lab2 = tl.load(tgt_row + (s + 1) // 2, mask=odd & (s + 2 < n_states), other=0).to(tl.int32)
    return active, odd, lab, odd & (s + 2 < n_states) & (lab != lab2)


@triton.jit
def _beta_states(beta_next, s, active, skip, lp, alpha, nll, is_last, not_last, n_states):
    """(beta including the emission at t, posterior) at states s, from the next frame's beta row at beta_next,
    the emissions lp and alpha of frame t."""
    cdt: tl.constexpr = lp.dtype
    # beta excluding the emission at t; at the last frame 1 on the two final states.
    b0 = tl.load(beta_next + s, mask=active & not_last, other=float("-inf")).to(cdt)
    b0 = tl.where(is_last & active & (s >= n_states - 2), 0.0, b0)
    b1 = tl.load(beta_next + s + 1, mask=(s + 1 < n_states) & not_last, other=float("-inf")).to(cdt)
    b2 = tl.load(beta_next + s + 2, mask=skip & not_last, other=float("-inf")).to(cdt)
    b_excl = _logaddexp3(b0, b1, b2)
    alpha = tl.where(alpha < float("inf"), alpha, float("-inf"))  # NaN / +inf: states that reach no end
    post = tl.where(active, tl.exp(alpha + b_excl + nll), 0.0)
    # The loss is finite, so no NaN or +inf log-prob reaches the end: as probability 0 they change nothing
    # else (as in the C++ kernels), and the gradient shows them through exp(lp).
    return tl.where(lp < float("inf"), b_excl + lp, float("-inf")), post


@triton.jit
def _segment_sum(a, a_starts, b, b_starts):
    """Combine of a segmented inclusive sum: b's partial sum restarts where b's range holds a run start."""
    return tl.where(b_starts != 0, b, a + b), a_starts | b_starts


@triton.jit
def _ctc_backward_kernel(
    grad_ptr, gn_ptr, lp_ptr, lse_ptr, tgt_ptr, il_ptr, tl_ptr, nll_ptr, la_ptr, beta_ptr, post_ptr, order_ptr,
    N, T, C, S, blank, pid_base,
    FROM_LOGITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """Program n: beta by a downward sweep over the frames t < input_length[n] of a finite loss, and the
    blank and label entries of grad[t, n, :] (the others were written by ``_ctc_grad_fill_kernel``).

    lse_ptr: (T, N) row normalisers (from logits; unused otherwise).
    beta_ptr: (N, 2, W) scratch, beta (including the emission at t) of rows t and t+1 alternately.
    post_ptr: (N, max(S, 1)) scratch, posterior of each label position at the current t.
    order_ptr: (N, max(S, 1)) int32, the label positions sorted by label (stable; ``_label_order``) in bits 0-28,
    bit 29 set where a run of equal labels starts and bit 30 where it ends.
    ONE_TILE: 2S+1 <= BLOCK_S.
    """
    n = tl.program_id(0) + pid_base
    n64 = tl.cast(n, tl.int64)
    cdt: tl.constexpr = la_ptr.dtype.element_ty
    gdt: tl.constexpr = grad_ptr.dtype.element_ty
    Tn = tl.load(il_ptr + n).to(tl.int32)
    L = tl.load(tl_ptr + n).to(tl.int32)
    gn = tl.load(gn_ptr + n).to(cdt)
    nll = tl.load(nll_ptr + n).to(cdt)
    # A NaN or +inf loss has no sweep: the fill kernel wrote its rows whole.
    t_sweep = tl.where(tl.abs(nll) < float("inf"), Tn, 0)
    W = 2 * S + 1
    n_states = 2 * L + 1
    tgt_row = tgt_ptr + n64 * S
    la_n = la_ptr + n64 * T * W
    beta_n = beta_ptr + n64 * 2 * W
    post_n = post_ptr + n64 * tl.maximum(S, 1)
    order_n = order_ptr + n64 * tl.maximum(S, 1)
    offs_s = tl.arange(0, BLOCK_S)

    if ONE_TILE:
        # As forward: labels in registers, and the next frame's (t-1) log-probs and alpha row are loaded while
        # frame t is computed.
        s = offs_s
        active, odd, lab, skip = _backward_labels(tgt_row, s, n_states, blank)
        t_top = offs_s * 0 + t_sweep - 1
        lp_next = _emissions(lp_ptr, lse_ptr, t_sweep - 1, n64, N, C, lab, active & (t_top >= 0), t_sweep > 0,
                             cdt, FROM_LOGITS)
        alpha_next = tl.load(la_n + tl.cast(t_sweep - 1, tl.int64) * W + s, mask=active & (t_top >= 0),
                             other=float("-inf")).to(cdt)
    for i in range(0, t_sweep):
        t = t_sweep - 1 - i
        t64 = tl.cast(t, tl.int64)
        lp_row = lp_ptr + (t64 * N + n64) * C
        g_row = grad_ptr + (t64 * N + n64) * C
        if FROM_LOGITS:
            lse = tl.load(lse_ptr + t64 * N + n64).to(cdt)
        else:
            lse = tl.zeros([], cdt)
        beta_cur = beta_n + (t % 2) * W
        beta_next = beta_n + ((t + 1) % 2) * W
        alpha_row = la_n + t64 * W
        # Per-lane flags: the interpreter mishandles a scalar bool combined with a vector one.
        t_lanes = offs_s * 0 + t
        is_last = t_lanes == Tn - 1
        not_last = t_lanes != Tn - 1
        if ONE_TILE:
            lp = lp_next
            alpha = alpha_next
            earlier = active & (t_lanes > 0)
            lp_next = _emissions(lp_ptr, lse_ptr, t - 1, n64, N, C, lab, earlier, t > 0, cdt, FROM_LOGITS)
            alpha_next = tl.load(alpha_row - W + s, mask=earlier, other=float("-inf")).to(cdt)
            beta, post = _beta_states(beta_next, s, active, skip, lp, alpha, nll, is_last, not_last, n_states)
            tl.store(beta_cur + s, beta, mask=active)
            tl.store(post_n + (s - 1) // 2, post, mask=active & odd)
            blank_post = tl.sum(tl.where(odd, 0.0, post), 0)
        else:
            blank_post = tl.zeros([], cdt)
            for s0 in range(0, n_states, BLOCK_S):
                s = s0 + offs_s
                active, odd, lab, skip = _backward_labels(tgt_row, s, n_states, blank)
                lp = tl.load(lp_row + lab, mask=active, other=float("-inf")).to(cdt) - lse
                alpha = tl.load(alpha_row + s, mask=active, other=float("-inf")).to(cdt)
                beta, post = _beta_states(beta_next, s, active, skip, lp, alpha, nll, is_last, not_last, n_states)
                tl.store(beta_cur + s, beta, mask=active)
                tl.store(post_n + (s - 1) // 2, post, mask=active & odd)
                blank_post += tl.sum(tl.where(odd, 0.0, post), 0)
        # The label gather reads posteriors written by other threads.
        tl.debug_barrier()
        lp_blank = tl.load(lp_row + blank).to(cdt) - lse
        tl.store(g_row + blank, (gn * (tl.exp(lp_blank) - blank_post)).to(gdt))
        # A label's posterior is the sum over its positions in the target: a segmented scan over the positions
        # sorted by label leaves each run's total at its last position, which alone writes the label's entry.
        # A run that crosses tiles continues from the previous tile's last partial sum (carry).
        carry = tl.zeros([], cdt)
        for k0 in range(0, L, BLOCK_L):
            k = k0 + tl.arange(0, BLOCK_L)
            k_ok = k < L
            code = tl.load(order_n + k, mask=k_ok, other=0)
            pos = code & 0x1FFFFFFF
            starts = (code >> 29) & 1
            run_end = k_ok & (((code >> 30) & 1) != 0)
            run_sum, _ = tl.associative_scan((tl.load(post_n + pos, mask=k_ok, other=0.0), starts), 0, _segment_sum)
            run_sum = tl.where(tl.cumsum(starts, 0) > 0, run_sum, run_sum + carry)
            carry = tl.sum(tl.where(k == k0 + BLOCK_L - 1, run_sum, 0.0), 0)
            run_lab = tl.load(tgt_row + pos, mask=run_end, other=0).to(tl.int32)
            x = tl.load(lp_row + run_lab, mask=run_end, other=0.0).to(cdt) - lse
            tl.store(g_row + run_lab, (gn * (tl.exp(x) - run_sum)).to(gdt), mask=run_end)
        # Row t of beta and the posteriors are rewritten by the next step.
        tl.debug_barrier()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tier(num_states: int, kernel: str) -> tuple[int, int]:
    """(BLOCK_S, num_warps) of ``kernel`` ("forward" / "backward") for 2S+1 states, capped by MAX_STATE_BLOCK."""
    tiers = _TIERS[kernel]
    block, warps = next(((b, w) for b, w in tiers if num_states <= b), tiers[-1])
    return min(block, MAX_STATE_BLOCK), warps


def _label_blocks(block_s: int, dtype: torch.dtype) -> dict[str, int]:
    """Label tile of the backward sweep's per-label sums for a state tile of block_s (2S+1 states hold S labels).
    float64's scan over 1024 labels spilled 4-40 B at the 128-register cap (sm_80 / sm_90, triton 3.6 and 3.9):
    it takes 512-label tiles."""
    block_l = max(block_s // 2, 1)
    return {"BLOCK_L": min(block_l, 512) if dtype == torch.float64 else block_l}


def _label_order(targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """(N, max(S, 1)) int32: each sample's label positions sorted by label, stably (padding last), with run-start
    (bit 29) and run-end (bit 30) flags: the layout of the backward sweep's segmented per-label sums. Device ops
    only (no host sync)."""
    N, S = targets.shape
    if S == 0:
        return torch.zeros((N, 1), dtype=torch.int32, device=targets.device)
    if S > 0x1FFFFFFF:
        raise ValueError(f"seqfast's Triton CTC kernels take at most 2**29 - 1 target positions, got {S}")
    pos = torch.arange(S, device=targets.device)
    key = torch.where(pos < target_lengths[:, None], targets, torch.iinfo(torch.int64).max)
    key, order = torch.sort(key, dim=1, stable=True)
    starts = torch.ones_like(key, dtype=torch.int64)
    starts[:, 1:] = (key[:, 1:] != key[:, :-1]).to(torch.int64)
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    return (order | (starts << 29) | (ends << 30)).to(torch.int32)


# Register cap of the backward sweep, 128 (the most 16 warps allow) for every dtype: left to itself, ptxas stopped
# float64 at 40 registers (4-24 B spilled under triton 3.6, tiles of several steps and from logits), and the one-tile
# 2048-state sweep of the other dtypes at 64 under triton 3.9 on sm_80 (20-32 B spilled, 104 registers and none
# capped). Capped: 0 spill on sm_80 and sm_90 under triton 3.6 and 3.9.
_BACKWARD_MAXNREG = 128


def _blocks(num_states: int, dtype: torch.dtype, kernel: str = "forward") -> dict[str, Any]:
    """Tiles and warps of a recursion launch for 2S+1 states and log_probs of ``dtype``: the built-in tier,
    or the config forced for ``kernel`` ("forward" / "backward")."""
    forced = _FORCED.get(kernel)
    if forced is not None:
        block_s, warps = min(int(forced["BLOCK_S"]), MAX_STATE_BLOCK), int(forced["num_warps"])
    else:
        block_s, warps = _tier(num_states, kernel)
    block_s = min(block_s, _FLOAT64_STATE_BLOCK) if dtype == torch.float64 else block_s
    return {"BLOCK_S": block_s, **_label_blocks(block_s, dtype), "num_warps": warps}


def _row_blocks(C: int, kernel: str) -> dict[str, int]:
    """BLOCK_R, BLOCK_C and num_warps of a row-parallel launch ("lse" / "grad") over C classes."""
    forced = _FORCED.get(kernel)
    if forced is not None:
        rows, block_c, warps = int(forced["BLOCK_R"]), int(forced["BLOCK_C"]), int(forced["num_warps"])
    else:
        _, rows, block_c, warps = next(t for t in _ROW_TIERS if t[0] is None or C <= t[0])
    # Short rows: a tile as wide as C, not wider (fewer registers than the compiled-for tile).
    return {"BLOCK_R": rows, "BLOCK_C": min(block_c, MAX_CLASS_BLOCK, triton.next_power_of_2(max(C, 1))),
            "num_warps": warps}


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on torch's current CUDA device: make it the tensors' device (CPU: nothing to do)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(kernel: Any, programs: int, args: tuple, **meta: Any) -> None:
    """``kernel[(programs,)](*args, pid_base, **meta)`` in launches of at most MAX_GRID_PROGRAMS programs;
    the kernel adds ``pid_base`` (its last positional argument) to ``program_id(0)``."""
    for base in range(0, programs, MAX_GRID_PROGRAMS):
        kernel[(min(MAX_GRID_PROGRAMS, programs - base),)](*args, base, **meta)


def _row_lse(log_probs: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """(T, N) log_softmax normalisers of (T, N, C) contiguous logits, in cdt (see ``_rows_logsumexp``)."""
    T, N, C = log_probs.shape
    lse = torch.empty((T, N), dtype=cdt, device=log_probs.device)
    b = _row_blocks(C, "lse")
    _launch(_ctc_row_lse_kernel, triton.cdiv(T * N, b["BLOCK_R"]), (log_probs, lse, T * N, C),
            BLOCK_R=b["BLOCK_R"], BLOCK_C=b["BLOCK_C"], num_warps=b["num_warps"], num_stages=1)
    return lse


def _full_table_only(alpha_every: int) -> None:
    if alpha_every != 1:
        raise ValueError(f"seqfast's Triton CTC kernels keep every alpha row: alpha_every must be 1, got {alpha_every}")


def ctc_loss_forward(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
    zero_infinity: bool,
    from_logits: bool,
    keep_alpha: bool = True,
    alpha_every: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(neg_log_likelihood (N,), log_alpha (N, T, 2S+1), or (N, 0, 0) without keep_alpha) in the compute
    dtype; see the op docstring. The backward kernel reads the whole table: alpha_every must be 1."""
    _full_table_only(alpha_every)
    T, N, C = log_probs.shape
    S = targets.shape[1]
    W = 2 * S + 1
    cdt = _compute_dtype(log_probs.dtype)
    nll = torch.empty((N,), dtype=cdt, device=log_probs.device)
    log_alpha = torch.full((N, T, W), float("-inf"), dtype=cdt, device=log_probs.device)
    if N == 0:
        return nll, log_alpha if keep_alpha else log_alpha.new_empty((N, 0, 0))
    log_probs = log_probs.contiguous()
    with _device_guard(log_probs.device):
        lse = _row_lse(log_probs, cdt) if from_logits else nll  # nll: a placeholder the kernel never reads
        b = _blocks(W, log_probs.dtype, "forward")
        _launch(
            _ctc_forward_kernel, N,
            (log_probs, lse, targets.contiguous(), input_lengths.contiguous(), target_lengths.contiguous(),
             nll, log_alpha, N, T, C, S, blank),
            FROM_LOGITS=bool(from_logits), BLOCK_S=b["BLOCK_S"], ONE_TILE=W <= b["BLOCK_S"],
            num_warps=b["num_warps"], num_stages=1,
        )
    # The kernel needs the whole table as its working memory; without keep_alpha it is scratch.
    return nll, log_alpha if keep_alpha else log_alpha.new_empty((N, 0, 0))


def ctc_loss_backward(
    grad_nll: torch.Tensor,
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    neg_log_likelihood: torch.Tensor,
    log_alpha: torch.Tensor,
    blank: int,
    zero_infinity: bool,
    from_logits: bool,
    alpha_every: int = 1,
) -> torch.Tensor:
    """grad (T, N, C) in log_probs' dtype: grad_nll[n] * (exp(lp) - posterior), 0 past input_lengths[n]."""
    _full_table_only(alpha_every)
    T, N, C = log_probs.shape
    S = targets.shape[1]
    W = 2 * S + 1
    cdt = log_alpha.dtype
    device = log_probs.device
    grad = torch.empty((T, N, C), dtype=log_probs.dtype, device=device)
    if grad.numel() == 0:
        return grad
    log_probs = log_probs.contiguous()
    input_lengths = input_lengths.contiguous()
    gn = grad_nll.to(cdt).contiguous()
    nll = neg_log_likelihood.to(cdt).contiguous()
    lse = torch.empty((T, N) if from_logits else (1,), dtype=cdt, device=device)
    beta = torch.empty((N, 2, W), dtype=cdt, device=device)
    post = torch.empty((N, max(S, 1)), dtype=cdt, device=device)
    targets, target_lengths = targets.contiguous(), target_lengths.contiguous()
    order = _label_order(targets, target_lengths)
    with _device_guard(device):
        r = _row_blocks(C, "grad")
        _launch(
            _ctc_grad_fill_kernel, triton.cdiv(T * N, r["BLOCK_R"]),
            (grad, gn, log_probs, lse, input_lengths, nll, T * N, N, C, int(bool(zero_infinity))),
            FROM_LOGITS=bool(from_logits), BLOCK_R=r["BLOCK_R"], BLOCK_C=r["BLOCK_C"],
            num_warps=r["num_warps"], num_stages=1,
        )
        b = _blocks(W, log_probs.dtype, "backward")
        _launch(
            _ctc_backward_kernel, N,
            (grad, gn, log_probs, lse, targets, input_lengths, target_lengths, nll,
             log_alpha.contiguous(), beta, post, order, N, T, C, S, blank),
            FROM_LOGITS=bool(from_logits), BLOCK_S=b["BLOCK_S"], BLOCK_L=b["BLOCK_L"],
            ONE_TILE=W <= b["BLOCK_S"], num_warps=b["num_warps"], num_stages=1,
            maxnreg=_BACKWARD_MAXNREG,
        )
    return grad


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
_INT_ARGS = ("N", "T", "C", "S", "blank", "R", "zero_infinity", "pid_base")


def _signature(fn: Any, dtype: torch.dtype, constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton types of fn's arguments: log-prob and gradient pointers in dtype, compute-dtype scratch,
    int64 targets and lengths, int32 flags and scalars."""
    name, ct = _TRITON_TYPES[dtype], _TRITON_TYPES[_compute_dtype(dtype)]
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in ("lp_ptr", "grad_ptr", "x_ptr"):
            sig[arg] = f"*{name}"
        elif arg in ("tgt_ptr", "il_ptr", "tl_ptr"):
            sig[arg] = "*i64"
        elif arg == "order_ptr":
            sig[arg] = "*i32"
        elif arg.endswith("_ptr"):
            sig[arg] = f"*{ct}"
        else:
            assert arg in _INT_ARGS, arg
            sig[arg] = "i32"
    return sig


def _entry(kernel: str, fn: Any, dtype: torch.dtype, constexprs: dict[str, Any], warps: int,
           label: str) -> dict[str, Any]:
    return {"kernel": kernel, "fn": fn, "signature": _signature(fn, dtype, constexprs), "constexprs": constexprs,
            "num_warps": warps, "num_stages": 1, "config": f"{_TRITON_TYPES[dtype]}-{label}"}


def report_configs() -> list[dict[str, Any]]:
    """Every (kernel, config) the launchers can launch, for compiling outside a launch.

    One dict per kernel x input dtype x from_logits x config of ``CONFIG_SPACE`` (which holds the built-in
    tiers at the default caps; narrower class tiles for short rows are clipped copies of these):
    ``kernel``, ``fn`` (the JITFunction; a plain one only without TRITON_INTERPRET), ``signature``
    (argument -> Triton type, "constexpr" for constexpr arguments), ``constexprs``, ``num_warps``,
    ``num_stages``, ``config`` (short label); ``options`` ({"maxnreg": ..}, label ending ``-r<cap>``) where the
    launcher caps registers.
    """
    configs = []
    for dtype in _TRITON_TYPES:
        for cfg in CONFIG_SPACE["lse"]:
            const = {"BLOCK_R": cfg["BLOCK_R"], "BLOCK_C": cfg["BLOCK_C"]}
            label = f"r{cfg['BLOCK_R']}-c{cfg['BLOCK_C']}-w{cfg['num_warps']}"
            configs.append(_entry("ctc_row_lse", _ctc_row_lse_kernel, dtype, const, cfg["num_warps"], label))
        for from_logits in (False, True):
            src = "logits" if from_logits else "logprobs"
            for kernel, fn in (("forward", _ctc_forward_kernel), ("backward", _ctc_backward_kernel)):
                for cfg, one_tile in itertools.product(CONFIG_SPACE[kernel], (True, False)):
                    if dtype == torch.float64 and cfg["BLOCK_S"] > _FLOAT64_STATE_BLOCK:
                        continue  # clipped by the launcher
                    const = {"FROM_LOGITS": from_logits, "BLOCK_S": cfg["BLOCK_S"]}
                    if kernel == "backward":
                        const.update(_label_blocks(cfg["BLOCK_S"], dtype))
                    const["ONE_TILE"] = one_tile
                    label = f"{src}-S{cfg['BLOCK_S']}{'' if one_tile else 'x'}-w{cfg['num_warps']}"
                    if kernel == "backward":
                        label += f"-r{_BACKWARD_MAXNREG}"
                    configs.append(_entry(f"ctc_{kernel}", fn, dtype, const, cfg["num_warps"], label))
                    if kernel == "backward":
                        configs[-1]["options"] = {"maxnreg": _BACKWARD_MAXNREG}
            for cfg in CONFIG_SPACE["grad"]:
                const = {"FROM_LOGITS": from_logits, "BLOCK_R": cfg["BLOCK_R"], "BLOCK_C": cfg["BLOCK_C"]}
                label = f"{src}-r{cfg['BLOCK_R']}-c{cfg['BLOCK_C']}-w{cfg['num_warps']}"
                configs.append(_entry("ctc_grad_fill", _ctc_grad_fill_kernel, dtype, const, cfg["num_warps"],
                                      label))
    return configs
