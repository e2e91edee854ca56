"""CTC greedy decoding and forced alignment in plain Python/torch (float64), plus brute-force enumerators.

Implements the ops of ``seqfast/ops/ctc_decode.py`` one frame and one state at a time: slow, short and
obviously right. The enumerators (:func:`all_alignments`, :func:`brute_force_align`,
:func:`brute_force_greedy`) try every path of tiny problems and are what the tests judge the recursion by.

Forced alignment's states are the extended target (blank, l1, blank, l2, ..., lL, blank): state s = 2k+1 is
label k, even states are blanks. A path is a state per frame that starts in state 0 or 1, moves by 0 or 1
state per frame, or by 2 from a blank-free step between two different labels, and ends in state 2L-1 or 2L.

Ties (documented in the op): among the best-scoring paths, the one ending on the last label rather than the
trailing blank; then, frame by frame from the last one backwards, the one further along the target (the
state with the larger index), i.e. every label and blank is entered as early as the score allows. NaN
log-probs, and +inf meeting -inf, count as -inf when paths are compared.
"""

from __future__ import annotations

import itertools
import math

import torch

NEG_INF = float("-inf")


def _argmax(row: list[float]) -> int:
    """torch.argmax of one row: the first NaN if there is one, else the first maximum."""
    best = 0
    for c, v in enumerate(row):
        if math.isnan(v):
            return c
        if v > row[best]:
            best = c
    return best


def collapse(labels: list[int], blank: int) -> tuple[list[int], list[int]]:
    """(tokens, frames): the frame-level labels with repeats merged and blanks dropped, and the first frame
    of each token's run."""
    tokens, frames = [], []
    prev = None
    for t, c in enumerate(labels):
        if c != blank and c != prev:
            tokens.append(c)
            frames.append(t)
        prev = c
    return tokens, frames


def ctc_greedy_decode(
    log_probs: torch.Tensor, input_lengths: torch.Tensor, blank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (N, T) int64 padded with blank, lengths (N,) int64, frames (N, T) int64 padded with -1)."""
    T, N, _ = log_probs.shape
    tokens = torch.full((N, T), blank, dtype=torch.int64)
    frames = torch.full((N, T), -1, dtype=torch.int64)
    lengths = torch.zeros(N, dtype=torch.int64)
    lp = log_probs.detach().cpu().double()
    for n in range(N):
        labels = [_argmax(lp[t, n].tolist()) for t in range(int(input_lengths[n]))]
        toks, frs = collapse(labels, blank)
        lengths[n] = len(toks)
        tokens[n, : len(toks)] = torch.tensor(toks, dtype=torch.int64)
        frames[n, : len(frs)] = torch.tensor(frs, dtype=torch.int64)
    device = log_probs.device
    return tokens.to(device), lengths.to(device), frames.to(device)


def _states(target: list[int], blank: int) -> tuple[list[int], list[bool]]:
    """Per extended state: its class, and whether it may be entered from two states back."""
    ext = [blank]
    for label in target:
        ext += [label, blank]
    skip = [s >= 2 and s % 2 == 1 and ext[s] != ext[s - 2] for s in range(len(ext))]
    return ext, skip


def _add(a: float, b: float) -> float:
    v = a + b
    return NEG_INF if math.isnan(v) else v


def viterbi(lp: list[list[float]], target: list[int], blank: int) -> list[int]:
    """The best state path (one state per frame) of the frames lp (T lists of C log-probs), ties as documented.
    None marks a state that no path prefix reaches."""
    T = len(lp)
    ext, skip = _states(target, blank)
    W = len(ext)
    alpha: list[list[float | None]] = []
    back: list[list[int]] = []
    for t in range(T):
        row: list[float | None] = [None] * W
        ptr = [0] * W
        for s in range(W):
            if t == 0:
                if s <= 1:
                    row[s] = _add(0.0, lp[0][ext[s]])
                continue
            best, step = None, 0
            for k in (0, 1, 2):  # stay first: a later candidate wins only when strictly greater
                if s - k < 0 or (k == 2 and not skip[s]):
                    continue
                a = alpha[t - 1][s - k]
                if a is not None and (best is None or a > best):
                    best, step = a, k
            if best is not None:
                row[s], ptr[s] = _add(best, lp[t][ext[s]]), step
        alpha.append(row)
        back.append(ptr)
    last = alpha[-1]
    s = W - 1
    if W > 1 and last[W - 2] is not None and (last[W - 1] is None or not last[W - 1] > last[W - 2]):
        s = W - 2  # the last label wins ties over the trailing blank
    path = [0] * T
    for t in range(T - 1, -1, -1):
        path[t] = s
        s -= back[t][s]
    return path


def min_frames(target: list[int]) -> int:
    """Frames an alignment of target needs: one per label plus a blank between equal neighbours."""
    return len(target) + sum(a == b for a, b in zip(target, target[1:]))


def ctc_forced_align(
    log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor, target_lengths: torch.Tensor,
    blank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(paths (N, T) int64, scores (N, T) in log_probs' dtype): per frame the label of the best alignment and
    its log-prob; blank and 0 past input_lengths[n]."""
    T, N, _ = log_probs.shape
    paths = torch.full((N, T), blank, dtype=torch.int64)
    scores = torch.zeros((N, T), dtype=log_probs.dtype)
    lp = log_probs.detach().cpu()
    lp64 = lp.double()
    for n in range(N):
        Tn, L = int(input_lengths[n]), int(target_lengths[n])
        target = targets[n, :L].tolist()
        if min_frames(target) > Tn:
            raise ValueError(f"sample {n}: target of {L} labels needs {min_frames(target)} frames, has {Tn}")
        if Tn == 0:
            continue
        ext, _ = _states(target, blank)
        states = viterbi(lp64[:Tn, n].tolist(), target, blank)
        labels = torch.tensor([ext[s] for s in states], dtype=torch.int64)
        paths[n, :Tn] = labels
        scores[n, :Tn] = lp[torch.arange(Tn), n, labels]
    device = log_probs.device
    return paths.to(device), scores.to(device)


