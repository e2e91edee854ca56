"""torch against seqfast, side by side, under ``torch.profiler``.

Command line: ``python -m seqfast.profile WORKLOAD [--out DIR] [--shape K=V,...]`` (``--list`` shows the
workloads and their shape keys). From Python: :func:`compare` on any two step functions, or
:func:`profile_workload` on a named workload.

Each side runs its warm-up steps, then timed steps (alternating torch and seqfast, outside the profiler:
the step time is their median), then profiled steps under ``torch.profiler`` (CPU activity, CUDA too on
CUDA; memory). What comes out (:class:`Comparison`): step time, peak memory of a step, per-op self time
and calls per step, grouped into attention, CTC, matmul, softmax and other with the ratio torch / seqfast
per group; in ``DIR``: ``<name>.torch.trace.json`` and ``<name>.seqfast.trace.json`` (Chrome / Perfetto
traces), ``<name>.md``, ``<name>.json`` and ``<name>.groups.png``. On CUDA, each seqfast Triton kernel
that ran gets its resource row (registers, spills, shared memory, tensor-core instructions).

seqfast's ops appear in traces under their own names (``seqfast::attention_forward``,
``seqfast::attention_backward``, ``seqfast::ctc_loss_forward``, ``seqfast::ctc_loss_backward``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from seqfast.info import _cpu_model
from seqfast.profile._measure import GROUPS, Measurement, OpRow, group_of, profile_step, timed
from seqfast.profile._report import Comparison
from seqfast.profile.workloads import WORKLOADS, Workload, build_workload

__all__ = ["GROUPS", "Comparison", "Measurement", "OpRow", "WORKLOADS", "Workload", "build_workload", "compare",
           "group_of", "profile_workload"]


def _where(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()}), torch {torch.__version__}"
    return f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads), torch {torch.__version__}"




def compare(
    fn_torch: Callable[[], Any],
    fn_seqfast: Callable[[], Any],
    *,
    name: str = "workload",
    description: str = "",
    device: str | None = None,
    warmup: int = 2,
    steps: int = 10,
    profiled_steps: int = 3,
    out_dir: str | Path | None = None,
    top: int = 10,
    notes: list[str] | None = None,
) -> Comparison:
    """Run ``fn_torch`` and ``fn_seqfast`` (zero-argument step functions: the same work, one with torch's ops,
    one with seqfast's) and compare them; returns the :class:`Comparison` (``to_text()``, ``to_markdown()``,
    ``to_dict()``, ``groups()``).

    ``device``: where the steps run (``"cuda"`` adds CUDA activity, synchronises around steps and reads
    the CUDA allocator's peak); default CUDA when torch sees one. ``warmup`` steps of each first (allocator,
    caches, Triton compilation), then ``steps`` timed steps of each, alternating, then ``profiled_steps``
    of each under the profiler. With ``out_dir``, the two traces, the markdown and JSON tables and the PNG
    chart are written there, named after ``name``.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fns = {"torch": fn_torch, "seqfast": fn_seqfast}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {"torch": [], "seqfast": []}
    for _ in range(steps):
        for provider, fn in fns.items():
            times[provider].append(timed(fn, device))
    results = {}
    for provider, fn in fns.items():
        trace = Path(out_dir) / f"{name}.{provider}.trace.json" if out_dir is not None else None
        results[provider] = profile_step(fn, device, profiled_steps, trace)
        results[provider].step_times_s = times[provider]
    kernels: list[dict[str, Any]] = []
    if device == "cuda":
        from seqfast.profile._triton_rows import kernel_rows

        kernels = kernel_rows(results["seqfast"].kernel_names)
    comparison = Comparison(name, description, device, _where(device), results["torch"], results["seqfast"], top,
                            list(notes or []), kernels)
    if out_dir is not None:
        comparison.files = {p: results[p].trace for p in fns}
        comparison.write(out_dir)
    return comparison


def profile_workload(workload: str, shape: dict[str, Any] | None = None, *, device: str | None = None,
                     dtype: str = "float32", out_dir: str | Path | None = None, **kwargs: Any) -> Comparison:
    """:func:`compare` on a named workload (see :data:`WORKLOADS`) or a user's ``module:function``."""
    w = build_workload(workload, shape or {}, device=device, dtype=dtype)
    try:
        comparison = compare(w.torch_step, w.seqfast_step, name=w.name, description=w.description,
                             device=w.device, out_dir=out_dir, **kwargs)
    finally:
        w.close()
    comparison.notes += w.notes()  # known only after the steps ran (e.g. how many calls seqfast served)
    if out_dir is not None:
        comparison.write(out_dir)
    return comparison
