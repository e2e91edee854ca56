"""Opt-in launch-config autotuning: time candidate configs on first use of a key, keep the fastest correct one.

A launcher that offers tuning hands :meth:`Tuner.choose` a key (a string naming everything the best config may
depend on: architecture, dtype, head dim, variant, length bucket), its default config, the candidates, and
``run(config) -> tuple[Tensor, ...]`` (one launch with that config, into fresh outputs). On the first call for
a key the tuner

1. runs the default config and keeps its outputs as the reference (this also compiles it);
2. runs each candidate once and compares its outputs with the reference (same NaN positions, same infinities,
   finite values within ``tol`` of the reference's largest magnitude, per tensor); a candidate that raises or
   differs is dropped with a ``RuntimeWarning`` and never timed;
3. times the default and every surviving candidate with ``timer(fn) -> milliseconds`` (by default Triton's
   ``do_bench`` median: CUDA events, L2 flushed between calls) and keeps the fastest.

Winners live in memory for the life of the process and, when the cache environment variable names a file, are
appended to it as JSON lines (``{"autotune": {"key": .., "config": {..}, "ms": .., "default_ms": .., ...}}``).
The file is read once, on the first lookup; later lines win, so appending never needs a rewrite and several
processes can share one file. Lines that hold the same object under ``"metrics"`` (the records of
``benchmarks/gpu_validate.py``'s sweep) are read as well: its ``gpu_validate.jsonl`` can be shipped as is.

Configs are flat JSON-able dicts. Nothing here knows a kernel; the launcher decides when tuning is allowed.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

Config = dict[str, Any]
Timer = Callable[[Callable[[], Any]], float]


def do_bench_median(fn: Callable[[], Any]) -> float:
    """Median time of ``fn`` in ms by ``triton.testing.do_bench`` (needs a GPU)."""
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except TypeError:  # a triton whose do_bench has no return_mode: its quantiles give the median
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5]))


def outputs_match(got: Sequence[torch.Tensor | None], want: Sequence[torch.Tensor | None], tol: float) -> str | None:
    """None when every tensor of ``got`` matches ``want``: same shapes, NaN where ``want`` is NaN, the same
    infinities, and finite values within ``tol * max |want|`` (per tensor); otherwise the first difference."""
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            if a is not b:
                return f"output {i} is {'missing' if a is None else 'unexpected'}"
            continue
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        if b.numel() == 0:
            continue
        a, b = a.detach().double(), b.detach().double()
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            return f"output {i} has NaN elsewhere"
        inf_a, inf_b = torch.isinf(a), torch.isinf(b)
        if not torch.equal(inf_a, inf_b) or not torch.equal(a[inf_a], b[inf_b]):
            return f"output {i} has infinities elsewhere"
        finite = torch.isfinite(b)
        if not finite.any():
            continue
        scale = float(b[finite].abs().max())
        err = float((a[finite] - b[finite]).abs().max())
        if err > tol * max(scale, 1e-30):
            return f"output {i} differs by {err:.3g} (tolerance {tol:g} x {scale:.3g})"
    return None


def read_entries(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{key: entry} from a JSON-lines cache file (later lines win); {} when the file does not exist. Lines that
    are not JSON objects holding an ``autotune`` entry (top level or under ``metrics``) are skipped."""
    entries: dict[str, dict[str, Any]] = {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line of a killed writer, or a foreign line
        if not isinstance(record, dict):
            continue
        entry = record.get("autotune", (record.get("metrics") or {}).get("autotune"))
        if isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("config"), dict):
            entries[entry["key"]] = entry
    return entries


def append_entry(path: str | os.PathLike, entry: dict[str, Any]) -> None:
    """Append one entry as a JSON line, with one ``write`` on an ``O_APPEND`` descriptor (no torn interleaving
    between processes)."""
    data = (json.dumps({"autotune": entry}, sort_keys=True) + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class Tuner:
    """Per-key choice among candidate configs (see the module docstring).

    ``cache_env``: the environment variable naming the JSON-lines cache file (read when first needed, and
    again whenever the variable changes); ``timer``: ms of one call of its argument (default
    :func:`do_bench_median`), replaceable for tests.
    """

    def __init__(self, name: str, cache_env: str, timer: Timer | None = None) -> None:
        self.name = name
        self.cache_env = cache_env
        self.timer: Timer = timer or do_bench_median
        self.entries: dict[str, dict[str, Any]] = {}
        self._loaded_from: str | None = None

    def clear(self) -> None:
        """Forget every entry (the file, if any, is read again on the next lookup)."""
        self.entries.clear()
        self._loaded_from = None

    def cache_path(self) -> str | None:
        return os.environ.get(self.cache_env) or None

    def lookup(self, key: str) -> Config | None:
        """The cached config of ``key`` (memory, then the cache file), or None."""
        path = self.cache_path()
        if path is not None and path != self._loaded_from:
            for k, entry in read_entries(path).items():
                self.entries.setdefault(k, entry)  # what this process tuned itself stays
            self._loaded_from = path
        entry = self.entries.get(key)
        return dict(entry["config"]) if entry is not None else None

    def choose(self, key: str, default: Config, candidates: Sequence[Config],
               run: Callable[[Config], Sequence[torch.Tensor | None]], tol: float) -> Config:
        """The config to launch for ``key``: the cached one, else the fastest of ``default`` and the candidates
        that reproduce the default's outputs (timed now, then cached)."""
        cached = self.lookup(key)
        if cached is not None:
            return cached
        reference = run(default)  # the default must work: its errors are the caller's
        timed: list[tuple[float, int, Config]] = [(self.timer(lambda: run(default)), 0, default)]
        dropped = []
        unique = []
        for config in candidates:
            if config != default and config not in unique:
                unique.append(config)
        for i, config in enumerate(unique, start=1):
            try:
                problem = outputs_match(run(config), reference, tol)
            except Exception as exc:  # noqa: BLE001 (a candidate that cannot launch is dropped, not fatal)
                problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            if problem is None:
                ms = self.timer(lambda config=config: run(config))
                if math.isfinite(ms):
                    timed.append((ms, i, config))
                    continue
                problem = f"its time is {ms}"
            dropped.append(config)
            warnings.warn(f"{self.name} autotuning of {key}: candidate {json.dumps(config, sort_keys=True)} dropped: "
                          f"{problem}", RuntimeWarning, stacklevel=3)
        best_ms, _, best = min(timed, key=lambda t: (t[0], t[1]))
        entry = {"key": key, "config": dict(best), "ms": round(best_ms, 6), "default_ms": round(timed[0][0], 6),
                 "candidates": len(unique), "dropped": len(dropped)}
        self.entries[key] = entry
        path = self.cache_path()
        if path is not None:
            append_entry(path, entry)
        return dict(best)
