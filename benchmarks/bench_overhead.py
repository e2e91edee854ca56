"""Per-call overhead on tiny inputs, one thread: where validation, dispatch and autograd cost more than the
kernels. ``seqfast.scaled_dot_product_attention`` vs ``F.scaled_dot_product_attention`` at (B, H, L, D) =
(1, 1, 16, 16) and ``seqfast.ctc_loss`` vs ``F.ctc_loss`` at (T, N, C, S) = (50, 2, 10, 10), lengths as
tensors (targets of lengths 10 and 8, inputs 50 and 45), forward (no grad) and forward+backward. Every tier
runs them: they take a second.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _harness import DIRECTIONS, FWD, PROVIDERS, AttentionShape, CtcShape, measure

import seqfast

ATTENTION = AttentionShape(1, 1, 16, 16, False)
CTC = CtcShape(50, 2, 10, 10)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention_call(benchmark, direction, provider, device, size, one_thread):
    q, k, v = (torch.randn(1, 1, 16, 16, device=device, requires_grad=direction != FWD) for _ in range(3))
    attend = seqfast.scaled_dot_product_attention if provider == "seqfast" else F.scaled_dot_product_attention

    if direction == FWD:
        def fn():
            with torch.no_grad():
                return attend(q, k, v)
    else:
        def fn():
            attend(q, k, v).sum().backward()
            q.grad = k.grad = v.grad = None

    measure(benchmark, fn, op="overhead_attention", shape=ATTENTION, direction=direction, provider=provider,
            device=device, size=size)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_ctc_call(benchmark, direction, provider, device, size, one_thread):
    lp = torch.randn(CTC.T, CTC.N, CTC.C, device=device).log_softmax(-1).requires_grad_(direction != FWD)
    targets = torch.randint(1, CTC.C, (CTC.N, CTC.S), device=device)
    input_lengths = torch.tensor([50, 45], device=device)
    target_lengths = torch.tensor([10, 8], device=device)
    loss = seqfast.ctc_loss if provider == "seqfast" else F.ctc_loss

    if direction == FWD:
        def fn():
            with torch.no_grad():
                return loss(lp, targets, input_lengths, target_lengths)
    else:
        def fn():
            loss(lp, targets, input_lengths, target_lengths).backward()
            lp.grad = None

    measure(benchmark, fn, op="overhead_ctc_loss", shape=CTC, direction=direction, provider=provider,
            device=device, size=size)
