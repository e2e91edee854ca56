"""Triton kernels of the CTC decoding ops (``seqfast/ops/ctc_decode.py`` has the schemas, semantics and ties).

``log_probs`` (T, N, C) is read through its strides; lengths are (N,) int64, targets (N, S) int64.

Greedy decoding, two launches:

- ``argmax``: the argmax of every row (t, n) with t < input_lengths[n], fully parallel over the T*N rows
  (``torch.argmax``'s: the first NaN, else the first maximum), into an (T, N) int32 scratch.
- ``collapse``: one program per sample walks its frames in tiles, keeps a label that differs from the
  previous frame's and is not blank, and places it by a prefix sum over the tile.

Forced alignment, one launch: one program per sample runs the Viterbi recursion over the 2L+1 states of its
extended target (tiles of ``BLOCK_S`` states), keeping two rows of scores in an (N, 2, W+2) scratch (a state's
s-1 / s-2 neighbours may sit in another thread: every step reads the previous row back, after a barrier) and
a one-byte backpointer per state and frame in (N, T, W), then walks back from the end. Unreached states hold
NaN, and real NaN sums become -inf, exactly as the C++ kernel (csrc/ctc_decode.cpp) does, so both give the
same paths. The tiling, grid chunking and device guard are the CTC loss kernels' (kernels/ctc_loss.py).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from seqfast.kernels.ctc_loss import (
    _ROW_TIERS,
    _TIERS,
    _compute_dtype,
    _device_guard,
    _forward_labels,
    _launch,
    _row_blocks,
    _tier,
)

_BLOCK_T = 128  # frames per tile of the greedy collapse
_NO_INDEX = 2**31 - 1


@triton.jit
def _ctc_row_argmax_kernel(lp_ptr, il_ptr, best_ptr, R, N, C, st_t, st_n, st_c, pid_base,
                           cdt: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """best[r] = argmax of row r = t*N + n (int32), for the rows with t < input_lengths[n]."""
    rows = tl.cast(tl.program_id(0) + pid_base, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = rows // N
    n = rows % N
    valid = (rows < R) & (t < tl.load(il_ptr + n, mask=rows < R, other=0))
    base = lp_ptr + t * st_t + n * st_n
    cols = tl.arange(0, BLOCK_C)
    best_v = tl.full([BLOCK_R], float("-inf"), cdt)
    best_i = tl.full([BLOCK_R], 2**31 - 1, tl.int32)
    nan_i = tl.full([BLOCK_R], 2**31 - 1, tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        m = valid[:, None] & (c[None, :] < C)
        x = tl.load(base[:, None] + tl.cast(c, tl.int64)[None, :] * st_c, mask=m, other=float("-inf")).to(cdt)
        isnan = (x != x) & m
        nan_i = tl.minimum(nan_i, tl.min(tl.where(isnan, c[None, :], 2**31 - 1), axis=1))
        tile_max = tl.max(tl.where(isnan, float("-inf"), x), axis=1)
        tile_i = tl.min(tl.where(m & (x == tile_max[:, None]), c[None, :], 2**31 - 1), axis=1)
        better = (tile_i < 2**31 - 1) & ((tile_max > best_v) | (best_i == 2**31 - 1))
        best_v = tl.where(better, tile_max, best_v)
        best_i = tl.where(better, tile_i, best_i)
    out = tl.where(nan_i < 2**31 - 1, nan_i, tl.where(best_i < 2**31 - 1, best_i, 0))
    tl.store(best_ptr + rows, out, mask=valid)


@triton.jit
def _ctc_greedy_collapse_kernel(best_ptr, il_ptr, tok_ptr, len_ptr, fr_ptr, N, T, blank, pid_base,
                                BLOCK_T: tl.constexpr):
    """Program n: tokens / frames of sample n (arriving filled with blank / -1) and its length."""
    n = tl.program_id(0) + pid_base
    n64 = tl.cast(n, tl.int64)
    Tn = tl.load(il_ptr + n).to(tl.int32)
    offs = tl.arange(0, BLOCK_T)
    k = tl.zeros([], tl.int32)
    for t0 in range(0, Tn, BLOCK_T):
        t = t0 + offs
        valid = t < Tn
        c = tl.load(best_ptr + tl.cast(t, tl.int64) * N + n64, mask=valid, other=blank)
        prev = tl.load(best_ptr + tl.cast(t - 1, tl.int64) * N + n64, mask=valid & (t > 0), other=-1)
        keep = valid & (c != blank) & (c != prev)
        ki = keep.to(tl.int32)
        pos = k + tl.cumsum(ki, axis=0) - 1
        dst = n64 * T + pos
        tl.store(tok_ptr + dst, c.to(tl.int64), mask=keep)
        tl.store(fr_ptr + dst, t.to(tl.int64), mask=keep)
        k += tl.sum(ki, axis=0)
    tl.store(len_ptr + n, k.to(tl.int64))


@triton.jit
def _ctc_viterbi_kernel(
    lp_ptr, tgt_ptr, il_ptr, tl_ptr, alpha_ptr, bp_ptr, path_ptr, score_ptr,
    N, T, S, W, st_t, st_n, st_c, blank, pid_base,
    BLOCK_S: tl.constexpr,
):
    """Program n: the best path of sample n into paths[n, :Tn] / scores[n, :Tn] (arriving as blank / 0).

    alpha_ptr: (N, 2, W+2) scratch in the compute dtype, arriving NaN (its two leading entries per row, states
    -2 and -1, stay NaN); bp_ptr: (N, T, W) int8 scratch; W: the widest 2S+1 of the batch.
    """
    n = tl.program_id(0) + pid_base
    n64 = tl.cast(n, tl.int64)
    cdt: tl.constexpr = alpha_ptr.dtype.element_ty
    Tn = tl.load(il_ptr + n).to(tl.int32)
    L = tl.load(tl_ptr + n).to(tl.int32)
    n_states = 2 * L + 1
    tgt_row = tgt_ptr + n64 * S
    lp_n = lp_ptr + n64 * st_n
    rows = alpha_ptr + n64 * 2 * (W + 2) + 2
    bp_n = bp_ptr + n64 * T * W
    offs = tl.arange(0, BLOCK_S)
    for t in range(0, Tn):
        cur = rows + (t % 2) * (W + 2)
        prev = rows + ((t + 1) % 2) * (W + 2)
        for s0 in range(0, n_states, BLOCK_S):
            s = s0 + offs
            active, lab, skip = _forward_labels(tgt_row, s, n_states, blank)
            e = tl.load(lp_n + tl.cast(t, tl.int64) * st_t + tl.cast(lab, tl.int64) * st_c, mask=active,
                        other=0.0).to(cdt)
            # Frame 0: a virtual previous row that is 0 at state 0 (entered from it: states 0 and 1).
            first = (s * 0 + t) == 0
            a0 = tl.load(prev + s, mask=active & ~first, other=float("nan")).to(cdt)
            a0 = tl.where(first & (s <= 1), 0.0, a0)
            a1 = tl.load(prev + s - 1, mask=active & ~first, other=float("nan")).to(cdt)
            a2 = tl.load(prev + s - 2, mask=active & skip & ~first, other=float("nan")).to(cdt)
            best = a0
            k = tl.zeros([BLOCK_S], tl.int32)
            c1 = (a1 > best) | ((best != best) & (a1 == a1))
            best = tl.where(c1, a1, best)
            k = tl.where(c1, 1, k)
            c2 = (a2 > best) | ((best != best) & (a2 == a2))
            best = tl.where(c2, a2, best)
            k = tl.where(c2, 2, k)
            v = best + e
            v = tl.where((v != v) & (best == best), float("-inf"), v)
            tl.store(cur + s, v, mask=active)
            tl.store(bp_n + tl.cast(t, tl.int64) * W + s, k.to(tl.int8), mask=active)
        # The next step reads states written by other threads of this program.
        tl.debug_barrier()
    last = rows + ((tl.maximum(Tn, 1) - 1) % 2) * (W + 2)
    a_lab = tl.load(last + n_states - 2, mask=(Tn > 0) & (L > 0), other=float("nan")).to(cdt)
    a_end = tl.load(last + n_states - 1, mask=Tn > 0, other=float("nan")).to(cdt)
    # The last label wins ties over the trailing blank.
    s = tl.where((L > 0) & (a_lab == a_lab) & ~(a_end > a_lab), n_states - 2, n_states - 1)
    for i in range(0, Tn):
        t = Tn - 1 - i
        odd = (s % 2) == 1
        c = tl.where(odd, tl.load(tgt_row + tl.maximum(s - 1, 0) // 2, mask=odd, other=0).to(tl.int32), blank)
        out = n64 * T + t
        tl.store(path_ptr + out, c.to(tl.int64))
        tl.store(score_ptr + out, tl.load(lp_n + tl.cast(t, tl.int64) * st_t + tl.cast(c, tl.int64) * st_c))
        step = tl.load(bp_n + tl.cast(t, tl.int64) * W + s, mask=t > 0, other=0).to(tl.int32)
        s = s - step


def ctc_greedy_decode(
    log_probs: torch.Tensor, input_lengths: torch.Tensor, blank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (N, T) int64, lengths (N,) int64, frames (N, T) int64); see the op docstring."""
    T, N, C = log_probs.shape
    device = log_probs.device
    tokens = torch.full((N, T), blank, dtype=torch.int64, device=device)
    frames = torch.full((N, T), -1, dtype=torch.int64, device=device)
    lengths = torch.zeros((N,), dtype=torch.int64, device=device)
    if N == 0 or T == 0:
        return tokens, lengths, frames
    il = input_lengths.contiguous()
    best = torch.empty((T, N), dtype=torch.int32, device=device)
    with _device_guard(device):
        b = _row_blocks(C, "lse")
        _launch(_ctc_row_argmax_kernel, triton.cdiv(T * N, b["BLOCK_R"]),
                (log_probs, il, best, T * N, N, C, *log_probs.stride()),
                cdt=tl.float64 if log_probs.dtype == torch.float64 else tl.float32,
                BLOCK_R=b["BLOCK_R"], BLOCK_C=b["BLOCK_C"], num_warps=b["num_warps"], num_stages=1)
        _launch(_ctc_greedy_collapse_kernel, N, (best, il, tokens, lengths, frames, N, T, blank),
                BLOCK_T=_BLOCK_T, num_warps=4, num_stages=1)
    return tokens, lengths, frames


