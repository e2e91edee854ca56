"""CTC loss: ``seqfast.ctc_loss`` vs ``F.ctc_loss`` and ``seqfast.ctc_loss_from_logits`` vs
``log_softmax`` + ``F.ctc_loss``, float32, forward and forward+backward, reduction ``mean``.

Inputs: (T, N, C) float32, padded (N, S) int64 targets drawn from [1, C) (blank 0), every input and
target at full length, so the work is exactly N * T * (2S+1) state updates per recursion.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _harness import DIRECTIONS, FWD, PROVIDERS, bench_device, ctc_shapes, measure

import seqfast


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" in metafunc.fixturenames:
        shapes = ctc_shapes(metafunc.config.getoption("--bench-size"))
        metafunc.parametrize("shape", shapes, ids=[s.label for s in shapes])
        metafunc.parametrize("direction", DIRECTIONS)
        metafunc.parametrize("provider", PROVIDERS)
    bench_device(metafunc.config)  # a bad --bench-device fails at collection, not in every test


def _inputs(shape, device: str, from_logits: bool, direction: str):
    x = torch.randn(shape.T, shape.N, shape.C, device=device)
    if not from_logits:
        x = x.log_softmax(2)
    x.requires_grad_(direction != FWD)
    targets = torch.randint(1, shape.C, (shape.N, shape.S), device=device)
    input_lengths = torch.full((shape.N,), shape.T, dtype=torch.int64, device=device)
    target_lengths = torch.full((shape.N,), shape.S, dtype=torch.int64, device=device)
    return x, targets, input_lengths, target_lengths


def _loss_fn(provider: str, from_logits: bool):
    if provider == "seqfast":
        return seqfast.ctc_loss_from_logits if from_logits else seqfast.ctc_loss
    if from_logits:
        return lambda x, *rest: F.ctc_loss(x.log_softmax(2), *rest)
    return F.ctc_loss


def _run(benchmark, shape, direction, provider, device, size, from_logits):
    x, targets, input_lengths, target_lengths = _inputs(shape, device, from_logits, direction)
    loss_fn = _loss_fn(provider, from_logits)

    if direction == FWD:
        def fn():
            with torch.no_grad():
                return loss_fn(x, targets, input_lengths, target_lengths)
    else:
        def fn():
            loss_fn(x, targets, input_lengths, target_lengths).backward()
            x.grad = None  # after the call, so the memory probe counts the gradient (see bench_attention.py)

    op = "ctc_loss_from_logits" if from_logits else "ctc_loss"
    measure(benchmark, fn, op=op, shape=shape, direction=direction, provider=provider, device=device, size=size)


def test_ctc_loss(benchmark, shape, direction, provider, device, size):
    _run(benchmark, shape, direction, provider, device, size, from_logits=False)


def test_ctc_loss_from_logits(benchmark, shape, direction, provider, device, size):
    _run(benchmark, shape, direction, provider, device, size, from_logits=True)
