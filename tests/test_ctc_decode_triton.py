"""The Triton CTC decoding kernels (kernels/ctc_decode.py) through Triton's interpreter on CPU tensors.

Greedy decoding and forced alignment against the float64 reference (seqfast/reference/ctc_decode.py) and the
C++ kernels; shapes stay tiny, as the interpreter runs every program in numpy. The interpreter is switched on
by tests/conftest.py on machines without a GPU (never forced where one is).
"""

from __future__ import annotations

import pytest
import torch

import seqfast
from seqfast import _triton
from seqfast.reference import ctc_decode as ref
from tests.ctc_decode_checks import _assert_best, _log_probs, _targets

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.usefixtures("on_kernel_device"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

# The interpreter cannot run bfloat16.
DTYPES = [torch.float64, torch.float32, torch.float16]


def _triton_run(fn, *args, **kwargs):
    with seqfast.backend("triton"):
        return fn(*args, **kwargs)


def _host(*tensors):
    return [t.cpu() for t in tensors]


@pytest.mark.parametrize("T,N,C", [(1, 1, 2), (7, 3, 29), (13, 2, 2), (5, 2, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_against_reference(T, N, C, dtype, on_kernel_device):
    lp = _log_probs(T, N, C, dtype, seed=T + C).to(on_kernel_device)
    il = torch.tensor([T - (n * 3) % (T + 1) if n else T for n in range(N)])
    blank = C - 1 if N % 2 else 0
    got = _host(*_triton_run(seqfast.ctc_greedy_decode, lp, il, blank=blank, return_frames=True))
    expected = ref.ctc_greedy_decode(lp.cpu(), il, blank)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))

    tg, tl = _targets(N, C, il.tolist(), seed=C, blank=blank)
    paths, scores = _host(*_triton_run(seqfast.ctc_forced_align, lp, tg, il, tl, blank=blank))
    if dtype == torch.float64:
        e_paths, e_scores = ref.ctc_forced_align(lp.cpu(), tg, il, tl, blank)
        assert torch.equal(paths, e_paths) and torch.equal(scores, e_scores)
    _assert_best(paths, scores, lp.cpu(), tg, il, tl, blank, 1e-9 if dtype == torch.float64 else 1e-5)


def test_tiles_transposed_views_ties_and_nan(monkeypatch, on_kernel_device):
    """State and class tiles narrower than the problem, a (N, T, C) view, exact ties and NaN rows: the same
    paths and tokens as the C++ kernels."""
    kernels = _triton.kernels("ctc_loss", torch.empty(0, device=on_kernel_device))
    monkeypatch.setattr(kernels, "MAX_STATE_BLOCK", 4)
    monkeypatch.setattr(kernels, "MAX_CLASS_BLOCK", 4)
    T, N, C = 9, 3, 7
    lp = _log_probs(T, N, C, torch.float32, seed=3)
    lp[:, 2] = -torch.randint(0, 2, (T, C)).float()  # sample 2: integer log-probs, many exact ties
    lp[4, 0, 5] = lp[4, 0, 2] = float("nan")
    lp[6, 1, :] = float("-inf")
    il = torch.tensor([9, 8, 9])
    tg, tl = torch.tensor([[1, 1, 2, 5], [3, 4, 4, 0], [2, 3, 3, 2]]), torch.tensor([4, 3, 4])
    ntc = lp.transpose(0, 1).contiguous().transpose(0, 1)
    expected = (*seqfast.ctc_forced_align(lp, tg, il, tl), *seqfast.ctc_greedy_decode(lp, il, return_frames=True))
    x = ntc.to(on_kernel_device)  # contiguous input runs in every other test
    got = _host(*_triton_run(seqfast.ctc_forced_align, x, tg, il, tl),
                *_triton_run(seqfast.ctc_greedy_decode, x, il, return_frames=True))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_empty_and_zero_lengths(on_kernel_device):
    for T, N in [(0, 2), (4, 0)]:
        lp = torch.zeros(T, N, 3)
        tokens, lengths = _triton_run(seqfast.ctc_greedy_decode, lp, [0] * N)
        assert tokens.shape == (N, T) and lengths.shape == (N,)
        paths, scores = _triton_run(seqfast.ctc_forced_align, lp, torch.zeros(N, 0, dtype=torch.long), [0] * N,
                                    [0] * N)
        assert paths.shape == scores.shape == (N, T)
    lp = _log_probs(5, 3, 4, torch.float32).to(on_kernel_device)
    tg, il, tl = torch.tensor([[1, 2], [1, 1], [3, 3]]), [5, 0, 3], [0, 0, 2]
    got = _host(*_triton_run(seqfast.ctc_forced_align, lp, tg, il, tl),
                *_triton_run(seqfast.ctc_greedy_decode, lp, il))
    expected = (*seqfast.ctc_forced_align(lp.cpu(), tg, il, tl), *seqfast.ctc_greedy_decode(lp.cpu(), il))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
