"""Timing of seqfast's CPU CTC loss against torch.nn.functional.ctc_loss, in one process.

    PYTHONPATH=. .venv/bin/python benchmarks/ctc_cpu_timing.py [--repeat 5] [--shapes T,N,C,S ...] [--memory]
        [--threads N] [--cpu-time] [--isa avx2] [--torch-isa avx2] [--dtype fp32|bf16|fp16]
        [--alpha-every K ...] [--saved] [--lengths full|sorted] [--ratio paired|medians] [--burst B]

float32 (--dtype bf16 / fp16: the same values rounded; torch then gets them as float32, converted inside the
timed call, since its CPU kernel takes no half types), reduction="mean", log_probs = log_softmax(randn) as a
leaf, random targets, input_lengths = T, target_lengths = S. Prints the median seconds of forward and of
forward+backward for both, and their ratios; "nog" is the forward under torch.no_grad() (inference). Each
round runs torch and seqfast back to back, alternating which goes first, so both see the same machine; the ratio
("x") is the median over rounds of torch's time over ours in the same round (paired: a slow spell of a shared
machine that spans a round slows both sides of it; --ratio medians gives the ratio of the two medians). The
first line records the machine (CPU model, ISA in use, the FMA-loop peak measured now, load average).
--memory runs each measurement in a fresh subprocess and reports the peak resident set growth (Linux: VmHWM
after resetting it through /proc/self/clear_refs). --cpu-time times process CPU time instead of wall time
(steadier on a shared machine, best with --threads 1); --isa caps seqfast's ISA, --torch-isa torch's
(benchmarks/_cpu_isa.py).
--alpha-every K1 K2 ... adds one seqfast column set per checkpoint spacing (1: the full log_alpha table; 0: the
automatic choice) to the same alternating rounds, ratios against torch as before. --saved prints the bytes the
forward saves for backward (each distinct storage once, through torch.autograd.graph.saved_tensors_hooks).
--burst B runs each implementation B times a turn and times the calls after the turn's first (their median): a
loop of one op. With one call a turn (the default) half of each side's calls follow the other side's, and on a
shared VM the first call after another op pays for what that op left behind (cold caches and TLB, an idle second
vCPU to wake): up to a third of a millisecond-scale call (NOTES, "What the first call after another op pays"),
almost nothing of torch's tens of milliseconds.
--lengths sorted gives a batch sorted by length, as bucketing data loaders make it: input_lengths from T down to T/3
evenly, target_lengths in proportion (at least 1), instead of T and S for every sample.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu_isa import cap_torch_isa  # noqa: E402  (before torch is imported)

cap_torch_isa()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import seqfast  # noqa: E402

SHAPES = [(500, 16, 32, 100), (1000, 32, 1000, 200), (200, 64, 5000, 50), (4000, 8, 64, 1200)]


DTYPE = torch.float32  # --dtype
LENGTHS = "full"  # --lengths


def inputs(T: int, N: int, C: int, S: int):
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(T, N, C, generator=g).log_softmax(2).to(DTYPE).requires_grad_()
    tg = torch.randint(1, C, (N, S), generator=g)
    if LENGTHS == "sorted":
        il = torch.linspace(T, T // 3, N).long()
        return lp, tg, il, (il * S // T).clamp(min=1)
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


CLOCK = time.perf_counter


BURST = 1  # --burst


def alternating_times(impls, args, backward: bool, repeat: int, no_grad: bool = False) -> list[list[float]]:
    """Seconds of each implementation in each round; every round runs each in turn, in rotating order: once, or
    BURST times back to back, keeping the median of the burst (the calls after the first one of its turn)."""
    times = [[] for _ in impls]
    for r in range(repeat):
        for k in range(len(impls)):
            i = (r + k) % len(impls)
            burst = []
            for _ in range(BURST):
                t0 = CLOCK()
                run(impls[i], *args, backward, no_grad)
                burst.append(CLOCK() - t0)
            times[i].append(statistics.median(burst[1:] if BURST > 1 else burst))
    return times


RATIO = "paired"  # --ratio
MODES = (False, True, "no_grad")  # forward with grad, forward+backward, forward under no_grad


def speedup(torch_times: list[float], ours: list[float]) -> float:
    """torch over ours: the median of the rounds' ratios (paired), or the ratio of the medians."""
    if RATIO == "paired":
        return statistics.median(t / o for t, o in zip(torch_times, ours))
    return statistics.median(torch_times) / statistics.median(ours)


def cells(res: dict, name: str) -> list[str]:
    """Per mode: implementation `name`'s median seconds and its speedup over torch, formatted."""
    out = []
    for m in MODES:
        out += [f"{statistics.median(res[name, m]):.4f}", f"{speedup(res['torch', m], res[name, m]):.1f}"]
    return out


def torch_ctc(lp, tg, il, tl):
    # torch's CPU kernel takes float32 / float64 only: a bf16 / fp16 caller converts first (timed with it).
    return F.ctc_loss(lp if lp.dtype in (torch.float32, torch.float64) else lp.float(), tg, il, tl)


