"""The float64 reference ops against independent computations: brute-force enumeration of CTC
alignments, and attention written row by row from the softmax formula."""

import itertools
import math

import pytest
import torch

from seqfast.reference import attention as ref_attention
from seqfast.reference import ctc_loss as ref_ctc


def _collapse(path, blank):
    out, prev = [], None
    for c in path:
        if c != prev and c != blank:
            out.append(c)
        prev = c
    return out


def _enumerated_nll(lp, target, blank):
    """-log sum over every frame-level path (C^T of them) that collapses to ``target``."""
    T, C = lp.shape
    total = 0.0
    for path in itertools.product(range(C), repeat=T):
        if _collapse(path, blank) == list(target):
            total += math.exp(sum(lp[t, c].item() for t, c in enumerate(path)))
    return -math.log(total) if total > 0 else math.inf


@pytest.mark.parametrize("blank", [0, 2])
@pytest.mark.parametrize(
    "T,target",
    [(1, []), (1, [1]), (3, []), (3, [1]), (4, [1, 1]), (5, [1, 3]), (5, [3, 3, 1]), (2, [1, 1]), (3, [1, 3, 1])],
)
def test_ctc_reference_matches_enumeration(T, target, blank):
    C = 4
    target = [c if c != blank else 0 if blank else 1 for c in target]
    lp = torch.randn(T, 1, C, dtype=torch.float64).log_softmax(-1)
    S = max(len(target), 1)
    padded = torch.full((1, S), 3, dtype=torch.long)
    padded[0, : len(target)] = torch.tensor(target, dtype=torch.long)
    nll, alpha = ref_ctc.ctc_loss_forward(lp, padded, torch.tensor([T]), torch.tensor([len(target)]), blank, False,
                                          False)
    expected = _enumerated_nll(lp[:, 0], target, blank)
    if math.isinf(expected):
        assert torch.isinf(nll[0])
    else:
        assert nll[0].item() == pytest.approx(expected, rel=1e-12)
    assert alpha.shape == (1, T, 2 * S + 1)


def test_ctc_reference_posterior_is_a_distribution():
    """Per frame, the posterior over classes sums to 1 (so gradients through log_softmax match torch)."""
    T, N, C = 6, 2, 5
    lp = torch.randn(T, N, C, dtype=torch.float64).log_softmax(-1)
    targets = torch.tensor([[1, 2, 2], [3, 4, 0]])
    il, tl = torch.tensor([6, 4]), torch.tensor([3, 2])
    nll, alpha = ref_ctc.ctc_loss_forward(lp, targets, il, tl, 0, False, False)
    grad = ref_ctc.ctc_loss_backward(torch.ones(N, dtype=torch.float64), lp, targets, il, tl, nll, alpha, 0, False,
                                     False)
    frames = torch.arange(T)[:, None] < il[None, :]
    posterior = lp.exp() * frames[..., None] - grad
    torch.testing.assert_close(posterior.sum(-1), frames.double(), rtol=0, atol=1e-12)
    assert (grad[~frames] == 0).all()


def _rowwise_attention(q, k, v, visible, scale, additive):
    """out[i] = sum_j softmax_j(scale q_i.k_j + m_ij) v_j over visible j, one row at a time."""
    Lq, Lk = q.shape[0], k.shape[0]
    out = torch.zeros(Lq, v.shape[1], dtype=torch.float64)
    for i in range(Lq):
        scores = [scale * float(q[i] @ k[j]) + float(additive[i, j]) for j in range(Lk) if visible[i, j]]
        cols = [j for j in range(Lk) if visible[i, j]]
        if not cols:
            continue
        m = max(scores)
        w = [math.exp(s - m) for s in scores]
        z = sum(w)
        for wj, j in zip(w, cols):
            out[i] += wj / z * v[j]
    return out


@pytest.mark.parametrize("causal", [0, 1, 2])
@pytest.mark.parametrize("Lq,Lk", [(1, 5), (5, 3), (4, 4), (3, 7)])
def test_attention_reference_matches_rowwise_formula(causal, Lq, Lk):
    D, Dv, scale = 3, 2, 0.7
    q, k, v = (torch.randn(L, d, dtype=torch.float64) for L, d in ((Lq, D), (Lk, D), (Lk, Dv)))
    additive = torch.randn(Lq, Lk, dtype=torch.float64)
    bool_mask = torch.rand(Lq, Lk) > 0.3
    cm = ref_attention.causal_mask(Lq, Lk, causal)
    visible = bool_mask & (cm if cm is not None else True)
    out, lse = ref_attention.attention(q[None], k[None], v[None], bool_mask, causal, scale)
    torch.testing.assert_close(out[0], _rowwise_attention(q, k, v, visible, scale, torch.zeros(Lq, Lk)),
                               rtol=1e-12, atol=1e-12)
    assert torch.isinf(lse[0][~visible.any(-1)]).all()
    out, _ = ref_attention.attention(q[None], k[None], v[None], additive, causal, scale)
    full = cm if cm is not None else torch.ones(Lq, Lk, dtype=torch.bool)
    torch.testing.assert_close(out[0], _rowwise_attention(q, k, v, full, scale, additive), rtol=1e-12, atol=1e-12)


def test_attention_reference_gqa_repeats_kv_heads():
    q = torch.randn(1, 4, 3, 2, dtype=torch.float64)
    k, v = torch.randn(1, 2, 5, 2, dtype=torch.float64), torch.randn(1, 2, 5, 2, dtype=torch.float64)
    out, _ = ref_attention.attention(q, k, v)
    for h in range(4):
        expect, _ = ref_attention.attention(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1])
        torch.testing.assert_close(out[:, h : h + 1], expect, rtol=0, atol=1e-14)


def test_attention_reference_fully_masked_rows_are_zero_with_finite_grads():
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(1, 1, 5, 4, dtype=torch.float64), torch.randn(1, 1, 5, 4, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out, lse = ref_attention.attention(q, k, v, mask)
    assert (out[0, 0, 1] == 0).all() and torch.isinf(lse[0, 0, 1])
    (g,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(g).all() and (g[0, 0, 1] == 0).all()


def test_ctc_reference_empty_targets_width_zero():
    """Targets of width S = 0: the only path is all blanks."""
    lp = torch.randn(5, 2, 3, dtype=torch.float64).log_softmax(-1)
    nll, alpha = ref_ctc.ctc_loss_forward(lp, torch.zeros(2, 0, dtype=torch.long), torch.tensor([5, 3]),
                                          torch.tensor([0, 0]), 0, False, False)
    torch.testing.assert_close(nll, -torch.stack([lp[:5, 0, 0].sum(), lp[:3, 1, 0].sum()]), rtol=1e-12, atol=0)
    assert alpha.shape == (2, 5, 1)
