"""Alternating timing of seqfast's CTC decoders against the plain-torch ones of bench_ctc_decode.py, in one process.

    PYTHONPATH=. .venv/bin/python benchmarks/ctc_decode_timing.py [--threads 1] [--repeat 7] [--cpu-time]

Inputs as bench_ctc_decode.py (float32, full lengths, S labels without equal neighbours). Each round calls the
four functions once each, in turn, so that load changes on a shared machine hit all of them alike; prints the
medians (ms) and the ratios. --cpu-time measures process CPU time instead of wall time (with one thread, the
time the work took, less the waits for a busy core).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import CtcShape  # noqa: E402
from bench_ctc_decode import _inputs, torch_greedy, torch_viterbi  # noqa: E402

import seqfast  # noqa: E402

SHAPES = [CtcShape(500, 16, 32, 100), CtcShape(1000, 32, 1000, 200)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--cpu-time", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"threads={torch.get_num_threads()} clock={'process' if args.cpu_time else 'wall'} "
          f"isa={seqfast._C.cpu_isa()} load={os.getloadavg()[0]:.1f}")
    for shape in SHAPES:
        lp, tg, il, tl = _inputs(shape, "cpu")
        fns = {
            "torch align": (torch_viterbi, (lp, tg, il, tl)),
            "seqfast align": (seqfast.ctc_forced_align, (lp, tg, il, tl)),
            "torch greedy": (torch_greedy, (lp, il)),
            "seqfast greedy": (seqfast.ctc_greedy_decode, (lp, il)),
        }
        times: dict[str, list[float]] = {name: [] for name in fns}
        for fn, fn_args in fns.values():
            fn(*fn_args)
        for _ in range(args.repeat):
            for name, (fn, fn_args) in fns.items():
                start = clock()
                fn(*fn_args)
                times[name].append(clock() - start)
        ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        print(f"{shape.label}: " + ", ".join(f"{name} {v:.2f} ms" for name, v in ms.items())
              + f"; align {ms['torch align'] / ms['seqfast align']:.1f}x, "
              f"greedy {ms['torch greedy'] / ms['seqfast greedy']:.1f}x")


if __name__ == "__main__":
    main()
