"""Capping torch's CPU ISA for a timing run, so that an AVX-512 machine can stand in for an AVX2 one on both
sides of a seqfast / torch ratio.

torch reads its caps when it loads, so ``cap_torch_isa()`` must run before ``import torch``: it looks for
``--torch-isa avx2|avx512`` in ``sys.argv`` and sets ATen's dispatch (ATEN_CPU_CAPABILITY), MKL's
(MKL_ENABLE_INSTRUCTIONS) and oneDNN's (ONEDNN_MAX_CPU_ISA) caps, unless they are set already.
seqfast's own cap is separate (``SEQFAST_CPU_ISA`` or ``seqfast._C.set_cpu_isa``).
"""

from __future__ import annotations

import os
import sys

_CAPS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
}


def cap_torch_isa(argv: list[str] | None = None) -> str | None:
    """Applies ``--torch-isa`` from argv (default sys.argv) to the environment; returns the cap or None."""
    argv = sys.argv if argv is None else argv
    isa = None
    for i, a in enumerate(argv):
        if a == "--torch-isa" and i + 1 < len(argv):
            isa = argv[i + 1]
        elif a.startswith("--torch-isa="):
            isa = a.split("=", 1)[1]
    if isa is None:
        return None
    if isa not in _CAPS:
        raise SystemExit(f"--torch-isa: expected one of {', '.join(_CAPS)}, got {isa}")
    if "torch" in sys.modules:
        raise RuntimeError("cap_torch_isa() must run before torch is imported")
    for k, v in _CAPS[isa].items():
        os.environ.setdefault(k, v)
    return isa
