"""Timing and profiling of one step function: step time, peak memory, per-op self time, a Chrome trace."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

GROUPS = ("attention", "ctc", "matmul", "softmax", "other")
STEP_RANGE = "profile.step"  # the record_function range around each profiled step

_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
               "aten::linear", "aten::mv", "aten::dot", "aten::_addmm_activation", "aten::addmv"}
_ATTENTION_WORDS = ("attention", "sdpa", "_attn", "flash", "fmha")
_MATMUL_WORDS = ("gemm", "cutlass", "xmma", "matmul", "wgmma", "nvjet")


def group_of(name: str) -> str:
    """The group an op or kernel name belongs to: attention, ctc, matmul, softmax or other."""
    low = name.lower()
    if "ctc" in low:
        return "ctc"
    if any(w in low for w in _ATTENTION_WORDS):
        return "attention"
    if "softmax" in low:
        return "softmax"
    if name in _MATMUL_OPS or any(w in low for w in _MATMUL_WORDS):
        return "matmul"
    return "other"


@dataclass
class OpRow:
    """One op (or, ``on_device``, a GPU kernel, copy or memset) of a profiled step: self times in seconds and
    calls, per step."""

    name: str
    group: str
    self_cpu_s: float
    self_device_s: float
    calls: float
    on_device: bool = False

    def time_s(self, device: str) -> float:
        """The time this row adds to its group: on CUDA the GPU activities' own time only (torch also books each
        kernel's time as the launching CPU op's self device time, which would count it twice), else CPU time."""
        if device == "cuda":
            return self.self_device_s if self.on_device else 0.0
        return self.self_cpu_s


@dataclass
class Measurement:
    """One provider's figures: the median step time (timed outside the profiler), the peak memory of a step
    above what was live before it, and the profiled ops."""

    step_times_s: list[float]
    peak_memory_bytes: int
    ops: list[OpRow]
    trace: str | None = None
    kernel_names: set[str] = field(default_factory=set)

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_times_s)

    def group_s(self, device: str) -> dict[str, float]:
        out = dict.fromkeys(GROUPS, 0.0)
        for op in self.ops:
            out[op.group] += op.time_s(device)
        return out


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], Any], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def _activities(device: str) -> list[ProfilerActivity]:
    acts = [ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(ProfilerActivity.CUDA)
    return acts


def _cpu_peak(prof: Any) -> int:
    """Peak of the running total of tensor allocations (+) and frees (-) recorded by the profiler.

    torch's CPU allocator keeps no statistics; the profiler's memory events are replayed in time order.
    """
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _cuda_peak(step: Callable[[], Any]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - base)


def _self_device_us(avg: Any) -> float:
    # torch >= 2.4 names it self_device_time_total; older releases self_cuda_time_total.
    return float(getattr(avg, "self_device_time_total", getattr(avg, "self_cuda_time_total", 0.0)))


def profile_step(step: Callable[[], Any], device: str, steps: int, trace: Path | None) -> Measurement:
    """Run ``step`` ``steps`` times under ``torch.profiler`` (CPU, and CUDA when ``device`` is cuda; memory);
    export the Chrome trace to ``trace``. Self times and calls are per step.

    One more step runs first under the profiler's warm-up phase (not recorded): the first recorded step
    would otherwise carry the profiler's own start-up cost.
    """
    with profile(activities=_activities(device), profile_memory=True,
                 schedule=schedule(wait=0, warmup=1, active=steps, repeat=1)) as prof:
        for _ in range(steps + 1):
            with record_function(STEP_RANGE):
                step()
            synchronize(device)
            prof.step()
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    ops = []
    kernels = set()
    for avg in prof.key_averages():
        cpu_us, dev_us = float(avg.self_cpu_time_total), _self_device_us(avg)
        on_device = getattr(avg, "device_type", None) == torch.autograd.DeviceType.CUDA
        if on_device:
            kernels.add(avg.key)
        if (cpu_us == 0.0 and dev_us == 0.0) or avg.key.startswith("ProfilerStep"):  # the schedule's own marker
            continue
        ops.append(OpRow(avg.key, group_of(avg.key), cpu_us / 1e6 / steps, dev_us / 1e6 / steps, avg.count / steps,
                         on_device))
    peak = _cuda_peak(step) if device == "cuda" else _cpu_peak(prof)
    return Measurement([], peak, ops, str(trace) if trace is not None else None, kernels)
