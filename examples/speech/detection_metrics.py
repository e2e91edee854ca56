"""Detection rate and false alarms of a trigger-word detector's probability tracks.

A track is the detector's probability per output frame, smoothed by a causal moving average. At a threshold,
the track *fires* where the smoothed probability rises to it (below at the frame before, at or above here); a
firing less than `refractory` frames after the previous one belongs to the same event, so an event is a run of
frames at or above the threshold (several runs merged when they start within the refractory period of the
event's first firing). A trigger counts as detected when the track is at or above the threshold somewhere in
its window (the label window: frames `end // hop + 1 .. end // hop + window`) widened by `tolerance` frames on
each side; an event that touches no widened window is a false alarm. False alarms per hour divide by the total
duration of the clips scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class DetectionRules:
    """hop: samples per output frame; window: label window in frames; smooth: moving-average length in frames
    (1 = none); tolerance and refractory in frames."""

    hop: int
    window: int
    smooth: int = 3
    tolerance: int = 5
    refractory: int = 12


@dataclass(frozen=True)
class Score:
    """Counts over a set of clips at one threshold."""

    threshold: float
    triggers: int
    detected: int
    false_alarms: int
    hours: float

    @property
    def detection_rate(self) -> float:
        return self.detected / self.triggers if self.triggers else float("nan")

    @property
    def false_alarms_per_hour(self) -> float:
        return self.false_alarms / self.hours if self.hours else float("nan")


def smooth(probs: np.ndarray, frames: int) -> np.ndarray:
    """Causal moving average over the last `frames` frames (fewer at the start): float [..., T] -> [..., T]."""
    p = np.asarray(probs, dtype=np.float64)
    if frames <= 1:
        return p
    c = np.cumsum(p, axis=-1)
    out = c.copy()
    out[..., frames:] = c[..., frames:] - c[..., :-frames]
    counts = np.minimum(np.arange(1, p.shape[-1] + 1), frames)
    return out / counts


def firings(track: np.ndarray, threshold: float, refractory: int) -> list[int]:
    """Frames where the (already smoothed) track [T] rises to `threshold`, each at least `refractory` frames
    after the previous firing. A track already at the threshold at frame 0 fires there."""
    return [first for first, _ in events(track, threshold, refractory)]


def events(track: np.ndarray, threshold: float, refractory: int) -> list[tuple[int, int]]:
    """(first, last) frames, inclusive, of each event of the track [T] at `threshold`: a firing and every
    frame at or above the threshold until the next firing (runs that start within `refractory` frames of the
    event's firing are part of it)."""
    above = np.asarray(track) >= threshold
    edges = np.diff(np.concatenate([[0], above.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    out: list[tuple[int, int]] = []
    for a, b in zip(starts.tolist(), stops.tolist()):
        if out and a - out[-1][0] < refractory:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def trigger_windows(ends: Sequence[int], rules: DetectionRules) -> list[tuple[int, int]]:
    """Per trigger end sample, the frames (first, last) inclusive where the track detects it."""
    return [(e // rules.hop + 1 - rules.tolerance, e // rules.hop + rules.window + rules.tolerance) for e in ends]


def score_clip(track: np.ndarray, ends: Sequence[int], threshold: float, rules: DetectionRules) -> tuple[int, int]:
    """(detected triggers, false alarms) of one smoothed track [T] with triggers ending at `ends` (samples)."""
    windows = trigger_windows(ends, rules)
    above = np.asarray(track) >= threshold
    detected = sum(bool(above[max(a, 0) : b + 1].any()) for a, b in windows)
    fired = events(track, threshold, rules.refractory)
    false_alarms = sum(not any(a <= last and first <= b for a, b in windows) for first, last in fired)
    return detected, false_alarms


def score(probs: torch.Tensor | np.ndarray, ends: Sequence[Sequence[int]], clip_seconds: float, threshold: float,
          rules: DetectionRules) -> Score:
    """Score raw probability tracks float [clips, T] (smoothed here) against their trigger ends."""
    return _score_tracks(smooth(np.asarray(probs), rules.smooth), ends, clip_seconds, threshold, rules)


def _score_tracks(tracks: np.ndarray, ends: Sequence[Sequence[int]], clip_seconds: float, threshold: float,
                  rules: DetectionRules) -> Score:
    detected = false_alarms = 0
    for track, clip_ends in zip(tracks, ends, strict=True):
        d, f = score_clip(track, clip_ends, threshold, rules)
        detected += d
        false_alarms += f
    triggers = sum(len(e) for e in ends)
    return Score(threshold, triggers, detected, false_alarms, len(tracks) * clip_seconds / 3600.0)


def combine(a: Score, b: Score) -> Score:
    """Counts of two sets of clips scored at the same threshold (e.g. trigger clips and background clips)."""
    if a.threshold != b.threshold:
        raise ValueError(f"scores at different thresholds: {a.threshold} and {b.threshold}")
    return Score(a.threshold, a.triggers + b.triggers, a.detected + b.detected, a.false_alarms + b.false_alarms,
                 a.hours + b.hours)


def poisson_interval(count: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Garwood) two-sided interval for the mean of a Poisson count: the lower end is the mean under
    which `count` or more has probability (1 - confidence) / 2, the upper end the mean under which `count` or
    fewer has. Divide by the hours observed for a rate's interval. A zero count gives (0, -ln((1 - c) / 2))."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    tail = (1.0 - confidence) / 2.0
    upper = _solve_poisson_cdf(count, tail)
    lower = 0.0 if count == 0 else _solve_poisson_cdf(count - 1, 1.0 - tail)
    return lower, upper


def _poisson_cdf(k: int, mean: float) -> float:
    """P(X <= k) for X ~ Poisson(mean), summed in log space so that large means do not overflow."""
    if mean == 0.0:
        return 1.0
    return sum(math.exp(j * math.log(mean) - mean - math.lgamma(j + 1)) for j in range(k + 1))


def _solve_poisson_cdf(k: int, target: float) -> float:
    """The mean at which P(X <= k) = target (the CDF falls from 1 to 0 as the mean grows): bisection."""
    lo, hi = 0.0, k + 10.0 * math.sqrt(k + 1) + 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _poisson_cdf(k, mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def default_thresholds() -> np.ndarray:
    """0.01 .. 0.99 by 0.01, then finer towards 1 (where a good detector's operating point lies)."""
    return np.unique(np.round(np.concatenate([np.linspace(0.01, 0.99, 99), 1.0 - np.logspace(-2, -4, 9)]), 6))


def roc(sets: Sequence[tuple[torch.Tensor | np.ndarray, Sequence[Sequence[int]], float]], rules: DetectionRules,
        thresholds: np.ndarray | None = None) -> list[Score]:
    """One combined `Score` per threshold over every (probs [clips, T], trigger ends, clip seconds) set."""
    thresholds = default_thresholds() if thresholds is None else thresholds
    smoothed = [(smooth(np.asarray(probs), rules.smooth), ends, seconds) for probs, ends, seconds in sets]
    out = []
    for thr in thresholds:
        total = None
        for tracks, ends, seconds in smoothed:
            s = _score_tracks(tracks, ends, seconds, float(thr), rules)
            total = s if total is None else combine(total, s)
        out.append(total)
    return out


def choose_threshold(points: Sequence[Score], max_false_alarms_per_hour: float) -> Score:
    """The operating point: among the thresholds with at most `max_false_alarms_per_hour`, the best detection
    rate, and of equals the highest threshold (the widest margin against false alarms). If none qualifies,
    the fewest false alarms."""
    ok = [p for p in points if p.false_alarms_per_hour <= max_false_alarms_per_hour]
    if not ok:
        return min(points, key=lambda p: (p.false_alarms, -p.threshold))
    return max(ok, key=lambda p: (np.nan_to_num(p.detection_rate, nan=0.0), p.threshold))


SMOOTHING_CHOICES = (1, 3, 5, 8)


def choose_operating_point(sets: Sequence[tuple[torch.Tensor | np.ndarray, Sequence[Sequence[int]], float]],
                           rules: DetectionRules, max_false_alarms_per_hour: float,
                           smoothing: Sequence[int] = SMOOTHING_CHOICES
                           ) -> tuple[DetectionRules, Score, dict[int, dict[str, float]]]:
    """The smoothing length and threshold to use, chosen on `sets` (validation clips): for each length,
    `choose_threshold` over the ROC; then the length whose point qualifies (at most `max_false_alarms_per_hour`)
    with the best detection rate, of equals the fewest false alarms, then `rules.smooth` itself, then the
    shortest. Returns (rules with that length, its Score, {length: its point's threshold, detection rate and
    false alarms per hour})."""
    points = {}
    for frames in smoothing:
        candidate = replace(rules, smooth=frames)
        points[frames] = (candidate, choose_threshold(roc(sets, candidate), max_false_alarms_per_hour))

    def rank(item: tuple[int, tuple[DetectionRules, Score]]) -> tuple:
        frames, (_, p) = item
        ok = p.false_alarms_per_hour <= max_false_alarms_per_hour
        return (ok, np.nan_to_num(p.detection_rate, nan=0.0), -p.false_alarms, frames == rules.smooth, -frames)

    _, (best_rules, best) = max(points.items(), key=rank)
    summary = {frames: {"threshold": p.threshold, "detection_rate": p.detection_rate,
                        "false_alarms_per_hour": p.false_alarms_per_hour} for frames, (_, p) in points.items()}
    return best_rules, best, summary
