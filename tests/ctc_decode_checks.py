"""Problems and checks shared by the CTC decoding tests (C++ and Triton)."""

from __future__ import annotations

import torch

from seqfast.reference import ctc_decode as ref


def _log_probs(T, N, C, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, N, C, generator=g, dtype=torch.float64).mul(2).log_softmax(-1).to(dtype)


def _targets(N, C, input_lengths, seed=0, blank=0, repeats=True):
    """(N, S) padded targets that fit their inputs (labels drawn from [0, C) minus blank) and their lengths."""
    g = torch.Generator().manual_seed(seed)
    labels = [c for c in range(C) if c != blank]
    rows, lengths = [], []
    for Tn in input_lengths:
        L = int(torch.randint(0, max(Tn // 2, 0) + 1, (), generator=g))
        row = [labels[int(i)] for i in torch.randint(0, len(labels), (L,), generator=g)]
        if not repeats:
            row = [lab if k == 0 or lab != row[k - 1] else labels[(labels.index(lab) + 1) % len(labels)]
                   for k, lab in enumerate(row)]
        while ref.min_frames(row) > Tn:
            row.pop()
        rows.append(row)
        lengths.append(len(row))
    S = max(lengths, default=0)
    tg = torch.full((N, S), blank, dtype=torch.int64)
    for n, row in enumerate(rows):
        tg[n, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return tg, torch.tensor(lengths, dtype=torch.int64)


def _score64(lp, paths, il):
    """Each sample's path score in float64, NaN counted as -inf as the ops compare paths."""
    T, N, _ = lp.shape
    picked = lp.double().gather(2, paths.t().unsqueeze(2)).squeeze(2)  # (T, N)
    picked = torch.where(picked.isnan(), float("-inf"), picked)
    mask = torch.arange(T)[:, None] < il[None, :]
    return torch.where(mask, picked, 0.0).sum(0)


def _check_alignment(paths, lp, tg, il, tl, blank):
    """paths collapses to each target with a blank between equal labels and frames past the input blank."""
    for n in range(paths.shape[0]):
        Tn, L = int(il[n]), int(tl[n])
        p = paths[n].tolist()
        assert all(c == blank for c in p[Tn:])
        assert ref.collapse(p[:Tn], blank)[0] == tg[n, :L].tolist(), (n, p)


def _assert_best(paths, scores, lp, tg, il, tl, blank, rtol):
    """A valid alignment whose score is the reference's best (within rtol); scores are its log-probs."""
    _check_alignment(paths, lp, tg, il, tl, blank)
    T = lp.shape[0]
    expected_scores = torch.where(torch.arange(T)[None, :] < il[:, None],
                                  lp.gather(2, paths.t().unsqueeze(2)).squeeze(2).t(), 0).to(lp.dtype)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=0, equal_nan=True)
    best_paths, _ = ref.ctc_forced_align(lp.double(), tg, il, tl, blank)
    got, best = _score64(lp, paths, il), _score64(lp, best_paths, il)
    torch.testing.assert_close(got, best, rtol=rtol, atol=rtol)
