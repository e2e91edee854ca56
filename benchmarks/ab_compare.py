"""Before/after timing of two seqfast checkouts in one run: the benchmark shapes, alternating A and B.

    .venv/bin/python benchmarks/ab_compare.py --base ../seqfast-before [--rounds 3] [--threads 2] [--quick]

Each round runs one child process per checkout (``PYTHONPATH`` pointing at it, its extension built in
place), A then B, so that a drift of the machine falls on both alike. A child times ``seqfast``'s public
functions (medians of ``--reps`` calls) on the issue shapes: attention (2, 8, 1024, 64) forward and
forward+backward, causal and not; CTC loss on the four benchmark shapes, forward with gradient enabled
(log_alpha stored) and forward+backward. Prints, per case, the median over rounds of each checkout and the
ratio B/A (> 1: B is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ATTENTION = [(2, 8, 1024, 64, causal) for causal in (False, True)]
CTC = [(500, 16, 32, 100), (1000, 32, 1000, 200), (200, 64, 5000, 50), (4000, 8, 64, 1200)]


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _attention_calls(seqfast, torch, B, H, L, D, causal):
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))

    def fwd():
        with torch.no_grad():
            seqfast.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def fwd_bwd():
        seqfast.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()

    return fwd, fwd_bwd


def _ctc_calls(seqfast, torch, T, N, C, S):
    lp = torch.randn(T, N, C).log_softmax(-1).requires_grad_()
    tg = torch.randint(1, C, (N, S))
    il, tl = torch.full((N,), T), torch.full((N,), S)
    return (lambda: seqfast.ctc_loss(lp, tg, il, tl)), (lambda: seqfast.ctc_loss(lp, tg, il, tl).backward())


def child(reps: int, quick: bool) -> dict[str, float]:
    import torch

    import seqfast

    torch.manual_seed(0)
    cases = []
    for B, H, L, D, causal in ATTENTION[: 1 if quick else None]:
        label = f"attention B{B} H{H} L{L} D{D}{' causal' if causal else ''}"
        cases.append((label, _attention_calls(seqfast, torch, B, H, L, D, causal)))
    for T, N, C, S in CTC[: 1 if quick else None]:
        cases.append((f"ctc T{T} N{N} C{C} S{S}", _ctc_calls(seqfast, torch, T, N, C, S)))
    out = {}
    for label, (fwd, fwd_bwd) in cases:
        out[f"{label} fwd"] = _median_ms(fwd, reps)
        out[f"{label} fwd+bwd"] = _median_ms(fwd_bwd, reps)
    return out


def _run_child(tree: Path, args) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", "--reps", str(args.reps), "--threads", str(args.threads)]
    proc = subprocess.run(cmd + (["--quick"] if args.quick else []), env=env, capture_output=True, text=True,
                          check=True, cwd=tree)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="checkout A (before); B is this checkout unless --new")
    parser.add_argument("--new", type=Path, default=ROOT, help="checkout B (after)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one attention and one CTC shape")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.reps, args.quick)))
        return 0
    if args.base is None:
        parser.error("--base is required")
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for name, tree in (("A", args.base), ("B", args.new)):
            runs[name].append(_run_child(tree.resolve(), args))
            print(f"round {r + 1}/{args.rounds}: {name} done", file=sys.stderr)
    print(f"A = {args.base}, B = {args.new}; {args.threads} threads, median of {args.rounds} rounds x "
          f"{args.reps} calls")
    print(f"{'case':44s} {'A ms':>10s} {'B ms':>10s} {'B/A':>7s}")
    for case in runs["A"][0]:
        a = statistics.median(run[case] for run in runs["A"])
        b = statistics.median(run[case] for run in runs["B"])
        print(f"{case:44s} {a:10.3f} {b:10.3f} {b / a:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
