"""The training curves and the cross-attention heat maps."""

from __future__ import annotations

from pathlib import Path

import torch

from examples.common import plot_curves, save_figure


def training_curves(path: Path, losses: list[tuple[float, float]], accuracy: list[tuple[float, float]],
                    title: str) -> Path:
    """Training loss and held-out exact-match accuracy against the step."""
    return plot_curves(path, {"training loss": losses, "validation exact match": accuracy}, title,
                       log_y={"training loss"})


def cross_attention_heatmaps(path: Path, weights: torch.Tensor, source: str, output: str, title: str) -> Path:
    """One panel per head: (H, T, S) float ``weights`` of the T output characters (rows) over the S source
    characters (columns), ticks labelled with the characters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H, T, S = weights.shape
    cols = min(H, 4)
    rows = (H + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(0.22 * S * cols + 1.5, 0.3 * T * rows + 1.2), squeeze=False)
    xs = [c if c != " " else "␣" for c in source]
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(weights[h].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(S), xs, fontsize=7)
        ax.set_yticks(range(T), list(output), fontsize=7)
        ax.set_title(f"head {h}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=90)