# --------------------------------------------------------------------------------------------------------------
# Brute force, for tests on tiny problems


def all_alignments(T: int, target: list[int], blank: int) -> list[list[int]]:
    """Every state path of T frames that collapses to target (see the module docstring)."""
    ext, skip = _states(target, blank)
    W = len(ext)
    ends = {W - 1, W - 2} if W > 1 else {0}
    found = []
    for path in itertools.product(range(W), repeat=T):
        if T == 0 or path[0] > 1 or path[-1] not in ends:
            continue
        if all(b - a in (0, 1) or (b - a == 2 and skip[b]) for a, b in zip(path, path[1:])):
            found.append(list(path))
    return found


def path_score(lp: list[list[float]], states: list[int], target: list[int], blank: int) -> float:
    """Sum of the path's log-probs in frame order (NaN counted as -inf), as the recursion adds them."""
    ext, _ = _states(target, blank)
    total = 0.0
    for t, s in enumerate(states):
        total = _add(total, lp[t][ext[s]])
    return total


def brute_force_align(lp: list[list[float]], target: list[int], blank: int) -> list[int]:
    """The best state path by trying them all, ties as documented: ending on the last label first, then the
    largest states read from the last frame backwards."""
    ext, _ = _states(target, blank)
    last_label = len(ext) - 2

    def key(path):
        return (path_score(lp, path, target, blank), path[-1] == last_label, path[::-1])

    return max(all_alignments(len(lp), target, blank), key=key)


def brute_force_greedy(lp: list[list[float]], blank: int) -> list[int]:
    """The most probable single path's collapse, found among all C**T label paths (no NaN)."""
    C = len(lp[0]) if lp else 0
    best = max(itertools.product(range(C), repeat=len(lp)),
               key=lambda p: (sum(lp[t][c] for t, c in enumerate(p)), [-c for c in p]), default=())
    return collapse(list(best), blank)[0]
