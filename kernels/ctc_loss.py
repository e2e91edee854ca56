"""Triton kernels of the CTC loss ops (``seqfast/ops/ctc_loss.py`` has the schemas and semantics).

Shapes (see the op docstring): ``log_probs`` (T, N, C), ``targets`` (N, S) int64, lengths (N,) int64,
``log_alpha`` (N, T, W) with W = 2S+1 extended-target states, ``grad`` (T, N, C).

One program per sample runs the whole time recursion. The states of a time step are processed in
tiles of ``BLOCK_S``; the s-1 / s-2 (forward) and s+1 / s+2 (backward) neighbours of a state may sit
in another tile, so every step reads the previous step's row back from global memory (``log_alpha``
forward, a two-row beta scratch backward). One program owns every state of its sample, so a CTA
barrier between time steps is the only synchronisation needed, and there is no cap on S.

The gradient of a class is gathered without atomics: blank is the sum over even states; a label's
posterior is summed over all its occurrences in the target by the first occurrence, which alone
writes it. Summation orders are fixed, so results are bitwise reproducible.

Memory besides the outputs: beta (N, 2, W) and two (N, S) scratch rows (posteriors, first-occurrence
flags). ``log_alpha`` holds -inf outside the frames t < input_length and states s <= 2 * target_length.
From logits, the log_softmax normaliser of each (t, n) row is recomputed where needed, never stored.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

# Largest state tile; targets with 2S+1 above it are processed in several tiles per time step.
# Tests lower it to exercise the tiling on small shapes.
MAX_STATE_BLOCK = 512
# Largest class tile of the loops over C (logsumexp, gradient rows); lowered by tests likewise.
MAX_CLASS_BLOCK = 1024

# (state tile, warps): the launchers pick the first tier whose tile holds all 2S+1 states.
_TIERS = ((32, 1), (128, 4), (512, 8))


@triton.jit
def _logaddexp3(a, b, c):
    """log(exp(a) + exp(b) + exp(c)), -inf (not NaN) when all three are -inf."""
    m = tl.maximum(tl.maximum(a, b), c)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return tl.log(tl.exp(a - m_ref) + tl.exp(b - m_ref) + tl.exp(c - m_ref)) + m_ref


@triton.jit
def _row_logsumexp(row_ptr, C, cdt: tl.constexpr, BLOCK_C: tl.constexpr):
    """logsumexp over the C entries at row_ptr (one (t, n) row of logits), in cdt, one read pass."""
    offs = tl.arange(0, BLOCK_C)
    m_vec = tl.full([BLOCK_C], float("-inf"), cdt)
    s_vec = tl.zeros([BLOCK_C], cdt)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs
        x = tl.load(row_ptr + c, mask=c < C, other=float("-inf")).to(cdt)
        m_new = tl.maximum(m_vec, x)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_vec = s_vec * tl.exp(m_vec - m_ref) + tl.exp(x - m_ref)
        m_vec = m_new
    m = tl.max(m_vec, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return tl.log(tl.sum(s_vec * tl.exp(m_vec - m_ref), 0)) + m_ref


@triton.jit
def _nan_after_log_softmax(row_ptr, C, cdt: tl.constexpr, BLOCK_C: tl.constexpr):
    """Whether log_softmax is NaN on the C logits at row_ptr: a NaN or +inf among them, or only -inf."""
    offs = tl.arange(0, BLOCK_C)
    bad = tl.zeros([BLOCK_C], tl.int32)
    live = tl.zeros([BLOCK_C], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs
        x = tl.load(row_ptr + c, mask=c < C, other=float("-inf")).to(cdt)
        bad = tl.maximum(bad, (~(x < float("inf"))).to(tl.int32))
        live = tl.maximum(live, (x > float("-inf")).to(tl.int32))
    return (tl.max(bad, 0) > 0) | (tl.max(live, 0) == 0)


@triton.jit
def _ctc_forward_kernel(
    lp_ptr, tgt_ptr, il_ptr, tl_ptr, nll_ptr, la_ptr,
    N, T, C, S, blank,
    FROM_LOGITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program n: alpha rows t < input_length[n] over states s <= 2L (log_alpha arrives filled with -inf)."""
    n = tl.program_id(0)
    n64 = tl.cast(n, tl.int64)
    cdt: tl.constexpr = la_ptr.dtype.element_ty
    Tn = tl.load(il_ptr + n).to(tl.int32)
    L = tl.load(tl_ptr + n).to(tl.int32)
    W = 2 * S + 1
    n_states = 2 * L + 1
    tgt_row = tgt_ptr + n64 * S
    la_n = la_ptr + n64 * T * W
    offs = tl.arange(0, BLOCK_S)
    for t in range(0, Tn):
        t64 = tl.cast(t, tl.int64)
        lp_row = lp_ptr + (t64 * N + n64) * C
        if FROM_LOGITS:
            lse = _row_logsumexp(lp_row, C, cdt, BLOCK_C)
        else:
            lse = tl.zeros([], cdt)
        cur = la_n + t64 * W
        prev = cur - W
        first = t == 0
        for s0 in range(0, n_states, BLOCK_S):
            s = s0 + offs
            active = s < n_states
            odd = (s % 2) == 1
            lab = tl.load(tgt_row + (s - 1) // 2, mask=active & odd, other=0).to(tl.int32)
            lab = tl.where(odd, lab, blank)
            lab2 = tl.load(tgt_row + (s - 3) // 2, mask=active & odd & (s >= 3), other=0).to(tl.int32)
            skip = odd & (s >= 3) & (lab != lab2)
            lp = tl.load(lp_row + lab, mask=active, other=float("-inf")).to(cdt) - lse
            # Frame 0 starts states 0 and 1 only: the others stay -inf, even for a NaN log-prob (as torch).
            lp = tl.where(first & (s >= 2), float("-inf"), lp)
            # t = 0 reads a virtual row that is 0 at state 0 only: alpha[0] = lp at states 0 and 1.
            a0 = tl.load(prev + s, mask=active & (t > 0), other=float("-inf")).to(cdt)
            a0 = tl.where(first & (s == 0), 0.0, a0)
            a1 = tl.load(prev + s - 1, mask=active & (s >= 1) & (t > 0), other=float("-inf")).to(cdt)
            a1 = tl.where(first & (s == 1), 0.0, a1)
            a2 = tl.load(prev + s - 2, mask=active & skip & (t > 0), other=float("-inf")).to(cdt)
            tl.store(cur + s, _logaddexp3(a0, a1, a2) + lp, mask=active)
        # The next step reads states written by other threads of this program.
        tl.debug_barrier()
    last = la_n + tl.cast(tl.maximum(Tn, 1) - 1, tl.int64) * W
    a_end = tl.load(last + 2 * L, mask=Tn > 0, other=float("-inf")).to(cdt)
    a_lab = tl.load(last + 2 * L - 1, mask=(Tn > 0) & (L > 0), other=float("-inf")).to(cdt)
    nll = -_logaddexp3(a_end, a_lab, tl.full([], float("-inf"), cdt))
    # No frame at all: the empty target has probability 1, any other 0.
    nll = tl.where(Tn > 0, nll, tl.where(L == 0, 0.0, float("inf")))
    tl.store(nll_ptr + n, nll)


@triton.jit
def _ctc_backward_kernel(
    grad_ptr, gn_ptr, lp_ptr, tgt_ptr, il_ptr, tl_ptr, nll_ptr, la_ptr, beta_ptr, post_ptr, first_ptr,
    N, T, C, S, blank,
    ZERO_INFINITY: tl.constexpr, FROM_LOGITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Program n: beta by a downward sweep and grad[:, n, :].

    beta_ptr: (N, 2, W) scratch, beta (including the emission at t) of rows t and t+1 alternately.
    post_ptr: (N, max(S, 1)) scratch, posterior of each label position at the current t.
    first_ptr: (N, max(S, 1)) int32 scratch, 1 where a label position holds the first occurrence of its label.
    """
    n = tl.program_id(0)
    n64 = tl.cast(n, tl.int64)
    cdt: tl.constexpr = la_ptr.dtype.element_ty
    gdt: tl.constexpr = grad_ptr.dtype.element_ty
    Tn = tl.load(il_ptr + n).to(tl.int32)
    L = tl.load(tl_ptr + n).to(tl.int32)
    gn = tl.load(gn_ptr + n).to(cdt)
    nll = tl.load(nll_ptr + n).to(cdt)
    finite = tl.abs(nll) < float("inf")
    W = 2 * S + 1
    n_states = 2 * L + 1
    tgt_row = tgt_ptr + n64 * S
    la_n = la_ptr + n64 * T * W
    beta_n = beta_ptr + n64 * 2 * W
    post_n = post_ptr + n64 * tl.maximum(S, 1)
    first_n = first_ptr + n64 * tl.maximum(S, 1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)

    # Rows the sweep does not cover: frames past the input (0) and, for a loss that is +inf (no alignment
    # fits) or NaN, every frame: NaN as torch, or 0 with zero_infinity for a +inf loss only.
    t_sweep = tl.where(finite, Tn, 0)
    if ZERO_INFINITY:
        bad = tl.where(nll == float("inf"), 0.0, float("nan"))
    else:
        bad = float("nan")
    for t in range(t_sweep, T):
        value = tl.where(t < Tn, bad, 0.0)
        row = (tl.cast(t, tl.int64) * N + n64) * C
        g_row = grad_ptr + row
        if FROM_LOGITS:  # log_softmax's backward is NaN on the rows it makes NaN
            value = tl.where(_nan_after_log_softmax(lp_ptr + row, C, cdt, BLOCK_C), float("nan"), value)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + offs_c
            tl.store(g_row + c, tl.zeros([BLOCK_C], gdt) + value.to(gdt), mask=c < C)

    # Once per sample: the first occurrence of each label writes its gradient, summing the
    # posteriors of the later repeats, which all sit before gather_end (the last repeat + 1).
    # The flags are read after the first step's mid-step barrier.
    gather_end = tl.zeros([], tl.int32)
    for i0 in range(0, L, BLOCK_L):
        li_idx = i0 + tl.arange(0, BLOCK_L)
        li_ok = li_idx < L
        li = tl.load(tgt_row + li_idx, mask=li_ok, other=-1).to(tl.int32)
        earlier = tl.zeros([BLOCK_L], tl.int32)
        for j0 in range(0, i0 + BLOCK_L, BLOCK_J):
            lj_idx = j0 + tl.arange(0, BLOCK_J)
            lj_ok = lj_idx < L
            lj = tl.load(tgt_row + lj_idx, mask=lj_ok, other=-1).to(tl.int32)
            same = (li[:, None] == lj[None, :]) & lj_ok[None, :] & (lj_idx[None, :] < li_idx[:, None])
            earlier += tl.sum(same.to(tl.int32), 1)
        tl.store(first_n + li_idx, (earlier == 0).to(tl.int32), mask=li_ok)
        gather_end = tl.maximum(gather_end, tl.max(tl.where(li_ok & (earlier > 0), li_idx + 1, 0), 0))

    for i in range(0, t_sweep):
        t = t_sweep - 1 - i
        t64 = tl.cast(t, tl.int64)
        lp_row = lp_ptr + (t64 * N + n64) * C
        g_row = grad_ptr + (t64 * N + n64) * C
        if FROM_LOGITS:
            lse = _row_logsumexp(lp_row, C, cdt, BLOCK_C)
        else:
            lse = tl.zeros([], cdt)
        beta_cur = beta_n + (t % 2) * W
        beta_next = beta_n + ((t + 1) % 2) * W
        alpha_row = la_n + t64 * W
        # Per-lane flags: the interpreter mishandles a scalar bool combined with a vector one.
        t_lanes = offs_s * 0 + t
        is_last = t_lanes == Tn - 1
        not_last = t_lanes != Tn - 1
        blank_post = tl.zeros([], cdt)
        for s0 in range(0, n_states, BLOCK_S):
            s = s0 + offs_s
            active = s < n_states
            odd = (s % 2) == 1
            lab = tl.load(tgt_row + (s - 1) // 2, mask=active & odd, other=0).to(tl.int32)
            lab = tl.where(odd, lab, blank)
            lab2 = tl.load(tgt_row + (s + 1) // 2, mask=odd & (s + 2 < n_states), other=0).to(tl.int32)
            skip = odd & (s + 2 < n_states) & (lab != lab2)
            lp = tl.load(lp_row + lab, mask=active, other=float("-inf")).to(cdt) - lse
            # beta excluding the emission at t; at the last frame 1 on the two final states.
            b0 = tl.load(beta_next + s, mask=active & not_last, other=float("-inf")).to(cdt)
            b0 = tl.where(is_last & active & (s >= n_states - 2), 0.0, b0)
            b1 = tl.load(beta_next + s + 1, mask=(s + 1 < n_states) & not_last, other=float("-inf")).to(cdt)
            b2 = tl.load(beta_next + s + 2, mask=skip & not_last, other=float("-inf")).to(cdt)
            b_excl = _logaddexp3(b0, b1, b2)
            alpha = tl.load(alpha_row + s, mask=active, other=float("-inf")).to(cdt)
            alpha = tl.where(alpha < float("inf"), alpha, float("-inf"))  # NaN / +inf: states that reach no end
            post = tl.where(active, tl.exp(alpha + b_excl + nll), 0.0)
            # The loss is finite, so no NaN or +inf log-prob reaches the end: as probability 0 they change nothing
            # else (as in the C++ kernels), and the gradient shows them through exp(lp) below.
            tl.store(beta_cur + s, tl.where(lp < float("inf"), b_excl + lp, float("-inf")), mask=active)
            tl.store(post_n + (s - 1) // 2, post, mask=active & odd)
            blank_post += tl.sum(tl.where(odd, 0.0, post), 0)
        # exp(lp) everywhere first; blank and label classes are overwritten after the barrier.
        for c0 in range(0, C, BLOCK_C):
            c = c0 + offs_c
            x = tl.load(lp_row + c, mask=c < C, other=float("-inf")).to(cdt) - lse
            tl.store(g_row + c, (gn * tl.exp(x)).to(gdt), mask=c < C)
        tl.debug_barrier()
        lp_blank = tl.load(lp_row + blank).to(cdt) - lse
        tl.store(g_row + blank, (gn * (tl.exp(lp_blank) - blank_post)).to(gdt))
        for i0 in range(0, L, BLOCK_L):
            li_idx = i0 + tl.arange(0, BLOCK_L)
            li_ok = li_idx < L
            writer = tl.load(first_n + li_idx, mask=li_ok, other=0) != 0
            li = tl.load(tgt_row + li_idx, mask=li_ok, other=-1).to(tl.int32)
            total = tl.load(post_n + li_idx, mask=li_ok, other=0.0)
            for j0 in range(i0, gather_end, BLOCK_J):
                lj_idx = j0 + tl.arange(0, BLOCK_J)
                lj_ok = lj_idx < gather_end
                lj = tl.load(tgt_row + lj_idx, mask=lj_ok, other=-1).to(tl.int32)
                pj = tl.load(post_n + lj_idx, mask=lj_ok, other=0.0)
                later = (li[:, None] == lj[None, :]) & lj_ok[None, :] & (lj_idx[None, :] > li_idx[:, None])
                total += tl.sum(tl.where(later, pj[None, :], 0.0), 1)
            x = tl.load(lp_row + li, mask=writer, other=0.0).to(cdt) - lse
            tl.store(g_row + li, (gn * (tl.exp(x) - total)).to(gdt), mask=writer)
        # Row t of beta and the posteriors are rewritten by the next step.
        tl.debug_barrier()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tier(num_states: int) -> tuple[int, int]:
    """(BLOCK_S, num_warps) for 2S+1 states, capped by MAX_STATE_BLOCK."""
    block, warps = next(((b, w) for b, w in _TIERS if num_states <= b), _TIERS[-1])
    return min(block, MAX_STATE_BLOCK), warps


def _blocks(num_states: int, dtype: torch.dtype) -> dict[str, Any]:
    """Tile sizes and warps for 2S+1 states and log_probs of ``dtype``."""
    block_s, warps = _tier(num_states)
    # float64 doubles the registers per element: smaller class and pairing tiles keep it spill-free.
    wide = dtype == torch.float64
    return {
        "BLOCK_S": block_s,
        "BLOCK_C": min((64 if wide else 128) * warps, MAX_CLASS_BLOCK),
        "BLOCK_L": max(block_s // 2, 1),
        "BLOCK_J": min(8 if wide else 16, max(block_s // 2, 1)),
        "num_warps": warps,
    }


def ctc_loss_forward(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
    zero_infinity: bool,
    from_logits: bool,
    keep_alpha: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(neg_log_likelihood (N,), log_alpha (N, T, 2S+1), or (N, 0, 0) without keep_alpha) in the compute
    dtype; see the op docstring."""
    T, N, C = log_probs.shape
    S = targets.shape[1]
    W = 2 * S + 1
    cdt = _compute_dtype(log_probs.dtype)
    nll = torch.empty((N,), dtype=cdt, device=log_probs.device)
    log_alpha = torch.full((N, T, W), float("-inf"), dtype=cdt, device=log_probs.device)
    if N == 0:
        return nll, log_alpha if keep_alpha else log_alpha.new_empty((N, 0, 0))
    b = _blocks(W, log_probs.dtype)
    _ctc_forward_kernel[(N,)](
        log_probs.contiguous(), targets.contiguous(), input_lengths.contiguous(), target_lengths.contiguous(),
        nll, log_alpha, N, T, C, S, blank,
        FROM_LOGITS=bool(from_logits), BLOCK_S=b["BLOCK_S"], BLOCK_C=b["BLOCK_C"], num_warps=b["num_warps"],
        num_stages=1,
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
) -> torch.Tensor:
    """grad (T, N, C) in log_probs' dtype: grad_nll[n] * (exp(lp) - posterior), 0 past input_lengths[n]."""
    T, N, C = log_probs.shape
    S = targets.shape[1]
    W = 2 * S + 1
    cdt = log_alpha.dtype
    grad = torch.empty((T, N, C), dtype=log_probs.dtype, device=log_probs.device)
    if grad.numel() == 0:
        return grad
    beta = torch.empty((N, 2, W), dtype=cdt, device=log_probs.device)
    post = torch.empty((N, max(S, 1)), dtype=cdt, device=log_probs.device)
    first = torch.empty((N, max(S, 1)), dtype=torch.int32, device=log_probs.device)
    b = _blocks(W, log_probs.dtype)
    _ctc_backward_kernel[(N,)](
        grad, grad_nll.to(cdt).contiguous(), log_probs.contiguous(), targets.contiguous(),
        input_lengths.contiguous(), target_lengths.contiguous(), neg_log_likelihood.to(cdt).contiguous(),
        log_alpha.contiguous(), beta, post, first, N, T, C, S, blank,
        ZERO_INFINITY=bool(zero_infinity), FROM_LOGITS=bool(from_logits),
        BLOCK_S=b["BLOCK_S"], BLOCK_C=b["BLOCK_C"], BLOCK_L=b["BLOCK_L"], BLOCK_J=b["BLOCK_J"],
        num_warps=b["num_warps"], num_stages=1,
    )
    return grad


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def report_configs() -> list[dict[str, Any]]:
    """Every (kernel, config) the launchers can launch, for compiling outside a launch.

    One dict per kernel x input dtype x from_logits (x zero_infinity for backward) x state tier:
    ``kernel``, ``fn`` (the JITFunction; a plain one only without TRITON_INTERPRET), ``signature``
    (argument -> Triton type, "constexpr" for constexpr arguments), ``constexprs``, ``num_warps``,
    ``num_stages``, ``config`` (short label). The tiers are those of ``_TIERS`` at the default
    MAX_STATE_BLOCK.
    """
    ints = {"N": "i32", "T": "i32", "C": "i32", "S": "i32", "blank": "i32"}
    configs = []
    for dtype, name in _TRITON_TYPES.items():
        ct = _TRITON_TYPES[_compute_dtype(dtype)]
        for from_logits in (False, True):
            for block_s, _ in _TIERS:
                b = _blocks(block_s, dtype)
                label = f"{name}-{'logits' if from_logits else 'logprobs'}-S{b['BLOCK_S']}-w{b['num_warps']}"
                fwd_const = {"FROM_LOGITS": from_logits, "BLOCK_S": b["BLOCK_S"], "BLOCK_C": b["BLOCK_C"]}
                fwd_sig = {
                    "lp_ptr": f"*{name}", "tgt_ptr": "*i64", "il_ptr": "*i64", "tl_ptr": "*i64",
                    "nll_ptr": f"*{ct}", "la_ptr": f"*{ct}", **ints, **dict.fromkeys(fwd_const, "constexpr"),
                }
                configs.append({
                    "kernel": "ctc_forward", "fn": _ctc_forward_kernel, "signature": fwd_sig,
                    "constexprs": fwd_const, "num_warps": b["num_warps"], "num_stages": 1, "config": label,
                })
                for zero_infinity in (False, True):
                    bwd_const = {
                        "ZERO_INFINITY": zero_infinity, "FROM_LOGITS": from_logits, "BLOCK_S": b["BLOCK_S"],
                        "BLOCK_C": b["BLOCK_C"], "BLOCK_L": b["BLOCK_L"], "BLOCK_J": b["BLOCK_J"],
                    }
                    bwd_sig = {
                        "grad_ptr": f"*{name}", "gn_ptr": f"*{ct}", "lp_ptr": f"*{name}", "tgt_ptr": "*i64",
                        "il_ptr": "*i64", "tl_ptr": "*i64", "nll_ptr": f"*{ct}", "la_ptr": f"*{ct}",
                        "beta_ptr": f"*{ct}", "post_ptr": f"*{ct}",
                        "first_ptr": "*i32", **ints, **dict.fromkeys(bwd_const, "constexpr"),
                    }
                    configs.append({
                        "kernel": "ctc_backward", "fn": _ctc_backward_kernel, "signature": bwd_sig,
                        "constexprs": bwd_const, "num_warps": b["num_warps"], "num_stages": 1,
                        "config": label + ("-zeroinf" if zero_infinity else ""),
                    })
    return configs
