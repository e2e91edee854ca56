"""What every example program shares: the backend switch, seeding, a progress bar, step timing, metrics
JSON and curve plots.

An example trains the same model twice when asked to compare (``--backend seqfast`` and ``--backend torch``):
everything here is backend-neutral, so the two runs differ only in the modules and loss they build.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BACKENDS = ("seqfast", "torch")


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """``--backend``, ``--out``, ``--seed``, ``--threads``, ``--quick`` and ``--smoke``, the same in every example."""
    parser.add_argument("--backend", choices=BACKENDS, default="seqfast",
                        help="which library runs attention and the loss (same model, data and seed either way)")
    parser.add_argument("--out", default=default_out, help="folder for metrics.json and the plots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a run of a few minutes")
    size.add_argument("--smoke", action="store_true", help="seconds: tiny data and a few dozen steps (for tests)")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's and torch's generators; returns a CPU generator for data order (kept apart from dropout's)."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def machine() -> dict[str, Any]:
    """What the figures were measured on (``python -m seqfast.info``'s facts: CPU model, ISA in use, versions),
    plus the torch thread count."""
    from seqfast import info

    facts = info.collect()
    facts["threads"] = torch.get_num_threads()
    return facts


def progress(items: Iterable, total: int | None = None, desc: str = "") -> Iterator:
    """A progress bar on a terminal (tqdm), plain iteration elsewhere; ``set_postfix`` is always callable."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an examples extra; without it the loop still runs, silently
        return _Quiet(items)
    return tqdm(items, total=total, desc=desc, dynamic_ncols=True, leave=False)


class _Quiet:
    def __init__(self, items: Iterable) -> None:
        self._items = items

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass
class StepTimer:
    """Wall-clock seconds per step (synchronising the GPU when there is one), skipping warm-up steps.

    Also the process's CPU seconds per step (all its threads): on a machine shared with other work the
    wall-clock includes time spent waiting for a core, the CPU time does not."""

    warmup: int = 3
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    _seen: int = 0
    _start: float = 0.0
    _cpu_start: float = 0.0

    def __enter__(self) -> StepTimer:
        _sync()
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        _sync()
        self._seen += 1
        if self._seen > self.warmup:
            self.seconds.append(time.perf_counter() - self._start)
            self.cpu_seconds.append(time.process_time() - self._cpu_start)

    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_metrics(out: Path, metrics: dict[str, Any]) -> Path:
    """``out/metrics.json`` with the machine added; returns the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    path.write_text(json.dumps({**metrics, "machine": machine()}, indent=2, default=float) + "\n")
    return path


def plot_curves(path: Path, curves: dict[str, list[tuple[float, float]]], title: str, xlabel: str = "step",
                log_y: set[str] | None = None) -> Path:
    """One panel per named curve of (x, y) points, side by side, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, lw=1.6)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if log_y and name in log_y:
            ax.set_yscale("log")
    fig.suptitle(title)
    return save_figure(fig, path, dpi=120)


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """float32 (length, d_model): the Transformer's positions, sin on even and cos on odd features at
    wavelengths 2*pi ... 10000*2*pi."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inverse = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * inverse)
    table[:, 1::2] = torch.cos(position * inverse)
    return table


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it to ``path`` (making its folder) and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