IMPLS = {"torch": torch_ctc, "seqfast": seqfast.ctc_loss}


def with_alpha_every(k: int):
    """seqfast.ctc_loss with the CPU checkpoint spacing forced to k (0: the automatic choice)."""
    from seqfast.ops import ctc_loss as ctc_ops

    def fn(*args):
        ctc_ops.ALPHA_EVERY = k or None
        try:
            return seqfast.ctc_loss(*args)
        finally:
            ctc_ops.ALPHA_EVERY = None
    return fn


def saved_mib(fn, lp, tg, il, tl) -> float:
    """MiB of the tensors the forward saves for backward, each storage counted once."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(lp, tg, il, tl)
    del loss
    return sum(storages.values()) / 2**20


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


def peak(impl: str, shape, backward: bool, extra: list[str]) -> float:
    cmd = [sys.executable, __file__, "--peak-child", impl, ",".join(map(str, shape)), *extra] + (
        ["--backward"] if backward else [])
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--peak-child", nargs=2)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave)")
    ap.add_argument("--cpu-time", action="store_true")
    ap.add_argument("--isa", default=None, help="cap seqfast's ISA (seqfast._C.set_cpu_isa)")
    ap.add_argument("--torch-isa", default=None, help="cap torch's ISA (read before torch is imported)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--alpha-every", type=int, nargs="*", default=[])
    ap.add_argument("--saved", action="store_true")
    ap.add_argument("--lengths", default="full", choices=["full", "sorted"])
    ap.add_argument("--ratio", default="paired", choices=["paired", "medians"])
    ap.add_argument("--burst", type=int, default=1, help="calls per turn, timed back to back (default 1)")
    a = ap.parse_args()
    global DTYPE, LENGTHS, RATIO, BURST
    RATIO = a.ratio
    BURST = max(1, a.burst)
    DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    LENGTHS = a.lengths
    from seqfast import _C

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.isa:
        _C.set_cpu_isa(a.isa)
    if a.peak_child:
        peak_child(*a.peak_child, a.backward)
        return
    global CLOCK
    if a.cpu_time:
        CLOCK = time.process_time
    shapes = [tuple(map(int, s.split(","))) for s in a.shapes] if a.shapes else SHAPES
    from _harness import cpu_record

    print(cpu_record())
    print(f"threads={torch.get_num_threads()} isa={_C.cpu_isa()} clock={'cpu-time' if a.cpu_time else 'wall'} "
          f"dtype={a.dtype} lengths={a.lengths} ratio={a.ratio} burst={BURST}")
    impls = dict(IMPLS)
    for k in a.alpha_every:
        impls[f"K={k or 'auto'}"] = with_alpha_every(k)
    print(f"{'T,N,C,S':>22} {'torch fwd':>10} {'ours fwd':>10} {'x':>6} {'torch f+b':>10} {'ours f+b':>10} {'x':>6} "
          f"{'torch nog':>10} {'ours nog':>10} {'x':>6}")
    for shape in shapes:
        args = inputs(*shape)
        res = {}
        names, fns = list(impls), list(impls.values())
        for bwd in (False, True):
            for fn in fns:
                run(fn, *args, bwd)  # warm-up
            for name, t in zip(names, alternating_times(fns, args, bwd, a.repeat)):
                res[name, bwd] = t
        for fn in fns:
            run(fn, *args, False, True)
        for name, t in zip(names, alternating_times(fns, args, False, a.repeat, no_grad=True)):
            res[name, "no_grad"] = t
        tf, tb, tn = (statistics.median(res["torch", m]) for m in MODES)
        ours = cells(res, "seqfast")
        print(f"{str(shape):>22} {tf:10.4f} {ours[0]:>10} {ours[1]:>6} {tb:10.4f} {ours[2]:>10} {ours[3]:>6} "
              f"{tn:10.4f} {ours[4]:>10} {ours[5]:>6}", flush=True)
        for name in names[2:]:
            c = cells(res, name)
            print(f"{name:>22} {'':>10} {c[0]:>10} {c[1]:>6} {'':>10} {c[2]:>10} {c[3]:>6} {'':>10} {c[4]:>10} "
                  f"{c[5]:>6}", flush=True)
        if a.saved:
            print(f"{'saved for backward MiB':>22} " + " ".join(
                f"{name} {saved_mib(fn, *args):.1f}" for name, fn in zip(names, fns)), flush=True)
        if a.memory:
            extra = [*(["--threads", str(a.threads)] if a.threads else []), *(["--isa", a.isa] if a.isa else []),
                     *(["--torch-isa", a.torch_isa] if a.torch_isa else []), "--dtype", a.dtype, "--lengths", a.lengths]
            m = {(n, b): peak(n, shape, b, extra) for n in IMPLS for b in (False, True)}
            print(f"{'peak RSS growth MiB':>22} {m['torch', False]:10.0f} {m['seqfast', False]:10.0f} {'':>6} "
                  f"{m['torch', True]:10.0f} {m['seqfast', True]:10.0f}", flush=True)


if __name__ == "__main__":
    main()
