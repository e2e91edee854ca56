"""Standalone timing of the CPU attention kernels against torch, all in one run (medians).

    PYTHONPATH=. .venv/bin/python benchmarks/time_attention_cpu.py [--reps 5] [--threads N] [--cpu-time]

Prints GFLOP/s (forward 4*B*H*Lq*Lk*D flops non-causal, half for causal; forward+backward 3.5x
the forward) for seqfast and torch.nn.functional.scaled_dot_product_attention, their ratios, and
torch.mm's fp32 GFLOP/s on 2048 x 2048 as the yardstick. ``--cpu-time`` divides by the process's
CPU time instead of wall time: on a machine shared with other jobs that is the steadier measure
(best with --threads 1, where no time goes to waiting threads).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import seqfast

CLOCK = time.perf_counter


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def attention_case(B, H, L, D, causal, backward, reps):
    q, k, v = (torch.randn(B, H, L, D, requires_grad=backward) for _ in range(3))
    g = torch.randn(B, H, L, D)

    def run(f):
        def go():
            o = f(q, k, v, is_causal=causal)
            if backward:
                o.backward(g)
        return go

    ours = median_time(run(seqfast.scaled_dot_product_attention), reps)
    theirs = median_time(run(F.scaled_dot_product_attention), reps)
    flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0) * (3.5 if backward else 1.0)
    return flops / ours / 1e9, flops / theirs / 1e9, theirs / ours


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--cpu-time", action="store_true")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = 2 * 2048**3 / median_time(lambda: torch.mm(a, b), args.reps) / 1e9
    clock = "cpu-time" if args.cpu_time else "wall"
    print(f"threads {torch.get_num_threads()}  {clock}  torch.mm 2048^2 fp32: {mm:.1f} GFLOP/s")
    print(f"{'case':44s} {'seqfast':>9s} {'torch':>9s} {'speedup':>8s}")
    for B, H, L, D, causal, backward in [
        (2, 8, 1024, 64, False, False), (2, 8, 1024, 64, True, False),
        (2, 8, 1024, 64, False, True), (2, 8, 1024, 64, True, True),
        (1, 8, 2048, 64, False, False),
    ]:
        ours, theirs, ratio = attention_case(B, H, L, D, causal, backward, args.reps)
        name = f"B={B} H={H} L={L} D={D} {'causal' if causal else 'full'} {'fwd+bwd' if backward else 'fwd'}"
        extra = f"  ({ours / mm:.2f}x torch.mm)" if L == 2048 else ""
        print(f"{name:44s} {ours:9.1f} {theirs:9.1f} {ratio:7.2f}x{extra}")


if __name__ == "__main__":
    main()
