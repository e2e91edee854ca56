"""On CUDA: the resource row (registers, spills, shared memory, tensor-core instructions) of each seqfast
Triton kernel that ran in a profiled step, read from the kernels Triton compiled in this process.

This reads what Triton kept about its compiled kernels (their metadata and cubin); it calls no kernel.
The SASS comes from the ``cuobjdump`` shipped in the triton wheel (as ``benchmarks/kernel_report.py``).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from typing import Any

MMA_OPCODES = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA")
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(?:\.[\w.]*)?\s")


def _jit_functions() -> dict[str, Any]:
    """name -> triton JITFunction, for every seqfast Triton kernel module imported so far."""
    out = {}
    for mod_name, module in list(sys.modules.items()):
        if not mod_name.startswith("seqfast.kernels.") or module is None:
            continue
        for attr, value in vars(module).items():
            fn = value
            while hasattr(fn, "fn") and not hasattr(fn, "device_caches"):  # autotuner / heuristics wrappers
                fn = fn.fn
            if hasattr(fn, "device_caches"):
                out[getattr(fn, "__name__", attr)] = fn
    return out


def _compiled(fn: Any) -> list[Any]:
    """The compiled kernels of a JITFunction, over every device it ran on."""
    kernels = []
    for entry in list(fn.device_caches.values()):
        cache = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(cache, dict):
            kernels.extend(cache.values())
    return kernels


def _mma_count(kernel: Any) -> int | str:
    try:
        sass = kernel.asm["sass"]
    except Exception as exc:  # no cuobjdump in this triton wheel: say so in the row
        return f"n/a ({type(exc).__name__})"
    counts = Counter(m.group(1) for m in _SASS_OPCODE.finditer(sass) if m.group(1) in MMA_OPCODES)
    return sum(counts.values())


def kernel_rows(kernel_names: set[str]) -> list[dict[str, Any]]:
    """One row per compiled variant of each seqfast Triton kernel whose name is among ``kernel_names`` (the
    CUDA kernels a profile recorded): kernel, num_warps, num_stages, registers, spills, shared_bytes, mma."""
    rows = []
    for name, fn in sorted(_jit_functions().items()):
        if not any(k == name or k.startswith(name) for k in kernel_names):
            continue
        for kernel in _compiled(fn):
            meta = getattr(kernel, "metadata", None)
            rows.append({
                "kernel": name,
                "num_warps": getattr(meta, "num_warps", "?"),
                "num_stages": getattr(meta, "num_stages", "?"),
                "registers": getattr(kernel, "n_regs", "?"),
                "spills": getattr(kernel, "n_spills", "?"),
                "shared_bytes": getattr(meta, "shared", "?"),
                "mma_instructions": _mma_count(kernel),
            })
    return rows
