"""CTC decoding: ``seqfast.ctc_greedy_decode`` and ``seqfast.ctc_forced_align`` against plain vectorised torch.

The torch provider of each is the best plain-torch program we could write, not a strawman:

- greedy: ``argmax`` over C, then merge and drop with whole-tensor ops (a shifted compare, a stable sort to
  pack the kept labels to the front);
- forced alignment: the Viterbi recursion over all (N, 2S+1) states at once, one frame per step (a
  three-way max over shifted rows, int8 backpointers), then a batched walk back.

Both baselines give the same answers as seqfast on these inputs (checked once per case before timing).
Inputs: (T, N, C) float32 log-probs, every input at full length, targets of S labels drawn from [1, C)
(blank 0; a label equal to its left neighbour is bumped, so every target fits T). The rate counts
Viterbi state updates, N * T * (2S+1), for both ops (greedy visits N * T * C entries instead).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _harness import FWD, PROVIDERS, CtcShape, bench_device, measure

import seqfast

_SHAPES = {
    "smoke": [CtcShape(8, 2, 5, 2), CtcShape(12, 3, 6, 3)],
    "quick": [CtcShape(500, 16, 32, 100)],
    "all": [CtcShape(500, 16, 32, 100), CtcShape(1000, 32, 1000, 200)],
}


def decode_shapes(size: str) -> list[CtcShape]:
    return _SHAPES["all" if size in ("default", "full") else size]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" in metafunc.fixturenames:
        shapes = decode_shapes(metafunc.config.getoption("--bench-size"))
        metafunc.parametrize("shape", shapes, ids=[s.label for s in shapes])
        metafunc.parametrize("provider", PROVIDERS)
    bench_device(metafunc.config)


def torch_greedy(log_probs: torch.Tensor, input_lengths: torch.Tensor, blank: int = 0):
    """(tokens (N, T), lengths (N,)) as seqfast.ctc_greedy_decode, in whole-tensor torch ops."""
    best = log_probs.argmax(-1).t()  # (N, T)
    N, T = best.shape
    prev = F.pad(best, (1, 0), value=-1)[:, :T]
    keep = (best != blank) & (best != prev) & (torch.arange(T, device=best.device) < input_lengths[:, None])
    lengths = keep.sum(1)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept labels first, in order
    tokens = best.gather(1, order)
    return torch.where(torch.arange(T, device=best.device) < lengths[:, None], tokens, blank), lengths


def torch_viterbi(log_probs, targets, input_lengths, target_lengths, blank: int = 0):
    """(paths (N, T), scores (N, T)) of CTC forced alignment: a vectorised Viterbi over (N, 2S+1) states."""
    T, N, _ = log_probs.shape
    S = targets.shape[1]
    W = 2 * S + 1
    dev = log_probs.device
    ext = torch.full((N, W), blank, dtype=torch.int64, device=dev)
    ext[:, 1::2] = targets
    emit = log_probs.gather(2, ext[None].expand(T, N, W))  # (T, N, W)
    skip = torch.zeros((N, W), dtype=torch.bool, device=dev)
    skip[:, 3::2] = targets[:, 1:] != targets[:, :-1]
    neg = torch.tensor(float("-inf"), dtype=emit.dtype, device=dev)
    alpha = torch.full((N, W), float("-inf"), dtype=emit.dtype, device=dev)
    alpha[:, :2] = emit[0, :, :2]
    alpha = torch.where(torch.arange(W, device=dev) <= 2 * target_lengths[:, None], alpha, neg)
    back = torch.zeros((T, N, W), dtype=torch.int8, device=dev)
    for t in range(1, T):
        a1 = F.pad(alpha, (1, 0), value=float("-inf"))[:, :W]
        a2 = torch.where(skip, F.pad(alpha, (2, 0), value=float("-inf"))[:, :W], neg)
        best, step = torch.stack((alpha, a1, a2), -1).max(-1)
        active = (t < input_lengths)[:, None]
        alpha = torch.where(active, best + emit[t], alpha)
        back[t] = step.to(torch.int8)
    L = target_lengths
    end_blank = alpha.gather(1, (2 * L)[:, None])[:, 0]
    end_label = alpha.gather(1, (2 * L - 1).clamp_min(0)[:, None])[:, 0]
    s = torch.where((L > 0) & ~(end_blank > end_label), 2 * L - 1, 2 * L)
    paths = torch.full((N, T), blank, dtype=torch.int64, device=dev)
    scores = torch.zeros((N, T), dtype=log_probs.dtype, device=dev)
    for t in range(T - 1, -1, -1):
        active = t < input_lengths
        label = ext.gather(1, s[:, None])[:, 0]
        paths[:, t] = torch.where(active, label, blank)
        scores[:, t] = torch.where(active, emit[t].gather(1, s[:, None])[:, 0], 0)
        s = torch.where(active, s - back[t].gather(1, s[:, None])[:, 0].long(), s)
    return paths, scores


def _inputs(shape: CtcShape, device: str):
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(shape.T, shape.N, shape.C, generator=g).log_softmax(2).to(device)
    targets = torch.randint(1, shape.C, (shape.N, shape.S), generator=g)
    for k in range(1, shape.S):  # no equal neighbours: every target fits its T >= S frames
        same = targets[:, k] == targets[:, k - 1]
        targets[:, k] = torch.where(same, targets[:, k] % (shape.C - 1) + 1, targets[:, k])
    lengths = torch.full((shape.N,), shape.T, dtype=torch.int64)
    return lp, targets.to(device), lengths.to(device), torch.full_like(lengths, shape.S).to(device)


def test_ctc_greedy_decode(benchmark, shape, provider, device, size):
    lp, _, il, _ = _inputs(shape, device)
    expected = seqfast.ctc_greedy_decode(lp, il)
    got = torch_greedy(lp, il)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    fn = (lambda: torch_greedy(lp, il)) if provider == "torch" else (lambda: seqfast.ctc_greedy_decode(lp, il))
    measure(benchmark, fn, op="ctc_greedy_decode", shape=shape, direction=FWD, provider=provider, device=device,
            size=size)


def test_ctc_forced_align(benchmark, shape, provider, device, size):
    lp, tg, il, tl = _inputs(shape, device)
    expected = seqfast.ctc_forced_align(lp, tg, il, tl)
    got = torch_viterbi(lp, tg, il, tl)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    if provider == "torch":
        def fn():
            return torch_viterbi(lp, tg, il, tl)
    else:
        def fn():
            return seqfast.ctc_forced_align(lp, tg, il, tl)
    measure(benchmark, fn, op="ctc_forced_align", shape=shape, direction=FWD, provider=provider, device=device,
            size=size)
