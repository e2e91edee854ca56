"""Timing of seqfast's CPU CTC loss against torch.nn.functional.ctc_loss, in one process.

    .venv/bin/python benchmarks/ctc_cpu_timing.py [--repeat 5] [--shapes T,N,C,S ...] [--memory]

float32, reduction="mean", log_probs = log_softmax(randn) as a leaf, random targets, input_lengths = T,
target_lengths = S. Prints the median seconds of forward and of forward+backward for both, and their
ratios; "nog" is the forward under torch.no_grad() (inference). --memory runs each measurement in a fresh
subprocess and reports the peak resident set growth
(Linux: VmHWM after resetting it through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import seqfast

SHAPES = [(500, 16, 32, 100), (1000, 32, 1000, 200), (200, 64, 5000, 50), (4000, 8, 64, 1200)]


def inputs(T: int, N: int, C: int, S: int):
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(T, N, C, generator=g).log_softmax(2).requires_grad_()
    tg = torch.randint(1, C, (N, S), generator=g)
    return lp, tg, torch.full((N,), T), torch.full((N,), S)


def run(fn, lp, tg, il, tl, backward: bool, no_grad: bool = False):
    if no_grad:  # inference: no gradient can follow, so seqfast stores no log_alpha (torch always does)
        with torch.no_grad():
            fn(lp, tg, il, tl)
        return
    loss = fn(lp, tg, il, tl)
    if backward:
        loss.backward()
        lp.grad = None


def median_time(fn, args, backward: bool, repeat: int, no_grad: bool = False) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run(fn, *args, backward, no_grad)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


IMPLS = {"torch": F.ctc_loss, "seqfast": seqfast.ctc_loss}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_child(impl: str, shape: str, backward: bool) -> None:
    run(IMPLS[impl], *inputs(3, 2, 4, 1), backward)  # first-call costs (code pages, thread pool) are not peaks
    args = inputs(*map(int, shape.split(",")))
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    run(IMPLS[impl], *args, backward)
    print((_status_kib("VmHWM") - base) / 1024)  # MiB


def peak(impl: str, shape, backward: bool) -> float:
    cmd = [sys.executable, __file__, "--peak-child", impl, ",".join(map(str, shape))] + (["--backward"] if backward
                                                                                          else [])
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--peak-child", nargs=2)
    ap.add_argument("--backward", action="store_true")
    a = ap.parse_args()
    if a.peak_child:
        peak_child(*a.peak_child, a.backward)
        return
    shapes = [tuple(map(int, s.split(","))) for s in a.shapes] if a.shapes else SHAPES
    from seqfast import _C

    print(f"threads={torch.get_num_threads()} isa={_C.cpu_isa()}")
    print(f"{'T,N,C,S':>22} {'torch fwd':>10} {'ours fwd':>10} {'x':>6} {'torch f+b':>10} {'ours f+b':>10} {'x':>6} "
          f"{'torch nog':>10} {'ours nog':>10} {'x':>6}")
    for shape in shapes:
        args = inputs(*shape)
        res = {}
        for bwd in (False, True):
            for name, fn in IMPLS.items():
                run(fn, *args, bwd)  # warm-up
                res[name, bwd] = median_time(fn, args, bwd, a.repeat)
        for name, fn in IMPLS.items():
            run(fn, *args, False, True)
            res[name, "no_grad"] = median_time(fn, args, False, a.repeat, no_grad=True)
        tf, of, tb, ob = res["torch", False], res["seqfast", False], res["torch", True], res["seqfast", True]
        tn, on = res["torch", "no_grad"], res["seqfast", "no_grad"]
        print(f"{str(shape):>22} {tf:10.4f} {of:10.4f} {tf / of:6.1f} {tb:10.4f} {ob:10.4f} {tb / ob:6.1f} "
              f"{tn:10.4f} {on:10.4f} {tn / on:6.1f}", flush=True)
        if a.memory:
            m = {(n, b): peak(n, shape, b) for n in IMPLS for b in (False, True)}
            print(f"{'peak RSS growth MiB':>22} {m['torch', False]:10.0f} {m['seqfast', False]:10.0f} {'':>6} "
                  f"{m['torch', True]:10.0f} {m['seqfast', True]:10.0f}", flush=True)


if __name__ == "__main__":
    main()