def ctc_forced_align(
    log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor, target_lengths: torch.Tensor,
    blank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(paths (N, T) int64, scores (N, T) in log_probs' dtype); see the op docstring."""
    T, N, _ = log_probs.shape
    S = targets.shape[1]
    W = 2 * S + 1
    device = log_probs.device
    paths = torch.full((N, T), blank, dtype=torch.int64, device=device)
    scores = torch.zeros((N, T), dtype=log_probs.dtype, device=device)
    if N == 0 or T == 0:
        return paths, scores
    alpha = torch.full((N, 2, W + 2), float("nan"), dtype=_compute_dtype(log_probs.dtype), device=device)
    bp = torch.empty((N, T, W), dtype=torch.int8, device=device)
    block_s, warps = _tier(W, "forward")
    with _device_guard(device):
        _launch(
            _ctc_viterbi_kernel, N,
            (log_probs, targets.contiguous(), input_lengths.contiguous(), target_lengths.contiguous(), alpha, bp,
             paths, scores, N, T, S, W, *log_probs.stride(), blank),
            BLOCK_S=block_s, num_warps=warps, num_stages=1,
        )
    return paths, scores


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _signature(fn: Any, types: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton types of fn's arguments: ``types`` for the pointers, i32 for the integer scalars."""
    return {arg: "constexpr" if arg in constexprs else types.get(arg, "i32") for arg in fn.arg_names}


def report_configs() -> list[dict[str, Any]]:
    """Every (kernel, config) the launchers can launch, for benchmarks/kernel_report.py (see ctc_loss.py's)."""
    configs = []
    for dtype, name in _TRITON_TYPES.items():
        cdt = _compute_dtype(dtype)
        ct = _TRITON_TYPES[cdt]
        for _, rows, block_c, warps in _ROW_TIERS:
            const = {"cdt": tl.float64 if dtype == torch.float64 else tl.float32, "BLOCK_R": rows,
                     "BLOCK_C": block_c}
            sig = _signature(_ctc_row_argmax_kernel, {"lp_ptr": f"*{name}", "il_ptr": "*i64", "best_ptr": "*i32"},
                             const)
            configs.append({"kernel": "ctc_row_argmax", "fn": _ctc_row_argmax_kernel, "signature": sig,
                            "constexprs": const, "num_warps": warps, "num_stages": 1,
                            "config": f"{name}-r{rows}-c{block_c}-w{warps}"})
        for block_s, warps in _TIERS["forward"]:
            const = {"BLOCK_S": block_s}
            sig = _signature(_ctc_viterbi_kernel, {
                "lp_ptr": f"*{name}", "tgt_ptr": "*i64", "il_ptr": "*i64", "tl_ptr": "*i64", "alpha_ptr": f"*{ct}",
                "bp_ptr": "*i8", "path_ptr": "*i64", "score_ptr": f"*{name}"}, const)
            configs.append({"kernel": "ctc_viterbi", "fn": _ctc_viterbi_kernel, "signature": sig, "constexprs": const,
                            "num_warps": warps, "num_stages": 1, "config": f"{name}-S{block_s}-w{warps}"})
    const = {"BLOCK_T": _BLOCK_T}
    sig = _signature(_ctc_greedy_collapse_kernel, {"best_ptr": "*i32", "il_ptr": "*i64", "tok_ptr": "*i64",
                                                   "len_ptr": "*i64", "fr_ptr": "*i64"}, const)
    configs.append({"kernel": "ctc_greedy_collapse", "fn": _ctc_greedy_collapse_kernel, "signature": sig,
                    "constexprs": const, "num_warps": 4, "num_stages": 1, "config": f"t{_BLOCK_T}-w4"})
    return configs
