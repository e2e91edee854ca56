"""Speedup plots of a benchmark run: one PNG per op, speedup (torch time / seqfast time) against work.

Usage: ``python benchmarks/plot.py RESULTS.json [--out DIR] [--prefix NAME]``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import Row, load_rows  # noqa: E402


def _series(row: Row) -> str:
    """The line a row belongs to: direction, plus head size and masking for attention."""
    p = row.shape_params
    if row.op == "attention":
        return f"{row.direction} D={p.get('D')}" + (" causal" if p.get("causal") else "")
    if row.op == "attention_decode":
        return f"{row.direction} D={p.get('D')}" + (f" Lq={p['Lq']}" if p.get("Lq", 1) > 1 else "")
    return row.direction


def plot_speedups(rows: list[Row], out_dir: str | Path, prefix: str = "") -> list[Path]:
    """Write ``<prefix><op>.png`` for every op with at least one paired case; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_op: dict[str, dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.speedup is not None:
            by_op[row.op][_series(row)].append(row)
    paths = []
    for op, series in by_op.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, points in sorted(series.items()):
            points.sort(key=lambda r: r.work)
            ax.plot([r.work for r in points], [r.speedup for r in points], marker="o", label=name)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_yscale("log")  # a ratio: 0.5x and 2x sit symmetrically about 1x
        unit = next(iter(series.values()))[0].work_unit
        device = next(iter(series.values()))[0].device
        ax.set_xlabel(f"work per call ({unit})")
        ax.set_ylabel("speedup vs torch (x)")
        ax.set_title(f"seqfast {op} on {device}: torch time / seqfast time")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{prefix}{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON written by benchmarks/run.py")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: beside the JSON)")
    parser.add_argument("--prefix", default=None, help="file name prefix (default: the JSON's stem + '-')")
    args = parser.parse_args(argv)
    src = Path(args.json)
    prefix = f"{src.stem}-" if args.prefix is None else args.prefix
    paths = plot_speedups(load_rows(src), args.out or src.parent, prefix)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
