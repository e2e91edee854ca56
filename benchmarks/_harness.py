"""Shapes, work counts and measurement shared by the ``bench_*.py`` modules.

Size tiers (``--bench-size``):

- ``smoke``: tiny shapes that prove the pipeline end to end (seconds, even on the float64 reference backend).
- ``quick``: the smallest real shape of each op.
- ``default``: every shape, except attention L=4096 forward+backward on CPU (about 9-20 s a call there
  for torch alone, which would more than double the suite's time); on CUDA, default is everything.
- ``full``: every shape on every device.

Each benchmark records in ``benchmark.extra_info``: ``op``, ``shape`` (text) and ``shape_params``,
``direction`` (``fwd`` or ``fwd+bwd``), ``provider`` (``torch`` or ``seqfast``), ``device``, ``backend``,
``where`` (device, threads or GPU, torch version), ``work`` and ``work_unit``, ``gflops`` (work / median
seconds / 1e9: GFLOP/s, or giga state updates per second for CTC), ``peak_mem_bytes``, ``rounds`` and
``iterations``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

SIZES = ("smoke", "quick", "default", "full")
FWD, FWD_BWD = "fwd", "fwd+bwd"
DIRECTIONS = (FWD, FWD_BWD)
PROVIDERS = ("torch", "seqfast")
# Backward of attention costs about 2.5 forwards (five matmuls against two), so forward+backward = 3.5x.
ATTENTION_BWD_FACTOR = 3.5


@dataclass(frozen=True)
class CtcShape:
    T: int
    N: int
    C: int
    S: int

    @property
    def label(self) -> str:
        return f"T{self.T}_N{self.N}_C{self.C}_S{self.S}"

    def work(self, direction: str) -> int:
        """State updates of the alpha recursion (N * T * (2S+1)); backward adds the beta recursion."""
        updates = self.N * self.T * (2 * self.S + 1)
        return updates if direction == FWD else 2 * updates


@dataclass(frozen=True)
class AttentionShape:
    B: int
    H: int
    L: int
    D: int
    causal: bool

    @property
    def label(self) -> str:
        return f"B{self.B}_H{self.H}_L{self.L}_D{self.D}" + ("_causal" if self.causal else "")

    def work(self, direction: str) -> float:
        """FLOPs: QK^T and PV are 2 * L * L * D each per head; causal halves them."""
        flops = 4 * self.B * self.H * self.L * self.L * self.D / (2 if self.causal else 1)
        return flops if direction == FWD else ATTENTION_BWD_FACTOR * flops


@dataclass(frozen=True)
class DecodeShape:
    """Lq query rows a sequence and head against a cache of L keys: a decoding step (Lq 1), or a short chunk of
    queries (a prefill chunk, a draft's tokens checked at once)."""

    B: int
    H: int
    L: int
    D: int
    Lq: int = 1

    @property
    def label(self) -> str:
        return f"B{self.B}_H{self.H}_Lq{self.Lq}_L{self.L}_D{self.D}"

    def work(self, direction: str) -> float:
        """FLOPs: Q K^T and P V, 2 * Lq * L * D each per head (forward only)."""
        return 4 * self.B * self.H * self.Lq * self.L * self.D


@dataclass(frozen=True)
class MatmulShape:
    n: int

    @property
    def label(self) -> str:
        return f"{self.n}x{self.n}"

    def work(self, direction: str) -> int:
        return 2 * self.n**3


_CTC = {
    "smoke": [CtcShape(8, 2, 5, 2), CtcShape(12, 3, 6, 4)],
    "quick": [CtcShape(500, 16, 32, 100)],
    "all": [CtcShape(500, 16, 32, 100), CtcShape(1000, 32, 1000, 200), CtcShape(200, 64, 5000, 50),
            CtcShape(4000, 8, 64, 1200)],
}
_ATTN_L = {"smoke": (16, 32), "quick": (512,), "all": (512, 1024, 2048, 4096)}
_ATTN_D = {"smoke": (8,), "quick": (64, 128), "all": (64, 128)}


def ctc_shapes(size: str) -> list[CtcShape]:
    return _CTC["all" if size in ("default", "full") else size]


def attention_cases(size: str, device: str) -> list[tuple[AttentionShape, str]]:
    """(shape, direction) pairs of the tier; see the module docstring for what default leaves out."""
    key = "all" if size in ("default", "full") else size
    B, H = (1, 2) if size == "smoke" else (2, 8)
    cases = []
    for L in _ATTN_L[key]:
        for D in _ATTN_D[key]:
            for causal in (False, True):
                for direction in DIRECTIONS:
                    if size == "default" and device == "cpu" and L >= 4096 and direction == FWD_BWD:
                        continue
                    cases.append((AttentionShape(B, H, L, D, causal), direction))
    return cases


_DECODE = {
    "smoke": [DecodeShape(1, 2, 16, 8)],
    "quick": [DecodeShape(8, 8, 1024, 64)],
    "all": [DecodeShape(32, 8, 256, 64), DecodeShape(8, 8, 1024, 64), DecodeShape(8, 8, 4096, 64),
            DecodeShape(8, 8, 1024, 128), DecodeShape(8, 8, 2048, 128, Lq=16)],
}


def decode_shapes(size: str) -> list[DecodeShape]:
    return _DECODE["all" if size in ("default", "full") else size]


def matmul_shape(size: str) -> MatmulShape:
    return MatmulShape(64 if size == "smoke" else 2048)


def bench_device(config) -> str:
    """The device named by ``--bench-device`` (``auto``: CUDA when torch sees one, else CPU)."""
    choice = config.getoption("--bench-device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--bench-device cuda, but torch sees no CUDA device")
    return choice


def describe(device: str) -> str:
    """torch's version and the device: thread count on CPU, the GPU's name on CUDA."""
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
    return f"{device} ({where}), torch {torch.__version__}"


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def cpu_record() -> str:
    """One line that lets a CPU figure be read against its limit: the CPU model and family, the ISA the
    kernels use, the fp32 FMA-loop peak of that ISA measured now (``seqfast._C.fma_peak``: all threads on
    the wall clock, and one core on its own CPU time), torch's thread count and the load average."""
    from seqfast import _C

    peak = _C.fma_peak("", 0, 10_000_000, 5)
    load = os.getloadavg()
    return (f"cpu: {_cpuinfo_field('model name')} (family {_cpuinfo_field('cpu family')} model "
            f"{_cpuinfo_field('model')}), isa {_C.cpu_isa()} (cpu has {_C.cpu_isa_supported()}), "
            f"{torch.get_num_threads()} threads; FMA loop ({peak['isa']}, {peak['lanes']} lanes): "
            f"{peak['gflops']:.0f} GFLOP/s on {peak['threads']} threads wall, {peak['gflops_per_core']:.0f} "
            f"per core on CPU time; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn: Callable[[], Any], device: str) -> int:
    """Bytes allocated by one call of ``fn`` above what was live before it, at the call's peak.

    CUDA: the caching allocator's peak counter. CPU: torch's CPU allocator keeps no statistics, so the
    allocation and free events recorded by ``torch.profiler`` (``profile_memory=True``) are replayed in
    time order and the running total's maximum is taken. It sees tensor memory only (not malloc inside
    a kernel's own scratch buffers).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _round_budget(device: str, size: str) -> tuple[float, int, int]:
    """(seconds of timed rounds to aim for, least rounds, most rounds)."""
    if size == "smoke":
        return 0.05, 2, 5
    target = float(os.environ.get("SEQFAST_BENCH_TARGET_S", "1.0"))
    return (target, 10, 1000) if device == "cuda" else (target, 3, 200)


# On CUDA a round repeats the call until it lasts about this long, synchronising once at its end, so that
# short kernels are not timed together with a host-device round trip each.
CUDA_ROUND_S = 2e-3


def measure(benchmark, fn: Callable[[], Any], *, op: str, shape, direction: str, provider: str, device: str,
            size: str) -> None:
    """Time ``fn`` with pytest-benchmark (each round synchronised on CUDA) and fill ``extra_info``.

    Warm-up calls come first (allocator, Triton compilation and autotuning, caches), then one under the
    memory probe, which also estimates the cost of a call: the number of rounds follows from it, so that
    slow cases stay within the time budget and fast ones get enough rounds for a stable median.
    """
    for _ in range(3 if device == "cuda" else 1):
        fn()
    synchronize(device)
    start = time.perf_counter()
    peak = peak_memory(fn, device)
    estimate = max(time.perf_counter() - start, 1e-7)
    if estimate < 1e-3:  # the probe's own cost dominates a short call: time a few plain ones instead
        start = time.perf_counter()
        for _ in range(20):
            fn()
        synchronize(device)
        estimate = max((time.perf_counter() - start) / 20, 1e-7)
    # On CUDA, and for calls of microseconds on the CPU, a timed round repeats the call for CUDA_ROUND_S.
    iterations = min(1000, math.ceil(CUDA_ROUND_S / estimate)) if device == "cuda" or estimate < 1e-4 else 1
    target, least, most = _round_budget(device, size)
    rounds = int(min(most, max(least, math.ceil(target / (estimate * iterations)))))
    calls = 0

    def call() -> None:
        nonlocal calls
        fn()
        calls += 1
        if calls % iterations == 0:  # pedantic runs `iterations` calls per timed round, rounds back to back
            synchronize(device)

    benchmark.group = f"{op} {shape.label} {direction}"
    info = benchmark.extra_info
    info.update(op=op, shape=shape.label, shape_params=dataclasses.asdict(shape), direction=direction,
                provider=provider, device=device,
                backend=os.environ.get("SEQFAST_BACKEND", "auto") if provider == "seqfast" else "torch",
                work=shape.work(direction), work_unit="state updates" if "ctc" in op else "flop",
                peak_mem_bytes=peak, rounds=rounds, iterations=iterations, where=describe(device))
    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=0)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, untimed
        return
    median = benchmark.stats.stats.median
    info["gflops"] = info["work"] / median / 1e9 if median > 0 else float("nan")
