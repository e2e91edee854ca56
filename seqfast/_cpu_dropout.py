"""The dropout keep-mask of the C++ attention kernels, recomputed with torch integer ops.

The CPU kernels decide keep / drop per score element with a counter-based hash of
``(seed, batch, query head, query row, key column)`` (murmur3's 32-bit finaliser chained over the
coordinates; ``csrc/attention.cpp``), so the backward regenerates the forward's mask and nothing
is stored. :func:`keep_mask` computes the same bits, which lets tests compare the kernels with the
float64 reference given the very same mask.

32-bit products are formed in int64 from 16-bit halves of the constant, so no intermediate
overflows and the result is exact.
"""

from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) held in int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def threshold(p: float) -> int:
    """Elements whose top 24 hash bits are >= this are kept: probability 1 - p (to 2**-24)."""
    return math.ceil(p * 16777216.0)


def keep_mask(seed: torch.Tensor | int, shape: tuple[int, int, int, int], p: float) -> torch.Tensor:
    """Bool (B, Hq, Lq, Lk) keep-mask the C++ kernels use for ``dropout_p = p`` and ``seed`` (an int, or the
    one-element int64 tensor the op takes, on any device: then no value leaves the tensor, so ``torch.compile``
    traces it)."""
    B, H, Lq, Lk = shape
    if isinstance(seed, torch.Tensor):
        s = seed.reshape(()).to("cpu", torch.int64)  # the C++ kernels' mask lives on the CPU
        hi, lo = (s >> 32) & _M32, s & _M32  # two's complement bits, as the kernel's uint64 cast sees them
    else:
        s = seed & ((1 << 64) - 1)
        hi, lo = torch.tensor(s >> 32, dtype=torch.int64), torch.tensor(s & _M32, dtype=torch.int64)
    k = _fmix32(hi ^ 0x9E3779B9)
    k = _fmix32(k ^ lo)
    b = _fmix32(k ^ torch.arange(B, dtype=torch.int64))
    h = _fmix32(b[:, None] ^ torch.arange(H, dtype=torch.int64)[None, :])
    rows = _fmix32(h[:, :, None] ^ torch.arange(Lq, dtype=torch.int64)[None, None, :])
    cols = _fmix32(torch.arange(Lk, dtype=torch.int64) ^ 0x7F4A7C15)
    bits = _fmix32(rows[..., None] ^ cols) >> 8
    return bits >= threshold(p)
