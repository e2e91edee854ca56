"""Reads a pytest-benchmark JSON of the seqfast suite into one row per (op, shape, direction).

Each row pairs the torch and seqfast measurements of a case; either may be missing (a failed case, or
the torch-only matmul rate case).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Measurement:
    median_s: float
    rate: float  # work / median / 1e9
    peak_mem_bytes: int
    rounds: int


@dataclass
class Row:
    op: str
    shape: str
    direction: str
    device: str
    work: float
    work_unit: str
    shape_params: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # torch version, device, threads or GPU name
    torch: Measurement | None = None
    seqfast: Measurement | None = None

    @property
    def speedup(self) -> float | None:
        """torch time / seqfast time: above 1 means seqfast is faster."""
        if self.torch is None or self.seqfast is None or self.seqfast.median_s <= 0:
            return None
        return self.torch.median_s / self.seqfast.median_s


def load_rows(path: str | Path) -> list[Row]:
    """Rows in the order the suite ran them."""
    data = json.loads(Path(path).read_text())
    rows: dict[tuple[str, str, str], Row] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "op" not in info:
            continue
        key = (info["op"], info["shape"], info["direction"])
        row = rows.get(key)
        if row is None:
            row = rows[key] = Row(info["op"], info["shape"], info["direction"], info["device"], info["work"],
                                  info["work_unit"], info.get("shape_params", {}), info.get("where", info["device"]))
        median = bench["stats"]["median"]
        m = Measurement(median, info.get("gflops", row.work / median / 1e9), info["peak_mem_bytes"],
                        bench["stats"]["rounds"])
        setattr(row, info["provider"], m)
    return list(rows.values())
