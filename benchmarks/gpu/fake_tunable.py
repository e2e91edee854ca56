"""A tiny Triton kernel module with the shared tuning interface, to test the ``sweep`` group on.

``scaled_rows(x, alpha)``: ``alpha * x`` for a (R, C) float32 tensor, by one launch of
``_scale_rows`` with tunables BLOCK / num_warps. Its ``CONFIG_SPACE`` holds two good configs, one that is
deliberately wrong (``WRONG=1`` adds 1 to the output: the sweep must reject it by the equality check) and one
that cannot launch (BLOCK not a power of two: the sweep must record the error and go on).

The interface, as the kernel modules implement it: ``CONFIG_SPACE`` {launch name: [config dicts]} and
``forced_config(name, config)``, a context manager under which that launch uses ``config``; unknown names
raise ``ValueError``; nesting restores the outer choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

CONFIG_SPACE: dict[str, list[dict]] = {
    "scale": [
        {"BLOCK": 64, "num_warps": 1},
        {"BLOCK": 128, "num_warps": 4},
        {"BLOCK": 64, "num_warps": 2, "WRONG": 1},
        {"BLOCK": 96, "num_warps": 2},
    ],
}
DEFAULT = {"scale": {"BLOCK": 32, "num_warps": 1}}
# Launch name -> config in force (absent: the default).
_FORCED: dict[str, dict] = {}
# What the sweep must conclude, for the self-test: config index -> "ranked" / "rejected" / "error".
EXPECTED = {"scale": {0: "ranked", 1: "ranked", 2: "rejected", 3: "error"}}


@contextlib.contextmanager
def forced_config(kernel: str, config: dict) -> Iterator[None]:
    if kernel not in CONFIG_SPACE:
        raise ValueError(f"unknown kernel {kernel!r}; tunable kernels: {sorted(CONFIG_SPACE)}")
    had, outer = kernel in _FORCED, _FORCED.get(kernel)
    _FORCED[kernel] = dict(config)
    try:
        yield
    finally:
        if had:
            _FORCED[kernel] = outer
        else:
            _FORCED.pop(kernel, None)


@triton.jit
def _scale_rows(X, Y, C, alpha, BLOCK: tl.constexpr, WRONG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        ok = offs < C
        x = tl.load(X + row * C + offs, mask=ok, other=0.0)
        tl.store(Y + row * C + offs, x * alpha + WRONG, mask=ok)


def scaled_rows(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * x`` for a contiguous (R, C) float32 tensor, through the tunable launch "scale"."""
    cfg = _FORCED.get("scale", DEFAULT["scale"])
    y = torch.empty_like(x)
    R, C = x.shape
    _scale_rows[(R,)](x, y, C, alpha, BLOCK=cfg["BLOCK"], WRONG=cfg.get("WRONG", 0), num_warps=cfg["num_warps"])
    return y
