"""CTC loss in float64 by the log-space alpha recursion over padded targets; gradients by autograd.

:func:`log_alpha` and :func:`neg_log_likelihood` are the textbook recursion (Graves et al. 2006);
``ctc_loss_forward`` / ``ctc_loss_backward`` implement the seqfast CTC ops
(``seqfast/ops/ctc_loss.py``) on top of them.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _logaddexp(*xs: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) elementwise whose gradient stays finite (0) where every input is -inf.

    As torch's CTC recursion: NaN if an input is NaN or +inf (inf - inf), so that a NaN or +inf log-prob
    spreads NaN along every transition it meets.
    """
    x = torch.stack(xs)
    m = x.max(dim=0).values
    m_safe = torch.where(m == NEG_INF, torch.zeros_like(m), m).detach()
    total = torch.exp(x - m_safe).sum(dim=0)
    return torch.where(total == 0, torch.full_like(m, NEG_INF), torch.log(total.clamp_min(1e-300)) + m_safe)


def extended_targets(targets: torch.Tensor, blank: int) -> torch.Tensor:
    """(N, S) padded labels -> (N, 2S+1): blank, l1, blank, l2, ..., blank."""
    N, S = targets.shape
    ext = torch.full((N, 2 * S + 1), blank, dtype=torch.long, device=targets.device)
    ext[:, 1::2] = targets
    return ext


def log_alpha(log_probs: torch.Tensor, targets: torch.Tensor, blank: int) -> torch.Tensor:
    """Forward variables (N, T, 2S+1): log P(prefix of the extended target ending in state s at t)."""
    T, N, _ = log_probs.shape
    ext = extended_targets(targets, blank)
    lp = log_probs.gather(2, ext[None].expand(T, -1, -1))  # (T, N, 2S+1)
    can_skip = torch.zeros_like(ext, dtype=torch.bool)
    can_skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    neg = lp.new_full((N, 1), NEG_INF)
    start = torch.full_like(lp[0], NEG_INF)
    start[:, :2] = 0.0
    alphas = [torch.where(torch.isinf(start), start, start + lp[0])]
    for t in range(1, T):
        prev = alphas[-1]
        stay = prev
        width = prev.shape[1]
        step = torch.cat([neg, prev[:, :-1]], 1)
        skip = torch.cat([neg, neg, prev[:, :-2]], 1)[:, :width].masked_fill(~can_skip, NEG_INF)
        alphas.append(_logaddexp(stay, step, skip) + lp[t])
    return torch.stack(alphas, 1)


def neg_log_likelihood(
    alpha: torch.Tensor, input_lengths: torch.Tensor, target_lengths: torch.Tensor
) -> torch.Tensor:
    """-log P(target) per sample from the alphas at t = input_length - 1, states 2L and 2L - 1."""
    N = alpha.shape[0]
    rows = torch.arange(N, device=alpha.device)
    t = (input_lengths - 1).clamp_min(0)
    last = alpha[rows, t, 2 * target_lengths]
    before = alpha[rows, t, (2 * target_lengths - 1).clamp_min(0)]
    before = torch.where(target_lengths > 0, before, torch.full_like(before, NEG_INF))
    nll = -_logaddexp(last, before)
    # No frame: the empty target has probability 1, any other 0.
    empty_input = torch.where(target_lengths == 0, torch.zeros_like(nll), torch.full_like(nll, float("inf")))
    return torch.where(input_lengths == 0, empty_input, nll)


def _normalise(log_probs: torch.Tensor, from_logits: bool) -> torch.Tensor:
    lp = log_probs.double()
    return lp.log_softmax(2) if from_logits else lp


def ctc_loss_forward(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity, from_logits,
                     keep_alpha=True, alpha_every=1):
    """With alpha_every > 1 the second output has the checkpoints' shape (seqfast/ops/ctc_loss.py) and holds
    zeros: this backward recomputes everything from log_probs."""
    alpha = log_alpha(_normalise(log_probs, from_logits), targets, blank)
    dtype = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    nll = neg_log_likelihood(alpha, input_lengths, target_lengths).to(dtype)
    if not keep_alpha:
        return nll, alpha.new_empty((alpha.shape[0], 0, 0), dtype=dtype)
    if alpha_every != 1:
        if alpha_every < 1 or dtype != torch.float32:
            raise ValueError(f"ctc_loss_forward: alpha_every = {alpha_every} needs float32 compute and must be >= 1")
        T, N = log_probs.shape[:2]
        return nll, alpha.new_zeros((N, -(-T // alpha_every), 2, alpha.shape[2]), dtype=torch.int32)
    return nll, alpha.to(dtype)


def ctc_loss_backward(
    grad_nll, log_probs, targets, input_lengths, target_lengths, nll, log_alpha_, blank, zero_infinity, from_logits,
    alpha_every=1,
):
    lp = _normalise(log_probs.detach(), from_logits)
    # The posteriors count NaN and +inf log-probs as probability 0. Where the loss is finite none of them reaches
    # the end (else it would be NaN), so the loss is the same; the gradient shows them through exp(lp) alone.
    clean = lp.masked_fill(~(lp < float("inf")), NEG_INF).requires_grad_()
    finite = torch.isfinite(nll)
    with torch.enable_grad():
        nll64 = neg_log_likelihood(log_alpha(clean, targets, blank), input_lengths, target_lengths)
        (dnll,) = torch.autograd.grad(nll64[finite].sum(), clean, allow_unused=True, materialize_grads=True)
    posterior = -dnll
    T = lp.shape[0]
    frames = torch.arange(T, device=lp.device)[:, None] < input_lengths[None, :]  # (T, N)
    grad = torch.where(frames[..., None], torch.exp(lp), 0.0) - posterior
    # No posterior: NaN, or 0 where zero_infinity meets a +inf loss (it leaves NaN losses alone, as torch).
    bad = torch.full(nll.shape, float("nan"), dtype=torch.float64, device=nll.device)
    if zero_infinity:
        bad = bad.masked_fill(nll == float("inf"), 0.0)
    grad = torch.where(finite[None, :, None] | ~frames[..., None], grad, bad[None, :, None])
    if from_logits:  # rows log_softmax made NaN (a NaN or +inf logit, or all -inf): its backward gives NaN there
        grad = grad.masked_fill(lp.isnan().any(2, keepdim=True), float("nan"))
    return (grad * grad_nll.double()[None, :, None]).to(log_probs.dtype)
