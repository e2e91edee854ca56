"""Token spans of a frame-level CTC path, as torchaudio's ``merge_tokens``: (token, start, end, score)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from seqfast.validation import ArgumentError


class TokenSpan(NamedTuple):
    token: int
    start: int  # first frame
    end: int  # one past the last frame
    score: float  # mean of the span's frame scores


def _spans(path: torch.Tensor, scores: torch.Tensor, blank: int) -> list[TokenSpan]:
    T = path.shape[0]
    if T == 0:
        return []
    starts = torch.cat([path.new_zeros(1), (path[1:] != path[:-1]).nonzero().flatten() + 1])
    ends = torch.cat([starts[1:], starts.new_full((1,), T)])
    keep = path[starts] != blank
    starts, ends = starts[keep], ends[keep]
    sums = torch.cat([scores.new_zeros(1, dtype=torch.float64), scores.double().cumsum(0)])
    means = (sums[ends] - sums[starts]) / (ends - starts)
    return [TokenSpan(*v) for v in zip(path[starts].tolist(), starts.tolist(), ends.tolist(), means.tolist())]


def ctc_token_spans(
    paths: torch.Tensor,
    scores: torch.Tensor,
    blank: int = 0,
    lengths: torch.Tensor | list[int] | None = None,
) -> list[TokenSpan] | list[list[TokenSpan]]:
    """Merge a forced-alignment (or greedy) frame path into one span per emitted token.

    Args:
        paths: (T,) or (N, T) integer classes per frame (:func:`seqfast.ctc_forced_align`'s ``paths``).
        scores: same shape, per-frame scores (log-probs, or their ``exp()``).
        blank: the blank class; blank frames belong to no span.
        lengths: (N,) frames per sample for (N, T) input (default: all T).

    Returns:
        For (T,) input a list of :class:`TokenSpan` (token, start frame, end frame exclusive, mean score);
        for (N, T) one such list per sample. A run of one class is one span: equal neighbouring labels of a
        forced alignment are separated by a blank, so each target label gets its own span.
    """
    if not isinstance(paths, torch.Tensor) or paths.dim() not in (1, 2) or paths.is_floating_point():
        raise ArgumentError("paths must be a (T,) or (N, T) integer tensor, got "
                            f"{getattr(paths, 'shape', type(paths))}")
    if not isinstance(scores, torch.Tensor) or scores.shape != paths.shape:
        raise ArgumentError(f"scores must be a tensor of paths' shape {tuple(paths.shape)}, got "
                         f"{tuple(getattr(scores, 'shape', ()))}")
    paths, scores = paths.detach().cpu(), scores.detach().cpu()
    if paths.dim() == 1:
        return _spans(paths, scores, blank)
    T = paths.shape[1]
    bounds = [T] * paths.shape[0] if lengths is None else [int(v) for v in lengths]
    if len(bounds) != paths.shape[0] or any(not 0 <= b <= T for b in bounds):
        raise ArgumentError(f"lengths must hold {paths.shape[0]} values in [0, {T}], got {bounds}")
    return [_spans(p[:b], s[:b], blank) for p, s, b in zip(paths, scores, bounds)]
