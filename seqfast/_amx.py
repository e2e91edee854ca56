"""Whether torch multiplies bfloat16 on AMX tiles here, and so beats seqfast's CPU attention in bfloat16.

On CPUs with AMX (Intel Sapphire Rapids and later) torch's fused CPU attention runs its bfloat16 products on the
tile unit; seqfast's kernels widen bfloat16 to float32 and use the vector FMA units, and measured 1.3-2.8x
slower there in bfloat16 inference at 2 threads (benchmarks/NOTES.md, "bfloat16 inference on AMX goes to torch"),
and up to 2x slower in forward+backward once a head's work is large ("bfloat16 training on AMX"). The AVX512-BF16
dot product is no substitute on that CPU (about half the FMA's rate), so seqfast hands those calls to torch
(``functional._bf16_for_torch`` says which): the same numbers as torch, at torch's speed.
``SEQFAST_BF16_ATTENTION=seqfast`` keeps them on seqfast's kernel.
"""

from __future__ import annotations

import os

import torch

ENV = "SEQFAST_BF16_ATTENTION"


def torch_multiplies_bf16_on_amx() -> bool:
    """True when the CPU has AMX tiles for bfloat16 and the OS grants their state (torch's own request,
    ``torch._C._cpu._init_amx``, which is False on CPUs without them), oneDNN is not capped below AMX
    (``ONEDNN_MAX_CPU_ISA``), and ``SEQFAST_BF16_ATTENTION`` is not ``seqfast``."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "seqfast"):
        raise ValueError(f"{ENV} must be auto or seqfast, got {choice!r}")
    if choice == "seqfast":
        return False
    init_amx = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    try:
        granted = bool(init_amx()) if init_amx is not None else False
    except RuntimeError:
        granted = False
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    return granted and (not onednn_cap or "AMX" in onednn_cap.upper())
