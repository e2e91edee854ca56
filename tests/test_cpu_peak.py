"""The machine record of the CPU benchmarks: seqfast._C.fma_peak (the FMA-loop peak each figure is read
against) and benchmarks/_cpu_isa.py (capping torch's ISA so an AVX-512 machine stands in for an AVX2 one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seqfast import _C

ROOT = Path(__file__).resolve().parent.parent


def test_fma_peak_reports_the_isa_and_sane_rates():
    base = _C.fma_peak("baseline", 1, 200_000, 3)
    assert base["isa"] == "baseline" and base["lanes"] == 1 and base["threads"] == 1
    assert 0.1 < base["gflops_per_core"] < 1000
    active = _C.fma_peak("", 0, 200_000, 3)
    assert active["isa"] == _C.cpu_isa() and active["threads"] >= 1 and active["gflops"] > 0
    if _C.cpu_isa_supported() != "baseline":
        # 8 lanes per FMA against one scalar multiply-add: the vector loop must be several times faster, or
        # its chains are not running in registers.
        ymm = _C.fma_peak("avx2", 1, 200_000, 3)
        assert ymm["lanes"] == 8 and ymm["gflops_per_core"] > 3 * base["gflops_per_core"], (ymm, base)


def test_fma_peak_rejects_an_unknown_isa():
    with pytest.raises(RuntimeError, match="fma_peak"):
        _C.fma_peak("sse9", 1, 1000, 1)


def test_torch_isa_cap_reaches_torch():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); from _cpu_isa import cap_torch_isa; "
            "print(cap_torch_isa(['x', '--torch-isa', 'avx2'])); import torch; "
            "print(torch.backends.cpu.get_cpu_capability())")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                            "ONEDNN_MAX_CPU_ISA")}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    cap, torch_cap = res.stdout.split()
    assert cap == "avx2"
    assert torch_cap in ("AVX2", "DEFAULT")  # DEFAULT: a CPU without AVX2 stays below the cap


def test_torch_isa_cap_refuses_after_torch_is_imported():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import torch  # noqa: F401
        from _cpu_isa import cap_torch_isa
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert cap_torch_isa(["x"]) is None  # no flag: nothing to do
    with pytest.raises(RuntimeError, match="before torch"):
        cap_torch_isa(["x", "--torch-isa", "avx2"])
