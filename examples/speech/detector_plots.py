"""The detector's figures: the ROC (detection rate against false alarms per hour) and one clip's spectrogram
with the output probability and the trigger ends."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..common import save_figure
from .detection_metrics import Score


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(path: Path, points: Sequence[Score], chosen: Score, title: str) -> Path:
    """Detection rate against false alarms per hour over the thresholds of `points`, the chosen one marked."""
    plt = _pyplot()
    fa = np.array([p.false_alarms_per_hour for p in points])
    det = np.array([p.detection_rate for p in points])
    order = np.lexsort((det, fa))  # by false alarms, then detection: the curve climbs at equal rates
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.plot(fa[order], det[order], marker=".", lw=1.4)
    ax.plot([chosen.false_alarms_per_hour], [chosen.detection_rate], "o", color="C3",
            label=f"threshold {chosen.threshold:.3g}: {chosen.detection_rate:.1%}, "
                  f"{chosen.false_alarms_per_hour:.2f} FA/h")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0.0)  # no negative rates: symlog would otherwise show its mirror image
    ax.set_xlabel("false alarms per hour")
    ax.set_ylabel("detection rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path, dpi=120)


def plot_clip(path: Path, feats: torch.Tensor, probs: torch.Tensor, smoothed: np.ndarray, ends: Sequence[int],
              words: Sequence[tuple[str, int, int]], threshold: float, sample_rate: int, hop: int, out_hop: int,
              title: str) -> Path:
    """Log-mel spectrogram (float [frames, 80]) above the output probability (float [frames // k]) and its
    smoothing, with the threshold, each trigger's end (red) and the foreground words (labelled)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 5.2), sharex=True, gridspec_kw={"height_ratios": [1.2, 1]})
    seconds = feats.shape[0] * hop / sample_rate
    ax1.imshow(feats.T.numpy(), origin="lower", aspect="auto", extent=(0, seconds, 0, feats.shape[1]),
               cmap="magma")
    ax1.set_ylabel("mel bin")
    t_out = (np.arange(probs.shape[0]) + 1) * out_hop / sample_rate  # an output frame's last input frame
    ax2.plot(t_out, probs.numpy(), lw=1.0, color="C0", alpha=0.5, label="probability")
    ax2.plot(t_out, smoothed, lw=1.6, color="C0", label="smoothed")
    ax2.axhline(threshold, color="grey", ls="--", lw=0.8, label=f"threshold {threshold:.3g}")
    for word, start, _ in words:
        ax1.text(start / sample_rate, feats.shape[1] - 6, word, color="white", fontsize=7)
    for i, e in enumerate(ends):
        for ax in (ax1, ax2):
            ax.axvline(e / sample_rate, color="red", lw=1.2, label="trigger end" if (ax is ax2 and i == 0) else None)
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("P(trigger)")
    ax2.legend(loc="upper left", fontsize=8, ncol=4)
    ax1.set_title(title)
    return save_figure(fig, path, dpi=110)
