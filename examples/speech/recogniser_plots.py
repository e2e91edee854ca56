"""The recogniser's picture: one held-out utterance's log-mel spectrogram above its per-frame CTC posteriors
and greedy path."""

from __future__ import annotations

from pathlib import Path

import torch

from ..common import save_figure
from . import ctc_metrics, vocabulary
from .recogniser_model import Recogniser


@torch.no_grad()
def plot_posteriors(path: Path, model: Recogniser, raw_features: torch.Tensor, features: torch.Tensor,
                    text: str) -> Path:
    """Top: log-mel [frames, 80] as the model's input sees it before normalisation (`raw_features`); bottom:
    softmax posteriors [NUM_CLASSES, T'] of the (normalised) `features` on the output frames (40 ms, or less with
    `outputs_per_frame` > 1), with the greedy path's characters written where they fire. Saved as a PNG; returns
    the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = model.training
    model.eval()
    logits, lengths = model(features[None], torch.tensor([features.shape[0]]))
    model.train(was_training)
    posteriors = logits[:, 0].softmax(-1)  # [T', C]
    hypothesis = ctc_metrics.greedy_transcripts(logits, lengths)[0]
    frames, out_frames = raw_features.shape[0], posteriors.shape[0]
    step = frames / out_frames  # feature frames per output frame (4 / outputs_per_frame, up to rounding)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.4), sharex=True,
                                      gridspec_kw={"height_ratios": [1.1, 1.4]})
    top.imshow(raw_features.T.numpy(), origin="lower", aspect="auto", cmap="magma",
               extent=(0, frames / 100.0, 0, raw_features.shape[1]))
    top.set_ylabel("mel bin")
    top.set_title(f"reference: \"{text}\"\ngreedy:      \"{hypothesis}\"", loc="left", family="monospace", fontsize=10)
    bottom.imshow(posteriors.T.numpy(), origin="lower", aspect="auto", cmap="Greys", vmin=0.0, vmax=1.0,
                  extent=(0, out_frames * step / 100.0, -0.5, posteriors.shape[1] - 0.5), interpolation="nearest")
    labels = ["_"] + ["␣" if c == " " else c for c in vocabulary.CHARACTERS]
    bottom.set_yticks(range(len(labels)), labels, fontsize=6.5)
    bottom.set_ylabel("CTC output (_ = blank)")
    bottom.set_xlabel("time (s)")
    best = posteriors.argmax(-1).tolist()
    previous = 0
    for t, label in enumerate(best):
        if label != 0 and label != previous:  # where the greedy path emits a character
            x = (t + 0.5) * step / 100.0
            bottom.plot(x, label, "o", ms=5, mfc="none", mec="tab:red", mew=1.2)
            top.text(x, raw_features.shape[1] - 6, labels[label], color="white", ha="center", fontsize=9,
                     family="monospace")
        previous = label
    bottom.set_title(f"per-frame posteriors ({step * 10:.0f} ms frames); circles: the greedy path's characters",
                     loc="left", fontsize=9)
    return save_figure(fig, path, dpi=120)
