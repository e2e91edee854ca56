"""CTC loss on the GPU (``ctc_correctness``): losses and gradients against the float64 reference and torch's
CUDA ``F.ctc_loss`` on awkward shapes, in every argument form (reductions, zero_infinity, padded and
concatenated targets, ``ctc_loss_from_logits``, float32 / float64, bfloat16 logits).

Same rule as attention: seqfast's error against float64 at most twice torch's (same dtype) plus a floor;
float16 / bfloat16 inputs, which torch refuses, within about one ulp of the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gpu.runtime import Case, Context, judge


@dataclass(frozen=True)
class CtcSpec:
    name: str
    dtype: str  # "fp32", "fp64", "bf16", "fp16"
    T: int
    N: int
    C: int
    S: int
    reduction: str = "none"
    zero_infinity: bool = False
    from_logits: bool = False
    concatenated: bool = False
    # Per-sample lengths as fractions of T / S (cycled over the batch); "infeasible" gives one sample S > T.
    short: bool = True
    infeasible: bool = False
    repeats: bool = False
    blank: int = 0


CASES = (
    CtcSpec("fp32 T257 N5 C1000 S80 none, lengths < T", "fp32", 257, 5, 1000, 80),
    CtcSpec("fp32 T1000 N4 C40 S300 mean (2S+1 > 512: state tiles)", "fp32", 1000, 4, 40, 300, reduction="mean"),
    CtcSpec("fp32 from_logits T200 N8 C5000 S50 mean", "fp32", 200, 8, 5000, 50, reduction="mean", from_logits=True),
    CtcSpec("fp64 T100 N3 C29 S20 sum, concatenated targets", "fp64", 100, 3, 29, 20, reduction="sum",
            concatenated=True),
    CtcSpec("fp32 zero_infinity, one infeasible sample, none", "fp32", 60, 4, 12, 40, zero_infinity=True,
            infeasible=True),
    CtcSpec("fp32 repeated labels, blank last, sum", "fp32", 90, 3, 7, 30, reduction="sum", repeats=True, blank=6),
    CtcSpec("fp64 from_logits T700 N2 C20 S260 none (tiles)", "fp64", 700, 2, 20, 260, from_logits=True),
    CtcSpec("fp32 T1 N3 C5 S1 none", "fp32", 1, 3, 5, 1, short=False),
    CtcSpec("bf16 from_logits T128 N4 C300 S30 sum", "bf16", 128, 4, 300, 30, reduction="sum", from_logits=True),
    CtcSpec("fp16 log_probs T64 N3 C50 S10 mean", "fp16", 64, 3, 50, 10, reduction="mean"),
    CtcSpec("fp32 N256 T150 C40 S30 mean", "fp32", 150, 256, 40, 30, reduction="mean"),
)


def shrink(spec: CtcSpec) -> CtcSpec:
    T = min(spec.T, 7)
    S = min(spec.S, 3) if not spec.infeasible else 6
    dtype = "fp16" if spec.dtype == "bf16" else spec.dtype  # the interpreter mishandles bfloat16
    return replace(spec, dtype=dtype, T=T, N=min(spec.N, 3), C=min(spec.C, 7), S=S,
                   blank=min(spec.blank, min(spec.C, 7) - 1))


_TORCH = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}


def make_problem(spec: CtcSpec, device: str) -> dict:
    import torch

    g = torch.Generator().manual_seed(sum(map(ord, spec.name)))
    dtype = getattr(torch, _TORCH[spec.dtype])
    x = torch.randn(spec.T, spec.N, spec.C, generator=g, dtype=torch.float64) * 2
    if not spec.from_logits:
        x = x.log_softmax(-1)
    labels = [c for c in range(spec.C) if c != spec.blank]
    targets = torch.tensor(labels)[torch.randint(0, len(labels), (spec.N, spec.S), generator=g)]
    if spec.repeats:
        targets[:, 1::2] = targets[:, 0::2][:, : targets[:, 1::2].shape[1]]
    if spec.short:
        il = [max(1, spec.T - (n * spec.T) // (2 * spec.N)) for n in range(spec.N)]
        tl = [max(0, min(spec.S - (n * spec.S) // (3 * spec.N), (il[n] - 1) // 2 if spec.repeats else il[n]))
              for n in range(spec.N)]
    else:
        il, tl = [spec.T] * spec.N, [spec.S] * spec.N
    if spec.infeasible:
        tl[1] = spec.S
        il[1] = max(1, spec.S // 2)  # S labels cannot fit in S/2 frames: +inf loss
    il_t = torch.tensor(il, dtype=torch.int64)
    tl_t = torch.tensor(tl, dtype=torch.int64)
    if spec.concatenated:
        targets = torch.cat([targets[n, : tl[n]] for n in range(spec.N)])
    return {"x": x.to(dtype).to(device), "targets": targets.to(device), "il": il_t.to(device),
            "tl": tl_t.to(device), "weights": (torch.rand(spec.N, generator=g, dtype=torch.float64) + 0.5)}


def run_ctc(ctx: Context, provider: str, spec: CtcSpec, p: dict, dtype):
    """(loss, grad w.r.t. x) for "seqfast", "reference" (float64 backend) or "torch" (F.ctc_loss; from logits
    through log_softmax)."""
    import torch
    import torch.nn.functional as F

    import seqfast

    x = p["x"].detach().to(dtype).requires_grad_()
    kw = dict(blank=spec.blank, reduction=spec.reduction, zero_infinity=spec.zero_infinity)
    if provider == "torch":
        inp = x.log_softmax(-1) if spec.from_logits else x
        loss = F.ctc_loss(inp, p["targets"], p["il"], p["tl"], **kw)
    else:
        fn = seqfast.ctc_loss_from_logits if spec.from_logits else seqfast.ctc_loss
        backend = "reference" if provider == "reference" else ("triton" if ctx.dry_run else None)
        with (seqfast.backend(backend) if backend else _null()):
            loss = fn(x, p["targets"], p["il"], p["tl"], **kw)
    weighted = loss * p["weights"].to(device=loss.device, dtype=loss.dtype) if spec.reduction == "none" else loss
    (grad,) = torch.autograd.grad(weighted.sum(), x)
    return loss.detach(), grad.detach()


def _null():
    import contextlib

    return contextlib.nullcontext()


def check_ctc(ctx: Context, spec: CtcSpec, c: Case) -> None:
    import torch

    p = make_problem(spec, ctx.device)
    dtype = getattr(torch, _TORCH[spec.dtype])
    c.metrics["shape"] = f"T{spec.T} N{spec.N} C{spec.C} S{spec.S}"
    ref_loss, ref_grad = run_ctc(ctx, "reference", spec, p, torch.float64)
    loss, grad = run_ctc(ctx, "seqfast", spec, p, dtype)
    c.check(loss.dtype == dtype and grad.dtype == dtype, f"dtypes {loss.dtype} / {grad.dtype}, expected {dtype}")
    if spec.dtype in ("fp32", "fp64"):
        t_loss, t_grad = run_ctc(ctx, "torch", spec, p, dtype)
        judge(c, "loss", loss, ref_loss, t_loss)
        judge(c, "grad", grad, ref_grad, t_grad)
    else:
        # torch's ctc_loss refuses half inputs: computed in float32 from the exact inputs, only the final
        # rounding to the dtype remains (about one ulp).
        ulp = torch.finfo(dtype).eps
        judge(c, "loss", loss, ref_loss, None, fallback_rel=ulp)
        judge(c, "grad", grad, ref_grad, None, fallback_rel=ulp)
    if spec.infeasible:
        c.check(bool(loss[1] == 0) and bool((grad[:, 1] == 0).all()),
                "zero_infinity: the infeasible sample's loss and gradient are not 0")


# Dry run: one case per argument form (reductions, concatenated targets, zero_infinity, from logits, float64,
# half input).
DRY_CASES = {CASES[i].name for i in (0, 2, 3, 4, 8)}


def ctc_correctness(ctx: Context) -> None:
    for spec in CASES:
        if ctx.dry_run and spec.name not in DRY_CASES:
            continue
        s = shrink(spec) if ctx.dry_run else spec
        ctx.run(s.name, lambda c, s=s: check_ctc(ctx, s, c), min_seconds=3.0)
