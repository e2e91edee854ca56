"""The CPU kernels' 16-bit row narrowing (csrc/half_rows.h: AVX-512 sixteen lanes at a time, AVX2 eight, scalar
tails and other CPUs through c10) rounds as torch's ``.to(dtype)`` does: to nearest, ties to even, a bfloat16 NaN to
0x7FC0. Random kernel outputs almost never land on a tie (a bfloat16 tie is one float32 in 2^16), so the ties are
made here, with both parities of the kept last bit, in rows long enough for every path's full vectors and tail."""

from __future__ import annotations

import pytest
import torch

from seqfast import _C

ORDER = ["baseline", "avx2", "avx512"]


def _ties(dtype: torch.dtype) -> torch.Tensor:
    """Floats exactly halfway between neighbouring ``dtype`` values (both parities of the last kept bit), their
    negatives, values just off the halfway points, and the specials."""
    kept = {torch.bfloat16: 7, torch.float16: 10}[dtype]  # explicit mantissa bits
    k = torch.arange(1, 2 ** (kept + 1), 2, dtype=torch.float64)  # odd: the bit just below the kept ones
    ties = 1.0 + k * 2.0 ** -(kept + 1)
    scaled = torch.cat([ties, ties * 2.0 ** -3, -ties * 4.0])
    off = torch.cat([scaled.float().nextafter(torch.tensor(0.0)).double(),
                     scaled.float().nextafter(torch.tensor(8.0)).double()])
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 70000.0, 1e-8])
    x = torch.cat([scaled, off, special]).float()
    return torch.cat([x, torch.full(((13 - x.numel()) % 16,), 3.0)])  # 13 past a multiple of 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", ORDER)
def test_row_narrowing_rounds_as_torch(isa, dtype):
    if ORDER.index(_C.cpu_isa_supported()) < ORDER.index(isa):
        pytest.skip(f"needs an {isa} CPU")
    x = _ties(dtype)
    assert x.numel() % 16 == 13  # full vectors of 16, then one of 8 and a scalar tail
    previous = _C.set_cpu_isa(isa)
    try:
        ours = _C.round_rows(x, str(dtype).removeprefix("torch."))
    finally:
        _C.set_cpu_isa(previous)
    ref = x.to(dtype)
    assert ours.dtype == dtype
    nan = ref.isnan()
    assert torch.equal(ours.isnan(), nan)
    assert torch.equal(ours[~nan].view(torch.int16), ref[~nan].view(torch.int16))
    if dtype == torch.bfloat16:
        assert (ours[nan].view(torch.int16) == 0x7FC0).all()
    with pytest.raises(RuntimeError, match="round_rows"):
        _C.round_rows(x.double(), "bfloat16")
