"""Standalone timing of the CPU attention kernels against torch, all in one run (medians).

    PYTHONPATH=. .venv/bin/python benchmarks/time_attention_cpu.py [--rounds 7] [--threads N] [--cpu-time]
        [--isa avx512|avx2|baseline] [--cases fwd,causal-fwd,...] [--L 1024] [--D 64] [--Lq 1]

Prints the machine first (CPU model, ISA in use, the FMA-loop peak of that ISA measured in the same run,
load average), then GFLOP/s (forward 4*B*H*Lq*Lk*D flops non-causal, half for causal; forward+backward 3.5x
the forward) of seqfast and torch.nn.functional.scaled_dot_product_attention, their ratio and seqfast's share
of the FMA peak. Each round times torch and seqfast back to back (alternating which goes first), so both see
the same machine; the figures are medians over rounds. ``--cpu-time`` divides by the process's CPU time
instead of wall time (the steady measure on a shared machine, best with --threads 1); the process's CPU time
sums its threads, so the rate is then per core and its peak share uses the per-core peak (at any thread count;
time a thread spends spinning at a barrier counts against it), else the all-threads wall-clock peak.
``--torch-isa avx2`` caps torch as well (ATen's kernels, MKL, oneDNN), so that an AVX-512 machine stands in for
an AVX2 one on both sides of the ratio. ``--Lq`` gives the queries fewer rows than the keys' L (``--Lq 1``: a
decoding step against a cache of L keys; causal cases then align the mask top-left, as torch's is_causal does).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu_isa import cap_torch_isa  # noqa: E402  (before torch is imported)

cap_torch_isa()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _harness import cpu_record  # noqa: E402

import seqfast  # noqa: E402
from seqfast import _C  # noqa: E402

CASES = {  # name: (causal, backward)
    "fwd": (False, False), "causal-fwd": (True, False), "fwd+bwd": (False, True), "causal-fwd+bwd": (True, True),
}


def alternating_medians(fns, rounds: int, clock) -> list[float]:
    """Median seconds of each of fns over `rounds` rounds; every round runs each once, in rotating order."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for r in range(rounds):
        for k in range(len(fns)):
            i = (r + k) % len(fns)
            t0 = clock()
            fns[i]()
            times[i].append(clock() - t0)
    return [statistics.median(t) for t in times]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attention_case(B, H, L, D, causal, backward, rounds, clock, dtype=torch.float32, Lq=None):
    Lq = L if Lq is None else Lq
    q, k, v = (torch.randn(B, H, n, D, dtype=dtype, requires_grad=backward) for n in (Lq, L, L))
    g = torch.randn(B, H, Lq, D, dtype=dtype)

    def run(f):
        def go():
            o = f(q, k, v, is_causal=causal)
            if backward:
                o.backward(g)
                q.grad = k.grad = v.grad = None
        return go

    ours, theirs = alternating_medians([run(seqfast.scaled_dot_product_attention),
                                        run(F.scaled_dot_product_attention)], rounds, clock)
    flops = 4 * B * H * Lq * L * D * (0.5 if causal else 1.0) * (3.5 if backward else 1.0)
    return flops / ours / 1e9, flops / theirs / 1e9, theirs / ours


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", "--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--cpu-time", action="store_true")
    parser.add_argument("--isa", default=None, help="cap seqfast's ISA (seqfast._C.set_cpu_isa); torch's too if "
                        "--torch-isa (read before torch is imported) says so")
    parser.add_argument("--torch-isa", default=None, help="cap torch's ISA: avx2 or avx512 (see _cpu_isa.py)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--L", type=int, nargs="*", default=[1024])
    parser.add_argument("--D", type=int, nargs="*", default=[64])
    parser.add_argument("--Lq", type=int, default=None, help="query rows (default: L)")
    parser.add_argument("--B", type=int, default=2)
    parser.add_argument("--H", type=int, default=8)
    parser.add_argument("--no-mm", action="store_true", help="skip the torch.mm yardstick")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    args = parser.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa:
        _C.set_cpu_isa(args.isa)
    torch.manual_seed(0)
    print(cpu_record())
    peak = _C.fma_peak("", 0, 10_000_000, 5)
    limit = peak["gflops_per_core"] if args.cpu_time else peak["gflops"]
    clock_name = "cpu-time" if args.cpu_time else "wall"
    if not args.no_mm:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        (mm_s,) = alternating_medians([lambda: torch.mm(a, b)], args.rounds, clock)
        print(f"{clock_name}: torch.mm 2048^2 fp32 {2 * 2048**3 / mm_s / 1e9:.1f} GFLOP/s; "
              f"peak for the % column {limit:.0f} GFLOP/s")
    print(f"{'case':44s} {'seqfast':>9s} {'torch':>9s} {'speedup':>8s} {'% peak':>7s}")
    for L in args.L:
        for D in args.D:
            for name in args.cases.split(","):
                causal, backward = CASES[name]
                ours, theirs, ratio = attention_case(args.B, args.H, L, D, causal, backward, args.rounds, clock,
                                                     DTYPES[args.dtype], args.Lq)
                rows = "" if args.Lq is None else f"Lq={args.Lq} "
                label = f"B={args.B} H={args.H} {rows}L={L} D={D} {name} {args.dtype}"
                print(f"{label:44s} {ours:9.1f} {theirs:9.1f} {ratio:7.2f}x {100 * ours / limit:6.0f}%", flush=True)
    print(f"load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
