"""CTC decoding on the GPU (``ctc_decoding``): the Triton greedy decoder and forced aligner against the float64
reference (exact tokens and paths, scores within the input dtype's rounding), ``opcheck`` of both ops with CUDA
inputs, and their time against the C++ kernels on the host's copy of the same input.

Tie-free inputs (random log-probabilities), so any correct kernel returns the reference's exact paths.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gpu.runtime import Case, Context


@dataclass(frozen=True)
class DecodeSpec:
    name: str
    dtype: str  # "fp32", "fp64", "fp16", "bf16"
    T: int
    N: int
    C: int
    S: int
    blank: int = 0
    transposed: bool = False  # log_probs a (N, T, C) tensor's transposed view


CASES = (
    DecodeSpec("fp32 T500 N16 C32 S100", "fp32", 500, 16, 32, 100),
    DecodeSpec("fp32 T1000 N32 C1000 S200", "fp32", 1000, 32, 1000, 200),
    DecodeSpec("fp64 T97 N5 C29 S20 blank last", "fp64", 97, 5, 29, 20, blank=28),
    DecodeSpec("fp16 T257 N3 C300 S60, transposed view", "fp16", 257, 3, 300, 60, transposed=True),
    DecodeSpec("bf16 T128 N4 C50 S30", "bf16", 128, 4, 50, 30),
)
TIMED = {CASES[0].name, CASES[1].name}
_TORCH = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}


def shrink(spec: DecodeSpec) -> DecodeSpec:
    dtype = "fp16" if spec.dtype == "bf16" else spec.dtype  # the interpreter mishandles bfloat16
    C = min(spec.C, 7)
    return replace(spec, dtype=dtype, T=min(spec.T, 9), N=min(spec.N, 3), C=C, S=min(spec.S, 3),
                   blank=min(spec.blank, C - 1))


def make_problem(spec: DecodeSpec, device: str) -> dict:
    import torch

    g = torch.Generator().manual_seed(sum(map(ord, spec.name)))
    dtype = getattr(torch, _TORCH[spec.dtype])
    x = (torch.randn(spec.N, spec.T, spec.C, generator=g, dtype=torch.float64) * 3).log_softmax(-1).to(dtype)
    x = x.transpose(0, 1) if spec.transposed else x.transpose(0, 1).contiguous()  # (T, N, C)
    labels = torch.tensor([c for c in range(spec.C) if c != spec.blank])
    targets = labels[torch.randint(0, len(labels), (spec.N, spec.S), generator=g)]
    il = torch.tensor([spec.T - (n * spec.T) // (3 * spec.N) for n in range(spec.N)])
    # Shorter targets for the shorter inputs; S <= T / 5 leaves room for any repeats' blanks.
    tl = torch.tensor([max(0, min(spec.S, int(il[n]) // 3)) for n in range(spec.N)])
    return {"x": x.to(device), "targets": targets.to(device), "il": il.to(device), "tl": tl.to(device)}


def check_decode(ctx: Context, spec: DecodeSpec, c: Case) -> None:
    import torch

    import seqfast

    p = make_problem(spec, ctx.device)
    c.metrics["shape"] = f"T{spec.T} N{spec.N} C{spec.C} S{spec.S}"
    with ctx.seqfast_backend():
        tokens, lengths, frames = seqfast.ctc_greedy_decode(p["x"], p["il"], blank=spec.blank, return_frames=True)
        paths, scores = seqfast.ctc_forced_align(p["x"], p["targets"], p["il"], p["tl"], blank=spec.blank)
    # The float64 reference runs a Python loop per frame on the host: on the big shapes it checks the first and
    # the last sample only (the last one's rows sit at the largest offsets), which keeps the group in its time.
    rows = list(range(spec.N)) if spec.T * spec.N <= 4000 else [0, spec.N - 1]
    c.metrics["reference_samples"] = len(rows)
    tokens, lengths, frames, paths, scores = (t[rows] for t in (tokens, lengths, frames, paths, scores))
    with seqfast.backend("reference"):
        host = {k: v.cpu() for k, v in p.items()}
        host = {"x": host["x"][:, rows], **{k: host[k][rows] for k in ("targets", "il", "tl")}}
        r_tokens, r_lengths, r_frames = seqfast.ctc_greedy_decode(host["x"], host["il"], blank=spec.blank,
                                                                  return_frames=True)
        r_paths, r_scores = seqfast.ctc_forced_align(host["x"], host["targets"], host["il"], host["tl"],
                                                     blank=spec.blank)
    c.check(tokens.device.type == p["x"].device.type, f"greedy tokens on {tokens.device}")
    c.check(torch.equal(tokens.cpu(), r_tokens) and torch.equal(lengths.cpu(), r_lengths),
            "greedy tokens / lengths differ from the reference")
    c.check(torch.equal(frames.cpu(), r_frames), "greedy frames differ from the reference")
    c.check(torch.equal(paths.cpu(), r_paths), f"forced-alignment paths differ from the reference in "
                                               f"{int((paths.cpu() != r_paths).sum())} frames")
    c.check(scores.dtype == p["x"].dtype, f"scores dtype {scores.dtype}, expected {p['x'].dtype}")
    err = float((scores.cpu().double() - r_scores.double()).abs().max()) if scores.numel() else 0.0
    c.metrics["scores_max_abs_err"] = err
    c.check(err == 0.0, f"forced-alignment scores are not the input's entries (max error {err:.3g})")
    if spec.name in TIMED and not ctx.dry_run:
        cpu = {k: v.cpu() for k, v in p.items()}
        c.metrics["greedy_gpu"] = ctx.bench(lambda: seqfast.ctc_greedy_decode(p["x"], p["il"]))
        c.metrics["align_gpu"] = ctx.bench(lambda: seqfast.ctc_forced_align(p["x"], p["targets"], p["il"], p["tl"]))
        if not seqfast.EXTENSION_AVAILABLE:  # a GPU machine whose torch the checkout's build does not match
            c.metrics["cpu_timing"] = "skipped: the C++ extension is not built on this machine"
            return
        c.metrics["greedy_cpu_ms"] = _cpu_ms(lambda: seqfast.ctc_greedy_decode(cpu["x"], cpu["il"]))
        c.metrics["align_cpu_ms"] = _cpu_ms(lambda: seqfast.ctc_forced_align(cpu["x"], cpu["targets"], cpu["il"],
                                                                             cpu["tl"]))


def _cpu_ms(fn, rounds: int = 5) -> float:
    import statistics
    import time

    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def check_opcheck(ctx: Context, c: Case) -> None:
    import torch

    from seqfast.ops import ctc_decode as ops

    if ctx.dry_run:
        c.skip("opcheck runs the dispatcher's kernel: on CPU that is the C++ one (tests/test_ctc_decode.py)")
        return
    p = make_problem(shrink(CASES[3]), ctx.device)  # a transposed view: non-contiguous input
    torch.library.opcheck(ops.GREEDY, (p["x"], p["il"], 0))
    torch.library.opcheck(ops.ALIGN, (p["x"], p["targets"], p["il"], p["tl"], 0))


def ctc_decoding(ctx: Context) -> None:
    for spec in CASES:
        s = shrink(spec) if ctx.dry_run else spec
        ctx.run(s.name, lambda c, s=s: check_decode(ctx, s, c), min_seconds=3.0)
    ctx.run("opcheck ctc_greedy_decode / ctc_forced_align, transposed input", lambda c: check_opcheck(ctx, c))
